"""Corpus downloaders and Hugging Face dataset sources, against local dirs with the Hub schema (no network)."""

import csv
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from training.data.corpora import CORPORA, CorpusPart, download_corpus, main, split_files
from training.data.prepare import prepare
from training.data.shards import ShardSet
from training.data.sources import SourceError, builtin_dir, iter_hub, iter_records

SPLITS = ("train", "valid", "test")


@pytest.fixture(scope="module")
def proteins() -> dict:
    """Real proteins (aaanalysis SEQ_DISULFIDE benchmark), 30/6/6 per split."""
    with open(builtin_dir() / "SEQ_DISULFIDE.tsv", encoding="utf-8") as f:
        seqs = [r["sequence"] for r in list(csv.DictReader(f, delimiter="\t"))[:42]]
    return {"train": seqs[:30], "valid": seqs[30:36], "test": seqs[36:42]}


@pytest.fixture(scope="module")
def hub_layout(tmp_path_factory, proteins):
    """A directory laid out like a pushed Hub dataset: data/<split>-0000i-of-0000n.parquet, `sequence` column."""
    root = tmp_path_factory.mktemp("hub_like")
    (root / "data").mkdir()
    for split, seqs in proteins.items():
        parts = [seqs[: len(seqs) // 2], seqs[len(seqs) // 2 :]]
        for i, part in enumerate(parts):
            pq.write_table(pa.table({"sequence": part}), root / "data" / f"{split}-{i:05d}-of-00002.parquet")
    return root


@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory, proteins):
    """A DatasetDict saved with `save_to_disk` (arrow files per split)."""
    root = tmp_path_factory.mktemp("saved")
    dd = datasets.DatasetDict({s: datasets.Dataset.from_dict({"sequence": v}) for s, v in proteins.items()})
    dd.save_to_disk(str(root))
    return root


def test_known_corpora_fetch_their_hub_repo(tmp_path, hub_layout, monkeypatch):
    """Each short name, without `source`, reads the Hub dataset repo the README names (the filesystem is redirected
    to a local copy: no network) and records that id in corpus.json."""
    from training.data import corpora

    opened = []
    real_filesystem = corpora._filesystem

    def hub_as_local(source, revision):
        opened.append(source)
        return real_filesystem(str(hub_layout), revision)

    monkeypatch.setattr(corpora, "_filesystem", hub_as_local)
    expected = {"omg_prot50": "Synthyra/omg_prot50", "uniref50": "Synthyra/uniref50", "og_prot90": "Synthyra/og_prot90"}
    assert set(CORPORA) == set(expected)
    for name, hub_id in expected.items():
        opened.clear()
        out = tmp_path / name
        download_corpus(name, out, CorpusPart(splits=("valid",), max_shards=1), log=lambda *a: None)
        assert opened == [hub_id]
        assert json.loads((out / "corpus.json").read_text())["hub_id"] == hub_id


def test_download_everything_then_prepare(tmp_path, hub_layout, proteins):
    files = download_corpus("omg_prot50", tmp_path / "raw", source=str(hub_layout), log=lambda *a: None)
    assert {s: len(f) for s, f in files.items()} == {"train": 2, "valid": 2, "test": 2}
    info = json.loads((tmp_path / "raw" / "corpus.json").read_text())
    assert info["hub_id"] == "Synthyra/omg_prot50" and info["splits"]["train"]["rows"] == 30
    for split in SPLITS:
        report = prepare([str(tmp_path / "raw" / split)], tmp_path / "shards" / split, log=lambda *a: None)
        assert report["read"] == len(proteins[split])  # (one test protein holds a '!' and is rejected)
        assert report["accepted"] == ShardSet(tmp_path / "shards" / split).num_docs >= len(proteins[split]) - 1


def test_fetch_less_by_shards_and_by_sequences(tmp_path, hub_layout):
    first_shard = CorpusPart(max_shards=1)
    files = download_corpus("uniref50", tmp_path / "a", first_shard, source=str(hub_layout), log=lambda *a: None)
    assert all(len(f) == 1 and f[0].name.endswith("00000-of-00002.parquet") for f in files.values())
    part = CorpusPart(splits=("train", "valid"), max_sequences=20)
    files = download_corpus("og_prot90", tmp_path / "b", part, source=str(hub_layout), log=lambda *a: None)
    assert pq.read_table(files["train"][0]).num_rows == 20  # spans both train shards (15 + 5)
    assert pq.read_table(files["valid"][0]).num_rows == 6  # the split has only 6
    assert not (tmp_path / "b" / "test").exists()


def test_download_from_save_to_disk_dir_and_cli(tmp_path, saved_dataset, capsys):
    rc = main(
        [
            "download",
            "omg_prot50",
            "--out",
            str(tmp_path / "raw"),
            "--source",
            str(saved_dataset),
            "--max-sequences",
            "5",
            "--prepare",
            str(tmp_path / "shards"),
        ]
    )
    assert rc == 0
    for split in SPLITS:
        assert ShardSet(tmp_path / "shards" / split).num_docs == 5
    (tmp_path / "empty").mkdir()
    assert main(["download", "omg_prot50", "--out", str(tmp_path / "x"), "--source", str(tmp_path / "empty")]) == 1
    assert "no files for split 'train'" in capsys.readouterr().err


def test_wrong_schema_is_named(tmp_path):
    (tmp_path / "data").mkdir()
    bad = tmp_path / "data" / "train-00000-of-00001.parquet"
    pq.write_table(pa.table({"seq": ["MKV"]}), bad)
    with pytest.raises(SourceError, match=f"{bad}: no 'sequence' column"):
        download_corpus("x", tmp_path / "out", CorpusPart(splits=("train",)), source=str(tmp_path), log=lambda *a: None)
    assert split_files(str(tmp_path), "train")[1] == [str(bad)]


def test_dataset_dirs_as_prepare_inputs(hub_layout, saved_dataset, proteins):
    def seqs(source, split):
        return [r.seq.decode() for r in iter_records(source, split=split)]

    assert seqs(str(saved_dataset), "valid") == proteins["valid"]  # save_to_disk DatasetDict + split
    assert seqs(str(saved_dataset / "test"), None) == proteins["test"]  # a saved Dataset
    assert seqs(str(hub_layout), "train") == proteins["train"]  # dir of parquet files, split by file name
    with pytest.raises(SourceError, match="several splits"):
        seqs(str(hub_layout), None)
    with pytest.raises(SourceError, match="choose one with --split"):
        seqs(str(saved_dataset), None)


def test_hub_streaming_path_on_a_local_dataset(hub_layout, proteins):
    # iter_hub is what a Hub id ("owner/name") goes through; load_dataset accepts a local dir the same way
    records = list(iter_hub(str(hub_layout), "test"))
    assert [r.seq.decode() for r in records] == proteins["test"]
    assert [r.line for r in records] == list(range(1, 7)) and records[0].id == "row1"
