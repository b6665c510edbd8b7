import pytest

import diffrt


@pytest.fixture(scope="session")
def tiny():
    return diffrt.load("tiny", device="cpu")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tiny):
    from diffrt.models.folders import save_folder as save_components

    return save_components(tiny.components, tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tmp_path_factory):
    return make_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl") / "tiny-sdxl")


def make_tiny_sdxl(folder):
    """A tiny random SDXL folder (two CLIP encoders, text_time conditioning) for parity tests."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffrt.core.text import character_clip_tokenizer
    from diffrt.models.components import Components
    from diffrt.models.folders import save_folder as save_components

    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                max_position_embeddings=77, vocab_size=1000, bos_token_id=998, eos_token_id=999, pad_token_id=999)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8, transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
    )
    vae = diffusers.AutoencoderKL(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                                  down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                                  latent_channels=4, sample_size=64, scaling_factor=0.13025)
    encoders = [
        CLIPTextModel(CLIPTextConfig(**text)),
        CLIPTextModelWithProjection(CLIPTextConfig(**text, projection_dim=32)),
    ]
    tokenizers = [character_clip_tokenizer(1000), character_clip_tokenizer(1000)]
    scheduler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                 timestep_spacing="trailing")
    parts = Components("tiny-sdxl", "sdxl", unet, vae, encoders, tokenizers, scheduler)
    return save_components(parts, folder)
    # fmt: skip
