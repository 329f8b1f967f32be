"""The message schema between fedelta's ServerApp and ClientApp.

Every message from the server carries the full run config as a ``ConfigRecord``,
so a ClientApp needs nothing but its node config (which partition or data file is
its own) to act, however it was launched: ``fedelta simulate``, ``flwr run`` or a
SuperNode on a remote site.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass

from flwr.app import ConfigRecord, RecordDict, UserConfigValue

from fedelta.config import RunConfig
from fedelta.errors import UserError

GLOBAL = "global"
"""ArrayRecord: the global trainable state (server to client)."""
DELTA = "delta"
"""ArrayRecord: trained minus received trainable state, packed (sparse, quantized) as
:mod:`fedelta.compression.wire` describes (client to server)."""
CONFIG = "config"
"""ConfigRecord: the run config plus the round number (server to client)."""
STRATEGY = "strategy"
"""ConfigRecord: what the strategy asks of clients this round, if anything (server to client)."""
METRICS = "metrics"
"""MetricRecord: num-examples, losses, accuracy (client to server)."""
SITE = "site"
"""ConfigRecord: who a node is (client to server, answering a query)."""
FOLD = "fold"
"""ArrayRecord: base-weight corrections of folding strategies (server to client)."""
HEAD_STATISTICS = "head-statistics"
"""ArrayRecord: a site's per-class sums of head-input features and counts (client to
server, answering a :data:`HEAD_STATISTICS_MESSAGE`; ``strategy.head = "ncm"``)."""
HEAD_STATISTICS_ACTION = "head_statistics"
HEAD_STATISTICS_MESSAGE = f"query.{HEAD_STATISTICS_ACTION}"
"""Flower message type of the server's request for head statistics, before round 1."""
LOCAL_ADAPTER = "local-adapter"
"""ArrayRecord in a node's ``Context.state``: adapter tensors a site keeps to itself."""
OPTIMIZER_STATE = "optimizer-state"
"""ArrayRecord in a node's ``Context.state``: the local optimizer's moments
(``keep-optimizer-state``)."""
CONTROL = "control"
"""ArrayRecord: SCAFFOLD's server control variate ``c``, one tensor per exchanged
trainable tensor (server to client)."""
SITE_CONTROL = "site-control"
"""ArrayRecord: the site's own control variate ``c_i`` as the server keeps it, sent only
when the site may not hold it (after a resume, or a round it did not complete)
(server to client)."""
CONTROL_DELTA = "control-delta"
"""ArrayRecord: SCAFFOLD's ``c_i+ - c_i``, dense fp32 whatever ``[compression]`` says
(client to server)."""
LOCAL_CONTROL = "local-control"
"""ArrayRecord in a node's ``Context.state``: the site's SCAFFOLD control variate ``c_i``."""
LOCAL_CONTROL_ROUND = "local-control-round"
"""ConfigRecord in a node's ``Context.state``: the round of that ``c_i``."""
CONTROL_ROUND = "control-round"
"""Strategy-record key: the round of the site's ``c_i`` the server holds (0: zeros); a
site whose own copy is of another round must have been sent ``site-control``."""

DP_SPENT = "dp-spent"
"""ConfigRecord: the DP-SGD mechanisms a site has reported so far, as the server's
checkpointed accountants have them (server to client; a resumed run starts new node states)."""
REFUSED = "refused"
"""ConfigRecord: why a client did not train (its privacy budget is spent), instead of a
delta (client to server)."""

ROUND_KEY = "server-round"
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
TRAIN_STEPS = "train-steps"
DP_NOISE = "dp-noise-multiplier"
DP_RATE = "dp-sample-rate"
DP_EPSILON = "dp-epsilon"
"""DP-SGD epsilon a site has spent over all its rounds so far (in its train replies)."""
BUDGET_SPENT = "privacy budget spent"
"""How a site's refusal begins when DP-SGD would take it past its budget."""

# Node-config keys a SuperNode is started with (Flower's own names in simulation).
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
SITE_NAME = "site-name"
LORA_RANK = "lora-r"
"""Optional: this site's LoRA rank (overrides ``lora.client-ranks``)."""
DATA_PATH = "data-path"
"""A deployed site's own data file (CSV/JSON/JSONL/Parquet); replaces the partition."""


