"""FedNCM: the head set to the nearest-class-mean classifier before training.

Legate, Bernier, Page-Caccia, Oyallon and Belilovsky, "Guiding The Last Layer in
Federated Learning with Pre-Trained Models", NeurIPS 2023. A fresh random head
under heterogeneous labels makes the first rounds' gradients mostly about fitting
the head, and distorts the pretrained features; one round of class statistics
gives a head that already classifies well, for the cost of a forward pass over
each site's data, and fine-tuning from it (FedNCM+FT) converges faster.

Before round 1 the server sends every available site the initial global model (its
LoRA B is zero, so this is the frozen base model); each site runs its training
split through it once and answers, per class, the sum of the feature vectors that
enter the head's last linear layer (captured by a forward hook on that layer, so
however the model pools, the head's own input is what is summed) and the count of
examples. The server adds them up over sites and sets

    weight[c] = mean_c / ||mean_c||,   bias[c] = 0,

with ``mean_c`` the federation's mean feature of class ``c``: the logits are then
``||h|| cos(h, mean_c)`` and their argmax is the cosine nearest-class-mean rule
(the feature norm ``||h||`` is the softmax temperature when fine-tuning starts).
The bias is 0, not the log of the class prior: the NCM rule has no prior, and a
log-prior would favour the classes the largest sites hold. A class that no site
holds keeps its initial row and bias. Training then proceeds as in ``joint``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from fedelta.errors import UserError
from fedelta.strategies.heads.base import HeadStrategy
from fedelta.tensors import TensorDict, is_head

SUMS, COUNTS = "class-feature-sums", "class-counts"
"""Tensors of a site's head statistics (float, ``classes x features`` and ``classes``)."""


class HeadShapeError(UserError, ValueError):
    """The model's head cannot be set to class means (no linear head, or one that
    sees more than one feature vector per example)."""


class NearestClassMean(HeadStrategy):
    name = "ncm"
    summary = "head set to the normalised federated class means before round 1, then joint"
    paper = "Legate et al., NeurIPS 2023 (FedNCM+FT)"
    initialises = True


def head_linear(model: torch.nn.Module) -> tuple[str, torch.nn.Linear]:
    """The trainable linear layer that outputs the logits, and its module name: the
    last one inside the head (``classifier``/``score``; under peft, the trained copy)."""
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and is_head(f"{name}.weight")
        and module.weight.requires_grad
    ]
    if not found:
        raise HeadShapeError(
            f'strategy.head = "ncm" needs a linear classification head; '
            f"{type(model).__name__} has none that trains"
        )
    return found[-1]


@dataclass
class ClassStatistics:
    """Per-class sums of the head's input features and example counts."""

    sums: torch.Tensor
    """float64, ``classes x features``."""
    counts: torch.Tensor
    """float64 (whole numbers), ``classes``."""

    @classmethod
    def zeros(cls, classes: int, features: int) -> ClassStatistics:
        return cls(
            torch.zeros(classes, features, dtype=torch.float64),
            torch.zeros(classes, dtype=torch.float64),
        )

    def add(self, other: ClassStatistics) -> None:
        self.sums += other.sums.to(torch.float64)
        self.counts += other.counts.to(torch.float64)

    def tensors(self) -> TensorDict:
        return {SUMS: self.sums, COUNTS: self.counts}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> ClassStatistics:
        """Read a site's statistics (already checked for shape and finiteness);
        raises ``ValueError`` on counts that are not non-negative whole numbers."""
        counts = tensors[COUNTS].to(torch.float64)
        if (counts < 0).any() or not torch.equal(counts, counts.round()):
            raise ValueError("class counts must be non-negative whole numbers")
        return cls(tensors[SUMS].to(torch.float64), counts)


@torch.no_grad()
def class_feature_sums(
    model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]
) -> ClassStatistics:
    """Run every batch through ``model`` (in eval mode) and sum, per label, the
    input of its head's last linear layer. Raises :class:`HeadShapeError` if that
    layer sees anything but one feature vector per example (a model that pools after
    its head, such as a decoder's ``score`` over all positions)."""
    _, linear = head_linear(model)
    seen: list[torch.Tensor] = []
    handle = linear.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    stats = ClassStatistics.zeros(linear.out_features, linear.in_features)
    model.eval()
    try:
        for batch in batches:
            labels = batch["labels"]
            seen.clear()
            model(**{k: v for k, v in batch.items() if k != "labels"})
            if len(seen) != 1 or tuple(seen[0].shape) != (len(labels), linear.in_features):
                shapes = [tuple(s.shape) for s in seen]
                raise HeadShapeError(
                    f'strategy.head = "ncm" needs one feature vector per example at the '
                    f"head's input; for a batch of {len(labels)} the head of "
                    f"{type(model).__name__} saw inputs of shape {shapes}"
                )
            stats.sums.index_add_(0, labels, seen[0].to(torch.float64))
            stats.counts += torch.bincount(labels, minlength=linear.out_features).to(torch.float64)
    finally:
        handle.remove()
    return stats


def ncm_head(
    stats: ClassStatistics, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The nearest-class-mean head: each class's row is its mean feature scaled to
    unit length, its bias 0; classes without examples keep ``weight``/``bias``."""
    held = stats.counts > 0
    means = stats.sums[held] / stats.counts[held, None]
    norms = means.norm(dim=1, keepdim=True).clamp_min(1e-12)
    new_weight = weight.clone()
    new_weight[held] = (means / norms).to(weight.dtype)
    new_bias = None
    if bias is not None:
        new_bias = bias.clone()
        new_bias[held] = 0.0
    return new_weight, new_bias


def with_ncm_head(
    global_state: Mapping[str, torch.Tensor], stats: ClassStatistics, module: str
) -> TensorDict:
    """``global_state`` with the head layer ``module`` (see :func:`head_linear`) set
    by :func:`ncm_head`; everything else unchanged."""
    state = dict(global_state)
    weight_name, bias_name = f"{module}.weight", f"{module}.bias"
    weight, bias = ncm_head(stats, state[weight_name], state.get(bias_name))
    state[weight_name] = weight
    if bias is not None:
        state[bias_name] = bias
    return state
