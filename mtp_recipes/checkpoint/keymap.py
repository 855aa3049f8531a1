"""Names inside :class:`~mtp_recipes.model.MTPModel` <-> transformers' in-memory HF names.

Backbone tensors keep their HF names under ``backbone.``; MTP tensors are renamed by the family's
prefix table (e.g. Nemotron-H ``mtp.depths.0.blocks.1.`` <-> ``mtp.layers.1.``). Longest prefix wins in
both directions, so ``mtp.layers.0.enorm.`` is not mistaken for a block prefix ``mtp.layers.0.``.
"""

from __future__ import annotations

BACKBONE = "backbone."


class KeyMap:
    """A bidirectional prefix table between model-internal and HF names."""

    def __init__(self, mtp_prefixes: list[tuple[str, str]]) -> None:
        self._to_hf = sorted(mtp_prefixes, key=lambda p: len(p[0]), reverse=True)
        self._from_hf = sorted(mtp_prefixes, key=lambda p: len(p[1]), reverse=True)
        self.mtp_hf_prefixes = tuple(hf for _, hf in mtp_prefixes)

    def to_hf(self, key: str) -> str:
        for internal, hf in self._to_hf:
            if key.startswith(internal):
                return hf + key[len(internal) :]
        if key.startswith(BACKBONE):
            return key[len(BACKBONE) :]
        raise KeyError(f"{key} is neither a backbone nor a known MTP tensor")

    def from_hf(self, key: str) -> str:
        for internal, hf in self._from_hf:
            if key.startswith(hf):
                return internal + key[len(hf) :]
        return BACKBONE + key

    def is_mtp(self, hf_key: str) -> bool:
        return hf_key.startswith(self.mtp_hf_prefixes)
