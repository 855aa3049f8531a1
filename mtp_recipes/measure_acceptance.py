"""The measurement behind ``python -m mtp_recipes.evaluate`` (the command line is :mod:`mtp_recipes.evaluate`).

Measures what MTP speculative decoding would accept with a checkpoint (a run's ``final/``, or the model a
config builds), on held-out prompts: ``eval.num_prompts`` rows of ``data.eval_source``, or of the
``data.eval_fraction`` split of ``data.source`` that training never sees. Per prompt the backbone generates
``eval.max_new_tokens`` greedy tokens (transformers' ``generate``, with its cache); one teacher-forced
forward over prompt + continuation then gives the exact greedy acceptance (:mod:`mtp_recipes.acceptance`)
for D drafts and for every k < D, next to training's teacher-forced estimate on the same text and, with
``eval.temperature > 0``, the expected acceptance of speculative sampling. Rows with a reference continuation
(a chat row's last assistant turn, a text row's tokens after the prompt) also give the main and per-depth
cross-entropy on it. ``eval.verify=true`` also runs a real speculative decoding loop on ``eval.verify_prompts``
prompts and raises :class:`VerificationError` unless its output is the greedy output token for token and its
steps are the walk's.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from transformers import PretrainedConfig

from mtp_recipes.acceptance import (
    GreedyAcceptance,
    SamplingAcceptance,
    counted_steps,
    draft_table,
    greedy_generate,
    greedy_walk,
    speculative_decode,
)
from mtp_recipes.config import model_kwargs
from mtp_recipes.data import load_tokenizer
from mtp_recipes.data.heldout import load_documents
from mtp_recipes.data.tokenizer import tokenizer_location
from mtp_recipes.errors import ConfigError, DataError
from mtp_recipes.loss import AcceptanceStats
from mtp_recipes.model import MTPModel
from mtp_recipes.mtp.roll import count_depth_targets

log = logging.getLogger("mtp_recipes")


class VerificationError(Exception):
    """The real speculative decoding loop disagreed with plain greedy decoding or with the walk."""


@dataclass
class Prompt:
    """A held-out prompt and the row's own continuation of it (empty when the row has none)."""

    ids: list[int]
    reference: list[int]


def heldout_prompts(cfg: DictConfig, tokenizer: Any) -> list[Prompt]:
    """Prompts from the first ``eval.num_prompts`` held-out documents (tokenised as training tokenises them).

    A chat row's prompt is the conversation up to its last assistant turn (the generation prompt included),
    the reference that turn's target tokens; a text row's prompt is its first ``eval.prompt_tokens`` tokens (at
    most half the row), the reference the tokens after them. References are cut at ``eval.max_new_tokens``.
    """
    _, documents = load_documents(cfg.data, tokenizer)
    if documents is None:
        raise ConfigError(
            "evaluate needs held-out documents: set data.eval_fraction (a share of data.source that training leaves "
            "out) or data.eval_source (a separate file)"
        )
    e = cfg.eval
    prompts = []
    for doc in documents:
        if len(doc.input_ids) < 2:
            continue
        if all(doc.trainable[1:]):  # text: every token is a target
            cut = min(e.prompt_tokens, len(doc.input_ids) // 2)
            reference = doc.input_ids[cut:]
        else:  # chat: the last run of target tokens is the last assistant turn
            end = max(i for i, t in enumerate(doc.trainable) if t) + 1
            cut = end - 1
            while cut > 1 and doc.trainable[cut - 1]:  # back to the first target of that run
                cut -= 1
            reference = doc.input_ids[cut:end]
        prompts.append(Prompt(doc.input_ids[:cut], reference[: e.max_new_tokens]))
        if len(prompts) == e.num_prompts:
            break
    if not prompts:
        raise DataError("no held-out document is long enough for a prompt (each needs at least two tokens)")
    return prompts


def load_model(cfg: DictConfig, device: torch.device) -> MTPModel:
    """The checkpoint at ``model.path`` with its MTP depths, or the model ``model.config`` builds.

    A model built from scratch is seeded with ``trainer.seed`` first, as the training run seeds it, so it
    is the run's initial model.
    """
    m, kwargs = cfg.model, model_kwargs(cfg)
    if m.path is not None:
        return MTPModel.from_pretrained(m.path, device=device, **kwargs).eval()
    torch.manual_seed(cfg.trainer.seed)
    return MTPModel.from_config(OmegaConf.to_container(m.config, resolve=True), **kwargs).to(device).eval()


def stop_token_ids(text_config: PretrainedConfig, tokenizer: Any) -> list[int]:
    """End-of-sequence ids: the tokenizer's and the model config's (an int or a list)."""
    configured = text_config.eos_token_id
    ids = {tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])}
    return sorted(i for i in ids if i is not None)


