"""The capability matrix: what each LoRA rule and each aggregator guarantees, and the
optimizer matrix: what each server optimizer fixes and costs.

Most server optimizers step the combined update after it is formed and change none
of the first matrix's properties; those that read each reply on its own (SCAFFOLD's
control variates, FedNova's step counts) rule out secure aggregation, which the
optimizer matrix says, with their bytes, client state and DP compatibility.
"""

from __future__ import annotations

from fedelta.strategies.aggregators import AGGREGATORS
from fedelta.strategies.lora import LORA_AGGREGATIONS
from fedelta.strategies.optimizers import OPTIMIZERS

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


OPTIMIZER_COLUMNS = ("fixes", "bytes", "client-state", "secure-aggregation", "dp-sgd", "client-dp")
"""Column keys of :func:`optimizer_matrix`."""


def optimizer_matrix() -> list[dict[str, str]]:
    """One row per server optimizer, from its flags: what it fixes, its bytes against
    FedAvg, what a site keeps, and which privacy options it can be combined with."""
    rows = []
    for name, optimizer in OPTIMIZERS.items():
        client_dp = "yes"
        if optimizer.extra_uplink:
            client_dp = "no: " + optimizer.extra_uplink + " is not clipped or noised"
        elif optimizer.uses_step_counts:
            client_dp = "with local-steps > 0 (step counts travel in the clear)"
        term = optimizer.client_loss_term or optimizer.client_gradient_term
        rows.append(
            {
                "name": name,
                "fixes": optimizer.fixes,
                "bytes": optimizer.traffic,
                "client-state": optimizer.client_state,
                "secure-aggregation": "no: " + optimizer.reads_each_reply
                if optimizer.reads_each_reply
                else "yes",
                "dp-sgd": f"no: {term}" if term else "yes",
                "client-dp": client_dp,
            }
        )
    return rows


def format_optimizer_matrix(rows: list[dict[str, str]]) -> str:
    """A Markdown table of :func:`optimizer_matrix` (what docs/strategies.md carries)."""
    header = ["setting", *OPTIMIZER_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f'`strategy.optimizer = "{row["name"]}"`', *(row[c] for c in OPTIMIZER_COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
