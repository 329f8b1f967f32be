"""Half Fine-Tuning (Hui et al., 2024, "HFT: Half Fine-Tuning for Large Language
Models"): each round, half of the parameter groups train and the rest stay frozen.

A group is one adapted module (its LoRA A and B together) or, in full
fine-tuning, one module's weight and bias. The classification head is not a
group: it always trains. The selection is drawn from the run seed and the round,
so the server and every client agree on it without sending it; clients upload
only the selected half.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from fedelta.seeding import derive_seed
from fedelta.tensors import is_head


def group_of(name: str) -> str | None:
    """The parameter group of a trainable tensor; ``None`` for the head (never frozen)."""
    if is_head(name):
        return None
    if ".lora_A." in name or ".lora_B." in name:
        return name.split(".lora_")[0]
    return name.rsplit(".", 1)[0]


def selected_tensors(names: Iterable[str], seed: int, server_round: int) -> set[str]:
    """The tensors that train in ``server_round``: half the groups (rounded up), and the head."""
    names = list(names)
    groups = sorted({g for g in map(group_of, names) if g is not None})
    rng = np.random.default_rng(derive_seed(seed, server_round, 0x4854))
    chosen = set(rng.permutation(len(groups))[: (len(groups) + 1) // 2].tolist())
    picked = {groups[i] for i in chosen}
    return {n for n in names if group_of(n) is None or group_of(n) in picked}
