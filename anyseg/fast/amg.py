"""Fast batch step of segment-everything (used by :class:`anyseg.MaskGenerator` when a
:class:`~anyseg.speed.SpeedConfig` with ``fast_decoder`` or ``fast_postprocess`` is active).

It produces the same proposals, in the same order, as the faithful ``MaskGenerator._process_batch``:

* the two-way transformer runs for the whole batch, its final attention for the IoU token only; the
  predicted-IoU filter then runs *before* the mask tokens' final attention and the upscaling network,
  which run only for prompts with at least one surviving mask (the IoU head reads the IoU token only,
  and in the final attention each token attends to the image on its own, so this is exact);
* the surviving low-res logits go to the crop frame through :class:`~anyseg.fast.resize.MaskResizer`
  (one banded resampling, no ``S x S`` intermediate), in chunks under the generator's pixel budget;
* stability, thresholding, boxes and the run boundaries are computed on the model's device; with
  ``amg_device_masks`` only the run boundaries are moved to the CPU.
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np
import torch

from ..geometry import coords_to_model_torch
from ..masks import rle_counts
from ..speed import decoder_autocast, get_config
from .resize import get_resizer


# Prompts decoded together on a CPU (their image-token tensors are CPU_DECODE_BATCH x 4 MB).
CPU_DECODE_BATCH = 16


def rle_counts_on_device(masks: torch.Tensor) -> List[np.ndarray]:
    """Column-major run lengths of ``B x H x W`` bool masks (as :func:`anyseg.masks.rle_counts`), with the
    transposition and change detection on the masks' device; only change positions reach the CPU."""
    if masks.ndim != 3:
        raise ValueError(f"expected B x H x W masks, got shape {tuple(masks.shape)}")
    b, h, w = masks.shape
    if h * w == 0 or b == 0:
        return [np.zeros(1, dtype=np.int64) for _ in range(b)]
    flat = masks.bool().transpose(1, 2).reshape(b, h * w)
    rows, cols = torch.nonzero(flat[:, 1:] != flat[:, :-1], as_tuple=True)
    rows, cols = rows.cpu(), (cols + 1).cpu().numpy()
    first_set = flat[:, 0].cpu().tolist()
    per_mask = torch.bincount(rows, minlength=b).tolist()
    starts = np.split(cols, np.cumsum(per_mask)[:-1])
    out = []
    for i in range(b):
        counts = np.diff(np.concatenate(([0], starts[i], [h * w])))
        if first_set[i]:
            counts = np.concatenate(([0], counts))
        out.append(counts.astype(np.uint32 if h * w < 2**32 else np.int64))
    return out


