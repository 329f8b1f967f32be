"""Head strategies (``strategy.head``): FedNCM's class-mean head, LP-FT's head-only
rounds, FedBABU's frozen head, their refusals, and ``joint`` as it always was."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import build_tiny_bert
from flwr.app import Context, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from inprocess_grid import Transport

from fedelta import deltas, protocol
from fedelta.build import build_strategy
from fedelta.client.app import train as client_train
from fedelta.client.app import with_train
from fedelta.compatibility import check_config
from fedelta.config import ConfigError, RunConfig
from fedelta.lora import is_factor
from fedelta.server.checkpoint import load_checkpoint
from fedelta.server.evaluation import CentralEvaluator
from fedelta.server.federation import Federation, ShortRoundError
from fedelta.server.head_init import HeadInitialisation, HeadInitialisationError
from fedelta.server.metrics import MetricsLog
from fedelta.simulations import federate
from fedelta.strategies.heads import (
    BODY,
    HEAD,
    HEADS,
    JOINT,
    ClassStatistics,
    HeadShapeError,
    build_head,
    class_feature_sums,
    ncm_head,
    select,
    with_ncm_head,
)
from fedelta.strategies.heads.ncm import COUNTS, SUMS
from fedelta.tensors import is_head


class Probe(torch.nn.Module):
    """A model whose head input is known: the features of each example are given by
    ``input_ids`` directly (rows of floats), pooled or not."""

    def __init__(self, features: int, classes: int, pool_after_head: bool = False) -> None:
        super().__init__()
        self.body = torch.nn.Linear(features, features)  # not the head: never hooked
        self.classifier = torch.nn.Linear(features, classes)
        self.pool_after_head = pool_after_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pool_after_head:  # a decoder's score: logits at every position
            return self.classifier(input_ids.unsqueeze(1).expand(-1, 3, -1))[:, -1]
        return self.classifier(input_ids)


def _batches(features: torch.Tensor, labels: torch.Tensor, size: int) -> list[dict]:
    return [
        {
            "input_ids": features[i : i + size],
            "attention_mask": torch.ones(len(features[i : i + size])),
            "labels": labels[i : i + size],
        }
        for i in range(0, len(features), size)
    ]


# -- FedNCM ---------------------------------------------------------------------------
def test_ncm_head_is_the_normalised_federated_class_means_of_known_features():
    torch.manual_seed(0)
    classes, dim = 4, 5
    sites = [(torch.randn(7, dim), torch.tensor([0, 1, 1, 0, 2, 2, 2])) for _ in range(2)]
    sites.append((torch.randn(3, dim) + 3.0, torch.tensor([1, 1, 2])))
    model = Probe(dim, classes)
    total = ClassStatistics.zeros(classes, dim)
    for features, labels in sites:
        total.add(class_feature_sums(model, _batches(features, labels, size=2)))
    features = torch.cat([f for f, _ in sites]).double()
    labels = torch.cat([y for _, y in sites])
    weight, bias = model.classifier.weight.detach(), model.classifier.bias.detach()
    new_weight, new_bias = ncm_head(total, weight, bias)
    for c in range(3):
        mean = features[labels == c].mean(dim=0)
        torch.testing.assert_close(new_weight[c].double(), mean / mean.norm(), atol=1e-6, rtol=0)
        assert new_bias[c] == 0
        assert total.counts[c] == int((labels == c).sum())
    # Class 3 is held by no site: it keeps its initial row and bias.
    assert torch.equal(new_weight[3], weight[3]) and new_bias[3] == bias[3]
    # The head's argmax is the cosine nearest-class-mean rule.
    means = torch.stack([features[labels == c].mean(dim=0) for c in range(3)])
    logits = features.float() @ new_weight[:3].T
    cosine = (
        torch.nn.functional.normalize(features, dim=1)
        @ torch.nn.functional.normalize(means, dim=1).T
    )
    assert torch.equal(logits.argmax(dim=1), cosine.argmax(dim=1))


def test_ncm_refuses_a_head_that_sees_more_than_one_feature_vector_per_example():
    model = Probe(3, 2, pool_after_head=True)
    with pytest.raises(HeadShapeError, match="one feature vector per example"):
        class_feature_sums(model, _batches(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), 4))


def test_the_server_leaves_out_unusable_statistics_and_needs_min_train_replies():
    model = Probe(3, 2)
    state = {n: p.detach().clone() for n, p in model.named_parameters() if is_head(n)}
    config = RunConfig()
    init = HeadInitialisation(build_strategy(config), config, state, model)
    good = {SUMS: torch.ones(2, 3), COUNTS: torch.tensor([2.0, 0.0])}
    bad = {
        "shape": {SUMS: torch.ones(3, 3), COUNTS: torch.tensor([1.0, 1.0])},
        "count": {SUMS: torch.ones(2, 3), COUNTS: torch.tensor([-1.0, 1.5])},
        "nan": {SUMS: torch.full((2, 3), float("nan")), COUNTS: torch.tensor([1.0, 1.0])},
    }
    for site, tensors in bad.items():
        init.receive(site, _reply(tensors))
    assert set(init.failed) == set(bad) and not init.replied
    with pytest.raises(HeadInitialisationError, match="min-train-replies"):
        init.close()
    init.receive("good", _reply(good))
    new_state, row = init.close()
    assert row["head-init-sites"] == ["good"] and row["head-init-examples"] == 2
    torch.testing.assert_close(new_state["classifier.weight"][0], torch.full((3,), 3**-0.5))
    assert torch.equal(new_state["classifier.weight"][1], state["classifier.weight"][1])
    assert new_state.keys() == state.keys()
    unchanged = with_ncm_head(state, ClassStatistics.zeros(2, 3), "classifier")
    assert all(torch.equal(unchanged[k], v) for k, v in state.items())


def _reply(tensors):
    return RecordDict({protocol.HEAD_STATISTICS: deltas.encode(tensors)})


# -- phases ---------------------------------------------------------------------------
def _phases(head: str, rounds: int = 5, head_rounds: int = 2) -> list[str]:
    config = RunConfig().replace(
        **{"num-server-rounds": rounds, "strategy.head": head, "strategy.head-rounds": head_rounds}
    )
    return [build_head(config).phase(r) for r in range(1, rounds + 1)]


def test_each_head_strategy_trains_what_its_phases_say():
    assert _phases("joint") == [JOINT] * 5 == _phases("ncm")
    assert _phases("lp-ft") == [HEAD, HEAD, JOINT, JOINT, JOINT]
    assert _phases("fedbabu") == [BODY, BODY, BODY, HEAD, HEAD]
    assert _phases("fedbabu", head_rounds=0) == [BODY] * 5
    assert _phases("lp-ft", head_rounds=0) == [JOINT] * 5
    assert _phases("linear-probe") == [HEAD] * 5 == _phases("linear-probe", head_rounds=9)
    names = {"base_model.model.classifier.modules_to_save.default.weight", "x.lora_A.weight"}
    head, lora = sorted(names)[0], sorted(names)[1]
    assert select(HEAD, names) == {head} and select(BODY, names) == {lora}
    assert select(JOINT, names) == names


def test_joint_is_the_default_and_changes_nothing():
    config = RunConfig()
    assert config.strategy.head == "joint" and list(HEADS)[0] == "joint"
    head = build_head(config)
    assert not head.initialises and not head.phased
    assert {head.phase(r) for r in range(1, 50)} == {JOINT}


# -- refusals -------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["ncm", "lp-ft", "fedbabu", "linear-probe"])
def test_a_task_without_a_head_refuses_every_head_strategy_naming_the_key(head):
    config = RunConfig().replace(
        **{
            "model.task": "causal-lm",
            "data.partitioner": "iid",
            "num-server-rounds": 3,
            "strategy.head": head,
        }
    )
    with pytest.raises(ConfigError, match=r"'strategy.head' = \"" + head + '".*no head'):
        check_config(config)
    check_config(config.replace(**{"strategy.head": "joint"}))


@pytest.mark.parametrize(
    ("overrides", "refusal"),
    [
        ({"strategy.head": "lp-ft", "strategy.lora": "fedex"}, "'strategy.head'.*folds"),
        ({"strategy.head": "fedbabu", "strategy.lora": "flora"}, "'strategy.head'.*folds"),
        ({"strategy.head": "lp-ft", "strategy.head-rounds": 3}, "'strategy.head-rounds'"),
        ({"strategy.head": "linear-probe", "strategy.lora": "fedex"}, "'strategy.head'.*folds"),
        (
            {"strategy.head": "ncm", "privacy.secure-aggregation": True},
            "'strategy.head'.*privacy.secure-aggregation",
        ),
        (
            {"strategy.head": "ncm", "privacy.dp-sgd": True, "privacy.noise-multiplier": 1.0},
            "'strategy.head'.*privacy.dp-sgd",
        ),
        ({"strategy.head": "nope"}, "'strategy.head' must be one of joint, ncm, lp-ft"),
    ],
)
def test_head_strategies_refuse_what_they_cannot_do(overrides, refusal):
    config = RunConfig().replace(
        **{"num-server-rounds": 3, "min-train-nodes": 3, "min-available-nodes": 3, **overrides}
    )
    with pytest.raises(ConfigError, match=refusal):
        check_config(config)


def test_head_strategies_combine_with_secure_aggregation_when_they_send_in_the_clear_nothing():
    for head in ("lp-ft", "fedbabu", "linear-probe"):
        check_config(
            RunConfig().replace(
                **{
                    "num-server-rounds": 3,
                    "min-train-nodes": 3,
                    "min-available-nodes": 3,
                    "strategy.head": head,
                    "privacy.secure-aggregation": True,
                }
            )
        )


def test_linear_probe_needs_no_lora_round_and_combines_with_dp_sgd():
    one_round = {"num-server-rounds": 1, "strategy.head": "linear-probe"}
    check_config(RunConfig().replace(**one_round))
    check_config(
        RunConfig().replace(**one_round, **{"privacy.dp-sgd": True, "privacy.target-epsilon": 8.0})
    )
    with pytest.raises(ConfigError, match="'strategy.head-rounds'"):
        check_config(RunConfig().replace(**{**one_round, "strategy.head": "lp-ft"}))


# -- training (tiny model, tiny data) -------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A random 2-layer BERT with MiniLM's tokenizer and a 96-row labelled CSV: the
    head strategies' tests are about which tensors move, not about accuracy."""
    folder = tmp_path_factory.mktemp("head-strategies")
    build_tiny_bert(folder / "bert")
    words = ["great", "awful", "fine", "dull", "moving", "boring"]
    rows = [f"a {words[i % 6]} film number {i},{i % 2}" for i in range(96)]
    (folder / "data.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    return {"model": str(folder / "bert"), "data": str(folder / "data.csv")}


@pytest.fixture
def head_config(tiny_run, tmp_path, monkeypatch) -> RunConfig:
    for key, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, key, value)
    return RunConfig.from_flat(
        {
            "num-server-rounds": 2,
            "local-steps": 2,
            "batch-size": 8,
            "lr": 0.01,
            "fraction-evaluate": 0.0,
            "output-dir": str(tmp_path / "run"),
            "model.name": tiny_run["model"],
            "model.max-length": 16,
            "data.name": tiny_run["data"],
            "data.partitioner": "iid",
            "data.test-size": 16,
            "data.validation-fraction": 0.05,
            "simulation.num-supernodes": 2,
        }
    )


