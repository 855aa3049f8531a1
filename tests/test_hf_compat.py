"""One test per transformers touch point in ``mtp_recipes.hf_compat``: a failure names the one that moved.

Each test checks the touch point's *effect* on transformers' own objects (or agreement with a public API),
so a rename or a change of meaning in a new release fails here, not deep inside a training run.
"""

import importlib
import importlib.metadata
import inspect
import logging
import re
from pathlib import Path

import pytest
import torch
from packaging.version import Version
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, DeepseekV3Config, MiMoV2FlashConfig
from transformers.models.nemotron_h import modeling_nemotron_h as nemotron

from mtp_recipes import hf_compat
from tests.helpers import tiny_nemotron


def tiny_deepseek() -> DeepseekV3Config:
    return DeepseekV3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
    )


def touch(name: str) -> str:
    return f"transformers touch point hf_compat.{name} no longer works: see its docstring"


def test_swap_class():
    class Louder(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    layer = nn.Linear(3, 3)
    x = torch.randn(2, 3)
    expected = 2 * layer(x)
    hf_compat.swap_class(layer, Louder)
    assert isinstance(layer, Louder) and torch.equal(layer(x), expected), touch("swap_class")
    with pytest.raises(TypeError):
        hf_compat.swap_class(layer, nn.ReLU)


def test_set_implementations_and_attention_implementation():
    """Our private setter agrees with the public ``from_config(attn_implementation=...)``."""
    for impl in ("eager", "sdpa"):
        public = AutoModelForCausalLM.from_config(tiny_nemotron(), attn_implementation=impl)
        assert hf_compat.attention_implementation(public.config) == impl, touch("attention_implementation")
        config = tiny_nemotron()
        hf_compat.set_implementations(config, impl, "eager")
        ours = AutoModelForCausalLM.from_config(config)
        assert hf_compat.attention_implementation(ours.config) == impl, touch("set_implementations")
        assert ours.config._experts_implementation == "eager", touch("set_implementations")


def test_unsupported_attention():
    """transformers' refusal of an attention kernel a model class lacks (MiMo-V2-Flash has no sdpa path) is
    recognised; other errors are not."""
    config = MiMoV2FlashConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, v_head_dim=8, n_routed_experts=4, moe_intermediate_size=16,
    )  # fmt: skip
    with pytest.raises(ValueError) as err:
        AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    assert hf_compat.unsupported_attention(err.value), touch("unsupported_attention")
    assert not hf_compat.unsupported_attention(ValueError("some other problem"))


def test_init_module_weights():
    """transformers' per-module init rule reaches a mixer built on the meta device (A_log = log(1..H), D = 1)."""
    model = nemotron.NemotronHForCausalLM(tiny_nemotron())
    with torch.device("meta"):
        mixer = nemotron.NemotronHMamba2Mixer(model.config, layer_idx=0)
    mixer.to_empty(device="cpu")
    with torch.no_grad():
        mixer.A_log.fill_(7.0)
        mixer.D.fill_(7.0)
    hf_compat.init_module_weights(model, mixer)
    assert torch.allclose(mixer.A_log, torch.log(torch.arange(1.0, 5.0))), touch("init_module_weights")
    assert torch.equal(mixer.D, torch.ones(4)), touch("init_module_weights")


def test_has_non_persistent_buffers():
    model = AutoModelForCausalLM.from_config(tiny_deepseek())
    rotary = model.model.rotary_emb
    assert hf_compat.has_non_persistent_buffers(rotary), touch("has_non_persistent_buffers")
    assert not hf_compat.has_non_persistent_buffers(model.lm_head), touch("has_non_persistent_buffers")
    named = {n for n, _ in rotary.named_buffers(recurse=False)}
    assert named and not named & set(rotary.state_dict()), "rotary tables are expected outside the state dict"


def test_unexpected_key_patterns_and_ignore_unexpected_keys():
    """transformers' own patterns cover the MTP keys it drops; ours are added after them."""
    nem = AutoModelForCausalLM.from_config(tiny_nemotron())
    assert any(re.search(p, "mtp.layers.0.enorm.weight") for p in hf_compat.unexpected_key_patterns(nem)), touch(
        "unexpected_key_patterns"
    )
    ds = AutoModelForCausalLM.from_config(tiny_deepseek())
    before = hf_compat.unexpected_key_patterns(ds)
    assert any(re.search(p, "model.layers.61.enorm.weight") for p in before), touch("unexpected_key_patterns")
    hf_compat.ignore_unexpected_keys(ds, r"^model\.layers\.2\.")
    after = hf_compat.unexpected_key_patterns(ds)
    assert after[: len(before)] == before and after[-1] == r"^model\.layers\.2\.", touch("ignore_unexpected_keys")
    assert hf_compat.unexpected_key_patterns(AutoModelForCausalLM.from_config(tiny_deepseek())) == before, (
        "ignore_unexpected_keys must change one model, not its class"
    )


