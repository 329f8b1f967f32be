from collections import Counter

import pytest

from fedelta.config import DataConfig
from fedelta.data import (
    ClientData,
    DataError,
    _client_data,
    _partitioner,
    load_client_data,
    load_corpus,
    load_site_data,
    write_site_files,
)


def test_rotten_tomatoes_is_reviews_only_with_a_held_out_split():
    corpus = load_corpus(DataConfig(), seed=42)
    assert corpus.label_names == ("fresh", "rotten")
    assert len(corpus.test) == 1000
    assert len(corpus.pool) + len(corpus.test) == 12808  # 7403 fresh + 5405 rotten, no plots


def _rows(data: ClientData) -> Counter[tuple[str, int]]:
    """The (text, label) rows of a site, train and validation together."""
    splits = (data.train, data.validation)
    return Counter(
        row for split in splits for row in zip(split["text"], split["label"], strict=True)
    )


def test_partitions_are_disjoint_cover_the_pool_and_are_seeded():
    config = DataConfig(test_size=500)
    parts = [load_client_data(config, 1, 4, i) for i in range(4)]
    pool = load_corpus(config, 1).pool
    pool_rows = Counter(zip(pool["text"], pool["label"], strict=True))
    # As multisets (the corpus repeats a few reviews): each pool row is in exactly one
    # site, and there in train or validation, not both.
    assert sum((_rows(p) for p in parts), Counter()) == pool_rows
    assert all(len(p.validation) >= 1 for p in parts)
    # Seeded: partitioned anew (not taken from the per-process cache), the same split.
    _client_data.cache_clear()
    _partitioner.cache_clear()
    again = load_client_data(config, 1, 4, 2)
    assert list(again.train["text"]) == list(parts[2].train["text"])
    assert list(again.validation["text"]) == list(parts[2].validation["text"])
    # Another seed, another split: most reviews land on another site than before (the
    # same split would keep all of them; seeds 1 and 7 keep about a quarter).
    stays = sum(
        len(set(load_client_data(config, 7, 4, i).train["text"]) & set(p.train["text"]))
        for i, p in enumerate(parts)
    )
    assert stays < 0.5 * sum(len(p.train) for p in parts)


def test_dirichlet_skews_labels_iid_does_not():
    def skew(kind: str) -> float:
        config = DataConfig(test_size=500, partitioner=kind, dirichlet_alpha=0.1)
        shares = []
        for i in range(4):
            labels = load_client_data(config, 3, 4, i).train["label"]
            shares.append(sum(labels) / len(labels))
        return max(shares) - min(shares)

    assert skew("dirichlet") > 0.3 > 0.1 > skew("iid")


def _csv(tmp_path, text: str):
    path = tmp_path / "data.csv"
    path.write_text(text)
    return str(path)


def test_local_csv_with_own_columns(tmp_path):
    rows = "\n".join(f"sentence {i},{'pos' if i % 2 else 'neg'}" for i in range(40))
    name = _csv(tmp_path, "sentence,polarity\n" + rows)
    config = DataConfig(name=name, text_column="sentence", label_column="polarity", test_size=10)
    corpus = load_corpus(config, 0)
    assert corpus.label_names == ("neg", "pos") and len(corpus.pool) == 30


@pytest.mark.parametrize(
    ("content", "columns", "message"),
    [
        (None, {}, "does not exist"),
        ("", {}, "is empty"),
        ("text,label\n", {}, "has no usable rows"),
        ("text,label\n,pos\n  ,neg\n", {}, "has no usable rows"),
        ("\x00\x01\x02garbage\n\x00,\n", {}, "could not read data file|has no column"),
        ("text,stars\nhello,1\n", {}, "has no column 'label'"),
        ("text,label\n" + "a,x\n" * 30, {}, "fewer than 2 distinct labels"),
    ],
)
def test_bad_data_files_are_clear_errors(tmp_path, content, columns, message):
    name = str(tmp_path / "missing.csv") if content is None else _csv(tmp_path, content)
    with pytest.raises(DataError, match=message):
        load_corpus(DataConfig(name=name, test_size=2, **columns), 0)


def test_unsupported_file_type_and_too_many_clients(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_text("x")
    with pytest.raises(DataError, match="unsupported type"):
        load_corpus(DataConfig(name=str(path)), 0)
    rows = "".join(f"t{i},{i % 2}\n" for i in range(12))
    config = DataConfig(name=_csv(tmp_path, "text,label\n" + rows), test_size=2)
    with pytest.raises(DataError, match=r"more clients \(20\) than training examples \(10\)"):
        load_client_data(config, 0, 20, 0)


def test_site_files_hold_each_partition_and_read_back_with_the_federation_labels(tmp_path):
    config = DataConfig(test_size=500)
    paths = write_site_files(config, 7, 3, tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        f"site-{i}/train.csv" for i in range(3)
    ]
    labeled = DataConfig(test_size=500, labels="fresh,rotten")
    for i, path in enumerate(paths):
        part = load_client_data(config, 7, 3, i)
        site = load_site_data(path, labeled, seed=11)

        def rows(data):
            both = [data.train, data.validation]
            return sorted((row["text"], row["label"]) for split in both for row in split)

        assert rows(site) == rows(part)  # same examples, same class ids
    held_out = set(load_corpus(config, 7).test["text"])
    assert not held_out & set(load_site_data(paths[0], labeled, 11).train["text"])


def test_site_labels_follow_data_labels_not_the_file(tmp_path):
    path = _csv(tmp_path, "text,label\na,neg\nb,pos\nc,pos\nd,pos\n")
    data = load_site_data(path, DataConfig(labels="pos,neg", validation_fraction=0.0), 0)
    assert dict(zip(data.train["text"], data.train["label"], strict=True)) == {
        "a": 1,
        "b": 0,
        "c": 0,
        "d": 0,
    }
    with pytest.raises(DataError, match=r"labels \['maybe'\] that are not among"):
        load_site_data(
            _csv(tmp_path, "text,label\na,pos\nb,maybe\n"), DataConfig(labels="pos,neg"), 0
        )
    with pytest.raises(DataError, match="needs the federation's label names"):
        load_site_data(path, DataConfig(), 0)
    with pytest.raises(DataError, match="does not exist"):
        load_site_data(tmp_path / "missing.csv", DataConfig(labels="pos,neg"), 0)
