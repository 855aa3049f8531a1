"""``mtp_recipes.check``: every family's export, D = 1 and 2, against what each engine release does with it.

The expectations are transcribed here from the engines' code, independently of the families' rule tables:

* vLLM 0.34.0 ``vllm/config/speculative.py`` ``SpeculativeConfig.use_multi_module_mtp``: a module per draft step
  only when ``n_predict`` > 1 and more than one token is drafted, never for ``minimax_m3_mtp``; 0.33.0's reads
  ``num_nextn_predict_layers``. ``vllm/v1/worker/gpu/spec_decode/mtp/speculator.py`` ``MTPSpeculator`` runs the
  model with its default ``spec_step_idx=0`` (module 1) otherwise.
* ``nemotron_h_mtp.py`` ``NemotronHMultiTokenPredictor.__init__`` (vLLM and SGLang): ``assert self.num_mtp_layers
  == 1``; sublayers only ``*`` and ``E``.
* SGLang ``deepseek_nextn.py`` ``DeepseekV3ForCausalLMNextN``: one MTP layer, the embedding at position 0 kept
  (vLLM's ``DeepSeekMultiTokenPredictorLayer.forward`` zeroes it).
* SGLang ``step3p5_mtp.py`` ``Step3p5AMultiTokenPredictor.__init__``: one block built with ``layer_id = 45``.
* vLLM ``step3p5.py`` ``Step3p5Attention.__init__``: ``g_proj`` only with ``use_head_wise_attn_gate``.
* SGLang 0.5.23 has no MiniMax-M3 MTP drafter.
* vLLM ``mimo_v2_mtp.py`` ``MiMoV2MultiTokenPredictor.__init__``: ``num_mtp_layers = 1`` whatever the config says
  (only ``model.mtp.layers.0`` is built and loaded); SGLang ``configs/model_config.py`` sets
  ``num_nextn_predict_layers = 1`` for the MiMo-V2 draft model and ``mimo_v2_nextn.py`` ``load_weights`` maps every
  ``model.mtp.layers.N`` onto its one module.
* vLLM ``qwen3_next_mtp.py``: ``num_nextn_predict_layers`` defaults to 1; SGLang ``qwen3_next_mtp.py`` builds a
  one-layer model.
* vLLM ``qwen3_5_mtp.py`` ``Qwen3_5MultiTokenPredictor.__init__``: ``num_mtp_layers = getattr(config,
  "mtp_num_hidden_layers", 1)`` layers ``mtp.layers.{i}``; SGLang ``qwen3_5_mtp.py`` builds one layer.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from mtp_recipes.errors import ConfigError
from mtp_recipes.export_check import check_export
from mtp_recipes.model import MTPModel
from tests.helpers import debug_model_config

OK = None
V34, V33, SGL = "vLLM 0.34.0", "vLLM 0.33.0", "SGLang 0.5.23"
# (debug model, D) -> engine -> None (drafts with every trained weight) or a fragment of the first problem
EXPECTED = {
    ("nemotron_h_debug", 1): {V34: OK, V33: OK, SGL: OK},
    ("nemotron_h_debug", 2): dict.fromkeys((V34, V33, SGL), "num_nextn_predict_layers=2"),
    ("deepseek_v3_debug", 1): {V34: OK, V33: OK, SGL: "zero_first_embedding trained True, runs False"},
    ("deepseek_v3_debug", 2): {V34: OK, V33: OK, SGL: "num_nextn_predict_layers=2"},
    ("deepseek_v32_debug", 1): {V34: OK, V33: OK, SGL: "zero_first_embedding trained True, runs False"},
    ("glm4_moe_debug", 1): {V34: OK, V33: "passes_on trained 'normed', runs 'pre_norm'", SGL: "zero_first_embedding"},
    ("glm4_moe_debug", 2): {V34: OK, V33: "passes_on trained 'normed'", SGL: "num_nextn_predict_layers=2"},
    ("step3p5_debug", 1): {V34: OK, V33: OK, SGL: "num_hidden_layers=3"},
    ("step3p5_debug", 2): {V34: OK, V33: OK, SGL: "num_nextn_predict_layers=2"},
    ("minimax_m3_debug", 1): {V34: OK, V33: OK, SGL: "does not draft with minimax_m3 MTP weights"},
    ("minimax_m3_debug", 2): {V34: "draft step 2 runs module 1", V33: OK, SGL: "does not draft"},
    ("mimo_v2_flash_debug", 1): {V34: OK, V33: OK, SGL: OK},
    ("qwen3_next_debug", 1): {V34: OK, V33: OK, SGL: OK},
    ("qwen3_5_debug", 1): {V34: OK, V33: OK, SGL: OK},
    ("qwen3_5_moe_debug", 1): {V34: OK, V33: OK, SGL: OK},
    ("mimo_v2_flash_debug", 2): {
        V34: "modules the engine does not build",
        V33: "modules the engine does not build",
        SGL: "num_nextn_predict_layers=2",
    },
}
# modules the draft steps 1..D run (1-based), per engine, where the engine drafts
STEPS = {
    ("deepseek_v3_debug", 2): {V34: [1, 2], V33: [1, 2]},
    ("glm4_moe_debug", 2): {V34: [1, 2], V33: [1, 2]},
    ("step3p5_debug", 2): {V34: [1, 2], V33: [1, 2], SGL: [1, 1]},
    ("minimax_m3_debug", 2): {V34: [1, 1], V33: [1, 2]},
    ("mimo_v2_flash_debug", 2): {V34: [1, 1], V33: [1, 1], SGL: [1, 1]},
}


def export(path, name: str, depths: int, **overrides) -> MTPModel:
    torch.manual_seed(0)
    model = MTPModel.from_config(debug_model_config(name), num_layers=depths, **overrides)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    for name, depths in EXPECTED:
        export(root / f"{name}-{depths}", name, depths)
    return root


def reports(path, **kwargs) -> dict:
    return {r.engine: r for r in check_export(path, **kwargs)}


@pytest.mark.parametrize(("name", "depths"), sorted(EXPECTED))
def test_every_family_against_every_engine(exports, name, depths):
    found = reports(exports / f"{name}-{depths}")
    assert sorted(found) == sorted(EXPECTED[name, depths])
    for engine, expected in EXPECTED[name, depths].items():
        report = found[engine]
        if expected is OK:
            assert report.ok, (engine, report.problems)
        else:
            assert not report.ok and expected in report.problems[0], (engine, report.problems)
            assert report.line().startswith(f"{engine}: FAIL: ") and "\n" not in report.line()
        for step_engine, modules in STEPS.get((name, depths), {}).items():
            if step_engine == engine:
                assert f"run module(s) {modules} of" in " ".join(found[engine].notes)


def test_training_for_sglang_and_one_module_for_every_step(tmp_path):
    """serving.engine=sglang trains DeepSeek-V3's depth with the embedding at position 0 kept: SGLang's math, no
    longer vLLM's. MiniMax-M3 with one module trained for every step drafts with it on vLLM 0.34."""
    export(tmp_path / "sglang", "deepseek_v3_debug", 1, engine="sglang")
    found = reports(tmp_path / "sglang")
    assert found[SGL].ok and "zero_first_embedding trained False, runs True" in found[V34].problems[0]
    record = json.loads((tmp_path / "sglang" / "mtp_recipes.json").read_text())
    assert record["serving_engine"] == "sglang" and record["conventions"]["zero_first_embedding"] is False

    export(tmp_path / "repeated", "minimax_m3_debug", 2, use_repeated_layer=True)
    found = reports(tmp_path / "repeated", num_speculative_tokens=3)
    assert found[V34].ok and found[V33].ok
    assert any("step 3 reuses module 1 beyond the 2 trained step(s)" in n for n in found[V34].notes)
    with pytest.raises(ConfigError, match=r"serving.engine=sglang: SGLang 0.5.23 does not draft with them"):
        MTPModel.from_config(debug_model_config("minimax_m3_debug"), engine="sglang")


