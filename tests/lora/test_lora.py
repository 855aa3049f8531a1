"""LoRA that keeps MTP: what trains, what the exports hold, resume, and LoRA without peft installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mtp_recipes.config import to_schema
from mtp_recipes.errors import ConfigError
from mtp_recipes.lora import LoraSettings, require_peft
from mtp_recipes.model import MTPModel
from mtp_recipes.recipe import FinetuneRecipe
from tests.helpers import DEBUG_MODELS, debug_model_config, packed_batch
from tests.recipes.test_finetune import FAST, composed

CPU = [*FAST, "trainer.device=cpu"]
F64 = {"dtype": "float64", "experts_implementation": "eager"}


def train_records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


def adapted_pair(model: str, **lora) -> tuple[MTPModel, MTPModel]:
    """The same float64 debug model without and with LoRA (identical base weights), the adapters moved off B = 0."""
    models = []
    for settings in (None, LoraSettings(rank=4, alpha=8, **lora)):
        torch.manual_seed(0)
        models.append(MTPModel.from_config(debug_model_config(model), lora=settings, **F64))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in models[1].named_parameters():
            if ".lora_B." in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return models[0], models[1]


@pytest.mark.parametrize("model", ["nemotron_h_debug", "minimax_m3_debug"])
@pytest.mark.parametrize("mtp", ["full", "lora"])
def test_only_adapters_and_mtp_depths_train_and_what_is_frozen_is_held_in_bf16(model, mtp, tmp_path):
    overrides = [f"model={model}", "lora.rank=4", f"lora.mtp={mtp}", "trainer.precision=bf16", "trainer.max_steps=1"]
    recipe = FinetuneRecipe(composed(*CPU, *overrides, "trainer.save_final=false"), tmp_path)
    recipe.setup()
    names = {id(p): n for n, p in recipe.model.named_parameters()}
    optimized = [names[id(p)] for g in recipe.optimizer.param_groups for p in g["params"]]
    adapters = {n for n in names.values() if ".lora_" in n}
    mtp_weights = {n for n in names.values() if n.startswith("mtp.") and ".lora_" not in n}
    assert any(n.startswith("backbone.") for n in adapters) and mtp_weights
    assert any(n.startswith("mtp.") for n in adapters) == (mtp == "lora")
    expected = adapters | (mtp_weights if mtp == "full" else set())
    assert len(optimized) == len(set(optimized)) and set(optimized) == expected
    # master weights: every optimized parameter is fp32; every frozen one has the dtype a bf16 build gives it
    params = dict(recipe.model.named_parameters())
    assert all(params[n].dtype == torch.float32 for n in optimized)
    torch.manual_seed(0)
    in_bf16 = MTPModel.from_config(debug_model_config(model), dtype="bfloat16").checkpoint_state()
    frozen = recipe.model.checkpoint_state()
    frozen = {k: v for k, v in frozen.items() if not k.startswith("mtp.") or mtp == "lora"}
    assert {k: v.dtype for k, v in frozen.items()} == {k: in_bf16[k].dtype for k in frozen}
    assert torch.bfloat16 in {v.dtype for v in frozen.values()}
    before = {k: v.clone() for k, v in recipe.model.state_dict().items()}
    recipe.train()
    recipe.cleanup()
    changed = {k for k, v in recipe.model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and changed <= expected and any(".lora_B." in k for k in changed)


@pytest.mark.parametrize("model", DEBUG_MODELS)
def test_every_adapter_is_on_the_forward_path_and_heads_are_left_alone(model):
    torch.manual_seed(0)
    m = MTPModel.from_config(debug_model_config(model), lora=LoraSettings(rank=4, mtp="lora"))
    m(**packed_batch(m.text_config.vocab_size, [[10, 14], [24]])).loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters() if ".lora_B." in n}
    assert len(grads) == len(m.lora_targets) > 0
    # B starts at 0, so B's gradient is nonzero exactly when the layer's own forward runs and reaches the loss
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), [n for n, g in grads.items()]
    targets = set(m.lora_targets)
    assert "backbone.lm_head" not in targets and not any(t.endswith(".head") for t in targets)
    assert any(t.startswith("mtp.") and t.endswith("eh_proj") for t in targets)
    for name, module in m.named_modules():
        if isinstance(module, torch.nn.Linear) and not isinstance(module.weight, torch.nn.Parameter):
            assert name.removesuffix(".base_layer") not in targets, name  # a frozen buffer weight


def test_named_targets_adapt_only_those_layers():
    torch.manual_seed(0)
    settings = LoraSettings(rank=2, target_modules=("q_proj", "mixer.in_proj"))
    m = MTPModel.from_config(debug_model_config("nemotron_h_debug"), lora=settings)
    assert m.lora_targets and all(t.startswith("backbone.") for t in m.lora_targets)
    assert {t.rsplit(".", 1)[-1] for t in m.lora_targets} == {"q_proj", "in_proj"}
    linear = [n for n, x in m.backbone.named_modules() if n.endswith((".q_proj", ".mixer.in_proj"))]
    assert len(m.lora_targets) == len(linear)


@pytest.mark.parametrize(
    "model, target, needle",
    [
        ("nemotron_h_debug", "lm_head", "'lm_head' matches no linear layer LoRA can adapt in the backbone"),
        ("nemotron_h_debug", "out_proj", "'out_proj' matches no linear layer"),  # mamba_ssm reads it directly
        ("step3p5_debug", "head", "'head' matches no linear layer"),
    ],
)
def test_a_target_that_adapts_nothing_is_one_line(model, target, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)) as err:
        MTPModel.from_config(debug_model_config(model), lora=LoraSettings(rank=2, target_modules=(target,), mtp="lora"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["lora.rank=-1"], "lora.rank must be >= 0"),
        (["lora.rank=4", "lora.mtp=half"], "lora.mtp must be full or lora"),
        (["lora.rank=4", "lora.export=zip"], "lora.export must be merged or adapter"),
        (["lora.rank=4", "lora.dropout=1.0"], "lora.dropout must be in [0, 1)"),
        (["lora.rank=4", "lora.alpha=0"], "lora.alpha must be > 0"),
        (["lora.rank=4", "lora.target_modules=[]"], "lora.target_modules=[] adapts nothing"),
        (["lora.rank=4", "mtp.train_only=true"], "mtp.train_only=true freezes it: turn one off"),
    ],
)
def test_bad_lora_values_are_one_line_before_work(overrides, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)) as err:
        to_schema(composed(*overrides))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "model, mtp", [("nemotron_h_debug", "full"), ("minimax_m3_debug", "lora"), ("step3p5_debug", "lora")]
)
def test_the_merged_export_loads_and_equals_the_adapted_forward(model, mtp, tmp_path):
    plain, adapted = adapted_pair(model, mtp=mtp)
    batch = packed_batch(adapted.text_config.vocab_size, [[10, 14], [24]])
    want = adapted(**batch, return_logits=True)
    plain_dir, merged_dir = plain.save_pretrained(tmp_path / "plain"), adapted.save_pretrained(tmp_path / "merged")
    # the same files, tensor names and dtypes as a model without LoRA
    assert sorted(p.name for p in plain_dir.iterdir()) == sorted(p.name for p in merged_dir.iterdir())
    a, b = load_file(plain_dir / "model.safetensors"), load_file(merged_dir / "model.safetensors")
    assert {k: v.dtype for k, v in a.items()} == {k: v.dtype for k, v in b.items()}
    loaded = MTPModel.from_pretrained(merged_dir, **F64)
    base, merged = plain.checkpoint_state(), loaded.checkpoint_state()
    assert {k for k in base if not torch.equal(base[k], merged[k])} == {f"{t}.weight" for t in adapted.lora_targets}
    layers = dict(adapted.named_modules())
    for name in adapted.lora_targets:  # W + (alpha / r) · B @ A, in plain float64
        layer = layers[name]
        delta = 8 / 4 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        torch.testing.assert_close(merged[f"{name}.weight"], base[f"{name}.weight"] + delta, rtol=0, atol=1e-15)
    got = loaded(**batch, return_logits=True)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-13, atol=0)
    for g, w in zip(got.mtp_hidden_states, want.mtp_hidden_states, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    assert not torch.allclose(plain(**batch, return_logits=True).logits, want.logits)  # the adapters matter


@pytest.mark.parametrize("model", ["nemotron_h_debug", "minimax_m3_debug"])
def test_the_adapter_export_loads_with_peft_and_holds_the_merged_mtp_tensors(model, tmp_path):
    from peft import PeftModel

    plain, adapted = adapted_pair(model, mtp="lora", export="adapter")
    base = plain.save_pretrained(tmp_path / "base")
    adapted.provenance.source_dir = base  # as if loaded from it: adapter_config.json names it
    out = adapted.save_pretrained(tmp_path / "adapter")
    assert {p.name for p in out.iterdir()} >= {"adapter_model.safetensors", "adapter_config.json", "mtp.safetensors"}
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 8, str(base))

    # peft's own loader on the base checkpoint's backbone gives the adapted backbone's logits
    served = MTPModel.from_pretrained(base, **F64)
    PeftModel.from_pretrained(served.backbone, str(out))
    batch = packed_batch(adapted.text_config.vocab_size, [[10, 14], [24]])
    got, want = served(**batch, return_logits=True), adapted(**batch, return_logits=True)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-12)
    assert not torch.allclose(got.logits, plain(**batch, return_logits=True).logits)

    # the MTP tensors are those of the merged export, bit for bit, under the same names
    mtp = load_file(out / "mtp.safetensors")
    adapted.lora = replace(adapted.lora, export="merged")
    whole = load_file(adapted.save_pretrained(tmp_path / "merged") / "model.safetensors")
    mtp_names = {k for k in whole if adapted.keymap().is_mtp(k)}
    assert mtp and set(mtp) == mtp_names
    assert all(torch.equal(mtp[k], whole[k]) for k in mtp)


def test_an_adapter_export_peft_would_load_elsewhere_is_refused_at_build():
    # peft's loader remaps DeepSeek-V3's dense gate/up/down_proj targets onto the routed experts (its v4 -> v5
    # MoE conversion): the adapter would load into other layers without an error, so it is refused up front
    settings = LoraSettings(rank=2, export="adapter")
    with pytest.raises(ConfigError, match=r"lora.export=adapter: .* use lora.export=merged") as err:
        MTPModel.from_config(debug_model_config("deepseek_v3_debug"), lora=settings)
    assert "\n" not in str(err.value) and "mlp.down_proj" in str(err.value)
    MTPModel.from_config(debug_model_config("deepseek_v3_debug"), lora=replace(settings, export="merged"))


@pytest.mark.slow
def test_a_lora_run_resumes_exactly(tmp_path):
    run = [*CPU, "lora.rank=4", "lora.mtp=lora", "trainer.precision=bf16", "optim.warmup_steps=1"]
    run += ["trainer.checkpoint_every=2", "trainer.max_steps=4", "lora.export=adapter"]
    FinetuneRecipe(composed(*run), tmp_path / "ref").run()
    killed = Path(shutil.copytree(tmp_path / "ref", tmp_path / "killed"))
    shutil.rmtree(killed / "final")
    shutil.rmtree(killed / "resume" / "step_000004")
    FinetuneRecipe(composed(*run, "trainer.resume=auto"), killed).run()
    ref, again = train_records(tmp_path / "ref"), train_records(killed)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for a, b in zip(again, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7), a["step"]
    for name in ("adapter_model.safetensors", "mtp.safetensors"):
        a, b = load_file(killed / "final" / name), load_file(tmp_path / "ref" / "final" / name)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name
    first = load_file(killed / "final" / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and first[k].abs().sum() > 0 for k in first)  # it trained


def test_without_peft_lora_off_works_and_lora_on_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # what `import peft` meets when it is not installed
    with pytest.raises(ConfigError, match=re.escape("lora.rank=4 needs peft, which is not installed")):
        to_schema(composed("lora.rank=4"))
    with pytest.raises(ConfigError, match=re.escape("pip install 'mtp_recipes[lora]'")):
        require_peft()
    to_schema(composed())
    torch.manual_seed(0)
    m = MTPModel.from_config(debug_model_config("nemotron_h_debug"))
    assert m.lora is None and torch.isfinite(m(**packed_batch(m.text_config.vocab_size, [[16]])).loss)


@pytest.mark.slow
def test_the_command_line_without_peft(tmp_path):
    """A fresh process where peft cannot be imported: LoRA off trains; LoRA on is one line and exit status 2."""
    block = "import runpy, sys; sys.modules['peft'] = None; sys.argv = ['finetune', *sys.argv[1:]]; "
    block += "runpy.run_module('mtp_recipes.finetune', run_name='__main__')"

    def run(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-c", block, *CPU, "trainer.max_steps=1", "data.eval_fraction=0", *args]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    off = run(f"hydra.run.dir={tmp_path}/off")
    assert off.returncode == 0, off.stderr[-2000:]
    assert (tmp_path / "off" / "final" / "model.safetensors").exists()
    on = run("lora.rank=4", f"hydra.run.dir={tmp_path}/on")
    assert on.returncode == 2
    errors = [line for line in on.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: lora.rank=4 needs peft, which is not installed: pip install 'mtp_recipes[lora]' (or set lora.rank=0)"
    ]
    assert not (tmp_path / "on").exists()


def test_the_memory_plan_counts_what_lora_trains():
    from mtp_recipes.memory_plan import memory_plan

    plan = memory_plan(to_schema(composed("model=minimax_m3_debug", "lora.rank=4")), 2)
    torch.manual_seed(0)
    built = MTPModel.from_config(debug_model_config("minimax_m3_debug"), lora=LoraSettings(rank=4))
    trainable = sum(p.numel() for p in built.parameters() if p.requires_grad)
    assert plan.trainable == trainable < plan.parameters / 5
    assert plan.grads == 4 * trainable / 2 and plan.optimizer == 2 * plan.grads
