"""Two-way transformer of the mask decoder: tokens attend to the image and the image to the tokens."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLP, MLPBlock


class Attention(nn.Module):
    """Multi-head attention with an optional down-projected internal width (``dim // downsample_rate``)."""

    def __init__(self, dim: int, *, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        internal = dim // downsample_rate
        if internal % num_heads:
            raise ValueError(f"internal width {internal} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, internal)
        self.k_proj = nn.Linear(dim, internal)
        self.v_proj = nn.Linear(dim, internal)
        self.out_proj = nn.Linear(internal, dim)
        self.fused = False

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``B x Nq x C``, ``B x Nk x C``, ``B x Nk x C`` -> ``B x Nq x C``."""
        q = self._heads(self.q_proj(q))
        k = self._heads(self.k_proj(k))
        v = self._heads(self.v_proj(v))
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = q @ k.transpose(-2, -1)
            attn = attn / (q.shape[-1] ** 0.5)
            out = attn.softmax(dim=-1) @ v
        b, h, n, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * d))


class TwoWayAttentionBlock(nn.Module):
    def __init__(self, dim: int, *, num_heads: int, mlp_dim: int, downsample_rate: int,
                 skip_first_layer_pe: bool, mlp_layers: bool = False) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads=num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, num_heads=num_heads, downsample_rate=downsample_rate)
        self.norm2 = nn.LayerNorm(dim)
        # SAM 2 stores the same MLP under keys mlp.layers.0/1 (SAM 1: mlp.lin1/lin2).
        self.mlp = MLP(dim, mlp_dim, dim, 2) if mlp_layers else MLPBlock(dim, mlp_dim, act=nn.ReLU)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, num_heads=num_heads, downsample_rate=downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def token_self_attention(self, queries: torch.Tensor, query_pe: torch.Tensor) -> torch.Tensor:
        """The block's first step: self-attention among the tokens, then ``norm1``."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        return self.norm1(queries)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                key_pe: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        queries = self.token_self_attention(queries, query_pe)

        q = queries + query_pe
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, *, depth: int, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int,
                 mlp_layers: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(dim, num_heads=num_heads, mlp_dim=mlp_dim, downsample_rate=downsample_rate,
                                 skip_first_layer_pe=(i == 0), mlp_layers=mlp_layers)
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(dim, num_heads=num_heads, downsample_rate=downsample_rate)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor,
                tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``image`` and ``image_pe`` ``B x C x h x w``, ``tokens`` ``B x T x C``.

        Returns the processed tokens ``B x T x C`` and image ``B x hw x C``.
        """
        keys = image.flatten(2).permute(0, 2, 1)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        q = queries + tokens
        k = keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys
