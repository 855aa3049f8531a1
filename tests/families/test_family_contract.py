"""What every registered family must do, parametrised over configs/model/*_debug.yaml.

A family added later is covered the day its debug config lands.
"""

from __future__ import annotations

import importlib.metadata
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mtp_recipes.checkpoint.hf import tensor_files
from mtp_recipes.errors import CheckpointError, ConfigError
from mtp_recipes.model import MTPModel
from tests.helpers import DEBUG_MODELS, ONE_PHYSICAL_DEPTH, debug_model_config, depths, packed_batch


def disk_tensors(path) -> dict[str, torch.Tensor]:
    files = tensor_files(path)
    out = {}
    for f in set(files.values()):
        out.update(load_file(f))
    return out


@pytest.fixture(params=DEBUG_MODELS)
def model_name(request) -> str:
    return request.param


def build(name: str, **overrides) -> MTPModel:
    torch.manual_seed(0)
    return MTPModel.from_config(debug_model_config(name), **overrides)


def test_forward_backward_reaches_every_parameter(model_name):
    model = build(model_name, **depths(model_name, 2))
    batch = packed_batch(model.text_config.vocab_size, [[10, 6], [16]])
    out = model(**batch)
    assert len(out.mtp_losses) == 2 and len(out.mtp_hidden_states) == 2
    assert out.mtp_hidden_states[0].shape == (2, 16, model.text_config.hidden_size)
    expected = out.main_loss + model.mtp_config.loss_scaling_factor / 2 * sum(out.mtp_losses)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    mtp_params = dict(model.mtp.named_parameters())
    assert mtp_params
    missing = [n for n, p in mtp_params.items() if p.grad is None or not p.grad.abs().sum() > 0]
    # MoE experts that no token was routed to legitimately get no gradient.
    assert all("experts" in n for n in missing), missing


def test_checkpoint_round_trip_is_bit_exact(model_name, tmp_path):
    model = build(model_name)
    model.config.dtype = torch.bfloat16  # write the first checkpoint in bf16, as published ones are
    first = model.save_pretrained(tmp_path / "a", max_shard_size=200_000)
    assert (first / "model.safetensors.index.json").exists(), "small max_shard_size must shard"
    disk_a = disk_tensors(first)
    assert any(t.dtype == torch.bfloat16 for t in disk_a.values())

    loaded = MTPModel.from_pretrained(first)
    assert loaded.mtp_config.num_layers == model.mtp_config.num_layers
    # trained in float32 whatever the checkpoint's dtype, backbone and MTP alike
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert torch.isfinite(loaded(**packed_batch(model.text_config.vocab_size, [[9, 7]])).loss)
    second = loaded.save_pretrained(tmp_path / "b")
    disk_b = disk_tensors(second)
    assert set(disk_b) == set(disk_a)
    for key, tensor in disk_a.items():
        assert disk_b[key].dtype == tensor.dtype, key
        assert torch.equal(disk_b[key], tensor), key
    cfg_a = json.loads((first / "config.json").read_text())
    cfg_b = json.loads((second / "config.json").read_text())
    assert cfg_a == cfg_b


def test_loaded_model_computes_the_same_losses(model_name, tmp_path):
    model = build(model_name)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = MTPModel.from_pretrained(tmp_path / "ckpt")
    batch = packed_batch(model.text_config.vocab_size, [[7, 9]])
    a, b = model(**batch), loaded(**batch)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
    torch.testing.assert_close(torch.stack(a.mtp_losses), torch.stack(b.mtp_losses), rtol=0, atol=0)


def _strip_mtp(src, dst, keep) -> list[str]:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = disk_tensors(src)
    mtp_keys = [k for k in tensors if not keep(k)]
    save_file({k: v for k, v in tensors.items() if keep(k)}, dst / "model.safetensors")
    return mtp_keys


def assert_copied(block: torch.nn.Module, donor: torch.nn.Module) -> None:
    """Every parameter of ``block`` equals the donor's of the same name."""
    theirs = dict(donor.named_parameters())
    assert {n for n, _ in block.named_parameters()} == set(theirs)
    for name, param in block.named_parameters():
        assert torch.equal(param, theirs[name]), name


