"""The server's round loop (``Federation``) over an in-process Flower ``Grid``
(``inprocess_grid.Transport``: Flower's serialization, no Ray), and the in-process
engine (``federate``) against it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from inprocess_grid import Transport

from fedelta import protocol
from fedelta.build import build_strategy
from fedelta.client.app import with_reply_transform
from fedelta.compression import UplinkCompression
from fedelta.compression.wire import VALUES
from fedelta.config import RunConfig
from fedelta.lora import A_SUFFIX, B_SUFFIX, rank_layout
from fedelta.server.checkpoint import load_checkpoint
from fedelta.server.evaluation import CentralEvaluator
from fedelta.server.federation import Federation
from fedelta.server.metrics import MetricsLog
from fedelta.simulations import federate
from fedelta.tensors import layout_of

pytestmark = pytest.mark.training


def _run(config: RunConfig, transport: Transport, *, resume: bool = False) -> list[dict[str, Any]]:
    """Run ``config`` over ``transport``; returns its metrics rows."""
    run_dir = Path(config.output_dir)
    Federation(transport, config, run_dir, resume=resume, progress=False).run()
    return MetricsLog(run_dir).rows()


def _ledger_totals(rows: list[dict[str, Any]], key: str) -> dict[str, int]:
    totals: dict[str, int] = {}
    for row in rows[1:]:
        for site, count in row[key].items():
            totals[site] = totals.get(site, 0) + count
    return totals


def _assert_ledger_is_exact(rows: list[dict[str, Any]], transport: Transport) -> None:
    """Every site's bytes in the ledger equal what the transport serialized for it."""
    assert _ledger_totals(rows, "bytes-down-by-site") == transport.bytes_by_site("down")
    assert _ledger_totals(rows, "bytes-up-by-site") == transport.bytes_by_site("up")
    for row in rows[1:]:
        assert row["bytes-down"] == sum(row["bytes-down-by-site"].values())
        assert row["bytes-up"] == sum(row["bytes-up-by-site"].values())


def _initial_state(config: RunConfig) -> dict[str, torch.Tensor]:
    return build_strategy(config).initial_state(CentralEvaluator(config).initial_state)


@pytest.fixture
def loop_config(
    tiny_config: RunConfig, tiny_bert: str, monkeypatch: pytest.MonkeyPatch
) -> RunConfig:
    """One local step per round on a tiny model, no federated evaluation. The process
    plays the ServerApp's task, as Flower's runtime sets it up."""
    for key, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, key, value)
    return tiny_config.replace(
        **{"local-steps": 1, "fraction-evaluate": 0.0, "model.name": tiny_bert}
    )


def test_a_site_slower_than_the_round_timeout_is_left_out_and_named(loop_config):
    config = loop_config.replace(
        **{"round-timeout": 1.0, "simulation.num-supernodes": 3, "fraction-evaluate": 1.0}
    )
    # The late reply never arrives: a loop that waited for it would hang (pytest-timeout).
    transport = Transport(3, slow=["client-2"], delay=float("inf"))
    rows = _run(config, transport)
    row = rows[1]
    assert row["sites-sampled"] == ["client-0", "client-1", "client-2"]
    assert row["clients-failed"] == {"client-2": "timed out"}
    assert row["clients-replied"] == 2 and not row.get("round-skipped")
    assert "client-2" not in row["bytes-up-by-site"] or row["bytes-up-by-site"]["client-2"] < 1e3
    _assert_ledger_is_exact(rows, transport)


def test_skip_leaves_the_global_state_bit_identical_after_one_attempt(loop_config):
    config = loop_config.replace(
        **{"num-server-rounds": 2, "min-train-replies": 2, "short-round": "skip"}
    )
    transport = Transport(2, broken=["client-1"])
    rows = _run(config, transport)
    for row in rows[1:]:
        assert row["round-skipped"] and "round-attempts" not in row
        assert row["clients-failed"] == {"client-1": "client error: site crashed"}
        assert transport.trained(row["round"]) == ["client-0", "client-1"]  # asked once
    final = load_checkpoint(Path(config.output_dir))
    assert final.server_round == 2
    initial = _initial_state(config)
    assert final.global_state.keys() == initial.keys()
    for name, tensor in initial.items():
        assert torch.equal(final.global_state[name], tensor), name
    _assert_ledger_is_exact(rows, transport)


