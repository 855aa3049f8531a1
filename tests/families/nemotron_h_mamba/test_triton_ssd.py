"""Our Triton SSD kernels (run in Triton's interpreter on a CPU, see conftest) against float64 references.

* ``ssd_scan`` (the raw kernels) against the scan written out as per-document masked attention in float64;
* ``ssd_chunk_scan_triton`` (Mamba2 arguments) against our torch scan, which the packing tests check against
  per-document runs, values and every input's gradient;
* a packed Nemotron-H forward/backward through the kernels equal to each document run alone.
"""

import pytest
import torch
from transformers.models.nemotron_h import modeling_nemotron_h as hf

from mtp_recipes.document_layout import seq_idx_from_position_ids
from mtp_recipes.errors import ConfigError
from mtp_recipes.families.nemotron_h_mamba import kernels, ssd, use_boundary_aware_mamba
from mtp_recipes.families.nemotron_h_mamba.triton_ssd import cu_seqlens_from_seq_idx, ssd_chunk_scan_triton, ssd_scan
from tests.families.nemotron_h_mamba.test_mamba_mixer import LENGTHS, tiny_config

# fp32 kernels vs float64 references: the error is fp32 rounding of sums of O(10) terms.
TOL = dict(rtol=1e-4, atol=1e-4)
# The real kernels on a GPU, the interpreter on a CPU; references are computed on the CPU in float64.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def on_device(tensors, dtype=torch.float32):
    return [t.detach().to(DEVICE, dtype).requires_grad_() for t in tensors]


def reference_scan(q, k, v, g, cu_seqlens):
    """y_t = sum_{s<=t in t's document} (q_t . k_s) exp(G_t - G_s) v_s with G the in-document cumsum of g."""
    heads_per_group = v.shape[1] // q.shape[1]
    out = []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        cum = g[start:end].cumsum(0).T  # [h, l]
        qh = q[start:end].repeat_interleave(heads_per_group, 1)
        kh = k[start:end].repeat_interleave(heads_per_group, 1)
        causal = torch.ones(end - start, end - start, dtype=torch.bool).tril()
        decay = (cum[:, :, None] - cum[:, None, :]).masked_fill(~causal, -torch.inf).exp()
        out.append(torch.einsum("thn,shn,hts,shp->thp", qh, kh, decay, v[start:end]))
    return torch.cat(out)


def raw_inputs(tokens=70, groups=2, heads_per_group=2, state=12, head_dim=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    heads = groups * heads_per_group
    q = torch.randn(tokens, groups, state, generator=gen, dtype=torch.float64)
    k = torch.randn(tokens, groups, state, generator=gen, dtype=torch.float64)
    v = torch.randn(tokens, heads, head_dim, generator=gen, dtype=torch.float64)
    g = -torch.rand(tokens, heads, generator=gen, dtype=torch.float64)
    return q, k, v, g


@pytest.mark.parametrize("chunk_tokens, backward_chunk_tokens", [(16, 16), (32, 16), (16, 32)])
def test_kernels_match_the_float64_scan_values_and_gradients(chunk_tokens, backward_chunk_tokens):
    # Documents shorter than, equal to and longer than a chunk; a state size and head dim that are no power of
    # two (masked blocks); two heads per group; head_dim 20 -> two value blocks (partial dq/dk sums).
    cu_seqlens = torch.tensor([0, 11, 16, 32, 53, 70])
    inputs64 = [t.requires_grad_() for t in raw_inputs()]
    inputs32 = on_device(inputs64)
    y = ssd_scan(*inputs32, cu_seqlens, chunk_tokens=chunk_tokens, backward_chunk_tokens=backward_chunk_tokens)
    ref = reference_scan(*inputs64, cu_seqlens)
    torch.testing.assert_close(y.cpu().double(), ref, **TOL)
    weight = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((y * weight.to(DEVICE, torch.float32)).sum(), inputs32)
    ref_grads = torch.autograd.grad((ref * weight).sum(), inputs64)
    for name, got, want in zip("qkvg", grads, ref_grads):
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got.cpu().double(), want, **TOL, msg=lambda m, n=name: f"d{n}: {m}")


