"""ONNX export of SAM's prompt encoder + mask decoder: the small, per-click part of the model.

One graph serves every image: the caller gives the image embedding, prompts already in the model
frame, and the original image size; the graph returns mask logits at that size.

Graph inputs (all float32)
--------------------------
``image_embeddings``  ``1 x 256 x 64 x 64``  from the encoder (``64 = img_size / 16``).
``point_coords``      ``1 x N x 2``  XY in the *model frame* (original pixels times
                      ``new_w / W``, ``new_h / H``, see :mod:`anyseg.geometry`); N is dynamic.
``point_labels``      ``1 x N``  -1 padding point, 0 background, 1 foreground, 2 box top-left,
                      3 box bottom-right. A prompt without a box must end with one padding point
                      ``(0, 0)`` / ``-1``; a box is given as its two corners with labels 2 and 3.
``mask_input``        ``1 x 1 x 256 x 256``  low-res logits of an earlier prediction (zeros if none).
``has_mask_input``    ``1``  1.0 to use ``mask_input``, 0.0 to ignore it.
``orig_im_size``      ``2``  (H, W) of the original image, as floats.

Graph outputs
-------------
``masks``             ``1 x k x H x W``  mask logits in the original frame (mask = logits > 0).
``iou_predictions``   ``1 x k``  predicted IoU (or stability score, see ``use_stability_score``).
``low_res_masks``     ``1 x k x 256 x 256``  logits to feed back as ``mask_input``.

``k`` is 4 (the single-mask output 0 followed by the three multimask outputs 1..3), 1 with
``return_single_mask``, or 3 with ``multimask_only`` (outputs 1..3 only: the single-mask token is
not decoded, which is all the labelling app shows).

With ``mask_prompt=False`` (with ``image_cache``) the graph takes no ``mask_input`` /
``has_mask_input``: it decodes prompts without a mask prompt only, the same function as the full
graph with ``has_mask_input = 0``, with less work (no mask features, no mask term in the first block).

With ``upscale_masks=False`` the graph stops at the low-res logits: its outputs are
``iou_predictions`` and ``low_res_masks`` only and it takes no ``orig_im_size``. The caller upscales
the masks it shows (the labelling app does so in JavaScript, for the one candidate on screen), which
saves the two full-size resizes of all ``k`` masks per click.

Per-image cache (``image_cache=True``, with ``fast=True``)
--------------------------------------------------------
The image side of the first two-way block does not depend on the prompt, so a second graph,
``export_decoder_cache(model, path)``, computes it once per image: input ``image_embeddings``,
outputs ``image_keys`` (``1 x 4096 x 256``: the embedding as tokens plus the no-mask embedding),
``image_key_proj`` and ``image_value_proj`` (``1 x 8 x 4096 x 16``) and ``image_query_proj``
(``1 x 4096 x 128``). The decoder graph then takes these four *instead of* ``image_embeddings``
(same names, so the cache graph's outputs feed it as they are) and does less work per click; a mask
prompt enters through them too (see :class:`anyseg.fast.decoder.FastDecoder`). The labelling app
runs both graphs in the page.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._common import (
    FORMAT_VERSION,
    KIND_DECODER,
    KIND_DECODER_CACHE,
    META_FORMAT,
    META_IMG_SIZE,
    META_KIND,
    META_OPSET,
    PathLike,
    check_opset,
    export_graph,
)

DECODER_INPUTS = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input",
                  "orig_im_size")
DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")
CACHE_OUTPUTS = ("image_keys", "image_key_proj", "image_value_proj", "image_query_proj")


def _plain_copy(module: nn.Module, gelu_approximate: bool) -> nn.Module:
    """A float32 CPU copy in eval mode with the plain (non-SDPA) attention path; the caller's model
    is left untouched."""
    module = copy.deepcopy(module).float().cpu().eval()
    for m in module.modules():
        if hasattr(m, "fused"):
            m.fused = False
        if gelu_approximate and isinstance(m, nn.GELU):
            m.approximate = "tanh"
    return module


def _fast_decoder(wrapper: nn.Module):
    """A :class:`anyseg.fast.decoder.FastDecoder` over a graph wrapper's copies of the prompt encoder and
    mask decoder (and its ``dense_pe`` buffer), traced into the graph."""
    from ..fast.decoder import FastDecoder

    pe = wrapper.prompt_encoder
    return FastDecoder(wrapper.mask_decoder, wrapper.dense_pe, pe.no_mask_embed.weight,
                       mask_projection=pe.mask_projection)


class SamOnnxDecoder(nn.Module):
    """Prompt encoder + mask decoder + postprocessing as one traceable module (see module docs).

    Args:
        model: an :class:`anyseg.modeling.sam.Sam`.
        return_single_mask: return one mask chosen by the reference rule: with two or fewer prompt
            tokens (one click plus the padding point, or a box alone) the multimask output with the
            highest score, otherwise the single-mask output 0.
        use_stability_score: report the stability score of each low-res mask
            (``|logits > 1| / |logits > -1|``) instead of the predicted IoU.
        gelu_approximate: use the tanh approximation of GELU (faster on some runtimes, tiny
            numerical differences).
        stability_score_offset: the threshold offset of the stability score.
        upscale_masks: compute the ``masks`` output (False: low-res logits only, see the module docs).
        fast: compute the decoder with :class:`anyseg.fast.decoder.FastDecoder`'s reordered float32
            arithmetic (attention without projecting the 4096 image tokens, transposed convolutions
            as matrix products): the same function to float32 rounding, with less work per click
            (``benchmarks/bench_browser.py`` times both graphs).
        image_cache: (with ``fast``) take the image as the per-image tensors of
            :class:`SamOnnxDecoderCache` (``CACHE_OUTPUTS``) instead of ``image_embeddings``.
        multimask_only: (with ``fast``) return the three multimask outputs only (``k = 3``): the
            single-mask token skips the final attention, its hypernetwork and the mask product.
        mask_prompt: (False needs ``image_cache``) take ``mask_input`` and ``has_mask_input``; without
            them the graph decodes prompts without a mask prompt only.
    """

    def __init__(self, model, *, return_single_mask: bool = False, use_stability_score: bool = False,
                 gelu_approximate: bool = False, stability_score_offset: float = 1.0, fast: bool = False,
                 upscale_masks: bool = True, image_cache: bool = False, multimask_only: bool = False,
                 mask_prompt: bool = True) -> None:
        super().__init__()
        if not mask_prompt and not image_cache:
            raise ValueError("mask_prompt=False needs image_cache=True")
        self.mask_prompt = bool(mask_prompt)
        if image_cache and not fast:
            raise ValueError("image_cache=True needs fast=True (the faithful graph has no per-image cache)")
        if multimask_only and (not fast or return_single_mask):
            raise ValueError("multimask_only=True needs fast=True and return_single_mask=False")
        self.multimask_only = bool(multimask_only)
        self.image_cache = bool(image_cache)
        self.upscale_masks = bool(upscale_masks)
        self.prompt_encoder = _plain_copy(model.prompt_encoder, gelu_approximate)
        self.mask_decoder = _plain_copy(model.mask_decoder, gelu_approximate)
        self.img_size = int(model.img_size)
        self.mask_threshold = float(model.mask_threshold)
        self.return_single_mask = return_single_mask
        self.use_stability_score = use_stability_score
        self.stability_score_offset = float(stability_score_offset)
        self.register_buffer("dense_pe", self.prompt_encoder.get_dense_pe().detach().clone(), persistent=False)
        self.fast = bool(fast)
        if self.fast:
            # The positional encoding as 1 x N x C tokens, a persistent buffer so that the graph stores
            # it once as an initializer (computed from dense_pe, it is folded into a constant copy
            # for each of its three consumers: 8 MB more).
            self.register_buffer("pe_tokens", self.dense_pe.flatten(2).transpose(1, 2).contiguous())

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pe = self.prompt_encoder
        emb = pe.pe_layer.encode((coords + 0.5) / self.img_size)
        labels = labels.unsqueeze(-1)
        emb = emb * (labels != -1)
        emb = emb + pe.not_a_point_embed.weight * (labels == -1)
        for value, table in enumerate(pe.point_embeddings):
            emb = emb + table.weight * (labels == value)
        return emb

    def _embed_mask(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        pe = self.prompt_encoder
        dense = has_mask_input * pe.mask_downscaling(mask_input)
        return dense + (1 - has_mask_input) * pe.no_mask_embed.weight.reshape(1, -1, 1, 1)

    def _fast_predict(self, image: Sequence[torch.Tensor], sparse: torch.Tensor, mask_input: torch.Tensor,
                      has_mask_input: torch.Tensor):
        from ..fast.decoder import ImageCache

        dec = self.mask_decoder
        fast = _fast_decoder(self)
        if not self.image_cache:
            # The dense embedding enters as a prompt: the first block attends to image + dense per click.
            fast.set_image(image[0], project=False).pe = self.pe_tokens
            dense = self._embed_mask(mask_input, has_mask_input)
            iou, mask_tokens, image_tokens = fast.tokens(sparse, dense)
        else:
            keys, kh0, vh0, q0 = image
            size = tuple(int(v) for v in self.prompt_encoder.image_embedding_size)
            fast.cache = ImageCache(None, size, None, self.pe_tokens, keys, kh0, vh0, q0)
            hidden = None if mask_input is None else self.prompt_encoder.mask_features(mask_input)
            if self.multimask_only:
                # The final attention for the IoU token and mask tokens 1..m-1 only (token 0 is skipped).
                queries, tokens, image_tokens = fast.transformer(sparse, mask_hidden=hidden,
                                                                 mask_present=has_mask_input)
                which = list(range(1, dec.num_mask_tokens))
                out = fast.final_tokens(queries, tokens, image_tokens, [0] + [1 + i for i in which])
                iou = dec.iou_prediction_head(out[:, 0, :])[:, which]
                return fast.upscale(fast.hyper(out[:, 1:], which), image_tokens, None), iou
            iou, mask_tokens, image_tokens = fast.tokens(sparse, mask_hidden=hidden, mask_present=has_mask_input)
        if self.multimask_only:
            which = list(range(1, dec.num_mask_tokens))
            return fast.masks(mask_tokens, image_tokens, which), iou[:, which]
        masks = fast.masks(mask_tokens, image_tokens, range(dec.num_mask_tokens))
        return masks, iou

    def _stability(self, masks: torch.Tensor) -> torch.Tensor:
        high = (masks > self.mask_threshold + self.stability_score_offset).float().sum((-1, -2))
        low = (masks > self.mask_threshold - self.stability_score_offset).float().sum((-1, -2))
        return high / low

    @staticmethod
    def _select(masks: torch.Tensor, scores: torch.Tensor, num_tokens: torch.Tensor):
        # Arithmetic instead of control flow: output 0 gains +-1000 depending on the token count.
        reweight = torch.zeros_like(scores[:1])
        reweight[:, 0] = 1000.0
        best = torch.argmax(scores + (num_tokens - 2.5) * reweight, dim=1, keepdim=True)
        b, _, h, w = masks.shape
        masks = torch.gather(masks, 1, best[:, :, None, None].expand(b, 1, h, w))
        return masks, torch.gather(scores, 1, best)

    def _postprocess(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        s = self.img_size
        masks = F.interpolate(masks, size=(s, s), mode="bilinear", align_corners=False)
        # Same float64 arithmetic as anyseg.geometry.resized_shape, so the crop matches exactly.
        size = orig_im_size.to(torch.float64)
        scale = s / torch.max(size)
        resized = torch.floor(size * scale + 0.5).to(torch.int64)
        masks = masks[..., : resized[0], : resized[1]]
        orig = orig_im_size.to(torch.int64)
        return F.interpolate(masks, size=(orig[0], orig[1]), mode="bilinear", align_corners=False)

    def forward(self, *args: torch.Tensor):
        """``(image_embeddings | image_keys, image_key_proj, image_value_proj, image_query_proj,
        point_coords, point_labels, mask_input, has_mask_input[, orig_im_size])``, see the module docs."""
        n_image = len(CACHE_OUTPUTS) if self.image_cache else 1
        image, args = args[:n_image], args[n_image:]
        if not self.mask_prompt:
            args = args[:2] + (None, None) + args[2:]
        point_coords, point_labels, mask_input, has_mask_input = args[:4]
        orig_im_size = args[4] if len(args) > 4 else None
        sparse = self._embed_points(point_coords, point_labels)
        if self.fast:
            masks, scores = self._fast_predict(image, sparse, mask_input, has_mask_input)
        else:
            dense = self._embed_mask(mask_input, has_mask_input)
            masks, scores = self.mask_decoder.predict_masks(image[0], self.dense_pe, sparse, dense)
        if self.use_stability_score:
            scores = self._stability(masks)
        if self.return_single_mask:
            num_tokens = torch.tensor(point_coords.shape[1], dtype=scores.dtype)
            masks, scores = self._select(masks, scores, num_tokens)
        if not self.upscale_masks:
            return scores, masks
        return self._postprocess(masks, orig_im_size), scores, masks


def example_decoder_inputs(model, num_points: int = 3, orig_size=(534.0, 800.0)):
    """Dummy inputs of the right shapes for tracing (the values do not matter)."""
    g = int(model.config.embedding_size)
    dim = int(model.prompt_encoder.embed_dim)
    side = 4 * g
    gen = torch.Generator().manual_seed(0)
    return (
        torch.randn(1, dim, g, g, generator=gen),
        torch.rand(1, num_points, 2, generator=gen) * model.img_size,
        torch.tensor([[1.0] * (num_points - 1) + [-1.0]]),
        torch.randn(1, 1, side, side, generator=gen),
        torch.tensor([1.0]),
        torch.tensor(orig_size, dtype=torch.float32),
    )


class SamOnnxDecoderCache(nn.Module):
    """The per-image part of the ``image_cache`` decoder graph: ``image_embeddings`` -> ``image_keys``
    ``1 x N x C``, ``image_key_proj``, ``image_value_proj`` ``1 x H x N x d`` and ``image_query_proj``
    ``1 x N x (H d)`` (:meth:`anyseg.fast.decoder.FastDecoder.set_image`)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.prompt_encoder = _plain_copy(model.prompt_encoder, False)
        self.mask_decoder = _plain_copy(model.mask_decoder, False)
        self.register_buffer("dense_pe", self.prompt_encoder.get_dense_pe().detach().clone(), persistent=False)

    def forward(self, image_embeddings: torch.Tensor):
        cache = _fast_decoder(self).set_image(image_embeddings)
        return cache.keys, cache.kh0, cache.vh0, cache.q0


