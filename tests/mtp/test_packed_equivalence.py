"""A packed row behaves exactly as if each document were alone (spec §1), for every family.

Three documents of different lengths share one row. At every slot, the main logits and each MTP
depth's hidden state equal those of the document run alone; the summed losses and the gradients of
the total loss equal the sums over the separate documents. Float64, so any leak through attention,
the Mamba2 conv/SSM state or the MTP roll shows up far above rounding.
"""

from __future__ import annotations

import pytest
import torch

from mtp_recipes.model import MTPModel
from tests.helpers import DEBUG_MODELS, debug_model_config, depths, packed_batch

LENGTHS = [11, 5, 16]


@pytest.fixture
def keep_float64(monkeypatch):
    """transformers' norms compute in float32 even for float64 inputs; keep float64 so 1e-9 means something.

    Two runs whose float64 inputs differ in the last bit (different matmul shapes) can round to
    different float32 values, which the rest of the network then amplifies to ~1e-8: rounding, not
    a leak. Inside this fixture a float64 tensor asked to become float32 stays float64.
    """
    to, flt, typ, softmax = torch.Tensor.to, torch.Tensor.float, torch.Tensor.type, torch.nn.functional.softmax

    def to64(self, *args, **kwargs):
        wants32 = torch.float32 in args or kwargs.get("dtype") is torch.float32
        if self.dtype is torch.float64 and wants32:
            args = tuple(torch.float64 if a is torch.float32 else a for a in args)
            kwargs = {k: torch.float64 if v is torch.float32 else v for k, v in kwargs.items()}
        return to(self, *args, **kwargs)

    def type64(self, dtype=None, *args, **kwargs):
        if self.dtype is torch.float64 and dtype in (torch.float32, "torch.FloatTensor"):
            return self
        return typ(self, dtype, *args, **kwargs) if dtype is not None else typ(self)

    def softmax64(x, *args, dtype=None, **kwargs):  # eager attention's softmax(..., dtype=float32)
        if x.dtype is torch.float64 and dtype is torch.float32:
            dtype = torch.float64
        return softmax(x, *args, dtype=dtype, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "softmax", softmax64)
    monkeypatch.setattr(torch.Tensor, "to", to64)
    monkeypatch.setattr(torch.Tensor, "type", type64)
    monkeypatch.setattr(
        torch.Tensor, "float", lambda self, *a, **k: self if self.dtype is torch.float64 else flt(self, *a, **k)
    )


ALL_NEMOTRON_TYPES = ["linear_attention", "full_attention", "mlp", "moe"]


def model_for(name: str, attn: str = "sdpa") -> MTPModel:
    cfg = debug_model_config(name)
    overrides = depths(name, 2)
    if cfg["model_type"] == "nemotron_h":
        cfg["layers_block_type"] = ALL_NEMOTRON_TYPES + ["linear_attention"]
        cfg["chunk_size"] = 8  # documents cross chunk edges
        overrides["block_types"] = "M*-E"
    torch.manual_seed(0)
    model = MTPModel.from_config(cfg, experts_implementation="eager", attn_implementation=attn, **overrides)
    return model.double()


def sums(model: MTPModel, batch: dict[str, torch.Tensor]):
    """Losses as sums over targets (normalisers of 1), so documents add up."""
    d = model.mtp.num_layers
    return model(**batch, num_label_tokens=1, num_depth_tokens=[1] * d, return_logits=True)


# MiMo-V2-Flash: transformers has no sdpa or flex_attention path for its attention sinks, only eager (and flash).
EAGER_ONLY = ("mimo_v2_flash_debug",)


