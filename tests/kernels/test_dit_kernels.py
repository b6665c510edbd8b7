"""The transformer-block kernels (adaLN modulation, gated residuals, query/key RMSNorm with rotary embeddings,
joint attention) against float64 references, on odd shapes, with every output element checked to be written.

Tolerances (max |error| / max |reference|): float32 1e-5, float16 2e-3, bfloat16 one bf16 ulp (2^-7): the
format's own precision, and the Triton interpreter truncates bfloat16 stores where a GPU rounds to nearest.
"""

import math

import pytest
import torch

pytest.importorskip("triton")

from diffrt.kernels import adaln, qk_norm  # noqa: E402
from diffrt.kernels.adaln import adaln_modulate, adaln_reference, gated_residual, gated_residual_adaln  # noqa: E402
from diffrt.kernels.dit_common import joint_attention  # noqa: E402
from diffrt.kernels.qk_norm import rms_norm_rope, rms_rope_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2**-7}
DTYPES = list(TOL)
ROWS = [(1, 333, 96), (3, 77, 200), (2, 3, 3072)]  # 77 + 256 tokens; widths off the block; FLUX's width


def _rel(out, ref) -> float:
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max())


@pytest.fixture
def poisoned(monkeypatch):
    """Outputs the kernels allocate start as NaN: an element the kernel does not write shows up."""
    real = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: real(t, **kw).fill_(float("nan")))


def _rows(batch, tokens, width, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, width, generator=g).to(dtype)
    y = torch.randn(batch, tokens, width, generator=g).to(dtype)
    emb = torch.randn(batch, 6 * width, generator=g).to(dtype)  # modulation chunks are views of one embedding
    shift, scale, gate = (emb[:, k * width : (k + 1) * width] for k in range(3))
    return (t.to(DEVICE) for t in (x, y, shift, scale, gate))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROWS)
def test_adaln_kernels_match_float64(shape, dtype, poisoned):
    x, y, shift, scale, gate = _rows(*shape, dtype)
    _, normed = adaln_reference(x, shift, scale, dtype=torch.float64)
    out = adaln_modulate(x, shift, scale)
    assert out.dtype == dtype and _rel(out, normed) <= TOL[dtype]
    residual, normed = adaln_reference(x, shift, scale, y=y, gate=gate, dtype=torch.float64)
    r, n = gated_residual_adaln(x, y, gate, shift, scale)
    assert _rel(r, residual) <= TOL[dtype] and _rel(n, normed) <= TOL[dtype]
    assert _rel(gated_residual(x, y, gate), residual) <= TOL[dtype]


def test_the_float16_clip_and_strided_rows():
    x, y, shift, scale, gate = _rows(2, 9, 40, torch.float16)
    big = torch.full_like(gate, 3e4)
    clipped = gated_residual(x + 5e4, y.abs() + 1, big, clip=True)
    assert torch.isfinite(clipped).all() and clipped.max() == adaln.FP16_MAX
    wide = torch.randn(2, 9, 80, dtype=torch.float16, device=DEVICE)[..., :40]  # rows 80 apart
    reference = adaln_reference(wide, shift, scale, dtype=torch.float64)[1]
    assert _rel(adaln_modulate(wide, shift, scale, eps=1e-5), reference) <= 1e-2  # eps 1e-6 vs 1e-5: tiny


