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
from fedelta.compression import ClientMemory, UplinkCompression
from fedelta.config import CompressionConfig
from fedelta.errors import InvalidUpdateError
from fedelta.server.validation import ReplyMetrics, read_update
from fedelta.tensors import SparseTensor, densify

LAYOUT = {"encoder.lora_A": (2, 3), "encoder.lora_B": (3, 2), "head.bias": (4,)}
COMPRESSIONS = [
    {},
    {"quantization": "fp16"},
    {"quantization": "int8-block", "block_size": 4},
    {"sparsity": "top-k", "density": 0.5},
    {"sparsity": "top-k", "density": 0.3, "quantization": "int8"},
    {"sparsity": "random-mask", "density": 0.5, "quantization": "int8"},
    {"sparsity": "spiel", "density": 0.5},
]
MUTATIONS = [
    "good",
    "non-finite",
    "length",
    "dtype",
    "2-d",
    "garbage",
    "truncated",
    "stype",
    "object",
    "missing",
    "extra",
    "index-range",
    "index-order",
    "scales",
]


def _npy(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return buffer.getvalue()


def _uplink(settings: dict) -> UplinkCompression:
    return UplinkCompression(CompressionConfig(**settings), seed=3)


Sent = dict[str, torch.Tensor]


@st.composite
def delta_records(draw: st.DrawFn) -> tuple[ArrayRecord, UplinkCompression, bool, Sent]:
    """A delta encoded as a real client would, then possibly damaged in one way; with
    the delta that was encoded."""
    comp = _uplink(draw(st.sampled_from(COMPRESSIONS)))
    values = {
        k: torch.from_numpy(
            draw(hnp.arrays(np.float32, shape, elements=st.floats(-1e3, 1e3, width=16)))
        )
        for k, shape in LAYOUT.items()
    }
    start = {k: torch.zeros(s) for k, s in LAYOUT.items()}
    mask = comp.training_mask(start, ClientMemory(), 1, client_seed=draw(st.integers(0, 9)))
    if mask is not None:  # a masked client's delta is zero off its mask
        values = {k: SparseTensor.gather(v, mask.indices[k]).dense() for k, v in values.items()}
    record = comp.compress(values, ClientMemory(), 1, client_seed=0, mask=mask)
    intact = (record, comp, True, values)
    kind = draw(st.sampled_from(MUTATIONS))
    key = draw(st.sampled_from(sorted(record.keys())))
    good = record[key].numpy()
    if kind == "non-finite" and good.dtype.kind == "f":
        bad = good.astype(np.float32)
        bad.flat[draw(st.integers(0, bad.size - 1))] = draw(st.sampled_from([np.nan, np.inf]))
        record[key] = Array(bad)
    elif kind == "length":
        cut = draw(st.integers(0, good.size - 1))
        record[key] = Array(
            np.concatenate([good[:cut], good[cut + 1 :]])
            if draw(st.booleans())
            else np.concatenate([good, good[:1]])
        )
    elif kind == "dtype":
        other = draw(
            st.sampled_from([np.int64, np.int8, np.uint32, np.bool_, np.float16, np.float32])
        )
        if (
            np.dtype(other) == good.dtype
            or (good.dtype.kind == "f" and np.dtype(other).kind == "f")
            or (good.dtype.kind == "u" and other is np.int64)
        ):
            return intact
        record[key] = Array(good.astype(other))
    elif kind == "2-d":
        record[key] = Array(good.reshape(1, -1))
    elif kind == "garbage":
        data = draw(st.binary(max_size=200))
        record[key] = Array(str(good.dtype), tuple(good.shape), "numpy.ndarray", data)
    elif kind == "truncated":
        data = _npy(good)
        cut = data[: draw(st.integers(0, len(data) - 1))]
        record[key] = Array(str(good.dtype), tuple(good.shape), "numpy.ndarray", cut)
    elif kind == "stype":
        text = draw(st.text(max_size=12).filter(lambda t: t != "numpy.ndarray"))
        record[key] = Array(str(good.dtype), tuple(good.shape), text, _npy(good))
    elif kind == "object":  # a pickled object array: refused, never unpickled
        data = io.BytesIO()
        np.save(data, np.array([{"x": 1}, None], dtype=object), allow_pickle=True)
        record[key] = Array("object", (2,), "numpy.ndarray", data.getvalue())
    elif kind == "missing":
        del record[key]
    elif kind == "extra":
        record[draw(st.sampled_from(["extra", "values@scales", "encoder.lora_A"]))] = Array(
            np.zeros(2, np.float32)
        )
    elif kind in ("index-range", "index-order") and "indices" in record.keys():
        original = record["indices"].numpy()
        idx = original.astype(np.int64)
        if kind == "index-range":
            idx[draw(st.integers(0, len(idx) - 1))] = 10**6
        else:  # repeating the previous index of the same tensor breaks the strict order
            formats, starts, offset = comp.formats(LAYOUT, 1), set(), 0
            for name in sorted(LAYOUT):
                if formats[name].sends_indices:
                    starts.add(offset)
                    offset += formats[name].count
            inner = [i for i in range(len(idx)) if i not in starts]
            if not inner:
                return intact
            at = draw(st.sampled_from(inner))
            idx[at] = idx[at - 1]
        record["indices"] = Array(idx.astype(original.dtype))
    elif kind == "scales" and "scales" in record.keys():
        scales = record["scales"].numpy().copy()
        scales[draw(st.integers(0, len(scales) - 1))] = draw(st.sampled_from([-1.0, np.nan]))
        record["scales"] = Array(scales)
    else:
        return intact
    return record, comp, False, values


@st.composite
def replies(draw: st.DrawFn) -> tuple[RecordDict, UplinkCompression, bool, Sent]:
    """A training reply, malformed in any number of ways, whether it is valid, and the
    delta the client encoded."""
    valid = True
    content = RecordDict()
    comp, sent = _uplink({}), {}
    delta_form = draw(st.sampled_from(["record", "record", "record", "absent", "config"]))
    if delta_form == "record":
        record, comp, ok, sent = draw(delta_records())
        content[protocol.DELTA] = record
        valid &= ok
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
    return content, comp, valid, sent


def _check_reply(reply: tuple[RecordDict, UplinkCompression, bool, Sent]) -> None:
    """A malformed reply is refused with a reason; a valid one decodes to what was sent."""
    content, comp, valid, sent = reply
    if not valid:
        with pytest.raises(InvalidUpdateError) as caught:
            read_update(content, LAYOUT, comp, 1)
        assert str(caught.value)
        return
    update = read_update(content, LAYOUT, comp, 1)
    dense = densify(update.delta)
    assert {k: tuple(v.shape) for k, v in dense.items()} == LAYOUT
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in dense.values())
    for name, value in update.delta.items():
        _assert_decodes_to(value, sent[name], comp)
    metrics = content.metric_records[protocol.METRICS]
    assert update.metrics.num_examples == metrics[protocol.NUM_EXAMPLES]
    assert update.metrics.train_loss == metrics["train-loss"]


