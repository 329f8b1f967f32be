"""Atomic checkpoints of everything a run needs to continue after a crash.

One safetensors file holds the global trainable state, the strategy's tensors
and, in its metadata, the completed round, the strategy's scalars and the
server RNG state. It is written to a temporary file, flushed to disk and renamed
over the previous checkpoint, so a crash mid-write leaves the last one intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from fedelta.errors import UserError

FILENAME = "checkpoint.safetensors"
FORMAT = "fedelta-checkpoint-1"
_GLOBAL, _STRATEGY = "global/", "strategy/"


class CheckpointError(UserError, RuntimeError):
    """No usable checkpoint where one was expected."""


@dataclass
class Checkpoint:
    server_round: int
    """The last completed round."""
    global_state: dict[str, torch.Tensor]
    strategy_tensors: dict[str, torch.Tensor]
    strategy_meta: dict[str, Any]
    rng_state: dict[str, Any]
    privacy: dict[str, Any] = field(default_factory=dict)
    """Each site's DP-SGD mechanisms so far (what its replies reported)."""


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    tensors = {_GLOBAL + k: v.contiguous() for k, v in checkpoint.global_state.items()}
    tensors |= {_STRATEGY + k: v.contiguous() for k, v in checkpoint.strategy_tensors.items()}
    metadata = {
        "format": FORMAT,
        "server-round": str(checkpoint.server_round),
        "strategy": json.dumps(checkpoint.strategy_meta),
        "rng": json.dumps(checkpoint.rng_state),
        "privacy": json.dumps(checkpoint.privacy),
    }
    payload = save_safetensors(tensors, metadata=metadata)
    target = run_dir / FILENAME
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".checkpoint-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load_checkpoint(run_dir: Path) -> Checkpoint:
    path = run_dir / FILENAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at '{path}': nothing to resume")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as err:  # a torn or foreign file
        raise CheckpointError(f"checkpoint '{path}' cannot be read: {err}") from err
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a fedelta checkpoint ({metadata.get('format')!r})")
    return Checkpoint(
        server_round=int(metadata["server-round"]),
        global_state={k[len(_GLOBAL) :]: v for k, v in tensors.items() if k.startswith(_GLOBAL)},
        strategy_tensors={
            k[len(_STRATEGY) :]: v for k, v in tensors.items() if k.startswith(_STRATEGY)
        },
        strategy_meta=json.loads(metadata["strategy"]),
        rng_state=json.loads(metadata["rng"]),
        privacy=json.loads(metadata.get("privacy", "{}")),
    )
