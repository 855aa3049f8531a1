"""Scan selection: for CUDA inputs mamba_ssm's Triton kernel when importable, else ours, else our torch scan.

No GPU, no mamba_ssm and no causal_conv1d here, so fake ``mamba_ssm.ops.triton.ssd_combined`` and
``causal_conv1d`` modules are injected into ``sys.modules`` and the device test is monkeypatched. This checks which function runs and with which
arguments; the real kernel path is NOT exercised by these tests.
"""

import sys
import types

import pytest
import torch
from transformers.models.nemotron_h import modeling_nemotron_h as hf

from mtp_recipes.families.nemotron_h_mamba import kernels, mamba2_mixer_forward, ssd, use_boundary_aware_mamba
from tests.families.nemotron_h_mamba._mamba_reference import conv_reference
from tests.families.nemotron_h_mamba.test_mamba_mixer import LENGTHS, tiny_config

HEADS, HEAD_DIM, GROUPS, STATE, SEQ = 4, 8, 2, 8, sum(LENGTHS)


def scan_inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, SEQ, HEADS, HEAD_DIM, generator=gen)
    dt = torch.randn(1, SEQ, HEADS, generator=gen)
    A = -torch.rand(HEADS, generator=gen)
    B, C = (torch.randn(1, SEQ, GROUPS, STATE, generator=gen) for _ in range(2))
    return x, dt, A, B, C


@pytest.fixture
def fresh_selection():
    kernels.mamba_ssm_chunk_scan.cache_clear()
    kernels.mamba_ssm_fused_kernel.cache_clear()
    yield
    kernels.mamba_ssm_chunk_scan.cache_clear()
    kernels.mamba_ssm_fused_kernel.cache_clear()


@pytest.fixture
def fake_kernel(monkeypatch, fresh_selection):
    """A fake mamba_ssm Triton module whose kernel records its calls and answers with our torch scan."""
    calls = []

    def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, **kw):
        calls.append(kw)
        return ssd.ssd_chunk_scan(x, dt, A, B, C, chunk_size, **kw)

    names = ["mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton", kernels.MAMBA_SSM_SCAN_MODULE]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules[kernels.MAMBA_SSM_SCAN_MODULE].mamba_chunk_scan_combined = mamba_chunk_scan_combined
    return calls


def test_without_mamba_ssm_the_torch_scan_runs(fresh_selection):
    assert kernels.mamba_ssm_chunk_scan() is None  # not installed here
    x, dt, A, B, C = scan_inputs()
    seq_idx = torch.repeat_interleave(torch.arange(3), torch.tensor(LENGTHS))[None]
    got = kernels.mamba2_chunk_scan(x, dt, A, B, C, 8, dt_softplus=True, seq_idx=seq_idx)
    assert torch.equal(got, ssd.ssd_chunk_scan(x, dt, A, B, C, 8, dt_softplus=True, seq_idx=seq_idx))
    assert kernels.scan_backend(x) == "torch"


def test_cpu_tensors_stay_on_the_torch_scan(fake_kernel):
    assert kernels.mamba_ssm_chunk_scan() is not None
    kernels.mamba2_chunk_scan(*scan_inputs(), 8)
    assert fake_kernel == []


def test_auto_on_cuda_prefers_mamba_ssm_then_our_triton_kernels(fresh_selection, monkeypatch):
    monkeypatch.setattr(kernels, "on_cuda", lambda tensor: True)
    x = scan_inputs()[0]
    assert kernels.scan_backend(x) == "triton"  # no mamba_ssm here, Triton imports
    assert kernels.scan_backend(x, stateful=True) == "torch"  # initial/final states: our kernels have none
    monkeypatch.setattr(kernels, "our_triton_scan", lambda: None)
    assert kernels.scan_backend(x) == "torch"  # no Triton either


def test_cuda_tensors_call_the_kernel_with_seq_idx(fake_kernel, monkeypatch):
    monkeypatch.setattr(kernels, "on_cuda", lambda tensor: True)
    x, dt, A, B, C = scan_inputs()
    seq_idx = torch.repeat_interleave(torch.arange(3), torch.tensor(LENGTHS))[None]  # int64 in
    D, dt_bias = torch.ones(HEADS, dtype=torch.float64), torch.zeros(HEADS, dtype=torch.float64)
    out = kernels.mamba2_chunk_scan(
        x, dt, A, B, C, 8, D=D, dt_bias=dt_bias, dt_softplus=True, dt_limit=(0.001, float("inf")), seq_idx=seq_idx
    )
    assert kernels.scan_backend(x) == "mamba_ssm-triton"
    (kw,) = fake_kernel
    assert kw["seq_idx"].dtype == torch.int32 and torch.equal(kw["seq_idx"], seq_idx.int())
    assert kw["D"].dtype == kw["dt_bias"].dtype == torch.float32  # one autotune key for every layer
    assert kw["dt_softplus"] and kw["dt_limit"] == (0.001, float("inf")) and kw["z"] is None
    ref = ssd.ssd_chunk_scan(
        x, dt, A, B, C, 8, D=D, dt_bias=dt_bias, dt_softplus=True, seq_idx=seq_idx, dt_limit=(0.001, float("inf"))
    )
    torch.testing.assert_close(out, ref)


