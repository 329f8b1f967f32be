"""Secure aggregation with SecAgg+ (Bell et al., 2020), Flower's protocol and primitives.

The client side is Flower's own ``secaggplus_mod`` on fedelta's ClientApp (only
messages that carry a SecAgg+ stage go through it). The server side is Flower's
``SecAggPlusWorkflow`` ported to fedelta's round loop: Flower 1.39 ships that
workflow only for its legacy strategies (a ``LegacyContext`` and
``Strategy.aggregate_fit``), while fedelta's strategies take a stream of deltas.
The stages, the neighbour graph, the message keys and every cryptographic step
(key agreement, Shamir shares, pseudo-random masks, quantization) are Flower's,
called as they are.

Each round, for the sampled sites:

1. *setup*: protocol parameters out, two public keys per site back;
2. *share keys*: each site's neighbours' public keys out, encrypted Shamir shares
   of its mask seed and secret key back;
3. *collect masked vectors*: the shares addressed to each site and the usual
   training message out; the site trains and answers with its upload quantized,
   multiplied by its weight and masked (its private mask plus pairwise masks that
   cancel in the sum) — the server cannot read it;
4. *unmask*: the server asks each survivor for the shares that remove the masks
   of survivors and reconstruct the pairwise masks of sites that dropped out after
   stage 2; what is left is the weighted sum, divided by the total weight.

The server learns the weighted mean of the uploads (to the quantization step
``2 x clipping-range / quantization-range`` per entry) and each site's metrics
(example count, loss, epsilon), never one site's upload.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    FitRes,
    Status,
    bytes_to_ndarray,
    ndarrays_to_parameters,
)
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_extract,
    get_parameters_shape,
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.compat.common.recorddict_compat import fitres_to_recorddict
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from fedelta.config import PrivacyConfig

KEYS = "secagg-keys"
"""ConfigRecord in a client's stage-3 reply: the names of its upload's arrays, in order
(names only: the arrays themselves go masked)."""
MODULUS_RANGE = 2**32
"""Flower's modulus for the masks (the largest it supports)."""

Exchange = Callable[[list[Message], float | None], Iterator[tuple[int, Message | None]]]
"""Sends messages, yields ``(node, reply or None)`` as replies land (the round loop's)."""


class SecureAggregationError(RuntimeError):
    """Too few sites stayed in the protocol to recover the sum."""


