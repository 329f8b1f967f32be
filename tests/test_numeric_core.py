"""The numeric core against independent computations: truncated SVDs and LoRA factor
bookkeeping (ranks, scales, folds), sparse tensors and the codecs' scale counts and bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedelta.compression.quantization import Fp16, Fp32, Int8, build_codec
from fedelta.compression.sparse import count_for, index_dtype
from fedelta.lora import (
    A_SUFFIX,
    B_SUFFIX,
    RankScaling,
    apply_fold,
    client_view,
    decode_fold,
    effective_update,
    encode_fold,
    lift_delta,
    lora_scale,
    product,
    rank_layout,
    seeded_lora_A,
    svd_factors,
    truncated_svd,
)
from fedelta.tensors import SparseTensor, densify


def _low_rank(out_features: int, in_features: int, singular: list[float], seed: int = 0):
    """A matrix with exactly the given singular values (orthonormal factors from QR)."""
    g = torch.Generator().manual_seed(seed)
    k = len(singular)
    u, _ = torch.linalg.qr(torch.randn(out_features, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_features, k, generator=g, dtype=torch.float64))
    return (u * torch.tensor(singular, dtype=torch.float64)) @ v.T


# -- truncated SVD ------------------------------------------------------------------------
def test_truncated_svd_of_a_low_rank_product_reproduces_it():
    matrix = _low_rank(12, 9, [5.0, 3.0, 1.0]).float()
    u, v = truncated_svd(matrix, 3)
    assert u.shape == (12, 3) and v.shape == (3, 9)
    assert u.dtype == torch.float32 and v.dtype == torch.float32
    torch.testing.assert_close(u @ v, matrix, atol=1e-5, rtol=1e-5)


def test_truncated_svd_is_the_best_rank_k_approximation_ordered_by_singular_value():
    """Eckart-Young: the rank-k error is the norm of the singular values left out, and
    the components come out largest first."""
    singular = [8.0, 4.0, 2.0, 1.0, 0.5]
    matrix = _low_rank(10, 7, singular, seed=1).float()
    expected = torch.linalg.svd(matrix.double(), full_matrices=False).S
    for k in range(1, 5):
        u, v = truncated_svd(matrix, k)
        assert u.shape == (10, k) and v.shape == (k, 7)
        error = float((matrix.double() - (u @ v).double()).norm())
        assert error == pytest.approx(math.sqrt(sum(s**2 for s in singular[k:])), rel=1e-4)
        # V has orthonormal rows; U's column norms are the singular values, in order.
        torch.testing.assert_close(v @ v.T, torch.eye(k), atol=1e-5, rtol=0)
        norms = u.double().norm(dim=0)
        torch.testing.assert_close(norms, expected[:k], rtol=1e-5, atol=1e-6)
        assert (norms[:-1] >= norms[1:]).all()


def test_truncated_svd_at_a_rank_above_the_matrix_size_keeps_every_component():
    matrix = torch.randn(3, 6, generator=torch.Generator().manual_seed(2))
    u, v = truncated_svd(matrix, 8)
    assert u.shape == (3, 3) and v.shape == (3, 6)
    torch.testing.assert_close(u @ v, matrix, atol=1e-5, rtol=1e-5)


# -- ranks and scales ---------------------------------------------------------------------
def test_rank_layout_cuts_only_the_lora_factors_to_the_clients_rank():
    layout = {
        "m.q" + A_SUFFIX: (8, 64),
        "m.q" + B_SUFFIX: (32, 8),
        "head.weight": (2, 32),
        "head.bias": (2,),
    }
    assert rank_layout(layout, 3) == {
        "m.q" + A_SUFFIX: (3, 64),
        "m.q" + B_SUFFIX: (32, 3),
        "head.weight": (2, 32),
        "head.bias": (2,),
    }
    assert rank_layout({"head.bias": [2]}, 3) == {"head.bias": (2,)}


def test_lora_scale_is_alpha_over_r_or_over_sqrt_r_with_rslora():
    assert lora_scale(16.0, 4) == 4.0
    assert lora_scale(16.0, 4, rslora=True) == 8.0
    assert RankScaling(global_rank=4, alpha=16.0).scale() == 4.0
    assert RankScaling(global_rank=4, alpha=16.0).scale(2) == 8.0
    assert RankScaling(global_rank=4, alpha=16.0, rslora=True).scale() == 8.0
    assert RankScaling(global_rank=4, alpha=16.0, rslora=True).scale(1) == 16.0


def test_product_is_the_scaled_update_in_linear_layout():
    state = _global_state(3)
    expected = 0.5 * (state["m.q" + B_SUFFIX].double() @ state["m.q" + A_SUFFIX].double())
    got = product(state, "m.q", 0.5)
    assert got.shape == (6, 5)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-6)


def _global_state(rank: int, out_features: int = 6, in_features: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {
        "m.q" + A_SUFFIX: torch.randn(rank, in_features, generator=g),
        "m.q" + B_SUFFIX: torch.randn(out_features, rank, generator=g),
        "head.weight": torch.randn(2, in_features, generator=g),
    }


@pytest.mark.parametrize("rslora", [False, True])
def test_a_lower_rank_clients_view_plus_its_tail_is_the_global_update(rslora):
    """``scale(r_i) B_i A_i + tail`` must equal ``scale(r) B A``: nothing is lost or
    rescaled by handing a client fewer components."""
    scaling = RankScaling(global_rank=4, alpha=8.0, rslora=rslora)
    state = _global_state(4)
    a, b = state["m.q" + A_SUFFIX], state["m.q" + B_SUFFIX]
    view, tail = client_view(state, 2, scaling)
    assert set(view) == set(state) and set(tail) == {"m.q"}
    torch.testing.assert_close(view["m.q" + A_SUFFIX], a[:2])
    assert view["head.weight"] is state["head.weight"]
    full = scaling.scale() * (b @ a)
    head = scaling.scale(2) * (view["m.q" + B_SUFFIX] @ view["m.q" + A_SUFFIX])
    torch.testing.assert_close(head, scaling.scale() * (b[:, :2] @ a[:2]))
    torch.testing.assert_close(tail["m.q"], scaling.scale() * (b[:, 2:] @ a[2:]))
    torch.testing.assert_close(head + tail["m.q"], full, atol=1e-5, rtol=1e-5)


def test_a_full_rank_client_sees_the_global_state_and_no_tail():
    scaling = RankScaling(global_rank=4, alpha=8.0)
    state = _global_state(4)
    view, tail = client_view(state, 4, scaling)
    assert tail == {}
    assert all(view[k] is v for k, v in state.items())


@pytest.mark.parametrize("rslora", [False, True])
def test_a_lifted_client_delta_moves_the_global_product_as_it_moved_the_clients(rslora):
    """In global coordinates (zero-padded, B rescaled) a client's factors give the same
    update under the global scale as they gave under the client's own scale."""
    scaling = RankScaling(global_rank=5, alpha=16.0, rslora=rslora)
    g = torch.Generator().manual_seed(3)
    delta = {
        "m.q" + A_SUFFIX: torch.randn(2, 7, generator=g),
        "m.q" + B_SUFFIX: torch.randn(4, 2, generator=g),
        "head.weight": torch.randn(2, 7, generator=g),
    }
    lifted = lift_delta(delta, 2, scaling)
    a, b = lifted["m.q" + A_SUFFIX], lifted["m.q" + B_SUFFIX]
    assert a.shape == (5, 7) and b.shape == (4, 5)
    assert not a[2:].any() and not b[:, 2:].any()
    torch.testing.assert_close(a[:2], delta["m.q" + A_SUFFIX])
    client = scaling.scale(2) * (delta["m.q" + B_SUFFIX] @ delta["m.q" + A_SUFFIX])
    torch.testing.assert_close(scaling.scale() * (b @ a), client, atol=1e-5, rtol=1e-5)
    assert torch.equal(lifted["head.weight"], delta["head.weight"])
    assert lift_delta(delta, 5, scaling) == delta


