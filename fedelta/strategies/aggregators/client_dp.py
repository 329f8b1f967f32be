"""Client-level DP as an aggregator: the mean of clipped, equally weighted site
updates plus Gaussian noise (DP-FedAvg, McMahan et al., 2018).

The mechanism, its two placements (``central``, ``distributed``) and its accounting
are described in :mod:`fedelta.privacy.client_level`, which also holds the client's
noise share.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedelta.config import PrivacyConfig, RunConfig
from fedelta.privacy.accounting import PrivacyAccountant
from fedelta.privacy.client_level import (
    NOISE_MULTIPLIER,
    SAMPLED,
    client_noise_multiplier,
    with_noise,
)
from fedelta.privacy.noise import noise_generator
from fedelta.strategies.aggregators.base import Aggregator
from fedelta.strategies.aggregators.mean import Mean
from fedelta.strategies.base import EmptyRoundError
from fedelta.tensors import Delta, TensorDict, clip_to_norm, densify


class ClientLevelDP(Aggregator):
    """The mean of (clipped) updates over the sampled sites, with Gaussian noise."""

    name = "client-dp"
    summary = "DP-FedAvg: clipped, equally weighted updates plus Gaussian noise"
    streaming = True
    sparse = True
    site_weight = 1
    """Sites weigh the same whatever their example counts: the bound on one site's
    influence needs it."""

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

    @classmethod
    def from_config(cls, config: RunConfig) -> ClientLevelDP:
        """Client-level DP over the run's rounds; it replaces ``strategy.aggregator``."""
        return cls(config.privacy, config.num_server_rounds, config.seed)

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
        """``weight`` is the number of sites ``update`` stands for: one site's
        :attr:`site_weight`, or the number of sites in a securely aggregated sum."""
        if self.central:
            if weight != self.site_weight:
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
            mean = with_noise(dict(sorted(mean.items())), std, generator)
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
