"""Checks that fail before anything trains: a run's config, model, data and partition."""

from __future__ import annotations

from fedelta.build import model_spec
from fedelta.compatibility import check_config
from fedelta.config import RunConfig
from fedelta.data import load_client_data, load_corpus
from fedelta.models import cached_model, resolve_model_path
from fedelta.tasks import build_task


def preflight(config: RunConfig) -> None:
    """Fail before the first round (and before Ray starts) if the config, the model,
    the data or the partitioning cannot work."""
    check_config(config)
    resolve_model_path(config.model.name)  # even when this process has the model cached
    corpus = load_corpus(config.data, config.seed)
    task = build_task(config)
    task.check_data(corpus.test, f"data '{config.data.name}'")
    check_partitioning(config)
    # Also checks that lora.target-modules fit the model; the server reuses this build.
    cached_model(model_spec(config, corpus.num_labels))


def check_partitioning(config: RunConfig) -> None:
    """Split the data over ``simulation.num-supernodes`` sites under ``config.seed``:
    a Dirichlet draw that leaves a site nearly empty raises ``DataError`` here, not
    when that site first trains (flwr-datasets partitions every site at once)."""
    load_client_data(config.data, config.seed, config.simulation.num_supernodes, 0)
