"""LoRA factors as weight updates: one scaling convention, per-client ranks, folding.

Conventions used everywhere in fedelta (clients, server, strategies, export):

* An adapted module's update is ``scale(r) * B @ A`` in ``nn.Linear`` layout
  ``(out_features, in_features)``; ``scale(r) = alpha / r``, or ``alpha / sqrt(r)``
  with rsLoRA, and ``alpha`` is the same for every client. GPT-2 style ``Conv1D``
  layers (``fan_in_fan_out``) store their weight transposed; only
  :func:`apply_fold` deals with that.
* The server's global adapter has rank ``lora.r``. A client of rank ``r_i <= r``
  takes the first ``r_i`` components, with B rescaled by ``scale(r)/scale(r_i)``
  so that its product is unchanged (:func:`client_view`); its delta is mapped back
  the same way (:func:`lift_delta`). The components it cannot hold (the *tail*)
  are either folded into its frozen base weights (exact strategies) or missing
  from its view (the ``naive`` rule), and reported as projection error.
* A *fold* is a dense correction of a module's base weight, ``W = W0 + C``.
  Exact strategies carry ``C`` to clients, dense or as a truncated SVD.
* Every process draws ``A`` from the same seeded generator at the global rank, so a
  rank-``r_i`` client's initial ``A`` is the first ``r_i`` rows of the server's.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer

from fedelta.config import LoraSettings
from fedelta.seeding import derive_seed
from fedelta.tensors import TensorDict

A_SUFFIX = ".lora_A.default.weight"
B_SUFFIX = ".lora_B.default.weight"
FOLD_PREFIX = "fold/"
"""Global-state keys holding a module's base-weight correction ``C`` (server side)."""
_PRISTINE = "_fedelta_pristine_base"


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """The factor peft multiplies ``B @ A`` by: ``alpha/r`` or ``alpha/sqrt(r)``."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


@dataclass(frozen=True)
class RankScaling:
    """The global rank and the scaling rule every client and the server share."""

    global_rank: int
    alpha: float
    rslora: bool = False

    @classmethod
    def from_settings(cls, settings: LoraSettings) -> RankScaling:
        """The scaling of a run's ``[lora]`` table."""
        return cls(settings.r, settings.alpha, settings.use_rslora)

    def scale(self, rank: int | None = None) -> float:
        """``scale(rank)``; the global rank's scale when ``rank`` is None."""
        return lora_scale(self.alpha, rank or self.global_rank, self.rslora)


def adapted_modules(names: Iterable[str]) -> list[str]:
    """Module names that carry a LoRA pair, from trainable-state keys."""
    return sorted(n[: -len(A_SUFFIX)] for n in names if n.endswith(A_SUFFIX))


def is_factor(name: str) -> bool:
    return name.endswith(A_SUFFIX) or name.endswith(B_SUFFIX)


def product(state: Mapping[str, torch.Tensor], module: str, scale: float) -> torch.Tensor:
    """``scale * B @ A`` of ``module`` in fp32, Linear layout."""
    return scale * (state[module + B_SUFFIX].float() @ state[module + A_SUFFIX].float())


def seeded_lora_A(seed: int, module: str, rank: int, in_features: int) -> torch.Tensor:
    """``A`` drawn as peft draws it (Kaiming-uniform, a=sqrt(5)) from a per-module seed.

    Independent of process, build order and client rank, so all clients and the
    server agree on ``A`` without sending it (FFA-LoRA) and lower ranks are prefixes.
    """
    generator = torch.Generator().manual_seed(derive_seed(seed, zlib.crc32(module.encode())))
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound


def client_view(
    global_state: Mapping[str, torch.Tensor], rank: int, scaling: RankScaling
) -> tuple[TensorDict, TensorDict]:
    """A rank-``rank`` client's factors from the global ones, and the tail it lacks.

    Returns ``(state, tail)``: ``state`` has every key of ``global_state`` with LoRA
    factors cut to ``rank``; ``tail[module]`` is ``scale * B[:, rank:] @ A[rank:]``
    (absent when ``rank == global_rank``).
    """
    state = dict(global_state)
    if rank == scaling.global_rank:
        return state, {}
    ratio = scaling.scale() / scaling.scale(rank)
    scale = scaling.scale()
    tail: TensorDict = {}
    for module in adapted_modules(global_state):
        a, b = global_state[module + A_SUFFIX], global_state[module + B_SUFFIX]
        state[module + A_SUFFIX] = a[:rank].clone()
        state[module + B_SUFFIX] = b[:, :rank] * ratio
        tail[module] = scale * (b[:, rank:].float() @ a[rank:].float())
    return state, tail


def lift_delta(delta: Mapping[str, torch.Tensor], rank: int, scaling: RankScaling) -> TensorDict:
    """A rank-``rank`` client's factor delta in the global rank's coordinates (zero-padded)."""
    global_rank = scaling.global_rank
    if rank == global_rank:
        return dict(delta)
    ratio = scaling.scale(rank) / scaling.scale()
    lifted: TensorDict = {}
    for name, value in delta.items():
        if name.endswith(A_SUFFIX):
            lifted[name] = torch.cat([value, value.new_zeros(global_rank - rank, value.shape[1])])
        elif name.endswith(B_SUFFIX):
            pad = value.new_zeros(value.shape[0], global_rank - rank)
            lifted[name] = torch.cat([value * ratio, pad], dim=1)
        else:
            lifted[name] = value
    return lifted