def test_the_shipped_launch_shape_at_nemotron_h_sizes():
    """Default chunk lengths (64 forward, 32 backward), state 128 and head_dim 64 (two value blocks), as trained."""
    cu_seqlens = torch.tensor([0, 70, 75, 150])
    inputs64 = [t.requires_grad_() for t in raw_inputs(tokens=150, state=128, head_dim=64, seed=3)]
    inputs32 = on_device(inputs64)
    y = ssd_scan(*inputs32, cu_seqlens)
    ref = reference_scan(*inputs64, cu_seqlens)
    scale = ref.abs().max().item()
    torch.testing.assert_close(y.cpu().double(), ref, rtol=0, atol=1e-5 * scale)
    weight = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad((y * weight.to(DEVICE, torch.float32)).sum(), inputs32)
    for name, got, want in zip("qkvg", grads, torch.autograd.grad((ref * weight).sum(), inputs64)):
        size = want.abs().max().item()
        torch.testing.assert_close(
            got.cpu().double(), want, rtol=0, atol=1e-5 * size, msg=lambda m, n=name: f"d{n}: {m}"
        )


def test_one_document_never_sees_another():
    """Changing document 0's inputs changes nothing in documents 1 and 2, forward or backward."""
    cu_seqlens = torch.tensor([0, 20, 45, 70])
    q, k, v, g = (t.to(DEVICE, torch.float32) for t in raw_inputs())
    y = ssd_scan(q, k, v, g, cu_seqlens, chunk_tokens=16)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[:20], k2[:20], v2[:20] = 5.0, -3.0, 7.0
    y2 = ssd_scan(q2, k2, v2, g, cu_seqlens, chunk_tokens=16)
    assert (y[:20] - y2[:20]).abs().max() > 1.0  # the change is visible where it should be
    assert torch.equal(y[20:], y2[20:])


def test_cu_seqlens_split_rows_and_documents():
    seq_idx = torch.tensor([[0, 0, 1, 1, 1, 0], [3, 3, 3, 3, 3, 3]])  # id 0 reused: three documents in row 0
    assert cu_seqlens_from_seq_idx(seq_idx, 2, 6, torch.device("cpu")).tolist() == [0, 2, 5, 6, 12]
    assert cu_seqlens_from_seq_idx(None, 2, 6, torch.device("cpu")).tolist() == [0, 6, 12]


