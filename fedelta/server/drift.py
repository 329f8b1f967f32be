"""Client drift, per round: how far each site's update went, whether it agrees with
where the global model went, and how the head's bias moves.

Under label skew a site's update pulls toward its own majority class. Three numbers
per round make that visible in ``metrics.jsonl`` and the run report:

- ``update-norm-by-site``: the L2 norm of each site's update (as the server decoded
  it, all tensors together), with its mean in ``update-norm-mean``;
- ``update-cosine-by-site``: the cosine between each site's update and the change of
  the global state this round over the same tensors (those of the global shape: a
  site of lower LoRA rank is compared on its head alone; 1: the site pulled where the
  federation went; near 0 or below: it drifted elsewhere), with its mean in
  ``update-cosine-mean``;
- ``head-bias`` (the global classification head's bias per class after the round)
  and ``head-bias-update-by-site`` (each site's update to it: a skewed site raises
  its majority class).

Per-site numbers need each site's own update, so a securely aggregated round, whose
server only sees the sum, reports ``head-bias`` alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedelta.tensors import Delta, TensorDict, densify, global_norm, is_head


def head_bias_name(names: Mapping[str, Any]) -> str | None:
    """The classification head's bias among ``names`` (``None``: no such head)."""
    found = [name for name in names if is_head(name) and name.endswith("bias")]
    return found[-1] if found else None  # the output layer is the last head bias


class DriftMonitor:
    """Collects each site's decoded update during a round; :meth:`close` compares
    them with the round's change of the global state."""

    def __init__(self) -> None:
        self._updates: dict[str, TensorDict] = {}

    def observe(self, site: str, delta: Delta) -> None:
        self._updates[site] = densify(delta)

    def close(self, before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> dict:
        """The round's drift metrics, from the global state ``before`` and ``after`` it."""
        row: dict[str, Any] = {}
        bias = head_bias_name(after)
        if bias is not None:
            row["head-bias"] = _rounded(after[bias])
        if not self._updates:
            return row
        change = {k: after[k].double() - before[k].double() for k in after if k in before}
        norms, cosines, bias_updates = {}, {}, {}
        for site, update in sorted(self._updates.items()):
            moved = {
                k: change[k]
                for k, v in update.items()
                if k in change and change[k].shape == v.shape  # a lower-rank site: its head
            }
            norms[site] = round(global_norm(update), 6)
            dot = sum(float((update[k].double() * moved[k]).sum()) for k in moved)
            denominator = global_norm({k: update[k] for k in moved}) * global_norm(moved)
            if denominator > 0:
                cosines[site] = round(dot / denominator, 4)
            if bias is not None and bias in update:
                bias_updates[site] = _rounded(update[bias])
        row["update-norm-by-site"] = norms
        row["update-norm-mean"] = round(sum(norms.values()) / len(norms), 6)
        if cosines:
            row["update-cosine-by-site"] = cosines
            row["update-cosine-mean"] = round(sum(cosines.values()) / len(cosines), 4)
        if bias_updates:
            row["head-bias-update-by-site"] = bias_updates
        return row


def _rounded(tensor: torch.Tensor) -> list[float]:
    return [round(float(x), 5) for x in tensor.flatten()]
