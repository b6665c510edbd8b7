"""Full Stable-Diffusion shapes on a CUDA GPU, float16 and bfloat16 (skipped without CUDA)."""

import pytest
import torch

pytest.importorskip("triton")

from diffrt.kernels import (  # noqa: E402
    attention,
    attention_reference,
    group_norm,
    group_norm_reference,
    patch,
)

pytestmark = pytest.mark.gpu

# Output rounding alone is 2^-11 (fp16) / 2^-8 (bf16) relative; attention adds the rounding of P to 16 bits.
GN_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
ATTN_TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2}

GROUP_NORM_SHAPES = [
    (2, 320, 64, 64),  # SD1.5 / SD2.1 U-Net at 512 px (CFG batch 2)
    (2, 960, 32, 32),  # up-block concat
    (2, 1280, 8, 8),
    (2, 2560, 8, 8),
    (2, 320, 128, 128),  # SDXL U-Net at 1024 px
    (2, 1920, 64, 64),
    (1, 512, 64, 64),  # VAE decoder, 512 px
    (1, 256, 256, 256),
    (1, 128, 512, 512),
    (1, 512, 128, 128),  # VAE decoder, 1024 px
    (1, 256, 512, 512),
    (1, 128, 1024, 1024),  # 32 groups of 4 channels x 1M pixels: split reduction
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", GROUP_NORM_SHAPES)
def test_group_norm_sd_shapes(shape, channels_last, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(shape, device="cuda", generator=g) * 3 + 1).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(shape[1], device="cuda", generator=g).to(dtype)
    b = torch.randn(shape[1], device="cuda", generator=g).to(dtype)
    out = torch.full_like(x, float("nan"))
    y = group_norm(x, 32, w, b, 1e-6, "silu", out=out)
    assert y.stride() == x.stride()
    assert not torch.isnan(y).any()
    ref = group_norm_reference(x, 32, w, b, 1e-6, "silu", dtype=torch.float64)
    tol = GN_TOL[dtype]
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)


# (batch, heads, seq_q, seq_k, head_dim)
ATTENTION_SHAPES = [
    (2, 8, 4096, 4096, 40),  # SD1.5 512 px, highest-resolution self attention
    (2, 8, 4096, 77, 40),  # ... and its cross attention
    (2, 8, 1024, 1024, 80),
    (2, 8, 1024, 77, 80),
    (2, 8, 256, 256, 160),
    (2, 8, 64, 77, 160),
    (2, 5, 4096, 4096, 64),  # SD2.1 / SDXL (head dim 64)
    (2, 10, 4096, 77, 64),
    (2, 20, 1024, 1024, 64),
    (1, 2, 4096, 4096, 128),
    (1, 2, 16384, 16384, 40),  # SD1.5 at 1024 px
    (2, 8, 16384, 77, 40),
]


def _reference_chunked(q, k, v):
    """Float64 reference one (batch, head) at a time (16384^2 scores are 2 GiB in float64)."""
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            out[b, h] = attention_reference(q[b, h], k[b, h], v[b, h], dtype=torch.float64)
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_attention_sd_shapes(shape, dtype):
    batch, heads, seq_q, seq_k, head_dim = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(batch, seq_q, heads, head_dim, device="cuda", generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(batch, seq_k, heads, head_dim, device="cuda", generator=g).to(dtype).transpose(1, 2)
    v = torch.randn(batch, seq_k, heads, head_dim, device="cuda", generator=g).to(dtype).transpose(1, 2)
    out = torch.full(q.shape, float("nan"), device="cuda", dtype=dtype)
    y = attention(q, k, v, out=out)
    assert not torch.isnan(y).any()
    tol = ATTN_TOL[dtype]
    torch.testing.assert_close(y.double(), _reference_chunked(q, k, v), rtol=tol, atol=tol)


def test_attention_float32_on_gpu():
    q, k, v = (torch.randn(1, 2, 300, 80, device="cuda") for _ in range(3))
    y = attention(q, k, v)
    torch.testing.assert_close(
        y.double(), attention_reference(q, k, v, dtype=torch.float64), rtol=1e-5, atol=1e-5
    )


def _sd15_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    # The SD1.5 U-Net config (runwayml/stable-diffusion-v1-5 unet/config.json), random weights.
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
        norm_eps=1e-5,
        act_fn="silu",
    )


