"""The capability matrix: what each LoRA rule and each aggregator guarantees.

Server optimizers are left out of the matrix on purpose: they step the combined
update after it is formed, so they change none of these properties.
"""

from __future__ import annotations

from fedelta.strategies.aggregators import AGGREGATORS
from fedelta.strategies.lora import LORA_AGGREGATIONS

COLUMNS = ("exact", "linear", "heterogeneous-ranks", "dp-friendly", "streaming")
"""Column keys, as in ``fedelta strategies --json``."""
MEANINGS = {
    "exact": "global LoRA update = sum_i w_i scale_i B_i A_i",
    "linear": "server needs only the sum of uploads (secure aggregation works)",
    "heterogeneous-ranks": "clients may train different LoRA ranks",
    "dp-friendly": "clipping + noise on the upload bounds the weight update",
    "streaming": "server memory independent of the number of clients",
}


def capability_matrix() -> list[dict[str, str | bool]]:
    """One row per LoRA rule (with the mean), then one per aggregator."""
    rows: list[dict[str, str | bool]] = []
    for name, rule in LORA_AGGREGATIONS.items():
        rows.append(
            {
                "kind": "strategy.lora",
                "name": name,
                "summary": rule.summary,
                "exact": rule.exact,
                "linear": rule.linear,
                "heterogeneous-ranks": rule.heterogeneous_ranks,
                "dp-friendly": rule.dp_friendly,
                "streaming": True,
            }
        )
    for name, aggregator in AGGREGATORS.items():
        rows.append(
            {
                "kind": "strategy.aggregator",
                "name": name,
                "summary": AGGREGATORS.summary(name),
                # An aggregator can only keep what the LoRA rule offers; merge
                # operators trim or drop each update on its own: never a plain sum.
                "exact": aggregator.linear,
                "linear": aggregator.linear,
                "heterogeneous-ranks": True,
                "dp-friendly": True,
                "streaming": aggregator.streaming,
            }
        )
    return rows


def format_matrix(rows: list[dict[str, str | bool]]) -> str:
    """A Markdown table of :func:`capability_matrix` (what the README carries)."""
    header = ["setting", *COLUMNS, "what it does"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f'`{row["kind"]} = "{row["name"]}"`']
        cells += ["yes" if row[c] else "no" for c in COLUMNS]
        cells.append(str(row["summary"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
