"""Merge operators, LiNeS, merging as aggregation and across rounds, delta transfer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict
from peft.utils import merge_utils
from safetensors.torch import load_file, save_file

from fedelta.build import build_aggregator
from fedelta.compatibility import check_config
from fedelta.config import ExportConfig, RunConfig
from fedelta.merging import MERGE_METHODS, merge_tensors
from fedelta.merging.layers import SCHEMES, UnknownLayerError, lines_scales, scheme_for
from fedelta.merging.rounds import merge_rounds


def _inputs(n: int = 3, shape: tuple[int, ...] = (6, 5), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


# -- operators ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_operators_equal_peft_merge_utils(method):
    tensors, weights = _inputs(), [0.5, 0.3, 0.2]
    function = getattr(merge_utils, method.replace("-", "_"))
    torch.manual_seed(7)
    if method == "task-arithmetic":
        expected = function(tensors, torch.tensor(weights))
    else:
        expected = function(tensors, torch.tensor(weights), 0.4)
    ours = merge_tensors(method, tensors, weights, density=0.4, seed=7)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_ties_by_hand():
    a = torch.tensor([3.0, -1.0, 0.5, -4.0])
    b = torch.tensor([-2.0, 2.0, 1.0, -1.0])
    c = torch.tensor([1.0, -3.0, -0.2, 2.0])
    # density 0.5 keeps 2 of 4 per input: a {3, -4}, b {-2, 2}, c {-3, 2}
    # signs by total: [3-2+0, 0+2-3, 0, -4+0+2] -> [+, -, + (0 counts +), -]
    # agreeing entries: [3], [-3], none, [-4] -> disjoint means 3, -3, 0, -4
    merged = merge_tensors("ties", [a, b, c], [1.0, 1.0, 1.0], density=0.5)
    torch.testing.assert_close(merged, torch.tensor([3.0, -3.0, 0.0, -4.0]))


def test_dare_keeps_the_expected_value_and_the_density():
    x = torch.linspace(-1, 1, 200)
    kept = [merge_tensors("dare-linear", [x], [1.0], density=0.3, seed=s) for s in range(3000)]
    share = torch.stack([(k != 0).float().mean() for k in kept]).mean()
    assert share == pytest.approx(0.3, abs=0.005)
    mean = torch.stack(kept).mean(0)
    # Each estimate's std is |x| sqrt((1 - 0.3) / 0.3 / 3000) <= 0.028: allow 4.5 sigma.
    torch.testing.assert_close(mean, x, atol=0.13, rtol=0)
    assert float((mean * x).sum() / (x * x).sum()) == pytest.approx(1.0, abs=0.01)
    again = merge_tensors("dare-linear", [x], [1.0], density=0.3, seed=5)
    assert torch.equal(again, kept[5])  # seeded, not the global RNG


def test_operators_refuse_mismatched_inputs():
    with pytest.raises(ValueError, match="input 1 has shape"):
        merge_tensors("ties", [torch.zeros(3), torch.zeros(4)], [1.0, 1.0], 0.5)
    with pytest.raises(ValueError, match="2 weights for 1 tensors"):
        merge_tensors("task-arithmetic", [torch.zeros(3)], [1.0, 1.0])


# -- LiNeS ---------------------------------------------------------------------------------
def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=50))


def _bert():
    from fedelta.models import load_base_model

    return load_base_model("all-MiniLM-L6-v2", 2)


def _llama(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.parametrize(
    ("build", "block_of"),
    [  # MiniLM and the tiny Llama are loaded from disk; GPT-2 is built in memory
        pytest.param(
            _bert,
            lambda n: int(n.split("encoder.layer.")[1].split(".")[0]),
            marks=pytest.mark.training,
        ),
        pytest.param(
            _llama,
            lambda n: int(n.split("model.layers.")[1].split(".")[0]),
            marks=pytest.mark.training,
        ),
        (_gpt2, lambda n: int(n.split("transformer.h.")[1].split(".")[0])),
    ],
    ids=["bert", "llama", "gpt2"],
)
def test_lines_scales_every_parameter_by_its_depth(build, block_of, tiny_llama):
    model = build(tiny_llama) if build is _llama else build()
    config = model.config
    scheme, depth = scheme_for(config.model_type), config.num_hidden_layers
    names = [n for n, _ in model.named_parameters()]
    scales = lines_scales(names, scheme, depth, alpha=0.2, beta=0.6)
    assert set(scales) == set(names)
    for name in names:
        if scheme.block.search(name):
            expected = 0.2 + 0.6 * block_of(name) / (depth - 1)
        elif any(p in name.split(".") for p in scheme.before):
            expected = 0.2
        else:
            expected = 0.8
        assert scales[name] == pytest.approx(expected), name
    assert min(scales.values()) == pytest.approx(0.2) and max(scales.values()) == pytest.approx(0.8)


def test_lines_refuses_names_it_cannot_place():
    with pytest.raises(UnknownLayerError, match="cannot place 'bert.mystery.weight'"):
        lines_scales(["bert.mystery.weight"], SCHEMES["bert"], 6, 0.5, 0.5)
    with pytest.raises(UnknownLayerError, match="model type 't5'"):
        scheme_for("t5")


# -- across rounds ---------------------------------------------------------------------
def _round_states():
    a, b, head = (
        "m.encoder.layer.0.q.lora_A.default.weight",
        "m.encoder.layer.1.q.lora_B.default.weight",
        "m.classifier.weight",
    )
    g = torch.Generator().manual_seed(1)
    states = [{a: torch.randn(2, 3, generator=g), b: torch.zeros(3, 2), head: torch.zeros(2, 3)}]
    for _ in range(3):
        states.append({k: v + torch.randn(v.shape, generator=g) for k, v in states[-1].items()})
    return states, (a, b, head)


def test_round_merges():
    states, (a, b, head) = _round_states()
    last = merge_rounds(states, ExportConfig(merge="task-arithmetic"), seed=0)
    for k in last:
        torch.testing.assert_close(last[k], states[-1][k])
    ema = merge_rounds(states, ExportConfig(merge="ema", ema_decay=0.5), seed=0)
    by_hand = states[0][b]
    for s in states[1:]:
        by_hand = 0.5 * by_hand + 0.5 * s[b]
    torch.testing.assert_close(ema[b], by_hand)
    lines = merge_rounds(
        states,
        ExportConfig(merge="lines", lines_alpha=0.25, lines_beta=0.75),
        0,
        SCHEMES["bert"],
        2,
    )
    assert torch.equal(lines[a], states[-1][a])  # A untouched: the product scales with B
    torch.testing.assert_close(lines[b], states[-1][b])  # deepest block: 0.25 + 0.75
    torch.testing.assert_close(lines[head], states[-1][head])
    half = merge_rounds(
        states, ExportConfig(merge="lines", lines_alpha=0.5, lines_beta=0.0), 0, SCHEMES["bert"], 2
    )
    torch.testing.assert_close(half[b], 0.5 * states[-1][b])
    ties = merge_rounds(states, ExportConfig(merge="ties", density=0.5), seed=0)
    deltas = [[s1[head] - s0[head] for s0, s1 in zip(states[:-1], states[1:], strict=True)]]
    torch.testing.assert_close(
        ties[head], states[0][head] + merge_utils.ties(deltas[0], torch.ones(3), 0.5)
    )


# -- merging as aggregation --------------------------------------------------------------
def test_ties_aggregation_merges_client_updates_and_ignores_arrival_order():
    updates = [{"w": t} for t in _inputs(4)]
    config = RunConfig().replace(
        **{"strategy.aggregator": "dare-ties", "strategy.merge-density": 0.5}
    )
    results = []
    for order in ([0, 1, 2, 3], [3, 1, 0, 2]):
        aggregator = build_aggregator(config)
        aggregator.begin(server_round=2)
        for i in order:
            aggregator.add(updates[i], 10.0)
        results.append(aggregator.result()["w"])
    assert torch.equal(results[0], results[1])
    ties = build_aggregator(RunConfig().replace(**{"strategy.aggregator": "ties"}))
    ties.begin(1)
    for u in updates:
        ties.add(u, 5.0)
    expected = merge_utils.ties([u["w"] for u in updates], torch.ones(4), 0.2)
    torch.testing.assert_close(ties.result()["w"], expected)


def test_merge_aggregation_is_refused_where_it_cannot_apply():
    from fedelta.config import ConfigError

    with pytest.raises(ConfigError, match="strategy.aggregator' must be one of"):
        check_config(RunConfig().replace(**{"strategy.aggregator": "task-arithmetic"}))
    with pytest.raises(ConfigError, match="strategy.merge-density' must be in"):
        RunConfig().replace(**{"strategy.aggregator": "ties", "strategy.merge-density": 0.0})


# -- saved inputs --------------------------------------------------------------------------
def test_merge_command_on_delta_files_equals_peft(tmp_path):
    from fedelta.cli import main

    inputs = [{"a": t, "b": t[:2] * 2} for t in _inputs(3, (4, 4))]
    paths = []
    for i, tensors in enumerate(inputs):
        paths.append(tmp_path / f"d{i}.safetensors")
        save_file(tensors, str(paths[-1]))
    out = tmp_path / "merged.safetensors"
    args = [*map(str, paths), "--method", "ties", "--density", "0.5", "--out", str(out)]
    assert main(["merge", *args, "--weights", "1", "0.5", "2"]) == 0
    merged = load_file(str(out))
    for key in ("a", "b"):
        expected = merge_utils.ties([t[key] for t in inputs], torch.tensor([1, 0.5, 2.0]), 0.5)
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=0)


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory):
    """A MiniLM LoRA adapter (and head) after a few real training steps, exported."""
    from fedelta.client.trainer import ClientTrainer
    from fedelta.protocol import Site
    from fedelta.server.export import export_adapter

    folder = tmp_path_factory.mktemp("adapter")
    config = RunConfig.from_flat(
        {
            "local-steps": 4,
            "batch-size": 8,
            "lr": 5e-3,
            "model.max-length": 32,
            "data.test-size": 64,
            "simulation.num-supernodes": 2,
            "output-dir": str(folder / "run"),
        }
    )
    trainer = ClientTrainer(config, Site(0, 2, "a"))
    start = trainer.receive(trainer.initial_state, {}, {})
    trainer.fit(start, server_round=1)
    from fedelta.models import adapter_state

    state = adapter_state(trainer.model)
    labels = ["fresh", "rotten"]
    return export_adapter(trainer.model, state, labels, "all-MiniLM-L6-v2", folder / "adapter")


@pytest.mark.training
def test_transfer_onto_the_same_base_reproduces_the_fine_tuned_model(trained_adapter, tmp_path):
    from fedelta.merging.transfer import transfer
    from fedelta.models import load_tokenizer
    from fedelta.server.export import load_exported

    report = transfer(trained_adapter, "all-MiniLM-L6-v2", "all-MiniLM-L6-v2", tmp_path / "t")
    assert report["overall"]["shift_norm"] == 0.0 and report["overall"]["delta_norm"] > 0
    assert [s["where"] for s in report["per-block"]] == [f"block {i}" for i in range(1, 7)]
    peft_model = load_exported(trained_adapter).merge_and_unload()
    transferred = load_exported(tmp_path / "t")
    a, b = peft_model.state_dict(), transferred.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tokens = load_tokenizer("all-MiniLM-L6-v2")(["a moving film"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(peft_model(**tokens).logits, transferred(**tokens).logits)
    assert transferred.config.id2label == {0: "fresh", 1: "rotten"}


@pytest.mark.training
def test_transfer_diagnostic_measures_the_version_shift(trained_adapter, tmp_path):
    from fedelta.merging.task_vectors import from_adapter
    from fedelta.merging.transfer import transfer
    from fedelta.models import load_base_model

    v2 = load_base_model("all-MiniLM-L6-v2", 2)
    vector = from_adapter(trained_adapter)
    with torch.no_grad():  # v2 = v1 moved by half the delta in its direction
        params = v2.state_dict()
        for name, delta in vector.delta.items():
            params[name].add_(0.5 * delta)
    v2.save_pretrained(str(tmp_path / "v2"))
    report = transfer(trained_adapter, "all-MiniLM-L6-v2", str(tmp_path / "v2"), tmp_path / "t")
    assert report["overall"]["relative"] == pytest.approx(0.5, rel=1e-4)
    assert report["overall"]["cosine"] == pytest.approx(1.0, abs=1e-5)


def _another_adapter(adapter: Path, out: Path) -> Path:
    """A copy of ``adapter`` with other factors and head: flipped, scaled and jittered."""
    shutil.copytree(adapter, out)
    g = torch.Generator().manual_seed(3)
    weights = load_file(str(out / "adapter_model.safetensors"))
    other = {k: -0.7 * v + 0.05 * torch.randn(v.shape, generator=g) for k, v in weights.items()}
    save_file(other, str(out / "adapter_model.safetensors"))
    return out


@pytest.mark.training
def test_merging_adapters_by_product_and_by_factors(trained_adapter, tmp_path):
    from fedelta.merging.saved import merge_saved
    from fedelta.server.export import load_exported

    other = _another_adapter(trained_adapter, tmp_path / "other")
    one = merge_saved([trained_adapter, other], tmp_path / "p", "task-arithmetic")
    merged = load_exported(one).state_dict()
    # Averaging the products is averaging the two fine-tuned models peft folds each into.
    first, second = (
        load_exported(a).merge_and_unload().state_dict() for a in (trained_adapter, other)
    )
    assert merged.keys() == first.keys()
    assert any(not torch.equal(first[k], second[k]) for k in first)
    for k in first:
        torch.testing.assert_close(merged[k], (first[k] + second[k]) / 2, atol=1e-6, rtol=0)
    factors = merge_saved(
        [trained_adapter, other], tmp_path / "f", "ties", density=0.5, lora_mode="factors"
    )
    assert json.loads((factors / "fedelta.json").read_text())["base-model"] == "all-MiniLM-L6-v2"
    inputs = [load_file(str(a / "adapter_model.safetensors")) for a in (trained_adapter, other)]
    written = load_file(str(factors / "adapter_model.safetensors"))
    assert written.keys() == inputs[0].keys()
    for k, value in written.items():  # A, B and the head, each merged on its own
        expected = merge_utils.ties([t[k] for t in inputs], torch.ones(2), 0.5)
        torch.testing.assert_close(value, expected, rtol=0, atol=0)
    peft_model = load_exported(factors)  # a PEFT adapter again, holding the merged factors
    loaded = get_peft_model_state_dict(peft_model)  # keyed as peft saves them
    assert all(torch.equal(loaded[k], v) for k, v in written.items())


# -- federations -----------------------------------------------------------------------------
@pytest.mark.slow
def test_ties_aggregation_with_a_lines_export_through_flower(tiny_config):
    import re

    import numpy as np
    from flwr.app import Array, ArrayRecord

    from fedelta.client import app as client_app
    from fedelta.compression import UplinkCompression
    from fedelta.lora import A_SUFFIX
    from fedelta.server.evaluation import CentralEvaluator
    from fedelta.server.export import load_exported
    from fedelta.simulations import simulate

    def train_and_keep_the_upload(msg, context):
        """fedelta's train, keeping a copy of what the site sends (a local function:
        Ray pickles it by value)."""
        from pathlib import Path

        import numpy as np

        from fedelta import protocol

        reply = client_app.train(msg, context)
        config, server_round = protocol.read_config(msg.content)
        folder = Path(config.output_dir) / "sent"
        folder.mkdir(exist_ok=True)
        upload = reply.content.array_records[protocol.DELTA]
        examples = reply.content.metric_records[protocol.METRICS][protocol.NUM_EXAMPLES]
        site = context.node_config["partition-id"]
        np.savez(
            folder / f"round-{server_round}-site-{site}.npz",
            examples=np.array(examples),
            **{k: v.numpy() for k, v in upload.items()},
        )
        return reply

    def ties(deltas: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
        """TIES-merging (Yadav et al., 2023): keep each delta's largest entries, elect a
        sign per entry by their sum, average the weighted entries that agree with it."""
        trimmed = []
        for d in deltas:
            keep = torch.zeros(d.numel(), dtype=torch.bool)
            # Equal magnitudes are common (Adam's first steps): break ties as topk does.
            keep[d.abs().flatten().topk(int(density * d.numel())).indices] = True
            trimmed.append(d.double() * keep.view(d.shape))
        stacked = torch.stack(trimmed)
        sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).double()
        agree = stacked.sign() == sign
        w = torch.tensor(weights, dtype=torch.float64).view(-1, *[1] * deltas[0].dim())
        return (stacked * w * agree).sum(0) / agree.sum(0).clamp(min=1)

    config = tiny_config.replace(
        **{
            "num-server-rounds": 2,
            "strategy.aggregator": "ties",
            "strategy.merge-density": 0.5,
            "export.merge": "lines",
        }
    )
    result = simulate(
        config, client_app=client_app.with_train(train_and_keep_the_upload), progress=False
    )
    assert result.summary["strategy"] == "fedavg+naive+ties"
    assert result.summary["export-merge"] == "lines"
    folder = result.run_dir / "round-states"
    assert sorted(p.name for p in folder.iterdir()) == [
        "round-0.safetensors",
        "round-1.safetensors",
        "round-2.safetensors",
    ]
    states = [load_file(str(folder / f"round-{r}.safetensors")) for r in range(3)]

    # Each round's global model is the last one plus TIES of the uploads it received,
    # weighted by example counts relative to their mean (FedAvg, server lr 1).
    layout = {k: tuple(v.shape) for k, v in states[0].items()}
    wire = UplinkCompression(config.compression, config.seed)
    for server_round in (1, 2):
        sent = [
            np.load(result.run_dir / "sent" / f"round-{server_round}-site-{i}.npz")
            for i in range(2)
        ]
        counts = [float(s["examples"]) for s in sent]
        weights = [c * len(counts) / sum(counts) for c in counts]
        uploads = [
            wire.decode(
                ArrayRecord({k: Array(s[k]) for k in s.files if k != "examples"}),
                layout,
                server_round,
            )
            for s in sent
        ]
        before, after = states[server_round - 1], states[server_round]
        for name in layout:
            merged = ties([u[name] for u in uploads], weights, 0.5)
            torch.testing.assert_close(
                after[name].double(), before[name].double() + merged, rtol=1e-5, atol=1e-7
            )

    # LiNeS: B and the head of block l of L = 6 keep 0.5 + 0.5 (l - 1) / 5 of the change
    # since round 0 (the head, above the blocks, all of it); A stays the last round's.
    exported = dict(load_exported(result.adapter_dir).named_parameters())
    first, last = states[0], states[2]
    for name in last:
        block = re.search(r"encoder\.layer\.(\d+)\.", name)
        scale = 0.5 + 0.5 * int(block.group(1)) / 5 if block else 1.0
        expected = (
            last[name]
            if name.endswith(A_SUFFIX)
            else first[name] + scale * (last[name] - first[name])
        )
        torch.testing.assert_close(exported[name].detach(), expected, rtol=1e-5, atol=1e-7)
    shallow = next(n for n in last if "layer.0." in n and "lora_B" in n)
    assert not torch.equal(exported[shallow], last[shallow])  # scaled, not copied

    # The exported model's reported test metrics are its own, evaluated here anew.
    evaluator = CentralEvaluator(config)
    again = evaluator.task.evaluate(load_exported(result.adapter_dir), evaluator.loader)
    assert again.accuracy == result.summary["exported-test-accuracy"]
    assert again.loss == pytest.approx(result.summary["exported-test-loss"], rel=1e-6)


@pytest.mark.training
def test_init_from_takes_model_folders_and_merges_adapters(trained_adapter, tmp_path):
    from fedelta.cli import _init_model, main
    from fedelta.config import ConfigError

    config = RunConfig().replace(output_dir=str(tmp_path / "run"))
    merged = _init_model(trained_adapter, config)
    assert merged == tmp_path / "run" / "init-model" and (merged / "config.json").is_file()
    assert _init_model(merged, config) == merged
    with pytest.raises(ConfigError, match="neither a model folder"):
        _init_model(tmp_path, config)
    out = tmp_path / "t"
    args = ["--delta", str(trained_adapter), "--from", "all-MiniLM-L6-v2"]
    assert main(["transfer", *args, "--to", str(merged), "--out", str(out)]) == 0
    report = json.loads((out / "transfer.json").read_text())
    # v2 = v1 + delta, so v2 - v1 is the delta itself
    assert report["overall"]["relative"] == pytest.approx(1.0, rel=1e-4)
    assert report["overall"]["cosine"] == pytest.approx(1.0, abs=1e-4)
