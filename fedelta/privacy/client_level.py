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

Both are the subsampled Gaussian mechanism over rounds (sample rate: sampled sites
over connected sites), accounted with Opacus' RDP accountant; the epsilon in each
round's metrics is what all rounds so far spent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from fedelta.compression.sparse import Delta, densify
from fedelta.config import PrivacyConfig
from fedelta.privacy.accounting import PrivacyAccountant, noise_for_epsilon
from fedelta.privacy.noise import noise_generator
from fedelta.strategies.aggregators.base import Aggregator, TensorDict
from fedelta.strategies.aggregators.mean import Mean
from fedelta.strategies.aggregators.norm_bound import clip_to_norm
from fedelta.strategies.base import EmptyRoundError

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
    return _with_noise(clipped, std, generator), scaled


def _with_noise(
    tensors: Mapping[str, torch.Tensor], std: float, generator: torch.Generator
) -> TensorDict:
    """``tensors`` plus Gaussian noise of ``std``, drawn in the mapping's order."""
    return {
        k: v + std * torch.randn(v.shape, generator=generator, dtype=v.dtype)
        for k, v in tensors.items()
    }


class ClientLevelDP(Aggregator):
    """The mean of (clipped) updates over the sampled sites, with Gaussian noise."""

    name = "client-dp"
    summary = "DP-FedAvg: clipped, equally weighted updates plus Gaussian noise"
    streaming = True
    sparse = True

    def __init__(self, settings: PrivacyConfig, rounds: int, seed: int) -> None:
        if settings.client_dp not in ("central", "distributed"):
            raise ValueError(f"client-dp must be central or distributed, got {settings.client_dp}")
        self.settings = settings
        self.rounds = rounds
        self.seed = seed
        self.central = settings.client_dp == "central"
        self.linear = not self.central
        """Distributed DP needs only the sum (secure aggregation works); central DP
        clips each update in the clear."""
        self.accountant = PrivacyAccountant()
        self.noise_multiplier = 0.0
        """z, fixed at the first round (from the first round's sample rate if derived)."""
        self._mean = Mean()
        self._round = 0
        self._sampled = 0
        self._sample_rate = 1.0
        self._received = self._clipped = 0

    def sampling(self, sampled: int, population: int) -> None:
        self._sampled = sampled
        self._sample_rate = sampled / population
        if not self.noise_multiplier:
            self.noise_multiplier = client_noise_multiplier(
                self.settings, self._sample_rate, self.rounds
            )

    def client_config(self) -> dict[str, bool | int | float | str]:
        if self.central:
            return {}
        return {SAMPLED: self._sampled, NOISE_MULTIPLIER: self.noise_multiplier}

    def begin(self, server_round: int = 0) -> None:
        self._mean.begin(server_round)
        self._round = server_round
        self._received = self._clipped = 0

    def add(self, update: Delta, weight: float) -> None:
        """``weight`` is the number of sites ``update`` stands for: 1, or the number of
        sites in a securely aggregated sum. Sites weigh the same whatever their example
        counts: the bound on one site's influence needs it."""
        if self.central:
            if weight != 1:
                raise ValueError(f"central client-level DP takes one site per update, got {weight}")
            update, scaled = clip_to_norm(densify(update), self.settings.client_clip_norm)
            self._clipped += scaled
        self._mean.add(update, weight)
        self._received += weight

    def result(self) -> TensorDict:
        if not self._sampled:
            raise RuntimeError("client-level DP needs the round's sampling (sampling())")
        if not self._received:
            raise EmptyRoundError("no client update was accumulated this round")
        share = self._received / self._sampled
        mean = {k: v * share for k, v in self._mean.result().items()}
        if self.central:
            std = self.noise_multiplier * self.settings.client_clip_norm / self._sampled
            generator = noise_generator(self.settings.seeded_noise, self.seed, self._round)
            mean = _with_noise(dict(sorted(mean.items())), std, generator)
        self.accountant.spend(self.noise_multiplier, self._sample_rate, 1)
        return mean

    def metrics(self) -> dict[str, float]:
        metrics = {
            "client-dp-epsilon": self.accountant.epsilon(self.settings.delta),
            "client-dp-noise-multiplier": self.noise_multiplier,
        }
        if self.central:
            metrics["clients-clipped"] = float(self._clipped)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"noise-multiplier": self.noise_multiplier, **self.accountant.to_meta()}

    def load_state_dict(self, meta: Mapping[str, Any]) -> None:
        self.noise_multiplier = float(meta.get("noise-multiplier", 0.0))
        self.accountant = PrivacyAccountant.from_meta(meta)
