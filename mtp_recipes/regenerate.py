"""``python -m mtp_recipes.regenerate model.path=CHECKPOINT data.source=CHATS out=OUT.jsonl [key=value ...]``.

Rewrites the assistant turns of a chat dataset with the checkpoint's own responses, so the MTP depths are then
fine-tuned on the distribution they will draft for (what SpecForge, speculators and TensorRT Model Optimizer do
for draft models). Every other message and every other column of a row is kept; each assistant turn is
generated from the conversation before it (earlier assistant turns already regenerated), a batch of rows at a
time: greedy (``regenerate.temperature=0``, the default) or sampled. Rows are written to ``out`` (jsonl) in
source order as they finish; a rerun with the same ``out`` skips the rows already there, so a killed job resumes
where it stopped. Same config groups and recipes as ``finetune`` (``model.*``, ``data.source``, ``data.split``,
``data.messages_field``, ``data.max_documents``, ``trainer.device``, ``trainer.seed``). Input errors print one
line and exit with status 2 (checked before torch loads).

Three backends generate the tokens (``regenerate.backend``): transformers' batched ``generate``; vLLM's offline
``LLM.generate`` when vLLM is installed beside this package (an optional extra this package does not declare); or
any OpenAI-compatible completions server (``vllm serve``, ``python -m sglang.launch_server``) at
``regenerate.url``, so the engine runs in its own environment. All get the same token prompts from our tokenizer's
chat template and the same stop ids, and our tokenizer decodes every reply, so the rows differ only where the
engines' numerics or random streams do. The vLLM path is written against vLLM 0.33.0's public API as read in its
source and is tested with a stand-in ``vllm`` module; the server path is tested against a real HTTP server on
127.0.0.1 (tests/test_regenerate.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from mtp_recipes.command_line import check_command_line
from mtp_recipes.config import CONFIG_DIR, to_schema
from mtp_recipes.errors import ConfigError, DataError, MTPRecipesError, ServerError
from mtp_recipes.input_checks import check_inputs
from mtp_recipes.log_noise import quiet

log = logging.getLogger("mtp_recipes")

BACKENDS = ("auto", "transformers", "vllm", "server")


@dataclass(frozen=True)
class RegenerateOptions:
    """The ``regenerate`` section of ``configs/regenerate.yaml`` and the output path."""

    out: Path
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    batch_size: int = 8
    backend: str = "auto"
    url: str | None = None  # backend=server: the server's address (http://host:port, with or without /v1)
    served_model: str | None = None  # backend=server: the request's ``model`` field; None: the server's default
    concurrency: int = 8  # backend=server: requests in flight
    timeout_s: float = 600.0  # backend=server: seconds one request may take

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.concurrency < 1:
            raise ConfigError(
                "regenerate.max_new_tokens, regenerate.batch_size and regenerate.concurrency must be >= 1"
            )
        if self.timeout_s <= 0:
            raise ConfigError(f"regenerate.timeout_s must be > 0, got {self.timeout_s}")
        if self.backend == "server" and not self.url:
            raise ConfigError(
                "regenerate.backend=server needs regenerate.url, e.g. regenerate.url=http://127.0.0.1:8000 "
                "(the address vllm serve or sglang.launch_server listens on)"
            )
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(
                f"regenerate.temperature must be >= 0 and regenerate.top_p in (0, 1], "
                f"got {self.temperature} and {self.top_p}"
            )
        if self.backend not in BACKENDS:
            raise ConfigError(f"regenerate.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")


def split_config(cfg: DictConfig | dict[str, Any]) -> tuple[DictConfig, RegenerateOptions]:
    """The training schema (validated) and the regeneration options, from one composed config."""
    raw = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else dict(cfg)
    out = raw.pop("out", None)
    section = raw.pop("regenerate", None) or {}
    if out in (None, "???", ""):
        raise ConfigError("set out=PATH.jsonl: where the regenerated rows go")
    unknown = sorted(set(section) - {f.name for f in fields(RegenerateOptions) if f.name != "out"})
    if unknown:
        raise ConfigError(f"unknown regenerate option(s) {unknown}")
    try:
        options = RegenerateOptions(Path(str(out)), **section)
    except TypeError as e:
        raise ConfigError(f"bad regenerate option: {e}") from None
    return to_schema(raw), options


def completed_rows(out: Path) -> int:
    """Rows already written to ``out``; a last line cut by a kill is removed so the rerun writes it again."""
    if not out.exists():
        return 0
    data = out.read_bytes()
    keep = data.rfind(b"\n") + 1  # everything after the last newline is an unfinished write
    if keep < len(data):
        with out.open("r+b") as f:
            f.truncate(keep)
        log.warning("%s: dropped an unfinished last row (left by an interrupted run)", out)
    return data[:keep].count(b"\n")


def regenerate(cfg: DictConfig, options: RegenerateOptions) -> int:
    """Write every row of ``data.source`` to ``options.out`` with its assistant turns regenerated; returns the
    number of rows generated by this call (rows already in ``out`` are skipped)."""
    from mtp_recipes.data import load_tokenizer
    from mtp_recipes.data.tokenizer import tokenizer_location
    from mtp_recipes.hf_compat import KERNEL_FALLBACK_LOGGER

    backend = resolve_backend(options.backend, cfg)
    log.info("regenerate.backend=%s: generating with %s", options.backend, backend)
    rows, field, where = _chat_rows(cfg.data)
    done = _resume_point(options.out, len(rows), where)
    if done == len(rows):
        return 0
    tokenizer_name = tokenizer_location(cfg.model)
    tokenizer = load_tokenizer(tokenizer_name)
    if backend == "vllm":
        generate, stop = _vllm_generator(cfg, options, tokenizer_name, tokenizer)
    elif backend == "server":
        generate, stop = _server_generator(cfg, options, tokenizer)
    else:
        generate, stop = _transformers_generator(cfg, options, tokenizer, done)
    reply = _Responder(tokenizer, generate, stop)
    with quiet(KERNEL_FALLBACK_LOGGER, when=backend == "transformers" and _on_cpu(cfg)):
        return _write_rows(rows, field, where, done, options, reply)


def _on_cpu(cfg: DictConfig) -> bool:
    from mtp_recipes.measure_acceptance import resolve_device

    return resolve_device(cfg.trainer.device).type == "cpu"


def resolve_backend(name: str, cfg: DictConfig) -> str:
    """``transformers``, ``vllm`` or ``server`` for ``regenerate.backend``. ``auto`` takes vLLM only where it can
    serve the run: a checkpoint (``model.path``), a device other than ``trainer.device=cpu``, a visible CUDA
    device and an importable ``vllm``; it never picks ``server``, which needs an address."""
    if name == "server":
        return "server"
    if name == "vllm":
        missing = _vllm_import_error()
        if missing:
            raise ConfigError(
                f"regenerate.backend=vllm but vllm cannot be imported ({missing}); set regenerate.backend=transformers"
            )
        if cfg.model.path is None:
            raise ConfigError("regenerate.backend=vllm loads a checkpoint: set model.path (or use transformers)")
        return "vllm"
    if name == "auto" and cfg.model.path is not None and cfg.trainer.device != "cpu":
        import torch

        if torch.cuda.is_available() and not _vllm_import_error():
            return "vllm"
    return "transformers"


def _vllm_import_error() -> str | None:
    """Why ``import vllm`` fails (its first line), or None when it works."""
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return None


def _chat_rows(d: DictConfig) -> tuple[Any, str, str]:
    """The source rows (``data.max_documents`` of them at most), their messages column, and how errors name them."""
    from mtp_recipes.data.formats import resolve_format
    from mtp_recipes.data.sources import load_source

    rows = load_source(d.source, d.split, d.text_sample_by)
    if d.max_documents is not None:
        rows = rows.select(range(min(d.max_documents, len(rows))))
    where = f"data.source={d.source}"
    fmt, field = resolve_format(rows.column_names, "auto", d.text_field, d.messages_field, where)
    if fmt != "chat":
        raise DataError(f"{where} has no messages column {d.messages_field!r}: regenerate rewrites chat rows")
    return rows, field, where


def _resume_point(out: Path, total: int, where: str) -> int:
    """The first row still to generate: the number of complete rows ``out`` already holds."""
    done = completed_rows(out)
    if done > total:
        raise ConfigError(f"{out} holds {done} rows but {where} has {total}: another dataset's output")
    if done:
        log.info("%s: %d of %d rows already regenerated, continuing", out, done, total)
    return done


# Token prompts and the (row, message index) each one answers -> each prompt's new token ids. The ids may run on
# past the first stop token (padding); the caller cuts there.
Generate = Callable[[list[list[int]], list[tuple[int, int]]], list[list[int]]]


@dataclass(frozen=True)
class _Responder:
    """Conversations in, reply texts out. Prompts are built by our tokenizer's chat template and replies decoded
    by it whatever the backend, so both backends write the same rows for the same tokens."""

    tokenizer: Any
    generate: Generate
    stop: list[int]

    def __call__(self, conversations: list[list[dict[str, Any]]], keys: list[tuple[int, int]]) -> list[str]:
        template = self.tokenizer.apply_chat_template
        prompts = [template(c, add_generation_prompt=True)["input_ids"] for c in conversations]
        texts = []
        for tokens in self.generate(prompts, keys):
            end = next((i for i, t in enumerate(tokens) if t in self.stop), len(tokens))
            texts.append(self.tokenizer.decode(tokens[:end], skip_special_tokens=True))
        return texts


def _transformers_generator(
    cfg: DictConfig, options: RegenerateOptions, tokenizer: Any, done: int
) -> tuple[Generate, list[int]]:
    """transformers' batched ``generate`` (left-padded) on the backbone, in one process on ``trainer.device``."""
    import torch

    from mtp_recipes.acceptance import greedy_config
    from mtp_recipes.measure_acceptance import load_model, resolve_device, stop_token_ids

    device = resolve_device(cfg.trainer.device)
    model = load_model(cfg, device)
    stop = stop_token_ids(model.text_config, tokenizer)
    pad = tokenizer.pad_token_id
    config = greedy_config(options.max_new_tokens, stop, pad)
    if options.temperature > 0:
        config.update(do_sample=True, temperature=options.temperature, top_p=options.top_p, top_k=0)
    torch.manual_seed(cfg.trainer.seed + done)  # a resumed run samples on from a seed of its own position

    def generate(prompts: list[list[int]], keys: list[tuple[int, int]]) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        with torch.no_grad():
            return model.backbone.generate(ids, attention_mask=mask, generation_config=config)[:, width:].tolist()

    return generate, stop


