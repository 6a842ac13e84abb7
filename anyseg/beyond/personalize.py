"""One-shot personalization (PerSAM, training-free): segment "this object" in new images from one example.

Given one reference image and a mask of the object in it, :class:`PerSAM` segments the same object in
other images, with no training, following the steps of the PerSAM paper (Zhang et al., "Personalize
Segment-Anything Model with One Shot", 2023):

1. **Target feature.** The reference image is encoded; the mask is brought to the image embedding's grid
   and the embedding's features under it are averaged into one *target embedding* (its unit-length
   version is the *target feature*).
2. **Location prior.** A new image is encoded; the cosine similarity of the target feature with every
   location of its embedding is the *location confidence map*. Its best location becomes a positive point,
   its worst a negative point. (By default the map is first averaged over 3 x 3 embedding locations for
   this choice; ``smooth=1`` takes the paper's plain argmax.)
3. **Target-guided attention.** In each of the decoder's token-to-image cross-attentions the attention
   logits get ``alpha`` times the confidence map (standardized, then squashed to (0, 1) by a sigmoid)
   added before the softmax, so the prompt tokens attend more to the places that look like the target.
4. **Target-semantic prompting.** The target embedding is added to every token entering the decoder's
   two-way transformer, giving the decoder the object's appearance beside the two points.
5. **Cascaded post-refinement.** The best mask of the first decode is fed back as a mask prompt (with the
   same points); the best mask of that decode gives a box, decoded again with its mask and the points.

The decoder changes (3, 4) are made while the first decode runs, through hooks on the decoder's two-way
transformer, which SAM 1, HQ-SAM and SAM 2 share: :class:`PerSAM` works on any anyseg image model through
its :class:`~anyseg.protocol.ImagePredictor`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["PerSAM", "PersonalizedMask", "confidence_map", "guided_decoder", "location_prior", "mask_to_grid",
           "grid_to_image", "target_embedding"]


# --------------------------------------------------------------------------------------- frames
def _model_side(predictor) -> int:
    return int(predictor.model.img_size)


def mask_to_grid(mask: np.ndarray, predictor) -> np.ndarray:
    """An ``H x W`` mask of the current image -> its coverage (0..1) of each cell of the ``g x g`` embedding.

    The mask goes through the model's own frame: resized to the image's extent there
    (``predictor.input_size``), padded to the ``S x S`` square, then area-averaged onto the grid."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected an H x W mask, got shape {mask.shape}")
    if tuple(mask.shape) != tuple(predictor.original_size):
        raise ValueError(f"the mask is {mask.shape[0]} x {mask.shape[1]} but its image is "
                         f"{predictor.original_size[0]} x {predictor.original_size[1]}")
    s, g = _model_side(predictor), predictor.embedding_shape[-1]
    h, w = predictor.input_size
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    t = F.interpolate(t, (h, w), mode="bilinear", align_corners=False)
    t = F.pad(t, (0, s - w, 0, s - h))
    return F.adaptive_avg_pool2d(t, (g, g))[0, 0].numpy()


def grid_to_image(grid: np.ndarray, predictor) -> np.ndarray:
    """A ``g x g`` map over the embedding -> the current image's ``H x W`` frame (bilinear)."""
    s = _model_side(predictor)
    h, w = predictor.input_size
    t = torch.as_tensor(np.asarray(grid, dtype=np.float32))[None, None]
    t = F.interpolate(t, (s, s), mode="bilinear", align_corners=False)[..., :h, :w]
    return F.interpolate(t, tuple(predictor.original_size), mode="bilinear", align_corners=False)[0, 0].numpy()


# ---------------------------------------------------------------------------------------- steps
def _embedding(predictor) -> np.ndarray:
    """The current image's embedding ``C x g x g`` (float32)."""
    return np.asarray(predictor.encoded().embedding, dtype=np.float32)[0]


def target_embedding(embedding: np.ndarray, coverage: np.ndarray, min_coverage: float = 0.5) -> np.ndarray:
    """Step 1: the mean ``C`` feature of the embedding's cells that the mask covers (coverage > ``min_coverage``;
    the best-covered cell when none reaches it)."""
    inside = coverage > min_coverage
    if not inside.any():
        if coverage.max() <= 0:
            raise ValueError("the reference mask is empty: it must mark the object (white = object)")
        inside = coverage >= coverage.max()
    return embedding[:, inside].mean(axis=1)


