import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedelta import deltas
from fedelta.errors import InvalidUpdateError
from fedelta.tensors import layout_of


def _state():
    g = torch.Generator().manual_seed(0)
    return {
        "layer.lora_A.weight": torch.randn(4, 16, generator=g),
        "layer.lora_B.weight": torch.randn(16, 4, generator=g),
        "classifier.bias": torch.randn(2, generator=g),
    }


def test_encode_decode_round_trip_is_exact():
    state = _state()
    decoded = deltas.decode(deltas.encode(state), layout_of(state))
    assert list(decoded) == list(state)
    for name in state:
        assert torch.equal(decoded[name], state[name])


def test_bf16_and_fp16_travel_and_come_back_as_fp32():
    state = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.randn(2).half()}
    record = deltas.encode(state)
    assert record["a"].dtype == "float32" and record["b"].dtype == "float16"
    decoded = deltas.decode(record)
    assert torch.equal(decoded["a"], state["a"].float())
    assert torch.equal(decoded["b"], state["b"].float())


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda r: r.pop("classifier.bias"), "missing tensors: classifier.bias"),
        (
            lambda r: r.__setitem__("extra", Array(np.zeros(2, np.float32))),
            "unexpected tensors: extra",
        ),
        (
            lambda r: r.__setitem__("classifier.bias", Array(np.zeros(3, np.float32))),
            "tensor 'classifier.bias' has shape (3,), expected (2,)",
        ),
        (
            lambda r: r.__setitem__("classifier.bias", Array(np.array([1.0, np.nan], np.float32))),
            "tensor 'classifier.bias' has non-finite values",
        ),
        (
            lambda r: r.__setitem__("classifier.bias", Array(np.array([1, 2], np.int64))),
            "tensor 'classifier.bias' has dtype int64, expected float",
        ),
    ],
)
def test_decode_rejects_malformed_updates_with_a_reason(mutate, reason):
    state = _state()
    record: ArrayRecord = deltas.encode(state)
    mutate(record)
    with pytest.raises(InvalidUpdateError) as err:
        deltas.decode(record, layout_of(state))
    assert reason in str(err.value)


def test_decode_rejects_corrupt_bytes():
    record = ArrayRecord()
    record["x"] = Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"garbage")
    with pytest.raises(InvalidUpdateError, match="tensor 'x' cannot be decoded"):
        deltas.decode(record, {"x": (2,)})
