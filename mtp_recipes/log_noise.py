"""Library log lines a user cannot act on, held back while the block that provokes them runs.

Examples: datasets logging a JSON parse error that the data source's own one-line error then reports with its
file and line; transformers advising, on CPU, to install CUDA-only kernels.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet(logger_name: str, when: bool = True) -> Iterator[None]:
    """Hold the records of one logger below CRITICAL while the block runs (when ``when``); its level is restored."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    if when:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
