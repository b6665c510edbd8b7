"""SD3 / SD3.5's transformer block and joint attention with the fused Triton kernels (diffusers 0.42's
``JointTransformerBlock`` and ``JointAttnProcessor2_0``).

Per stream (image, and text unless the block is the last, ``context_pre_only``): adaLN before attention
(:func:`adaln_modulate`; the last block's text norm is ``AdaLayerNormContinuous``, the same kernel with its own
scale and shift); the gated residual after attention fused with the modulated norm before the MLP
(:func:`gated_residual_adaln`); the gated residual after the MLP (:func:`gated_residual`). SD3.5's dual-attention
blocks modulate the one norm twice and add the second attention's gated residual before the fused step.
Attention: the image and text queries and keys go into one ``[image, text]`` buffer each, RMSNorm'd on the
way where the model has a query/key norm (SD3.5), copied where it has none (SD3); then the attention kernel.
Memory passes saved per block and stream are those of the FLUX blocks (see ``flux_blocks``) but the rotation,
which SD3 does not have.
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


class FusedJointBlock(FusedBlock):
    """A ``JointTransformerBlock`` (its own submodules) running the fused kernels."""

    def __init__(self, block: nn.Module):
        super().__init__(block)
        self.use_dual_attention, self.context_pre_only = block.use_dual_attention, block.context_pre_only

    def forward(self, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs=None):
        if joint_attention_kwargs:
            return self.original.forward(self, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs)
        eps = self.norm1.norm.eps
        if self.use_dual_attention:
            (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2,
             gate_msa2) = modulation(self.norm1, temb, 9)  # fmt: skip
            norm_x2 = adaln_modulate(hidden_states, shift_msa2, scale_msa2, eps)
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation(self.norm1, temb, 6)
        norm_x = adaln_modulate(hidden_states, shift_msa, scale_msa, eps)
        norm_c, context = self._context_norm(encoder_hidden_states, temb)
        attn_out, context_out = self.attn(hidden_states=norm_x, encoder_hidden_states=norm_c)
        if self.use_dual_attention:
            hidden_states = gated_residual(hidden_states, attn_out, gate_msa)
            attn_out, gate_msa = self.attn2(hidden_states=norm_x2), gate_msa2
        hidden_states, norm_x = gated_residual_adaln(hidden_states, attn_out, gate_msa, shift_mlp, scale_mlp,
                                                     self.norm2.eps)  # fmt: skip
        hidden_states = gated_residual(hidden_states, self.ff(norm_x), gate_mlp)
        if self.context_pre_only:
            return None, hidden_states
        c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = context
        encoder_hidden_states, norm_c = gated_residual_adaln(encoder_hidden_states, context_out, c_gate_msa,
                                                             c_shift_mlp, c_scale_mlp, self.norm2_context.eps)
        encoder_hidden_states = gated_residual(encoder_hidden_states, self.ff_context(norm_c), c_gate_mlp)
        return encoder_hidden_states, hidden_states

    def _context_norm(self, context, temb):
        """The text stream's modulated norm and the modulation the rest of the block needs (None: last block)."""
        norm = self.norm1_context
        if self.context_pre_only:  # AdaLayerNormContinuous: scale before shift, the embedding cast to x's dtype
            scale, shift = norm.linear(norm.silu(temb).to(context.dtype)).chunk(2, dim=1)
            return adaln_modulate(context, shift, scale, norm.norm.eps), None
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation(norm, temb, 6)
        return adaln_modulate(context, shift_msa, scale_msa, norm.norm.eps), (gate_msa, shift_mlp, scale_mlp,
                                                                              gate_mlp)  # fmt: skip


class TritonJointAttnProcessor:
    """``JointAttnProcessor2_0`` over one joint ``[image, text]`` buffer (query/key norm on the way) and the Triton
    attention kernel. An attention mask falls back to the original processor (``calls`` counts both)."""

    def __init__(self, original):
        self.original = original
        self.calls = {"triton": 0, "original": 0}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if attention_mask is not None:
            self.calls["original"] += 1
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        self.calls["triton"] += 1
        batch, tokens = hidden_states.shape[:2]
        head_dim = attn.to_k.out_features // attn.heads
        split = (attn.heads, head_dim)
        query, key, value = (p(hidden_states).unflatten(-1, split) for p in (attn.to_q, attn.to_k, attn.to_v))
        text = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        joint_q, joint_k = (query.new_empty(batch, tokens + text, *split) for _ in range(2))
        place(joint_q, query, attn.norm_q, 0)
        place(joint_k, key, attn.norm_k, 0)
        if text:
            parts = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            e_query, e_key, e_value = (p(encoder_hidden_states).unflatten(-1, split) for p in parts)
            place(joint_q, e_query, attn.norm_added_q, tokens)
            place(joint_k, e_key, attn.norm_added_k, tokens)
            value = torch.cat([value, e_value], dim=1)
        out = joint_attention(joint_q, joint_k, value)
        image = attn.to_out[1](attn.to_out[0](out[:, :tokens]))
        if not text:
            return image
        context = out[:, tokens:]
        return image, (context if attn.context_pre_only else attn.to_add_out(context))


def fusable(block: nn.Module) -> str | None:
    """Why a ``JointTransformerBlock`` cannot be fused, or None."""
    if block._chunk_size is not None:
        return "chunked feed-forward left as is"
    norms = [block.norm1.norm, block.norm2, block.norm1_context.norm]
    if not block.context_pre_only:
        norms.append(block.norm2_context)
    if not all(plain_layer_norm(n) for n in norms):
        return "its norms are not plain LayerNorms"
    if getattr(block.norm1, "emb", None) is not None:
        return "its adaLN embeds the timestep itself"
    return None


def attn_problem(attn: nn.Module) -> str | None:
    """Why an Attention with diffusers' joint processor cannot take the Triton one, or None."""
    if type(attn.processor).__name__ != "JointAttnProcessor2_0":
        return f"processor {type(attn.processor).__name__} left as is"
    norms = [attn.norm_q, attn.norm_k, getattr(attn, "norm_added_q", None), getattr(attn, "norm_added_k", None)]
    problems = [p for p in map(qk_norm_problem, norms) if p]
    return problems[0] if problems else attention_problem(attn.to_k.out_features // attn.heads)


def claims(attn: nn.Module) -> bool:
    """Whether ``attn`` runs SD3's joint attention (diffusers' ``Attention`` with its joint processor)."""
    return type(attn).__name__ == "Attention" and type(attn.processor).__name__ == "JointAttnProcessor2_0"


BLOCKS = {"JointTransformerBlock": FusedJointBlock}
PROCESSOR = TritonJointAttnProcessor

__all__ = ["BLOCKS", "PROCESSOR", "claims", "FusedJointBlock", "TritonJointAttnProcessor", "attn_problem", "fusable"]
