"""ONNX export of SAM 2 / 2.1 for images: the image encoder and the prompt decoder (spec/sam2.md 1, 3-5).

Two graphs, as for SAM 1; what :class:`anyseg.sam2_predictor.SAM2ImagePredictor` computes between its
pre- and post-processing.

Encoder graph
-------------
input ``image``  ``B x 3 x 1024 x 1024`` float32: the normalised model input. The caller makes it the way
the predictor does (spec section 1): RGB ``/ 255``, antialiased bilinear resize of the float image to
``1024 x 1024`` (the aspect ratio is not kept), then ``(x - mean) / std`` with the checkpoint's mean and
std (in the graph's metadata). The resize stays outside because ONNX ``Resize`` (antialias only from
opset 18) does not reproduce torch's antialiased kernel; :func:`anyseg.runtime.resize.resize_bilinear_aa`
does, in numpy.

outputs ``image_embeddings`` ``B x 256 x 64 x 64`` (the stride-16 feature plus ``no_mem_embed``, what
``get_image_embedding()`` returns), ``high_res_feats_0`` ``B x 32 x 256 x 256`` and ``high_res_feats_1``
``B x 64 x 128 x 128`` (the stride-4 and stride-8 features after ``conv_s0`` / ``conv_s1``).

Decoder graph
-------------
inputs (float32): ``image_embeddings``, ``high_res_feats_0``, ``high_res_feats_1`` (one image, ``1 x ...``,
the encoder's outputs); ``point_coords`` ``1 x N x 2`` XY in the model frame (original pixels times
``1024 / W`` and ``1024 / H``); ``point_labels`` ``1 x N`` (1 / 0 clicks, 2 / 3 box corners, -1 padding);
``mask_input`` ``1 x 1 x 256 x 256`` low-res logits of an earlier prediction and ``has_mask_input``
``1`` (1 to use it, 0 to ignore it); ``orig_im_size`` ``2`` = (H, W).
Prompt layout (SAM 2's): the box corners (labels 2, 3) first, then the clicks, then always one padding
point ``(0, 0)`` / ``-1`` whenever there is a point or a box; ``N = 0`` for a mask-only prompt.

outputs ``masks`` ``1 x k x H x W`` logits at the original size (mask = logits > 0), ``iou_predictions``
``1 x k``, ``low_res_masks`` ``1 x k x 256 x 256`` clamped to [-32, 32] (as the predictor returns them,
the masks are made before the clamp) and ``object_score_logits`` ``1 x 1`` (the object-presence logit;
the image predictor does not use it).

``k = 4``: output 0 is the predictor's answer for ``multimask_output=False`` **with the dynamic multimask
fallback already applied in the graph** (mask 0 when its stability ``|l > 0.05| / |l > -0.05|`` reaches
0.98, otherwise the best of masks 1..3 by predicted IoU, with that IoU), outputs 1..3 the three multimask
candidates. So every runtime picks outputs 1..3 or output 0 as for SAM 1's graph, and none has to
re-implement the fallback. ``return_single_mask=True`` keeps output 0 only (``k = 1``).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._common import (
    FORMAT_VERSION,
    KIND_DECODER,
    KIND_ENCODER,
    META_FAMILY,
    META_FORMAT,
    META_IMG_SIZE,
    META_KIND,
    META_OPSET,
    PathLike,
    check_opset,
    export_graph,
)
from .decoder import _plain_copy
from .encoder import _plain_eval

SAM2_ENCODER_INPUTS = ("image",)
SAM2_ENCODER_OUTPUTS = ("image_embeddings", "high_res_feats_0", "high_res_feats_1")
SAM2_DECODER_INPUTS = ("image_embeddings", "high_res_feats_0", "high_res_feats_1", "point_coords", "point_labels",
                       "mask_input", "has_mask_input", "orig_im_size")
SAM2_DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks", "object_score_logits")

#: Clamp of the returned low-res logits (the reference predictor's).
LOW_RES_CLAMP = 32.0


class Sam2OnnxEncoder(nn.Module):
    """Normalised ``B x 3 x S x S`` -> ``(vision + no_mem_embed, high_res_0, high_res_1)``."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor):
        features = self.model.encode_image(image)
        return (self.model.image_embedding(features),) + tuple(features.high_res)