def _moved(before: dict, after: dict) -> dict[str, set[str]]:
    """Which head and LoRA tensors differ between two global states."""
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    return {
        "head": {k for k in changed if is_head(k)},
        "lora": {k for k in changed if is_factor(k)},
    }


@pytest.mark.training
@pytest.mark.parametrize(
    ("head", "round_1", "round_2"),
    [
        ("lp-ft", {"head"}, {"head", "lora"}),
        ("fedbabu", {"lora"}, {"head"}),
        ("linear-probe", {"head"}, {"head"}),
    ],
)
def test_head_only_and_body_only_rounds_leave_the_rest_bit_identical(
    head_config, head, round_1, round_2
):
    config = head_config.replace(**{"strategy.head": head, "strategy.head-rounds": 1})
    run = federate(config)
    for row in run.rows[1:]:
        assert row["clients-replied"] == 2 and not row.get("round-skipped")
    moved = [_moved(run.states[r - 1], run.states[r]) for r in (1, 2)]
    for expected, m in zip((round_1, round_2), moved, strict=True):
        assert {part for part, names in m.items() if names} == expected
    heads = {k for k in run.states[0] if is_head(k)}
    for r, expected in ((1, round_1), (2, round_2)):
        if "head" in expected:  # every head tensor trains, not only some
            assert moved[r - 1]["head"] == heads
    # What a head-only round uploads: the head alone.
    assert run.rows[2 if head == "fedbabu" else 1]["dense-fp32-bytes-up"] == 2 * 4 * sum(
        run.states[0][k].numel() for k in heads
    )