def test_a_resumed_run_samples_the_same_sites_as_a_straight_run(loop_config, tmp_path):
    config = loop_config.replace(
        **{
            "num-server-rounds": 3,
            "fraction-train": 0.5,
            "min-train-nodes": 1,
            "simulation.num-supernodes": 4,
        }
    )
    straight = Transport(4)
    rows = _run(config.replace(output_dir=str(tmp_path / "straight")), straight)
    sampled = [straight.trained(r) for r in (1, 2, 3)]
    assert all(len(s) == 2 for s in sampled) and len({tuple(s) for s in sampled}) > 1
    assert [r["sites-sampled"] for r in rows[1:]] == sampled

    split = config.replace(output_dir=str(tmp_path / "split"))
    first = Transport(4)  # node ids differ per run; site names do not
    _run(split.replace(**{"num-server-rounds": 1}), first)
    second = Transport(4)
    resumed = _run(split.replace(resume=True), second, resume=True)
    assert [first.trained(1), second.trained(2), second.trained(3)] == sampled
    assert [r["sites-sampled"] for r in resumed[1:]] == sampled
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "split")
    for name, tensor in a.global_state.items():
        assert torch.equal(b.global_state[name], tensor), name


def _lifted(delta: Mapping[str, torch.Tensor], rank: int, global_rank: int) -> dict:
    """A rank-``rank`` delta zero-padded to ``global_rank``; B is scaled by
    (alpha / rank) / (alpha / global_rank) so that B @ A keeps its effect."""
    out = {}
    for name, value in delta.items():
        pad = global_rank - rank
        if name.endswith(A_SUFFIX):
            out[name] = torch.cat([value, torch.zeros(pad, value.shape[1])])
        elif name.endswith(B_SUFFIX):
            out[name] = torch.cat([value * global_rank / rank, torch.zeros(value.shape[0], pad)], 1)
        else:
            out[name] = value
    return out


def test_naive_rule_with_per_site_ranks_averages_the_zero_padded_factors(loop_config):
    config = loop_config.replace(**{"lora.client-ranks": "4,8", "fraction-evaluate": 1.0})
    transport = Transport(2)
    rows = _run(config, transport)
    assert rows[1]["clients-replied"] == 2
    initial = _initial_state(config)
    replies = {
        transport.site_of[c.node]: c.message.content
        for c in transport.carried
        if c.direction == "up" and c.message_type == "train"
    }
    ranks = {"client-0": 4, "client-1": 8}
    total = sum(
        int(r.metric_records[protocol.METRICS][protocol.NUM_EXAMPLES]) for r in replies.values()
    )
    expected = {k: v.clone() for k, v in initial.items()}
    wire = UplinkCompression(config.compression, config.seed)
    for site, content in replies.items():
        # Decoded as the server decodes a rank-r upload (the wire packs all tensors).
        layout = rank_layout(layout_of(initial), ranks[site])
        delta = wire.decode(content.array_records[protocol.DELTA], layout, 1)
        a_shapes = {v.shape[0] for k, v in delta.items() if k.endswith(A_SUFFIX)}
        assert a_shapes == {ranks[site]}  # each site trains and sends its own rank
        weight = int(content.metric_records[protocol.METRICS][protocol.NUM_EXAMPLES]) / total
        for name, value in _lifted(delta, ranks[site], 8).items():
            expected[name] += weight * value
    final = load_checkpoint(Path(config.output_dir)).global_state
    for name, tensor in expected.items():
        torch.testing.assert_close(final[name], tensor, rtol=1e-5, atol=1e-7)
    _assert_ledger_is_exact(rows, transport)


def _misbehave(site: protocol.Site, server_round: int, reply: RecordDict) -> RecordDict:
    """client-1 sends a NaN, client-2 its update scaled 1000-fold; the others are honest."""
    if site.name in ("client-1", "client-2"):
        record = reply.array_records[protocol.DELTA]
        values = record[VALUES].numpy().copy()
        if site.name == "client-1":
            values[0] = np.nan
        else:
            values *= 1000
        record[VALUES] = Array(values)
    return reply


def test_both_engines_reject_the_same_replies_and_reach_the_same_global_state(
    loop_config, tmp_path
):
    """The same config through the in-process engine and the Flower round loop (Flower's
    serialization): one site's NaN and another's update beyond max-update-norm are
    rejected by both, and both end at the same global state."""
    config = loop_config.replace(
        **{"num-server-rounds": 2, "simulation.num-supernodes": 3, "max-update-norm": 1.0}
    )
    in_process = federate(config, reply_transform=_misbehave)
    flower = config.replace(output_dir=str(tmp_path / "flower"))
    rows = _run(flower, Transport(3, with_reply_transform(_misbehave)))
    for ours, theirs in zip(rows[1:], in_process.rows[1:], strict=True):
        for row in (ours, theirs):
            assert row["clients-replied"] == 1 and row["clients-rejected"] == 2
            assert "non-finite values" in row["clients-failed"]["client-1"]
            assert "exceeds max-update-norm" in row["clients-failed"]["client-2"]
        assert ours["train-loss"] == pytest.approx(theirs["train-loss"])
    final = load_checkpoint(Path(flower.output_dir)).global_state
    initial, last = in_process.states[0], in_process.states[-1]
    assert final.keys() == last.keys()
    assert any(not torch.equal(last[k], initial[k]) for k in last)  # client-0 moved it
    for name, tensor in last.items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=1e-6)