def test_seeded_lora_a_agrees_everywhere_and_lower_ranks_are_prefixes():
    """Every process derives the same A without sending it (FFA-LoRA), drawn like peft's
    Kaiming-uniform init: uniform in +-1/sqrt(in_features)."""
    a = seeded_lora_A(7, "m.layer.0.query", 8, 400)
    assert a.shape == (8, 400)
    assert torch.equal(a, seeded_lora_A(7, "m.layer.0.query", 8, 400))
    assert torch.equal(seeded_lora_A(7, "m.layer.0.query", 3, 400), a[:3])
    assert not torch.equal(seeded_lora_A(8, "m.layer.0.query", 8, 400), a)
    assert not torch.equal(seeded_lora_A(7, "m.layer.1.query", 8, 400), a)
    bound = 1 / math.sqrt(400)
    assert float(a.abs().max()) <= bound
    assert float(a.min()) < -0.99 * bound and float(a.max()) > 0.99 * bound
    # Uniform on [-bound, bound]: mean 0, variance bound^2 / 3.
    assert abs(float(a.mean())) < 5 * bound / math.sqrt(3 * a.numel())
    assert float(a.var()) == pytest.approx(bound**2 / 3, rel=0.05)


def test_svd_factors_keep_the_product_ordered_by_singular_value():
    g = torch.Generator().manual_seed(4)
    b, a = torch.randn(9, 4, generator=g), torch.randn(4, 11, generator=g)
    new_b, new_a = svd_factors(b, a)
    assert new_b.shape == (9, 4) and new_a.shape == (4, 11)
    assert new_b.dtype == torch.float32 and new_a.dtype == torch.float32
    torch.testing.assert_close(new_b @ new_a, b @ a, atol=1e-4, rtol=1e-5)
    s = torch.linalg.svd((b @ a).double()).S[:4]
    # Balanced: component i has norm sqrt(s_i) in both B's column and A's row.
    torch.testing.assert_close(new_b.double().norm(dim=0), s.sqrt(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(new_a.double().norm(dim=1), s.sqrt(), rtol=1e-4, atol=1e-6)
    # Cutting to the first two components is the best rank-2 approximation.
    cut = new_b[:, :2] @ new_a[:2]
    assert float((cut - b @ a).double().norm()) == pytest.approx(float(s[2:].norm()), rel=1e-4)
    # A small update (every singular value below 1) is kept just the same.
    small_b, small_a = svd_factors(b * 1e-2, a * 1e-2)
    torch.testing.assert_close(small_b @ small_a, (b @ a) * 1e-4, atol=1e-8, rtol=1e-5)
    assert small_b.norm(dim=0).min() > 0


def test_svd_factors_give_dead_components_a_zero_b_and_a_fresh_a_row():
    """A rank-2 product in rank-4 factors: the two components with no singular value get
    B = 0 (product unchanged) and A rows orthogonal to the live ones with the norm of
    peft's initial rows (1/sqrt(3)), so they can still learn."""
    g = torch.Generator().manual_seed(5)
    b = torch.cat([torch.randn(8, 2, generator=g), torch.zeros(8, 2)], dim=1)
    a = torch.randn(4, 10, generator=g)
    new_b, new_a = svd_factors(b, a)
    torch.testing.assert_close(new_b @ new_a, b @ a, atol=1e-4, rtol=1e-5)
    assert new_b[:, :2].norm(dim=0).min() > 0.1
    assert not new_b[:, 2:].any()
    norms = new_a.double().norm(dim=1)
    torch.testing.assert_close(norms[2:], torch.full((2,), 3**-0.5, dtype=torch.float64))
    torch.testing.assert_close(
        new_a[2:].double() @ new_a[:2].double().T,
        torch.zeros(2, 2, dtype=torch.float64),
        atol=1e-5,
        rtol=0,
    )


def test_svd_factors_of_a_zero_product_are_all_fresh():
    new_b, new_a = svd_factors(torch.zeros(6, 3), torch.randn(3, 5))
    assert not new_b.any()
    torch.testing.assert_close(
        new_a.double().norm(dim=1), torch.full((3,), 3**-0.5, dtype=torch.float64)
    )


# -- folds on the wire --------------------------------------------------------------------
def test_a_dense_fold_travels_unchanged():
    corrections = {"m.q": torch.randn(4, 3), "m.v": torch.randn(4, 3)}
    tensors, error = encode_fold(corrections, 0)
    assert error == 0.0
    assert tensors == corrections
    assert decode_fold(tensors) == corrections


def test_a_low_rank_fold_decodes_to_the_best_approximation_and_reports_its_error():
    """The relative Frobenius error over all modules together, from the singular values
    each module leaves out."""
    q = _low_rank(8, 6, [4.0, 2.0, 1.0], seed=6).float()
    v = _low_rank(5, 7, [3.0, 0.5], seed=7).float()
    tensors, error = encode_fold({"m.q": q, "m.v": v}, 1)
    assert set(tensors) == {"m.q.U", "m.q.V", "m.v.U", "m.v.V"}
    assert tensors["m.q.U"].shape == (8, 1) and tensors["m.q.V"].shape == (1, 6)
    decoded = decode_fold(tensors)
    assert set(decoded) == {"m.q", "m.v"}
    left_out = 2.0**2 + 1.0**2 + 0.5**2
    total = 4.0**2 + 2.0**2 + 1.0**2 + 3.0**2 + 0.5**2
    assert error == pytest.approx(math.sqrt(left_out / total), rel=1e-4)
    sent = sum(float((decoded[k] - m).double().norm()) ** 2 for k, m in (("m.q", q), ("m.v", v)))
    assert math.sqrt(sent / total) == pytest.approx(error, rel=1e-4)
    # Relative: a small fold (total norm below 1) reports the same error.
    assert encode_fold({"m.q": q / 10, "m.v": v / 10}, 1)[1] == pytest.approx(error, rel=1e-4)
    exact, none_lost = encode_fold({"m.q": q, "m.v": v}, 3)
    assert none_lost < 1e-5
    torch.testing.assert_close(decode_fold(exact)["m.q"], q, atol=1e-5, rtol=1e-5)


def test_a_zero_fold_has_no_error():
    tensors, error = encode_fold({"m.q": torch.zeros(4, 3)}, 2)
    assert error == 0.0
    assert not decode_fold(tensors)["m.q"].any()


def test_a_fold_with_u_but_no_v_is_refused():
    with pytest.raises(KeyError, match="^\"fold 'm.q' has U but no V\"$"):
        decode_fold({"m.q.U": torch.ones(4, 1)})


# -- sparse tensors -----------------------------------------------------------------------
def test_a_scaled_sparse_tensor_is_the_scaled_dense_tensor():
    sparse = SparseTensor(torch.tensor([0, 5, 7]), torch.tensor([1.0, -2.0, 4.0]), (2, 4))
    scaled = sparse.scaled(0.25)
    assert scaled.shape == (2, 4)
    assert torch.equal(scaled.indices, sparse.indices)
    assert torch.equal(scaled.dense(), 0.25 * sparse.dense())


def test_gather_takes_the_entries_at_flat_indices_sorted_as_int64():
    tensor = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    sparse = SparseTensor.gather(tensor, torch.tensor([9, 2, 5], dtype=torch.int32))
    assert sparse.shape == (3, 4)
    assert sparse.indices.dtype == torch.int64 and sparse.indices.tolist() == [2, 5, 9]
    assert sparse.values.dtype == torch.float32 and sparse.values.tolist() == [2.0, 5.0, 9.0]
    expected = torch.zeros(3, 4)
    expected.view(-1)[[2, 5, 9]] = torch.tensor([2.0, 5.0, 9.0])
    assert torch.equal(sparse.dense(), expected)


def test_densify_expands_sparse_tensors_and_keeps_dense_ones():
    dense = torch.ones(2, 2)
    out = densify(
        {"s": SparseTensor(torch.tensor([1, 3]), torch.tensor([5.0, 6.0]), (2, 2)), "d": dense}
    )
    assert set(out) == {"s", "d"} and out["d"] is dense
    assert torch.equal(out["s"], torch.tensor([[0.0, 5.0], [0.0, 6.0]]))


@pytest.mark.parametrize(
    ("numel", "density", "count"),
    [(1000, 0.1, 100), (1000, 0.0501, 51), (10, 0.001, 1), (1, 0.01, 1), (5, 1.0, 5), (7, 2.0, 7)],
)
def test_count_for_rounds_up_and_keeps_between_one_and_all_entries(numel, density, count):
    assert count_for(numel, density) == count


@pytest.mark.parametrize(
    ("numel", "dtype"),
    [
        (1, np.uint16),
        (2**16, np.uint16),  # largest index 65535
        (2**16 + 1, np.uint32),
        (2**32, np.uint32),
        (2**32 + 1, np.int64),
    ],
)
def test_index_dtype_is_the_smallest_that_holds_every_index(numel, dtype):
    assert index_dtype(numel) == np.dtype(dtype)
    assert np.iinfo(index_dtype(numel)).max >= numel - 1


# -- codecs -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "codec",
    [Fp32(), Fp16(), Int8(), Int8(block_size=4), Int8(block_size=4, stochastic=True)],
    ids=["fp32", "fp16", "int8", "int8-block", "int8-block-stochastic"],
)
@pytest.mark.parametrize("numel", [1, 3, 4, 5, 8, 9])
def test_scale_count_is_the_number_of_scales_encode_sends(codec, numel):
    """The server sizes the scales array from ``scale_count``; it must match what a
    client's encoder actually sent."""
    values = torch.linspace(-1.0, 2.0, numel)
    codes, scales = codec.encode(values, torch.Generator().manual_seed(0))
    sent = 0 if scales is None else len(scales)
    assert codec.scale_count(numel) == sent
    decoded = codec.decode(codes, scales)
    assert decoded.shape == values.shape and decoded.dtype == torch.float32
    assert float((decoded - values).abs().max()) <= codec.error_bound(values)


def test_int8_blocks_have_one_scale_per_started_block():
    assert [Int8(block_size=4).scale_count(n) for n in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]
    assert [Int8().scale_count(n) for n in (1, 4, 1000)] == [1, 1, 1]
    values = torch.tensor([1.0, -2.0, 0.5, 0.0, 100.0])  # the second block: one value
    codes, scales = Int8(block_size=4).encode(values)
    np.testing.assert_allclose(scales, [2 / 127, 100 / 127], rtol=1e-6)
    assert codes.tolist() == [64, -127, 32, 0, 127]


def test_int8_bound_is_met_by_a_value_halfway_between_two_codes():
    """Rounding to nearest errs by up to half a step: at exactly half a step the error
    reaches the stated bound and must not exceed it."""
    values = torch.tensor([127.0, 0.5, -2.5, 1.0])  # scale 1; 0.5 and -2.5 are ties
    codec = Int8()
    decoded = codec.decode(*codec.encode(values))
    error = float((decoded - values).abs().max())
    assert error == 0.5
    assert error <= codec.error_bound(values) <= 0.5 * (1 + 1e-4)
    assert Int8(stochastic=True).error_bound(values) == pytest.approx(1.0, rel=1e-4)


def test_an_all_zero_block_decodes_to_zeros_within_a_nonnegative_bound():
    values = torch.tensor([0.0, 0.0, 0.0, 0.0, 3.0, -1.0])
    for codec in (Int8(), Int8(block_size=4), Int8(block_size=4, stochastic=True)):
        codes, scales = codec.encode(values, torch.Generator().manual_seed(1))
        decoded = codec.decode(codes, scales)
        assert torch.equal(decoded[:4], torch.zeros(4))
        zeros = torch.zeros(4)
        assert torch.equal(codec.decode(*codec.encode(zeros)), zeros)
        assert codec.error_bound(zeros) >= 0.0


def test_fp16_bound_is_half_an_ulp_and_is_met_at_ties():
    """Half a unit in the last place, relative for normals (2^-11), absolute for
    subnormals (2^-25); values exactly halfway to the next fp16 reach it."""
    codec = Fp16()
    assert codec.error_bound(torch.tensor([1.0, -0.25])) == 2.0**-11
    assert codec.error_bound(torch.tensor([0.0])) == 2.0**-25
    assert codec.error_bound(torch.empty(0)) == 2.0**-25
    # Ties round to even: 1 + 2^-11 to 1, 2^-25 (half the smallest subnormal) to 0.
    for tie, expected in ((1.0 + 2.0**-11, 2.0**-11), (2.0**-25, 2.0**-25)):
        values = torch.tensor([tie], dtype=torch.float32)
        error = float((codec.decode(*codec.encode(values)) - values).abs().max())
        assert error == expected
        assert error <= codec.error_bound(values)


def test_fp16_takes_its_largest_value_and_empty_tensors():
    codec = Fp16()
    largest = torch.tensor([65504.0, -65504.0])
    assert torch.equal(codec.decode(*codec.encode(largest)), largest)
    codes, scales = codec.encode(torch.empty(0))
    assert scales is None and codes.size == 0


@pytest.mark.parametrize(("name", "block_size"), [("int8", 0), ("int8-block", 4)])
def test_a_stochastic_int8_codec_rounds_ties_both_ways_repeatably(name, block_size):
    """Stochastic rounding is unbiased only if it goes both ways; a seeded generator must
    make it repeat (seeded runs reproduce)."""
    codec = build_codec(name, block_size=4, stochastic=True)
    assert codec.name == name and codec.block_size == block_size and codec.stochastic
    values = torch.tensor([127.0, 0.5, 0.5, 0.5] * 64)
    first = codec.encode(values, torch.Generator().manual_seed(3))[0]
    again = codec.encode(values, torch.Generator().manual_seed(3))[0]
    assert np.array_equal(first, again)
    assert set(first[1::4].tolist()) == {0, 1}
    deterministic = build_codec(name, block_size=4)
    assert not deterministic.stochastic
    assert set(deterministic.encode(values)[0][1::4].tolist()) == {0}


def test_build_codec_names_each_codec_and_refuses_unknown_names():
    assert type(build_codec("none")) is Fp32 and type(build_codec("fp16")) is Fp16
    per_tensor, blocks = build_codec("int8", block_size=4), build_codec("int8-block", block_size=4)
    assert per_tensor.block_size == 0 and per_tensor.scale_count(10) == 1
    assert blocks.block_size == 4 and blocks.scale_count(10) == 3
    with pytest.raises(
        ValueError, match="unknown quantization 'int4'; use one of none, fp16, int8, int8-block"
    ):
        build_codec("int4")


@pytest.mark.parametrize(
    "codec",
    [Fp32(), Fp16(), Int8(), Int8(block_size=4)],
    ids=["fp32", "fp16", "int8", "int8-block"],
)
def test_every_codec_sends_its_wire_dtype_and_decodes_to_fp32(codec):
    """The server refuses any other value dtype, whatever precision the client held."""
    values = torch.linspace(-3.0, 3.0, 10, dtype=torch.float64)
    codes, scales = codec.encode(values)
    assert codes.dtype == codec.wire_dtype
    assert codec.decode(codes, scales).dtype == torch.float32


def test_fp32_is_lossless():
    values = torch.randn(50, generator=torch.Generator().manual_seed(8))
    assert torch.equal(Fp32().decode(*Fp32().encode(values)), values)
    assert Fp32().error_bound(values) == 0.0


def test_int8_values_need_their_scales():
    codes, _ = Int8().encode(torch.ones(3))
    with pytest.raises(ValueError, match="^int8 values need their scales$"):
        Int8().decode(codes)


def test_stochastic_rounding_never_wraps_past_the_largest_code():
    """v / s can land a hair above 127 in fp32 (here 127.0000076); rounding up from there
    must stay at code 127, not wrap to -128."""
    values = torch.full((1_000_000,), 0.379630446434021)
    assert float(values[0] / (values[0] / 127.0)) > 127
    codec = Int8(stochastic=True)
    codes, scales = codec.encode(values, torch.Generator().manual_seed(0))
    assert codes.min() == 127
    error = (codec.decode(codes, scales) - values).abs().max()
    assert float(error) <= codec.error_bound(values)
    # Symmetric codes: rounding down from just below -127 stays at -127 as well.
    negative = codec.encode(-values, torch.Generator().manual_seed(0))[0]
    assert negative.max() == -127 and negative.min() == -127


@pytest.mark.parametrize(
    "codec", [Fp32(), Int8(), Int8(block_size=4)], ids=["fp32", "int8", "int8-block"]
)
def test_an_empty_tensor_has_nothing_to_err(codec):
    assert codec.error_bound(torch.empty(0)) == pytest.approx(0.0, abs=1e-9)


# -- folds in a live model ----------------------------------------------------------------
class _TwoLayers(torch.nn.Module):
    """One nn.Linear and one GPT-2 style Conv1D (weight stored transposed)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.q = torch.nn.Linear(5, 4)
        self.c = Conv1D(4, 5)  # 5 in, 4 out; weight (5, 4)


@pytest.fixture
def adapted() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q", "c"], init_lora_weights=False)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        return get_peft_model(_TwoLayers(), config)


def _lora_product(model: torch.nn.Module, module: str) -> torch.Tensor:
    """``alpha / r * B @ A`` from the model's own factors (Linear layout)."""
    layer = model.get_submodule(module)
    return 2.0 * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach()


def test_apply_fold_sets_base_weights_and_effective_update_sees_fold_plus_lora(adapted):
    q, c = "base_model.model.q", "base_model.model.c"
    w_q = adapted.get_submodule(q).base_layer.weight.detach().clone()
    w_c = adapted.get_submodule(c).base_layer.weight.detach().clone()
    torch.testing.assert_close(effective_update(adapted, q), _lora_product(adapted, q))
    fold_q, fold_c = torch.randn(4, 5), torch.randn(4, 5)
    apply_fold(adapted, {q: fold_q, c: fold_c})
    torch.testing.assert_close(adapted.get_submodule(q).base_layer.weight, w_q + fold_q)
    torch.testing.assert_close(adapted.get_submodule(c).base_layer.weight, w_c + fold_c.T)
    for module, fold in ((q, fold_q), (c, fold_c)):
        update = effective_update(adapted, module)
        assert update.shape == (4, 5)
        torch.testing.assert_close(update, fold + _lora_product(adapted, module))


def test_a_new_fold_replaces_the_last_and_unnamed_modules_go_back_to_pristine(adapted):
    """One cached model serves many clients: folds never pile up."""
    q, c = "base_model.model.q", "base_model.model.c"
    w_q = adapted.get_submodule(q).base_layer.weight.detach().clone()
    w_c = adapted.get_submodule(c).base_layer.weight.detach().clone()
    apply_fold(adapted, {q: torch.ones(4, 5), c: torch.ones(4, 5)})
    second = torch.full((4, 5), -2.0)
    apply_fold(adapted, {q: second})
    torch.testing.assert_close(adapted.get_submodule(q).base_layer.weight, w_q + second)
    torch.testing.assert_close(adapted.get_submodule(c).base_layer.weight, w_c)
    apply_fold(adapted, {c: second})  # q goes back to pristine, c still takes its fold
    torch.testing.assert_close(adapted.get_submodule(q).base_layer.weight, w_q)
    torch.testing.assert_close(adapted.get_submodule(c).base_layer.weight, w_c + second.T)
    apply_fold(adapted, {})
    torch.testing.assert_close(adapted.get_submodule(q).base_layer.weight, w_q)
    torch.testing.assert_close(adapted.get_submodule(c).base_layer.weight, w_c)
    torch.testing.assert_close(effective_update(adapted, q), _lora_product(adapted, q))


def test_a_fold_of_a_later_module_alone_is_applied(adapted):
    """Modules never folded before the named one must not stop the others."""
    c = "base_model.model.c"
    w_c = adapted.get_submodule(c).base_layer.weight.detach().clone()
    fold = torch.randn(4, 5)
    apply_fold(adapted, {c: fold})
    torch.testing.assert_close(adapted.get_submodule(c).base_layer.weight, w_c + fold.T)


def test_apply_fold_refuses_unknown_modules_and_wrong_shapes(adapted):
    q = "base_model.model.q"
    w_q = adapted.get_submodule(q).base_layer.weight.detach().clone()
    with pytest.raises(KeyError, match="fold names modules the model does not adapt"):
        apply_fold(adapted, {"base_model.model.k": torch.zeros(4, 5)})
    with pytest.raises(ValueError, match=r"fold for 'base_model.model.q' has shape \(5, 4\)"):
        apply_fold(adapted, {q: torch.zeros(5, 4)})
    torch.testing.assert_close(adapted.get_submodule(q).base_layer.weight, w_q)


def test_drift_metrics_match_a_hand_computation():
    from fedelta.server.drift import DriftMonitor
    from fedelta.tensors import SparseTensor

    bias = "classifier.modules_to_save.default.bias"
    before = {"layer.lora_A": torch.zeros(2, 2), bias: torch.tensor([0.0, 0.0])}
    after = {
        "layer.lora_A": torch.tensor([[1.0, 0.0], [0.0, 0.0]]),
        bias: torch.tensor([0.5, -0.5]),
    }
    monitor = DriftMonitor()
    # Along the global change; and orthogonal to it in the factor, sent sparse.
    monitor.observe(
        "a",
        {"layer.lora_A": torch.tensor([[2.0, 0.0], [0.0, 0.0]]), bias: torch.tensor([1.0, -1.0])},
    )
    monitor.observe(
        "b",
        {
            "layer.lora_A": SparseTensor(torch.tensor([1]), torch.tensor([3.0]), (2, 2)),
            bias: torch.tensor([-1.0, 1.0]),
        },
    )
    row = monitor.close(before, after)
    moved = math.sqrt(1 + 0.5)
    assert row["update-norm-by-site"] == {
        "a": pytest.approx(math.sqrt(6)),
        "b": pytest.approx(math.sqrt(11)),
    }
    assert row["update-cosine-by-site"]["a"] == pytest.approx(
        (2 + 1) / (math.sqrt(6) * moved), abs=1e-4
    )
    assert row["update-cosine-by-site"]["b"] == pytest.approx(
        -1 / (math.sqrt(11) * moved), abs=1e-4
    )
    assert row["update-cosine-mean"] == pytest.approx(
        sum(row["update-cosine-by-site"].values()) / 2, abs=1e-4
    )
    assert row["head-bias"] == [0.5, -0.5]
    assert row["head-bias-update-by-site"] == {"a": [1.0, -1.0], "b": [-1.0, 1.0]}
    # A securely aggregated round: no site's own update, only the global head.
    assert DriftMonitor().close(before, after) == {"head-bias": [0.5, -0.5]}
