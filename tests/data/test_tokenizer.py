"""The bundled debug tokenizer: loads offline, has a chat template, matches its build script."""

import importlib.util
import inspect
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from mtp_recipes.data.tokenizer import DEBUG_TOKENIZER_DIR, load_tokenizer

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build_debug_tokenizer.py"


def test_debug_tokenizer_loads_for_every_alias() -> None:
    for name in ("builtin:debug", None, ""):
        tok = load_tokenizer(name)
        assert isinstance(tok, PreTrainedTokenizerFast) and len(tok) == 4096
        assert None not in (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
        assert tok.chat_template
        text = "Return the length of an object. \u00e9\u4e2d"
        assert tok.decode(tok(text)["input_ids"]) == text


def test_asset_is_small_and_remote_code_is_off_by_default() -> None:
    assert sum(p.stat().st_size for p in DEBUG_TOKENIZER_DIR.iterdir()) < 1_000_000
    assert inspect.signature(load_tokenizer).parameters["trust_remote_code"].default is False


def test_build_script_reproduces_the_asset() -> None:
    spec = importlib.util.spec_from_file_location("build_debug_tokenizer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.train_tokenizer().get_vocab() == load_tokenizer(None).get_vocab()


def test_a_missing_tokenizer_is_one_clear_error(tmp_path):
    from mtp_recipes.errors import DataError

    with pytest.raises(DataError, match="could not load the tokenizer") as err:
        load_tokenizer(str(tmp_path))  # a directory without tokenizer files
    assert "\n" not in str(err.value) and "model.tokenizer" in str(err.value)
