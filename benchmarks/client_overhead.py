"""Client training overhead: fedelta's ClientApp against a bare peft + torch loop.

Both train the same model (MiniLM-L6 with LoRA r=8 on query/key/value/dense plus
the new head, built once, outside the timings) on the same site's examples
(client 0 of the default 8 Dirichlet partitions), batch 16, max length 64, for the
same number of AdamW steps. fedelta's side is one call of the ClientApp's train
handler with a real Flower Message, exactly what a SuperNode runs per round:
decode the global state, load it into the cached model, train, compute and encode
the delta, build the reply. The bare side is what one writes by hand:
``get_peft_model``, a shuffling DataLoader, forward / backward / step. The two
alternate, ``--repeats`` times each; the table reports medians. One entry per
number of local steps (``STEPS``).

    python benchmarks/client_overhead.py [--only 25] [--repeats 5]   # results/client_overhead.*
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import harness

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from flwr.app import Context, Message, MessageType, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from peft import LoraConfig, TaskType, get_peft_model  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from fedelta import deltas, protocol  # noqa: E402
from fedelta.client.app import train as client_train  # noqa: E402
from fedelta.client.trainer import ClientTrainer  # noqa: E402
from fedelta.config import RunConfig  # noqa: E402
from fedelta.data import load_client_data  # noqa: E402
from fedelta.models import resolve_model_path  # noqa: E402
from fedelta.protocol import Site  # noqa: E402
from fedelta.seeding import derive_seed  # noqa: E402

NUM_SITES = 8
STEPS = (5, 25)
"""Local steps of each entry (its name)."""


def fedelta_round(config: RunConfig, steps: int, server_round: int) -> float:
    """Seconds for one train message through fedelta's ClientApp handler."""
    config = config.replace(**{"local-steps": steps})
    site = Site(0, NUM_SITES, "client-0")
    trainer = ClientTrainer(config, site)  # the cached model: built once per process
    content = RecordDict(
        {
            protocol.GLOBAL: deltas.encode(dict(trainer.initial_state)),
            protocol.CONFIG: protocol.config_record(config, server_round),
        }
    )
    message = Message(content, dst_node_id=1, message_type=MessageType.TRAIN)
    context = Context(
        run_id=1,
        node_id=1,
        node_config={protocol.PARTITION_ID: 0, protocol.NUM_PARTITIONS: NUM_SITES},
        state=RecordDict(),
        run_config={},
    )
    started = time.perf_counter()
    reply = client_train(message, context)
    elapsed = time.perf_counter() - started
    assert protocol.DELTA in reply.content.array_records
    return elapsed


class BareLoop:
    """The same fine-tuning written directly against transformers, peft and torch."""

    def __init__(self, config: RunConfig) -> None:
        path = resolve_model_path(config.model.name)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        lora = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=config.lora.r,
            lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout,
            target_modules=config.lora.target_module_list(),
        )
        self.model = get_peft_model(base, lora)
        self.initial = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.examples = load_client_data(config.data, config.seed, NUM_SITES, 0).train
        self.config = config

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(
            [r["text"] for r in rows],
            truncation=True,
            max_length=self.config.model.max_length,
            padding=True,
            return_tensors="pt",
        )
        batch["labels"] = torch.tensor([r["label"] for r in rows])
        return dict(batch)

    def round(self, steps: int, seed: int) -> float:
        """Seconds for ``steps`` AdamW steps from the initial adapter, batches shuffled
        with ``seed``."""
        self.model.load_state_dict(self.initial)
        loader = DataLoader(
            self.examples,
            batch_size=self.config.batch_size,
            shuffle=True,
            collate_fn=self.collate,
            generator=torch.Generator().manual_seed(seed),
        )
        params = [p for p in self.model.parameters() if p.requires_grad]
        started = time.perf_counter()
        optimizer = torch.optim.AdamW(params, lr=self.config.lr)
        self.model.train()
        done = 0
        while done < steps:
            for batch in loader:
                loss = self.model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                done += 1
                if done == steps:
                    break
        return time.perf_counter() - started


@functools.cache
def warm_setup() -> tuple[RunConfig, BareLoop]:
    """The default config and the bare loop, both sides warmed up (model builds, data,
    allocator); once per process."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    config = RunConfig()
    bare = BareLoop(config)
    fedelta_round(config, 1, 1)
    bare.round(1, 0)
    return config, bare


def run(name: str, args: argparse.Namespace) -> dict:
    """Both sides ``args.repeats`` times, alternating, for ``name`` local steps."""
    config, bare = warm_setup()
    steps = int(name)
    times: dict[str, list[float]] = {"bare": [], "fedelta": []}
    for repeat in range(args.repeats):
        # Round r of client 0 shuffles with this seed in fedelta: the same batches.
        seed = derive_seed(config.seed, repeat + 1, 0)
        times["bare"].append(bare.round(steps, seed))
        times["fedelta"].append(fedelta_round(config, steps, repeat + 1))
        print(steps, repeat, {k: round(v[-1], 3) for k, v in times.items()}, flush=True)
    bare_s, fedelta_s = (statistics.median(times[k]) for k in ("bare", "fedelta"))
    return {
        "steps": steps,
        "bare-s": round(bare_s, 3),
        "fedelta-s": round(fedelta_s, 3),
        "bare-s-per-step": round(bare_s / steps, 4),
        "fedelta-s-per-step": round(fedelta_s / steps, 4),
        "overhead-pct": round(100 * (fedelta_s / bare_s - 1), 1),
        "times": times,
    }


def table(results: dict, args: argparse.Namespace) -> str:
    """Median seconds per round and per step of both sides, and fedelta's overhead."""
    repeats = "/".join(map(str, sorted({len(r["times"]["bare"]) for r in results.values()})))
    header = ["local steps", "bare peft + torch (s)", "fedelta ClientApp (s)", "s/step bare"]
    header += ["s/step fedelta", "overhead"]
    rows = [
        [
            r["steps"],
            f"{r['bare-s']:.2f}",
            f"{r['fedelta-s']:.2f}",
            f"{r['bare-s-per-step']:.3f}",
            f"{r['fedelta-s-per-step']:.3f}",
            f"{r['overhead-pct']:+.1f}%",
        ]
        for r in results.values()
    ]
    return "\n".join(
        [
            f"Client round, median of {repeats} (2 CPU threads, MiniLM LoRA r=8, batch 16, "
            "max length 64):",
            "",
            harness.markdown_table(header, rows, align="rrrrrr"),
        ]
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="rounds of each side per entry (default: %(default)s)",
    )


if __name__ == "__main__":
    harness.main(
        "client_overhead",
        __doc__,
        map(str, STEPS),
        run,
        table,
        add_arguments=add_arguments,
        records_key="steps",
    )