# -- one site's local round ---------------------------------------------------------------
def _site_file(folder: Path, rows: int) -> str:
    """A site's own labelled CSV with ``rows`` examples."""
    path = folder / "site.csv"
    lines = [f"review number {i} was {'good' if i % 2 else 'bad'},{i % 2}" for i in range(rows)]
    path.write_text("text,label\n" + "\n".join(lines) + "\n")
    return str(path)


def test_local_epochs_set_the_steps_when_local_steps_is_0(loop_config, tmp_path):
    from fedelta.client.trainer import ClientTrainer

    config = loop_config.replace(
        **{"local-steps": 0, "local-epochs": 2, "batch-size": 8, "data.labels": "0,1"}
    )
    site = protocol.Site(0, 0, "site-a", data_path=_site_file(tmp_path, 21))
    trainer = ClientTrainer(config, site)
    examples = len(trainer.data.train)
    assert 17 <= examples <= 21  # the rest is the site's validation split
    start = trainer.receive(trainer.initial_state, {}, {})
    result = trainer.fit(start, 1).result
    assert result.steps == 2 * -(-examples // 8)  # two epochs of ceil(n / 8) batches


def test_weight_decay_shrinks_the_update_by_lr_times_decay_times_the_weights(loop_config):
    from fedelta.client.trainer import ClientTrainer

    lr, decay = 0.01, 0.5
    site = protocol.Site(0, 2, "client-0")
    uploads = {}
    for wd in (0.0, decay):
        trainer = ClientTrainer(loop_config.replace(lr=lr, **{"weight-decay": wd}), site)
        start = trainer.receive(trainer.initial_state, {}, {})
        out = trainer.fit(start, 1)
        uploads[wd] = trainer.compression.decode(out.upload, trainer.uplink_layout, 1)
    # One AdamW step from the same weights and batch: the decayed run differs from the
    # plain one by exactly -lr * decay * w (decoupled decay), on every tensor sent.
    moved = 0
    for name, plain_delta in uploads[0.0].items():
        expected = plain_delta - lr * decay * start[name]
        torch.testing.assert_close(uploads[decay][name], expected, rtol=0, atol=1e-6)
        moved += int(start[name].abs().max() > 0)
    assert moved > 0  # LoRA A and the head start non-zero (B starts at zero)


def test_both_engines_sample_alike_and_the_in_process_run_folder_resumes(loop_config, tmp_path):
    """``fraction-train`` 0.5 of 4 sites: the in-process engine trains the sites the
    Flower round loop samples, writes the same run folder (rows, checkpoints, bytes
    per site), and a run killed after round 1 and resumed equals the straight one."""
    from fedelta.simulations import run_in_process

    config = loop_config.replace(
        **{
            "num-server-rounds": 3,
            "fraction-train": 0.5,
            "min-train-nodes": 1,
            "simulation.num-supernodes": 4,
        }
    )
    flower = _run(config.replace(output_dir=str(tmp_path / "flower")), Transport(4))
    straight = run_in_process(
        config.replace(output_dir=str(tmp_path / "straight")), progress=False, report=False
    )
    assert straight.summary["engine"] == "in-process" and straight.summary["rounds"] == 3
    assert straight.summary["peak-rss-mb"] > 100  # this process, model and data loaded
    sampled = [r["sites-sampled"] for r in flower[1:]]
    assert [r["sites-sampled"] for r in straight.rows[1:]] == sampled
    assert len({tuple(s) for s in sampled}) > 1
    for ours, theirs in zip(straight.rows[1:], flower[1:], strict=True):
        assert ours["train-loss"] == pytest.approx(theirs["train-loss"])
        assert sorted(ours["bytes-up-by-site"]) == ours["sites-sampled"]
        if ours["round"] > 1:  # Flower's round 1 also counts every node's site query
            assert sorted(theirs["bytes-up-by-site"]) == ours["sites-sampled"]
            for site, count in ours["bytes-up-by-site"].items():  # + message metadata
                assert 0 < theirs["bytes-up-by-site"][site] - count < 2_000
    a, b = load_checkpoint(tmp_path / "flower"), load_checkpoint(tmp_path / "straight")
    for name, tensor in a.global_state.items():
        torch.testing.assert_close(b.global_state[name], tensor, rtol=0, atol=1e-6)

    split = config.replace(output_dir=str(tmp_path / "split"))
    run_in_process(split.replace(**{"num-server-rounds": 1}), progress=False, report=False)
    resumed = run_in_process(split.replace(resume=True), progress=False, report=False)
    assert [r["round"] for r in resumed.rows] == [0, 1, 2, 3]
    assert [r["sites-sampled"] for r in resumed.rows[1:]] == sampled
    c = load_checkpoint(tmp_path / "split")
    for name, tensor in b.global_state.items():
        assert torch.equal(c.global_state[name], tensor), name