@pytest.mark.training
def test_ncm_sets_the_head_before_round_1_alike_in_both_engines(head_config, tmp_path):
    config = head_config.replace(**{"strategy.head": "ncm", "num-server-rounds": 1})
    initial = build_strategy(config).initial_state(CentralEvaluator(config).initial_state)
    run = federate(config)
    start = run.states[0]
    weight_name = next(k for k, v in start.items() if is_head(k) and v.dim() == 2)
    # Only the head's weight moves (BERT's fresh head bias is 0 already, and stays 0).
    assert _moved(initial, start) == {"head": {weight_name}, "lora": set()}
    weight = start[weight_name]
    bias = next(v for k, v in start.items() if is_head(k) and v.dim() == 1)
    torch.testing.assert_close(weight.norm(dim=1), torch.ones(len(weight)))
    assert not bias.any()
    assert run.rows[0]["head-init-sites"] == ["client-0", "client-1"]
    assert 60 < run.rows[0]["head-init-examples"] <= 80  # the sites' training examples

    flower = config.replace(output_dir=str(tmp_path / "flower"))
    Federation(Transport(2), flower, Path(flower.output_dir), progress=False).run()
    rows = MetricsLog(Path(flower.output_dir)).rows()
    assert rows[0]["head-init-sites"] == run.rows[0]["head-init-sites"]
    assert rows[0]["bytes-up"] > 0 and rows[0]["test-accuracy"] == run.rows[0]["test-accuracy"]
    final = load_checkpoint(Path(flower.output_dir)).global_state
    for name, tensor in run.states[-1].items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=1e-6)