def _vllm_generator(
    cfg: DictConfig, options: RegenerateOptions, tokenizer_name: str, tokenizer: Any
) -> tuple[Generate, list[int]]:
    """vLLM's offline engine on the checkpoint, given our token prompts (its own chat template is never used).
    Written against vLLM 0.33.0's public API (``LLM``, ``SamplingParams``, ``TokensPrompt``)."""
    from vllm import LLM, SamplingParams, TokensPrompt

    from mtp_recipes.checkpoint.locate import resolve_model_dir
    from mtp_recipes.measure_acceptance import stop_token_ids

    stop = stop_token_ids(_text_config(cfg), tokenizer)
    llm = LLM(
        model=str(resolve_model_dir(cfg.model.path)),
        tokenizer=tokenizer_name,
        trust_remote_code=False,
        seed=cfg.trainer.seed,
        dtype=cfg.model.dtype,
    )
    sampled = options.temperature > 0

    def generate(prompts: list[list[int]], keys: list[tuple[int, int]]) -> list[list[int]]:
        params = [
            SamplingParams(
                temperature=options.temperature,  # 0: greedy
                top_p=options.top_p,
                max_tokens=options.max_new_tokens,
                seed=_request_seed(cfg.trainer.seed, *key) if sampled else None,
                stop_token_ids=stop,
                ignore_eos=True,  # stop at ``stop`` only, not also at generation_config.json's ids as vLLM would
                detokenize=False,  # the Responder decodes
            )
            for key in keys
        ]
        outputs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outputs]

    return generate, stop