def test_missing_mtp_tensors_fail_clearly_unless_from_scratch(model_name, tmp_path):
    model = build(model_name)
    model.save_pretrained(tmp_path / "full")
    mtp_disk = {model.keymap().to_hf(k) for k in model.state_dict() if k.startswith("mtp.")}
    removed = _strip_mtp(tmp_path / "full", tmp_path / "no_mtp", keep=lambda k: not _is_mtp_disk_key(k, model))
    assert removed and len(removed) >= len(mtp_disk) // 2
    with pytest.raises(CheckpointError) as err:
        MTPModel.from_pretrained(tmp_path / "no_mtp")
    message = str(err.value)
    assert "\n" not in message and "from_scratch" in message
    assert any(k in message for k in removed)

    fresh = MTPModel.from_pretrained(tmp_path / "no_mtp", init="from_scratch")
    fresh_blocks = fresh.mtp.depths[0].blocks
    for block in fresh_blocks:  # every debug model's MTP blocks have a backbone donor
        donor = fresh.family.donor_block(block, fresh.backbone)
        assert donor is not None, f"no backbone donor for an MTP block of kind {fresh.family.block_kind(block)}"
        assert_copied(block, donor)
    out = fresh.save_pretrained(tmp_path / "attached")
    assert _disk_mtp_keys(out, fresh) == _disk_mtp_keys(tmp_path / "full", model)


def test_from_scratch_names_block_tensors_whose_shape_differs_from_the_backbone(model_name):
    """An MTP block whose config differs from the backbone's is an error naming the tensors, not left random."""
    model = build(model_name)
    block = next(b for b in model.mtp.depths[0].blocks if model.family.donor_block(b, model.backbone) is not None)
    name, param = next((n, p) for n, p in block.named_parameters() if p.dim() == 2)
    owner = block.get_submodule(name.rpartition(".")[0])
    setattr(owner, name.rpartition(".")[2], torch.nn.Parameter(torch.zeros(param.shape[0], param.shape[1] + 1)))
    with pytest.raises(ConfigError, match="from_scratch") as err:
        model.init_mtp_from_backbone()
    assert f"{name} {(param.shape[0], param.shape[1] + 1)}" in str(err.value) and "\n" not in str(err.value)


def test_unexpected_and_misshaped_mtp_tensors_fail_clearly(model_name, tmp_path):
    model = build(model_name)
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="does not expect"):
        MTPModel.from_pretrained(ckpt, num_layers=0)

    tensors = disk_tensors(ckpt)
    victim = sorted(_disk_mtp_keys(ckpt, model))[0]
    tensors[victim] = torch.zeros(3, 5, dtype=tensors[victim].dtype)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((ckpt / "config.json").read_text())
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match="wrong shape") as err:
        MTPModel.from_pretrained(bad)
    assert victim in str(err.value)


def test_repeated_layer_ties_one_physical_depth(model_name, tmp_path):
    model = build(model_name, num_layers=3, use_repeated_layer=True)
    assert len(model.mtp.depths) == 1
    assert model.mtp.depth(1) is model.mtp.depth(3)
    batch = packed_batch(model.text_config.vocab_size, [[12]])
    out = model(**batch)
    assert len(out.mtp_losses) == 3
    out.loss.backward()
    ckpt = model.save_pretrained(tmp_path / "rep")
    reloaded = MTPModel.from_pretrained(ckpt, num_layers=3, use_repeated_layer=True)
    for a, b in zip(model.mtp.parameters(), reloaded.mtp.parameters()):
        assert torch.equal(a, b)
    single = build(model_name, num_layers=1)
    assert _disk_mtp_keys(ckpt, model) == _disk_mtp_keys(single.save_pretrained(tmp_path / "one"), single)


def _is_mtp_disk_key(key: str, model: MTPModel) -> bool:
    return key in _mtp_disk_names(model)


def _mtp_disk_names(model: MTPModel) -> set[str]:
    from mtp_recipes.checkpoint.convert import to_disk

    hf = {model.keymap().to_hf(k): v for k, v in model.state_dict().items() if k.startswith("mtp.")}
    return set(to_disk(model.backbone, hf)) | set(model.family.tied_export_copies(model.text_config, model.mtp_config))