class Sam2OnnxDecoder(nn.Module):
    """SAM 2's prompt encoder + mask decoder + the predictor's postprocessing as one traceable module.

    Args:
        model: a :class:`anyseg.modeling.sam2.Sam2`.
        return_single_mask: output only the single-mask answer (with the dynamic fallback).
        gelu_approximate: tanh-approximated GELU (for runtimes without ``Erf``; tiny differences).
        upscale_masks: compute the full-size ``masks`` output (False: no ``orig_im_size`` input; outputs
            ``iou_predictions``, ``low_res_masks``, ``object_score_logits``).
    """

    def __init__(self, model, *, return_single_mask: bool = False, gelu_approximate: bool = False,
                 upscale_masks: bool = True) -> None:
        super().__init__()
        self.prompt_encoder = _plain_copy(model.sam_prompt_encoder, gelu_approximate)
        self.mask_decoder = _plain_copy(model.sam_mask_decoder, gelu_approximate)
        self.dynamic_multimask = bool(model.config.dynamic_multimask_via_stability)
        self.return_single_mask = bool(return_single_mask)
        self.upscale_masks = bool(upscale_masks)
        self.register_buffer("dense_pe", self.prompt_encoder.get_dense_pe().detach().clone(), persistent=False)

    def _dense(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        # has = 1: exactly the mask's embedding; has = 0: exactly no_mask_embed (the predictor's two cases).
        pe = self.prompt_encoder
        dense = has_mask_input * pe.embed_masks(mask_input)
        return dense + (1 - has_mask_input) * pe.no_mask_embed.weight.reshape(1, -1, 1, 1)

    def forward(self, image_embeddings: torch.Tensor, high_res_feats_0: torch.Tensor, high_res_feats_1: torch.Tensor,
                point_coords: torch.Tensor, point_labels: torch.Tensor, mask_input: torch.Tensor,
                has_mask_input: torch.Tensor, orig_im_size: Optional[torch.Tensor] = None):
        sparse = self.prompt_encoder.embed_points(point_coords, point_labels, pad=False)
        dense = self._dense(mask_input, has_mask_input)
        dec = self.mask_decoder
        masks, iou, _, object_score = dec.predict_all(image_embeddings, self.dense_pe, sparse, dense,
                                                      (high_res_feats_0, high_res_feats_1))
        if self.dynamic_multimask:
            single, single_iou = dec.dynamic_fallback(masks, iou)
        else:
            single, single_iou = masks[:, :1], iou[:, :1]
        if self.return_single_mask:
            masks, iou = single, single_iou
        else:
            masks = torch.cat([single, masks[:, 1:]], dim=1)
            iou = torch.cat([single_iou, iou[:, 1:]], dim=1)
        low_res = torch.clamp(masks, -LOW_RES_CLAMP, LOW_RES_CLAMP)
        if not self.upscale_masks:
            return iou, low_res, object_score
        size = orig_im_size.to(torch.int64)
        full = F.interpolate(masks, size=(size[0], size[1]), mode="bilinear", align_corners=False)
        return full, iou, low_res, object_score


def _float_cpu(model):
    """``model`` itself when it is float32 on the CPU, else a float32 CPU copy (the caller's stays)."""
    p = next(model.parameters())
    if p.dtype != torch.float32 or p.device.type != "cpu":
        return copy.deepcopy(model).float().cpu()
    return model


def _family_metadata(model, kind: str, opset: int) -> dict:
    cfg = model.config
    return {
        META_KIND: kind,
        META_FAMILY: "sam2",
        META_FORMAT: FORMAT_VERSION,
        META_OPSET: str(opset),
        META_IMG_SIZE: str(int(cfg.image_size)),
        "anyseg.embedding_size": str(int(cfg.embedding_size)),
        "anyseg.sam2_version": str(cfg.version),
    }


def _declare_output_shapes(shapes: dict):
    """A ``post`` hook for :func:`export_graph`: the outputs' fixed dimensions, which the tracer leaves
    symbolic once the batch is dynamic (``None`` keeps a dimension as it is)."""
    def post(model) -> None:
        for out in model.graph.output:
            if out.name in shapes:
                dims = out.type.tensor_type.shape.dim
                for dim, value in zip(dims, shapes[out.name]):
                    if value is not None:
                        dim.ClearField("dim_param")
                        dim.dim_value = int(value)
    return post


def export_sam2_encoder(model, path: PathLike, *, opset: int = 17, external_data: Optional[bool] = None) -> Path:
    """Export the image encoder of a SAM 2 ``model`` (Hiera, FPN neck, ``conv_s0`` / ``conv_s1`` and
    ``no_mem_embed``) to ``path``; see the module docstring. Weights above ~1.8 GB go to ``<path>.data``
    (``external_data`` forces the choice). Returns the written path."""
    check_opset(opset)
    model = _float_cpu(model)
    cfg = model.config
    side = int(cfg.image_size)
    metadata = _family_metadata(model, KIND_ENCODER, opset)
    metadata.update({
        "anyseg.encoder": type(cfg.trunk).__name__,
        # repr: the exact float64 values, which the runtime rounds to float32 as the model's buffers are.
        "anyseg.pixel_mean": ",".join(repr(float(v)) for v in cfg.pixel_mean),
        "anyseg.pixel_std": ",".join(repr(float(v)) for v in cfg.pixel_std),
        "anyseg.input": "normalized",
        "anyseg.resize": "bilinear-antialias-square",
    })
    example = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    dynamic_axes = {name: {0: "batch"} for name in SAM2_ENCODER_INPUTS + SAM2_ENCODER_OUTPUTS}
    g, dim = int(cfg.embedding_size), int(cfg.transformer_dim)
    shapes = dict(zip(SAM2_ENCODER_OUTPUTS, ((None, dim, g, g), (None, dim // 8, 4 * g, 4 * g),
                                             (None, dim // 4, 2 * g, 2 * g))))
    with _plain_eval(model), torch.no_grad():
        return export_graph(Sam2OnnxEncoder(model), (example,), path, opset=opset, input_names=SAM2_ENCODER_INPUTS,
                            output_names=SAM2_ENCODER_OUTPUTS, dynamic_axes=dynamic_axes, metadata=metadata,
                            external_data=external_data, post=_declare_output_shapes(shapes))


def example_sam2_decoder_inputs(model, num_points: int = 3, orig_size=(534.0, 800.0)):
    """Dummy decoder inputs of the right shapes for tracing (the values do not matter)."""
    g = int(model.config.embedding_size)
    dim = int(model.config.transformer_dim)
    gen = torch.Generator().manual_seed(0)
    return (
        torch.randn(1, dim, g, g, generator=gen),
        torch.randn(1, dim // 8, 4 * g, 4 * g, generator=gen),
        torch.randn(1, dim // 4, 2 * g, 2 * g, generator=gen),
        torch.rand(1, num_points, 2, generator=gen) * model.img_size,
        torch.tensor([[1.0] * (num_points - 1) + [-1.0]]),
        torch.randn(1, 1, 4 * g, 4 * g, generator=gen),
        torch.tensor([1.0]),
        torch.tensor(orig_size, dtype=torch.float32),
    )


def export_sam2_decoder(model, path: PathLike, *, opset: int = 17, return_single_mask: bool = False,
                        gelu_approximate: bool = False, upscale_masks: bool = True, **unsupported) -> Path:
    """Export the prompt encoder + mask decoder of a SAM 2 ``model`` to ``path`` (module docstring).

    Raises ``ValueError`` for SAM 1-only options (``fast``, ``image_cache``, ``use_stability_score``) when
    set, an opset outside ``[13, 20]`` or a path not ending in ``.onnx``. Returns the written path.
    """
    check_opset(opset)
    given = sorted(k for k, v in unsupported.items() if v)
    if given:
        raise ValueError(f"{', '.join(k + '=True' for k in given)}: not available for SAM 2 decoder graphs "
                         f"(SAM 1 only)")
    wrapper = Sam2OnnxDecoder(model, return_single_mask=return_single_mask, gelu_approximate=gelu_approximate,
                              upscale_masks=upscale_masks)
    inputs, outputs = SAM2_DECODER_INPUTS, SAM2_DECODER_OUTPUTS
    dynamic_axes = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}
    if upscale_masks:
        dynamic_axes["masks"] = {2: "height", 3: "width"}
    else:
        inputs, outputs = inputs[:-1], outputs[1:]
    example = example_sam2_decoder_inputs(model)[: len(inputs)]
    dec = model.config
    metadata = _family_metadata(model, KIND_DECODER, opset)
    metadata.update({
        "anyseg.return_single_mask": str(int(return_single_mask)),
        "anyseg.gelu_approximate": str(int(gelu_approximate)),
        "anyseg.upscale_masks": str(int(upscale_masks)),
        "anyseg.use_stability_score": "0",
        "anyseg.fast": "0",
        "anyseg.image_cache": "0",
        "anyseg.num_masks": "1" if return_single_mask else str(int(dec.num_multimask_outputs) + 1),
        "anyseg.dynamic_multimask": str(int(dec.dynamic_multimask_via_stability)),
        "anyseg.dynamic_multimask_delta": repr(float(dec.dynamic_multimask_stability_delta)),
        "anyseg.dynamic_multimask_thresh": repr(float(dec.dynamic_multimask_stability_thresh)),
        "anyseg.low_res_clamp": repr(LOW_RES_CLAMP),
    })
    k, side = int(metadata["anyseg.num_masks"]), 4 * int(dec.embedding_size)
    shapes = {"masks": (1, k, None, None), "iou_predictions": (1, k), "low_res_masks": (1, k, side, side),
              "object_score_logits": (1, 1)}
    with torch.no_grad():
        return export_graph(wrapper, example, path, opset=opset, input_names=inputs, output_names=outputs,
                            dynamic_axes=dynamic_axes, metadata=metadata, external_data=False,
                            post=_declare_output_shapes(shapes))
