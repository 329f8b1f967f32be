"""Sparse and quantized uploads: codecs, the packed wire form, selection rules,
error feedback, training-time masks, Half Fine-Tuning and sparse aggregation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedelta.compatibility import check_config
from fedelta.compression import ClientMemory, UplinkCompression
from fedelta.compression.half_finetuning import group_of, selected_tensors
from fedelta.compression.lift import principal_indices
from fedelta.compression.masked_training import TrainingMask
from fedelta.compression.quantization import Fp16, Fp32, Int8
from fedelta.compression.selection import seeded_mask_indices, top_k_indices
from fedelta.compression.spiel import SpielMask
from fedelta.compression.wire import INDICES, decode_delta, encode_delta, format_of
from fedelta.config import CompressionConfig, ConfigError, RunConfig
from fedelta.strategies.aggregators import Mean
from fedelta.tensors import SparseTensor, densify

LAYOUT = {
    "m.layer.0.query.lora_A.default.weight": (8, 64),
    "m.layer.0.query.lora_B.default.weight": (64, 8),
    "m.layer.1.value.lora_A.default.weight": (8, 64),
    "m.layer.1.value.lora_B.default.weight": (64, 8),
    "base_model.model.classifier.modules_to_save.default.weight": (2, 64),
    "base_model.model.classifier.modules_to_save.default.bias": (2,),
}


def _compression(**settings: object) -> UplinkCompression:
    cfg = CompressionConfig(**{k.replace("-", "_"): v for k, v in settings.items()})
    return UplinkCompression(cfg, seed=7)


def _delta(seed: int, layout=LAYOUT) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in layout.items()}


# -- codecs ------------------------------------------------------------------------------
CODECS = [Fp32(), Fp16(), Int8(), Int8(stochastic=True), Int8(16), Int8(5, stochastic=True)]


@settings(max_examples=300, deadline=None)
@given(
    codec=st.sampled_from(CODECS),
    values=hnp.arrays(
        np.float32,
        st.integers(1, 200),
        elements=st.one_of(st.just(0.0), st.floats(-1e4, 1e4, width=32)),
    ),
    seed=st.integers(0, 2**31),
)
def test_every_codec_round_trips_within_its_stated_bound(codec, values, seed):
    tensor = torch.from_numpy(values)
    decoded = codec.decode(*codec.encode(tensor, torch.Generator().manual_seed(seed)))
    assert decoded.shape == tensor.shape and decoded.dtype == torch.float32
    error = (decoded - tensor).abs()
    assert float(error.max()) <= codec.error_bound(tensor)
    assert (error <= _own_bound(codec, tensor)).all()


def _own_bound(codec: Fp32 | Fp16 | Int8, values: torch.Tensor) -> torch.Tensor:
    """Each value's error bound from the input alone: half a fp16 ulp of the value itself;
    for int8, its own block's scale ``max|v| / 127`` (half of it when rounding to nearest)."""
    if isinstance(codec, Fp32):
        return torch.zeros_like(values)
    if isinstance(codec, Fp16):
        return (values.abs() * 2.0**-11).clamp(min=2.0**-25)
    size = codec.block_size or len(values)
    scales = torch.tensor(
        [float(values[i : i + size].abs().max()) / 127 for i in range(0, len(values), size)]
    )
    per_value = scales.repeat_interleave(size)[: len(values)]
    # A few fp32 ulps of v / s and back on top of the rounding, as the codec states.
    return per_value * (1.0 if codec.stochastic else 0.5) * (1 + 1e-5) + 1e-12


def test_int8_codes_and_scales_are_what_goes_on_the_wire():
    codes, scales = Int8(block_size=4).encode(torch.tensor([1.0, -2.0, 0.5, 0.0, 100.0, 1.0]))
    assert codes.dtype == np.int8 and scales.dtype == np.float32
    # Two blocks: the outlier 100 coarsens only its own block.
    np.testing.assert_allclose(scales, [2 / 127, 100 / 127], rtol=1e-6)
    assert codes.tolist()[:4] == [64, -127, 32, 0]