def rank_layout(layout: Mapping[str, tuple[int, ...]], rank: int) -> dict[str, tuple[int, ...]]:
    """The shapes a rank-``rank`` client's tensors have, given the global layout."""
    shapes = {}
    for name, shape in layout.items():
        if name.endswith(A_SUFFIX):
            shapes[name] = (rank, shape[1])
        elif name.endswith(B_SUFFIX):
            shapes[name] = (shape[0], rank)
        else:
            shapes[name] = tuple(shape)
    return shapes


def svd_factors(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-factor ``B @ A`` as ``U sqrt(S)``, ``sqrt(S) V^T`` (same product, same rank).

    Components come out ordered by singular value, so cutting to the first ``k`` is
    the best rank-``k`` approximation (what ``rank-projection = "svd"`` relies on).
    Components with no singular value (a zero or rank-deficient product) keep B = 0
    and get an A row of peft's initial scale along ``V``, so they can still learn.
    """
    rank, in_features = a.shape
    u, s, vh = torch.linalg.svd(b.double() @ a.double(), full_matrices=False)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    root = s.sqrt()
    new_b, new_a = u * root, root[:, None] * vh
    dead = s <= s.max() * 1e-6 if s.numel() and s.max() > 0 else torch.ones_like(s, dtype=bool)
    new_b[:, dead] = 0.0
    new_a[dead] = vh[dead] / math.sqrt(3.0)  # norm of a Kaiming-uniform(a=sqrt(5)) row
    return new_b.float(), new_a.float()


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``U`` (out x k) and ``V`` (k x in) with ``U @ V`` the best rank-k approximation."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    k = min(rank, s.shape[0])
    return (u[:, :k] * s[:k]).float(), vh[:k].float()


# -- folding into a live peft model ---------------------------------------------------
def lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    """Adapted layers by the module name used in trainable-state keys."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def apply_fold(model: torch.nn.Module, corrections: Mapping[str, torch.Tensor]) -> None:
    """Set each adapted base weight to ``W0 + C`` (``W0`` = pristine pretrained weight).

    ``corrections`` maps module names to ``C`` in Linear layout; modules not named
    are reset to ``W0``. The pristine weights are copied the first time a module is
    folded, so one cached model serves many clients and rounds.
    """
    layers = lora_layers(model)
    unknown = corrections.keys() - layers.keys()
    if unknown:
        raise KeyError(f"fold names modules the model does not adapt: {sorted(unknown)[:3]}")
    pristine: dict[str, torch.Tensor] = model.__dict__.setdefault(_PRISTINE, {})
    with torch.no_grad():
        for name, layer in layers.items():
            weight = layer.get_base_layer().weight
            if name in corrections and name not in pristine:
                pristine[name] = weight.detach().clone()
            if name not in pristine:
                continue
            correction = corrections.get(name)
            if correction is None:
                weight.copy_(pristine[name])
                continue
            if layer.fan_in_fan_out:
                correction = correction.T
            if tuple(correction.shape) != tuple(weight.shape):
                raise ValueError(
                    f"fold for '{name}' has shape {tuple(correction.shape)}, "
                    f"base weight is {tuple(weight.shape)}"
                )
            weight.copy_(pristine[name] + correction.to(weight.dtype))


def effective_update(model: torch.nn.Module, module: str) -> torch.Tensor:
    """``W - W0`` of one adapted module in Linear layout: fold plus LoRA product."""
    layer = lora_layers(model)[module]
    weight = layer.get_base_layer().weight.detach()
    pristine = model.__dict__.get(_PRISTINE, {}).get(module, weight)
    delta = layer.get_delta_weight("default") + (weight - pristine)
    return delta.T if layer.fan_in_fan_out else delta


# -- folds on the wire ---------------------------------------------------------------
def encode_fold(corrections: Mapping[str, torch.Tensor], rank: int) -> tuple[TensorDict, float]:
    """The fold as sent: dense (``rank == 0``) or ``U``/``V`` of a rank-``rank`` SVD.

    Returns the tensors and the relative Frobenius error of what was sent.
    """
    if rank == 0:
        return dict(corrections), 0.0
    tensors: TensorDict = {}
    error_sq = total_sq = 0.0
    for module, matrix in corrections.items():
        u, v = truncated_svd(matrix, rank)
        tensors[module + ".U"], tensors[module + ".V"] = u, v
        error_sq += float((matrix - u @ v).norm()) ** 2
        total_sq += float(matrix.norm()) ** 2
    return tensors, math.sqrt(error_sq / total_sq) if total_sq > 0 else 0.0


def decode_fold(tensors: Mapping[str, torch.Tensor]) -> TensorDict:
    """Undo :func:`encode_fold`: module name to dense correction."""
    corrections: TensorDict = {}
    for name, tensor in tensors.items():
        if name.endswith(".U"):
            module = name[:-2]
            if module + ".V" not in tensors:
                raise KeyError(f"fold '{module}' has U but no V")
            corrections[module] = tensor @ tensors[module + ".V"]
        elif not name.endswith(".V"):
            corrections[name] = tensor
    return corrections