def example_cache_inputs(model, image_embeddings: torch.Tensor):
    """The per-image tensors of ``image_embeddings`` (what the cache graph computes)."""
    with torch.no_grad():
        return tuple(t.contiguous() for t in SamOnnxDecoderCache(model)(image_embeddings))


def export_decoder_cache(model, path: PathLike, *, opset: int = 17) -> Path:
    """Export the per-image graph of ``export_decoder(..., fast=True, image_cache=True)`` to ``path``
    (see the module docs). Returns the written path."""
    check_opset(opset)
    wrapper = SamOnnxDecoderCache(model)
    metadata = {
        META_KIND: KIND_DECODER_CACHE,
        META_FORMAT: FORMAT_VERSION,
        META_OPSET: str(opset),
        META_IMG_SIZE: str(int(model.img_size)),
        "anyseg.embedding_size": str(model.config.embedding_size),
    }
    with torch.no_grad():
        example = example_decoder_inputs(model)[:1]
        return export_graph(wrapper, example, path, opset=opset, input_names=("image_embeddings",),
                            output_names=CACHE_OUTPUTS, dynamic_axes={}, metadata=metadata, external_data=False)


def export_decoder(model, path: PathLike, *, opset: int = 17, return_single_mask: bool = False,
                   gelu_approximate: bool = False, use_stability_score: bool = False, fast: bool = False,
                   upscale_masks: bool = True, image_cache: bool = False, multimask_only: bool = False,
                   mask_prompt: bool = True) -> Path:
    """Export the prompt encoder + mask decoder of ``model`` to the ONNX file ``path``.

    Inputs / outputs are those of the module docstring (the names of the reference SAM ONNX
    model; with ``image_cache`` the outputs of :func:`export_decoder_cache`'s graph in place of
    ``image_embeddings``).
    Returns the written path. Raises ``ValueError`` for an opset outside ``[13, 20]``, a path not
    ending in ``.onnx``, ``image_cache`` without ``fast``, ``multimask_only`` without ``fast`` or
    with ``return_single_mask``, or ``mask_prompt=False`` without ``image_cache``.
    """
    check_opset(opset)
    wrapper = SamOnnxDecoder(model, return_single_mask=return_single_mask,
                             use_stability_score=use_stability_score, gelu_approximate=gelu_approximate,
                             fast=fast, upscale_masks=upscale_masks, image_cache=image_cache,
                             multimask_only=multimask_only, mask_prompt=mask_prompt)
    dynamic_axes = {
        "point_coords": {1: "num_points"},
        "point_labels": {1: "num_points"},
    }
    inputs, outputs = DECODER_INPUTS, DECODER_OUTPUTS
    if upscale_masks:
        dynamic_axes["masks"] = {2: "height", 3: "width"}
    else:
        inputs, outputs = DECODER_INPUTS[:-1], DECODER_OUTPUTS[1:]
    example = example_decoder_inputs(model)[: len(inputs)]
    if image_cache:
        inputs = CACHE_OUTPUTS + inputs[1:]
        example = example_cache_inputs(model, example[0]) + example[1:]
    if not mask_prompt:
        keep = [i for i, name in enumerate(inputs) if name not in ("mask_input", "has_mask_input")]
        inputs, example = tuple(inputs[i] for i in keep), tuple(example[i] for i in keep)
    num_masks = wrapper.mask_decoder.num_mask_tokens
    if return_single_mask:
        num_masks = 1
    elif multimask_only:
        num_masks -= 1
    metadata = {
        META_KIND: KIND_DECODER,
        META_FORMAT: FORMAT_VERSION,
        META_OPSET: str(opset),
        META_IMG_SIZE: str(wrapper.img_size),
        "anyseg.embedding_size": str(model.config.embedding_size),
        "anyseg.return_single_mask": str(int(return_single_mask)),
        "anyseg.use_stability_score": str(int(use_stability_score)),
        "anyseg.gelu_approximate": str(int(gelu_approximate)),
        "anyseg.fast": str(int(fast)),
        "anyseg.upscale_masks": str(int(upscale_masks)),
        "anyseg.image_cache": str(int(image_cache)),
        "anyseg.multimask_only": str(int(multimask_only)),
        "anyseg.mask_prompt": str(int(mask_prompt)),
        "anyseg.num_masks": str(num_masks),
    }
    with torch.no_grad():
        return export_graph(wrapper, example, path, opset=opset, input_names=inputs, output_names=outputs,
                            dynamic_axes=dynamic_axes, metadata=metadata, external_data=False)
