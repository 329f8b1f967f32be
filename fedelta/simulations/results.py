"""A finished run's results as one object: per-round rows, totals, privacy spent.

Everything is read back from the run directory (``config.toml``, ``metrics.jsonl``,
``summary.json``), so a result loaded next week equals the one a run returned.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedelta.config import RUN_CONFIG_FILE, ConfigError, RunConfig, load_config
from fedelta.server.checkpoint import CheckpointError
from fedelta.server.metrics import SUMMARY_FILE, MetricsLog
from fedelta.strategies import Strategy

STRATEGY_FILE = "strategy.json"
"""Written next to ``config.toml`` when a strategy object, not the config's
``[strategy]`` table, aggregated the run."""


def recorded_strategy(run_dir: Path) -> str | None:
    """The class of the strategy object that aggregated a run; ``None``: the config's."""
    path = run_dir / STRATEGY_FILE
    return json.loads(path.read_text(encoding="utf-8"))["class"] if path.is_file() else None


def class_path(obj: object) -> str:
    """``module.Class`` of an object, as ``strategy.json`` records it."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def record_strategy(run_dir: Path, strategy: Strategy | None, resume: bool) -> None:
    """Write which strategy object aggregates the run (none: the config's); a resume
    must use the same one."""
    path = run_dir / STRATEGY_FILE
    planned = class_path(strategy) if strategy is not None else None
    if resume:
        made_by = recorded_strategy(run_dir)
        if made_by != planned:
            raise ConfigError(
                f"'{run_dir}' was aggregated by {made_by or 'the config strategy'}; resume it "
                f"with that, not {planned or 'the config strategy'} (from Python: "
                "simulate(config, strategy=...))"
            )
    if strategy is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        record = {"class": planned, "name": getattr(strategy, "name", None)}
        path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class RunResult:
    """Where a run wrote its outputs and what it measured."""

    run_dir: Path
    config: RunConfig = field(repr=False)
    summary: dict[str, Any] = field(repr=False)
    """Totals and final values (``summary.json``)."""
    rows: list[dict[str, Any]] = field(repr=False)
    """One metrics row per round; round 0 is the model before training."""

    @classmethod
    def load(cls, run_dir: str | Path) -> RunResult:
        """The result of a finished run directory."""
        run_dir = Path(run_dir)
        summary_path = run_dir / SUMMARY_FILE
        if not summary_path.is_file():
            raise CheckpointError(f"'{run_dir}' holds no finished run (no {SUMMARY_FILE})")
        return cls(
            run_dir=run_dir,
            config=load_config(run_dir / RUN_CONFIG_FILE, follow_renames=True),
            summary=json.loads(summary_path.read_text(encoding="utf-8")),
            rows=MetricsLog(run_dir).rows(),
        )

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def adapter_dir(self) -> Path:
        """The exported PEFT adapter (loads with ``PeftModel.from_pretrained``)."""
        return Path(self.summary["adapter"])

    @property
    def causal(self) -> bool:
        return self.config.model.task == "causal-lm"

    @property
    def quality_key(self) -> str:
        """The headline metric: test accuracy, or test perplexity for a causal LM."""
        return "test-perplexity" if self.causal else "test-accuracy"

    def metric(self, key: str) -> list[float | None]:
        """One value per round (``None`` where a round did not measure it)."""
        return [row.get(key) for row in self.rows]

    @property
    def final_quality(self) -> float | None:
        return self.rows[-1].get(self.quality_key) if self.rows else None

    @property
    def bytes_up(self) -> int:
        """Serialized bytes all sites sent the server over the run."""
        return int(self.summary["total-bytes-up"])

    @property
    def bytes_down(self) -> int:
        return int(self.summary["total-bytes-down"])

    @property
    def epsilon(self) -> float | None:
        """Privacy spent (delta is ``privacy.delta``): the largest site's DP-SGD epsilon,
        else client-level DP's epsilon; ``None`` when the run was not private."""
        return self.summary.get("dp-epsilon", self.summary.get("client-dp-epsilon"))