# -- client side ---------------------------------------------------------------------------
def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` for messages that carry a SecAgg+ stage; every other
    message (plain training, evaluation, queries) goes straight to the app."""
    if (
        msg.metadata.message_type == MessageType.TRAIN
        and RECORD_KEY_CONFIGS in msg.content.config_records
    ):
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def max_weight(settings: PrivacyConfig, site_weight: float | None = None) -> float:
    """The weight that maps to the full quantization range. Flower's mod multiplies an
    upload by ``weight / max-weight`` before quantizing, so the precision of a site's
    upload is ``2 x clipping-range / quantization-range x max-weight / weight``. When
    the strategy gives every site the same ``site_weight`` (client-level DP: 1), that
    is also the maximum."""
    return settings.secagg_max_weight if site_weight is None else float(site_weight)


def masked_upload(
    upload: ArrayRecord,
    num_examples: int,
    settings: PrivacyConfig,
    site_weight: float | None = None,
) -> RecordDict:
    """The records ``secaggplus_mod`` masks: the upload's arrays in name order with its
    weight (``site_weight`` when the strategy fixes one, else ``num_examples``; in the
    legacy ``fitres`` form Flower's mod reads), plus the names.

    Raises ``ValueError`` for an entry that, scaled by ``weight / max-weight``, falls
    outside ``secagg-clipping-range``: Flower's quantizer would clip it silently and
    the aggregate would be wrong."""
    weight = num_examples if site_weight is None else site_weight
    most = max_weight(settings, site_weight)
    names = sorted(upload.keys())
    arrays = [upload[name].numpy() for name in names]
    limit = settings.secagg_clipping_range * min(1.0, most / weight)
    for name, array in zip(names, arrays, strict=True):
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"secure aggregation needs float uploads; '{name}' is {array.dtype}")
        largest = float(np.abs(array).max()) if array.size else 0.0
        if largest > limit:
            raise ValueError(
                f"upload entry {largest:.4g} in '{name}' exceeds {limit:.4g} (privacy.secagg-"
                f"clipping-range {settings.secagg_clipping_range:g} x max-weight "
                f"{most:g} / weight {weight}); raise secagg-clipping-range "
                "(at some cost in precision) or secagg-max-weight"
            )
    fitres = FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters(arrays),
        num_examples=weight,
        metrics={},
    )
    content = fitres_to_recorddict(fitres, keep_input=False)
    content[KEYS] = ConfigRecord({"names": names})
    return content


# -- server side ---------------------------------------------------------------------------
@dataclass
class SecureRound:
    """What one SecAgg+ round gave the server."""

    mean: ArrayRecord | None
    """The weighted mean of the survivors' uploads (None if the protocol failed)."""
    total_weight: float
    contributors: set[int] = field(default_factory=set)
    """Nodes whose upload is in the mean."""
    replies: dict[int, Message] = field(default_factory=dict)
    """Each contributor's stage-3 reply: its metrics, never its upload."""
    failed: dict[int, str] = field(default_factory=dict)
    """Nodes that left the protocol, and at which stage (one that left while unmasking
    is still a contributor: the others' shares removed its mask)."""


class SecAggPlus:
    """Runs SecAgg+ rounds through the round loop's message exchange."""

    def __init__(
        self,
        settings: PrivacyConfig,
        timeout: float | None = None,
        site_weight: float | None = None,
    ) -> None:
        self.settings = settings
        self.timeout = timeout
        self.max_weight = max_weight(settings, site_weight)
        """What the sites' weights are scaled against (``site_weight``: the strategy's
        weight for every site, if it fixes one)."""

    def protocol_sizes(self, sampled: int) -> tuple[int, int]:
        """Shares per secret and the reconstruction threshold for ``sampled`` sites
        (fractions as in Flower's workflow: odd share counts, threshold at least 2)."""
        s = self.settings
        if s.secagg_num_shares <= 1:
            shares = round(s.secagg_num_shares * sampled)
        else:
            shares = min(int(s.secagg_num_shares), sampled)
        if shares < sampled and shares % 2 == 0:
            shares += 1  # a site and its neighbours on both sides
        if shares <= 2:
            shares = sampled
        if s.secagg_reconstruction_threshold <= 1:
            threshold = max(2, round(s.secagg_reconstruction_threshold * shares))
        else:
            threshold = int(s.secagg_reconstruction_threshold)
        if threshold > shares:
            raise SecureAggregationError(
                f"privacy.secagg-reconstruction-threshold ({threshold} shares) exceeds the "
                f"{shares} shares of a round with {sampled} sites"
            )
        return shares, threshold

    def run(
        self,
        exchange: Exchange,
        train_content: Mapping[int, RecordDict],
        server_round: int,
    ) -> SecureRound:
        """One round over the nodes of ``train_content`` (each one's training message)."""
        nodes = sorted(train_content)
        if len(nodes) < 3:
            raise SecureAggregationError(
                f"secure aggregation needs at least 3 sites in a round, got {len(nodes)}"
            )
        shares, threshold = self.protocol_sizes(len(nodes))
        order = list(nodes)
        secrets.SystemRandom().shuffle(order)
        half = shares // 2
        neighbours = {
            nid: {order[(i + k) % len(order)] for k in range(-half, half + 1)}
            for i, nid in enumerate(order)
        }
        state = _Protocol(exchange, self.timeout, server_round, neighbours, threshold)

        # Stage 0: setup.
        setup = {
            Key.STAGE: Stage.SETUP,
            Key.SAMPLE_NUMBER: len(nodes),
            Key.SHARE_NUMBER: shares,
            Key.THRESHOLD: threshold,
            Key.CLIPPING_RANGE: float(self.settings.secagg_clipping_range),
            Key.TARGET_RANGE: int(self.settings.secagg_quantization_range),
            Key.MOD_RANGE: MODULUS_RANGE,
            Key.MAX_WEIGHT: self.max_weight,
        }
        public = state.stage(
            "setup", {nid: RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(setup)}) for nid in nodes}
        )
        public_keys = {
            nid: [cast(bytes, r[Key.PUBLIC_KEY_1]), cast(bytes, r[Key.PUBLIC_KEY_2])]
            for nid, r in public.items()
        }
        state.check_threshold()

        # Stage 1: share keys.
        outgoing = {}
        for nid in state.active:
            record = ConfigRecord({str(n): public_keys[n] for n in neighbours[nid] & state.active})
            record[Key.STAGE] = Stage.SHARE_KEYS
            outgoing[nid] = RecordDict({RECORD_KEY_CONFIGS: record})
        shared = state.stage("share keys", outgoing)
        forward: dict[int, tuple[list[int], list[bytes]]] = {nid: ([], []) for nid in state.active}
        for src, record in shared.items():
            dsts = cast(list[int], record[Key.DESTINATION_LIST])
            ciphertexts = cast(list[bytes], record[Key.CIPHERTEXT_LIST])
            for dst, ciphertext in zip(dsts, ciphertexts, strict=True):
                if dst in forward:
                    forward[dst][0].append(src)
                    forward[dst][1].append(ciphertext)
        state.check_threshold()

        # Stage 2: train, and collect masked uploads.
        outgoing = {}
        for nid in state.active:
            content = RecordDict(dict(train_content[nid].items()))
            content[RECORD_KEY_CONFIGS] = ConfigRecord(
                {
                    Key.STAGE: Stage.COLLECT_MASKED_VECTORS,
                    Key.CIPHERTEXT_LIST: forward[nid][1],
                    Key.SOURCE_LIST: forward[nid][0],
                }
            )
            outgoing[nid] = content
        masked = state.stage("collect masked vectors", outgoing, keep_replies=True)
        total: list[np.ndarray] | None = None
        names: list[str] | None = None
        for nid, record in masked.items():
            vector = [bytes_to_ndarray(b) for b in cast(list[bytes], record[Key.MASKED_PARAMETERS])]
            total = vector if total is None else parameters_addition(total, vector)
            reply_names = list(
                cast(list[str], state.replies[nid].content.config_records[KEYS]["names"])
            )
            if names is not None and reply_names != names:
                raise SecureAggregationError(
                    f"node {nid} uploaded arrays {reply_names}, others {names}"
                )
            names = reply_names
        state.check_threshold()
        if total is None or names is None:
            return SecureRound(None, 0.0, set(), state.replies, state.failed)
        total = parameters_mod(total, MODULUS_RANGE)
        survivors = set(state.active)

        # Stage 3: unmask. Sites that left before sharing their keys masked nothing;
        # those that left after it had pairwise masks added by their neighbours.
        dead = set(shared) - survivors
        outgoing = {
            nid: RecordDict(
                {
                    RECORD_KEY_CONFIGS: ConfigRecord(
                        {
                            Key.STAGE: Stage.UNMASK,
                            Key.ACTIVE_NODE_ID_LIST: sorted(neighbours[nid] & survivors),
                            Key.DEAD_NODE_ID_LIST: sorted(neighbours[nid] & dead),
                        }
                    )
                }
            )
            for nid in state.active
        }
        collected: dict[int, list[bytes]] = {nid: [] for nid in nodes}
        for record in state.stage("unmask", outgoing).values():
            owners = cast(list[int], record[Key.NODE_ID_LIST])
            for owner, share in zip(owners, cast(list[bytes], record[Key.SHARE_LIST]), strict=True):
                collected[owner].append(share)
        shapes = get_parameters_shape(total)
        for nid, share_list in collected.items():
            if nid not in survivors and nid not in dead:
                continue
            if len(share_list) < threshold:
                raise SecureAggregationError(
                    f"only {len(share_list)} of the {threshold} shares needed to unmask node "
                    f"{nid} arrived; the round's sum cannot be recovered"
                )
            secret = combine_shares(share_list)
            if nid in survivors:
                total = parameters_subtraction(
                    total, pseudo_rand_gen(secret, MODULUS_RANGE, shapes)
                )
                continue
            for other in (neighbours[nid] & survivors) - {nid}:
                shared_key = generate_shared_key(
                    bytes_to_private_key(secret), bytes_to_public_key(public_keys[other][0])
                )
                mask = pseudo_rand_gen(shared_key, MODULUS_RANGE, shapes)
                if nid > other:
                    total = parameters_addition(total, mask)
                else:
                    total = parameters_subtraction(total, mask)
        total = parameters_mod(total, MODULUS_RANGE)
        weight_sum, total = factor_extract(total)
        if weight_sum <= 0:
            return SecureRound(None, 0.0, survivors, state.replies, state.failed)
        levels = self.settings.secagg_quantization_range
        summed = dequantize(total, self.settings.secagg_clipping_range, levels)
        offset = -(len(survivors) - 1) * self.settings.secagg_clipping_range
        mean = ArrayRecord()
        for name, array in zip(names, summed, strict=True):
            mean[name] = Array(((array + offset) * (levels / weight_sum)).astype(np.float32))
        masked_weight = weight_sum / levels * self.max_weight
        return SecureRound(mean, masked_weight, survivors, state.replies, state.failed)


class _Protocol:
    """Message rounds of one SecAgg+ run: who is still in, who left and why."""

    def __init__(
        self,
        exchange: Exchange,
        timeout: float | None,
        server_round: int,
        neighbours: Mapping[int, set[int]],
        threshold: int,
    ) -> None:
        self.exchange = exchange
        self.timeout = timeout
        self.group = str(server_round)
        self.neighbours = neighbours
        self.threshold = threshold
        self.active = set(neighbours)
        self.failed: dict[int, str] = {}
        self.replies: dict[int, Message] = {}

    def stage(
        self, name: str, contents: Mapping[int, RecordDict], keep_replies: bool = False
    ) -> dict[int, ConfigRecord]:
        """Send one stage's messages; the SecAgg+ record of each answer, by node."""
        messages = [
            Message(content, dst_node_id=nid, message_type=MessageType.TRAIN, group_id=self.group)
            for nid, content in contents.items()
        ]
        answers: dict[int, ConfigRecord] = {}
        for nid, reply in self.exchange(messages, self.timeout):
            if reply is None:
                why = "timed out"
            elif reply.has_error():
                why = f"client error: {reply.error.reason}"
            elif RECORD_KEY_CONFIGS not in reply.content.config_records:
                why = "reply without SecAgg+ record"
            else:
                answers[nid] = reply.content.config_records[RECORD_KEY_CONFIGS]
                if keep_replies:
                    self.replies[nid] = reply
                continue
            self.failed[nid] = f"{why} (secure aggregation, {name} stage)"
        self.active = set(answers)
        return answers

    def check_threshold(self) -> None:
        """Every sampled site still needs ``threshold`` live neighbours to be unmasked."""
        for nid, near in self.neighbours.items():
            alive = len(near & self.active)
            if alive < self.threshold:
                raise SecureAggregationError(
                    f"node {nid} has {alive} live neighbours, {self.threshold} are needed to "
                    "recover the round's sum; too many sites dropped out"
                )