class NodeConfigError(UserError, ValueError):
    """The SuperNode was started without saying which data is its own."""


@dataclass(frozen=True)
class Site:
    """Which slice of the data a node holds, the name it reports under, its rank."""

    partition_id: int
    num_partitions: int
    name: str
    lora_r: int = 0
    """The node config's ``lora-r``; 0 when the run config decides."""
    data_path: str = ""
    """The node config's ``data-path``: the site trains on this file instead of a
    partition; ``partition-id`` is then optional (derived from the name) and only
    seeds the site's shuffling and picks its rank from ``lora.client-ranks``."""

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, UserConfigValue]) -> Site:
        """Read a SuperNode's node config: a ``data-path`` (a real site) or a
        ``partition-id``/``num-partitions`` pair (simulation and rehearsals)."""
        data_path = str(node_config.get(DATA_PATH, "")).strip()
        name = str(node_config.get(SITE_NAME, "")).strip()
        if data_path and not name:
            raise NodeConfigError(
                f"node config has '{DATA_PATH}' but no '{SITE_NAME}'; name the site, "
                f'e.g. --node-config "{DATA_PATH}=/data/train.csv {SITE_NAME}=site-0"'
            )
        try:
            lora_r = int(node_config.get(LORA_RANK, 0))
            if data_path:
                default_id = zlib.crc32(name.encode()) % 1_000_003
                partition_id = int(node_config.get(PARTITION_ID, default_id))
                num_partitions = int(node_config.get(NUM_PARTITIONS, 0))
                return cls(partition_id, num_partitions, name, lora_r, data_path)
            partition_id = int(node_config[PARTITION_ID])
            num_partitions = int(node_config[NUM_PARTITIONS])
        except KeyError as err:
            raise NodeConfigError(
                f"node config lacks {err}; start the SuperNode with "
                f'--node-config "{DATA_PATH}=FILE {SITE_NAME}=NAME" (a site\'s own data) or '
                f'"{PARTITION_ID}=0 {NUM_PARTITIONS}=N" (a partition, for rehearsals)'
            ) from None
        except (TypeError, ValueError) as err:
            raise NodeConfigError(
                f"node config '{PARTITION_ID}'/'{NUM_PARTITIONS}'/'{LORA_RANK}': {err}"
            ) from None
        return cls(partition_id, num_partitions, name or f"client-{partition_id}", lora_r)

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "name": self.name,
                PARTITION_ID: self.partition_id,
                NUM_PARTITIONS: self.num_partitions,
                LORA_RANK: self.lora_r,
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> Site:
        return cls(
            int(record[PARTITION_ID]),
            int(record.get(NUM_PARTITIONS, 0)),
            str(record["name"]),
            int(record.get(LORA_RANK, 0)),
        )

    def rank(self, config: RunConfig) -> int:
        """This site's LoRA rank: node config, else ``lora.client-ranks`` by partition
        id (cycled), else ``lora.r``. Must not exceed ``lora.r``."""
        ranks = config.lora.client_rank_list()
        rank = self.lora_r or (ranks[self.partition_id % len(ranks)] if ranks else config.lora.r)
        if not 1 <= rank <= config.lora.r:
            raise NodeConfigError(
                f"site {self.name!r} asks for LoRA rank {rank}; it must be in "
                f"[1, lora.r = {config.lora.r}]"
            )
        return rank


def config_record(config: RunConfig, server_round: int) -> ConfigRecord:
    record = ConfigRecord(dict(config.to_flat()))
    record[ROUND_KEY] = server_round
    return record


def read_config(content: RecordDict) -> tuple[RunConfig, int]:
    """The run config and round a server message carries, validated."""
    if CONFIG not in content.config_records:
        raise ValueError(f"message has no '{CONFIG}' record; was it sent by a fedelta server?")
    flat = dict(content.config_records[CONFIG])
    server_round = int(flat.pop(ROUND_KEY, 0))
    return RunConfig.from_flat(flat), server_round