def rewrite(src, dst, *, drop=None, config=None) -> None:
    """A copy of an export with one tensor dropped and/or config.json changed."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if k != drop}, dst / "model.safetensors")
    if config is not None:
        raw = json.loads((src / "config.json").read_text())
        config(raw)
        (dst / "config.json").write_text(json.dumps(raw))


def test_broken_exports_fail_with_a_line_naming_the_problem(exports, tmp_path):
    deepseek = exports / "deepseek_v3_debug-2"
    rewrite(deepseek, tmp_path / "missing", drop="model.layers.3.eh_proj.weight")
    problem = reports(tmp_path / "missing")[V34].problems[0]
    assert "1 MTP tensor(s) missing (model.layers.3.eh_proj.weight)" in problem and "random weights" in problem
    assert "fails to load" in reports(tmp_path / "missing")[V33].problems[0]

    rewrite(deepseek, tmp_path / "no_d", config=lambda c: c.pop("num_nextn_predict_layers"))
    assert reports(tmp_path / "no_d")[V34].problems == [
        "config.json has no num_nextn_predict_layers: the engine builds no MTP module"
    ]

    rewrite(exports / "step3p5_debug-1", tmp_path / "gate", config=lambda c: c.update(
        head_wise_gate=c.pop("use_head_wise_attn_gate")))  # fmt: skip
    problem = reports(tmp_path / "gate")[V34].problems[0]
    assert problem.startswith("trained MTP tensors the engine never loads (") and ".g_proj.weight" in problem
    assert "use_head_wise_attn_gate" in problem

    rewrite(deepseek, tmp_path / "more", config=lambda c: c.update(num_nextn_predict_layers=3))
    assert "MTP tensor(s) missing (model.layers.4." in reports(tmp_path / "more")[V34].problems[0]
    rewrite(deepseek, tmp_path / "fewer", config=lambda c: c.update(num_nextn_predict_layers=1))
    problem = reports(tmp_path / "fewer")[V34].problems[0]
    assert "exported MTP tensor(s) of modules the engine does not build (model.layers.3." in problem


def test_the_command_line(exports, tmp_path):
    good = subprocess.run(
        [sys.executable, "-m", "mtp_recipes.check", str(exports / "deepseek_v3_debug-2"), "--engine", "vllm"],
        capture_output=True,
        text=True,
    )
    assert good.returncode == 0, good.stderr
    lines = good.stdout.splitlines()
    assert [line for line in lines if not line.startswith(" ")][1:] == ["vLLM 0.34.0: ok", "vLLM 0.33.0: ok"]
    assert "    read from: vllm/model_executor/models/deepseek_mtp.py" in good.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "mtp_recipes.check", str(exports / "minimax_m3_debug-2")], capture_output=True, text=True
    )
    assert bad.returncode == 1 and "vLLM 0.34.0: FAIL: draft step 2 runs module 1" in bad.stdout
