"""patch() on the SD3 and FLUX.1 transformers: fused blocks and Triton attention give the unpatched outputs
(float32, interpreter on the CPU), keep every parameter and state-dict key, and restore() undoes them."""

import pytest
import torch

pytest.importorskip("triton")

import diffrt  # noqa: E402
from diffrt.kernels import patch  # noqa: E402
from diffrt.kernels.flux_blocks import FusedFluxBlock, FusedFluxSingleBlock, TritonFluxAttnProcessor  # noqa: E402
from diffrt.kernels.sd3_blocks import FusedJointBlock, TritonJointAttnProcessor  # noqa: E402

SIZES = {"batch": 3, "height": 48, "width": 64, "sequence": 21}  # latents 6x8: 12 image tokens (FLUX), odd text


def _outputs(pipe, values=SIZES):
    spec, module = pipe.backend.specs["transformer"], pipe.backend.modules["transformer"]
    inputs = spec.sample_inputs(values, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return module(**inputs)


def _check_patched(pipe, blocks, processors, values=SIZES):
    transformer = pipe.components.transformer
    keys = list(transformer.state_dict())
    reference = _outputs(pipe, values)
    handle = patch(transformer)
    assert handle.fused_blocks == blocks and handle.attention_processors == processors, handle.summary()
    assert list(transformer.state_dict()) == keys  # the same submodules under the same names
    patched = _outputs(pipe, values)
    assert float((patched - reference).abs().max() / reference.abs().max()) <= 1e-5
    handle.restore()
    assert torch.equal(_outputs(pipe, values), reference)
    return handle


def test_tiny_flux_double_and_single_blocks():
    pipe = diffrt.load("tiny-flux", device="cpu")
    blocks = pipe.components.transformer
    _check_patched(pipe, blocks=2, processors=2)
    handle = patch(blocks)
    assert isinstance(blocks.transformer_blocks[0], FusedFluxBlock)
    assert isinstance(blocks.single_transformer_blocks[0], FusedFluxSingleBlock)
    assert isinstance(blocks.transformer_blocks[0].attn.processor, TritonFluxAttnProcessor)
    handle.restore()
    assert type(blocks.transformer_blocks[0]).__name__ == "FluxTransformerBlock"


def test_tiny_sd3_with_its_last_context_pre_only_block():
    pipe = diffrt.load("tiny-sd3", device="cpu")
    assert pipe.components.transformer.transformer_blocks[-1].context_pre_only
    _check_patched(pipe, blocks=2, processors=2)


def test_sd35_query_key_norms_and_dual_attention():
    """SD3.5's RMSNorm on queries and keys, and its dual-attention blocks (a second, image-only attention)."""
    import dataclasses

    from diffusers import SD3Transformer2DModel

    pipe = diffrt.load("tiny-sd3", device="cpu")
    config = {k: v for k, v in pipe.components.transformer.config.items() if not k.startswith("_")}
    with torch.random.fork_rng():
        torch.manual_seed(1)
        transformer = SD3Transformer2DModel(**{**config, "qk_norm": "rms_norm", "dual_attention_layers": (0,)})
    parts = dataclasses.replace(pipe.components, transformer=transformer.eval())
    sd35 = diffrt.pipeline.pipe.Pipeline(parts, diffrt.backends.create("torch", parts, torch.device("cpu"),
                                                                  torch.float32), torch.device("cpu"), torch.float32)
    assert transformer.transformer_blocks[0].use_dual_attention
    handle = _check_patched(sd35, blocks=2, processors=3)  # two joint attentions and the dual block's second
    assert not handle.skipped


def test_fashion_dit_at_its_own_size():
    pipe = diffrt.load("fashion-dit", device="cpu")
    _check_patched(pipe, blocks=9, processors=9, values={"batch": 2, "height": 32, "width": 32, "sequence": 16})


def test_what_cannot_be_fused_is_left_and_named():
    pipe = diffrt.load("tiny-flux", device="cpu")
    transformer = pipe.components.transformer
    transformer.transformer_blocks[0].attn.set_processor(type(transformer.transformer_blocks[0].attn.processor)())
    transformer.fuse_qkv_projections()
    handle = patch(transformer)
    assert any("fused projections" in line for line in handle.skipped), handle.skipped
    assert handle.fused_blocks == 2 and handle.attention_processors == 0
    handle.restore()


def test_attention_masks_fall_back_to_the_original_processor():
    pipe = diffrt.load("tiny-sd3", device="cpu")
    attn = pipe.components.transformer.transformer_blocks[0].attn
    handle = patch(pipe.components.transformer)
    processor = attn.processor
    assert isinstance(processor, TritonJointAttnProcessor)
    x = torch.randn(1, 4, attn.query_dim)
    with torch.no_grad():
        processor(attn, x, attention_mask=torch.ones(1, 1, 4, 4, dtype=torch.bool))
        processor(attn, x)
    assert processor.calls == {"triton": 1, "original": 1}
    handle.restore()
    assert isinstance(pipe.components.transformer.transformer_blocks[0], torch.nn.Module)
    assert not isinstance(pipe.components.transformer.transformer_blocks[0], FusedJointBlock)