def mamba_inputs(batch=2, seq=40, heads=4, head_dim=8, groups=2, state=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = dict(
        x=(batch, seq, heads, head_dim),
        dt=(batch, seq, heads),
        A=(heads,),
        B=(batch, seq, groups, state),
        C=(batch, seq, groups, state),
        D=(heads,),
        dt_bias=(heads,),
        z=(batch, seq, heads, head_dim),
    )
    tensors = {name: torch.randn(shape, generator=gen, dtype=torch.float64) for name, shape in shapes.items()}
    tensors["A"] = -tensors["A"].exp()
    return tensors


def test_mamba_arguments_match_the_torch_scan_with_packed_rows():
    """Every Mamba2 input's gradient too: dt through softplus/clamp, A through the decay, D, z, dt_bias."""
    inputs64 = {n: t.requires_grad_() for n, t in mamba_inputs().items()}
    inputs32 = dict(zip(inputs64, on_device(inputs64.values())))
    seq_idx = torch.tensor([[0] * 9 + [1] * 20 + [0] * 11, [4] * 40])  # a reused id: three documents in row 0
    options = dict(dt_softplus=True, dt_limit=(0.001, 5.0))
    got = ssd_chunk_scan_triton(**inputs32, **options, seq_idx=seq_idx.to(DEVICE)).cpu()
    want = ssd.ssd_chunk_scan(chunk_size=8, **inputs64, **options, seq_idx=seq_idx)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, **TOL)
    weight = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((got * weight.float()).sum(), list(inputs32.values()))
    ref_grads = torch.autograd.grad((want * weight).sum(), list(inputs64.values()))
    for name, g32, g64 in zip(inputs64, grads, ref_grads):
        # The decay gradient comes from dG_t = q_t.dq_t - k_t.dk_t (a difference of larger fp32 sums), so dA and
        # dt_bias (sums of it over every token) carry ~1e-5 of their size in fp32 error; the rest ~1e-7.
        size = g64.abs().max().item()
        tol = 1e-3 if name in ("A", "dt_bias") else 1e-5
        torch.testing.assert_close(g32.cpu().double(), g64, rtol=0, atol=tol * size, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_half_precision_inputs_stay_close_to_fp32(dtype):
    """The kernels' casts to the input dtype before each dot. bf16 needs a GPU: Triton's interpreter multiplies
    bf16 as raw uint16 bits in ``tl.dot``; fp16 exercises the same casts on the CPU."""
    inputs = {n: t.to(DEVICE) for n, t in mamba_inputs().items()}
    seq_idx = torch.repeat_interleave(torch.arange(2), torch.tensor([15, 25]))[None].expand(2, -1).to(DEVICE)
    want = ssd.ssd_chunk_scan(chunk_size=8, **{n: t.float() for n, t in inputs.items()}, seq_idx=seq_idx)
    got = ssd_chunk_scan_triton(**{n: t.to(dtype) for n, t in inputs.items()}, seq_idx=seq_idx)
    assert got.dtype == dtype
    assert (got.float() - want).abs().max() / want.abs().max() < 2e-2


@pytest.fixture
def forced_triton(monkeypatch):
    monkeypatch.setenv(kernels.SCAN_ENV, "triton")
    assert kernels.scan_backend(torch.zeros(1, device=DEVICE)) == "triton"
    return kernels


def test_a_packed_nemotron_h_through_the_kernels_equals_each_document_alone(forced_triton):
    torch.manual_seed(0)
    model = hf.NemotronHModel(tiny_config()).to(DEVICE).train()
    assert use_boundary_aware_mamba(model) == 1
    ids = torch.randint(0, 64, (1, sum(LENGTHS)), device=DEVICE)
    position_ids = torch.cat([torch.arange(n) for n in LENGTHS])[None].to(DEVICE)
    seq_idx = seq_idx_from_position_ids(position_ids)
    packed = model(input_ids=ids, position_ids=position_ids, seq_idx=seq_idx, use_cache=False).last_hidden_state
    alone = torch.cat(
        [
            model(
                input_ids=doc, position_ids=torch.arange(doc.shape[1], device=DEVICE)[None], use_cache=False
            ).last_hidden_state
            for doc in ids.split(LENGTHS, dim=1)
        ],
        dim=1,
    )
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    mixer = model.layers[0].mixer
    grad_packed = torch.autograd.grad(packed.square().sum(), (mixer.A_log, mixer.in_proj.weight))
    grad_alone = torch.autograd.grad(alone.square().sum(), (mixer.A_log, mixer.in_proj.weight))
    for got, want in zip(grad_packed, grad_alone):
        # fp32 noise of the whole model (the torch scan differs from per-document runs by the same ~1e-5 of
        # the largest gradient); a leak between documents would be of the order of the gradient itself.
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_forcing_an_unavailable_scan_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(kernels.SCAN_ENV, "bogus")
    with pytest.raises(ConfigError, match="MTP_RECIPES_MAMBA_SCAN='bogus' is not one of"):
        kernels.scan_backend(torch.zeros(1))
    kernels.mamba_ssm_chunk_scan.cache_clear()
    monkeypatch.setenv(kernels.SCAN_ENV, "mamba_ssm")
    with pytest.raises(ConfigError, match="does not import here"):
        kernels.scan_backend(torch.zeros(1))


def test_stateful_calls_leave_our_kernels_for_the_torch_scan(forced_triton):
    assert kernels.scan_backend(torch.zeros(1), stateful=True) == "torch"
