"""Federation data: load a corpus, hold out a test split, partition clients.

A corpus is labelled text (``text``/``label``: the built-in Rotten Tomatoes
corpus or a local CSV/JSON/JSONL/Parquet file) or chats (``messages``/``topic``,
:mod:`fedelta.chat_data`: the built-in chatterbot corpus or a local file of chats
or instruction/response pairs); a file says which by its columns. The held-out test split
is taken before partitioning, so the server's central evaluation never sees a
client's examples. Partitions come from flwr-datasets' partitioners, seeded, so
every process (server, each simulated or deployed client) derives the same split
from the same config without exchanging data.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    GroupedNaturalIdPartitioner,
    IidPartitioner,
    Partitioner,
)
from torch.utils.data import DataLoader

from fedelta.assets import CHAT_CORPORA, CORPORA
from fedelta.chat_data import (
    MESSAGES,
    TOPIC,
    ChatDataError,
    is_chat_table,
    normalise_chats,
    read_chatterbot,
)
from fedelta.config import DataConfig
from fedelta.errors import UserError

TEXT, LABEL = "text", "label"
"""Column names every loaded corpus is normalised to."""

PARTITIONERS = ("iid", "dirichlet", "topic")
"""What ``data.partitioner`` may name: flwr-datasets' IID, Dirichlet (label skew) and
grouped natural-id (whole chat topics per site) partitioners."""
_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_COMPRESSION = (".bz2", ".gz", ".xz", ".zst")

# Rotten Tomatoes ships review snippets ("fresh"/"rotten") mixed with plot summaries.
_BUILTIN_LABEL_COLUMN = {"rotten-tomatoes": "category"}
_BUILTIN_DROP_LABELS = {"rotten-tomatoes": ("plot",)}


class DataError(UserError, ValueError):
    """The data source cannot be used: missing, unreadable, empty or malformed."""


@dataclass(frozen=True)
class Corpus:
    """Examples available to clients, the server's held-out test split, label names."""

    pool: datasets.Dataset
    test: datasets.Dataset
    label_names: tuple[str, ...]
    """Class names in id order; empty for chats."""

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclass(frozen=True)
class ClientData:
    """One client's local training and validation examples."""

    train: datasets.Dataset
    validation: datasets.Dataset


def load_corpus(config: DataConfig, seed: int) -> Corpus:
    """Load, normalise and split the corpus; cached per process."""
    return _load_corpus_cached(
        config.name,
        config.text_column,
        config.label_column,
        config.test_size,
        seed,
        config.label_list(),
    )


def label_names(config: DataConfig, seed: int) -> tuple[str, ...]:
    """The federation's label names in class-id order: ``data.labels``, else the corpus's."""
    return config.label_list() or load_corpus(config, seed).label_names


@functools.lru_cache(maxsize=4)
def _load_corpus_cached(
    name: str,
    text_column: str,
    label_column: str,
    test_size: int,
    seed: int,
    labels: tuple[str, ...],
) -> Corpus:
    _quiet_datasets()
    if name in CHAT_CORPORA:
        return _chat_corpus(read_chatterbot(CHAT_CORPORA[name].path()), name, test_size, seed)
    if name in CORPORA:
        path = CORPORA[name].path()
        table = _read_table(path)
        table = table.rename_column(_BUILTIN_LABEL_COLUMN[name], label_column)
        dropped = _BUILTIN_DROP_LABELS.get(name, ())
        table = table.filter(lambda row: row[label_column] not in dropped)
    else:
        path = Path(name).expanduser()
        if not path.is_file():
            known = ", ".join(sorted(CORPORA | CHAT_CORPORA))
            raise DataError(
                f"data file '{path}' does not exist (data.name takes a file path "
                f"or a built-in corpus: {known})"
            )
        table = _read_table(path)
        if is_chat_table(table):
            return _chat_corpus(_chats(table, path), str(path), test_size, seed)
    table = _normalise(table, path, text_column, label_column, labels)
    if test_size >= len(table):
        raise DataError(
            f"data.test-size ({test_size}) must be smaller than the {len(table)} "
            f"usable examples in '{path}'"
        )
    split = table.train_test_split(test_size=test_size, seed=seed, stratify_by_column=LABEL)
    return Corpus(
        pool=split["train"], test=split["test"], label_names=tuple(table.features[LABEL].names)
    )


def _chat_corpus(table: datasets.Dataset, source: str, test_size: int, seed: int) -> Corpus:
    if test_size >= len(table):
        raise DataError(
            f"data.test-size ({test_size}) must be smaller than the {len(table)} chats "
            f"in '{source}'"
        )
    # Not stratified by topic: small topics (one chat) cannot be.
    split = table.train_test_split(test_size=test_size, seed=seed)
    return Corpus(pool=split["train"], test=split["test"], label_names=())


def _chats(table: datasets.Dataset, source: str | Path) -> datasets.Dataset:
    try:
        return normalise_chats(table, source)
    except ChatDataError as err:
        raise DataError(str(err)) from err