def confidence_map(embedding: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Step 2: cosine similarity ``g x g`` of the unit target feature with each location of ``embedding``."""
    feats = embedding / np.maximum(np.linalg.norm(embedding, axis=0, keepdims=True), 1e-8)
    unit = target / max(float(np.linalg.norm(target)), 1e-8)
    return np.tensordot(unit, feats, axes=(0, 0))


def smooth_grid(grid: np.ndarray, cells: int) -> np.ndarray:
    """The mean of each location's ``cells x cells`` neighbourhood (edges repeated); ``cells=1`` is ``grid``."""
    if cells < 1:
        raise ValueError(f"smooth must be at least 1 cell, got {cells}")
    if cells == 1:
        return np.asarray(grid, dtype=np.float64)
    from scipy import ndimage

    return ndimage.uniform_filter(np.asarray(grid, dtype=np.float64), cells, mode="nearest")


def location_prior(confidence: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Step 2: a positive point at the most confident pixel and a negative one at the least confident:
    ``(2 x 2 XY, labels [1, 0])`` in the frame of ``confidence`` (``H x W``)."""
    best = np.unravel_index(int(np.argmax(confidence)), confidence.shape)
    worst = np.unravel_index(int(np.argmin(confidence)), confidence.shape)
    coords = np.array([[best[1], best[0]], [worst[1], worst[0]]], dtype=np.float64)
    return coords, np.array([1, 0])


def attention_bias(confidence_grid: np.ndarray, alpha: float) -> np.ndarray:
    """Step 3: ``alpha * sigmoid(standardized confidence)``, flattened in the decoder's key order (rows)."""
    c = np.asarray(confidence_grid, dtype=np.float64)
    z = (c - c.mean()) / max(float(c.std()), 1e-8)
    return (alpha / (1.0 + np.exp(-z))).reshape(-1).astype(np.float32)


def _mask_decoder(model):
    decoder = getattr(model, "mask_decoder", None) or getattr(model, "sam_mask_decoder", None)
    if decoder is None:
        raise TypeError(f"{type(model).__name__} has no SAM mask decoder")
    return decoder


def _guided_attention(module, bias: torch.Tensor):
    """The forward of a decoder :class:`~anyseg.modeling.transformer.Attention` with ``bias`` added to its
    logits (``Nk`` values, one per image location; broadcast over batch, heads and queries)."""

    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = module._heads(module.q_proj(q)), module._heads(module.k_proj(k)), module._heads(module.v_proj(v))
        logits = (q @ k.transpose(-2, -1)) / (q.shape[-1] ** 0.5)
        if logits.shape[-1] != bias.numel():
            raise ValueError(f"attention over {logits.shape[-1]} image locations, but the guidance has {bias.numel()}")
        out = (logits + bias.to(logits.dtype)).softmax(dim=-1) @ v
        b, h, n, d = out.shape
        return module.out_proj(out.transpose(1, 2).reshape(b, n, h * d))

    return forward


@contextlib.contextmanager
def guided_decoder(model, *, bias: Optional[np.ndarray] = None, target: Optional[np.ndarray] = None) -> Iterator[None]:
    """Steps 3 and 4 while the block runs: ``bias`` (one value per image-embedding location, row-major) is
    added to the logits of every token-to-image cross-attention of the decoder, ``target`` (``C``) to every
    token entering its two-way transformer. The model's fast decoder paths, which fold the attention
    differently, are switched off meanwhile; everything is restored on exit."""
    from ..modeling.transformer import TwoWayTransformer

    decoder = _mask_decoder(model)
    transformers = [m for m in decoder.modules() if isinstance(m, TwoWayTransformer)]
    if not transformers:
        raise TypeError("the model's mask decoder has no two-way transformer to guide")
    dev = next(decoder.parameters()).device
    patched, hooks = [], []
    saved_speed = getattr(model, "speed_config", None)
    try:
        if saved_speed is not None and getattr(saved_speed, "fast_decoder", False):
            model.speed_config = replace(saved_speed, fast_decoder=False)
        for tf in transformers:
            if bias is not None:
                b = torch.as_tensor(np.asarray(bias, dtype=np.float32), device=dev).reshape(1, 1, 1, -1)
                attns = [layer.cross_attn_token_to_image for layer in tf.layers] + [tf.final_attn_token_to_image]
                for attn in attns:
                    attn.forward = _guided_attention(attn, b)
                    patched.append(attn)
            if target is not None:
                t = torch.as_tensor(np.asarray(target, dtype=np.float32), device=dev).reshape(1, 1, -1)

                def add_target(_module, args, t=t):
                    image, image_pe, tokens = args
                    if tokens.shape[-1] != t.shape[-1]:
                        raise ValueError(f"target embedding of {t.shape[-1]} channels for tokens of {tokens.shape[-1]}")
                    return image, image_pe, tokens + t.to(tokens.dtype)

                hooks.append(tf.register_forward_pre_hook(add_target))
        yield
    finally:
        for attn in patched:
            attn.__dict__.pop("forward", None)
        for hook in hooks:
            hook.remove()
        if saved_speed is not None:
            model.speed_config = saved_speed


# ---------------------------------------------------------------------------------------- PerSAM
@dataclass
class PersonalizedMask:
    """PerSAM's answer for one image: ``mask`` ``H x W`` bool, ``score`` (predicted IoU of the last stage),
    the location prior (``points`` ``2 x 2`` XY, ``point_labels`` ``[1, 0]``), the ``confidence`` map
    ``H x W`` and the mask of each stage (first decode, then each refinement)."""

    mask: np.ndarray
    score: float
    points: np.ndarray
    point_labels: np.ndarray
    confidence: np.ndarray
    stages: List[np.ndarray] = field(default_factory=list)


def _best(decoded) -> Tuple[np.ndarray, float, np.ndarray]:
    i = int(np.argmax(decoded.scores))
    return np.asarray(decoded.masks[i]).astype(bool), float(decoded.scores[i]), np.asarray(decoded.low_res_logits[i])


class PerSAM:
    """Training-free one-shot personalization over any :class:`~anyseg.protocol.ImagePredictor`.

    Args:
        predictor: ``make_predictor(model)`` for a SAM 1, HQ-SAM or SAM 2 model.
        alpha: weight of the target-guided attention (0 switches it off).
        semantic_prompt: add the target embedding to the decoder's tokens (target-semantic prompting).
        refine: cascaded post-refinement stages, 0, 1 (mask prompt) or 2 (mask prompt, then box).
        smooth: the location prior is taken on the confidence map averaged over each embedding location's
            ``smooth x smooth`` neighbourhood, so that one stray location (frequent with small encoders) does
            not win; 1 is the paper's plain argmax / argmin.

    ``set_reference(image, mask)`` once, then ``segment(image)`` for each new image.
    """

    def __init__(self, predictor, *, alpha: float = 1.0, semantic_prompt: bool = True, refine: int = 2,
                 smooth: int = 3) -> None:
        if refine not in (0, 1, 2):
            raise ValueError(f"refine must be 0, 1 or 2 stages, got {refine}")
        if alpha < 0:
            raise ValueError(f"alpha must be non-negative, got {alpha}")
        self.predictor, self.alpha, self.semantic_prompt, self.refine = predictor, float(alpha), bool(semantic_prompt), refine
        if smooth < 1:
            raise ValueError(f"smooth must be at least 1 cell, got {smooth}")
        self.smooth = int(smooth)
        self.target: Optional[np.ndarray] = None

    def set_reference(self, image, mask) -> np.ndarray:
        """Step 1 on the reference ``image`` and its object ``mask`` (``H x W``, nonzero = object; a path to a
        PNG works too). Returns the target embedding ``C``."""
        from ..imageio import load_image

        image = load_image(image)
        mask = _load_mask(mask)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"the reference mask is {mask.shape[0]} x {mask.shape[1]} but the reference image is "
                             f"{image.shape[0]} x {image.shape[1]}")
        if not mask.any():
            raise ValueError("the reference mask is empty: it must mark the object (white = object)")
        self.predictor.set_image(image)
        self.target = target_embedding(_embedding(self.predictor), mask_to_grid(mask, self.predictor))
        return self.target

    def segment(self, image, **decode_options) -> PersonalizedMask:
        """Steps 2 to 5 on a new image."""
        if self.target is None:
            raise ValueError("call set_reference(image, mask) before segment()")
        p = self.predictor
        p.set_image(image)
        grid = confidence_map(_embedding(p), self.target)
        confidence = grid_to_image(grid, p)
        coords, labels = location_prior(grid_to_image(smooth_grid(grid, self.smooth), p) if self.smooth > 1
                                        else confidence)
        bias = attention_bias(grid, self.alpha) if self.alpha > 0 else None
        with guided_decoder(p.model, bias=bias, target=self.target if self.semantic_prompt else None):
            mask, score, logits = _best(p.decode(coords, labels, multimask_output=True, **decode_options))
        stages = [mask]
        if self.refine >= 1:
            mask, score, logits = _best(p.decode(coords, labels, mask_input=logits[None], multimask_output=True,
                                                 **decode_options))
            stages.append(mask)
        if self.refine >= 2 and mask.any():
            ys, xs = np.nonzero(mask)
            box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64)
            mask, score, logits = _best(p.decode(coords, labels, box=box, mask_input=logits[None],
                                                 multimask_output=True, **decode_options))
            stages.append(mask)
        return PersonalizedMask(mask, score, coords, labels, confidence, stages)


def _load_mask(mask) -> np.ndarray:
    if isinstance(mask, np.ndarray):
        arr = mask
    else:
        from pathlib import Path

        from PIL import Image

        path = Path(mask)
        if not path.exists():
            raise FileNotFoundError(f"mask not found: {path}")
        arr = np.asarray(Image.open(path).convert("L"))
    if arr.ndim == 3:
        arr = arr.max(axis=-1)
    if arr.ndim != 2:
        raise ValueError(f"expected an H x W mask, got shape {arr.shape}")
    return arr > (127 if arr.dtype == np.uint8 and arr.max() > 1 else 0)
