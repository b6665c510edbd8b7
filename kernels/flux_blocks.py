"""FLUX.1's transformer blocks and attention with the fused Triton kernels (diffusers 0.42's
``FluxTransformerBlock``, ``FluxSingleTransformerBlock`` and ``FluxAttnProcessor``).

Double-stream block, per stream (image and text): adaLN before attention (:func:`adaln_modulate`); the gated
residual after attention fused with the modulated norm before the MLP (:func:`gated_residual_adaln`); the
gated residual after the MLP (:func:`gated_residual`, with the float16 clip of the text stream folded in).
Single-stream block: adaLN, then the gated residual after ``proj_out`` (with its float16 clip).
Attention: queries and keys RMSNorm'd and rotated straight into the joint ``[text, image]`` buffer
(:func:`rms_norm_rope`), then the attention kernel on it. The MLPs (Linear, GELU tanh, Linear) and the
projections stay with cuBLAS.

Memory passes over the activations, counted per double-stream block and stream (eager diffusers -> fused):
adaLN 3 -> 1; residual + norm2 + modulation 5 -> 1; final residual 2 -> 1 (text: 3 -> 1 with the clip);
q and k each: 15 elementwise kernels -> 1 (diffusers' RMSNorm: the float32 cast, square, mean, product,
cast back and weight, 6; the concatenation, 1; ``apply_rotary_emb``: negation, stack, two float32 casts, two
products, sum and cast back, 8). The single-stream block: adaLN 3 -> 1, residual 3 -> 1.
"""

from __future__ import annotations

import torch
from torch import nn

from .adaln import adaln_modulate, gated_residual, gated_residual_adaln
from .dit_common import (
    FusedBlock,
    attention_problem,
    joint_attention,
    modulation,
    place,
    plain_layer_norm,
    qk_norm_problem,
)


class FusedFluxBlock(FusedBlock):
    """A ``FluxTransformerBlock`` (its own submodules) running the fused kernels."""

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                joint_attention_kwargs=None):  # fmt: skip
        if joint_attention_kwargs:  # IP-Adapter and the like: diffusers' own forward
            return self.original.forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                         joint_attention_kwargs)  # fmt: skip
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation(self.norm1, temb, 6)
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = modulation(
            self.norm1_context, temb, 6
        )
        norm_x = adaln_modulate(hidden_states, shift_msa, scale_msa, self.norm1.norm.eps)
        norm_c = adaln_modulate(encoder_hidden_states, c_shift_msa, c_scale_msa, self.norm1_context.norm.eps)
        attn_out, context_out = self.attn(hidden_states=norm_x, encoder_hidden_states=norm_c,
                                          image_rotary_emb=image_rotary_emb)  # fmt: skip
        hidden_states, norm_x = gated_residual_adaln(hidden_states, attn_out, gate_msa, shift_mlp, scale_mlp,
                                                     self.norm2.eps)  # fmt: skip
        hidden_states = gated_residual(hidden_states, self.ff(norm_x), gate_mlp)
        encoder_hidden_states, norm_c = gated_residual_adaln(encoder_hidden_states, context_out, c_gate_msa,
                                                             c_shift_mlp, c_scale_mlp, self.norm2_context.eps)
        clip = encoder_hidden_states.dtype == torch.float16  # as diffusers clips the text stream in float16
        encoder_hidden_states = gated_residual(encoder_hidden_states, self.ff_context(norm_c), c_gate_mlp, clip=clip)
        return encoder_hidden_states, hidden_states


