"""MiniMax-M3 specifics: the published checkpoint layout (with and without ``language_model.``), the
frozen indexer, document-aware sparse attention for packing, and the MTP forward against a plain-PyTorch reference."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl as hf
from transformers.models.minimax_m3_vl.configuration_minimax_m3_vl import MiniMaxM3VLConfig

from mtp_recipes.document_layout import position_in_document
from mtp_recipes.families.minimax_m3_attention import DocumentIndexer, document_block_keep
from mtp_recipes.model import MTPModel
from tests.helpers import debug_model_config, packed_batch, published_round_trip
from tests.mtp.test_packed_equivalence import keep_float64  # noqa: F401  (fixture)

VL = "language_model."
MTP_NAMES = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "final_layernorm.weight")


def published_checkpoint(path, prefix: str, depths: int = 2):
    """A tiny MiniMax-M3 checkpoint as MiniMax ships it: transformers' own VL ``save_pretrained`` for the
    backbone (on-disk names, vision tower), MTP tensors under the spec names, bf16 except the router's
    float32 ``e_score_correction_bias``. ``prefix=""`` gives the text-only layout (text config, no towers)."""
    cfg = debug_model_config("minimax_m3_debug")
    cfg["text_config"] = {**cfg["text_config"], "num_mtp_modules": depths}
    config = MiniMaxM3VLConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    torch.manual_seed(0)
    hf.MiniMaxM3SparseForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(path)
    tensors = load_file(path / "model.safetensors")
    last = f"{VL}model.layers.{config.text_config.num_hidden_layers - 1}."
    h = config.text_config.hidden_size
    for d in range(depths):
        mtp = f"{VL}model.mtp.layers.{d}."
        tensors.update({mtp + n: torch.zeros((h, 2 * h) if "eh_proj" in n else (h,)) for n in MTP_NAMES})
        tensors.update(
            {k.replace(last, mtp + "transformer_layer."): v for k, v in tensors.items() if k.startswith(last)}
        )
    g = torch.Generator().manual_seed(1)
    for k, v in tensors.items():  # random values everywhere, so "bit-exact" means something
        dtype = torch.float32 if k.endswith("e_score_correction_bias") else torch.bfloat16
        tensors[k] = (torch.randn(v.shape, generator=g) * 0.05).to(dtype)
    if prefix == "":
        tensors = {k[len(VL) :]: v for k, v in tensors.items() if k.startswith(VL)}
        config.text_config.to_json_file(path / "config.json")
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return tensors, json.loads((path / "config.json").read_text())


def mtp_section(cfg: dict) -> dict:
    return cfg.get("text_config", cfg)


@pytest.mark.parametrize("prefix", [VL, ""], ids=["vl", "text_only"])
def test_published_layout_round_trip_and_training(prefix, tmp_path):
    published, published_cfg = published_checkpoint(tmp_path / "pub", prefix)
    assert any(
        k.startswith(f"{prefix}model.mtp.layers.1.transformer_layer.block_sparse_moe.experts.") for k in published
    )
    assert any(k.startswith("vision_tower.") for k in published) == (prefix == VL)

    # Untouched: every tensor (vision tower included) and the config come back bit-exact; then two
    # AdamW steps (with weight decay) and a save keep keys, shapes and dtypes; indexers stay frozen.
    model, trained = published_round_trip(tmp_path / "pub", published, tmp_path, lr=1e-2, weight_decay=0.1)
    assert model.mtp_config.num_layers == 2
    exported_cfg = json.loads((tmp_path / "same" / "config.json").read_text())
    # The one field added: vLLM drafts with every module only when num_nextn_predict_layers > 1.
    assert mtp_section(exported_cfg).pop("num_nextn_predict_layers") == mtp_section(published_cfg)["num_mtp_modules"]
    assert exported_cfg == published_cfg
    assert not any("indexer" in n for n, _ in model.named_parameters())
    for k, v in published.items():
        if "index_" in k or not k.startswith(prefix) or k.endswith("e_score_correction_bias"):
            assert torch.equal(trained[k], v), k  # indexers, passthrough towers, router bias buffers
    assert not torch.equal(
        trained[f"{prefix}model.mtp.layers.1.eh_proj.weight"], published[f"{prefix}model.mtp.layers.1.eh_proj.weight"]
    )
    saved_cfg = json.loads((tmp_path / "trained" / "config.json").read_text())
    assert mtp_section(saved_cfg)["num_mtp_modules"] == mtp_section(published_cfg)["num_mtp_modules"] == 2


def test_fresh_export_writes_num_mtp_modules_in_text_config(tmp_path):
    model = MTPModel.from_config(debug_model_config("minimax_m3_debug"), num_layers=2)
    cfg = json.loads((model.save_pretrained(tmp_path / "c") / "config.json").read_text())
    assert cfg["model_type"] == "minimax_m3_vl"
    assert cfg["text_config"]["num_mtp_modules"] == 2 and "num_mtp_modules" not in cfg


def sparse_model(depths: int = 1, **text_changes) -> MTPModel:
    """The debug model in float64 (eager experts), text config changed by ``text_changes``."""
    cfg = debug_model_config("minimax_m3_debug")
    cfg["text_config"] = {**cfg["text_config"], **text_changes}
    torch.manual_seed(0)
    return MTPModel.from_config(cfg, num_layers=depths, experts_implementation="eager").double()


def transformers_twin(model: MTPModel) -> tuple[nn.Module, nn.Module]:
    """transformers' own text LM and MTP decoder layer (no class swap), with ``model``'s weights."""
    cfg = model.text_config
    text = hf.MiniMaxM3VLForCausalLM(cfg).double()
    text.load_state_dict(model.backbone.state_dict())
    block = hf.MiniMaxM3VLDecoderLayer(cfg, layer_idx=cfg.num_hidden_layers - 1).double()
    block.load_state_dict(model.mtp.depths[0].blocks[0].state_dict())
    assert type(text.model.layers[-1].self_attn.indexer) is hf.MiniMaxM3VLIndexer
    assert type(model.backbone.model.layers[-1].self_attn) is hf.MiniMaxM3VLAttention
    assert type(model.backbone.model.layers[-1].self_attn.indexer) is DocumentIndexer
    return text.eval(), block.eval()


def test_one_document_per_row_is_transformers_bit_exact():
    """On unpacked rows the swapped indexer is transformers' own: backbone and MTP block bit-identical,
    on a row long enough (24 > top-2 x 4) for the sparse selection to drop blocks."""
    model = sparse_model().eval()
    text, block = transformers_twin(model)
    ids = packed_batch(model.text_config.vocab_size, [[24], [24]], seed=3)["input_ids"]
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    with torch.no_grad():
        ours, _ = model.family.backbone_states(model.backbone, ids, pos, None)
        theirs = text.model(input_ids=ids, position_ids=pos).last_hidden_state
        assert torch.equal(ours, theirs)
        assert torch.equal(model(input_ids=ids).hidden_states, theirs)
        x = torch.randn_like(ours)
        run = model.family.block_runner(model.backbone, ours, pos, None)
        rope = text.model.rotary_emb(x, position_ids=pos)
        assert torch.equal(
            run(model.mtp.depths[0].blocks[0], x),
            block(x, position_embeddings=rope, attention_mask=None, position_ids=pos),
        )


# Rows longer than index_topk_blocks x index_block_size, documents starting mid-block (bs=4: 6, 19, 3+...).
ROWS = [[6, 13, 11], [3, 9, 18]]


@pytest.mark.parametrize("topk,local", [(2, 1), (3, 2)])
def test_packed_selection_is_the_alone_selection(topk, local):
    """Per query, the document-aware keep mask on a packed row equals transformers' own indexer +
    build_block_mask on the document alone (top-k blocks, local blocks, causal), bit for bit."""
    model = sparse_model(index_topk_blocks=topk, index_local_blocks=local).eval()
    attn = model.backbone.model.layers[-1].self_attn
    heads = model.text_config.num_attention_heads
    batch = packed_batch(model.text_config.vocab_size, ROWS, seed=2)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(*batch["input_ids"].shape, model.text_config.hidden_size, generator=g, dtype=torch.float64)
    pos = position_in_document(batch["seq_idx"])
    rope = model.backbone.model.rotary_emb(hidden, position_ids=pos)
    keep = document_block_keep(attn.indexer, hidden, rope, batch["seq_idx"], heads)
    selective = 0
    for row, docs in enumerate(ROWS):
        start = 0
        for n in docs:
            span = slice(start, start + n)
            h, p = hidden[row : row + 1, span], pos[row : row + 1, span]
            alone_rope = model.backbone.model.rotary_emb(h, position_ids=p)
            with torch.no_grad():
                blocks = attn.indexer(h, alone_rope, None, p)
                alone = attn.indexer.build_block_mask(blocks, None, n, h.dtype, h.device, p) == 0
            assert torch.equal(keep[row : row + 1, :, span, span], alone), (row, start)
            assert not keep[row, :, span].any(-1).logical_not().any()  # every query keeps a key
            assert not keep[row, :, span][..., torch.arange(keep.shape[-1]) >= start + n].any()
            assert not keep[row, :, span][..., torch.arange(keep.shape[-1]) < start].any()
            selective += int((alone.sum(-1) < torch.arange(1, n + 1)).any())
            start += n
    assert selective >= 2  # the top-k really drops visible blocks (top-3: the 13- and 18-token documents)


def test_indexer_takes_the_cache_positionally_or_under_either_keyword():
    """transformers renamed the indexer's cache argument (``past_key_values`` -> ``cache``): on a packed row
    every spelling of the call gives the per-document selection, and a KV cache is refused in one line."""
    model = sparse_model().eval()
    indexer = model.backbone.model.layers[-1].self_attn.indexer
    batch = packed_batch(model.text_config.vocab_size, ROWS, seed=2)
    hidden = torch.randn(*batch["input_ids"].shape, model.text_config.hidden_size, dtype=torch.float64)
    pos = position_in_document(batch["seq_idx"])
    rope = model.backbone.model.rotary_emb(hidden, position_ids=pos)
    expected = document_block_keep(indexer, hidden, rope, batch["seq_idx"], model.text_config.num_attention_heads)
    for args, kwargs in [
        ((None, pos), {}),
        ((None,), {"position_ids": pos}),
        ((), {"cache": None, "position_ids": pos}),
        ((), {"past_key_values": None, "position_ids": pos}),
    ]:
        assert torch.equal(indexer(hidden, rope, *args, **kwargs), expected), (len(args), sorted(kwargs))
    with pytest.raises(NotImplementedError, match="KV cache"):
        indexer(hidden, rope, cache=object(), position_ids=pos)


@pytest.mark.usefixtures("keep_float64")
def test_packed_row_equals_transformers_on_each_document_alone():
    """Packed rows (several documents, mid-block starts, S > top-k x block) through the document-aware
    attention == each document run alone by transformers' own code (one document per row): backbone, MTP depth,
    losses and gradients, float64 1e-9."""
    model = sparse_model()
    batch = packed_batch(model.text_config.vocab_size, ROWS, seed=4)
    out = model(**batch, num_label_tokens=1, num_depth_tokens=[1])
    out.loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    main, depth = 0.0, 0.0
    for row, docs in enumerate(ROWS):
        start = 0
        for n in docs:
            span = slice(start, start + n)
            alone = {k: batch[k][row : row + 1, span] for k in ("input_ids", "labels")}
            ref = model(
                **alone, num_label_tokens=1, num_depth_tokens=[1]
            )  # positions never restart: transformers' path
            ref.loss.backward()
            torch.testing.assert_close(out.hidden_states[row : row + 1, span], ref.hidden_states, rtol=0, atol=1e-9)
            torch.testing.assert_close(
                out.mtp_hidden_states[0][row : row + 1, span], ref.mtp_hidden_states[0], rtol=0, atol=1e-9
            )
            main, depth = main + ref.main_loss, depth + ref.mtp_losses[0]
            start += n
    torch.testing.assert_close(out.main_loss, main, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(out.mtp_losses[0], depth, rtol=1e-12, atol=1e-9)
    for n, g in packed_grads.items():
        torch.testing.assert_close(g, model.get_parameter(n).grad, rtol=1e-7, atol=1e-9)


def test_mtp_forward_matches_a_plain_pytorch_reference():
    """Depth k: cat[enorm(emb(x_{t+k})), hnorm(h_{k-1})] -> eh_proj -> decoder layer -> final_layernorm,
    norms Gemma-style ``x * (1 + w)``, the block output *before* final_layernorm passed on, depth 1's
    embedding zero at position 0 (vLLM's drafter), logits through the shared lm_head."""
    torch.manual_seed(0)
    model = MTPModel.from_config(
        debug_model_config("minimax_m3_debug"), num_layers=2, experts_implementation="eager"
    ).double()
    with torch.no_grad():  # norms start at identity (w = 0): randomise them so (1 + w) vs w shows
        for name, p in model.mtp.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.5)
    batch = packed_batch(model.text_config.vocab_size, [[16]])
    ids, s = batch["input_ids"], batch["input_ids"].shape[1]
    out = model(**batch)

    text = model.backbone.model
    # h0 is the backbone's own final-normed output for a single document.
    torch.testing.assert_close(out.hidden_states, text(input_ids=ids).last_hidden_state, rtol=0, atol=1e-12)

    def rms(x, w, eps=model.text_config.rms_norm_eps):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + w)

    pos = torch.arange(s)[None]
    freqs = pos[..., None].double() * text.rotary_emb.inv_freq.double()
    rope = (torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin())
    emb, head = model.backbone.get_input_embeddings().weight, model.backbone.lm_head.weight
    assert model.mtp_heads() is head
    h = out.hidden_states
    for k, depth in enumerate(model.mtp.depths, start=1):
        shifted = torch.cat([ids[:, k:], torch.zeros_like(ids[:, :k])], dim=1)
        e = emb[shifted].masked_fill((pos == 0)[..., None], 0.0) if k == 1 else emb[shifted]
        x = torch.cat([rms(e, depth.enorm.weight), rms(h, depth.hnorm.weight)], -1) @ depth.eh_proj.weight.T
        # The block is transformers' decoder layer (sparse attention + MoE) run as for one unpacked document.
        x = depth.blocks[0](x, position_embeddings=rope, attention_mask=None, position_ids=pos)
        normed = rms(x, depth.final_norm.weight)
        # transformers' Gemma RMSNorm rounds through float32 even for float64 inputs, hence 1e-6.
        torch.testing.assert_close(out.mtp_hidden_states[k - 1], normed, rtol=1e-6, atol=1e-6)
        h = x
        target = batch["labels"][0, k:]
        ce = F.cross_entropy((normed[0, : s - k] @ head.T), target, ignore_index=-100)
        torch.testing.assert_close(out.mtp_losses[k - 1], ce, rtol=1e-6, atol=1e-6)


def test_frozen_indexer_projections_compute_in_the_input_dtype_and_keep_their_buffers():
    """Indexer weights are buffers (FSDP2's mixed precision never casts them): their linear layers compute in the
    input's dtype, as autocast would round them, while the stored buffers keep dtype and values; every other linear
    layer is left as transformers built it."""
    torch.manual_seed(0)
    model = MTPModel.from_config(debug_model_config("minimax_m3_debug"))
    indexer_linears = [m for n, m in model.named_modules() if ".indexer." in n and isinstance(m, nn.Linear)]
    assert indexer_linears and all(not isinstance(m.weight, nn.Parameter) for m in indexer_linears)
    assert all(
        type(m) is nn.Linear for n, m in model.named_modules() if ".indexer." not in n and isinstance(m, nn.Linear)
    )
    layer = indexer_linears[0]
    weight, bias = layer.weight.clone(), None if layer.bias is None else layer.bias.clone()
    x = torch.randn(3, layer.in_features)
    out = layer(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, F.linear(x.bfloat16(), weight.bfloat16(), None if bias is None else bias.bfloat16()))
    assert torch.equal(
        layer(x.double()), F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    )
    assert layer.weight.dtype == torch.float32 and torch.equal(layer.weight, weight)