def test_fp32_module_names_and_keep_in_fp32(tmp_path):
    """The names we read are the ones transformers keeps in float32 when it loads a bf16 model."""
    AutoModelForCausalLM.from_config(tiny_nemotron()).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    names = hf_compat.fp32_module_names(model)
    assert "e_score_correction_bias" in names, touch("fp32_module_names")
    for key, tensor in model.state_dict().items():
        expected = torch.float32 if any(name in key for name in names) else torch.bfloat16
        assert tensor.dtype == expected, (key, touch("fp32_module_names"))
    hf_compat.keep_in_fp32(model, ["gate.weight"])
    assert hf_compat.fp32_module_names(model) == ("gate.weight",), touch("keep_in_fp32")


def test_enable_block_checkpointing():
    """A transformers decoder layer recomputes through the function we give it."""
    model = AutoModelForCausalLM.from_config(tiny_deepseek())
    block = model.model.layers[0]
    calls = []

    def recording(fn, *args, **kwargs):
        calls.append(fn)
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)

    hf_compat.enable_block_checkpointing(block, recording)
    model.train()
    model(input_ids=torch.randint(0, 64, (1, 5)), labels=torch.randint(0, 64, (1, 5))).loss.backward()
    assert len(calls) == 1, touch("enable_block_checkpointing")
    with pytest.raises(ValueError):
        hf_compat.enable_block_checkpointing(nn.Linear(2, 2), recording)


def test_weight_conversions_round_trip():
    """Nemotron-H's per-expert disk tensors merge into one in-memory tensor and split back bit-exactly."""
    model = AutoModelForCausalLM.from_config(tiny_nemotron())
    assert hf_compat.attached_weight_conversions(model) is None, touch("attached_weight_conversions")
    conversions = hf_compat.model_weight_conversions(model)
    renamings = [c for c in conversions if isinstance(c, hf_compat.WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, hf_compat.WeightConverter)]
    target, pattern = hf_compat.rename_key("backbone.layers.2.mixer.experts.1.up_proj.weight", renamings, converters)
    assert target == "model.layers.2.mixer.experts.up_proj" and pattern is not None, touch("rename_key")
    memory = {k: v for k, v in model.state_dict().items() if "experts" in k}
    disk = hf_compat.revert_conversions(model, memory)
    assert any(".experts.3.up_proj.weight" in k for k in disk), touch("revert_conversions")
    up = model.state_dict()["model.layers.2.mixer.experts.up_proj"]
    assert torch.equal(disk["backbone.layers.2.mixer.experts.3.up_proj.weight"], up[3]), touch("revert_conversions")
    hf_compat.attach_weight_conversions(model, renamings)
    assert hf_compat.attached_weight_conversions(model) == renamings, touch("attach_weight_conversions")
    keys = ["m.layers.10.w", "m.layers.2.w"]
    assert sorted(keys, key=hf_compat.dot_natural_key) == keys[::-1], touch("dot_natural_key")


def test_checkpoint_conversions_registry():
    """What transformers registers for a model type is readable, and a class of ours can be registered."""
    step = hf_compat.checkpoint_conversions("step3p7")
    assert step and all(hasattr(c, "source_patterns") for c in step), touch("checkpoint_conversions")
    from mtp_recipes.families.step3p5 import Step3p5TextForCausalLM  # registers itself on import

    assert hf_compat.checkpoint_conversions(Step3p5TextForCausalLM.__name__), touch("register_checkpoint_conversions")


def test_decode_special_floats():
    raw = {"a": {"__float__": "Infinity"}, "b": [{"__float__": "-Infinity"}, 1.5], "c": "x"}
    decoded = hf_compat.decode_special_floats(raw)
    assert decoded == {"a": float("inf"), "b": [float("-inf"), 1.5], "c": "x"}, touch("decode_special_floats")


