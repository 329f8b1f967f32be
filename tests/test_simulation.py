"""End to end on Flower's Simulation Engine with the real MiniLM and Rotten Tomatoes."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from flwr.app import Array
from peft import PeftModel

from fedelta import protocol
from fedelta.cli import main as cli
from fedelta.client import app as client_app
from fedelta.models import load_base_model
from fedelta.server.checkpoint import load_checkpoint
from fedelta.server.evaluation import CentralEvaluator
from fedelta.server.export import load_exported
from fedelta.server.federation import ShortRoundError
from fedelta.simulations import simulate
from fedelta.tasks.pooling import apply_pooling

pytestmark = pytest.mark.slow


def test_two_clients_one_round_end_to_end(tiny_config, tmp_path, capsys):
    result = simulate(tiny_config, progress=False)

    rows = result.rows
    assert [r["round"] for r in rows] == [0, 1]
    last = rows[-1]
    assert last["clients-sampled"] == last["clients-replied"] == 2
    assert last["clients-failed"] == {}
    assert sorted(last["sites-sampled"]) == ["client-0", "client-1"]
    assert last["train-loss"] > 0
    assert last["federated-accuracy"] is not None
    # LoRA r=8 on q/k/v/dense plus the head is ~339k fp32 values: ~1.36 MB per client reply.
    assert 2 * 1.3e6 < last["bytes-up"] < 2 * 1.5e6
    assert last["bytes-down"] > 0
    assert result.summary["total-bytes-up"] == last["bytes-up"]
    assert result.summary["peak-rss-mb"] > 0

    # The exported adapter loads with plain peft and equals the global state.
    base = load_base_model("all-MiniLM-L6-v2", 2)
    peft_model = PeftModel.from_pretrained(base, str(result.adapter_dir))
    exported = dict(peft_model.named_parameters())
    final = load_checkpoint(result.run_dir).global_state
    for name, tensor in final.items():
        assert torch.equal(exported[name], tensor), name
    # The reported test metrics are those of the exported model, evaluated here anew,
    # and the round moved it away from the initial model.
    evaluator = CentralEvaluator(tiny_config)
    again = evaluator.task.evaluate(load_exported(result.adapter_dir), evaluator.loader)
    assert again.accuracy == last["test-accuracy"]
    assert again.loss == pytest.approx(last["test-loss"], rel=1e-6)
    assert last["test-loss"] != rows[0]["test-loss"]

    # `fedelta export --merged` rewrites the adapter from the checkpoint (as for a run that
    # did not finish) and writes a plain model with the same predictions.
    shutil.rmtree(result.adapter_dir)
    assert cli(["export", str(result.run_dir), "--merged"]) == 0
    assert (result.adapter_dir / "adapter_config.json").is_file()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    # MiniLM pools by the mean, which its merged folder records: a plain load plus
    # apply_pooling gives the adapter's predictions.
    info = json.loads((result.run_dir / "merged" / "fedelta.json").read_text())
    assert info["pooling"] == "mean" and info["finetuning"] == "full"
    merged = apply_pooling(
        AutoModelForSequenceClassification.from_pretrained(str(result.run_dir / "merged")),
        info["pooling"],
        "merged",
    )
    tokenizer = AutoTokenizer.from_pretrained(str(result.run_dir / "merged"))
    batch = tokenizer(
        ["a moving, funny film", "dull and far too long"], return_tensors="pt", padding=True
    )
    adapted = load_exported(result.adapter_dir).eval()
    with torch.no_grad():
        assert torch.allclose(merged.eval()(**batch).logits, adapted(**batch).logits, atol=1e-4)
    assert merged.config.id2label == {0: "fresh", 1: "rotten"}

    # Resuming with a different config is refused, naming what changed.
    assert cli(["simulate", "--resume", str(result.run_dir), "--set", "lora.r=4"]) == 2
    assert "lora.r changed" in capsys.readouterr().err


# A ClientApp that delegates to fedelta's but corrupts one site's delta: real Flower,
# real training, one bad update. Pickled by value so Ray workers need not import tests/.
def _train_then_corrupt_site_1(msg, context):
    reply = client_app.train(msg, context)
    if context.node_config["partition-id"] == 1:
        record = reply.content.array_records[protocol.DELTA]
        name = sorted(record.keys())[0]
        record[name] = Array(np.full(record[name].shape, np.nan, dtype=np.float32))
    return reply


faulty_app = client_app.with_train(_train_then_corrupt_site_1)


def test_a_bad_update_is_rejected_and_the_round_goes_on(tiny_config, tmp_path):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    config = tiny_config.replace(**{"num-server-rounds": 2})
    result = simulate(config, client_app=faulty_app, progress=False)
    for row in result.rows[1:]:
        assert row["clients-sampled"] == 2 and row["clients-replied"] == 1
        assert list(row["clients-failed"]) == ["client-1"]
        assert "rejected update" in row["clients-failed"]["client-1"]
        assert "non-finite values" in row["clients-failed"]["client-1"]
    assert result.summary["total-failures"] == 2
    final = load_checkpoint(result.run_dir).global_state
    assert all(torch.isfinite(t).all() for t in final.values())


# 30% of the sites crash every round (a different 30% each round).
def _train_unless_unlucky(msg, context):
    _, server_round = protocol.read_config(msg.content)
    if (int(context.node_config["partition-id"]) + server_round) % 10 < 3:
        raise RuntimeError("site crashed")
    return client_app.train(msg, context)


flaky_app = client_app.with_train(_train_unless_unlucky)


def test_a_run_with_30_percent_of_clients_failing_each_round_completes(tiny_config):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    config = tiny_config.replace(
        **{
            "num-server-rounds": 2,
            "fraction-evaluate": 0.0,
            "simulation.num-supernodes": 10,
            "simulation.client-cpus": 1.0,
            "min-train-nodes": 10,
            "min-available-nodes": 10,
            "min-train-replies": 5,
        }
    )
    result = simulate(config, client_app=flaky_app, progress=False)
    for row in result.rows[1:]:
        failing = {f"client-{p}" for p in range(10) if (p + row["round"]) % 10 < 3}
        assert set(row["clients-failed"]) == failing
        assert all("client error" in why for why in row["clients-failed"].values())
        assert row["clients-sampled"] == 10 and row["clients-replied"] == 7
    assert result.summary["total-failures"] == 6 and result.summary["rounds-skipped"] == 0


def test_a_short_round_is_retried_then_skipped_never_averaged(tiny_config, tmp_path, capsys):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    config = tiny_config.replace(
        **{"num-server-rounds": 2, "min-train-replies": 2, "fraction-evaluate": 0.0}
    )
    result = simulate(config, client_app=faulty_app, progress=False)  # client-1 always fails
    for row in result.rows[1:]:
        assert row["round-skipped"] and row["round-attempts"] == 2
        assert row["clients-replied"] == 1 and row["clients-rejected"] == 1
    assert result.rows[-1]["test-accuracy"] == result.rows[0]["test-accuracy"]
    assert result.summary["rounds-skipped"] == 2

    stop = config.replace(**{"short-round": "stop", "output-dir": str(tmp_path / "stop")})
    with pytest.raises(ShortRoundError, match="round 1: 1 usable update"):
        simulate(stop, client_app=faulty_app, progress=False)
    initial = load_checkpoint(tmp_path / "stop")
    assert initial.server_round == 0  # resumable from round 0
    # Never averaged: after two skipped rounds the global state is the initial one, bit
    # for bit (the stopped run's round-0 checkpoint, built from the same seed).
    final = load_checkpoint(result.run_dir).global_state
    assert final.keys() == initial.global_state.keys()
    for name, tensor in initial.global_state.items():
        assert torch.equal(final[name], tensor), name


def test_exact_aggregation_with_heterogeneous_ranks_exports_the_global_model(tiny_config):
    config = tiny_config.replace(
        **{
            "num-server-rounds": 2,
            "fraction-evaluate": 0.0,
            "lora.client-ranks": "4,8",
            "strategy.lora": "fedex",
            "strategy.fold-rank": 4,
        }
    )
    result = simulate(config, progress=False)
    first, last = result.rows[1], result.rows[2]
    assert last["clients-replied"] == 2 and last["clients-failed"] == {}
    # Round 1 starts from B = 0 (nothing to project); round 2 from a trained adapter.
    assert first["rank-projection-error"] == 0.0 and 0 < last["rank-projection-error"] < 1
    assert 0 < last["fold-error"] < 1
    # The export (adapter + base corrections) is exactly the server's global model.
    exported = load_exported(result.adapter_dir)
    assert (result.adapter_dir / "base_corrections.safetensors").is_file()
    evaluator = CentralEvaluator(config)
    accuracy = evaluator.task.evaluate(exported, evaluator.loader).accuracy
    assert accuracy == last["test-accuracy"]


def test_compressed_uploads_are_decoded_and_counted_per_site(tiny_config, capsys):
    config = tiny_config.replace(
        **{
            "num-server-rounds": 2,
            "fraction-evaluate": 0.0,
            "compression.sparsity": "top-k",
            "compression.quantization": "int8",
        }
    )
    result = simulate(config, progress=False)
    for row in result.rows[1:]:
        assert row["clients-replied"] == 2 and row["clients-failed"] == {}
        assert set(row["bytes-up-by-site"]) == {"client-0", "client-1"}
        assert sum(row["bytes-up-by-site"].values()) == row["bytes-up"]
        assert sum(row["bytes-down-by-site"].values()) == row["bytes-down"]
        # 5% of ~339k values as int8 + uint16 indices: ~51 kB of ~1.36 MB dense.
        assert row["bytes-up"] < 2 * 70e3
    summary = result.summary
    assert summary["uplink-reduction"] > 19
    assert summary["bytes-up-by-site"]["client-0"] == sum(
        r["bytes-up-by-site"]["client-0"] for r in result.rows[1:]
    )
    final = load_checkpoint(result.run_dir).global_state
    assert all(torch.isfinite(t).all() for t in final.values())
