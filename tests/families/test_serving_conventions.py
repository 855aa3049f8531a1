"""The trained depth logits equal what a serving engine's drafter computes from the exported checkpoint.

The engine's conventions are stated here, from vLLM 0.34's MTP model files and proposer (0.33 runs the same math
except GLM-4.5's, which recycled the state before ``shared_head.norm``; SGLang 0.5.23 agrees except for the
position-0 embedding of DeepSeek-V3 (V3.2) and GLM-4.5, tested with ``serving.engine=sglang``; MiMo-V2-Flash is
tested with both), independently of the
``Family`` classes:

* ``h0``: the backbone state the drafter's first step reads (after or before the final norm);
* ``recycle``: what step k hands to step k+1 (the state after or before the depth's final norm);
* ``zero_first``: the drafter zeroes the token embedding where the *drafter's* position is 0. Step k of
  vLLM's proposer runs at the verified token's position plus k - 1, so only the first step meets 0.

The reference drafts teacher-forced (every slot's next tokens known, one document per row) and uses only
the loaded model's modules one by one: fusion, the blocks through the backbone's own masks and rotary
tables, the head norm and the head. Its blocks run at the slot's own positions, as training does: the
engine's k - 1 offset leaves RoPE attention unchanged (it depends on position differences only), and
transformers' MiniMax-M3 indexer requires positions below the row length.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from mtp_recipes.model import MTPModel
from tests.helpers import debug_model_config, depths


@dataclass(frozen=True)
class Engine:
    h0: str
    recycle: str
    zero_first: bool


ENGINE = {
    "nemotron_h_debug": Engine(h0="normed", recycle="normed", zero_first=False),
    "deepseek_v3_debug": Engine(h0="normed", recycle="normed", zero_first=True),
    "deepseek_v32_debug": Engine(h0="normed", recycle="normed", zero_first=True),
    "glm4_moe_debug": Engine(h0="normed", recycle="normed", zero_first=True),
    "step3p5_debug": Engine(h0="pre_norm", recycle="pre_norm", zero_first=False),
    "minimax_m3_debug": Engine(h0="normed", recycle="pre_norm", zero_first=True),
    "mimo_v2_flash_debug": Engine(h0="normed", recycle="normed", zero_first=False),
    "qwen3_next_debug": Engine(h0="normed", recycle="normed", zero_first=False),
    # qwen3_5_mtp.py: the same predictor as qwen3_next_mtp.py, layer step % mtp_num_hidden_layers
    "qwen3_5_debug": Engine(h0="normed", recycle="normed", zero_first=False),
    "qwen3_5_moe_debug": Engine(h0="normed", recycle="normed", zero_first=False),
}
# SGLang 0.5.23 deepseek_nextn.py, glm4_moe_nextn.py: the embedding at position 0 is kept
SGLANG = {
    "deepseek_v3_debug": Engine(h0="normed", recycle="normed", zero_first=False),
    "deepseek_v32_debug": Engine(h0="normed", recycle="normed", zero_first=False),
    "glm4_moe_debug": Engine(h0="normed", recycle="normed", zero_first=False),
    # mimo_v2_nextn.py: final_layernorm output recycled by the EAGLE worker, as vLLM's mimo_v2_mtp.py
    "mimo_v2_flash_debug": Engine(h0="normed", recycle="normed", zero_first=False),
    # qwen3_next_mtp.py: a one-layer Qwen3NextModel whose norm output is drafted and recycled, as vLLM's
    "qwen3_next_debug": Engine(h0="normed", recycle="normed", zero_first=False),
    # qwen3_5_mtp.py: fc + pre-fc norms, a one-layer text model whose norm output is drafted and recycled
    "qwen3_5_debug": Engine(h0="normed", recycle="normed", zero_first=False),
    "qwen3_5_moe_debug": Engine(h0="normed", recycle="normed", zero_first=False),
}
DEPTHS = 2


def final_norm(model: MTPModel) -> torch.nn.Module:
    decoder = model.backbone.get_decoder()
    return decoder.norm_f if hasattr(decoder, "norm_f") else decoder.norm


def perturbed(name: str, engine: str = "vllm") -> MTPModel:
    """A float64 debug model with D=2 whose norms are all away from identity (so pre/post norm differ)."""
    torch.manual_seed(0)
    model = MTPModel.from_config(
        debug_model_config(name), **depths(name, DEPTHS), experts_implementation="eager", engine=engine
    )
    with torch.no_grad():
        for module_name, param in model.named_parameters():
            if "norm" in module_name:
                param.add_(torch.randn_like(param) * 0.3)
    return model.double()


def engine_drafts(model: MTPModel, ids: torch.Tensor, engine: Engine) -> list[torch.Tensor]:
    """Per step k, the drafter's logits at every slot (slot t drafts token t + k + 1)."""
    length = ids.shape[1]
    positions = torch.arange(length)[None]
    decoder = model.backbone.get_decoder()
    before_norm = []
    hook = final_norm(model).register_forward_pre_hook(lambda _, args: before_norm.append(args[0]))
    normed = decoder(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    hook.remove()
    hidden = normed if engine.h0 == "normed" else before_norm[-1]
    embed = model.backbone.get_input_embeddings()
    logits = []
    for k in range(1, DEPTHS + 1):
        depth = model.mtp.depth(k)
        step_positions = positions + (k - 1)
        tokens = torch.zeros_like(ids)
        tokens[:, : length - k] = ids[:, k:]
        emb = embed(tokens)
        if engine.zero_first:
            emb = emb.masked_fill((step_positions == 0).unsqueeze(-1), 0.0)
        x = depth.eh_proj(torch.cat([depth.enorm(emb), depth.hnorm(hidden)], dim=-1))
        run = model.family.block_runner(model.backbone, x, positions, None)
        for block in depth.blocks:
            x = run(block, x)
        out = depth.final_norm(x)
        head = depth.head.weight if depth.head is not None else model.backbone.get_output_embeddings().weight
        logits.append(out @ head.T)
        hidden = out if engine.recycle == "normed" else x
    return logits


@pytest.mark.parametrize(
    ("name", "engine"), [*((n, "vllm") for n in sorted(ENGINE)), *((n, "sglang") for n in sorted(SGLANG))]
)
def test_trained_depth_logits_equal_the_engine_drafter_on_the_export(name, engine, tmp_path):
    trained = perturbed(name, engine)
    trained.save_pretrained(tmp_path / "export")
    served = MTPModel.from_pretrained(
        tmp_path / "export", dtype=torch.float64, experts_implementation="eager", engine=engine, **depths(name, DEPTHS)
    )
    ids = torch.randint(3, served.text_config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))

    ours = served(input_ids=ids).mtp_hidden_states
    heads = served.mtp_heads()
    reference = engine_drafts(served, ids, (ENGINE if engine == "vllm" else SGLANG)[name])
    for k in range(1, DEPTHS + 1):
        head = heads[k - 1] if isinstance(heads, list) else heads
        valid = slice(0, ids.shape[1] - k)  # slots whose drafted token exists in the row
        got, want = (ours[k - 1] @ head.T)[:, valid], reference[k - 1][:, valid]
        assert want.abs().max() > 0.1
        # float64 model; some transformers modules (routers, rotary tables, some norms) compute in float32
        assert (got - want).abs().max() < 1e-4, f"{name} depth {k}"


