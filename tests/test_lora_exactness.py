"""Exact LoRA aggregation, property-tested on real peft layers.

For every strategy declared exact, clients of random ranks and scales start from
the global model (as the ClientApp loads it), train (a random change of their
trainable factors), and the server aggregates their deltas. The new global model's
effective weight update must equal sum_i w_i * (scale_i B_i' A_i' - scale_i B_i A_i)
for every adapted weight, on ``nn.Linear`` (BERT) and GPT-2 ``Conv1D``
(fan_in_fan_out) layers alike. The ``naive`` rule is shown to miss it.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
)

from fedelta.client.view import load_client_view
from fedelta.lora import FOLD_PREFIX, RankScaling, adapted_modules, effective_update
from fedelta.models import ModelSpec, adapter_state, build_model, load_adapter_state
from fedelta.server.evaluation import load_global_state
from fedelta.strategies import LORA_AGGREGATIONS, Capabilities, DeltaStrategy

GLOBAL_RANK = 4
EXACT = sorted(name for name, cls in LORA_AGGREGATIONS.items() if cls.exact)
ARCHS = {
    "bert-linear": ("query", "value"),
    "gpt2-conv1d": ("c_attn", "c_proj"),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    """Tiny randomly initialised BERT and GPT-2 models saved as local HF folders."""
    root = tmp_path_factory.mktemp("tiny-models")
    torch.manual_seed(0)
    bert = BertForSequenceClassification(
        BertConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=24,
        )
    )
    gpt2 = GPT2ForSequenceClassification(
        GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, pad_token_id=0)
    )
    dirs = {}
    for name, model in (("bert-linear", bert), ("gpt2-conv1d", gpt2)):
        model.save_pretrained(str(root / name))
        dirs[name] = str(root / name)
    return dirs


@functools.cache
def _model(path: str, arch: str, rank: int, alpha: int, rslora: bool, rule: str, role: str):
    """A built model and its initial adapter, cached per process like ``cached_model``.
    ``role`` keeps the server's model apart from the clients' (they live in different
    processes), so a client of the global rank is not the server's object."""
    spec = ModelSpec(
        name=path,
        num_labels=2,
        lora_r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=ARCHS[arch],
        seed=7,
        global_rank=GLOBAL_RANK,
        use_rslora=rslora,
        freeze_lora_a=LORA_AGGREGATIONS[rule].freezes_a,
    )
    model = build_model(spec)
    return model, adapter_state(model)


def _effective(model, modules) -> dict[str, torch.Tensor]:
    return {m: effective_update(model, m).detach().double() for m in modules}


def _round(dirs, arch, rule_name, ranks, weights, alpha, rslora, seed, svd=False):
    """One round; returns (expected new effective updates, server's, client-start errors)."""
    path = dirs[arch]
    scaling = RankScaling(GLOBAL_RANK, alpha, rslora)
    rule = LORA_AGGREGATIONS[rule_name](scaling, seed=7, svd_projection=svd)
    strategy = DeltaStrategy(rule)
    server, server_init = _model(path, arch, GLOBAL_RANK, alpha, rslora, rule_name, "server")
    gen = torch.Generator().manual_seed(seed)
    # A non-trivial global model: random adapter and, for folding rules, a random fold.
    # (FFA-LoRA's A stays the seeded one: clients regenerate it rather than receive it.)
    global_state = strategy.initial_state(server_init)
    for name, value in global_state.items():
        if name.startswith(FOLD_PREFIX) or server.get_parameter(name).requires_grad:
            global_state[name] = torch.randn(value.shape, generator=gen) * 0.1
    modules = adapted_modules(global_state)
    load_global_state(server, global_state)
    before = _effective(server, modules)

    strategy.begin_round(1, global_state, ranks)
    adapter, fold = strategy.downlink(global_state)
    expected = {m: before[m].clone() for m in modules}
    total = float(sum(weights))
    start_error = 0.0
    for rank, weight in zip(ranks, weights, strict=True):
        client, client_init = _model(path, arch, rank, alpha, rslora, rule_name, "client")
        assert client is not server
        start = load_client_view(
            client, rule, rank, adapter, fold, {}, initial_state=client_init, seed=7
        )
        seen = _effective(client, modules)
        start_error = max(
            [start_error] + [float((seen[m] - before[m]).abs().max()) for m in modules]
        )
        trained = {
            k: v + torch.randn(v.shape, generator=gen) * 0.1
            if client.get_parameter(k).requires_grad
            else v
            for k, v in start.items()
        }
        load_adapter_state(client, trained)  # the base corrections of its view stay
        after = _effective(client, modules)
        for m in modules:
            expected[m] += weight / total * (after[m] - seen[m])
        delta = {k: trained[k] - start[k] for k in start if rule.exchanged(k)}
        strategy.accumulate(delta, weight, rank)
    new_state = strategy.finish_round(global_state)
    load_global_state(server, new_state)
    got = _effective(server, modules)
    return expected, got, start_error


