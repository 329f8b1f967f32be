"""Every training reply is validated before aggregation: fuzzed with malformed payloads."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedelta import protocol
from fedelta.deltas import InvalidUpdateError
from fedelta.server.validation import read_update

LAYOUT = {"encoder.lora_A": (2, 3), "encoder.lora_B": (3, 2), "head.bias": (4,)}


def _npy(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return buffer.getvalue()


@st.composite
def tensors(draw: st.DrawFn, shape: tuple[int, ...]) -> tuple[Array, bool]:
    """An Array for a tensor of ``shape`` and whether the server should accept it."""
    kind = draw(
        st.sampled_from(
            ["good", "non-finite", "shape", "dtype", "garbage", "truncated", "stype", "object"]
        )
    )
    good = draw(
        hnp.arrays(
            draw(st.sampled_from([np.float16, np.float32, np.float64])),
            shape,
            elements=st.floats(-1e3, 1e3, width=16),
        )
    )
    if kind == "good":
        return Array(good), True
    if kind == "non-finite":
        bad = good.astype(np.float32)
        bad.flat[draw(st.integers(0, bad.size - 1))] = draw(st.sampled_from([np.nan, np.inf]))
        return Array(bad), False
    if kind == "shape":
        other = draw(
            hnp.array_shapes(min_dims=0, max_dims=3, max_side=5).filter(lambda s: s != shape)
        )
        return Array(np.zeros(other, np.float32)), False
    if kind == "dtype":
        dtype = draw(st.sampled_from([np.int64, np.int8, np.bool_, np.complex64, np.uint16]))
        return Array(np.zeros(shape, dtype)), False
    if kind == "garbage":
        data = draw(st.binary(max_size=200))
        return Array("float32", tuple(shape), "numpy.ndarray", data), False
    if kind == "truncated":
        data = _npy(good)
        return Array(
            "float32", tuple(shape), "numpy.ndarray", data[: draw(st.integers(0, len(data) - 1))]
        ), False
    if kind == "stype":
        return Array("float32", tuple(shape), draw(st.text(max_size=12)), _npy(good)), False
    # A pickled object array: must be refused, never unpickled.
    data = io.BytesIO()
    np.save(data, np.array([{"x": 1}, None], dtype=object), allow_pickle=True)
    return Array("object", (2,), "numpy.ndarray", data.getvalue()), False


@st.composite
def replies(draw: st.DrawFn) -> tuple[RecordDict, bool]:
    """A training reply, malformed in any number of ways, and whether it is valid."""
    valid = True
    content = RecordDict()
    delta_form = draw(st.sampled_from(["record", "record", "record", "absent", "config"]))
    if delta_form == "record":
        record = ArrayRecord()
        names = [n for n in LAYOUT if draw(st.booleans()) or draw(st.booleans())]
        valid &= len(names) == len(LAYOUT)
        for name in names:
            array, ok = draw(tensors(LAYOUT[name]))
            record[name] = array
            valid &= ok
        for extra in draw(st.lists(st.text(min_size=1, max_size=8), max_size=2, unique=True)):
            if extra not in LAYOUT:
                record[extra] = Array(np.zeros(2, np.float32))
                valid = False
        content[protocol.DELTA] = record
    else:
        valid = False
        if delta_form == "config":
            content[protocol.DELTA] = ConfigRecord({"delta": "not tensors"})
    if draw(st.integers(0, 9)):
        metrics = MetricRecord()
        examples = draw(
            st.one_of(st.integers(-5, 10**6), st.floats(allow_nan=True), st.just([1, 2]), st.none())
        )
        if examples is not None:
            metrics[protocol.NUM_EXAMPLES] = examples
        valid &= type(examples) is int and examples > 0
        loss = draw(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.none()))
        if loss is not None:
            metrics["train-loss"] = loss
        valid &= loss is not None and math.isfinite(loss)
        content[protocol.METRICS] = metrics
    else:
        valid = False
    return content, valid


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(replies())
def test_every_malformed_reply_is_rejected_with_a_reason_and_valid_ones_pass(reply):
    content, valid = reply
    if not valid:
        with pytest.raises(InvalidUpdateError) as caught:
            read_update(content, LAYOUT)
        assert str(caught.value)
        return
    update = read_update(content, LAYOUT)
    assert {k: tuple(v.shape) for k, v in update.delta.items()} == LAYOUT
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in update.delta.values())
    assert update.num_examples > 0 and math.isfinite(update.train_loss)


def _reply(delta: dict[str, np.ndarray], examples: object = 10, loss: object = 0.5) -> RecordDict:
    record = ArrayRecord({k: Array(v) for k, v in delta.items()})
    return RecordDict(
        {
            protocol.DELTA: record,
            protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: examples, "train-loss": loss}),
        }
    )


def _ones(scale: float = 1.0) -> dict[str, np.ndarray]:
    return {k: np.full(s, scale, np.float32) for k, s in LAYOUT.items()}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (RecordDict(), "no 'delta' record"),
        (_reply(_ones(), examples=0), "num-examples must be a positive integer"),
        (_reply(_ones(), examples=2.5), "num-examples must be a positive integer"),
        (_reply(_ones(), loss=math.inf), "train-loss must be a finite number"),
        (_reply({**_ones(), "head.bias": np.ones(5, np.float32)}), "has shape (5,), expected (4,)"),
        (
            _reply({k: v for k, v in _ones().items() if k != "head.bias"}),
            "missing tensors: head.bias",
        ),
    ],
)
def test_rejections_name_the_problem(content, message):
    with pytest.raises(InvalidUpdateError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_update(content, LAYOUT)


def test_optional_norm_bound_rejects_instead_of_scaling():
    # ||ones|| over 6 + 6 + 4 entries = 4.0
    assert read_update(_reply(_ones()), LAYOUT, max_norm=4.0).num_examples == 10
    with pytest.raises(InvalidUpdateError, match="update norm 40 exceeds max-update-norm 4"):
        read_update(_reply(_ones(10.0)), LAYOUT, max_norm=4.0)