def decode_low_res(gen, points: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``B x 2`` crop-pixel points (float64) -> low-res logits ``M x 256 x 256`` of the masks that pass the
    predicted-IoU filter, their IoU ``M`` (CPU float32) and prompt points ``M x 2`` (float64), in the
    faithful order (point-major, the 3 masks of a point consecutive)."""
    predictor, model = gen.predictor, gen.model
    config = get_config(model)
    if config.fast_decoder and model.device.type == "cpu" and points.shape[0] > CPU_DECODE_BATCH:
        # On a CPU a few prompts at a time: the decoder's B x 4096 x 256 temporaries stay small enough to
        # be reused from the heap (keep_freed_memory) and in cache; per-prompt work does not batch better.
        parts = [decode_low_res(gen, points[i : i + CPU_DECODE_BATCH])
                 for i in range(0, points.shape[0], CPU_DECODE_BATCH)]
        return tuple(torch.cat(part) for part in zip(*parts))
    coords = coords_to_model_torch(points, predictor.original_size, model.img_size).to(model.device)
    labels = torch.ones(coords.shape[0], 1, dtype=torch.int64, device=coords.device)
    if not config.fast_decoder:
        low_res, iou = gen._decode_low_res(points)
        k = low_res.shape[1]
        low_res, iou = low_res.flatten(0, 1), iou.flatten(0, 1).cpu()
        pts = points.repeat_interleave(k, dim=0)
        if gen.pred_iou_thresh > 0.0:
            keep = (iou > gen.pred_iou_thresh).nonzero().flatten()
            low_res, iou, pts = low_res[keep.to(low_res.device)], iou[keep], pts[keep]
        return low_res, iou, pts
    sparse, _ = model.embed_prompts(points=(coords[:, None, :], labels), boxes=None, masks=None)
    decoder = predictor.fast_decoder()
    which = list(range(1, decoder.decoder.num_mask_tokens))
    with decoder_autocast(model):
        sparse = sparse.to(predictor.features.dtype)
        queries, tokens, image_tokens, low_rank = decoder.transformer(sparse,
                                                                      low_rank=decoder.upscale_low_rank(sparse))
        # The predicted IoU reads the IoU token only: the final attention runs for it alone first, and
        # for the mask tokens only of prompts that pass the filter.
        iou_all = decoder.decoder.iou_prediction_head(decoder.final(queries, tokens, image_tokens, 0, 1)[:, 0])
        iou = iou_all[:, which].float()  # B x k
        if gen.pred_iou_thresh > 0.0:
            passed = iou > gen.pred_iou_thresh
        else:
            passed = torch.ones_like(iou, dtype=torch.bool)
        prompts = passed.any(dim=1).nonzero().flatten()
        k = len(which)
        if prompts.numel() == 0:
            empty = torch.zeros(0, 256, 256, device=model.device)
            return empty, torch.zeros(0), torch.zeros(0, 2, dtype=torch.float64)
        if prompts.numel() < iou.shape[0]:
            queries, tokens, image_tokens = queries[prompts], tokens[prompts], image_tokens[prompts]
            low_rank = None if low_rank is None else low_rank.select(prompts)
        # The mask tokens asked for only (the single-mask token is not read).
        mask_tokens = decoder.final_tokens(queries, tokens, image_tokens, [1 + i for i in which])
        low_res = decoder.upscale(decoder.hyper(mask_tokens, which), image_tokens, low_rank).float().flatten(0, 1)
    del image_tokens, low_rank
    keep = passed[prompts].flatten().nonzero().flatten()
    low_res = low_res[keep] if keep.numel() < low_res.shape[0] else low_res
    prompts_cpu = prompts.cpu()
    flat_index = (prompts_cpu[:, None] * k + torch.arange(k)[None, :]).flatten()[keep.cpu()]
    iou = iou.flatten().cpu()[flat_index]
    pts = points[flat_index // k]
    return low_res, iou, pts


def process_batch(gen, points: np.ndarray, crop_size: Tuple[int, int], crop_box: List[int],
                  orig_size: Tuple[int, int]):
    """The fast counterpart of ``MaskGenerator._process_batch`` (same proposals, same order)."""
    from ..automatic import _Proposals

    model = gen.model
    config = get_config(model)
    points_t = torch.as_tensor(points, dtype=torch.float64)
    low_res, iou, pts = decode_low_res(gen, points_t)
    orig_h, orig_w = orig_size
    crop_h, crop_w = crop_size
    if config.fast_postprocess:
        per_mask_pixels = orig_h * orig_w + crop_h * crop_w
    else:
        per_mask_pixels = orig_h * orig_w + model.img_size**2
    chunk = max(1, gen.max_chunk_pixels // per_mask_pixels)
    parts = []
    for start in range(0, low_res.shape[0], chunk):
        sl = slice(start, start + chunk)
        parts.append(_process_chunk(gen, low_res[sl], iou[sl], pts[sl], crop_size, crop_box, orig_size))
    return _Proposals.cat(parts)


def _process_chunk(gen, low_res: torch.Tensor, iou: torch.Tensor, points: torch.Tensor, crop_size: Tuple[int, int],
                   crop_box: List[int], orig_size: Tuple[int, int]):
    """The generator's own chunk step, with the banded resize and on-device run lengths when enabled."""
    model = gen.model
    config = get_config(model)
    upscale = None
    if config.fast_postprocess:
        upscale = get_resizer(low_res.shape[-1], model.img_size, gen.predictor.input_size, crop_size)
    encode_rle = rle_counts_on_device if config.amg_device_masks else rle_counts
    return gen._process_chunk(low_res, iou, points, crop_size, crop_box, orig_size, upscale=upscale,
                              encode_rle=encode_rle)
