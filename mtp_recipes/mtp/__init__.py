"""The family-independent MTP core: config (``config``, importable without torch), boundary-aware roll
(``roll``), depths and stack (``stack``)."""
