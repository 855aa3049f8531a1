"""The exact acceptance walk against a real speculative decoding loop, on the debug model of every family.

A randomly initialised model drafts nothing right, which would make "walk == loop" hold trivially. So the
models here are made partly predictable: the backbone's residual branches are scaled down (its greedy token
then depends mostly on the current token, and a little on the context through attention, Mamba2 and the
cache), and each depth's fusion reads mostly its token embedding and projects with the backbone's head
(Step-3.5's own heads get a copy of it). The drafts are then right at some steps and wrong at others, and
the test checks that both outcomes occur.
"""

from __future__ import annotations

import pytest
import torch

from mtp_recipes.acceptance import (
    GreedyAcceptance,
    counted_steps,
    draft_table,
    greedy_generate,
    greedy_walk,
    speculative_decode,
)
from mtp_recipes.model import MTPModel
from tests.helpers import DEBUG_MODELS, debug_model_config, depths

DEPTHS = 2
NEW_TOKENS = 32
EOS = [2]


def predictable(name: str) -> MTPModel:
    torch.manual_seed(0)
    model = MTPModel.from_config(debug_model_config(name), **depths(name, DEPTHS), experts_implementation="eager")
    model = model.double().eval()
    hidden = model.text_config.hidden_size
    with torch.no_grad():
        for param_name, param in model.backbone.named_parameters():
            if param_name.rsplit(".", 2)[-2] in ("o_proj", "out_proj", "down_proj") or param_name.endswith("down_proj"):
                param.mul_(0.05)
        for k in range(1, DEPTHS + 1):
            depth = model.mtp.depth(k)
            fusion = torch.randn(hidden, 2 * hidden, dtype=torch.float64) * 0.2 / hidden**0.5
            fusion[:, :hidden] += torch.eye(hidden, dtype=torch.float64)
            depth.eh_proj.weight.copy_(fusion)
            if depth.head is not None:
                depth.head.weight.copy_(model.backbone.get_output_embeddings().weight)
    return model


@pytest.fixture(scope="module", params=DEBUG_MODELS)
def case(request):
    model = predictable(request.param)
    prompt = torch.randint(3, model.text_config.vocab_size, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    greedy = greedy_generate(model, prompt, NEW_TOKENS, EOS)
    return request.param, model, prompt, greedy


@pytest.mark.parametrize("num_drafts", [1, 2])
def test_walk_equals_a_real_speculative_decoding_loop(case, num_drafts):
    name, model, prompt, greedy = case
    real = speculative_decode(model, prompt, NEW_TOKENS, num_drafts, EOS)
    assert real.tokens == greedy, f"{name}: speculative decoding changed the greedy output"
    assert real.backbone_forwards == 1 + len(real.steps)

    text = prompt + greedy
    walked = greedy_walk(draft_table(model, text, len(prompt)).drafts, text, len(prompt), num_drafts)
    assert walked == counted_steps(real.steps, num_drafts, len(text))
    accepted = [a for _, a in walked]
    assert len(walked) >= 5 and min(accepted) < num_drafts and max(accepted) > 0, f"{name}: {accepted}"

    fast = GreedyAcceptance.from_steps(walked, num_drafts)
    assert (
        fast.length == GreedyAcceptance.from_steps(counted_steps(real.steps, num_drafts, len(text)), num_drafts).length
    )
    assert 1 <= fast.length <= 1 + num_drafts
    assert fast.length == pytest.approx(1 + sum(fast.rates))
    assert fast.rates == sorted(fast.rates, reverse=True)  # draft j+1 is accepted only after draft j


def test_walk_of_perfect_and_useless_drafts():
    text = list(range(10, 40))
    perfect = [[text[t + k + 1] if t + k + 1 < len(text) else -1 for t in range(len(text))] for k in range(1, 4)]
    useless = [[-1] * len(text) for _ in range(3)]
    for drafts in (1, 2, 3):
        assert GreedyAcceptance.from_steps(greedy_walk(perfect, text, 5, drafts), drafts).length == 1 + drafts
        assert GreedyAcceptance.from_steps(greedy_walk(useless, text, 5, drafts), drafts).length == 1
        # every counted step is a full one: its drafts and its bonus token lie inside the text
        assert all(q + drafts + 1 <= len(text) - 1 for q, _ in greedy_walk(perfect, text, 5, drafts))


def test_expected_sampling_acceptance(case):
    name, model, prompt, greedy = case
    text = prompt + greedy
    temperature = 0.7
    table = draft_table(model, text, len(prompt), temperature=temperature, chunk_size=7)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([text]), return_logits=True)
    heads = model.mtp_heads()
    for k in range(1, DEPTHS + 1):
        head = heads[k - 1] if isinstance(heads, list) else heads
        for slot in (len(prompt) - 1, len(text) - 1 - k):
            p = torch.softmax(out.logits[0, slot + k] / temperature, -1)
            q = torch.softmax(out.mtp_hidden_states[k - 1][0, slot] @ head.T / temperature, -1)
            assert table.accept_prob[k - 1, slot].item() == pytest.approx(torch.minimum(p, q).sum().item(), abs=1e-5)

    # At a vanishing temperature each factor is 1 exactly where the draft is the backbone's greedy token, so
    # the chained estimate becomes training's cumulative accuracy on the same slots.
    cold = draft_table(model, text, len(prompt), temperature=1e-6)
    for drafts in (1, 2):
        got = cold.sampling(drafts)
        want = cold.teacher_forced(drafts)
        assert got.slots == int(want.cum_valid[-1])
        assert got.rates[-1] == pytest.approx(want.cumulative[-1].item(), abs=1e-6), name
        assert 1 < got.length < 1 + drafts