class _Tally:
    """What ``evaluate`` adds up over the prompts: acceptance counts per draft count, agreement, reference CE."""

    def __init__(self, depths: int) -> None:
        self.depths = depths
        self.greedy = {k: GreedyAcceptance(k) for k in range(1, depths + 1)}
        self.sampling = {k: SamplingAcceptance(k) for k in range(1, depths + 1)}
        self.teacher = {k: _no_counts(k) for k in range(1, depths + 1)}
        self.agree = self.slots = self.generated = 0
        self.generate_s = 0.0
        self.ce = torch.zeros(depths + 1, dtype=torch.float64)
        self.ce_count = torch.zeros(depths + 1, dtype=torch.float64)
        self.reference = _no_counts(depths)

    def add(self, model: MTPModel, prompt: Prompt, continuation: list[int], table: Any, temperature: float) -> None:
        """One prompt: its greedy continuation's walk and estimates, and the CE on its own reference text."""
        self.generated += len(continuation)
        for k in self.greedy:
            self.greedy[k] += table.greedy(k)
            self.teacher[k] = self.teacher[k] + table.teacher_forced(k)
            if temperature > 0:
                self.sampling[k] += table.sampling(k)
        backbone = table.backbone[len(prompt.ids) - 1 : -1].tolist()
        self.agree += sum(int(b == t) for b, t in zip(backbone, continuation, strict=True))
        self.slots += len(continuation)
        if prompt.reference:
            sums, counts, stats = _reference_ce(model, prompt, self.depths)
            self.ce += sums
            self.ce_count += counts
            self.reference = self.reference + stats

    def record(self, temperature: float) -> dict[str, Any]:
        """The measured fields of eval.json."""
        d, sampled = self.depths, temperature > 0
        mean_ce = (self.ce / self.ce_count.clamp_min(1)).tolist()
        held = bool(self.ce_count[0])
        return {
            "generated_tokens": self.generated,
            "num_layers": d,
            "acceptance_length": self.greedy[d].length if d else 1.0,
            "acceptance_rates": self.greedy[d].rates if d else [],
            "steps": self.greedy[d].steps if d else 0,
            "teacher_forced_acceptance_length": float(self.teacher[d].acceptance_length) if d else 1.0,
            "temperature": temperature,
            "sampling_acceptance_length": self.sampling[d].length if d and sampled else None,
            "sampling_acceptance_rates": self.sampling[d].rates if d and sampled else None,
            "per_num_drafts": [
                {
                    "num_drafts": k,
                    "acceptance_length": self.greedy[k].length,
                    "acceptance_rates": self.greedy[k].rates,
                    "steps": self.greedy[k].steps,
                    "teacher_forced_acceptance_length": float(self.teacher[k].acceptance_length),
                    "sampling_acceptance_length": self.sampling[k].length if sampled else None,
                }
                for k in self.greedy
            ],
            "backbone_agreement": self.agree / max(self.slots, 1),
            "reference_tokens": int(self.ce_count[0]),
            "reference_main_ce": mean_ce[0] if held else None,
            "reference_mtp_ce": mean_ce[1:] if held else None,
            "reference_acceptance_length": float(self.reference.acceptance_length) if d and held else None,
            "tokens_per_s": self.generated / self.generate_s if self.generate_s else None,
        }


def evaluate(cfg: DictConfig, output: str | Path) -> dict[str, Any]:
    """Measure acceptance on the held-out prompts, write ``output`` (eval.json) and return its record."""
    start = time.perf_counter()
    e = cfg.eval
    device = resolve_device(cfg.trainer.device)
    model = load_model(cfg, device)
    tokenizer = load_tokenizer(tokenizer_location(cfg.model))
    prompts = heldout_prompts(cfg, tokenizer)
    stop = stop_token_ids(model.text_config, tokenizer)
    tally = _Tally(model.mtp.num_layers)
    checked = []
    for i, prompt in enumerate(tqdm(prompts, desc="evaluate", disable=not cfg.trainer.progress_bar)):
        t0 = time.perf_counter()
        continuation = greedy_generate(model, prompt.ids, e.max_new_tokens, stop)
        tally.generate_s += time.perf_counter() - t0
        table = draft_table(model, prompt.ids + continuation, len(prompt.ids), temperature=e.temperature)
        tally.add(model, prompt, continuation, table, e.temperature)
        if e.verify and i < e.verify_prompts:
            checked.append((prompt, continuation, table))
    verified = _verify(model, checked, e.max_new_tokens, stop) if e.verify else None
    record = {
        "checkpoint": cfg.model.path or f"model.config from scratch (trainer.seed={cfg.trainer.seed})",
        "date": datetime.now().isoformat(timespec="seconds"),
        "device": str(device),
        "prompts": len(prompts),
        "max_new_tokens": e.max_new_tokens,
        **tally.record(e.temperature),
        "wall_s": time.perf_counter() - start,
        "verify": verified,
    }
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n")
    return record