def _server_generator(cfg: DictConfig, options: RegenerateOptions, tokenizer: Any) -> tuple[Generate, list[int]]:
    """An OpenAI-compatible ``/v1/completions`` server, ``regenerate.concurrency`` requests in flight, one prompt
    (our token ids) per request. The request fields are those vLLM 0.34 and SGLang 0.5.23 both accept
    (``CompletionRequest`` in vllm/entrypoints/openai/completion/protocol.py and
    sglang/srt/entrypoints/openai/protocol.py); the reply's ``token_ids`` (``return_token_ids``) are decoded by our
    tokenizer, so the server's detokenizer never shapes a row. Every sampling field is sent, so the server's
    defaults (which vLLM reads from the checkpoint's generation_config.json) change nothing."""
    from mtp_recipes.measure_acceptance import stop_token_ids

    stop = stop_token_ids(_text_config(cfg), tokenizer)
    endpoint = completions_endpoint(options.url)
    sampled = options.temperature > 0

    def request(prompt: list[int], key: tuple[int, int]) -> list[int]:
        body = {
            "prompt": list(prompt),
            "max_tokens": options.max_new_tokens,
            "temperature": options.temperature,  # 0: greedy
            "top_p": options.top_p,
            "top_k": -1,  # off, in both engines
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "stop_token_ids": stop,
            "ignore_eos": True,  # stop at ``stop`` only (the cut is ours, after the first of them)
            "return_token_ids": True,
            **({"seed": _request_seed(cfg.trainer.seed, *key)} if sampled else {}),
            **({"model": options.served_model} if options.served_model else {}),
        }
        return _completion_tokens(endpoint, body, options.timeout_s)

    def generate(prompts: list[list[int]], keys: list[tuple[int, int]]) -> list[list[int]]:
        with ThreadPoolExecutor(max_workers=options.concurrency) as pool:
            futures = [pool.submit(request, p, k) for p, k in zip(prompts, keys, strict=True)]
            try:
                return [f.result() for f in futures]
            except ServerError:
                for f in futures:
                    f.cancel()
                raise

    return generate, stop


