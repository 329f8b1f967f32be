"""The packed wire form of a delta and the server's checks of a training reply.

Expectations are written from the documented layout (values in sorted-name order,
indices of the smallest unsigned type, per-tensor int8 scales) and from the
documented rejection messages, which name the array or tensor at fault.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedelta import protocol
from fedelta.compression.quantization import Codec, Fp32, Int8
from fedelta.compression.wire import (
    INDICES,
    SCALES,
    VALUES,
    TensorFormat,
    decode_delta,
    encode_delta,
    format_of,
)
from fedelta.errors import InvalidUpdateError
from fedelta.server.validation import ReplyMetrics, read_metrics
from fedelta.tensors import SparseTensor

Delta = dict[str, torch.Tensor | SparseTensor]


def _delta() -> Delta:
    """A dense tensor named after a sparse one, so sorted order differs from insertion."""
    return {
        "z.dense": torch.tensor([[1.0, -2.0], [3.0, 4.0]]),
        "a.sparse": SparseTensor(torch.tensor([1, 4]), torch.tensor([5.0, -6.0]), (2, 3)),
    }


def _formats(delta: Delta, send_indices: bool = True) -> dict[str, TensorFormat]:
    return {k: format_of(v, send_indices) for k, v in delta.items()}


def _raw(record: ArrayRecord, key: str) -> np.ndarray:
    return record[key].numpy()


def _decode(record: ArrayRecord, delta: Delta, codec: Codec | None = None) -> Delta:
    return decode_delta(record, _formats(delta), codec or Fp32())


# -- the byte layout ---------------------------------------------------------------------
def test_values_and_indices_are_packed_in_sorted_name_order():
    record = encode_delta(_delta(), Fp32())
    assert set(record.keys()) == {VALUES, INDICES}
    np.testing.assert_array_equal(_raw(record, VALUES), [5.0, -6.0, 1.0, -2.0, 3.0, 4.0])
    assert _raw(record, VALUES).dtype == np.float32
    indices = _raw(record, INDICES)
    assert indices.dtype == np.uint16
    np.testing.assert_array_equal(indices, [1, 4])


def test_indices_widen_to_uint32_past_65536_entries():
    big = SparseTensor(torch.tensor([0, 70_000]), torch.tensor([1.0, 2.0]), (70_001,))
    small = SparseTensor(torch.tensor([2]), torch.tensor([3.0]), (4,))
    delta: Delta = {"big": big, "small": small}
    record = encode_delta(delta, Fp32())
    assert _raw(record, INDICES).dtype == np.uint32
    np.testing.assert_array_equal(_raw(record, INDICES), [0, 70_000, 2])
    out = _decode(record, delta)
    assert out["big"].indices.tolist() == [0, 70_000]
    assert out["small"].indices.tolist() == [2]


def test_int8_scales_are_one_per_tensor_in_sorted_order():
    delta: Delta = {
        "b": torch.tensor([127.0, -254.0]),
        "a": torch.tensor([1.27, 0.0, -0.635]),
        "c": torch.tensor([-0.5]),
    }
    record = encode_delta(delta, Int8())
    assert set(record.keys()) == {VALUES, SCALES}
    np.testing.assert_allclose(_raw(record, SCALES), [0.01, 2.0, 0.5 / 127], rtol=1e-6)
    np.testing.assert_array_equal(_raw(record, VALUES), [127, 0, -64, 64, -127, -127])
    out = _decode(record, delta, Int8())
    torch.testing.assert_close(out["a"], torch.tensor([1.27, 0.0, -0.64]))
    torch.testing.assert_close(out["b"], torch.tensor([128.0, -254.0]))
    torch.testing.assert_close(out["c"], torch.tensor([-0.5]))


def test_block_scales_follow_each_tensor_segment():
    delta: Delta = {"a": torch.tensor([1.0, 2.0, 100.0]), "b": torch.tensor([-3.0, 0.5])}
    codec = Int8(block_size=2)
    record = encode_delta(delta, codec)
    # a: blocks [1, 2], [100]; b: block [-3, 0.5]
    np.testing.assert_allclose(_raw(record, SCALES), [2 / 127, 100 / 127, 3 / 127], rtol=1e-6)
    out = _decode(record, delta, codec)
    for name, value in delta.items():
        assert float((out[name] - value).abs().max()) <= codec.error_bound(value)


def test_dense_tensors_come_back_in_their_shape_and_sparse_ones_with_their_entries():
    out = _decode(encode_delta(_delta(), Fp32()), _delta())
    assert torch.equal(out["z.dense"], _delta()["z.dense"])
    sparse = out["a.sparse"]
    assert isinstance(sparse, SparseTensor)
    assert sparse.shape == (2, 3)
    assert sparse.indices.tolist() == [1, 4]
    assert sparse.values.tolist() == [5.0, -6.0]


def test_indices_are_sent_unless_both_sides_derive_them():
    delta = _delta()
    assert INDICES in encode_delta(delta, Fp32()).keys()  # sent by default
    record = encode_delta(delta, Fp32(), send_indices=False)
    assert set(record.keys()) == {VALUES}
    known = _formats(delta, send_indices=False)
    assert known["a.sparse"] == TensorFormat((2, 3), 2, delta["a.sparse"].indices)
    assert not known["a.sparse"].sends_indices
    assert _formats(delta)["a.sparse"] == TensorFormat((2, 3), 2, None)
    assert known["z.dense"] == TensorFormat((2, 2))
    out = decode_delta(record, known, Fp32())
    assert out["a.sparse"].indices.tolist() == [1, 4]
    assert out["a.sparse"].values.tolist() == [5.0, -6.0]


def test_a_sparse_tensor_with_no_entries_sends_no_indices_for_it():
    delta: Delta = {
        "a": SparseTensor(torch.zeros(0, dtype=torch.int64), torch.zeros(0), (3,)),
        "b": SparseTensor(torch.tensor([2]), torch.tensor([7.0]), (3,)),
    }
    out = _decode(encode_delta(delta, Fp32()), delta)
    assert out["a"].indices.tolist() == []
    assert out["b"].indices.tolist() == [2]


# -- rejections name the array or tensor -------------------------------------------------
def _replace(record: ArrayRecord, key: str, array: np.ndarray) -> ArrayRecord:
    record[key] = Array(array)
    return record


def test_missing_arrays_are_listed():
    delta = _delta()
    record = ArrayRecord()
    record[VALUES] = Array(np.zeros(6, np.int8))
    with pytest.raises(InvalidUpdateError, match="^missing arrays: indices, scales$"):
        decode_delta(record, _formats(delta), Int8())


def test_unexpected_arrays_are_listed_three_at_most():
    record = encode_delta(_delta(), Fp32())
    for key in ("e4", "e1", "e3", "e2"):
        record[key] = Array(np.zeros(1, np.float32))
    with pytest.raises(InvalidUpdateError, match="^unexpected arrays: e1, e2, e3$"):
        _decode(record, _delta())


@pytest.mark.parametrize(
    ("key", "array", "message"),
    [
        (VALUES, np.zeros(6, np.float16), "'values' must be a 1-d float32 array, got float16"),
        (VALUES, np.zeros((2, 3), np.float32), r"'values' must be a 1-d float32 .* \(2, 3\)"),
        (VALUES, np.zeros(7, np.float32), "^'values' holds 7 entries, expected 6$"),
        (INDICES, np.array([1, 4], np.int64), "'indices' must be a 1-d uint16 array"),
        (INDICES, np.array([1], np.uint16), "^'indices' holds 1 entries, expected 2$"),
        (INDICES, np.array([1, 6], np.uint16), r"^tensor 'a.sparse' has indices outside \[0, 6\)$"),
        (INDICES, np.array([4, 1], np.uint16), "^tensor 'a.sparse' has indices not strictly"),
        (INDICES, np.array([4, 4], np.uint16), "^tensor 'a.sparse' has indices not strictly"),
    ],
)
def test_malformed_arrays_are_refused_with_the_reason(key, array, message):
    record = _replace(encode_delta(_delta(), Fp32()), key, array)
    with pytest.raises(InvalidUpdateError, match=message):
        _decode(record, _delta())


def test_indices_at_both_ends_of_the_tensor_are_accepted():
    delta: Delta = {"s": SparseTensor(torch.tensor([0, 5]), torch.tensor([1.0, 2.0]), (6,))}
    out = _decode(encode_delta(delta, Fp32()), delta)
    assert out["s"].indices.tolist() == [0, 5]


def test_every_sparse_tensor_is_checked_against_its_own_size():
    delta: Delta = {
        "a": SparseTensor(torch.tensor([0, 1]), torch.tensor([1.0, 2.0]), (2,)),
        "b": SparseTensor(torch.tensor([3]), torch.tensor([3.0]), (8,)),
    }
    record = _replace(encode_delta(delta, Fp32()), INDICES, np.array([0, 1, 8], np.uint16))
    with pytest.raises(InvalidUpdateError, match=r"^tensor 'b' has indices outside \[0, 8\)$"):
        _decode(record, delta)
    record = _replace(encode_delta(delta, Fp32()), INDICES, np.array([1, 0, 3], np.uint16))
    with pytest.raises(InvalidUpdateError, match="^tensor 'a' has indices not strictly"):
        _decode(record, delta)


def test_undecodable_bytes_are_refused_naming_the_array():
    record = encode_delta(_delta(), Fp32())
    record[VALUES] = Array("float32", (6,), "numpy.ndarray", b"not npy")
    with pytest.raises(InvalidUpdateError, match="^'values' cannot be decoded: "):
        _decode(record, _delta())


def test_non_finite_values_name_the_tensor_they_are_in():
    record = encode_delta(_delta(), Fp32())
    values = _raw(record, VALUES).copy()
    values[3] = np.nan  # inside z.dense, the second tensor in sorted order
    record[VALUES] = Array(values)
    with pytest.raises(InvalidUpdateError, match="^tensor 'z.dense' has non-finite values$"):
        _decode(record, _delta())


def test_int8_values_scaled_past_fp32_range_are_refused():
    delta: Delta = {"a": torch.tensor([1.0]), "b": torch.tensor([1.0])}
    record = encode_delta(delta, Int8())
    record[SCALES] = Array(np.array([1.0, 3e38], np.float32))
    with pytest.raises(InvalidUpdateError, match="^tensor 'b' has non-finite values$"):
        _decode(record, delta, Int8())


@pytest.mark.parametrize("bad", [-1.0, np.inf, np.nan])
def test_negative_or_non_finite_scales_are_refused(bad):
    delta: Delta = {"a": torch.tensor([1.0, 2.0])}
    record = _replace(encode_delta(delta, Int8()), SCALES, np.array([bad], np.float32))
    with pytest.raises(InvalidUpdateError, match="^'scales' has negative or non-finite scales$"):
        _decode(record, delta, Int8())


def test_a_zero_scale_is_a_zero_tensor():
    delta: Delta = {"a": torch.zeros(3)}
    out = _decode(encode_delta(delta, Int8()), delta, Int8())
    assert torch.equal(out["a"], torch.zeros(3))


def test_scale_count_is_checked():
    delta: Delta = {"a": torch.tensor([1.0, 2.0, 3.0])}
    record = _replace(encode_delta(delta, Int8(2)), SCALES, np.ones(3, np.float32))
    with pytest.raises(InvalidUpdateError, match="^'scales' holds 3 entries, expected 2$"):
        _decode(record, delta, Int8(2))
    record = _replace(encode_delta(delta, Int8(2)), SCALES, np.ones(2, np.float64))
    with pytest.raises(InvalidUpdateError, match="'scales' must be a 1-d float32 array"):
        _decode(record, delta, Int8(2))


# -- reply metrics ---------------------------------------------------------------------
def _content(**metrics: object) -> RecordDict:
    base: dict[str, object] = {protocol.NUM_EXAMPLES: 10, protocol.TRAIN_LOSS: 0.5}
    base.update({k.replace("_", "-"): v for k, v in metrics.items()})
    return RecordDict(
        {protocol.METRICS: MetricRecord({k: v for k, v in base.items() if v is not None})}
    )


DP = {"dp_epsilon": 1.5, "dp_noise_multiplier": 0.8, "dp_sample_rate": 0.25, "train_steps": 3}


def test_metrics_of_a_plain_reply():
    assert read_metrics(_content()) == ReplyMetrics(10, 0.5)
    assert read_metrics(_content(num_examples=1, train_loss=2)) == ReplyMetrics(1, 2.0)
    assert type(read_metrics(_content(train_loss=2)).train_loss) is float


def test_metrics_of_a_dp_sgd_reply_carry_its_mechanism():
    got = read_metrics(_content(**DP))
    assert got == ReplyMetrics(10, 0.5, 1.5, (0.8, 0.25, 3), steps=3)
    edge = read_metrics(
        _content(**DP | {"dp_epsilon": 0, "dp_noise_multiplier": 2, "dp_sample_rate": 1})
    )
    assert edge == ReplyMetrics(10, 0.5, 0.0, (2.0, 1.0, 3), steps=3)
    assert type(edge.epsilon) is float and type(edge.mechanism[0]) is float
    small = read_metrics(_content(**DP | {"dp_epsilon": 0.5, "train_steps": 1}))
    assert small.epsilon == 0.5 and small.mechanism == (0.8, 0.25, 1)


def test_a_reply_without_metrics_is_refused():
    with pytest.raises(InvalidUpdateError, match="^reply has no 'metrics' record$"):
        read_metrics(RecordDict())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_examples": 0}, "^num-examples must be a positive integer, got 0$"),
        ({"num_examples": -3}, "^num-examples must be a positive integer, got -3$"),
        ({"num_examples": None}, "^num-examples must be a positive integer, got None$"),
        ({"num_examples": 4.0}, "^num-examples must be a positive integer, got 4.0$"),
        ({"train_loss": None}, "^train-loss must be a finite number, got None$"),
        ({"train_loss": math.nan}, "^train-loss must be a finite number, got nan$"),
        ({"train_loss": -math.inf}, "^train-loss must be a finite number, got -inf$"),
        ({"dp_epsilon": -0.1}, "^dp-epsilon must be a non-negative number, got -0.1$"),
        ({"dp_epsilon": math.nan}, "^dp-epsilon must be a non-negative number, got nan$"),
        ({"dp_epsilon": [1.0]}, "^dp-epsilon must be a non-negative number, got \\[1.0\\]$"),
    ],
)
def test_bad_reply_metrics_are_refused_with_the_value(overrides, message):
    with pytest.raises(InvalidUpdateError, match=message):
        read_metrics(_content(**overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        {"dp_noise_multiplier": 0.0},
        {"dp_noise_multiplier": -1.0},
        {"dp_noise_multiplier": None},
        {"dp_noise_multiplier": [1.0]},
        {"dp_sample_rate": 0.0},
        {"dp_sample_rate": 1.5},
        {"dp_sample_rate": None},
        {"dp_sample_rate": [0.5]},
        {"train_steps": 0},
        {"train_steps": -2},
        {"train_steps": 2.0},
        {"train_steps": None},
    ],
)
def test_a_dp_sgd_reply_needs_its_whole_mechanism(overrides):
    settings = DP | overrides
    noise, rate, steps = (
        settings["dp_noise_multiplier"],
        settings["dp_sample_rate"],
        settings["train_steps"],
    )
    message = (
        "a DP-SGD reply needs dp-noise-multiplier > 0, dp-sample-rate in (0, 1] and "
        f"train-steps > 0, got {noise!r}, {rate!r}, {steps!r}"
    )
    with pytest.raises(InvalidUpdateError) as caught:
        read_metrics(_content(**settings))
    assert str(caught.value) == message
