"""One training example = 11 interactive iterations: decode, score, sample the next prompt.

The decoder runs on prompt tokens built exactly as the reference prompt encoder builds them (points,
one padding token when there is no box; a box as two corner tokens), so that what is trained is what
inference runs. Samples with different token counts are decoded in separate groups.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..modeling.sam import Sam
from .config import InteractiveConfig
from .losses import sam_loss
from .prompts import PromptState, error_points, iteration_schedule


@dataclass
class InteractiveStats:
    """Means over samples: loss terms averaged over iterations, and IoU after the first / last iteration."""

    loss: float
    focal: float
    dice: float
    iou_mse: float
    first_iou: float
    last_iou: float
    iterations: int


def decode_tokens(model: Sam, embeddings: torch.Tensor, state: PromptState,
                  mask_input: Optional[torch.Tensor], hq_features: Optional[torch.Tensor] = None):
    """Decode every sample's prompt tokens.

    Args:
        embeddings: ``B x C x g x g`` (or ``1 x C x g x g`` shared) image embeddings.
        mask_input: ``B x 1 x 4g x 4g`` low-res logits fed back as the mask prompt, or None.
        hq_features: HQ-SAM only (``--mode hq``): the HQ features ``B x C/8 x 4g x 4g`` (or one shared).
    Returns:
        all four decoder outputs: logits ``B x 4 x 4g x 4g`` (output 0 = single mask, 1..3 = the
        ambiguity masks) and predicted IoU ``B x 4``; with ``hq_features`` the HQ token's mask alone,
        logits ``B x 1 x 4g x 4g`` (what HQ-SAM's training supervises: ``hq_token_only=True``,
        ``multimask_output=False``) and the single-mask output's predicted IoU ``B x 1``, detached.
    """
    pe_module = model.prompt_encoder
    image_pe = pe_module.get_dense_pe()
    h, w = pe_module.image_embedding_size
    masks, ious, order = [], [], []
    for idx, tokens in state.token_groups():
        sparse = pe_module.embed_points(state.coords[idx, :tokens], state.labels[idx, :tokens], pad=False)
        if mask_input is None:
            dense = pe_module.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(len(idx), -1, h, w)
        else:
            dense = pe_module.embed_masks(mask_input[idx])
        emb = embeddings if embeddings.shape[0] == 1 else embeddings[idx]
        if hq_features is None:
            m, q = model.mask_decoder.predict_masks(emb, image_pe, sparse, dense)
        else:
            feats = hq_features if hq_features.shape[0] == 1 else hq_features[idx]
            _, m, q = model.mask_decoder.predict_all(emb, image_pe, sparse, dense, feats)
            q = q[:, :1].detach()
        masks.append(m)
        ious.append(q)
        order.append(idx)
    inverse = torch.argsort(torch.cat(order))
    return torch.cat(masks)[inverse], torch.cat(ious)[inverse]


def _to_grid(logits: torch.Tensor, grid: int) -> torch.Tensor:
    if logits.shape[-1] == grid:
        return logits
    return F.interpolate(logits, (grid, grid), mode="bilinear", align_corners=False)


def run_interactive(model: Sam, embeddings: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor,
                    input_size: torch.Tensor, generator: torch.Generator, cfg: InteractiveConfig = InteractiveConfig(),
                    backward: bool = True, autocast: Optional[contextlib.AbstractContextManager] = None,
                    hq_features: Optional[torch.Tensor] = None) -> InteractiveStats:
    """Simulate one interactive session per sample and (with ``backward``) accumulate gradients.

    Args:
        embeddings: ``B x C x g x g``, one per sample (a leaf that requires grad to collect the
            encoder's gradient; otherwise constant).
        gt, valid: ``B x R x R`` bool ground truth and unpadded area on the work grid.
        input_size: ``B x 2`` (h, w) of the resized image inside the model frame.
        generator: CPU generator driving every random choice (reproducible).
        autocast: context manager for the forward passes (e.g. bf16), or None.
        hq_features: ``--mode hq``: the HQ features per sample (see :func:`decode_tokens`); the loss is
            then focal + dice on the HQ token's mask alone (no IoU-head term: the IoU head is frozen).
    Each iteration's loss is divided by the number of iterations and back-propagated at once, so
    decoder activations are freed iteration by iteration; the mask prompt fed to the next
    iteration is detached (the simulated user does not differentiate).
    """
    img_size = model.img_size
    grid = gt.shape[-1]
    schedule = iteration_schedule(generator, cfg.point_iters, cfg.refine_iters)
    n_iters = 1 + len(schedule)
    max_noise = cfg.box_max_noise * img_size / 1024.0
    state = PromptState.first(gt, input_size, img_size, generator, capacity=cfg.point_iters + 3,
                              box_prob=cfg.box_prob, noise_frac=cfg.box_noise, max_noise=max_noise)
    target = gt.float()
    weight = valid.float()
    mask_input = None
    pred = None
    ctx = autocast or contextlib.nullcontext()
    sums = dict(loss=0.0, focal=0.0, dice=0.0, iou_mse=0.0)
    first_iou = last_iou = 0.0
    single = torch.tensor([True, False, False, False], device=gt.device)
    iou_weight = cfg.iou_weight
    if hq_features is not None:  # one output, the HQ mask
        single = torch.tensor([True], device=gt.device)
        iou_weight = 0.0
    for it in range(n_iters):
        if it > 0 and schedule[it - 1]:
            xy, labels, found = error_points(pred, gt, valid, img_size, generator)
            state.add(xy, labels, found)
        multi = state.multimask()
        if hq_features is None:
            candidates = torch.where(multi[:, None], ~single[None], single[None])
        else:
            candidates = single[None].expand(len(multi), 1)
        with ctx:
            logits, iou_pred = decode_tokens(model, embeddings, state, mask_input, hq_features)
        losses = sam_loss(_to_grid(logits.float(), grid), iou_pred.float(), target, candidates, weight,
                          cfg.focal_weight, cfg.dice_weight, iou_weight, cfg.focal_alpha, cfg.focal_gamma)
        if backward and losses.total.requires_grad:
            (losses.total / n_iters).backward()
        sums["loss"] += float(losses.total.detach()) / n_iters
        sums["focal"] += float(losses.focal.detach().mean()) / n_iters
        sums["dice"] += float(losses.dice.detach().mean()) / n_iters
        sums["iou_mse"] += float(losses.iou_mse.detach().mean()) / n_iters
        # The output passed on: the highest predicted IoU among the candidates.
        scores = torch.where(candidates, iou_pred.detach().float(), torch.full_like(iou_pred, -1e9, dtype=torch.float))
        pick = scores.argmax(dim=1)
        rows = torch.arange(len(pick), device=pick.device)
        mask_input = logits.detach()[rows, pick][:, None].float()
        pred = _to_grid(mask_input, grid)[:, 0] > 0
        iou_passed = _iou(pred, gt, valid)
        if it == 0:
            first_iou = iou_passed
        last_iou = iou_passed
    return InteractiveStats(iterations=n_iters, first_iou=first_iou, last_iou=last_iou, **sums)


def _iou(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> float:
    pred, gt = pred & valid, gt & valid
    inter = (pred & gt).sum(dim=(1, 2)).float()
    union = (pred | gt).sum(dim=(1, 2)).float()
    return float(torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).mean())

