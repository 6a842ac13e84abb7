"""SAM 2 memory attention (spec/sam2.md section 7, keys ``memory_attention.*``).

The current frame's stride-16 tokens attend to themselves and then to the object's memory (spatial
memories of earlier frames, 64 wide, followed by object-pointer tokens). Both attentions use axial
rotary position embeddings (RoPE) on a ``64 x 64`` grid; the rotation tables are computed on the fly
(the checkpoint has no buffers for them).

All tensors are **batch first**: tokens are ``B x N x C``, row-major over the grid.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ...config_sam2 import MemoryAttentionConfig

# Queries per block in the plain attention: bounds the ``queries x keys`` score matrix (softmax is per
# row, so splitting the queries changes nothing in the math).
_QUERY_CHUNK = 1024


def axial_rope_tables(h: int, w: int, head_dim: int, theta: float = 10000.0, *, device=None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos / sin of the axial RoPE angles of an ``h x w`` grid, each ``(h*w) x head_dim/2`` float32.

    Token ``n`` sits at column ``n % w``, row ``n // w``. With ``f_j = 1 / theta^(4j / head_dim)``,
    ``j < head_dim/4``, pair ``m < head_dim/4`` turns by ``column * f_m`` and pair ``m >= head_dim/4`` by
    ``row * f_(m - head_dim/4)``.
    """
    if head_dim % 4:
        raise ValueError(f"axial RoPE needs a head dimension divisible by 4, got {head_dim}")
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 4, device=device)[: head_dim // 4].float() / head_dim))
    t = torch.arange(h * w, dtype=torch.float32, device=device)
    t_x = t % w
    t_y = torch.div(t, w, rounding_mode="floor")
    angles = torch.cat([torch.outer(t_x, freqs), torch.outer(t_y, freqs)], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs ``(x[2m], x[2m+1])`` of ``... x N x D`` by the angles of ``cos`` / ``sin``
    (``N x D/2``), in float32; the result has ``x``'s dtype."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q kᵀ / sqrt(d)) v`` over ``B x heads x N x d``, in blocks of queries."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    kt = k.transpose(-2, -1)
    outs = []
    for start in range(0, q.shape[-2], _QUERY_CHUNK):
        scores = (q[..., start:start + _QUERY_CHUNK, :] @ kt) * scale
        outs.append(torch.softmax(scores, dim=-1) @ v)
    return torch.cat(outs, dim=-2) if len(outs) != 1 else outs[0]


class RoPEAttention(nn.Module):
    """Multi-head attention with axial RoPE on queries and keys (keys ``q_proj``, ``k_proj``, ``v_proj``,
    ``out_proj``; keys and values may be ``kv_in_dim`` wide).

    ``rope_k_repeat``: the keys are several grids of the query's size one after the other (memory frames),
    each rotated with the query's table. The last ``num_k_exclude_rope`` keys (object pointers) are not
    rotated.
    """

    def __init__(self, embedding_dim: int, num_heads: int, *, kv_in_dim: Optional[int] = None,
                 rope_theta: float = 10000.0, feat_sizes: Tuple[int, int] = (64, 64),
                 rope_k_repeat: bool = False, use_sdpa: bool = False) -> None:
        super().__init__()
        if embedding_dim % num_heads:
            raise ValueError(f"embedding_dim {embedding_dim} is not divisible by num_heads {num_heads}")
        kv_in_dim = embedding_dim if kv_in_dim is None else kv_in_dim
        self.num_heads = num_heads
        self.head_dim = embedding_dim // num_heads
        self.rope_theta = float(rope_theta)
        self.feat_sizes = tuple(feat_sizes)
        self.rope_k_repeat = rope_k_repeat
        self.use_sdpa = use_sdpa
        self.q_proj = nn.Linear(embedding_dim, embedding_dim)
        self.k_proj = nn.Linear(kv_in_dim, embedding_dim)
        self.v_proj = nn.Linear(kv_in_dim, embedding_dim)
        self.out_proj = nn.Linear(embedding_dim, embedding_dim)

    def grid_for(self, num_tokens: int) -> Tuple[int, int]:
        """The query grid: ``feat_sizes`` when it has ``num_tokens`` cells, else the square one."""
        h, w = self.feat_sizes
        if h * w == num_tokens:
            return h, w
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(f"{num_tokens} query tokens are neither the {h}x{w} grid nor a square one")
        return side, side

    def rope_tables(self, num_tokens: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
        h, w = self.grid_for(num_tokens)
        return axial_rope_tables(h, w, self.head_dim, self.rope_theta, device=device)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_k_exclude_rope: int = 0,
                rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """``q``: ``B x Nq x C``; ``k``, ``v``: ``B x Nk x kv_in_dim`` -> ``B x Nq x C``.

        ``rope``: the query grid's (cos, sin) tables when the caller already has them.
        """
        q = self._heads(self.q_proj(q))
        k = self._heads(self.k_proj(k))
        v = self._heads(self.v_proj(v))
        nq, nk = q.shape[-2], k.shape[-2]
        cos, sin = rope if rope is not None else self.rope_tables(nq, q.device)
        num_k_rope = nk - num_k_exclude_rope
        if num_k_rope < 0:
            raise ValueError(f"num_k_exclude_rope {num_k_exclude_rope} exceeds the {nk} keys")
        q = apply_rope(q, cos, sin)
        if num_k_rope > 0:
            if num_k_rope != nq:
                if not self.rope_k_repeat or num_k_rope % nq:
                    raise ValueError(f"{num_k_rope} rotated keys do not match {nq} queries"
                                     + (" (nor a whole number of query grids)" if self.rope_k_repeat else ""))
                repeats = num_k_rope // nq
                cos_k, sin_k = cos.repeat(repeats, 1), sin.repeat(repeats, 1)
            else:
                cos_k, sin_k = cos, sin
            k = torch.cat([apply_rope(k[..., :num_k_rope, :], cos_k, sin_k), k[..., num_k_rope:, :]], dim=-2)
        if self.use_sdpa:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = plain_attention(q, k, v)
        b = out.shape[0]
        out = out.transpose(1, 2).reshape(b, nq, self.num_heads * self.head_dim)
        return self.out_proj(out)


class MemoryAttentionLayer(nn.Module):
    """Pre-norm layer: RoPE self-attention, RoPE cross-attention to the memory (keys get the memory
    positions added, queries none), ReLU feed-forward; each with a residual."""

    def __init__(self, config: MemoryAttentionConfig) -> None:
        super().__init__()
        d = config.d_model
        common = dict(rope_theta=config.rope_theta, feat_sizes=tuple(config.feat_sizes))
        self.self_attn = RoPEAttention(d, config.num_heads, **common)
        self.cross_attn_image = RoPEAttention(d, config.num_heads, kv_in_dim=config.kv_in_dim,
                                              rope_k_repeat=True, **common)
        self.linear1 = nn.Linear(d, config.dim_feedforward)
        self.linear2 = nn.Linear(config.dim_feedforward, d)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)
        self.norm3 = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_pos: torch.Tensor,
                num_obj_ptr_tokens: int = 0, rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
                ) -> torch.Tensor:
        t = self.norm1(x)
        x = x + self.self_attn(t, t, t, rope=rope)
        t = self.norm2(x)
        x = x + self.cross_attn_image(t, memory + memory_pos, memory, num_k_exclude_rope=num_obj_ptr_tokens,
                                      rope=rope)
        t = self.norm3(x)
        return x + self.linear2(F.relu(self.linear1(t)))


class MemoryAttention(nn.Module):
    """Condition the current frame's tokens on the object's memory (keys ``layers.i.*``, ``norm``).

    ``use_sdpa`` switches every attention to ``F.scaled_dot_product_attention`` (a fast path; the plain
    softmax attention is the faithful one and the default).
    """

    def __init__(self, config: MemoryAttentionConfig, *, use_sdpa: bool = False) -> None:
        super().__init__()
        self.config = config
        self.pos_enc_at_input = config.pos_enc_at_input
        self.layers = nn.ModuleList(MemoryAttentionLayer(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.use_sdpa = use_sdpa

    @property
    def use_sdpa(self) -> bool:
        return self._use_sdpa

    @use_sdpa.setter
    def use_sdpa(self, value: bool) -> None:
        self._use_sdpa = bool(value)
        for layer in self.layers:
            layer.self_attn.use_sdpa = self._use_sdpa
            layer.cross_attn_image.use_sdpa = self._use_sdpa

    def forward(self, curr: torch.Tensor, curr_pos: Optional[torch.Tensor], memory: torch.Tensor,
                memory_pos: torch.Tensor, num_obj_ptr_tokens: int = 0) -> torch.Tensor:
        """All batch first.

        Args:
            curr: ``B x HW x d_model`` the frame's tokens (e.g. ``B x 4096 x 256``, row-major over 64 x 64).
            curr_pos: ``B x HW x d_model`` their sine position encoding (added ×0.1 at the input), or None.
            memory: ``B x N_m x kv_in_dim`` spatial memories (each a whole grid of ``HW`` tokens) followed
                by ``num_obj_ptr_tokens`` object-pointer tokens.
            memory_pos: ``B x N_m x kv_in_dim`` their positions (added to the keys only).
            num_obj_ptr_tokens: the number of pointer tokens at the end of ``memory`` (not rotated).

        Returns:
            ``B x HW x d_model``, the memory-conditioned tokens after the final LayerNorm.
        """
        x = curr
        if self.pos_enc_at_input and curr_pos is not None:
            x = x + 0.1 * curr_pos
        rope = None
        if len(self.layers):
            rope = self.layers[0].self_attn.rope_tables(x.shape[1], x.device)
        for layer in self.layers:
            x = layer(x, memory, memory_pos, num_obj_ptr_tokens=num_obj_ptr_tokens, rope=rope)
        return self.norm(x)
