"""Compare runs: one arm per setting, mean and spread over its seeds, as CSV and markdown.

An arm is what a comparison varies (a strategy, a sparsity, a privacy level); its
runs differ only in the seed. A single run is an arm of one.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedelta.simulations.results import RunResult

TABLE_CSV = "results.csv"
TABLE_MD = "results.md"
RUNS_CSV = "runs.csv"


@dataclass(frozen=True)
class Arm:
    """Runs of one setting over seeds."""

    label: str
    results: list[RunResult]
    settings: dict[str, Any] = field(default_factory=dict)
    """What sets this arm apart (variant name, grid keys and values), for the CSV."""

    @property
    def causal(self) -> bool:
        return any(r.causal for r in self.results)

    @property
    def private(self) -> bool:
        return any(r.epsilon is not None for r in self.results)


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    value: Callable[[RunResult], float | None]
    digits: int


def _summary(key: str, scale: float = 1.0) -> Callable[[RunResult], float | None]:
    def read(result: RunResult) -> float | None:
        value = result.summary.get(key)
        return None if value is None else value / scale

    return read


def columns(arms: Sequence[Arm]) -> list[Column]:
    """What the table reports: quality first, then cost (bytes, privacy, time, memory)."""
    if any(arm.causal for arm in arms):
        quality = [
            Column("final-test-perplexity", "final ppl", _summary("final-test-perplexity"), 2),
            Column("best-test-perplexity", "best ppl", _summary("best-test-perplexity"), 2),
        ]
    else:
        quality = [
            Column("final-test-accuracy", "final acc", _summary("final-test-accuracy"), 4),
            Column("best-test-accuracy", "best acc", _summary("best-test-accuracy"), 4),
        ]
    cost = [
        Column("final-test-loss", "final loss", _summary("final-test-loss"), 4),
        Column("total-mb-up", "uplink MB", _summary("total-bytes-up", 1e6), 2),
        Column("total-mb-down", "downlink MB", _summary("total-bytes-down", 1e6), 2),
    ]
    if any(arm.private for arm in arms):
        cost.append(Column("epsilon", "epsilon", lambda r: r.epsilon, 2))
    cost += [
        Column("wall-seconds", "wall s", _summary("wall-seconds"), 1),
        Column("peak-rss-mb", "peak MB", _summary("peak-rss-mb"), 0),
    ]
    return quality + cost


def mean_and_spread(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the values present (spread needs two)."""
    present = [v for v in values if v is not None and not math.isnan(v)]
    if not present:
        return None, None
    spread = statistics.stdev(present) if len(present) > 1 else None
    return statistics.fmean(present), spread


def table_rows(arms: Sequence[Arm]) -> list[dict[str, Any]]:
    """One row per arm: its settings, the number of seeds, mean and std per column."""
    cols = columns(arms)
    rows = []
    for arm in arms:
        row: dict[str, Any] = {"arm": arm.label, **arm.settings, "seeds": len(arm.results)}
        for col in cols:
            mean, spread = mean_and_spread([col.value(r) for r in arm.results])
            row[f"{col.key}-mean"] = mean
            row[f"{col.key}-std"] = spread
        rows.append(row)
    return rows


def formatted(arms: Sequence[Arm]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the comparison: ``mean ± std`` over each arm's seeds."""
    cols = columns(arms)
    header = ["arm", "seeds", *(c.header for c in cols)]
    cells = [
        [
            arm.label,
            str(len(arm.results)),
            *(_format(row[f"{c.key}-mean"], row[f"{c.key}-std"], c.digits) for c in cols),
        ]
        for arm, row in zip(arms, table_rows(arms), strict=True)
    ]
    return header, cells


def to_markdown(arms: Sequence[Arm]) -> str:
    """The comparison as a markdown table."""
    header, cells = formatted(arms)
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def _format(mean: float | None, spread: float | None, digits: int) -> str:
    if mean is None:
        return "-"
    text = f"{mean:.{digits}f}"
    return text if spread is None else f"{text} ± {spread:.{digits}f}"


def run_rows(arms: Sequence[Arm]) -> list[dict[str, Any]]:
    """One row per run with the same columns, for statistics of your own."""
    cols = columns(arms)
    return [
        {
            "arm": arm.label,
            **arm.settings,
            "seed": result.config.seed,
            "run-dir": str(result.run_dir),
            **{col.key: col.value(result) for col in cols},
        }
        for arm in arms
        for result in arm.results
    ]


def write_tables(arms: Sequence[Arm], out_dir: Path) -> list[Path]:
    """``results.csv`` (one column per mean and std), ``results.md`` and ``runs.csv``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path = out_dir / TABLE_MD
    md_path.write_text(to_markdown(arms), encoding="utf-8")
    return [
        _write_csv(table_rows(arms), out_dir / TABLE_CSV),
        md_path,
        _write_csv(run_rows(arms), out_dir / RUNS_CSV),
    ]


def _write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    fieldnames = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    return path
