"""The message schema between fedelta's ServerApp and ClientApp.

Every message from the server carries the full run config as a ``ConfigRecord``,
so a ClientApp needs nothing but its node config (which partition or data file is
its own) to act, however it was launched: ``fedelta simulate``, ``flwr run`` or a
SuperNode on a remote site.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, RecordDict

from fedelta.config import RunConfig

GLOBAL = "global"
"""ArrayRecord: the global trainable state (server to client)."""
DELTA = "delta"
"""ArrayRecord: trained minus received trainable state (client to server)."""
CONFIG = "config"
"""ConfigRecord: the run config plus the round number (server to client)."""
STRATEGY = "strategy"
"""ConfigRecord: what the strategy asks of clients this round, if anything (server to client)."""
METRICS = "metrics"
"""MetricRecord: num-examples, losses, accuracy (client to server)."""
SITE = "site"
"""ConfigRecord: who a node is (client to server, answering a query)."""

ROUND_KEY = "server-round"
NUM_EXAMPLES = "num-examples"

# Node-config keys a SuperNode is started with (Flower's own names in simulation).
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
SITE_NAME = "site-name"


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