def test_stochastic_rounding_is_unbiased():
    value = torch.full((20000,), 0.3)
    codec = Int8(stochastic=True)
    peak = torch.cat([value, torch.tensor([127.0])])  # scale 1: 0.3 rounds to 0 or 1
    decoded = codec.decode(*codec.encode(peak, torch.Generator().manual_seed(0)))[:-1]
    assert set(decoded.unique().tolist()) == {0.0, 1.0}
    assert abs(float(decoded.mean()) - 0.3) < 0.01
    rounded = Int8().decode(*Int8().encode(peak))[:-1]
    assert float(rounded.mean()) == 0.0  # nearest rounding loses all of it


def test_fp16_refuses_values_it_cannot_hold():
    with pytest.raises(OverflowError, match="does not fit fp16"):
        Fp16().encode(torch.tensor([1e6]))


# -- wire --------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", ["none", "top-k", "random-mask"])
@pytest.mark.parametrize("quantization", ["none", "fp16", "int8", "int8-block"])
def test_packed_wire_form_is_three_arrays_at_most(sparsity, quantization):
    comp = _compression(sparsity=sparsity, quantization=quantization, **{"error-feedback": False})
    record = comp.compress(_delta(0), ClientMemory(), 1, client_seed=3)
    expected = {"values"}
    expected |= {"scales"} if quantization.startswith("int8") else set()
    expected |= {INDICES} if sparsity == "top-k" else set()
    assert set(record.keys()) == expected
    decoded = comp.decode(record, LAYOUT, 1)
    assert set(decoded) == set(LAYOUT)
    for name, value in decoded.items():
        if sparsity == "none" or "classifier" in name:  # the head is always sent dense
            assert tuple(value.shape) == LAYOUT[name]
        else:
            assert isinstance(value, SparseTensor)
            assert len(value.values) == math.ceil(0.05 * math.prod(LAYOUT[name]))


def test_indices_use_the_smallest_unsigned_type():
    small = {"a": SparseTensor(torch.tensor([1, 5]), torch.ones(2), (100,))}
    big = {"a": SparseTensor(torch.tensor([1, 70000]), torch.ones(2), (80000,))}
    assert encode_delta(small, Fp32())[INDICES].numpy().dtype == np.uint16
    assert encode_delta(big, Fp32())[INDICES].numpy().dtype == np.uint32


def test_top_k_keeps_the_largest_magnitudes():
    tensor = torch.tensor([[0.1, -5.0, 0.2], [3.0, 0.0, -0.3]])
    assert top_k_indices(tensor, 2 / 6).tolist() == [1, 3]


# -- sparse aggregation ------------------------------------------------------------------
def _sparse_updates(n: int, density: float) -> list[tuple[dict, float]]:
    updates = []
    for i in range(n):
        delta = _delta(100 + i)
        sparse = {k: SparseTensor.gather(v, top_k_indices(v, density)) for k, v in delta.items()}
        updates.append((sparse, float(10 + 7 * i)))
    return updates


@pytest.mark.parametrize("density", [0.01, 0.2, 1.0])
def test_sparse_mean_equals_the_mean_of_the_densified_deltas(density):
    sparse_mean, dense_mean = Mean(), Mean()
    for update, weight in _sparse_updates(4, density):
        sparse_mean.add(update, weight)
        dense_mean.add(densify(update), weight)
    a, b = sparse_mean.result(), dense_mean.result()
    for name in LAYOUT:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