def test_rotary_per_layer_type():
    """Step-3.5's rotary module has a table per layer type and takes the type as third argument."""
    from transformers.models.step3p7 import Step3p7TextConfig
    from transformers.models.step3p7 import modeling_step3p7 as step

    config = Step3p7TextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        layer_types=["full_attention", "sliding_attention"],
        sliding_window=4,
    )
    rotary = step.Step3p7RotaryEmbedding(config)
    kinds = hf_compat.rotary_layer_types(rotary)
    assert {"full_attention", "sliding_attention"} <= kinds, touch("rotary_layer_types")
    hidden, positions = torch.randn(1, 5, 32), torch.arange(5)[None]
    cos, sin = hf_compat.rotary_cos_sin(rotary, hidden, positions, "full_attention")
    assert cos.shape[:2] == (1, 5) and torch.allclose(cos[0, 0], torch.ones_like(cos[0, 0])), touch("rotary_cos_sin")
    assert torch.allclose(cos.pow(2) + sin.pow(2), torch.ones_like(cos)), touch("rotary_cos_sin")


class OwnForwardExperts(nn.Module):
    """Merged experts whose class computes its own forward (no ExpertsInterface seam), as Step-3.5's did before
    transformers 5.25: SwiGLU experts clamped at 0.5, weights ``[experts, out, in]``."""

    def __init__(self, num_experts: int = 4, hidden: int = 32, inner: int = 8) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.randn(num_experts, 2 * inner, hidden) * 0.1)
        self.down_proj = nn.Parameter(torch.randn(num_experts, hidden, inner) * 0.1)

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        for token in range(hidden.shape[0]):
            for slot in range(top_k_index.shape[1]):
                e = int(top_k_index[token, slot])
                gate, up = (self.gate_up_proj[e] @ hidden[token]).chunk(2)
                inner = nn.functional.silu(gate).clamp(max=0.5) * up.clamp(-0.5, 0.5)
                out[token] += top_k_weights[token, slot] * (self.down_proj[e] @ inner)
        return out


def experts_modules() -> dict[str, nn.Module]:
    """A DeepSeek-V3 experts module (dispatches through ExpertsInterface) and one that does not."""
    torch.manual_seed(0)
    deepseek = AutoModelForCausalLM.from_config(tiny_deepseek(), experts_implementation="eager").model.layers[1]
    return {"interface": deepseek.mlp.experts, "own forward": OwnForwardExperts()}


def routed(num_experts: int, tokens: int = 6):
    g = torch.Generator().manual_seed(1)
    index = torch.rand(tokens, num_experts, generator=g).argsort(-1)[:, :2]
    return torch.randn(tokens, 32, generator=g), index, torch.rand(tokens, 2, generator=g)


def test_experts_function_and_local_experts():
    """The function we read is what the module computes with; run on a stand-in holding experts 2..3 (as 0..1),
    it equals the whole module on tokens routed to 2..3."""
    for kind, experts in experts_modules().items():
        assert hf_compat.uses_experts_interface(experts) == (kind == "interface"), touch("uses_experts_interface")
        x, index, w = routed(4)
        fn = hf_compat.experts_function(experts)
        with torch.no_grad():
            torch.testing.assert_close(fn(experts, x, index, w), experts(x, index, w), msg=touch("experts_function"))
            last_two = {n: p[2:] for n, p in experts.named_parameters(recurse=False)}
            local = fn(hf_compat.LocalExperts(experts, last_two), x, index % 2, w)
            torch.testing.assert_close(local, experts(x, index % 2 + 2, w), msg=touch("LocalExperts"))
    # the choice follows the config: transformers' grouped_mm for a module built with it
    grouped = AutoModelForCausalLM.from_config(tiny_deepseek(), experts_implementation="grouped_mm")
    from transformers.integrations.moe import grouped_mm_experts_forward

    assert hf_compat.experts_function(grouped.model.layers[1].mlp.experts) is grouped_mm_experts_forward, touch(
        "experts_function"
    )


def test_route_experts():
    """A module routed to our function computes with it: through ExpertsInterface, or by a class swap."""
    for kind, experts in experts_modules().items():
        calls = []

        def recording(module, hidden, index, weights, calls=calls):
            calls.append(module)
            return hidden * 0

        cls = type(experts)
        hf_compat.route_experts(experts, "mtp_recipes_test_recording", recording)
        x, index, w = routed(4)
        assert torch.equal(experts(x, index, w), x * 0) and calls == [experts], touch("route_experts")
        assert isinstance(experts, cls) and (type(experts) is cls) == (kind == "interface"), touch("route_experts")