def _disk_mtp_keys(path, model: MTPModel) -> set[str]:
    names = set()
    for f in set(tensor_files(path).values()):
        with safe_open(f, framework="pt") as h:
            names.update(k for k in h.keys() if k in _mtp_disk_names(model))
    return names


def test_meta_device_load_equals_the_eager_load(model_name, tmp_path):
    """Built on meta, materialised, then filled tensor by tensor: the same model, rotary tables included."""
    model = build(model_name)
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    eager = MTPModel.from_pretrained(ckpt)
    lazy = MTPModel.from_pretrained(ckpt, device="cpu")
    assert not any(p.is_meta for p in lazy.parameters())
    a, b = eager.state_dict(), lazy.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for (name, x), (_, y) in zip(eager.named_buffers(), lazy.named_buffers(), strict=True):
        assert torch.equal(x, y), name
    batch = packed_batch(model.text_config.vocab_size, [[9, 7]])
    torch.testing.assert_close(eager(**batch).loss, lazy(**batch).loss, rtol=0, atol=0)


def test_extend_keeps_the_checkpoint_depths_and_adds_new_ones(model_name, tmp_path):
    model = build(model_name, num_layers=1)
    ckpt = model.save_pretrained(tmp_path / "d1")
    if model_name in ONE_PHYSICAL_DEPTH:  # one fusion for every MTP layer: a second physical depth is refused
        with pytest.raises(ConfigError, match="mtp.use_repeated_layer=true") as err:
            MTPModel.from_pretrained(ckpt, num_layers=2, init="extend")
        assert "\n" not in str(err.value)
        return
    with pytest.raises(CheckpointError, match="mtp.init=extend"):
        MTPModel.from_pretrained(ckpt, num_layers=2)
    grown = MTPModel.from_pretrained(ckpt, num_layers=2, init="extend")
    for a, b in zip(model.mtp.depths[0].parameters(), grown.mtp.depths[0].parameters(), strict=True):
        assert torch.equal(a, b)  # depth 1 kept bit-exact
    for block in grown.mtp.depths[1].blocks:  # depth 2 starts from its backbone donor
        donor = grown.family.donor_block(block, grown.backbone)
        assert donor is not None, f"no backbone donor for an MTP block of kind {grown.family.block_kind(block)}"
        assert_copied(block, donor)
    out = grown(**packed_batch(grown.text_config.vocab_size, [[8, 8]]))
    assert len(out.mtp_losses) == 2 and torch.isfinite(out.loss)


def test_block_types_is_refused_where_a_family_fixes_the_depth_layout(model_name):
    """``mtp.block_types`` is honoured where the family lets it choose a depth's sublayers, refused elsewhere."""
    from mtp_recipes.families import get_family

    family = get_family(debug_model_config(model_name)["model_type"])
    if family.configurable_blocks:
        model = build(model_name, num_layers=1, block_types=["full_attention", "mlp"])
        assert list(model.mtp_config.block_types) == ["full_attention", "mlp"]
    else:
        with pytest.raises(ConfigError, match="mtp.block_types=.*fixed layout; leave mtp.block_types null"):
            build(model_name, num_layers=1, block_types=["full_attention", "mlp"])


def test_a_family_newer_than_the_installed_transformers_refuses_in_one_line_and_the_others_work(monkeypatch):
    from mtp_recipes.families import get_family, registered_model_types

    families = {t: get_family(t) for t in registered_model_types()}  # each runs on the installed release
    refusing, family = next(iter(families.items()))
    monkeypatch.setattr(family, "min_transformers", "99.0", raising=False)  # this family only, not subclasses
    with pytest.raises(ConfigError) as e:
        get_family(refusing)
    assert str(e.value) == (
        f"{family.name} ({refusing}) needs transformers>=99.0, but {importlib.metadata.version('transformers')} "
        "is installed: pip install 'transformers>=99.0'"
    )
    others = [t for t, f in families.items() if f is not family]
    assert others and all(get_family(t) is families[t] for t in others)
