"""patch(): tiny diffusers U-Net and VAE with the Triton kernels swapped in match the originals; restore()."""

import pytest
import torch
from torch import nn

pytest.importorskip("triton")
pytest.importorskip("diffusers")

from diffrt.kernels import (  # noqa: E402
    GroupNormAct,
    PatchHandle,
    SiLULinear,
    TritonAttnProcessor,
    patch,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return (
        UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            norm_num_groups=8,
            attention_head_dim=8,
        )
        .to(DEVICE)
        .eval()
    )


def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return (
        AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            norm_num_groups=8,
            sample_size=16,
        )
        .to(DEVICE)
        .eval()
    )


def _snapshot(model):
    modules = {name: m for name, m in model.named_modules()}
    processors = {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}
    return modules, processors


def _assert_restored(model, snapshot):
    modules, processors = snapshot
    now_modules, now_processors = _snapshot(model)
    assert now_modules.keys() == modules.keys()
    assert all(now_modules[name] is modules[name] for name in modules)
    assert all(now_processors[name] is processors[name] for name in processors)


def test_patched_unet_matches_unpatched_and_restores():
    from diffusers.models.resnet import ResnetBlock2D

    unet = _tiny_unet()
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 8, 8, generator=g).to(DEVICE)
    context = torch.randn(1, 5, 32, generator=g).to(DEVICE)
    timestep = torch.tensor([321], device=DEVICE)
    snapshot = _snapshot(unet)
    keys = list(unet.state_dict())
    with torch.no_grad():
        ref = unet(sample, timestep, context).sample
        handle = patch(unet)
        assert isinstance(handle, PatchHandle)

        resnets = [m for m in unet.modules() if isinstance(m, ResnetBlock2D)]
        assert resnets and all(
            isinstance(r.norm1, GroupNormAct) and r.norm1.activation == "silu" for r in resnets
        )
        assert all(
            r.norm2.activation == "silu"
            and type(r.nonlinearity) is nn.Identity
            and type(r.time_emb_proj) is SiLULinear  # the time embedding keeps its SiLU
            for r in resnets
        )
        assert unet.conv_norm_out.activation == "silu" and type(unet.conv_act) is nn.Identity
        assert not any(type(m) is nn.GroupNorm for m in unet.modules())
        processors = list(unet.attn_processors.values())
        assert processors and all(isinstance(p, TritonAttnProcessor) for p in processors)
        assert handle.fused_norms == 2 * len(resnets) + 1
        transformers = [m for m in unet.modules() if type(m).__name__ == "Transformer2DModel"]
        assert handle.plain_norms == len(transformers) == 4  # each Transformer2DModel's input norm
        assert handle.attention_processors == len(processors) and handle.skipped == []
        assert list(unet.state_dict()) == keys  # parameters shared under the same names

        out = unet(sample, timestep, context).sample
        assert all(p.calls["triton"] == 1 for p in processors)
        handle.restore()
        handle.restore()  # idempotent
        again = unet(sample, timestep, context).sample

    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, ref, rtol=0, atol=0)
    _assert_restored(unet, snapshot)
    assert list(unet.state_dict()) == keys


def test_patched_vae_decode_matches_and_context_manager_restores():
    vae = _tiny_vae()
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    snapshot = _snapshot(vae)
    with torch.no_grad():
        ref = vae.decode(latents).sample
        with patch(vae) as handle:
            assert handle.attention_processors == 2  # encoder and decoder mid-block attention
            assert isinstance(vae.decoder.conv_norm_out, GroupNormAct)
            assert isinstance(vae.decoder.mid_block.attentions[0].group_norm, GroupNormAct)
            out = vae.decode(latents).sample
        assert handle.restored
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    _assert_restored(vae, snapshot)


def test_scale_shift_resnet_keeps_its_norms_unfused():
    """With time_embedding_norm='scale_shift' a scale/shift sits between norm2 and the SiLU."""
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    block = ResnetBlock2D(
        in_channels=8, out_channels=8, temb_channels=6, groups=4, time_embedding_norm="scale_shift"
    )
    block = block.to(DEVICE).eval()
    x = torch.randn(2, 8, 5, 3, device=DEVICE)
    temb = torch.randn(2, 6, device=DEVICE)
    with torch.no_grad():
        ref = block(x, temb)
        with patch(block) as handle:
            # the SiLU after norm1 is shared with the scale/shift path: nothing is fused, norms become plain
            assert block.norm1.activation is None and block.norm2.activation is None
            assert handle.fused_norms == 0 and handle.plain_norms == 2
            assert type(block.nonlinearity) is nn.SiLU
            out = block(x, temb)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert type(block.norm2) is nn.GroupNorm and type(block.nonlinearity) is nn.SiLU


def test_silu_linear_shares_parameters_and_applies_silu_first():
    linear = nn.Linear(5, 3).to(DEVICE)
    wrapped = SiLULinear.wrap(linear)
    assert wrapped.weight is linear.weight and wrapped.bias is linear.bias
    assert list(wrapped.state_dict()) == list(linear.state_dict())
    x = torch.randn(4, 5, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), linear(torch.nn.functional.silu(x)))


def test_skip_time_act_block_keeps_its_time_projection():
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=6, groups=4, skip_time_act=True)
    block = block.to(DEVICE).eval()
    x, temb = torch.randn(2, 8, 5, 3, device=DEVICE), torch.randn(2, 6, device=DEVICE)
    with torch.no_grad():
        ref = block(x, temb)
        with patch(block):
            assert type(block.time_emb_proj) is nn.Linear and type(block.nonlinearity) is nn.Identity
            out = block(x, temb)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_custom_processors_are_left_alone():
    from diffusers.models.attention_processor import AttnProcessor

    unet = _tiny_unet()
    unet.set_attn_processor(AttnProcessor())
    with patch(unet) as handle:
        assert handle.attention_processors == 0
        assert len(handle.skipped) == len(unet.attn_processors)
        assert all(type(p) is AttnProcessor for p in unet.attn_processors.values())


def test_patch_rejects_non_modules():
    with pytest.raises(ValueError, match="needs a torch.nn.Module"):
        patch("unet")