def _relative_error(expected, got) -> float:
    return max(float((got[m] - expected[m]).norm() / expected[m].norm()) for m in expected)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rule=st.sampled_from(EXACT),
    arch=st.sampled_from(sorted(ARCHS)),
    clients=st.lists(
        st.tuples(st.integers(1, GLOBAL_RANK), st.integers(1, 100)), min_size=1, max_size=4
    ),
    alpha=st.sampled_from([1, 8, 16]),
    rslora=st.booleans(),
    seed=st.integers(0, 2**16),
    svd=st.booleans(),
)
def test_exact_rules_aggregate_the_weighted_sum_of_updates(
    model_dirs, rule, arch, clients, alpha, rslora, seed, svd
):
    ranks, weights = zip(*clients, strict=True)
    svd = svd and rule == "fedex"  # the only exact rule whose adapter svd re-factors
    expected, got, start_error = _round(
        model_dirs, arch, rule, ranks, weights, alpha, rslora, seed, svd
    )
    assert start_error < 1e-5, "a client did not start from the global model"
    assert _relative_error(expected, got) < 1e-5


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_naive_rule_misses_the_average_update(model_dirs, arch):
    expected, got, _ = _round(model_dirs, arch, "naive", (4, 4, 2), (10, 30, 5), 16, False, 3)
    assert _relative_error(expected, got) > 1e-2


def test_capabilities_state_which_rules_are_exact():
    assert EXACT == ["fedex", "ffa", "flora"]
    assert isinstance(
        DeltaStrategy(LORA_AGGREGATIONS["ffa"](RankScaling(4, 8))).capabilities, Capabilities
    )


def test_fedsa_clients_train_their_own_b(model_dirs):
    """FedSA-LoRA: B never travels; a site starts from its kept B, or its initial B."""
    path = model_dirs["bert-linear"]
    rule = LORA_AGGREGATIONS["fedsa"](RankScaling(GLOBAL_RANK, 16), seed=7)
    model, init = _model(path, "bert-linear", 2, 16, False, "fedsa", "client")
    strategy = DeltaStrategy(rule)
    server_init = _model(path, "bert-linear", 4, 16, False, "fedsa", "server")[1]
    global_state = strategy.initial_state(server_init)
    adapter, fold = strategy.downlink(global_state)
    assert not any(k.endswith("lora_B.default.weight") for k in adapter) and not fold
    b_names = [k for k in init if k.endswith("lora_B.default.weight")]
    first = load_client_view(model, rule, 2, adapter, fold, {}, initial_state=init, seed=7)
    assert all(torch.equal(first[k], init[k]) for k in b_names)
    kept = {k: torch.full_like(init[k], 0.5) for k in b_names}
    second = load_client_view(model, rule, 2, adapter, fold, kept, initial_state=init, seed=7)
    assert all(torch.equal(second[k], kept[k]) for k in b_names)
    assert all(torch.equal(model.get_parameter(k), kept[k]) for k in b_names)


def test_svd_projection_keeps_the_product_and_never_kills_a_component():
    from fedelta.lora import svd_factors

    gen = torch.Generator().manual_seed(0)
    b, a = torch.randn(6, 4, generator=gen), torch.randn(4, 5, generator=gen)
    b[:, 3] = 0  # rank-deficient product: one component has no singular value
    new_b, new_a = svd_factors(b, a)
    assert torch.allclose(new_b @ new_a, b @ a, atol=1e-5)
    assert (new_a.norm(dim=1) > 0.1).all()  # every A row can still carry a gradient to B
    zero_b, zero_a = svd_factors(torch.zeros(6, 4), a)  # B = 0, as at initialisation
    assert torch.equal(zero_b, torch.zeros(6, 4)) and (zero_a.norm(dim=1) > 0.1).all()
    singular = torch.linalg.svdvals(b @ a)
    assert torch.allclose((new_b[:, :2] @ new_a[:2]).norm(), singular[:2].norm(), atol=1e-4)
