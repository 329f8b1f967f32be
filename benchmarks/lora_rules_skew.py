"""Naive vs exact LoRA aggregation when clients agree (IID) and when they do not.

A programmatic strategy experiment: no Flower processes, the same ClientTrainer
and strategies the federation uses, driven in one loop. Four clients with LoRA
r=8 train 25 steps per round on IID or Dirichlet(0.5) label-skewed partitions of
Rotten Tomatoes; each rule aggregates two rounds; central test accuracy and loss
after each round. Writes ``benchmarks/results/lora_rules_skew.md``.

    python benchmarks/lora_rules_skew.py
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedelta.client.trainer import ClientTrainer  # noqa: E402
from fedelta.config import RunConfig  # noqa: E402
from fedelta.protocol import Site  # noqa: E402
from fedelta.server.evaluation import CentralEvaluator  # noqa: E402
from fedelta.strategies import build_strategy  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CLIENTS, ROUNDS = 4, 2
RULES = ("naive", "ffa", "fedex")


def run(partitioner: str, rule: str) -> list[tuple[float, float]]:
    """(accuracy, loss) after each round."""
    config = RunConfig().replace(
        **{
            "data.partitioner": partitioner,
            "simulation.num-supernodes": CLIENTS,
            "strategy.lora": rule,
        }
    )
    strategy = build_strategy(config)
    evaluator = CentralEvaluator(config)
    state = strategy.initial_state(evaluator.initial_state)
    sites = [Site(i, CLIENTS, f"client-{i}") for i in range(CLIENTS)]
    curve = []
    for server_round in range(1, ROUNDS + 1):
        strategy.begin_round(server_round, state, [s.rank(config) for s in sites])
        adapter, fold = strategy.downlink(state)
        for site in sites:
            trainer = ClientTrainer(config, site)
            out = trainer.fit(trainer.receive(adapter, fold, {}), server_round)
            delta = trainer.compression.decode(out.upload, trainer.uplink_layout, server_round)
            strategy.accumulate(delta, len(trainer.data.train), trainer.rank)
        state = strategy.finish_round(state)
        result = evaluator(state)
        curve.append((result.accuracy, result.loss))
        print(partitioner, rule, server_round, curve[-1], flush=True)
    return curve


def main() -> None:
    header = "| partition | rule | " + " | ".join(
        f"acc r{r} | loss r{r}" for r in range(1, ROUNDS + 1)
    )
    lines = [header + " |", "|---|---|" + "---|---|" * ROUNDS]
    for partitioner in ("iid", "dirichlet"):
        for rule in RULES:
            cells = [f"{acc:.3f} | {loss:.3f}" for acc, loss in run(partitioner, rule)]
            lines.append(f"| {partitioner} | {rule} | " + " | ".join(cells) + " |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lora_rules_skew.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
