"""Privacy accounting with Opacus' RDP accountant, kept as data that outlives a round.

A site's DP-SGD budget and the server's client-level budget are both compositions
of subsampled Gaussian mechanisms: a list of ``(noise multiplier, sample rate,
steps)``, exactly Opacus' ``RDPAccountant.history``. Keeping that list (in a
node's ``Context.state``, or in the server's checkpoint) and rebuilding the
accountant from it means every epsilon fedelta reports is Opacus' own number for
the same mechanisms.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from flwr.app import ConfigRecord, RecordDict
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

Mechanism = tuple[float, float, int]
"""``(noise multiplier, sample rate, steps)`` of one run of a subsampled Gaussian."""


class PrivacyBudgetError(RuntimeError):
    """Training would spend more epsilon than the site's budget allows."""


@dataclass
class PrivacyAccountant:
    """What has been spent so far, as the mechanisms that spent it."""

    history: list[Mechanism] = field(default_factory=list)

    RECORD: ClassVar[str] = "dp-accountant"
    """Key of the ConfigRecord a node's ``Context.state`` keeps it under."""

    def spend(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Account ``steps`` more steps of the mechanism (merged with the last if equal)."""
        if steps <= 0:
            return
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            last = self.history.pop()
            steps += last[2]
        self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0 before any step)."""
        accountant = RDPAccountant()
        accountant.history = list(self.history)
        return float(accountant.get_epsilon(delta)) if self.history else 0.0

    def epsilon_after(
        self, noise_multiplier: float, sample_rate: float, steps: int, delta: float
    ) -> float:
        """Epsilon once ``steps`` more steps are spent (nothing is spent)."""
        projected = PrivacyAccountant(list(self.history))
        projected.spend(noise_multiplier, sample_rate, steps)
        return projected.epsilon(delta)

    # -- persistence -------------------------------------------------------------------
    def to_meta(self) -> dict[str, Any]:
        return {"history": [list(m) for m in self.history]}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any] | None) -> PrivacyAccountant:
        return cls(_mechanisms((meta or {}).get("history", [])))

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "noise-multiplier": [m[0] for m in self.history],
                "sample-rate": [m[1] for m in self.history],
                "steps": [m[2] for m in self.history],
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> PrivacyAccountant:
        columns = (record["noise-multiplier"], record["sample-rate"], record["steps"])
        return cls(_mechanisms(zip(*columns, strict=True)))

    def save(self, state: RecordDict) -> None:
        """Write into a node's ``Context.state``."""
        state[self.RECORD] = self.to_record()

    @classmethod
    def load(cls, state: RecordDict) -> PrivacyAccountant:
        """What a node's ``Context.state`` holds (empty before its first private round)."""
        record = state.config_records.get(cls.RECORD)
        return cls() if record is None else cls.from_record(record)

    def at_least(self, other: PrivacyAccountant, delta: float) -> PrivacyAccountant:
        """Whichever of the two has spent more. A site's ``Context.state`` lasts one run;
        after a resume the server's accountant of what the site reported is the longer one."""
        return other if other.epsilon(delta) > self.epsilon(delta) else self


def _mechanisms(rows: Iterable[Sequence[Any]]) -> list[Mechanism]:
    """``(noise, rate, steps)`` rows read back from JSON or a ConfigRecord, typed."""
    return [(float(z), float(q), int(n)) for z, q, n in rows]


def noise_for_epsilon(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier (within Opacus' 0.01 epsilon tolerance) with which
    ``steps`` steps at ``sample_rate`` spend at most ``target_epsilon``."""
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant="rdp",
        )
    )