def completions_endpoint(url: str) -> str:
    """The completions URL of a server address given as ``http://host:port``, ``.../v1`` or the endpoint itself."""
    url = url.rstrip("/")
    if url.endswith("/completions"):
        return url
    return f"{url}/completions" if url.endswith("/v1") else f"{url}/v1/completions"


def _completion_tokens(endpoint: str, body: dict[str, Any], timeout_s: float) -> list[int]:
    """POST one completions request; the generated token ids, or :class:`ServerError` in one line."""
    data = json.dumps(body).encode()
    req = urllib.request.Request(endpoint, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as response:
            reply = json.loads(response.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace").strip().replace("\n", " ")[:300]
        raise ServerError(f"{endpoint} answered HTTP {e.code}: {detail or e.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, TimeoutError) or isinstance(e, TimeoutError):
            reason = f"no answer within regenerate.timeout_s={timeout_s:g} s"
        raise ServerError(f"{endpoint}: {reason}") from None
    except ValueError:
        raise ServerError(f"{endpoint} answered with something that is not JSON") from None
    try:
        tokens = reply["choices"][0]["token_ids"]
    except (KeyError, IndexError, TypeError):
        tokens = None
    if not isinstance(tokens, list):
        raise ServerError(
            f"{endpoint} returned no choices[0].token_ids: the server must honour return_token_ids "
            "(vllm serve and sglang.launch_server do)"
        )
    return tokens


def _text_config(cfg: DictConfig) -> Any:
    """The language model's config of the run (the checkpoint's, or the one ``model.config`` describes)."""
    from mtp_recipes.checkpoint.locate import resolve_model_dir
    from mtp_recipes.families import get_family
    from mtp_recipes.model_config import checkpoint_text_config, config_from_dict

    if cfg.model.path is not None:
        return checkpoint_text_config(resolve_model_dir(cfg.model.path))
    hf_config = config_from_dict(OmegaConf.to_container(cfg.model.config, resolve=True))
    return get_family(hf_config.model_type).text_config(hf_config)


def _request_seed(seed: int, row: int, message: int) -> int:
    """vLLM's seed for one sampled assistant turn: a function of ``trainer.seed`` and the turn's place only, so a
    turn draws from the same seed whatever the batching or the row a run resumed from."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{row}:{message}".encode(), digest_size=4).digest(), "little")


def _write_rows(rows: Any, field: str, where: str, done: int, options: RegenerateOptions, reply: _Responder) -> int:
    """Append rows ``done`` on to ``options.out``, a batch at a time, each batch flushed to disk before the next."""
    from mtp_recipes.data.formats import check_messages

    options.out.parent.mkdir(parents=True, exist_ok=True)
    with options.out.open("a") as f:
        for start in range(done, len(rows), options.batch_size):
            batch = [rows[i] for i in range(start, min(start + options.batch_size, len(rows)))]
            chats = [check_messages(row[field], field, start + i, where) for i, row in enumerate(batch)]
            _regenerate_turns(chats, start, reply)
            for row, chat in zip(batch, chats, strict=True):
                f.write(json.dumps({**row, field: chat}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            log.info("regenerated %d of %d rows", start + len(batch), len(rows))
    return len(rows) - done


def _regenerate_turns(chats: list[list[dict[str, Any]]], first_row: int, reply: _Responder) -> None:
    """Replace the assistant turns of ``chats`` (rows ``first_row`` on) in place, one batched call per round: the
    next assistant turn of every row that has one, from the conversation before it as already regenerated."""
    turn = [0] * len(chats)
    while True:
        todo = [(i, _next_assistant(c, turn[i])) for i, c in enumerate(chats)]
        todo = [(i, j) for i, j in todo if j is not None]
        if not todo:
            return
        texts = reply([chats[i][:j] for i, j in todo], [(first_row + i, j) for i, j in todo])
        for (i, j), text in zip(todo, texts, strict=True):
            chats[i][j] = {**chats[i][j], "content": text}
            turn[i] = j + 1


def _next_assistant(chat: list[dict[str, Any]], start: int) -> int | None:
    """The index of the next assistant turn with text content from ``start`` on (tool-call turns are kept)."""
    return next(
        (
            j
            for j in range(start, len(chat))
            if chat[j]["role"] == "assistant" and isinstance(chat[j].get("content"), str)
        ),
        None,
    )


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="regenerate")
def main(cfg: DictConfig) -> None:
    logging.getLogger("mtp_recipes").setLevel(logging.INFO)
    try:
        schema, options = split_config(cfg)
        check_inputs(schema)
        written = regenerate(schema, options)
    except MTPRecipesError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"regenerated {written} rows -> {options.out}")


if __name__ == "__main__":
    check_command_line(sys.argv[1:], "regenerate", "regenerate")
    main()