def test_senders_weighting_averages_each_coordinate_over_its_senders():
    mean = Mean("senders")
    mean.add({"x": SparseTensor(torch.tensor([0, 1]), torch.tensor([2.0, 4.0]), (3,))}, 1.0)
    mean.add({"x": SparseTensor(torch.tensor([1]), torch.tensor([10.0]), (3,))}, 3.0)
    # coordinate 0: only client 1 (weight 1); 1: both; 2: nobody.
    torch.testing.assert_close(mean.result()["x"], torch.tensor([2.0, (4 + 30) / 4, 0.0]))
    everyone = Mean("all")
    everyone.add({"x": SparseTensor(torch.tensor([0, 1]), torch.tensor([2.0, 4.0]), (3,))}, 1.0)
    everyone.add({"x": SparseTensor(torch.tensor([1]), torch.tensor([10.0]), (3,))}, 3.0)
    torch.testing.assert_close(everyone.result()["x"], torch.tensor([0.5, (4 + 30) / 4, 0.0]))


# -- error feedback ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sparsity", "quantization"),
    [("top-k", "none"), ("top-k", "int8"), ("random-mask", "int8-block"), ("none", "int8")],
)
def test_error_feedback_keeps_sent_plus_residual_equal_to_the_true_deltas(sparsity, quantization):
    comp = _compression(sparsity=sparsity, quantization=quantization, density=0.1)
    memory = ClientMemory()
    true_sum = {k: torch.zeros(s) for k, s in LAYOUT.items()}
    sent_sum = {k: torch.zeros(s) for k, s in LAYOUT.items()}
    for server_round in range(1, 6):
        delta = _delta(server_round)
        record = comp.compress(delta, memory, server_round, client_seed=1)
        received = densify(comp.decode(record, LAYOUT, server_round))
        for k in LAYOUT:
            true_sum[k] += delta[k]
            sent_sum[k] += received[k]
    for k in LAYOUT:
        torch.testing.assert_close(sent_sum[k] + memory.residual[k], true_sum[k], atol=1e-5, rtol=0)
        if "classifier" not in k or quantization != "none":  # a dense fp32 head loses nothing
            assert float(memory.residual[k].abs().max()) > 0  # something really was held back


def test_without_error_feedback_nothing_is_carried():
    comp = _compression(sparsity="top-k", **{"error-feedback": False})
    memory = ClientMemory()
    comp.compress(_delta(0), memory, 1, client_seed=1)
    assert memory.residual == {}


def test_client_memory_survives_the_node_state(tmp_path):
    from flwr.app import RecordDict

    memory = ClientMemory({"a": torch.randn(3, 2)}, {"b": torch.tensor([1, 4, 9])})
    state = RecordDict()
    memory.save(state)
    loaded = ClientMemory.load(state)
    torch.testing.assert_close(loaded.residual["a"], memory.residual["a"])
    assert loaded.indices["b"].tolist() == [1, 4, 9] and loaded.indices["b"].dtype == torch.int64


# -- seeded masks ------------------------------------------------------------------------
def test_seeded_masks_agree_on_every_client_and_send_no_indices():
    clients = [_compression(sparsity="random-mask", density=0.1) for _ in range(3)]
    records = [
        c.compress(_delta(i), ClientMemory(), 4, client_seed=i) for i, c in enumerate(clients)
    ]
    assert all(INDICES not in r.keys() for r in records)
    server = _compression(sparsity="random-mask", density=0.1)
    decoded = [server.decode(r, LAYOUT, 4) for r in records]
    for name in [n for n in LAYOUT if "classifier" not in n]:  # the head is sent dense
        masks = [d[name].indices for d in decoded]
        assert all(torch.equal(m, masks[0]) for m in masks)
        # each client's values are its own delta at the shared mask
        for i, d in enumerate(decoded):
            torch.testing.assert_close(d[name].values, _delta(i)[name].reshape(-1)[masks[0]])
    a = seeded_mask_indices(7, 4, "x", 1000, 0.1)
    assert not torch.equal(a, seeded_mask_indices(7, 5, "x", 1000, 0.1))  # new mask each round


