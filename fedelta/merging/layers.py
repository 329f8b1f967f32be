"""Which transformer block a parameter belongs to, and LiNeS' depth-dependent scales.

LiNeS (Wang et al., 2024) scales the fine-tuning delta of layer ``l`` of ``L`` by
``alpha + beta * (l - 1) / (L - 1)``: shallow layers, which hold general features,
keep little of the delta; deep ones keep more. The block index is read from
where each architecture family keeps its blocks (``encoder.layer.N``,
``model.layers.N``, ``transformer.h.N``), and every other parameter must be one the
family puts before the blocks (embeddings: scaled like block 1) or after them
(final norm, pooler, heads: scaled like block L). Anything else is an error that
names the tensor, never a guess.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from fedelta.errors import UserError


class UnknownLayerError(UserError, ValueError):
    """A parameter name does not fit the architecture's layout."""


@dataclass(frozen=True)
class LayerScheme:
    """Where one architecture family keeps its blocks and what surrounds them."""

    family: str
    block: re.Pattern[str]
    before: tuple[str, ...]
    """Module names (a path component) of parameters below the first block."""
    after: tuple[str, ...]
    """Module names of parameters above the last block."""

    def depth(self, name: str, num_layers: int) -> int:
        """1-based block of parameter ``name`` (1 below the blocks, ``num_layers`` above)."""
        match = self.block.search(name)
        if match:
            index = int(match.group(1))
            if index >= num_layers:
                raise UnknownLayerError(
                    f"'{name}' is in block {index}, but the model has {num_layers} blocks"
                )
            return index + 1
        parts = set(name.split("."))
        if parts & set(self.before):
            return 1
        if parts & set(self.after):
            return num_layers
        raise UnknownLayerError(
            f"cannot place '{name}' in a {self.family} model: it is in no block "
            f"(*.{self.block.pattern}) and not among {', '.join(self.before + self.after)}"
        )


SCHEMES: dict[str, LayerScheme] = {
    "bert": LayerScheme(
        "BERT",
        re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\."),
        before=("embeddings",),
        after=("pooler", "classifier", "score"),
    ),
    "llama": LayerScheme(
        "Llama",
        re.compile(r"(?:^|\.)model\.layers\.(\d+)\."),
        before=("embed_tokens",),
        after=("norm", "lm_head", "score"),
    ),
    "gpt2": LayerScheme(
        "GPT-2",
        re.compile(r"(?:^|\.)transformer\.h\.(\d+)\."),
        before=("wte", "wpe"),
        after=("ln_f", "lm_head", "score"),
    ),
}
"""Layer schemes by family."""

FAMILIES: dict[str, str] = {
    "bert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "electra": "bert",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "gemma": "llama",
    "gpt2": "gpt2",
}
"""Hugging Face ``model_type`` to layer scheme."""


def scheme_for(model_type: str) -> LayerScheme:
    """The layer scheme of a Hugging Face ``config.model_type``."""
    if model_type not in FAMILIES:
        raise UnknownLayerError(
            f"LiNeS does not know where model type '{model_type}' keeps its blocks; "
            f"supported: {', '.join(sorted(FAMILIES))}"
        )
    return SCHEMES[FAMILIES[model_type]]


def lines_scales(
    names: Iterable[str], scheme: LayerScheme, num_layers: int, alpha: float, beta: float
) -> dict[str, float]:
    """LiNeS' scale for each parameter: ``alpha + beta * (l - 1) / (L - 1)``."""
    span = max(num_layers - 1, 1)
    return {n: alpha + beta * (scheme.depth(n, num_layers) - 1) / span for n in names}
