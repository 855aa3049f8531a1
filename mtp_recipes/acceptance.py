"""What MTP speculative decoding accepts, measured exactly from one teacher-forced forward.

Under greedy verification, a step that drafts D tokens after the last committed token accepts exactly the
leading drafts equal to the backbone's own greedy tokens, then commits the backbone's token at the first
mismatch (the bonus). Whatever the drafts, the committed text is the backbone's greedy continuation. So a
forward of the MTP model over prompt + greedy continuation holds every draft the decoder would make: a step
that starts after the committed token at position q drafts from slot q - 1, where depth k's argmax is the
draft for position q + k, computed from the committed tokens and, for k > 1, from drafts 1..k-1 (the
teacher-forced tokens equal them whenever they are accepted, and a draft after a rejected one is never looked
at). :func:`greedy_walk` walks that table as the decoder would: accept the matching prefix, add the bonus,
jump.

Conventions (the same in the walk and in :func:`speculative_decode`, the real loop that checks it):

* The prefill commits the first new token; every step after it is one backbone forward.
* A step is counted only when its drafts and its bonus token all lie inside the continuation
  (``q + D + 1 <= L - 1`` for a text of L tokens), so every counted step is a full one: acceptance length
  = tokens committed / steps = 1 + the sum of the per-position acceptance rates.
* Depth k attends over its own states at earlier slots, computed from the committed text, as in training.

With a temperature, standard speculative sampling accepts draft k with probability ``Σ_x min(p, q)``
(p: the backbone's distribution at the draft's position, q: the depth's); :func:`SamplingAcceptance`
chains these per slot along the same text: an estimate (the text is the greedy one, and acceptances are
treated as independent given it), not an exact figure.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, GenerationConfig

from mtp_recipes import hf_compat
from mtp_recipes.loss import AcceptanceStats, acceptance_stats
from mtp_recipes.model import MTPModel

Step = tuple[int, int]  # (position of the last committed token when the step starts, drafts accepted)


# ---- counts --------------------------------------------------------------------------------------
@dataclass
class GreedyAcceptance:
    """Steps of greedy speculative decoding with ``num_drafts`` drafts each; add instances to pool prompts."""

    num_drafts: int
    steps: int = 0
    tokens: int = 0
    accepted: list[int] = field(default_factory=list)  # accepted[j]: steps whose draft j+1 was accepted

    def __post_init__(self) -> None:
        self.accepted = list(self.accepted) or [0] * self.num_drafts

    @classmethod
    def from_steps(cls, steps: Iterable[Step], num_drafts: int) -> GreedyAcceptance:
        out = cls(num_drafts)
        for _, a in steps:
            out.steps += 1
            out.tokens += a + 1
            for j in range(a):
                out.accepted[j] += 1
        return out

    def __add__(self, other: GreedyAcceptance) -> GreedyAcceptance:
        accepted = [x + y for x, y in zip(self.accepted, other.accepted, strict=True)]
        return GreedyAcceptance(self.num_drafts, self.steps + other.steps, self.tokens + other.tokens, accepted)

    @property
    def length(self) -> float:
        """Mean tokens per backbone forward (1.0 when no step was counted)."""
        return self.tokens / self.steps if self.steps else 1.0

    @property
    def rates(self) -> list[float]:
        """Share of steps whose draft j+1 was accepted (vLLM's per-position acceptance rate)."""
        return [a / self.steps if self.steps else 0.0 for a in self.accepted]


@dataclass
class SamplingAcceptance:
    """Expected acceptance of speculative sampling, summed over slots; add instances to pool prompts.

    ``chained[j]`` sums ``Π_{i<=j+1} β_i`` over the counted slots (the probability that drafts 1..j+1 are all
    accepted), so the expected tokens per step are ``1 + Σ_j chained[j] / slots``.
    """

    num_drafts: int
    slots: int = 0
    chained: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.chained = list(self.chained) or [0.0] * self.num_drafts

    def __add__(self, other: SamplingAcceptance) -> SamplingAcceptance:
        chained = [x + y for x, y in zip(self.chained, other.chained, strict=True)]
        return SamplingAcceptance(self.num_drafts, self.slots + other.slots, chained)

    @property
    def length(self) -> float:
        return 1 + sum(self.rates)

    @property
    def rates(self) -> list[float]:
        return [c / self.slots if self.slots else 0.0 for c in self.chained]


# ---- the teacher-forced table and the walk ---------------------------------------------------------
@dataclass
class DraftTable:
    """One teacher-forced forward over ``tokens`` (prompt + continuation from index ``start``).

    ``drafts[k-1, t]`` is depth k's argmax at slot t (its guess for token t + k + 1); ``backbone[t]`` the
    backbone's argmax at slot t; ``accept_prob[k-1, t]`` is ``Σ_x min(p, q)`` between depth k at slot t and the
    backbone at slot t + k (with a temperature; else None).
    """

    tokens: list[int]
    start: int
    drafts: torch.Tensor
    backbone: torch.Tensor
    accept_prob: torch.Tensor | None = None

    @property
    def num_layers(self) -> int:
        return self.drafts.shape[0]

    def greedy(self, num_drafts: int) -> GreedyAcceptance:
        return GreedyAcceptance.from_steps(greedy_walk(self.drafts, self.tokens, self.start, num_drafts), num_drafts)

    def teacher_forced(self, num_drafts: int) -> AcceptanceStats:
        """Training's estimate on this text: per slot of the continuation, are depths 1..k all right?"""
        length = len(self.tokens)
        tokens = torch.tensor(self.tokens)
        slots = torch.arange(length)
        correct, valid = [], []
        for k in range(1, num_drafts + 1):
            ok = (slots >= self.start - 1) & (slots + k + 1 < length)
            target = tokens[(slots + k + 1).clamp(max=length - 1)]
            correct.append((self.drafts[k - 1].cpu() == target) & ok)
            valid.append(ok)
        return acceptance_stats(correct, valid)

    def sampling(self, num_drafts: int) -> SamplingAcceptance:
        """Expected acceptance under speculative sampling at the table's temperature, over continuation slots."""
        if self.accept_prob is None:
            raise ValueError("the table was built without a temperature")
        last = len(self.tokens) - 2 - num_drafts  # slots whose drafts 1..num_drafts are all tokens of the text
        beta = self.accept_prob[:num_drafts, self.start - 1 : last + 1].double().cpu()
        chained = beta.cumprod(dim=0).sum(dim=1)
        return SamplingAcceptance(num_drafts, max(0, last - self.start + 2), chained.tolist())


def greedy_walk(
    drafts: torch.Tensor | Sequence[Sequence[int]], tokens: Sequence[int], start: int, num_drafts: int
) -> list[Step]:
    """The steps a greedy speculative decoder takes over ``tokens`` (its own greedy text from ``start`` on).

    After the committed token at position q, draft k is depth k's argmax at slot q - 1; the leading drafts equal
    to ``tokens[q + k]`` are accepted, and the bonus token at q + a + 1 is where the next step starts.
    """
    table = drafts.tolist() if isinstance(drafts, torch.Tensor) else [list(d) for d in drafts]
    if num_drafts > len(table):
        raise ValueError(f"{num_drafts} drafts asked of a model with {len(table)} MTP depths")
    steps: list[Step] = []
    q = start
    while q + num_drafts + 1 <= len(tokens) - 1:
        a = 0
        while a < num_drafts and table[a][q - 1] == tokens[q + a + 1]:
            a += 1
        steps.append((q, a))
        q += a + 1
    return steps


def counted_steps(steps: Iterable[Step], num_drafts: int, length: int) -> list[Step]:
    """The steps a walk over a text of ``length`` tokens counts: those whose drafts and bonus lie inside it."""
    return [(q, a) for q, a in steps if q + num_drafts + 1 <= length - 1]


@torch.no_grad()
def draft_table(
    model: MTPModel, tokens: Sequence[int], start: int, temperature: float = 0.0, chunk_size: int = 256
) -> DraftTable:
    """Run ``model`` once, teacher-forced, over ``tokens`` and keep per slot what the decoder needs.

    Logits are formed ``chunk_size`` slots at a time, so no ``[tokens, vocab]`` tensor is held in full.
    """
    device = next(model.parameters()).device
    ids = torch.tensor([list(tokens)], device=device)
    out = model(input_ids=ids)
    main_head = model.backbone.get_output_embeddings().weight
    heads = model.mtp_heads()
    depth_heads = heads if isinstance(heads, list) else [heads] * model.mtp.num_layers
    main = out.hidden_states[0]
    depth_states = [h[0] for h in out.mtp_hidden_states]
    length = ids.shape[1]
    drafts = torch.empty(len(depth_states), length, dtype=torch.long, device=device)
    backbone = torch.empty(length, dtype=torch.long, device=device)
    accept_prob = torch.zeros(len(depth_states), length, device=device) if temperature > 0 else None
    for lo in range(0, length, chunk_size):
        hi = min(lo + chunk_size, length)
        backbone[lo:hi] = (main[lo:hi] @ main_head.T).argmax(-1)
        for k, (states, head) in enumerate(zip(depth_states, depth_heads, strict=True), start=1):
            logits = (states[lo:hi] @ head.T).float()
            drafts[k - 1, lo:hi] = logits.argmax(-1)
            end = min(hi, length - k)  # slot t is compared with the backbone at t + k
            if accept_prob is not None and end > lo:
                q = torch.softmax(logits[: end - lo] / temperature, dim=-1)
                p = torch.softmax((main[lo + k : end + k] @ main_head.T).float() / temperature, dim=-1)
                accept_prob[k - 1, lo:end] = torch.minimum(p, q).sum(-1)
    return DraftTable(
        list(tokens), start, drafts.cpu(), backbone.cpu(), None if accept_prob is None else accept_prob.cpu()
    )


# ---- plain greedy and a real speculative decoding loop -------------------------------------------
def greedy_config(max_new_tokens: int, eos_token_ids: Sequence[int], pad_token_id: int) -> GenerationConfig:
    """Plain greedy decoding that stops at ``eos_token_ids``: no sampling, no beams, no penalties.

    Every field that changes the greedy token is set: ``generate`` fills unset ones from the model's config.
    """
    if not eos_token_ids:
        raise ValueError("greedy decoding needs at least one end-of-sequence token id")
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        do_sample=False,
        num_beams=1,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        eos_token_id=list(eos_token_ids),
        pad_token_id=pad_token_id,
    )