@pytest.mark.parametrize("channels_last", [False, True])
def test_patched_sd15_unet_fp16(channels_last):
    """fp16 patched vs fp16 unpatched, both measured against the fp32 unpatched model."""
    pytest.importorskip("diffusers")
    unet32 = _sd15_unet().cuda().eval()
    g = torch.Generator(device="cuda").manual_seed(1)
    sample = torch.randn(2, 4, 64, 64, device="cuda", generator=g)
    context = torch.randn(2, 77, 768, device="cuda", generator=g)
    timestep = torch.tensor([999, 500], device="cuda")
    with torch.no_grad():
        truth = unet32(sample, timestep, context).sample.double()
        unet = unet32.half()
        if channels_last:
            unet = unet.to(memory_format=torch.channels_last)
        args = (sample.half(), timestep, context.half())
        plain = unet(*args).sample.double()
        with patch(unet) as handle:
            assert handle.attention_processors == 32 and handle.skipped == []
            fused = unet(*args).sample.double()

    def rel(a):
        return ((a - truth).norm() / truth.norm()).item()

    assert torch.isfinite(fused).all()
    assert rel(fused) <= 2 * rel(plain) + 1e-3, (rel(fused), rel(plain))
    assert ((fused - plain).norm() / plain.norm()).item() < 3e-2


def test_patched_sd_vae_decoder_bf16_1024px():
    """The SD VAE decoder at 1024 px (bf16: random weights could overflow fp16): group norms split across
    programs; the mid-block attention (head dim 512) stays on SDPA."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
    )
    vae = vae.to("cuda", torch.bfloat16).eval()
    latents = torch.randn(1, 4, 128, 128, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        plain = vae.decode(latents).sample.double()
        with patch(vae) as handle:
            assert any("head dim 512" in s for s in handle.skipped)
            fused = vae.decode(latents).sample.double()
    assert torch.isfinite(fused).all()
    assert ((fused - plain).norm() / plain.norm()).item() < 3e-2


# ------------------------------------------------------------------------------- transformer (DiT) kernels
DIT_TOL = {torch.float16: 2e-3, torch.bfloat16: 8e-3}  # a GPU rounds bf16 to nearest: half a bf16 ulp and change


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens, width", [(4096 + 512, 3072), (4096 + 333, 1536)])  # FLUX.1-dev, SD3 at 1024 px
def test_adaln_kernels_at_flux_and_sd3_shapes(tokens, width, dtype):
    from diffrt.kernels.adaln import adaln_reference, gated_residual_adaln

    g = torch.Generator(device="cuda").manual_seed(0)
    x, y = (torch.randn(2, tokens, width, generator=g, device="cuda", dtype=dtype) for _ in range(2))
    emb = torch.randn(2, 6 * width, generator=g, device="cuda", dtype=dtype)
    shift, scale, gate = emb[:, :width], emb[:, width : 2 * width], emb[:, 2 * width : 3 * width]
    r, n = gated_residual_adaln(x, y, gate, shift, scale)
    ref_r, ref_n = adaln_reference(x, shift, scale, y=y, gate=gate, dtype=torch.float64)
    for out, ref in ((r, ref_r), (n, ref_n)):
        assert float((out.double() - ref).abs().max() / ref.abs().max()) <= DIT_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_qk_norm_rope_at_flux_shapes(dtype):
    from diffrt.kernels.qk_norm import rms_norm_rope, rms_rope_reference

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 4608, 24 * 128, generator=g, device="cuda", dtype=dtype).unflatten(-1, (24, 128))
    w = torch.rand(128, generator=g, device="cuda", dtype=dtype) + 0.5
    angles = torch.rand(4608, 64, generator=g, device="cuda", dtype=torch.float64) * 6.3
    rope = tuple(f(angles).repeat_interleave(2, -1).float() for f in (torch.cos, torch.sin))
    ref = rms_rope_reference(q, w, 1e-6, rope, dtype=torch.float64)
    out = rms_norm_rope(q, w, 1e-6, rope)
    assert float((out.double() - ref).abs().max() / ref.abs().max()) <= DIT_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_patched_tiny_flux_transformer_matches_unpatched(dtype):
    import diffrt

    pipe = diffrt.load("tiny-flux", device="cuda", dtype=dtype)
    spec, module = pipe.backend.specs["transformer"], pipe.backend.modules["transformer"]
    inputs = spec.sample_inputs({"batch": 2, "height": 128, "width": 128, "sequence": 77},
                                "fp16" if dtype == torch.float16 else "bf16", device="cuda")  # fmt: skip
    with torch.no_grad():
        reference = module(**inputs).double()
        with patch(pipe.components.transformer):
            out = module(**inputs).double()
    assert float((out - reference).abs().max() / reference.abs().max()) <= 2e-2  # two low-precision paths
