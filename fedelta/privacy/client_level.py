"""Client-level DP: a site's whole contribution to a round is bounded, then hidden in noise.

DP-FedAvg (McMahan et al., 2018) with fixed clipping: each site's update is clipped
to L2 norm ``C``, the server averages the ``m`` sampled updates with equal weights
(the denominator fixed at ``m``, so one site moves the mean by at most ``C / m``)
and Gaussian noise of std ``z C / m`` hides any one of them.

* ``central``: the server clips and adds the noise. The server is trusted: it sees
  every update in the clear.
* ``distributed``: each site clips its own delta and adds noise of std
  ``z C / sqrt(m)``; the ``m`` shares sum to the central mechanism's noise, so with
  secure aggregation the server only ever sees noised sums. One upload alone
  carries ``sqrt(m)`` times less noise than the sum: without secure aggregation
  this protects against third parties who see only the global model, not against
  the server.

The server half (clipping, equal weights, central noise, accounting) is the
:class:`~fedelta.strategies.aggregators.client_dp.ClientLevelDP` aggregator; this
module holds what both sides share and the client's noise share.

Both are the subsampled Gaussian mechanism over rounds (sample rate: sampled sites
over connected sites), accounted with Opacus' RDP accountant; the epsilon in each
round's metrics is what all rounds so far spent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedelta.config import PrivacyConfig
from fedelta.privacy.accounting import noise_for_epsilon
from fedelta.tensors import TensorDict, clip_to_norm

SAMPLED = "client-dp-sampled"
"""Strategy config key: sites sampled this round (their noise shares add up)."""
NOISE_MULTIPLIER = "client-dp-noise-multiplier"
"""Strategy config key: the round's noise multiplier z."""


def client_noise_multiplier(settings: PrivacyConfig, sample_rate: float, rounds: int) -> float:
    """``client-noise-multiplier``, or the smallest z that keeps ``rounds`` rounds at
    ``sample_rate`` within ``client-target-epsilon``."""
    if settings.client_noise_multiplier > 0:
        return settings.client_noise_multiplier
    return noise_for_epsilon(settings.client_target_epsilon, settings.delta, sample_rate, rounds)


def add_noise_share(
    delta: Mapping[str, torch.Tensor],
    clip_norm: float,
    noise_multiplier: float,
    sampled: int,
    generator: torch.Generator,
) -> tuple[TensorDict, bool]:
    """A site's distributed-DP upload: its delta clipped to ``clip_norm`` plus its share
    of the noise (std ``z C / sqrt(m)``); also whether clipping scaled it."""
    clipped, scaled = clip_to_norm(dict(delta), clip_norm)
    std = noise_multiplier * clip_norm / math.sqrt(sampled)
    return with_noise(clipped, std, generator), scaled


def with_noise(
    tensors: Mapping[str, torch.Tensor], std: float, generator: torch.Generator
) -> TensorDict:
    """``tensors`` plus Gaussian noise of ``std``, drawn in the mapping's order."""
    return {
        k: v + std * torch.randn(v.shape, generator=generator, dtype=v.dtype)
        for k, v in tensors.items()
    }
