"""What one client does with the global state: train locally, or evaluate it.

The model is the process-wide cached one; only its trainable tensors are reset
from the server's state, so successive rounds (and successive simulated clients
in the same worker process) pay for model construction once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from flwr.app import UserConfigValue

from fedelta import deltas
from fedelta.config import RunConfig
from fedelta.data import ClientData, cycle, load_client_data, load_corpus, make_loader
from fedelta.models import (
    ModelSpec,
    TensorDict,
    cached_model,
    load_trainable_state,
    trainable_layout,
    trainable_state,
)
from fedelta.protocol import NUM_PARTITIONS, PARTITION_ID, SITE_NAME
from fedelta.training import (
    EvalResult,
    TrainResult,
    derive_seed,
    evaluate,
    seed_everything,
    steps_for,
    train,
)


class NodeConfigError(ValueError):
    """The SuperNode was started without saying which data is its own."""


@dataclass(frozen=True)
class Site:
    """Which slice of the data this node holds, and the name it reports under."""

    partition_id: int
    num_partitions: int
    name: str

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, UserConfigValue]) -> Site:
        try:
            partition_id = int(node_config[PARTITION_ID])
            num_partitions = int(node_config[NUM_PARTITIONS])
        except KeyError as err:
            raise NodeConfigError(
                f"node config lacks {err}; start the SuperNode with "
                f'--node-config "{PARTITION_ID}=0 {NUM_PARTITIONS}=N"'
            ) from None
        except (TypeError, ValueError) as err:
            raise NodeConfigError(
                f"node config '{PARTITION_ID}'/'{NUM_PARTITIONS}': {err}"
            ) from None
        name = str(node_config.get(SITE_NAME, f"client-{partition_id}"))
        return cls(partition_id=partition_id, num_partitions=num_partitions, name=name)


class ClientTrainer:
    """Local training and evaluation for one site under one run config."""

    def __init__(self, config: RunConfig, site: Site) -> None:
        self.config = config
        self.site = site
        corpus = load_corpus(config.data, config.seed)
        spec = ModelSpec.from_config(config, corpus.num_labels)
        built = cached_model(spec)
        self.model, self.tokenizer = built.model, built.tokenizer
        self.data: ClientData = load_client_data(
            config.data, config.seed, site.num_partitions, site.partition_id
        )

    @property
    def layout(self) -> dict[str, tuple[int, ...]]:
        return trainable_layout(self.model)

    def fit(self, global_state: TensorDict, server_round: int) -> tuple[TensorDict, TrainResult]:
        """Train from ``global_state``; return the delta and what training saw."""
        cfg = self.config
        seed = derive_seed(cfg.seed, server_round, self.site.partition_id)
        seed_everything(seed)
        load_trainable_state(self.model, global_state)
        loader = make_loader(
            self.data.train, self.tokenizer, cfg.model.max_length, cfg.batch_size, True, seed
        )
        steps = steps_for(len(self.data.train), cfg.batch_size, cfg.local_epochs, cfg.local_steps)
        result = train(self.model, cycle(loader, steps), lr=cfg.lr, weight_decay=cfg.weight_decay)
        return deltas.subtract(trainable_state(self.model), global_state), result

    def evaluate(self, global_state: TensorDict) -> EvalResult:
        load_trainable_state(self.model, global_state)
        loader = make_loader(
            self.data.validation, self.tokenizer, self.config.model.max_length, 64, False
        )
        return evaluate(self.model, loader)