def test_cache_keyword_and_passed_cache():
    """The cache argument's name on this release (``cache`` from 5.24, ``past_key_values`` before) is the one the
    decoder fills, and the one its layers receive the cache under."""
    from transformers import DynamicCache
    from transformers.masking_utils import create_causal_mask

    renamed = Version(importlib.metadata.version("transformers")) >= Version("5.24")
    assert hf_compat.cache_keyword(create_causal_mask) == ("cache" if renamed else "past_key_values"), touch(
        "cache_keyword"
    )
    model = AutoModelForCausalLM.from_config(tiny_deepseek()).eval()
    decoder = model.get_decoder()
    name = hf_compat.cache_keyword(decoder.forward)
    seen = []
    attention = decoder.layers[0].self_attn
    hook = attention.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs), with_kwargs=True)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        decoder(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True, **{name: cache})
    hook.remove()
    assert cache.get_seq_length() == 3, touch("cache_keyword")
    assert hf_compat.passed_cache(seen[0]) is cache, touch("passed_cache")
    assert hf_compat.passed_cache({"cache_params": None, "position_ids": 1}) is None
    with pytest.raises(TypeError, match="takes no cache argument"):
        hf_compat.cache_keyword(lambda x: x)


def test_warning_outside_the_tested_range(monkeypatch, caplog):
    tested = hf_compat.tested_transformers_range()
    if tested is None:
        pytest.skip("mtp_recipes is not installed (no metadata): the range is read from the installed package")
    assert not hf_compat.warn_if_untested_transformers()  # the suite runs on a tested version
    real_version = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda name: "99.0.0" if name == "transformers" else real_version(name)
    )
    with caplog.at_level(logging.WARNING, logger="mtp_recipes"):
        assert hf_compat.warn_if_untested_transformers()
    (record,) = caplog.records
    assert "99.0.0" in record.getMessage() and tested in record.getMessage()


FENCED = (
    "_attn_implementation",
    "_experts_implementation",
    "_init_weights",
    "_keys_to_ignore_on_load",
    "_keep_in_fp32",
    "_weight_conversions",
    "_gradient_checkpointing_func",
    "_non_persistent_buffers_set",
    "_decode_special_floats",
    "core_model_loading",
    "conversion_mapping",
    "__class__ =",
    "integrations.moe",
    "ExpertsInterface",
    "ALL_EXPERTS_FUNCTIONS",
)


def test_no_touch_point_outside_the_fence():
    """Every use of these internals goes through hf_compat, so a release that moves one fails one test above."""
    package = Path(hf_compat.__file__).parent
    found = [
        f"{path.relative_to(package)}:{number}: {name}"
        for path in sorted(package.rglob("*.py"))
        if path.name != "hf_compat.py"
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        for name in FENCED
        if re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}", line)
    ]
    assert found == []


def test_kernel_fallback_logger():
    """The logger that advises CUDA-only kernels on CPU is the one evaluate and regenerate hold back there."""
    module = importlib.import_module(hf_compat.KERNEL_FALLBACK_LOGGER)
    assert module.logger.name == hf_compat.KERNEL_FALLBACK_LOGGER, touch("KERNEL_FALLBACK_LOGGER")
    assert "is falling back to its reference PyTorch implementation" in inspect.getsource(module), touch(
        "KERNEL_FALLBACK_LOGGER"
    )


def test_mask_function():
    """The full mask of a packed row is block-diagonal causal (an independent reference); ``always`` builds the
    tensor where sdpa would otherwise get ``None`` (its causal flag)."""
    config = tiny_deepseek()
    config._attn_implementation = "sdpa"
    hidden = torch.zeros(1, 7, config.hidden_size)
    packed = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    cache = {hf_compat.cache_keyword(hf_compat.mask_function()): None}
    mask = hf_compat.mask_function()(
        config=config, inputs_embeds=hidden, attention_mask=None, position_ids=packed, **cache
    )
    doc = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    expected = (doc[:, None] == doc[None, :]) & torch.ones(7, 7, dtype=torch.bool).tril()
    assert torch.equal(mask[0, 0].bool(), expected), touch("mask_function")

    plain = torch.arange(7)[None]
    kwargs = dict(config=config, inputs_embeds=hidden, attention_mask=None, position_ids=plain, **cache)
    assert hf_compat.mask_function()(**kwargs) is None, touch("mask_function")
    built = hf_compat.mask_function(always=True)(**kwargs)
    assert torch.equal(built[0, 0].bool(), torch.ones(7, 7, dtype=torch.bool).tril()), touch("mask_function")