@pytest.mark.parametrize(
    ("name", "attn"), [(n, a) for n in DEBUG_MODELS for a in ("sdpa", "eager") if a == "eager" or n not in EAGER_ONLY]
)
def test_packed_row_equals_documents_alone(name, attn, keep_float64):
    model = model_for(name, attn)
    packed = packed_batch(model.text_config.vocab_size, [LENGTHS], seed=1)
    out = sums(model, packed)
    out.loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    start = 0
    main_total, depth_totals = 0.0, [0.0, 0.0]
    for length in LENGTHS:
        span = slice(start, start + length)
        alone = {k: v[:, span] for k, v in packed.items()}
        alone["seq_idx"] = torch.zeros_like(alone["seq_idx"])
        ref = sums(model, alone)
        ref.loss.backward()  # gradients accumulate over the documents
        torch.testing.assert_close(out.logits[:, span], ref.logits, rtol=0, atol=1e-9)
        for k in range(2):
            torch.testing.assert_close(out.mtp_hidden_states[k][:, span], ref.mtp_hidden_states[k], rtol=0, atol=1e-9)
            depth_totals[k] += ref.mtp_losses[k]
        main_total += ref.main_loss
        start += length

    torch.testing.assert_close(out.main_loss, main_total, rtol=1e-12, atol=1e-9)
    for k in range(2):
        torch.testing.assert_close(out.mtp_losses[k], depth_totals[k], rtol=1e-12, atol=1e-9)
    separate = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(separate) == set(packed_grads)
    for n, g in packed_grads.items():
        torch.testing.assert_close(g, separate[n], rtol=1e-7, atol=1e-9)


def test_a_leak_would_be_detected():
    """Without seq_idx the Mamba state and the MTP roll cross documents: the same check must fail."""
    model = model_for("nemotron_h_debug")
    packed = packed_batch(model.text_config.vocab_size, [LENGTHS], seed=1)
    leaky = {k: v for k, v in packed.items() if k != "seq_idx"}
    leaky["position_ids"] = torch.arange(sum(LENGTHS))[None]
    out = sums(model, leaky)
    alone = {k: v[:, LENGTHS[0] : LENGTHS[0] + LENGTHS[1]] for k, v in packed.items()}
    ref = sums(model, {**alone, "seq_idx": torch.zeros_like(alone["seq_idx"])})
    diff = (out.logits[:, LENGTHS[0] : LENGTHS[0] + LENGTHS[1]] - ref.logits).abs().max()
    assert diff > 1e-3


# MiniMax-M3, DeepSeek-V3.2, MiMo-V2-Flash and Qwen3-Next: transformers refuses flex_attention for them ("does not
# support an attention implementation through torch's flex_attention"), so their packed path is the sdpa/eager one.
NO_FLEX = (
    "minimax_m3_debug",
    "deepseek_v32_debug",
    "qwen3_next_debug",
    "qwen3_5_debug",
    "qwen3_5_moe_debug",
    *EAGER_ONLY,
)
FLEX_MODELS = [name for name in DEBUG_MODELS if name not in NO_FLEX]


@pytest.mark.parametrize("name", FLEX_MODELS)
def test_flex_attention_keeps_packed_documents_apart(name):
    """FlexAttention's block mask from packed position_ids: logits and MTP states equal per-document runs of the
    same weights through SDPA (so FlexAttention compiles for the packed row only).

    fp32 (flex has no float64 kernels) and forward only on a CPU, where FlexAttention has no backward;
    on a GPU the gradients are compared too.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model_for(name, "flex_attention").float().to(device)
    reference = model_for(name, "sdpa").float().to(device)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    packed = {k: v.to(device) for k, v in packed_batch(model.text_config.vocab_size, [LENGTHS], seed=1).items()}
    backward = device == "cuda"
    with torch.set_grad_enabled(backward):
        out = sums(model, packed)
        if backward:
            out.loss.backward()
            packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        start = 0
        for length in LENGTHS:
            span = slice(start, start + length)
            alone = {k: v[:, span] for k, v in packed.items()}
            ref = sums(reference, {**alone, "seq_idx": torch.zeros_like(alone["seq_idx"])})
            if backward:
                ref.loss.backward()
            torch.testing.assert_close(out.logits[:, span], ref.logits, rtol=1e-5, atol=1e-5)
            for k in range(2):
                torch.testing.assert_close(
                    out.mtp_hidden_states[k][:, span], ref.mtp_hidden_states[k], rtol=1e-5, atol=1e-5
                )
            start += length
    if backward:
        for n, g in packed_grads.items():
            torch.testing.assert_close(g, dict(reference.named_parameters())[n].grad, rtol=1e-4, atol=1e-5)
