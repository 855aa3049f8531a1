"""The MTP options users ask for: detach_backbone, train_only, a λ schedule."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from mtp_recipes.model import MTPModel
from mtp_recipes.recipe import FinetuneRecipe
from tests.helpers import debug_model_config, packed_batch
from tests.recipes.test_finetune import FAST, composed


def _grads(detach: bool, lam: float) -> tuple[dict[str, torch.Tensor], MTPModel]:
    torch.manual_seed(0)
    model = MTPModel.from_config(
        debug_model_config("nemotron_h_debug"), detach_backbone=detach, loss_scaling_factor=lam
    )
    model(**packed_batch(model.text_config.vocab_size, [[10, 14], [24]])).loss.backward()
    return {n: p.grad.clone() for n, p in model.backbone.named_parameters() if p.grad is not None}, model


def test_detach_backbone_keeps_mtp_gradients_out_of_the_backbone():
    main_only, _ = _grads(detach=False, lam=0.0)
    detached, model = _grads(detach=True, lam=0.3)
    attached, _ = _grads(detach=False, lam=0.3)
    assert detached.keys() == main_only.keys()
    for name, grad in main_only.items():
        torch.testing.assert_close(detached[name], grad, rtol=1e-6, atol=1e-9, msg=name)
    assert any(not torch.allclose(attached[n], g) for n, g in main_only.items())  # the check can fail
    assert all(p.grad is not None for n, p in model.mtp.named_parameters() if "experts" not in n)


def test_train_only_trains_the_depths_and_nothing_else(tmp_path):
    recipe = FinetuneRecipe(
        composed(*FAST, "mtp.train_only=true", "trainer.max_steps=2", "trainer.save_final=false"), tmp_path
    )
    recipe.setup()
    before = {k: v.clone() for k, v in recipe.model.state_dict().items()}
    recipe.train()
    recipe.cleanup()
    after = recipe.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("mtp.") for k in changed)
    assert all(not p.requires_grad for p in recipe.model.backbone.parameters())
    assert {id(p) for g in recipe.optimizer.param_groups for p in g["params"]} == {
        id(p) for p in recipe.model.mtp.parameters()
    }


def test_lambda_schedule_switches_at_its_step(tmp_path):
    cfg = composed(
        *FAST,
        "trainer.max_steps=4",
        "trainer.save_final=false",
        "mtp.loss_scaling_factor=0.3",
        "mtp.loss_scaling_schedule=[{step: 2, value: 0.1}]",
    )
    FinetuneRecipe(cfg, tmp_path).run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if r["split"] == "train"]
    assert [r["lambda"] for r in records] == [0.3, 0.3, 0.1, 0.1]  # steps 1-2 then 3-4 (step index 2 on)
    for r in records:
        assert r["loss"] == pytest.approx(r["main_ce"] + r["lambda"] * r["mtp_ce_1"], rel=1e-5)


def test_depth_decay_weighs_depth_k_by_beta_to_the_k_minus_1():
    torch.manual_seed(0)
    config = debug_model_config("nemotron_h_debug")
    model = MTPModel.from_config(config, num_layers=3, depth_decay=0.6, loss_scaling_factor=0.3)
    assert model.mtp_config.depth_shares() == pytest.approx([1 / 1.96, 0.6 / 1.96, 0.36 / 1.96])
    out = model(**packed_batch(model.text_config.vocab_size, [[10, 14], [24]]))
    expected = out.main_loss + 0.3 * (out.mtp_losses[0] + 0.6 * out.mtp_losses[1] + 0.36 * out.mtp_losses[2]) / 1.96
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=0)
    equal = MTPModel.from_config(config, num_layers=3, depth_weights=[1, 1, 1], loss_scaling_factor=0.3)
    equal.load_state_dict(model.state_dict())
    same = equal(**packed_batch(model.text_config.vocab_size, [[10, 14], [24]]))
    torch.testing.assert_close(same.loss, same.main_loss + 0.3 / 3 * sum(same.mtp_losses), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["mtp.num_layers=2", "mtp.depth_weights=[1.0]"], "mtp.depth_weights has 1 entries for 2 MTP depths"),
        (["mtp.depth_weights=[1.0, -2.0]"], "mtp.depth_weights must be >= 0"),
        (["mtp.depth_weights=[1.0]", "mtp.depth_decay=0.5"], "not both"),
        (["mtp.depth_decay=0"], "mtp.depth_decay must be > 0"),
        (["mtp.targets=teacher"], "mtp.targets must be labels, self or mix"),
        (["mtp.targets=mix", "mtp.self_weight=1.5"], "mtp.self_weight must be in [0, 1]"),
    ],
)
def test_bad_depth_weights_and_targets_are_one_line_before_work(overrides, needle):
    from mtp_recipes.config import to_schema
    from mtp_recipes.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(needle)):
        to_schema(composed(*overrides))


def test_depth_weights_that_do_not_fit_the_checkpoints_depth_count_are_refused():
    from mtp_recipes.errors import ConfigError

    # num_layers null in the config: D comes from the model, so the check happens when the model is built
    with pytest.raises(ConfigError, match=re.escape("mtp.depth_weights has 2 entries for 1 MTP depths")):
        MTPModel.from_config(debug_model_config("nemotron_h_debug"), depth_weights=[1.0, 1.0])


def test_a_frozen_backbone_is_held_in_the_compute_dtype_and_the_depths_keep_fp32_masters(tmp_path):
    cfg = composed(
        *FAST,
        "mtp.train_only=true",
        "trainer.precision=bf16",
        "trainer.device=cpu",
        "trainer.max_steps=2",
        "trainer.save_final=false",
    )
    recipe = FinetuneRecipe(cfg, tmp_path)
    recipe.setup()
    # the backbone's dtypes are those of the same backbone built in bf16 (transformers' own fp32 keeps included)
    torch.manual_seed(0)
    in_bf16 = MTPModel.from_config(debug_model_config("nemotron_h_debug"), dtype="bfloat16")
    assert {n: p.dtype for n, p in recipe.model.backbone.named_parameters()} == {
        n: p.dtype for n, p in in_bf16.backbone.named_parameters()
    }
    assert any(p.dtype == torch.bfloat16 for p in recipe.model.backbone.parameters())
    assert all(p.dtype == torch.float32 for p in recipe.model.mtp.parameters())
    optimized = [p for g in recipe.optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in optimized} == {id(p) for p in recipe.model.mtp.parameters()}
    assert all(p.dtype == torch.float32 for p in optimized)
    before = {k: v.clone() for k, v in recipe.model.state_dict().items()}
    recipe.train()
    recipe.cleanup()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert len(train) == 2 and all(math.isfinite(r["loss"]) for r in train)
    after = recipe.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("mtp.") for k in changed)


@pytest.mark.parametrize(
    "train_only, frozen_dtype, expected",
    [
        (True, None, torch.float32),  # fp32 compute: nothing to save
        (False, torch.bfloat16, torch.float32),  # a trainable backbone keeps fp32 masters
        (True, torch.bfloat16, torch.bfloat16),
    ],
)
def test_only_a_frozen_backbone_takes_the_compute_dtype(train_only, frozen_dtype, expected):
    model = MTPModel.from_config(
        debug_model_config("nemotron_h_debug"), train_only=train_only, frozen_dtype=frozen_dtype
    )
    assert model.backbone.get_input_embeddings().weight.dtype == expected
    assert all(p.dtype == torch.float32 for p in model.mtp.parameters())
