"""Tokenizer loading, including the bundled offline ``builtin:debug`` tokenizer.

Only fast (Rust-backed) tokenizers are accepted: chat masking needs character offsets.
Remote code stays off unless the caller opts in, because a tokenizer name from a config
file must not be able to run arbitrary code.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ..checkpoint.locate import resolve_model_dir
from ..errors import ConfigError, DataError

logger = logging.getLogger(__name__)

DEBUG_TOKENIZER = "builtin:debug"
DEBUG_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "debug_tokenizer"


def tokenizer_dir(name_or_path: str | None) -> str:
    """Where a tokenizer name points (a directory or a Hub id): None, "" and ``builtin:debug`` are the bundled
    debug tokenizer's directory, which other programs (a serving engine) can load too."""
    return str(DEBUG_TOKENIZER_DIR) if not name_or_path or name_or_path == DEBUG_TOKENIZER else name_or_path


def load_tokenizer(name_or_path: str | None, trust_remote_code: bool = False) -> PreTrainedTokenizerFast:
    """Load a fast tokenizer; None, "" and ``builtin:debug`` give the bundled debug tokenizer.

    A tokenizer without a pad token gets its EOS token as pad: packing only needs some
    valid id there, since padded slots carry label -100.
    """
    name_or_path = tokenizer_dir(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"could not load the tokenizer {name_or_path!r} ({reason}); set model.tokenizer to a directory "
            "with tokenizer.json, or builtin:debug for the debug models"
        ) from None
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise DataError(
            f"tokenizer {name_or_path!r} loaded as {type(tokenizer).__name__}, not a fast tokenizer; "
            "provide a tokenizer.json (chat masking needs character offsets)"
        )
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {name_or_path!r} has no eos_token; documents need an end marker")
    if tokenizer.pad_token_id is None:
        logger.info("tokenizer %s has no pad token; using eos %r", name_or_path, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_location(model: Any) -> str:
    """The tokenizer of a run's ``model`` section: ``model.tokenizer``, else the checkpoint's own directory."""
    if model.tokenizer is None:
        if model.path is None:
            raise ConfigError("model.tokenizer is required for a model built from scratch (e.g. builtin:debug)")
        return str(resolve_model_dir(model.path))
    return tokenizer_dir(model.tokenizer)


def check_vocab(tokenizer: PreTrainedTokenizerFast, vocab_size: int) -> None:
    """One ConfigError line when the tokenizer has ids the model's embedding has no row for."""
    if len(tokenizer) > vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}; "
            "use the checkpoint's own tokenizer (model.tokenizer=null) or a larger vocab_size"
        )
