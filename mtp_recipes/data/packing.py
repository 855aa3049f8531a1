"""Pack token documents into fixed-length rows that follow the batch contract (spec §1).

Each row holds ``input_ids``, ``labels`` (already shifted: ``labels[t]`` is the next token
of the same document, -100 where nothing is learnt), ``position_ids`` restarting at 0 in
every segment and ``seq_idx`` numbering the segments of the row 0, 1, 2, ... Trailing
padding is one more segment (its own ``seq_idx``, pad ids, label -100, positions 0..).

**Decision — documents longer than a row** are split into pieces of at most ``seq_len``
tokens and never dropped. Each piece is its own segment (own ``seq_idx``, positions
restart at 0), so nothing attends across a piece boundary. Labels are computed on the
whole document *before* splitting, so the label in a piece's last slot is the true next
token (the first token of the next piece) when that token is a target: no supervision is
lost, and only the document's real end gets -100. MTP depths never look past a segment
end (spec §3), so they lose only the few targets that would cross the cut.

Strategies:

- ``greedy``: segments in order; a new row starts when the next segment does not fit.
- ``first_fit``: first-fit decreasing within buffers of ``buffer_size`` segments (a
  segment goes to the first row with room, longest first): far less padding than greedy.
  A max-tree over row capacities finds that row in O(log rows).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import DataError
from .formats import Document

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
PACKING_STRATEGIES = ("greedy", "first_fit")


@dataclass(frozen=True)
class PackingStats:
    """How well documents filled the rows; ``efficiency`` = real tokens / row capacity."""

    seq_len: int
    rows: int
    documents: int
    real_tokens: int
    padding_tokens: int
    split_documents: int

    @property
    def efficiency(self) -> float:
        return self.real_tokens / (self.rows * self.seq_len) if self.rows else 0.0


@dataclass(frozen=True)
class PackedRows:
    """All packed rows as ``[rows, seq_len]`` tensors (``seq_idx`` int32, the rest int64)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    seq_idx: torch.Tensor
    stats: PackingStats


@dataclass(frozen=True)
class _Segment:
    input_ids: list[int]
    labels: list[int]


def pack_documents(
    documents: Sequence[Document],
    seq_len: int,
    pad_id: int,
    strategy: str = "greedy",
    buffer_size: int = 8192,
) -> PackedRows:
    """Pack ``documents`` into rows of ``seq_len`` with ``strategy`` (see module docstring)."""
    if strategy not in PACKING_STRATEGIES:
        raise DataError(f"data.packing={strategy!r}; choose one of {PACKING_STRATEGIES}")
    if seq_len < 1 or buffer_size < 1:
        raise DataError(f"seq_len ({seq_len}) and buffer_size ({buffer_size}) must be positive")
    segments: list[_Segment] = []
    split_documents = 0
    for doc in documents:
        pieces = _split(doc, seq_len)
        split_documents += len(pieces) > 1
        segments.extend(pieces)
    if not segments:
        raise DataError("no tokens to pack: every document is empty")
    lengths = [len(s.input_ids) for s in segments]
    rows = _greedy(lengths, seq_len) if strategy == "greedy" else _first_fit(lengths, seq_len, buffer_size)
    packed = _materialise(segments, rows, seq_len, pad_id)
    real_tokens = sum(lengths)
    stats = PackingStats(
        seq_len=seq_len,
        rows=len(rows),
        documents=len(documents),
        real_tokens=real_tokens,
        padding_tokens=len(rows) * seq_len - real_tokens,
        split_documents=split_documents,
    )
    logger.info(
        "packed %d documents (%d split) into %d rows of %d with %s: %d tokens, %d padding, efficiency %.1f%%",
        stats.documents,
        stats.split_documents,
        stats.rows,
        seq_len,
        strategy,
        stats.real_tokens,
        stats.padding_tokens,
        100 * stats.efficiency,
    )
    return PackedRows(*packed, stats=stats)


def _split(doc: Document, seq_len: int) -> list[_Segment]:
    """Shift labels over the whole document, then cut it into pieces of at most seq_len."""
    ids = doc.input_ids
    labels = [ids[t + 1] if doc.trainable[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)]
    labels.append(IGNORE_INDEX)
    return [_Segment(ids[i : i + seq_len], labels[i : i + seq_len]) for i in range(0, len(ids), seq_len)]


def _greedy(lengths: list[int], seq_len: int) -> list[list[int]]:
    rows: list[list[int]] = []
    free = 0
    for index, length in enumerate(lengths):
        if length > free:
            rows.append([])
            free = seq_len
        rows[-1].append(index)
        free -= length
    return rows


def _first_fit(lengths: list[int], seq_len: int, buffer_size: int) -> list[list[int]]:
    rows: list[list[int]] = []
    for start in range(0, len(lengths), buffer_size):
        buffer = range(start, min(start + buffer_size, len(lengths)))
        tree = _CapacityTree(len(buffer), seq_len)
        buffer_rows: list[list[int]] = []
        for index in sorted(buffer, key=lambda i: -lengths[i]):
            row = tree.place(lengths[index])
            if row == len(buffer_rows):
                buffer_rows.append([])
            buffer_rows[row].append(index)
        rows.extend(buffer_rows)
    return rows


class _CapacityTree:
    """Max-tree over the free space of ``n`` rows; unopened rows have full capacity, so the
    leftmost row with room is an open one when one fits, else the next fresh row."""

    def __init__(self, n: int, capacity: int) -> None:
        self.size = 1 << max(n - 1, 0).bit_length()
        self.free = [capacity] * (2 * self.size)

    def place(self, length: int) -> int:
        node = 1
        while node < self.size:
            node = 2 * node if self.free[2 * node] >= length else 2 * node + 1
        self.free[node] -= length
        row = node - self.size
        node //= 2
        while node:
            self.free[node] = max(self.free[2 * node], self.free[2 * node + 1])
            node //= 2
        return row


def _materialise(
    segments: list[_Segment], rows: list[list[int]], seq_len: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    input_ids, labels, position_ids, seq_idx = [], [], [], []
    for row in rows:
        ids, labs, pos, sid = [], [], [], []
        for k, index in enumerate(row):
            segment = segments[index]
            ids += segment.input_ids
            labs += segment.labels
            pos += range(len(segment.input_ids))
            sid += [k] * len(segment.input_ids)
        pad = seq_len - len(ids)
        ids += [pad_id] * pad
        labs += [IGNORE_INDEX] * pad
        pos += range(pad)
        sid += [len(row)] * pad
        input_ids.append(ids)
        labels.append(labs)
        position_ids.append(pos)
        seq_idx.append(sid)
    return (
        torch.tensor(input_ids, dtype=torch.long),
        torch.tensor(labels, dtype=torch.long),
        torch.tensor(position_ids, dtype=torch.long),
        torch.tensor(seq_idx, dtype=torch.int32),
    )