def _no_counts(depths: int) -> AcceptanceStats:
    return AcceptanceStats(*(torch.zeros(depths, dtype=torch.int64) for _ in range(4)))


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def _reference_ce(model: MTPModel, prompt: Prompt, depths: int) -> tuple[torch.Tensor, torch.Tensor, AcceptanceStats]:
    """Summed main and per-depth CE on the prompt's reference continuation, their target counts, and the
    teacher-forced acceptance counts on it (validation's measure)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt.ids + prompt.reference], device=device)
    labels = torch.full_like(ids, -100)
    labels[0, len(prompt.ids) - 1 : -1] = ids[0, len(prompt.ids) :]
    counts = count_depth_targets(labels, depths).double().cpu()
    with torch.no_grad():  # a target count of 1 makes every loss a sum
        out = model(
            input_ids=ids, labels=labels, num_label_tokens=1, num_depth_tokens=[1] * depths, return_accuracy=depths > 0
        )
    sums = torch.tensor([float(out.main_loss), *(float(c) for c in out.mtp_losses)], dtype=torch.float64)
    a = out.acceptance
    stats = AcceptanceStats(a.correct.cpu(), a.valid.cpu(), a.cum_correct.cpu(), a.cum_valid.cpu()) if depths else None
    return sums, counts, stats or _no_counts(0)


def _verify(model: MTPModel, checked: list, max_new_tokens: int, stop: list[int]) -> dict[str, Any]:
    """Run the real speculative decoding loop on the checked prompts for every draft count; raise on a mismatch."""
    depths = model.mtp.num_layers
    lengths = {}
    for k in range(1, depths + 1):
        real_steps, walked = [], []
        for n, (prompt, continuation, table) in enumerate(checked):
            real = speculative_decode(model, prompt.ids, max_new_tokens, k, stop)
            if real.tokens != continuation:
                at = next((i for i, (a, b) in enumerate(zip(real.tokens, continuation, strict=False)) if a != b), None)
                at = min(len(real.tokens), len(continuation)) if at is None else at
                raise VerificationError(
                    f"prompt {n}, {k} drafts: speculative decoding differs from greedy decoding at new token {at}"
                )
            text = prompt.ids + continuation
            real_steps += counted_steps(real.steps, k, len(text))
            walked += greedy_walk(table.drafts, text, len(prompt.ids), k)
            if real_steps != walked:
                raise VerificationError(f"prompt {n}, {k} drafts: the real loop's steps differ from the walk's")
        lengths[k] = GreedyAcceptance.from_steps(real_steps, k).length
    log.info("verify: the real loop equals greedy decoding and the walk on %d prompts", len(checked))
    return {"prompts": len(checked), "passed": True, "acceptance_length": {str(k): v for k, v in lengths.items()}}


def summary_line(record: dict[str, Any]) -> str:
    """One line: greedy acceptance with D drafts and fewer, estimates, the held-out text's numbers, speed."""
    d = record["num_layers"]
    fewer = "".join(f", {r['num_drafts']} drafts: {r['acceptance_length']:.3f}" for r in record["per_num_drafts"][:-1])
    rates = " ".join(f"{r:.3f}" for r in record["acceptance_rates"])
    estimate = record["teacher_forced_acceptance_length"]
    parts = [
        f"acceptance length {record['acceptance_length']:.3f} with {d} draft{'s' if d != 1 else ''} "
        f"(per position {rates}{fewer}; teacher-forced on the same text {estimate:.3f})"
    ]
    if record["sampling_acceptance_length"] is not None:
        parts.append(f"sampling T={record['temperature']:g}: {record['sampling_acceptance_length']:.3f}")
    if record["reference_main_ce"] is not None:
        held = f"held-out text: main CE {record['reference_main_ce']:.4f}"
        if record["reference_acceptance_length"] is not None:
            held += f", teacher-forced acceptance {record['reference_acceptance_length']:.3f}"
        parts.append(held)
    if record["tokens_per_s"] is not None:
        parts.append(
            f"{record['generated_tokens']} tokens from {record['prompts']} prompts, {record['tokens_per_s']:.1f} tok/s"
        )
    if record["verify"]:
        parts.append("verified")
    return " | ".join(parts)