_FUZZ = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
# A quick search in the fast tier (and for mutation testing), a long one with the slow tests.
test_malformed_replies_are_rejected_and_valid_ones_decode = settings(max_examples=300, **_FUZZ)(
    given(replies())(_check_reply)
)
test_every_malformed_reply_is_rejected_with_a_reason_and_valid_ones_pass = pytest.mark.slow(
    settings(max_examples=3000, **_FUZZ)(given(replies())(_check_reply))
)


def _assert_decodes_to(
    value: torch.Tensor | SparseTensor, encoded: torch.Tensor, comp: UplinkCompression
) -> None:
    """``value`` is what the client encoded from ``encoded``: every sent entry within the
    codec's stated bound (exact for fp32), and, when sparse, the right number of entries,
    none left out larger than one sent (top-k; a training mask's delta is zero off it)."""
    flat = encoded.reshape(-1)
    if isinstance(value, SparseTensor):
        assert len(value.indices) == math.ceil(comp.settings.density * flat.numel())
        kept = torch.zeros(flat.numel(), dtype=torch.bool)
        kept[value.indices] = True
        if comp.sparsity != "random-mask" and not kept.all():  # a seeded mask ignores size
            assert float(flat[~kept].abs().max()) <= float(flat[kept].abs().min())
        # The indices are strictly increasing (validated), so they line up with flat[kept].
        flat, decoded = flat[kept], value.values
    else:
        decoded = value.reshape(-1)
    error = float((decoded - flat).abs().max())
    assert error <= comp.codec.error_bound(flat), (error, comp.codec.name)


def _reply(delta: dict[str, np.ndarray], examples: object = 10, loss: object = 0.5) -> RecordDict:
    record = _uplink({}).compress(
        {k: torch.from_numpy(v) for k, v in delta.items()}, ClientMemory(), 1, client_seed=0
    )
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
        (
            _reply({**_ones(), "head.bias": np.ones(5, np.float32)}),
            "'values' holds 17 entries, expected 16",
        ),
        (_reply({k: v for k, v in _ones().items() if k != "head.bias"}), "holds 12 entries"),
    ],
)
def test_rejections_name_the_problem(content, message):
    with pytest.raises(InvalidUpdateError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_update(content, LAYOUT, _uplink({}), 1)


def test_a_valid_reply_yields_its_delta_and_metrics():
    update = read_update(_reply(_ones(100.0)), LAYOUT, _uplink({}), 1)  # no norm bound by default
    assert update.metrics == ReplyMetrics(10, 0.5)
    assert set(update.delta) == set(LAYOUT)
    assert torch.equal(update.delta["head.bias"], torch.full((4,), 100.0))


def test_a_reply_without_a_delta_is_refused():
    metrics_only = RecordDict(
        {protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 10, "train-loss": 0.5})}
    )
    with pytest.raises(InvalidUpdateError, match="^reply has no 'delta' record$"):
        read_update(metrics_only, LAYOUT, _uplink({}), 1)


def test_the_delta_is_checked_against_the_layout():
    wider = {**LAYOUT, "head.bias": (5,)}
    with pytest.raises(InvalidUpdateError, match="^'values' holds 16 entries, expected 17$"):
        read_update(_reply(_ones()), wider, _uplink({}), 1)


def test_a_norm_bound_below_1_applies_too():
    comp = _uplink({})
    assert read_update(_reply(_ones(0.1)), LAYOUT, comp, 1, max_norm=0.5).metrics.num_examples
    with pytest.raises(InvalidUpdateError) as caught:
        read_update(_reply(_ones(0.1)), LAYOUT, comp, 1, max_norm=0.35)
    assert str(caught.value) == "update norm 0.4 exceeds max-update-norm 0.35"


def test_optional_norm_bound_rejects_instead_of_scaling():
    # ||ones|| over 6 + 6 + 4 entries = 4.0
    comp = _uplink({})
    assert read_update(_reply(_ones()), LAYOUT, comp, 1, max_norm=4.0).metrics.num_examples == 10
    with pytest.raises(InvalidUpdateError, match="update norm 40 exceeds max-update-norm 4"):
        read_update(_reply(_ones(10.0)), LAYOUT, comp, 1, max_norm=4.0)