@torch.no_grad()
def greedy_generate(
    model: MTPModel, prompt: Sequence[int], max_new_tokens: int, eos_token_ids: Sequence[int]
) -> list[int]:
    """The backbone's greedy continuation of ``prompt`` by transformers' ``generate`` (with its cache)."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt)], device=device)
    pad = model.text_config.pad_token_id
    config = greedy_config(max_new_tokens, eos_token_ids, pad if pad is not None else 0)
    out = model.backbone.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, ids.shape[1] :].tolist()


@dataclass
class SpeculativeResult:
    """The output of :func:`speculative_decode`: new tokens and, per step, ``(position, drafts accepted)``."""

    tokens: list[int]
    steps: list[Step]
    backbone_forwards: int


class _Backbone:
    """The backbone with a cache, returning greedy tokens and the states depth 1 reads, per position."""

    def __init__(self, model: MTPModel) -> None:
        self.model = model
        self.decoder = model.backbone.get_decoder()
        self.head = model.backbone.get_output_embeddings().weight
        self.cache = DynamicCache(config=model.backbone.config)
        self.cache_kwarg = hf_compat.cache_keyword(self.decoder.forward)
        self.length = 0

    def __call__(self, ids: list[int]) -> tuple[list[int], torch.Tensor]:
        """Feed ``ids`` at the next positions: the greedy token after each, and depth 1's input states."""
        device = self.head.device
        pre_norm: list[torch.Tensor] = []
        hook = None
        if self.model.conventions.h0 == "pre_norm":
            norm = self.model.family.final_norm(self.model.backbone)
            hook = norm.register_forward_pre_hook(lambda _, args: pre_norm.append(args[0]))
        try:
            out = self.decoder(
                input_ids=torch.tensor([ids], device=device),
                position_ids=torch.arange(self.length, self.length + len(ids), device=device)[None],
                use_cache=True,
                **{self.cache_kwarg: self.cache},
            )
        finally:
            if hook is not None:
                hook.remove()
        self.length += len(ids)
        normed = out.last_hidden_state[0]
        return (normed @ self.head.T).argmax(-1).tolist(), (pre_norm[-1][0] if pre_norm else normed)