# -- training-time masks -----------------------------------------------------------------
def _train_masked(mask: TrainingMask, params: dict[str, torch.nn.Parameter], steps: int) -> None:
    opt = torch.optim.AdamW(params.values(), lr=0.1, weight_decay=0.1)
    for _ in range(steps):
        opt.zero_grad()
        loss = sum((p * torch.arange(p.numel()).view(p.shape)).sum() ** 2 for p in params.values())
        loss.backward()
        mask.before_step(params)
        opt.step()
        mask.after_step(params)


def test_training_masks_change_exactly_the_masked_coordinates():
    start = {"w": torch.randn(6, 5)}
    params = {"w": torch.nn.Parameter(start["w"].clone())}
    mask = TrainingMask({"w": torch.tensor([3, 7, 20])}, start)
    _train_masked(mask, params, 5)
    moved = (params["w"].detach() != start["w"]).reshape(-1).nonzero().flatten()
    assert moved.tolist() == [3, 7, 20]


def test_spiel_prunes_and_regrows_at_constant_density():
    start = {"w": torch.randn(10, 10)}
    params = {"w": torch.nn.Parameter(start["w"].clone())}
    first = torch.arange(10)
    mask = SpielMask({"w": first}, start, regrow_interval=2, regrow_fraction=0.3)
    _train_masked(mask, params, 6)
    assert mask.swapped == 3 * 3 and len(mask.indices["w"]) == 10
    assert not torch.equal(mask.indices["w"], first)
    moved = set((params["w"].detach() != start["w"]).reshape(-1).nonzero().flatten().tolist())
    assert moved <= set(mask.indices["w"].tolist())
    # The regrown entries are where the gradient is large: the high flat indices here.
    assert int(mask.indices["w"].max()) >= 90


def test_spiel_index_sets_persist_in_client_memory():
    comp = _compression(sparsity="spiel", density=0.1)
    start = {k: torch.zeros(s) for k, s in LAYOUT.items()}
    memory = ClientMemory()
    first = comp.training_mask(start, memory, 1, client_seed=5)
    comp.compress({k: torch.zeros(s) for k, s in LAYOUT.items()}, memory, 1, 5, first)
    again = comp.training_mask(start, memory, 2, client_seed=5)
    assert set(again.indices) == {n for n in LAYOUT if "classifier" not in n}  # head: all
    for name in again.indices:
        assert torch.equal(again.indices[name], first.indices[name])


def test_lift_picks_the_largest_entries_of_the_low_rank_approximation():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(20, 1, generator=g), torch.randn(1, 30, generator=g)
    weight = u @ v + 0.01 * torch.randn(20, 30, generator=g)
    expected = torch.topk((u @ v).abs().reshape(-1), 12).indices.sort().values
    assert torch.equal(principal_indices(weight, 12 / 600, rank=1), expected)
    assert principal_indices(torch.zeros(4, 4), 0.5, 2) is None  # B before any update


# -- Half Fine-Tuning --------------------------------------------------------------------
def test_half_finetuning_selects_half_of_the_modules_and_always_the_head():
    names = [
        f"m.layer.{i}.{p}.lora_{f}.default.weight" for i in range(5) for p in "qv" for f in "AB"
    ]
    names += ["base_model.model.classifier.modules_to_save.default.weight"]
    picked = selected_tensors(names, seed=1, server_round=3)
    groups = {group_of(n) for n in picked} - {None}
    assert len(groups) == 5  # half of 10 modules
    assert all(f"{g}.lora_A.default.weight" in picked for g in groups)  # A and B together
    assert names[-1] in picked
    assert picked == selected_tensors(names, seed=1, server_round=3)
    assert picked != selected_tensors(names, seed=1, server_round=4)