@pytest.mark.parametrize("name", sorted(ENGINE))
def test_final_norm_weight_reaches_depth_one_only_through_a_normed_h0(name):
    model = perturbed(name)
    ids = torch.randint(3, model.text_config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    before = model(input_ids=ids, return_logits=True)
    with torch.no_grad():
        final_norm(model).weight.add_(0.5)
    after = model(input_ids=ids, return_logits=True)
    assert (after.logits - before.logits).abs().max() > 1e-3  # the main head always reads the normed state
    moved = (after.mtp_hidden_states[0] - before.mtp_hidden_states[0]).abs().max()
    if ENGINE[name].h0 == "normed":
        assert moved > 1e-3
    else:
        assert moved < 1e-12


@pytest.mark.parametrize(
    ("name", "overrides", "engines"),
    [
        ("nemotron_h_debug", {"num_layers": 1}, {}),
        ("nemotron_h_debug", {"num_layers": 2}, {"vllm": "vLLM and SGLang", "sglang": "vLLM and SGLang"}),
        ("nemotron_h_debug", {"num_layers": 2, "use_repeated_layer": True}, {}),
        ("nemotron_h_debug", {"num_layers": 1, "block_types": "*-"}, {"vllm": "vLLM and", "sglang": "vLLM and"}),
        ("deepseek_v3_debug", {"num_layers": 1}, {}),
        ("deepseek_v3_debug", {"num_layers": 2}, {"sglang": "SGLang"}),
        ("deepseek_v32_debug", {"num_layers": 2}, {"sglang": "SGLang serves DeepSeek-V3.2 MTP with one depth"}),
        ("glm4_moe_debug", {"num_layers": 1}, {}),
        ("glm4_moe_debug", {"num_layers": 2}, {"sglang": "SGLang serves GLM-4.5 MTP with one depth"}),
        ("step3p5_debug", {"num_layers": 1}, {"sglang": "SGLang"}),  # 45 backbone layers only
        ("minimax_m3_debug", {"num_layers": 1}, {"sglang": "SGLang"}),
        ("minimax_m3_debug", {"num_layers": 2}, {"sglang": "SGLang", "vllm": "vLLM 0.34"}),
        ("mimo_v2_flash_debug", {"num_layers": 1}, {}),
        ("mimo_v2_flash_debug", {"num_layers": 2}, {"vllm": "vLLM 0.34 and SGLang", "sglang": "vLLM 0.34 and SGLang"}),
        ("mimo_v2_flash_debug", {"num_layers": 2, "use_repeated_layer": True}, {}),
        ("qwen3_next_debug", {"num_layers": 1}, {}),
        ("qwen3_next_debug", {"num_layers": 3, "use_repeated_layer": True}, {}),
        ("qwen3_5_moe_debug", {"num_layers": 3, "use_repeated_layer": True}, {}),
    ],
)
def test_unservable_layouts_are_named_at_export(name, overrides, engines, tmp_path, caplog):
    """Each engine's limits name that engine; an export warns only about the engine it is served with."""
    model = MTPModel.from_config(debug_model_config(name), **overrides)  # serving.engine=vllm
    for engine in ("vllm", "sglang"):
        limits = model.serving_limits(engine)
        assert [line[: len(engines[engine])] for line in limits] == ([engines[engine]] if engine in engines else [])
    assert model.serving_limits() == model.serving_limits("vllm")
    with caplog.at_level("WARNING", logger="mtp_recipes"):
        model.save_pretrained(tmp_path / "export")
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("export to")]
    assert [m.split(": ", 1)[1] for m in logged] == model.serving_limits("vllm")