def test_mixer_routes_the_scan_through_the_kernel(fake_kernel, monkeypatch):
    """Training-mode forward of our Nemotron-H mixer reaches the (fake) kernel with the packed seq_idx."""
    monkeypatch.setattr(kernels, "on_cuda", lambda tensor: True)
    torch.manual_seed(0)
    model = hf.NemotronHModel(tiny_config()).train()
    assert use_boundary_aware_mamba(model) == 1
    position_ids = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    ids = torch.randint(0, 64, (1, SEQ))
    seq_idx = torch.repeat_interleave(torch.arange(3), torch.tensor(LENGTHS))[None]
    model(input_ids=ids, position_ids=position_ids, seq_idx=seq_idx, use_cache=False).last_hidden_state.sum().backward()
    (kw,) = fake_kernel
    assert torch.equal(kw["seq_idx"], seq_idx.int())


@pytest.fixture
def fake_conv(monkeypatch):
    """A fake ``causal_conv1d`` package whose kernel records its calls and answers with the float64 loop."""
    calls = []

    def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, activation=None):
        calls.append({"seq_idx": seq_idx, "activation": activation})
        return conv_reference(x.double(), weight.double(), bias.double(), seq_idx, activation).to(x.dtype)

    module = types.ModuleType(kernels.CAUSAL_CONV1D_MODULE)
    module.causal_conv1d_fn = causal_conv1d_fn
    monkeypatch.setitem(sys.modules, kernels.CAUSAL_CONV1D_MODULE, module)
    kernels.causal_conv1d_kernel.cache_clear()
    kernels.mamba_ssm_fused_kernel.cache_clear()
    yield calls
    kernels.causal_conv1d_kernel.cache_clear()
    kernels.mamba_ssm_fused_kernel.cache_clear()


def packed_mixer_call():
    torch.manual_seed(0)
    mixer = hf.NemotronHMamba2Mixer(tiny_config(), layer_idx=0).double()
    h = torch.randn(1, SEQ, 32, dtype=torch.float64)
    seq_idx = torch.repeat_interleave(torch.arange(3), torch.tensor(LENGTHS))[None]
    return mixer, h, seq_idx


def test_cuda_conv_kernel_gets_int32_seq_idx(fake_conv, monkeypatch):
    mixer, h, seq_idx = packed_mixer_call()
    on_cpu = mamba2_mixer_forward(mixer, h, seq_idx)
    monkeypatch.setattr(kernels, "on_cuda", lambda tensor: True)
    monkeypatch.setattr(kernels, "our_triton_scan", lambda: None)  # the scan stays torch: only the conv moves
    out = mamba2_mixer_forward(mixer, h, seq_idx)
    (call,) = fake_conv
    assert call["seq_idx"].dtype == torch.int32 and torch.equal(call["seq_idx"], seq_idx.int())
    assert call["activation"] == "silu"
    assert (out - on_cpu).abs().max() < 1e-10


def test_fused_kernel_runs_with_mamba_ssm_and_causal_conv1d(fake_kernel, fake_conv, monkeypatch):
    """Both packages present on CUDA: one fused call with the mixer's parameters; padded batches stay unfused."""
    fused_calls = []

    def fused(zxbcdt, conv_w, conv_b, dt_bias, A, D, chunk_size, **kw):
        fused_calls.append(kw)
        return torch.full((*zxbcdt.shape[:-1], 32), 7.0, dtype=zxbcdt.dtype)

    sys.modules[kernels.MAMBA_SSM_SCAN_MODULE].mamba_split_conv1d_scan_combined = fused
    mixer, h, seq_idx = packed_mixer_call()
    monkeypatch.setattr(kernels, "on_cuda", lambda tensor: True)
    assert (mamba2_mixer_forward(mixer, h, seq_idx) == 7.0).all()
    (kw,) = fused_calls
    assert kw["seq_idx"].dtype == torch.int32 and torch.equal(kw["seq_idx"], seq_idx.int())
    assert kw["norm_before_gate"] is False and kw["headdim"] == 8 and kw["ngroups"] == 2
    assert kw["rmsnorm_weight"] is mixer.norm.weight and kw["outproj_weight"] is mixer.out_proj.weight
    assert kw["dt_limit"] == (mixer.config.time_step_min, float("inf"))
    assert fake_kernel == []  # no separate scan
    mamba2_mixer_forward(mixer, h, attention_mask=torch.ones(1, SEQ, dtype=torch.long))
    assert len(fused_calls) == 1 and len(fake_kernel) == 1  # padded: separate conv + scan
