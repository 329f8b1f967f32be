"""Per-round metrics (``metrics.jsonl``), the run summary and its console table."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedelta.server.checkpoint import CheckpointError

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


class MetricsLog:
    """Append-only JSON lines, one per completed round, flushed as they are written."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / METRICS_FILE

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        lines = [
            line for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
        rows = []
        for number, line in enumerate(lines, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                if number < len(lines):
                    raise CheckpointError(
                        f"{self.path}, line {number}, is not JSON ({err.msg}); the run "
                        "directory was edited or damaged"
                    ) from err
                # The last line was being written when the process was killed.
        return rows

    def truncate_after(self, server_round: int) -> None:
        """Drop rows past ``server_round`` (written before a crash, not checkpointed)."""
        kept = [row for row in self.rows() if row["round"] <= server_round]
        self.path.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")

    def append(self, row: Mapping[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()


def summarise(rows: list[dict[str, Any]], wall_seconds: float) -> dict[str, Any]:
    """Totals and final values over all rounds of a run."""
    trained = [r for r in rows if r["round"] > 0]
    last = rows[-1] if rows else {}
    with_acc = [r for r in rows if r.get("test-accuracy") is not None]
    bytes_up = sum(r.get("bytes-up", 0) for r in rows)
    dense_up = sum(r.get("dense-fp32-bytes-up", 0) for r in rows)
    quality: dict[str, Any] = {
        "final-test-accuracy": last.get("test-accuracy"),
        "final-test-loss": last.get("test-loss"),
        "best-test-accuracy": max((r["test-accuracy"] for r in with_acc), default=None),
    }
    if any("test-perplexity" in r for r in rows):  # causal LM: lower is better
        ppl = [r["test-perplexity"] for r in rows if r.get("test-perplexity") is not None]
        quality = {
            "initial-test-perplexity": rows[0].get("test-perplexity"),
            "final-test-perplexity": last.get("test-perplexity"),
            "best-test-perplexity": min(ppl, default=None),
            "final-test-loss": last.get("test-loss"),
            "final-test-token-accuracy": last.get("test-token-accuracy"),
        }
    privacy: dict[str, Any] = {}
    spent: dict[str, float] = {}
    for row in rows:
        spent.update(row.get("dp-epsilon-by-site", {}))
    if spent:
        privacy = {"dp-epsilon": max(spent.values()), "dp-epsilon-by-site": spent}
    client_level = [r["client-dp-epsilon"] for r in rows if r.get("client-dp-epsilon") is not None]
    if client_level:
        privacy["client-dp-epsilon"] = client_level[-1]
    return {
        "rounds": len(trained),
        **quality,
        **privacy,
        "total-bytes-down": sum(r.get("bytes-down", 0) for r in rows),
        "total-bytes-up": bytes_up,
        "uplink-reduction": round(dense_up / bytes_up, 2) if bytes_up else None,
        "bytes-down-by-site": _site_totals(rows, "bytes-down-by-site"),
        "bytes-up-by-site": _site_totals(rows, "bytes-up-by-site"),
        "total-failures": sum(len(r.get("clients-failed", {})) for r in rows),
        "total-rejected": sum(r.get("clients-rejected", 0) for r in rows),
        "rounds-skipped": sum(bool(r.get("round-skipped")) for r in rows),
        "wall-seconds": round(wall_seconds, 2),
    }


def _site_totals(rows: Iterable[Mapping[str, Any]], key: str) -> dict[str, int]:
    totals: dict[str, int] = {}
    for row in rows:
        for site, count in row.get(key, {}).items():
            totals[site] = totals.get(site, 0) + count
    return dict(sorted(totals.items()))


def write_summary(run_dir: Path, summary: Mapping[str, Any]) -> Path:
    path = run_dir / SUMMARY_FILE
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return path


def format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def format_traffic(summary: Mapping[str, Any]) -> str:
    """One line on bytes moved, for the console after a run."""
    line = (
        f"bytes on the wire: {format_bytes(summary['total-bytes-down'])} down, "
        f"{format_bytes(summary['total-bytes-up'])} up"
    )
    if summary.get("uplink-reduction"):
        line += f" ({summary['uplink-reduction']:.1f}x smaller than the same updates as dense fp32)"
    return line


def format_table(rows: Iterable[Mapping[str, Any]]) -> str:
    """A fixed-width per-round table for the console (perplexities for a causal LM)."""
    rows = list(rows)
    causal = any("test-perplexity" in r or "federated-perplexity" in r for r in rows)
    quality = (
        ("test-perplexity", "federated-perplexity")
        if causal
        else (
            "test-accuracy",
            "federated-accuracy",
        )
    )
    # Privacy columns only when the run spends a budget.
    epsilons = [
        (key, label)
        for key, label in (("dp-epsilon", "eps (dp-sgd)"), ("client-dp-epsilon", "eps (client)"))
        if any(r.get(key) is not None for r in rows)
    ]
    header = (
        "round",
        "test ppl" if causal else "test acc",
        "test loss",
        "train loss",
        "fed ppl" if causal else "fed acc",
        "clients",
        "down",
        "up",
        *(label for _, label in epsilons),
        "sec",
    )
    lines = [header]
    for r in rows:
        lines.append(
            (
                str(r["round"]),
                _num(r.get(quality[0]), 4),
                _num(r.get("test-loss"), 4),
                _num(r.get("train-loss"), 4),
                _num(r.get(quality[1]), 4),
                f"{r['clients-replied']}/{r['clients-sampled']}" if "clients-sampled" in r else "-",
                format_bytes(r["bytes-down"]) if "bytes-down" in r else "-",
                format_bytes(r["bytes-up"]) if "bytes-up" in r else "-",
                *(_num(r.get(key), 2) for key, _ in epsilons),
                _num(r.get("wall-seconds"), 1),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def _num(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"
