"""regenerate: assistant turns rewritten with the model's own responses; prompts kept; resumable."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import types
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TypedDict

import pytest
import torch
from hydra import compose, initialize_config_dir

from mtp_recipes.acceptance import greedy_generate
from mtp_recipes.config import CONFIG_DIR
from mtp_recipes.data import load_tokenizer
from mtp_recipes.errors import ConfigError, ServerError
from mtp_recipes.measure_acceptance import load_model, stop_token_ids
from mtp_recipes.model import MTPModel
from mtp_recipes.regenerate import completed_rows, completions_endpoint, regenerate, resolve_backend, split_config

CHATS = [
    {"id": 0, "messages": [{"role": "user", "content": "What is a list?"}, {"role": "assistant", "content": "A."}]},
    {
        "id": 1,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a loop."},
            {"role": "assistant", "content": "for"},
            {"role": "user", "content": "Another?"},
            {"role": "assistant", "content": "while"},
        ],
    },
    {
        "id": 2,
        "messages": [{"role": "user", "content": "Define a tuple in Python"}, {"role": "assistant", "content": "B"}],
    },
]


def _config(tmp_path, *overrides):
    source = tmp_path / "chats.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in CHATS))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name="regenerate",
            overrides=[
                f"data.source={source}",
                f"out={tmp_path / 'out.jsonl'}",
                "regenerate.max_new_tokens=6",
                "trainer.device=cpu",
                *overrides,
            ],
        )
    return split_config(cfg)


def test_assistant_turns_are_the_models_greedy_replies_and_everything_else_is_kept(tmp_path):
    cfg, options = _config(tmp_path, "regenerate.batch_size=2")
    assert regenerate(cfg, options) == len(CHATS)
    rows = [json.loads(line) for line in options.out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2]
    model = load_model(cfg, torch.device("cpu"))
    tokenizer = load_tokenizer("builtin:debug")
    stop = stop_token_ids(model.text_config, tokenizer)
    for row, source in zip(rows, CHATS):
        got, want = row["messages"], source["messages"]
        assert [m["role"] for m in got] == [m["role"] for m in want]
        for j, (g, w) in enumerate(zip(got, want)):
            if w["role"] != "assistant":
                assert g == w  # prompts unchanged
                continue
            # reference: one prompt at a time through the evaluator's greedy generate, earlier turns as regenerated
            prompt = tokenizer.apply_chat_template(got[:j], add_generation_prompt=True)["input_ids"]
            tokens = greedy_generate(model, prompt, 6, stop)
            end = next((i for i, t in enumerate(tokens) if t in stop), len(tokens))
            assert g["content"] == tokenizer.decode(tokens[:end], skip_special_tokens=True)
            assert g["content"] != w["content"]


def test_a_rerun_skips_the_rows_already_written_and_rewrites_a_cut_last_row(tmp_path):
    cfg, options = _config(tmp_path)
    done = json.dumps({"id": 0, "messages": [{"role": "user", "content": "kept"}]}) + "\n"
    options.out.write_text(done + '{"id": 1, "messa')  # killed while writing row 1
    assert completed_rows(options.out) == 1 and options.out.read_text() == done
    options.out.write_text(done + '{"id": 1, "messa')
    assert regenerate(cfg, options) == 2
    lines = options.out.read_text().splitlines()
    assert lines[0] + "\n" == done and [json.loads(line)["id"] for line in lines] == [0, 1, 2]
    assert regenerate(cfg, options) == 0  # finished: nothing generated again


def test_sampling_is_seeded_and_bad_options_are_one_line(tmp_path):
    cfg, options = _config(tmp_path, "regenerate.temperature=1.0", "data.max_documents=1")
    regenerate(cfg, options)
    first = options.out.read_text()
    options.out.unlink()
    regenerate(cfg, options)
    assert options.out.read_text() == first
    with pytest.raises(ConfigError, match="regenerate.temperature must be >= 0"):
        _config(tmp_path, "regenerate.temperature=-1")
    cfg, options = _config(tmp_path, "model.tokenizer=null", "out=" + str(tmp_path / "y.jsonl"))
    with pytest.raises(ConfigError, match="model.tokenizer is required"):
        regenerate(cfg, options)
    result = subprocess.run(
        [sys.executable, "-m", "mtp_recipes.regenerate", "trainer.device=cpu", f"out={tmp_path / 'x.jsonl'}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert re.fullmatch(r"error: data.source=builtin:pydoc has no messages column .*\n", result.stderr)


# ---- the vLLM backend, against a stand-in ``vllm`` module -----------------------------------------------------
# The stand-in has the names and keyword arguments regenerate uses, spelled and defaulted as in vLLM 0.33.0
# (vllm/entrypoints/llm.py, vllm/sampling_params.py, vllm/inputs/llm.py): a misspelt or extra argument is a
# TypeError here as there. Its engine answers each token prompt with the checkpoint's greedy continuation computed
# by transformers one prompt at a time, ending after the first stop token as vLLM's output does.


@dataclass(kw_only=True)
class _SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    detokenize: bool = True


class _TokensPrompt(TypedDict):
    prompt_token_ids: list[int]


class _LLM:
    made: list[_LLM] = []

    def __init__(self, model: str, *, tokenizer=None, trust_remote_code=False, dtype="auto", seed=0) -> None:
        self.kwargs = {"model": model, "tokenizer": tokenizer, "trust_remote_code": trust_remote_code}
        self.kwargs |= {"dtype": dtype, "seed": seed}
        self.model = MTPModel.from_pretrained(model, dtype=dtype)
        self.requests: list[tuple[list[int], _SamplingParams]] = []
        _LLM.made.append(self)

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True):
        assert isinstance(sampling_params, list) and len(sampling_params) == len(prompts)
        outputs = []
        for prompt, params in zip(prompts, sampling_params, strict=True):
            assert set(prompt) == {"prompt_token_ids"}  # only our tokens: vLLM's own template never runs
            self.requests.append((prompt["prompt_token_ids"], params))
            tokens = greedy_generate(self.model, prompt["prompt_token_ids"], params.max_tokens, params.stop_token_ids)
            end = next((i + 1 for i, t in enumerate(tokens) if t in params.stop_token_ids), len(tokens))
            outputs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=tokens[:end])]))
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams, module.TokensPrompt = _LLM, _SamplingParams, _TokensPrompt
    monkeypatch.setitem(sys.modules, "vllm", module)
    _LLM.made.clear()
    return _LLM.made


@pytest.fixture
def checkpoint(tmp_path):
    """The debug model saved as a checkpoint directory with its tokenizer (vLLM loads only checkpoints)."""
    cfg, _ = _config(tmp_path)
    path = tmp_path / "ckpt"
    load_model(cfg, torch.device("cpu")).save_pretrained(path, tokenizer=load_tokenizer("builtin:debug"))
    return path


@pytest.mark.slow
def test_the_vllm_backend_gets_our_token_prompts_and_writes_what_transformers_writes(tmp_path, checkpoint, fake_vllm):
    model = [f"model.path={checkpoint}", "model.tokenizer=null", "regenerate.batch_size=2"]
    cfg, options = _config(tmp_path, *model, "regenerate.backend=transformers", f"out={tmp_path / 'hf.jsonl'}")
    assert regenerate(cfg, options) == len(CHATS) and not fake_vllm
    cfg, options = _config(tmp_path, *model, "regenerate.backend=vllm", f"out={tmp_path / 'vllm.jsonl'}")
    assert regenerate(cfg, options) == len(CHATS)
    assert options.out.read_bytes() == (tmp_path / "hf.jsonl").read_bytes()

    (llm,) = fake_vllm
    assert llm.kwargs == {
        "model": str(checkpoint),
        "tokenizer": str(checkpoint),
        "trust_remote_code": False,
        "dtype": "float32",
        "seed": cfg.trainer.seed,
    }
    tokenizer = load_tokenizer(str(checkpoint))
    stop = stop_token_ids(llm.model.text_config, tokenizer)
    rows = [json.loads(line)["messages"] for line in options.out.read_text().splitlines()]
    want = [  # every assistant turn, from the conversation before it as written, in our template
        tokenizer.apply_chat_template(chat[:j], add_generation_prompt=True)["input_ids"]
        for chat in rows
        for j, m in enumerate(chat)
        if m["role"] == "assistant"
    ]
    assert sorted(prompt for prompt, _ in llm.requests) == sorted(want)
    for _, params in llm.requests:
        assert params == _SamplingParams(
            temperature=0.0, top_p=1.0, seed=None, stop_token_ids=stop, ignore_eos=True, max_tokens=6, detokenize=False
        )


@pytest.mark.slow
def test_sampled_vllm_requests_carry_the_options_and_a_seed_per_turn_that_survives_a_resume(
    tmp_path, checkpoint, fake_vllm
):
    sampled = [f"model.path={checkpoint}", "model.tokenizer=null", "regenerate.backend=vllm"]
    sampled += ["regenerate.temperature=0.7", "regenerate.top_p=0.9", "trainer.seed=5"]
    cfg, options = _config(tmp_path, *sampled, "regenerate.batch_size=3")
    regenerate(cfg, options)
    lines = options.out.read_text().splitlines(keepends=True)
    options.out.write_text(lines[0])  # as if killed after row 0; resumed with another batch size
    cfg, options = _config(tmp_path, *sampled, "regenerate.batch_size=1")
    assert regenerate(cfg, options) == 2
    assert options.out.read_text().splitlines(keepends=True) == lines
    first, resumed = ({tuple(p): params for p, params in llm.requests} for llm in fake_vllm)
    assert len(first) == 4 and set(resumed) < set(first)  # rows 1 and 2 asked again, row 0 not
    for prompt, params in resumed.items():
        assert params == first[prompt]  # the same seed whatever the batching and resume point
    assert {(p.temperature, p.top_p, p.max_tokens) for p in first.values()} == {(0.7, 0.9, 6)}
    assert len({p.seed for p in first.values()}) == 4  # each turn samples from a seed of its own


def test_backend_choice_and_a_missing_vllm_is_one_line(tmp_path, checkpoint, fake_vllm, monkeypatch):
    served = [f"model.path={checkpoint}", "trainer.device=auto"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_backend("auto", _config(tmp_path, *served)[0]) == "transformers"  # no CUDA device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_backend("auto", _config(tmp_path, *served)[0]) == "vllm"
    assert resolve_backend("auto", _config(tmp_path, *served, "trainer.device=cpu")[0]) == "transformers"
    assert resolve_backend("auto", _config(tmp_path, "trainer.device=auto")[0]) == "transformers"  # no checkpoint
    assert resolve_backend("transformers", _config(tmp_path, *served)[0]) == "transformers"
    with pytest.raises(ConfigError, match=r"regenerate.backend=vllm loads a checkpoint: set model.path"):
        resolve_backend("vllm", _config(tmp_path)[0])

    monkeypatch.setitem(sys.modules, "vllm", None)  # vLLM not installed: ``import vllm`` raises ImportError
    assert resolve_backend("auto", _config(tmp_path, *served)[0]) == "transformers"
    cfg, options = _config(tmp_path, *served, "regenerate.backend=vllm")
    with pytest.raises(ConfigError) as e:
        regenerate(cfg, options)
    assert re.fullmatch(
        r"regenerate.backend=vllm but vllm cannot be imported \(.+\); set regenerate.backend=\w+", str(e.value)
    )
    assert not options.out.exists()
    with pytest.raises(
        ConfigError, match="regenerate.backend must be one of auto, transformers, vllm, server, got 'tgi'"
    ):
        _config(tmp_path, "regenerate.backend=tgi")


# ---- the server backend, against a real HTTP server on 127.0.0.1 ----------------------------------------------
# The server answers POST /v1/completions as vLLM 0.34 and SGLang 0.5.23 do for the fields regenerate sends
# (``CompletionRequest`` in vllm/entrypoints/openai/completion/protocol.py, sglang/srt/entrypoints/openai/
# protocol.py): a token-id prompt, ``choices[0].token_ids`` when ``return_token_ids`` is set, generation ending
# after the first of ``stop_token_ids``. Greedy requests get the checkpoint's greedy tokens from transformers;
# sampled ones a draw from the model's distribution seeded by the request's ``seed``.


class _CompletionServer:
    def __init__(self, model: MTPModel, *, fail_from: int | None = None, delay_s: float = 0.0) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.model, self.fail_from, self.delay_s = model, fail_from, delay_s
        self.requests: list[dict] = []
        lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest's output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    server.requests.append(body)
                    number = len(server.requests)
                if server.delay_s:
                    import time

                    time.sleep(server.delay_s)
                if self.path != "/v1/completions" or (server.fail_from is not None and number >= server.fail_from):
                    self._answer(500, {"object": "error", "message": "CUDA out of memory"})
                    return
                with lock:
                    tokens = server.complete(body)
                self._answer(200, {"object": "text_completion", "choices": [{"index": 0, "token_ids": tokens}]})

            def _answer(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def complete(self, body: dict) -> list[int]:
        prompt, stop, n = body["prompt"], body["stop_token_ids"], body["max_tokens"]
        assert isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)
        if body["temperature"] == 0:
            tokens = greedy_generate(self.model, prompt, n, stop)
        else:
            g = torch.Generator().manual_seed(body["seed"])
            ids, tokens = list(prompt), []
            with torch.no_grad():
                for _ in range(n):
                    logits = self.model.backbone(torch.tensor([ids])).logits[0, -1]
                    token = int(torch.multinomial(torch.softmax(logits / body["temperature"], -1), 1, generator=g))
                    ids.append(token)
                    tokens.append(token)
        end = next((i + 1 for i, t in enumerate(tokens) if t in stop), len(tokens))
        return tokens[:end]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve(checkpoint):
    servers = []

    def start(**kwargs) -> _CompletionServer:
        servers.append(_CompletionServer(MTPModel.from_pretrained(checkpoint).eval(), **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.mark.slow
def test_the_server_backend_sends_our_token_prompts_and_writes_what_transformers_writes(tmp_path, checkpoint, serve):
    model = [f"model.path={checkpoint}", "model.tokenizer=null", "regenerate.batch_size=2"]
    cfg, options = _config(tmp_path, *model, "regenerate.backend=transformers", f"out={tmp_path / 'hf.jsonl'}")
    assert regenerate(cfg, options) == len(CHATS)
    server = serve()
    served = [*model, "regenerate.backend=server", f"regenerate.url={server.url}/v1/", "regenerate.concurrency=3"]
    cfg, options = _config(tmp_path, *served, f"out={tmp_path / 'server.jsonl'}")
    assert regenerate(cfg, options) == len(CHATS)
    assert options.out.read_bytes() == (tmp_path / "hf.jsonl").read_bytes()

    tokenizer = load_tokenizer(str(checkpoint))
    stop = stop_token_ids(server.model.text_config, tokenizer)
    rows = [json.loads(line)["messages"] for line in options.out.read_text().splitlines()]
    want = [
        tokenizer.apply_chat_template(chat[:j], add_generation_prompt=True)["input_ids"]
        for chat in rows
        for j, m in enumerate(chat)
        if m["role"] == "assistant"
    ]
    assert sorted(r["prompt"] for r in server.requests) == sorted(want)
    for r in server.requests:
        del r["prompt"]
        assert r == {
            "max_tokens": 6,
            "temperature": 0.0,
            "top_p": 1.0,
            "top_k": -1,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "stop_token_ids": stop,
            "ignore_eos": True,
            "return_token_ids": True,
        }


@pytest.mark.slow
def test_sampled_server_requests_carry_a_seed_per_turn_that_survives_a_resume(tmp_path, checkpoint, serve):
    server = serve()
    sampled = [f"model.path={checkpoint}", "model.tokenizer=null", "regenerate.backend=server"]
    sampled += [f"regenerate.url={server.url}", "regenerate.temperature=0.7", "regenerate.top_p=0.9"]
    sampled += ["trainer.seed=5", "regenerate.served_model=ckpt"]
    cfg, options = _config(tmp_path, *sampled, "regenerate.batch_size=3")
    regenerate(cfg, options)
    lines = options.out.read_text().splitlines(keepends=True)
    first = {tuple(r["prompt"]): r for r in server.requests}
    server.requests.clear()
    options.out.write_text(lines[0])  # as if killed after row 0; resumed with another batch size
    cfg, options = _config(tmp_path, *sampled, "regenerate.batch_size=1")
    assert regenerate(cfg, options) == 2
    assert options.out.read_text().splitlines(keepends=True) == lines
    resumed = {tuple(r["prompt"]): r for r in server.requests}
    assert len(first) == 4 and set(resumed) < set(first)
    for prompt, request in resumed.items():
        assert request == first[prompt]  # the same seed whatever the batching and resume point
    assert {(r["temperature"], r["top_p"], r["model"]) for r in first.values()} == {(0.7, 0.9, "ckpt")}
    assert len({r["seed"] for r in first.values()}) == 4


@pytest.mark.slow
def test_a_failing_or_silent_server_is_one_line_and_the_finished_rows_stay(tmp_path, checkpoint, serve):
    model = [f"model.path={checkpoint}", "model.tokenizer=null", "regenerate.batch_size=1"]
    cfg, options = _config(tmp_path, *model, "regenerate.backend=transformers", f"out={tmp_path / 'hf.jsonl'}")
    regenerate(cfg, options)
    reference = (tmp_path / "hf.jsonl").read_text().splitlines(keepends=True)

    # requests: row 0 (1 turn), row 1 (2 turns), row 2 (1 turn); the server fails from the third on
    failing = serve(fail_from=3)
    out = tmp_path / "server.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "mtp_recipes.regenerate", *model, f"data.source={tmp_path / 'chats.jsonl'}"]
        + [f"out={out}", "regenerate.max_new_tokens=6", "trainer.device=cpu", "regenerate.backend=server"]
        + [f"regenerate.url={failing.url}", f"hydra.run.dir={tmp_path / 'hydra'}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert re.fullmatch(
        rf"error: {failing.url}/v1/completions answered HTTP 500: .*CUDA out of memory.*\n", result.stderr
    )
    assert out.read_text().splitlines(keepends=True) == reference[:1]  # row 0 finished before the failure

    silent = serve(delay_s=2.0)
    cfg, options = _config(
        tmp_path, *model, "regenerate.backend=server", f"regenerate.url={silent.url}", "regenerate.timeout_s=0.5"
    )
    options = type(options)(**{**options.__dict__, "out": out})
    with pytest.raises(ServerError, match=r"/v1/completions: no answer within regenerate.timeout_s=0.5 s$"):
        regenerate(cfg, options)
    assert out.read_text().splitlines(keepends=True) == reference[:1]

    cfg, options = _config(tmp_path, *model, "regenerate.backend=server", "regenerate.url=http://127.0.0.1:9/v1")
    with pytest.raises(ServerError, match=r"^http://127.0.0.1:9/v1/completions: .*refused"):
        regenerate(cfg, options)

    working = serve()
    cfg, options = _config(tmp_path, *model, "regenerate.backend=server", f"regenerate.url={working.url}")
    options = type(options)(**{**options.__dict__, "out": out})
    assert regenerate(cfg, options) == 2  # resumed after row 0
    assert out.read_text().splitlines(keepends=True) == reference


def test_server_options_are_checked_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"regenerate.backend=server needs regenerate.url, e.g."):
        _config(tmp_path, "regenerate.backend=server")
    with pytest.raises(ConfigError, match=r"regenerate.concurrency must be >= 1"):
        _config(tmp_path, "regenerate.backend=server", "regenerate.url=http://x", "regenerate.concurrency=0")
    with pytest.raises(ConfigError, match=r"regenerate.timeout_s must be > 0, got 0"):
        _config(tmp_path, "regenerate.timeout_s=0")
    for given, endpoint in [
        ("http://h:8000", "http://h:8000/v1/completions"),
        ("http://h:8000/v1/", "http://h:8000/v1/completions"),
        ("http://h/v1/completions", "http://h/v1/completions"),
    ]:
        assert completions_endpoint(given) == endpoint
