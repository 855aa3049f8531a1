"""Where a multimodal checkpoint keeps the language model: the one name mapping between its on-disk keys and the
text model's, and which keys belong to the other towers (copied through verbatim, never loaded).

MiniMax-M3's VL checkpoint nests the whole language model under ``language_model.``. Qwen3.5's nests only the
decoder (``model.language_model.`` is the text model's ``model.``) and keeps ``lm_head.`` and ``mtp.`` at the root.
A text-only checkpoint is the identity nesting, :data:`TEXT`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Nesting:
    """On disk, keys under ``disk`` are the text model's keys under ``memory``; keys outside ``disk`` that start with
    one of ``root`` are the text model's under the same name; every other key is another tower's."""

    disk: str = ""
    memory: str = ""
    root: tuple[str, ...] = ()

    def to_memory(self, disk_key: str) -> str | None:
        """The text model's name for ``disk_key``; ``None`` for another tower's key."""
        if disk_key.startswith(self.disk):
            return self.memory + disk_key[len(self.disk) :]
        return disk_key if disk_key.startswith(self.root) else None

    def to_disk(self, key: str) -> str:
        """The on-disk name of the text model's ``key`` (the inverse of :meth:`to_memory`)."""
        if self.root and key.startswith(self.root):
            return key
        if not key.startswith(self.memory):
            raise ValueError(f"{key!r} is neither under {self.memory!r} nor under one of {self.root}")
        return self.disk + key[len(self.memory) :]

    def as_json(self) -> dict[str, Any]:
        return {"disk": self.disk, "memory": self.memory, "root": list(self.root)}

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> Nesting:
        return cls(saved["disk"], saved["memory"], tuple(saved["root"]))


TEXT = Nesting()


def find_nesting(candidates: Iterable[Nesting], disk_keys: Iterable[str]) -> Nesting:
    """The first of ``candidates`` whose ``disk`` prefix some key has; :data:`TEXT` when none has."""
    keys = list(disk_keys)
    return next((n for n in candidates if any(k.startswith(n.disk) for k in keys)), TEXT)