def load_site_data(path: str | Path, config: DataConfig, seed: int) -> ClientData:
    """A site's own data file, its labels mapped to the federation's ``data.labels``.

    This is what a deployed SuperNode trains on when its node config names a
    ``data-path``: the whole file is the site's, split into train and validation.
    """
    return _site_data(str(Path(path).expanduser()), dataclasses.astuple(config), seed)


@functools.lru_cache(maxsize=2)
def _site_data(path: str, config_fields: tuple, seed: int) -> ClientData:
    config = DataConfig(*config_fields)
    if not Path(path).is_file():
        raise DataError(f"site data file '{path}' does not exist (node config 'data-path')")
    table = _read_table(Path(path))
    if is_chat_table(table):
        return _split_validation(_chats(table, path), config.validation_fraction, seed)
    labels = config.label_list()
    if not labels:
        raise DataError(
            f"site data file '{path}' needs the federation's label names (data.labels); "
            "the server sends them, or set data.labels in the run config"
        )
    table = _normalise(table, path, config.text_column, config.label_column, labels)
    return _split_validation(table, config.validation_fraction, seed)


def _normalise(
    table: datasets.Dataset,
    source: str | Path,
    text_column: str,
    label_column: str,
    labels: tuple[str, ...],
) -> datasets.Dataset:
    """Columns renamed to ``text``/``label``, empty rows dropped, labels encoded as class
    ids: by ``labels`` when given (unknown labels are an error), else sorted."""
    for column in (text_column, label_column):
        if column not in table.column_names:
            raise DataError(
                f"data file '{source}' has no column '{column}' "
                f"(columns: {', '.join(table.column_names)}); "
                "set data.text-column / data.label-column"
            )
    table = table.select_columns([text_column, label_column])
    if text_column != TEXT:
        table = table.rename_column(text_column, TEXT)
    if label_column != LABEL:
        table = table.rename_column(label_column, LABEL)
    table = table.filter(lambda row: isinstance(row[TEXT], str) and row[TEXT].strip() != "")
    table = table.filter(lambda row: row[LABEL] is not None)
    if len(table) == 0:
        raise DataError(f"data file '{source}' has no usable rows (non-empty text and a label)")
    table = table.cast_column(LABEL, datasets.Value("string"))
    if labels:
        unknown = sorted(set(table[LABEL]) - set(labels))
        if unknown:
            raise DataError(
                f"data file '{source}' has labels {unknown} that are not among the "
                f"federation's labels (data.labels = {', '.join(labels)})"
            )
        ids = {name: i for i, name in enumerate(labels)}
        features = table.features.copy()
        features[LABEL] = datasets.ClassLabel(names=list(labels))
        table = table.map(lambda row: {LABEL: ids[row[LABEL]]}, features=features)
    else:
        table = table.class_encode_column(LABEL)
    names = table.features[LABEL].names
    if len(names) < 2:
        raise DataError(f"data file '{source}' has fewer than 2 distinct labels: {names}")
    return table


def _quiet_datasets() -> None:
    """No per-split progress bars or cache notices from ``datasets`` in run logs."""
    datasets.disable_progress_bars()
    logging.getLogger("datasets").setLevel(logging.ERROR)


def _read_table(path: Path) -> datasets.Dataset:
    _quiet_datasets()
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION:
        suffixes = suffixes[:-1]
    builder = _BUILDERS.get(suffixes[-1] if suffixes else "")
    if builder is None:
        raise DataError(
            f"data file '{path}' has an unsupported type; use one of "
            f"{', '.join(sorted(_BUILDERS))} (optionally compressed)"
        )
    kwargs = {"delimiter": "\t"} if suffixes[-1] == ".tsv" else {}
    if path.stat().st_size == 0:
        raise DataError(f"data file '{path}' is empty")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as err:  # datasets raises many types for unreadable files
        if "corresponds to no data" in str(err):  # a header and nothing else
            raise DataError(f"data file '{path}' has no usable rows") from err
        raise DataError(f"could not read data file '{path}': {err}") from err


def load_client_data(
    config: DataConfig, seed: int, num_partitions: int, partition_id: int
) -> ClientData:
    """The examples of one client: its partition, split into train and validation.

    Cached per process: a simulated worker serves the same client in many rounds.
    """
    return _client_data(dataclasses.astuple(config), seed, num_partitions, partition_id)