class _Drafter:
    """The MTP chain as a serving engine runs it, from the committed tokens and the backbone's states.

    Depth 1 reads the backbone state the model's conventions name (``conventions.h0``) at each slot and the
    embedding of the slot's next token, zeroed at position 0 when the model says so; depth k + 1 reads what depth k
    passes on
    (``passes_on``) and the embedding of the token k + 1 ahead, a draft where the text has none yet.
    """

    def __init__(self, model: MTPModel) -> None:
        self.model = model
        self.embed = model.backbone.get_input_embeddings()
        heads = model.mtp_heads()
        self.heads = heads if isinstance(heads, list) else [heads] * model.mtp.num_layers

    def __call__(self, committed: list[int], states: torch.Tensor, num_drafts: int) -> list[int]:
        """Drafts for the positions after ``committed``, from ``states`` at slots ``0 .. len(committed) - 2``."""
        slots = len(committed) - 1
        device = states.device
        positions = torch.arange(slots, device=device)[None]
        hidden = states[None]
        run = self.model.family.block_runner(self.model.backbone, hidden, positions, None)
        text = list(committed)
        drafts: list[int] = []
        for k in range(1, num_drafts + 1):
            embeds = self.embed(torch.tensor([text[k : k + slots]], device=device))
            if k == 1 and self.model.mtp.zero_first_embedding:
                embeds[:, 0] = 0
            normed, pre_norm = self.model.mtp.depth(k)(embeds, hidden, run)
            drafts.append(int((normed[0, -1] @ self.heads[k - 1].T).argmax()))
            text.append(drafts[-1])
            hidden = normed if self.model.mtp.passes_on == "normed" else pre_norm
        return drafts


