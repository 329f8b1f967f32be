"""Merging across rounds: the exported model as a merge of the rounds' global deltas.

Each round's global model is kept (``round-states/round-N.safetensors``, the
trainable state only: ~1.4 MB for the default LoRA adapter). At export the
deltas between consecutive rounds are merged as ``export.merge`` says:

* a merge operator (task arithmetic, TIES, DARE, magnitude pruning) over the round
  deltas, times ``export.scale``, added to the initial model; task arithmetic with
  scale 1 is the last round's model itself;
* ``ema``: an exponential moving average of the global models;
* ``lines``: the last model's delta from the initial one, scaled by depth (LiNeS).

On LoRA the state is factors: operators and the EMA act on the factors (an
approximation of acting on their products), while LiNeS scales B only, which
scales each module's product exactly. A frozen A (FFA-LoRA) never changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedelta.config import ExportConfig
from fedelta.lora import A_SUFFIX
from fedelta.merging.layers import LayerScheme, lines_scales, scheme_for
from fedelta.merging.operators import MERGE_METHODS, merge_tensors
from fedelta.seeding import derive_seed
from fedelta.tensors import TensorDict

ROUND_STATES_DIR = "round-states"


class RoundStates:
    """The global model of every completed round, on disk in the run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.folder = run_dir / ROUND_STATES_DIR

    def record(self, server_round: int, state: Mapping[str, torch.Tensor]) -> None:
        """Keep round ``server_round``'s global model (a re-run round overwrites it)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().contiguous() for k, v in state.items()}
        save_file(tensors, str(self.folder / f"round-{server_round}.safetensors"))

    def load(self, last_round: int) -> list[TensorDict]:
        """Rounds 0..``last_round``; a missing one is an error naming the file."""
        states = []
        for r in range(last_round + 1):
            path = self.folder / f"round-{r}.safetensors"
            if not path.is_file():
                raise FileNotFoundError(
                    f"'{path}' is missing: merging across rounds needs every round's model"
                )
            states.append(load_file(str(path)))
        return states


def merge_rounds(
    states: list[TensorDict],
    config: ExportConfig,
    seed: int,
    scheme: LayerScheme | None = None,
    num_layers: int = 0,
) -> TensorDict:
    """The exported model from the global models of rounds 0..T (``states``)."""
    first, last = states[0], states[-1]
    if config.merge == "none" or len(states) == 1:
        return dict(last)
    if config.merge == "ema":
        average = dict(first)
        for state in states[1:]:
            average = {
                k: config.ema_decay * average[k] + (1 - config.ema_decay) * state[k] for k in state
            }
        return average
    if config.merge == "lines":
        if scheme is None:
            raise ValueError("LiNeS needs the model's layer scheme")
        scaled = [k for k in last if not k.endswith(A_SUFFIX)]
        scales = lines_scales(scaled, scheme, num_layers, config.lines_alpha, config.lines_beta)
        return {
            k: last[k] if k not in scales else first[k] + scales[k] * (last[k] - first[k])
            for k in last
        }
    if config.merge not in MERGE_METHODS:
        raise ValueError(f"unknown export.merge {config.merge!r}")
    deltas = [
        {k: after[k] - before[k] for k in after}
        for before, after in zip(states[:-1], states[1:], strict=True)
    ]
    ones = [1.0] * len(deltas)
    return {
        k: first[k]
        + config.scale
        * merge_tensors(
            config.merge, [d[k] for d in deltas], ones, config.density, derive_seed(seed, i)
        )
        for i, k in enumerate(sorted(last))
    }


def merged_export(
    config: ExportConfig, run_dir: Path, last_round: int, model: torch.nn.Module, seed: int
) -> TensorDict:
    """:func:`merge_rounds` over the recorded rounds 0..``last_round`` of a run, with the
    layer layout of ``model`` (the run's model) for LiNeS."""
    states = RoundStates(run_dir).load(last_round)
    if config.merge != "lines":
        return merge_rounds(states, config, seed)
    model_config = model.config
    scheme = scheme_for(model_config.model_type)
    return merge_rounds(states, config, seed, scheme, model_config.num_hidden_layers)
