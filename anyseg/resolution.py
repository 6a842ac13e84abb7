"""Run a ViT SAM checkpoint at another input resolution (e.g. 256 px instead of 1024 px).

A ViT checkpoint stores an absolute position table for one grid (``1 x g x g x C``, g = 64 for
1024 px inputs) and, in its global-attention blocks, relative position tables of length ``2g - 1``.
:func:`resize_state_dict` resamples both for another grid; the windowed blocks are unchanged (their
tables depend on the window, not the image). The relative tables are resampled exactly as the
attention itself resamples a table of the wrong length (linear, see
:func:`anyseg.modeling.vit.relative_position_table`), so only the absolute table is an
approximation (bicubic, antialiased when shrinking).

``anyseg.load_model(path, img_size=...)`` applies it. The result is a normal checkpoint for the new
size: :func:`anyseg.load_model` infers the size from the position table, so a model saved after
training at 256 px loads at 256 px. The mask decoder
has no size-dependent weights: at 256 px it runs on a 16 x 16 embedding grid (64 x 64 low-res
masks), 16x less work than at 1024 px.

TinyViT checkpoints have no position table; they are simply built for ``img_size``.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from .checkpoint import ENC, infer_config
from .modeling.vit import resize_relative_table


def resize_state_dict(sd: Dict[str, torch.Tensor], img_size: int) -> Dict[str, torch.Tensor]:
    """A ViT SAM state dict for ``img_size`` px inputs (a new dict; tensors not resized are shared).

    Raises ValueError when ``img_size`` is not a positive multiple of the patch size or the state
    dict has no ViT position table.
    """
    config = infer_config(sd)
    enc = config.encoder
    if getattr(enc, "kind", None) != "vit" or ENC + "pos_embed" not in sd:
        raise ValueError("resizing needs a ViT checkpoint with an absolute position table "
                         "(TinyViT: pass img_size to anyseg.load_model instead)")
    patch = enc.patch_size
    if img_size <= 0 or img_size % patch:
        raise ValueError(f"img_size must be a positive multiple of the patch size {patch}, got {img_size}")
    old, new = enc.img_size // patch, img_size // patch
    out = dict(sd)
    if new == old:
        return out
    pos = sd[ENC + "pos_embed"]  # 1 x g x g x C
    grid = pos.float().permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False, antialias=new < old)
    out[ENC + "pos_embed"] = resized.permute(0, 2, 3, 1).to(pos.dtype).contiguous()
    if enc.use_rel_pos:
        for i in enc.global_attn_indexes:
            for axis in ("h", "w"):
                key = f"{ENC}blocks.{i}.attn.rel_pos_{axis}"
                # the resampling the attention itself applies to a table of the wrong length
                out[key] = resize_relative_table(sd[key].float(), 2 * new - 1).to(sd[key].dtype).contiguous()
    return out