@torch.no_grad()
def speculative_decode(
    model: MTPModel,
    prompt: Sequence[int],
    max_new_tokens: int,
    num_drafts: int,
    eos_token_ids: Sequence[int],
) -> SpeculativeResult:
    """Greedy MTP speculative decoding: draft with the MTP chain, verify with one backbone forward, accept.

    The backbone keeps a transformers cache (Nemotron-H's holds Mamba2 states, which cannot be cut back): it
    is copied before each verification and, when a draft was rejected, restored and fed the accepted tokens.
    The drafter re-runs the MTP depths over the whole text each step (no MTP cache): slow, and plain.
    """
    if not 0 <= num_drafts <= model.mtp.num_layers:
        raise ValueError(f"{num_drafts} drafts asked of a model with {model.mtp.num_layers} MTP depths")
    stop = set(eos_token_ids)
    backbone, drafter = _Backbone(model), _Drafter(model)
    greedy, states = backbone(list(prompt))
    text = [*prompt, greedy[-1]]
    forwards, steps = 1, []
    while len(text) - len(prompt) < max_new_tokens and not stop.intersection(text[len(prompt) :]):
        q = len(text) - 1
        drafts = drafter(text, states, num_drafts) if num_drafts else []
        snapshot = copy.deepcopy(backbone.cache)
        verified, new_states = backbone([text[-1], *drafts])
        forwards += 1
        a = 0
        while a < num_drafts and drafts[a] == verified[a]:
            a += 1
        steps.append((q, a))
        if a < num_drafts:  # put the cache back to the committed text
            backbone.cache, backbone.length = snapshot, q
            backbone([text[-1], *drafts[:a]])
        states = torch.cat([states, new_states[: a + 1]])
        text += [*drafts[:a], verified[a]]
    new = text[len(prompt) :][:max_new_tokens]
    for i, token in enumerate(new):
        if token in stop:
            new = new[: i + 1]
            break
    return SpeculativeResult(new, steps, forwards)