@functools.lru_cache(maxsize=256)
def _client_data(
    config_fields: tuple, seed: int, num_partitions: int, partition_id: int
) -> ClientData:
    config = DataConfig(*config_fields)
    corpus = load_corpus(config, seed)
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    if len(corpus.pool) < num_partitions:
        raise DataError(
            f"more clients ({num_partitions}) than training examples ({len(corpus.pool)})"
        )
    partitioner = _partitioner(config_fields, seed, num_partitions)
    try:
        part = partitioner.load_partition(partition_id)
    except ValueError as err:  # e.g. Dirichlet cannot meet the minimum size
        hint = ""
        if config.partitioner == "dirichlet":
            hint = (
                f"; data.dirichlet-alpha = {config.dirichlet_alpha:g} leaves some of "
                f"{num_partitions} sites almost empty: raise it (1.0 splits 100 sites of "
                "the built-in corpus) or use data.partitioner = 'iid'"
            )
        raise DataError(
            f"cannot partition the data into {num_partitions} clients: {err}{hint}"
        ) from err
    return _split_validation(part, config.validation_fraction, seed + partition_id)


@functools.lru_cache(maxsize=4)
def _partitioner(config_fields: tuple, seed: int, num_partitions: int) -> Partitioner:
    config = DataConfig(*config_fields)
    pool = load_corpus(config, seed).pool
    partitioner: Partitioner
    if config.partitioner == "iid":
        # IidPartitioner shards contiguously, so shuffle once with the run seed first.
        pool = pool.shuffle(seed=seed)
        partitioner = IidPartitioner(num_partitions=num_partitions)
    elif config.partitioner == "topic":
        partitioner = _topic_partitioner(pool, num_partitions)
    elif config.partitioner == "dirichlet":
        if LABEL not in pool.column_names:
            raise DataError(
                f"data.partitioner = 'dirichlet' skews labels; '{config.name}' has none"
            )
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=LABEL,
            alpha=config.dirichlet_alpha,
            min_partition_size=min(10, len(pool) // num_partitions),
            seed=seed,
        )
    else:
        raise DataError(
            f"data.partitioner must be one of {', '.join(PARTITIONERS)} "
            f"(got {config.partitioner!r})"
        )
    partitioner.dataset = pool
    return partitioner


def _topic_partitioner(pool: datasets.Dataset, num_partitions: int) -> Partitioner:
    """Whole topics per site: the sorted topics cut into ``num_partitions`` groups of
    equal count (flwr-datasets' grouped natural-id partitioner)."""
    if TOPIC not in pool.column_names:
        raise DataError("data.partitioner = 'topic' needs chat data with a 'topic' column")
    topics = sorted(set(pool[TOPIC]))
    if topics == [""]:
        raise DataError("data.partitioner = 'topic' needs chats with a non-empty 'topic'")
    group = -(-len(topics) // num_partitions)
    if -(-len(topics) // group) != num_partitions:
        feasible = sorted({-(-len(topics) // g) for g in range(1, len(topics) + 1)})
        raise DataError(
            f"the {len(topics)} topics cannot be split evenly into {num_partitions} sites; "
            f"choose simulation.num-supernodes among {feasible}"
        )
    return GroupedNaturalIdPartitioner(partition_by=TOPIC, group_size=group, sort_unique_ids=True)


def write_site_files(
    config: DataConfig, seed: int, num_partitions: int, out: Path, prefix: str = "site"
) -> list[Path]:
    """Write client ``i``'s partition to ``out/<prefix>-<i>/train.csv`` with label names
    (chats: ``train.jsonl`` with ``messages`` and ``topic``).

    Rehearses a deployment with one data volume per site: each SuperNode then reads
    only its own file (node config ``data-path``), the server's test split is in
    none of them, and the split is the one ``fedelta simulate`` would use.
    """
    names = load_corpus(config, seed).label_names
    paths = []
    for partition_id in range(num_partitions):
        part = load_client_data(config, seed, num_partitions, partition_id)
        rows = datasets.concatenate_datasets([part.train, part.validation])
        folder = Path(out) / f"{prefix}-{partition_id}"
        folder.mkdir(parents=True, exist_ok=True)
        if MESSAGES in rows.column_names:
            rows.to_json(str(folder / "train.jsonl"), lines=True)
            paths.append(folder / "train.jsonl")
            continue
        frame = rows.to_pandas()
        frame[LABEL] = frame[LABEL].map(names.__getitem__)
        frame = frame.rename(columns={TEXT: config.text_column, LABEL: config.label_column})
        path = folder / "train.csv"
        frame.to_csv(path, index=False)
        paths.append(path)
    return paths


def _split_validation(part: datasets.Dataset, fraction: float, seed: int) -> ClientData:
    num_val = round(fraction * len(part)) if len(part) > 1 else 0
    if fraction > 0 and len(part) > 1:
        num_val = min(max(num_val, 1), len(part) - 1)
    shuffled = part.shuffle(seed=seed)
    return ClientData(
        train=shuffled.select(range(num_val, len(part))),
        validation=shuffled.select(range(num_val)),
    )


def cycle(loader: DataLoader, steps: int) -> Iterator[dict[str, torch.Tensor]]:
    """Exactly ``steps`` batches, reshuffling at each pass over the data."""
    if len(loader) == 0:
        raise DataError("cannot train on an empty dataset")
    done = 0
    while done < steps:
        for batch in loader:
            yield batch
            done += 1
            if done == steps:
                return
