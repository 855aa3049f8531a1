"""A block-scaled FP8 checkpoint (DeepSeek-V3's released layout) loads dequantised and exports in BF16."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from mtp_recipes.checkpoint.hf import TensorReader, tensor_files
from mtp_recipes.errors import CheckpointError
from mtp_recipes.model import MTPModel
from tests.helpers import debug_model_config

BLOCK = (16, 24)  # uneven against the debug shapes (40 x 64, 96 x 32, ...): partial edge blocks


def quantised(name: str, tensor: torch.Tensor) -> bool:
    """The tensors the release stores in FP8: linear weights, not embeddings, head, norms or the router."""
    skip = ("embed_tokens", "lm_head", "shared_head", "norm", "mlp.gate.weight")
    return tensor.dim() == 2 and name.endswith(".weight") and not any(s in name for s in skip)


def block_reference(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """weight * scale of its (BLOCK[0] x BLOCK[1]) block, element by element, in float64."""
    out = torch.empty(weight.shape, dtype=torch.float64)
    for i in range(weight.shape[0]):
        for j in range(weight.shape[1]):
            out[i, j] = weight[i, j].double() * scale[i // BLOCK[0], j // BLOCK[1]].double()
    return out


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    torch.manual_seed(0)
    source = MTPModel.from_config(debug_model_config("deepseek_v3_debug")).save_pretrained(root / "bf16")
    tensors, references = {}, {}
    g = torch.Generator().manual_seed(1)
    for name, value in load_file(source / "model.safetensors").items():
        if not quantised(name, value):
            tensors[name] = value.bfloat16()
            continue
        weight = (torch.randn(value.shape, generator=g) * 100).to(torch.float8_e4m3fn)
        blocks = (-(-value.shape[0] // BLOCK[0]), -(-value.shape[1] // BLOCK[1]))
        scale = torch.rand(blocks, generator=g) * 1e-3 + 1e-4
        tensors[name], tensors[name + "_scale_inv"] = weight, scale
        references[name] = block_reference(weight, scale)
    fp8 = root / "fp8"
    fp8.mkdir()
    save_file(tensors, fp8 / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": list(BLOCK),
    }
    (fp8 / "config.json").write_text(json.dumps(config))
    return fp8, references


def test_fp8_weights_are_dequantised_per_block_and_exported_in_bf16(fp8_checkpoint, tmp_path, caplog):
    path, references = fp8_checkpoint
    model = MTPModel.from_pretrained(path, dtype="float32")
    assert all(model.provenance.disk_dtypes[k] == torch.bfloat16 for k in references)  # what the export will write
    model.provenance.disk_dtypes = dict.fromkeys(
        model.provenance.disk_dtypes, torch.float32
    )  # see the float32 parameters, named as on disk
    values = load_file(model.save_pretrained(tmp_path / "f32") / "model.safetensors")
    for name, ref in references.items():
        # fp8 (4-bit mantissa) x fp32 scale is exact in float64: one rounding to float32 either way
        assert torch.equal(values[name], ref.float()), name

    model = MTPModel.from_pretrained(path, dtype="float32")
    with caplog.at_level(logging.INFO, logger="mtp_recipes"):
        out = model.save_pretrained(tmp_path / "export")
    assert sum("written in BF16" in r.getMessage() for r in caplog.records) == 1
    exported = load_file(out / "model.safetensors")
    assert not any(k.endswith("_scale_inv") for k in exported)
    assert set(exported) == set(references) | {k for k in load_file(path / "model.safetensors") if "scale_inv" not in k}
    for name, ref in references.items():
        assert exported[name].dtype == torch.bfloat16 and torch.equal(exported[name], ref.float().bfloat16()), name
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_a_range_of_rows_dequantises_with_its_own_blocks(fp8_checkpoint):
    path, references = fp8_checkpoint
    reader = TensorReader(tensor_files(path), BLOCK)
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"  # 40 rows: blocks 0-15, 16-31, 32-39
    assert name in references and name + "_scale_inv" not in reader.keys()
    for rows in [(0, 40), (3, 17), (16, 32), (31, 40)]:
        assert torch.equal(reader.get(name, rows), references[name][rows[0] : rows[1]].float()), rows


def test_other_quantisations_are_refused_in_one_line(fp8_checkpoint, tmp_path):
    path, _ = fp8_checkpoint
    other = tmp_path / "awq"
    other.mkdir()
    (other / "model.safetensors").symlink_to(path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="awq checkpoint") as err:
        MTPModel.from_pretrained(other)
    assert "\n" not in str(err.value) and "BF16" in str(err.value)