def _rope_tables(positions, head_dim, seed=1):
    angles = torch.randn(positions, head_dim // 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return tuple(f(angles).repeat_interleave(2, -1).float().to(DEVICE) for f in (torch.cos, torch.sin))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, heads, head_dim", [(1, 3, 64), (3, 2, 128)])
def test_qk_norm_and_rope_fill_the_joint_sequence(batch, heads, head_dim, dtype):
    g = torch.Generator().manual_seed(0)
    text, image = 77, 256  # FLUX's order: text first
    q_text, q_image = (torch.randn(batch, n, heads * head_dim, generator=g).to(dtype).to(DEVICE).unflatten(-1, (heads,
                       head_dim)) for n in (text, image))  # fmt: skip
    w_text, w_image = ((1 + 0.2 * torch.randn(head_dim, generator=g)).to(dtype).to(DEVICE) for _ in range(2))
    rope = _rope_tables(text + image, head_dim)
    joint = torch.full((batch, text + image, heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    rms_norm_rope(q_text, w_text, 1e-6, rope, out=joint, offset=0)
    rms_norm_rope(q_image, w_image, 1e-6, rope, out=joint, offset=text)
    reference = torch.cat([rms_rope_reference(q_text, w_text, 1e-6, rope, dtype=torch.float64),
                           rms_rope_reference(q_image, w_image, 1e-6, rope, offset=text, dtype=torch.float64)], 1)
    assert not joint.isnan().any() and _rel(joint, reference) <= TOL[dtype]


def test_qk_norm_without_rope_and_the_plain_copy():
    x = torch.randn(3, 333, 3, 64, device=DEVICE)[:, :, :, :]  # SD3.5: RMSNorm only; SD3: a copy into place
    w = torch.rand(64, device=DEVICE) + 0.5
    assert _rel(rms_norm_rope(x, w), rms_rope_reference(x, w)) <= 1e-5
    joint = torch.full((3, 340, 3, 64), float("nan"), device=DEVICE)
    rms_norm_rope(x, None, norm=False, out=joint, offset=7)
    assert torch.equal(joint[:, 7:], x) and joint[:, :7].isnan().all()


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("batch", [1, 3])
def test_joint_attention_over_token_major_buffers(batch, head_dim):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(batch, 333, 2, head_dim, generator=g).to(DEVICE) for _ in range(3))
    out = joint_attention(q, k, v)
    weights = torch.softmax(q.double().transpose(1, 2) @ k.double().transpose(1, 2).transpose(-1, -2)
                            / math.sqrt(head_dim), dim=-1)  # fmt: skip
    reference = (weights @ v.double().transpose(1, 2)).transpose(1, 2).flatten(2)
    assert out.shape == (batch, 333, 2 * head_dim) and _rel(out, reference) <= 1e-5


def test_bad_arguments_are_named():
    x, y, shift, scale, gate = _rows(2, 5, 16, torch.float32)
    cases = [
        (lambda: adaln_modulate(x[0], shift, scale), "3-D \\[batch, tokens, width\\]"),
        (lambda: adaln_modulate(x, shift[:1], scale), "shift must be a \\[batch, width\\] = \\(2, 16\\)"),
        (lambda: adaln_modulate(x, shift, scale, eps=0), "eps must be > 0"),
        (lambda: gated_residual(x, y[:, :3], gate), "y must match x"),
        (lambda: rms_norm_rope(x.unflatten(-1, (2, 8)), torch.ones(4)), "weight must be a \\(8,\\) tensor"),
        (lambda: rms_norm_rope(torch.ones(1, 2, 1, 5), rope=(torch.ones(2, 5), torch.ones(2, 5))), "must be even"),
        (lambda: rms_norm_rope(torch.ones(1, 4, 1, 8), rope=(torch.ones(2, 8), torch.ones(2, 8))), "covers 2 pos"),
        (lambda: rms_norm_rope(torch.ones(1, 4, 1, 8), out=torch.ones(1, 5, 1, 8), offset=3), "do not fit"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_inputs_that_need_grad_fall_back_to_torch_when_asked():
    x, _, shift, scale, _ = _rows(1, 4, 32, torch.float32)
    x.requires_grad_(True)
    with pytest.raises(ValueError, match="inference-only"):
        adaln_modulate(x, shift, scale)
    torch.testing.assert_close(adaln_modulate(x, shift, scale, fallback=True).detach(),
                               adaln_reference(x, shift, scale)[1].float(), rtol=1e-5, atol=1e-5)  # fmt: skip
    q = torch.randn(1, 4, 2, 8, requires_grad=True)
    torch.testing.assert_close(qk_norm.rms_norm_rope(q, fallback=True).detach(), rms_rope_reference(q).float())