def test_an_export_served_by_sglang_warns_about_sglang(tmp_path, caplog):
    model = MTPModel.from_config(debug_model_config("deepseek_v3_debug"), num_layers=2, engine="sglang")
    with caplog.at_level("WARNING", logger="mtp_recipes"):
        model.save_pretrained(tmp_path / "export")
    logged = [r.getMessage().split(": ", 1)[1] for r in caplog.records if r.getMessage().startswith("export to")]
    assert logged == model.serving_limits() and logged[0].startswith("SGLang serves DeepSeek-V3 MTP with one depth")


@pytest.mark.parametrize("name", ["deepseek_v3_debug", "nemotron_h_debug"])
def test_zero_first_embedding_override(name):
    """``mtp.zero_first_embedding`` overrides the family's default; only depth 1's input changes."""
    ids = torch.randint(3, 64, (1, 12), generator=torch.Generator().manual_seed(3))
    outputs = {}
    for zero in (None, True, False):
        torch.manual_seed(0)
        model = MTPModel.from_config(
            debug_model_config(name), num_layers=1, zero_first_embedding=zero, experts_implementation="eager"
        ).double()
        outputs[zero] = model(input_ids=ids).mtp_hidden_states[0]
    default = ENGINE[name].zero_first
    assert torch.equal(outputs[None], outputs[default])
    assert (outputs[True] - outputs[False]).abs().max() > 1e-3
