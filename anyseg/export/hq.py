"""ONNX export of HQ-SAM (spec/hq_sam.md): the encoder graph also returns the encoder's early feature, the
decoder graph takes it and computes the HQ token, the HQ feature fusion and the mask combination.

Encoder graph
-------------
Input ``image`` as SAM 1's (:mod:`.encoder`: ``B x 3 x h x w`` RGB 0..255, long side 1024). Outputs
``image_embeddings`` ``B x 256 x 64 x 64`` and ``interm_embeddings`` ``B x 64 x 64 x D`` (channels last):
the output of the first global-attention block of a ViT (D = embed dim) or of TinyViT's second stage
(``layers.1`` with its PatchMerging, D = 160), exactly what ``SamPredictor.interm_features`` holds.

Decoder graph
-------------
Inputs: ``image_embeddings``, ``interm_embeddings`` (``1 x 64 x 64 x D``), ``point_coords``,
``point_labels``, ``mask_input``, ``has_mask_input`` (as SAM 1), ``hq_token_only`` (``1`` float32: 1 for
the HQ mask alone, 0 for SAM mask + HQ mask) and ``orig_im_size``. One graph serves both
``hq_token_only`` settings: the graph computes ``hq + (1 - hq_token_only) * sam``, which is bit for bit
``sam + hq`` or ``hq``.

Outputs ``masks`` ``1 x k x H x W``, ``iou_predictions`` ``1 x k``, ``low_res_masks`` ``1 x k x 256 x 256``
with ``k = 2``: output 0 is the answer for ``multimask_output=False`` (SAM mask 0 combined with the HQ
mask, score of token 0), output 1 the answer for ``multimask_output=True`` (the SAM mask among 1..3 with the
highest predicted IoU, combined with the HQ mask, with that IoU). So a runtime picks outputs ``1:`` or
``:1`` exactly as for a SAM 1 graph (whose outputs are 0 and 1..3). ``return_single_mask`` keeps one of the
two by the reference rule (output 1 for at most two prompt tokens, else output 0).

The HQ feature (``embedding_encoder(image) + compress_vit_feat(interm)``) is computed inside the decoder
graph on every call, so the graph's image inputs are the encoder's outputs as they are.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ._common import (FORMAT_VERSION, KIND_DECODER, KIND_ENCODER, META_FAMILY, META_FORMAT, META_IMG_SIZE,
                      META_KIND, META_OPSET, PathLike, check_opset, export_graph)
from .decoder import SamOnnxDecoder, example_decoder_inputs
from .encoder import SamOnnxEncoder, _plain_eval

FAMILY_HQ = "sam_hq"
HQ_ENCODER_INPUTS = ("image",)
HQ_ENCODER_OUTPUTS = ("image_embeddings", "interm_embeddings")
HQ_DECODER_INPUTS = ("image_embeddings", "interm_embeddings", "point_coords", "point_labels", "mask_input",
                     "has_mask_input", "hq_token_only", "orig_im_size")
HQ_DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")


def is_hq(model) -> bool:
    return bool(getattr(model, "is_hq", False))


class SamHQOnnxEncoder(SamOnnxEncoder):
    """Normalise, pad and encode; also return the early feature ``B x g x g x D`` the HQ decoder reads."""

    def forward(self, image: torch.Tensor):
        x = (image - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        x = nn.functional.pad(x, (0, self.img_size - w, 0, self.img_size - h))
        return self.image_encoder(x, return_interm=True)


class SamHQOnnxDecoder(SamOnnxDecoder):
    """Prompt encoder + HQ mask decoder + postprocessing (see the module docs)."""

    def __init__(self, model, *, return_single_mask: bool = False, use_stability_score: bool = False,
                 gelu_approximate: bool = False, stability_score_offset: float = 1.0, fast: bool = False,
                 upscale_masks: bool = True, image_cache: bool = False) -> None:
        if fast or image_cache:
            raise ValueError("fast=True / image_cache=True (--fast-decoder) are not available for HQ-SAM: the fast "
                             "decoder has no HQ token; export the faithful decoder graph")
        if not is_hq(model):
            raise ValueError("SamHQOnnxDecoder needs an HQ-SAM model")
        super().__init__(model, return_single_mask=return_single_mask, use_stability_score=use_stability_score,
                         gelu_approximate=gelu_approximate, stability_score_offset=stability_score_offset,
                         upscale_masks=upscale_masks)

    def forward(self, image_embeddings, interm_embeddings, point_coords, point_labels, mask_input, has_mask_input,
                hq_token_only, orig_im_size: Optional[torch.Tensor] = None):
        dec = self.mask_decoder
        sparse = self._embed_points(point_coords, point_labels)
        dense = self._embed_mask(mask_input, has_mask_input)
        hq_features = dec.hq_features(image_embeddings, interm_embeddings)
        sam_masks, hq_mask, iou = dec.predict_all(image_embeddings, self.dense_pe, sparse, dense, hq_features)
        best = torch.argmax(iou[:, 1:], dim=1, keepdim=True) + 1
        b, _, h, w = sam_masks.shape
        best_mask = torch.gather(sam_masks, 1, best[:, :, None, None].expand(b, 1, h, w))
        sam = torch.cat([sam_masks[:, :1], best_mask], dim=1)
        scores = torch.cat([iou[:, :1], torch.gather(iou, 1, best)], dim=1)
        # hq + 1 * sam == sam + hq and hq + 0 * sam == hq, bit for bit (float addition commutes).
        masks = hq_mask + (1 - hq_token_only) * sam
        if self.use_stability_score:
            scores = self._stability(masks)
        if self.return_single_mask:
            num_tokens = torch.tensor(point_coords.shape[1], dtype=scores.dtype)
            masks, scores = self._select(masks, scores, num_tokens)
        if not self.upscale_masks:
            return scores, masks
        return self._postprocess(masks, orig_im_size), scores, masks


def export_hq_encoder(model, path: PathLike, *, opset: int = 17, external_data: Optional[bool] = None) -> Path:
    """Export the image encoder of an HQ-SAM ``model`` with both outputs (module docs) to ``path``."""
    import copy

    check_opset(opset)
    if not is_hq(model):
        raise ValueError("export_hq_encoder needs an HQ-SAM model")
    encoder = model.image_encoder
    params = list(encoder.parameters())
    if params and (params[0].dtype != torch.float32 or params[0].device.type != "cpu"):
        encoder = copy.deepcopy(encoder).float().cpu()
    wrapper = SamHQOnnxEncoder(model, encoder)
    img = wrapper.img_size
    example = torch.rand(1, 3, img, (img * 3) // 4) * 255.0
    metadata = {
        META_KIND: KIND_ENCODER,
        META_FAMILY: FAMILY_HQ,
        META_FORMAT: FORMAT_VERSION,
        META_OPSET: str(opset),
        META_IMG_SIZE: str(img),
        "anyseg.embedding_size": str(model.config.embedding_size),
        "anyseg.encoder": type(model.config.encoder).__name__,
        "anyseg.hq_vit_dim": str(int(model.mask_decoder.vit_dim)),
        "anyseg.pixel_mean": ",".join(f"{v:g}" for v in model.config.pixel_mean),
        "anyseg.pixel_std": ",".join(f"{v:g}" for v in model.config.pixel_std),
    }
    dynamic_axes = {"image": {0: "batch", 2: "height", 3: "width"}, "image_embeddings": {0: "batch"},
                    "interm_embeddings": {0: "batch"}}
    with _plain_eval(encoder), torch.no_grad():
        return export_graph(wrapper, (example,), path, opset=opset, input_names=HQ_ENCODER_INPUTS,
                            output_names=HQ_ENCODER_OUTPUTS, dynamic_axes=dynamic_axes, metadata=metadata,
                            external_data=external_data)


def export_hq_decoder(model, path: PathLike, *, opset: int = 17, return_single_mask: bool = False,
                      gelu_approximate: bool = False, use_stability_score: bool = False, fast: bool = False,
                      upscale_masks: bool = True, image_cache: bool = False) -> Path:
    """Export the prompt encoder + HQ mask decoder of an HQ-SAM ``model`` to ``path`` (module docs).

    Options as :func:`anyseg.export.decoder.export_decoder`; ``fast`` and ``image_cache`` raise ``ValueError``.
    """
    check_opset(opset)
    wrapper = SamHQOnnxDecoder(model, return_single_mask=return_single_mask, use_stability_score=use_stability_score,
                               gelu_approximate=gelu_approximate, fast=fast, upscale_masks=upscale_masks,
                               image_cache=image_cache)
    g = int(model.config.embedding_size)
    base = example_decoder_inputs(model)
    gen = torch.Generator().manual_seed(1)
    interm = torch.randn(1, g, g, int(model.mask_decoder.vit_dim), generator=gen)
    example = (base[0], interm) + base[1:5] + (torch.tensor([0.0]), base[5])
    inputs, outputs = HQ_DECODER_INPUTS, HQ_DECODER_OUTPUTS
    dynamic_axes = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}
    if upscale_masks:
        dynamic_axes["masks"] = {2: "height", 3: "width"}
    else:
        inputs, outputs, example = inputs[:-1], outputs[1:], example[:-1]
    metadata = {
        META_KIND: KIND_DECODER,
        META_FAMILY: FAMILY_HQ,
        META_FORMAT: FORMAT_VERSION,
        META_OPSET: str(opset),
        META_IMG_SIZE: str(wrapper.img_size),
        "anyseg.embedding_size": str(model.config.embedding_size),
        "anyseg.hq_vit_dim": str(int(model.mask_decoder.vit_dim)),
        "anyseg.return_single_mask": str(int(return_single_mask)),
        "anyseg.use_stability_score": str(int(use_stability_score)),
        "anyseg.gelu_approximate": str(int(gelu_approximate)),
        "anyseg.fast": "0",
        "anyseg.upscale_masks": str(int(upscale_masks)),
        "anyseg.image_cache": "0",
        "anyseg.num_masks": "1" if return_single_mask else "2",
    }
    with torch.no_grad():
        return export_graph(wrapper, example, path, opset=opset, input_names=inputs, output_names=outputs,
                            dynamic_axes=dynamic_axes, metadata=metadata, external_data=False)