class FusedFluxSingleBlock(FusedBlock):
    """A ``FluxSingleTransformerBlock`` (its own submodules) running the fused kernels."""

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                joint_attention_kwargs=None):  # fmt: skip
        if joint_attention_kwargs:
            return self.original.forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                         joint_attention_kwargs)  # fmt: skip
        text_tokens = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        shift, scale, gate = modulation(self.norm, temb, 3)
        normed = adaln_modulate(hidden_states, shift, scale, self.norm.norm.eps)
        mlp = self.act_mlp(self.proj_mlp(normed))
        attn_out = self.attn(hidden_states=normed, image_rotary_emb=image_rotary_emb)
        projected = self.proj_out(torch.cat([attn_out, mlp], dim=2))
        clip = hidden_states.dtype == torch.float16
        hidden_states = gated_residual(hidden_states, projected, gate, clip=clip)
        return hidden_states[:, :text_tokens], hidden_states[:, text_tokens:]


class TritonFluxAttnProcessor:
    """``FluxAttnProcessor`` with the query/key RMSNorm and rotation fused into the joint buffers and the Triton
    attention kernel. An attention mask falls back to the original processor (``calls`` counts both)."""

    def __init__(self, original):
        self.original = original
        self.calls = {"triton": 0, "original": 0}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            self.calls["original"] += 1
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        self.calls["triton"] += 1
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        text = encoder_hidden_states.shape[1] if joint else 0
        batch, tokens = hidden_states.shape[:2]
        heads_dims = (-1, attn.head_dim)
        projections = (attn.to_q, attn.to_k, attn.to_v)
        query, key, value = (proj(hidden_states).unflatten(-1, heads_dims) for proj in projections)
        shape = (batch, text + tokens, query.shape[2], attn.head_dim)
        joint_q, joint_k = (query.new_empty(shape) for _ in range(2))
        place(joint_q, query, attn.norm_q, text, image_rotary_emb)
        place(joint_k, key, attn.norm_k, text, image_rotary_emb)
        if joint:
            parts = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            e_query, e_key, e_value = (p(encoder_hidden_states).unflatten(-1, heads_dims) for p in parts)
            place(joint_q, e_query, attn.norm_added_q, 0, image_rotary_emb)
            place(joint_k, e_key, attn.norm_added_k, 0, image_rotary_emb)
            value = torch.cat([e_value, value], dim=1)
        out = joint_attention(joint_q, joint_k, value)
        if not joint:
            return out
        context, image = out[:, :text], out[:, text:]
        image = attn.to_out[1](attn.to_out[0](image))
        return image, attn.to_add_out(context)


def fusable(block: nn.Module) -> str | None:
    """Why ``block`` (a FLUX double- or single-stream block) cannot be fused, or None."""
    norms = ([block.norm1.norm, block.norm1_context.norm, block.norm2, block.norm2_context]
             if hasattr(block, "norm1_context") else [block.norm.norm])  # fmt: skip
    if not all(plain_layer_norm(n) for n in norms):
        return "its norms are not plain LayerNorms"
    return None


def attn_problem(attn: nn.Module) -> str | None:
    """Why a FluxAttention cannot take the Triton processor, or None."""
    if type(attn.processor).__name__ != "FluxAttnProcessor":
        return f"processor {type(attn.processor).__name__} left as is"
    if getattr(attn, "fused_projections", False):
        return "fused projections (fuse_qkv_projections) left as is"
    norms = [attn.norm_q, attn.norm_k, getattr(attn, "norm_added_q", None), getattr(attn, "norm_added_k", None)]
    problems = [p for p in map(qk_norm_problem, norms) if p] or [attention_problem(attn.head_dim)]
    return next((p for p in problems if p), None)


def claims(attn: nn.Module) -> bool:
    """Whether ``attn`` is FLUX's attention module (its processor is this module's to replace)."""
    return type(attn).__name__ == "FluxAttention"


BLOCKS = {"FluxTransformerBlock": FusedFluxBlock, "FluxSingleTransformerBlock": FusedFluxSingleBlock}
PROCESSOR = TritonFluxAttnProcessor

__all__ = ["BLOCKS", "PROCESSOR", "claims", "FusedFluxBlock", "FusedFluxSingleBlock", "TritonFluxAttnProcessor",
           "attn_problem", "fusable"]  # fmt: skip