# -- config ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"compression.sparsity": "topk"}, "compression.sparsity' must be one of"),
        ({"compression.density": 0.0}, "compression.density' must be in"),
        ({"compression.quantization": "int4"}, "compression.quantization' must be one of"),
        ({"compression.weighting": "senders"}, "set compression.sparsity"),
        (
            {"compression.half-finetuning": True, "strategy.lora": "fedex"},
            "half-finetuning' freezes whole LoRA modules",
        ),
        ({"model.finetuning": "full", "strategy.lora": "ffa"}, "trains no adapter"),
    ],
)
def test_bad_compression_settings_stop_before_training(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_config(RunConfig().replace(**overrides))


def test_wire_formats_match_what_was_encoded():
    delta = {"a": SparseTensor(torch.tensor([0, 2]), torch.tensor([1.0, 2.0]), (2, 2))}
    record = encode_delta(delta, Int8(2))
    out = decode_delta(record, {"a": format_of(delta["a"], True)}, Int8(2))
    torch.testing.assert_close(out["a"].dense(), delta["a"].dense(), atol=2 / 127, rtol=0)


# -- on the real model -------------------------------------------------------------------
def _trainer(config: RunConfig):
    from fedelta.client.trainer import ClientTrainer
    from fedelta.protocol import Site

    trainer = ClientTrainer(config, Site(0, 2, "client-0"))
    sent = {k: v for k, v in trainer.initial_state.items() if trainer.rule.exchanged(k)}
    start = trainer.receive(sent, {}, {})
    return trainer, start


@pytest.mark.training
def test_half_finetuning_trains_and_sends_exactly_the_selected_half(tiny_config):
    from fedelta.models import adapter_state

    trainer, start = _trainer(tiny_config.replace(**{"compression.half-finetuning": True}))
    out = trainer.fit(start, server_round=1)
    after = adapter_state(trainer.model)
    changed = {k for k in start if not torch.equal(after[k], start[k])}
    head = {k for k in start if ".lora_" not in k}
    modules = {k.split(".lora_")[0] for k in start} - head
    trained = {k.split(".lora_")[0] for k in changed} - head
    # Half the LoRA modules train (the others stay frozen, bit for bit); the head always.
    assert len(trained) == (len(modules) + 1) // 2 and head <= changed
    selected = head | {k for k in start if k.split(".lora_")[0] in trained}
    assert {k for k in selected if k.endswith("lora_B.default.weight")} <= changed
    received = trainer.compression.decode(out.upload, trainer.uplink_layout, 1)
    assert set(received) == selected  # A and B of each trained module, and the head
    assert all(p.requires_grad for n, p in trainer.model.named_parameters() if n in start)


@pytest.mark.training
def test_full_finetuning_with_spiel_changes_only_the_index_set(tiny_config, tmp_path):
    from fedelta.models import adapter_state
    from fedelta.server.export import export_adapter, load_exported

    config = tiny_config.replace(
        **{
            "model.finetuning": "full",
            "lr": 1e-3,
            "compression.sparsity": "spiel",
            "compression.density": 0.01,
            "compression.regrow-interval": 1,
        }
    )
    trainer, start = _trainer(config)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert not any("lora" in n for n in trainable)
    assert "bert.encoder.layer.0.attention.self.query.weight" in trainable
    assert "bert.embeddings.word_embeddings.weight" not in trainable
    assert "classifier.weight" in trainable
    memory = ClientMemory()
    out = trainer.fit(start, server_round=1, memory=memory)
    after = adapter_state(trainer.model)
    received = trainer.compression.decode(out.upload, trainer.uplink_layout, 1)
    for name, sparse in received.items():
        if name.startswith("classifier."):  # the head trains in full and is sent dense
            torch.testing.assert_close(sparse, after[name] - start[name])
            continue
        moved = (after[name] != start[name]).reshape(-1).nonzero().flatten()
        assert set(moved.tolist()) <= set(sparse.indices.tolist())
        torch.testing.assert_close(sparse.dense(), after[name] - start[name])
        assert torch.equal(memory.indices[name], sparse.indices)
    # The fully fine-tuned model exports as a plain Transformers model.
    export_adapter(trainer.model, after, ["neg", "pos"], config.model.name, tmp_path / "out")
    loaded = load_exported(tmp_path / "out")
    batch = trainer.tokenizer(["a fine film"], return_tensors="pt")
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, trainer.model(**batch).logits)