def _crash_in_round_2(msg: Message, context: Context) -> Message:
    if msg.metadata.group_id == "2":
        raise RuntimeError("site crashed")
    return client_train(msg, context)


@pytest.mark.training
@pytest.mark.parametrize("head", ["ncm", "fedbabu"])  # lp-ft's phases work as fedbabu's
def test_a_run_resumed_after_round_1_keeps_the_ncm_head_and_the_phases(head_config, tmp_path, head):
    """Straight through two rounds, or stopped after round 1 (every site fails round 2)
    and resumed: the same global state, bit for bit."""
    config = head_config.replace(
        **{"strategy.head": head, "strategy.head-rounds": 1, "short-round": "stop"}
    )
    straight = config.replace(output_dir=str(tmp_path / "straight"))
    Federation(Transport(2), straight, Path(straight.output_dir), progress=False).run()
    split = config.replace(output_dir=str(tmp_path / "split"))
    crashing = Transport(2, with_train(_crash_in_round_2))
    with pytest.raises(ShortRoundError):
        Federation(crashing, split, Path(split.output_dir), progress=False).run()
    assert load_checkpoint(Path(split.output_dir)).server_round == 1
    resumed = split.replace(resume=True)
    Federation(Transport(2), resumed, Path(split.output_dir), resume=True, progress=False).run()
    a, b = load_checkpoint(Path(straight.output_dir)), load_checkpoint(Path(split.output_dir))
    assert a.server_round == b.server_round == 2
    for name, tensor in a.global_state.items():
        assert torch.equal(b.global_state[name], tensor), name
