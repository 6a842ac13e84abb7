"""SAM2ImagePredictor: encode an image (or a batch) once, then answer many prompts with SAM 2.

Same methods, arguments, defaults and return types as the reference ``sam2.sam2_image_predictor``
(spec/sam2.md section 5), so SAM 2 programs port by changing the import. Prompts of :meth:`predict` are
in original-image pixels (XY), or in [0, 1] with ``normalize_coords=False``; :meth:`predict_torch` takes
them in the model frame (the 1024 x 1024 square the image is squashed to, no padding).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import speed
from .masks import small_components
from .modeling.sam2 import Sam2, Sam2Features
from .prompts import ImageNotSetError

__all__ = ["SAM2ImagePredictor", "sam2_image_to_tensor"]


def sam2_image_to_tensor(image: np.ndarray, model: Sam2) -> torch.Tensor:
    """``H x W x 3`` uint8 RGB -> normalised ``3 x S x S`` float32 (spec 1: /255, bilinear antialiased
    resize of the float image to ``S x S``, mean/std)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).to(model.device).permute(2, 0, 1).float() / 255.0
    s = model.img_size
    x = F.interpolate(x[None], size=(s, s), mode="bilinear", align_corners=False, antialias=True)[0]
    return model.normalize(x)


def _as_rgb(image) -> np.ndarray:
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            from .imageio import load_image

            return load_image(image)
        return image
    from .imageio import load_image

    return load_image(image)


class SAM2ImagePredictor:
    """Computes SAM 2 image features once and decodes prompts against them.

    Args:
        sam_model: a :class:`~anyseg.modeling.sam2.Sam2` (see :func:`anyseg.load_model`).
        mask_threshold: logit threshold of the returned masks.
        max_hole_area: fill background components of at most this many low-res (256^2) pixels.
        max_sprinkle_area: remove foreground components of at most this many low-res pixels.
    """

    def __init__(self, sam_model: Sam2, mask_threshold: float = 0.0, max_hole_area: float = 0.0,
                 max_sprinkle_area: float = 0.0, **kwargs) -> None:
        if not isinstance(sam_model, Sam2):
            raise TypeError(f"SAM2ImagePredictor needs a SAM 2 model, got {type(sam_model).__name__} "
                            "(use anyseg.SamPredictor for SAM 1 models)")
        self.model = sam_model
        self.mask_threshold = float(mask_threshold)
        self.max_hole_area = float(max_hole_area)
        self.max_sprinkle_area = float(max_sprinkle_area)
        self.reset_predictor()

    @classmethod
    def from_pretrained(cls, model_id: str, **kwargs) -> "SAM2ImagePredictor":
        """Build from a Hugging Face hub id such as ``facebook/sam2.1-hiera-tiny`` (needs huggingface_hub)."""
        from .sam2_build import build_sam2_hf

        return cls(build_sam2_hf(model_id, **kwargs), **kwargs)

    # ------------------------------------------------------------------------------------- state
    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_predictor(self) -> None:
        """Forget the current image(s) and their features."""
        self._is_image_set = False
        self._features = None
        self._encoded: Optional[Sam2Features] = None
        self._orig_hw: List[Tuple[int, int]] = []
        self._is_batch = False
        self._fast_decoder = None  # (image index, anyseg.fast.sam2.Sam2FastDecoder) of the fast paths

    @property
    def is_image_set(self) -> bool:
        return self._is_image_set

    @property
    def original_size(self) -> Optional[Tuple[int, int]]:
        return self._orig_hw[-1] if self._orig_hw else None

    def _require_image(self) -> None:
        if not self._is_image_set:
            raise ImageNotSetError("an image must be set with set_image(...) before predicting")

    # ------------------------------------------------------------------------------------ images
    @torch.inference_mode()
    def set_image(self, image) -> None:
        """Encode one image: ``H x W x 3`` uint8 RGB array, a PIL image (or a path)."""
        self.reset_predictor()
        rgb = _as_rgb(image)
        self._orig_hw = [tuple(int(v) for v in rgb.shape[:2])]
        x = sam2_image_to_tensor(rgb, self.model)[None]
        self._set_features(self._encode(x))
        config = speed.get_config(self.model)
        if config is not None and config.fast_decoder:
            self.fast_decoder(0)  # the prompt-independent decoder work, once per image

    @torch.inference_mode()
    def set_image_batch(self, image_list: Sequence[np.ndarray]) -> None:
        """Encode several images as one batch (for :meth:`predict_batch`)."""
        self.reset_predictor()
        if not isinstance(image_list, (list, tuple)) or not image_list:
            raise ValueError("set_image_batch expects a non-empty list of H x W x 3 uint8 RGB images")
        rgbs = [_as_rgb(image) for image in image_list]
        self._orig_hw = [tuple(int(v) for v in rgb.shape[:2]) for rgb in rgbs]
        x = torch.stack([sam2_image_to_tensor(rgb, self.model) for rgb in rgbs])
        self._set_features(self._encode(x))
        self._is_batch = True

    def _encode(self, x: torch.Tensor) -> Sam2Features:
        """The model's image encoder, through its fast paths when :mod:`anyseg.speed` set any."""
        if getattr(self.model, "speed_runtime", None) is None:
            return self.model.encode_image(x)
        from .fast.sam2 import encode

        return encode(self.model, x)

    def set_features(self, features: Sam2Features, original_size: Tuple[int, int]) -> None:
        """Use features computed elsewhere (one image, ``1 x ...``) with its original size (H, W)."""
        self.reset_predictor()
        self._orig_hw = [(int(original_size[0]), int(original_size[1]))]
        self._set_features(features)

    def _set_features(self, features: Sam2Features) -> None:
        self._encoded = features
        self._fast_decoder = None
        embed = self.model.image_embedding(features)
        # The reference's layout, which some user code reads.
        self._features = {"image_embed": embed, "high_res_feats": list(features.high_res)}
        self._is_image_set = True

    def get_image_embedding(self) -> torch.Tensor:
        """The image embedding ``B x 256 x 64 x 64`` (vision feature + ``no_mem_embed``)."""
        self._require_image()
        return self._features["image_embed"]

    # ----------------------------------------------------------------------------------- prompts
    def predict(
        self,
        point_coords: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        box: Optional[np.ndarray] = None,
        mask_input: Optional[np.ndarray] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        normalize_coords: bool = True,
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for the current image.

        Args:
            point_coords: ``N x 2`` XY (or ``B x N x 2`` for B prompts); point_labels ``N`` (``B x N``),
                1 foreground, 0 background.
            box: ``4`` or ``B x 4`` XYXY.
            mask_input: ``1 x 256 x 256`` (or ``B x 1 x 256 x 256``) low-res logits of a previous call.
            normalize_coords: coordinates are pixels of the original image (True) or already in [0, 1].
        Returns:
            masks ``k x H x W`` float32 0/1 (logits with ``return_logits``), IoU ``k``, low-res logits
            ``k x 256 x 256`` clamped to [-32, 32]; a leading ``B`` for B prompts.
        """
        self._require_image()
        prompts = self._prep_prompts(point_coords, point_labels, box, mask_input, normalize_coords, img_idx=-1)
        masks, iou, low_res = self.predict_torch(*prompts, multimask_output=multimask_output,
                                                 return_logits=return_logits, img_idx=-1)
        return (masks.squeeze(0).float().cpu().numpy(), iou.squeeze(0).float().cpu().numpy(),
                low_res.squeeze(0).float().cpu().numpy())

    def predict_batch(
        self,
        point_coords_batch: Optional[List[np.ndarray]] = None,
        point_labels_batch: Optional[List[np.ndarray]] = None,
        box_batch: Optional[List[np.ndarray]] = None,
        mask_input_batch: Optional[List[np.ndarray]] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        normalize_coords: bool = True,
    ) -> Tuple[List[np.ndarray], List[np.ndarray], List[np.ndarray]]:
        """:meth:`predict` for each image of :meth:`set_image_batch`; per-image prompt lists (entries may
        be None). Returns lists of masks, IoUs and low-res logits, one entry per image."""
        self._require_image()
        if not self._is_batch:
            raise ValueError("predict_batch needs images set with set_image_batch(...)")
        n = len(self._orig_hw)
        for name, value in (("point_coords_batch", point_coords_batch), ("point_labels_batch", point_labels_batch),
                            ("box_batch", box_batch), ("mask_input_batch", mask_input_batch)):
            if value is not None and len(value) != n:
                raise ValueError(f"{name} must have one entry per image ({n}), got {len(value)}")
        all_masks, all_ious, all_low = [], [], []
        for i in range(n):
            prompts = self._prep_prompts(
                None if point_coords_batch is None else point_coords_batch[i],
                None if point_labels_batch is None else point_labels_batch[i],
                None if box_batch is None else box_batch[i],
                None if mask_input_batch is None else mask_input_batch[i],
                normalize_coords, img_idx=i)
            masks, iou, low_res = self.predict_torch(*prompts, multimask_output=multimask_output,
                                                     return_logits=return_logits, img_idx=i)
            all_masks.append(masks.squeeze(0).float().cpu().numpy())
            all_ious.append(iou.squeeze(0).float().cpu().numpy())
            all_low.append(low_res.squeeze(0).float().cpu().numpy())
        return all_masks, all_ious, all_low

    def _prep_prompts(self, point_coords, point_labels, box, mask_logits, normalize_coords, img_idx=-1):
        """Validate prompts and move them to the model frame: ``(coords B x N x 2, labels B x N, boxes
        B x 2 x 2, mask_input B x 1 x 256 x 256)``, each None when absent."""
        coords = labels = boxes = mask = None
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels must be given together "
                             "(labels: 1 = foreground, 0 = background)")
        if point_coords is not None:
            coords = torch.as_tensor(np.asarray(point_coords, dtype=np.float32), device=self.device)
            labels = torch.as_tensor(np.asarray(point_labels), device=self.device)
            if coords.ndim == 2:
                coords, labels = coords[None], labels[None]
            if coords.ndim != 3 or coords.shape[-1] != 2:
                raise ValueError(f"point_coords must be N x 2 or B x N x 2, got shape {tuple(coords.shape)}")
            if labels.shape != coords.shape[:2]:
                raise ValueError(f"point_labels must have shape {tuple(coords.shape[:2])} (one per point), "
                                 f"got {tuple(labels.shape)}")
            if not torch.isfinite(coords).all():
                raise ValueError("point_coords contain NaN or infinite values")
            labels = labels.to(torch.int32)
            coords = self.transform_coords(coords, normalize_coords, self._orig_hw[img_idx])
        if box is not None:
            boxes = torch.as_tensor(np.asarray(box, dtype=np.float32), device=self.device)
            if boxes.shape[-1] != 4 or boxes.ndim > 2:
                raise ValueError(f"box must be 4 or B x 4 (X0, Y0, X1, Y1), got shape {tuple(boxes.shape)}")
            if not torch.isfinite(boxes).all():
                raise ValueError("box contains NaN or infinite values")
            boxes = self.transform_coords(boxes.reshape(-1, 2, 2), normalize_coords, self._orig_hw[img_idx])
        if mask_logits is not None:
            mask = torch.as_tensor(np.asarray(mask_logits, dtype=np.float32), device=self.device)
            if mask.ndim == 3:
                mask = mask[None]
            side = self.model.sam_prompt_encoder.mask_input_size[0]
            if mask.ndim != 4 or tuple(mask.shape[1:]) != (1, side, side):
                raise ValueError(f"mask_input must be the 1 x {side} x {side} low-res logits of a previous "
                                 f"prediction (or B x 1 x {side} x {side}), got shape {tuple(mask.shape)}")
        return coords, labels, boxes, mask

    def transform_coords(self, coords: torch.Tensor, normalize: bool, orig_hw: Tuple[int, int]) -> torch.Tensor:
        """``... x 2`` XY in original pixels (or [0, 1] when not ``normalize``) -> model frame."""
        if normalize:
            h, w = orig_hw
            coords = coords.clone()
            coords[..., 0] = coords[..., 0] / w
            coords[..., 1] = coords[..., 1] / h
        return coords * self.model.img_size

    @torch.inference_mode()
    def predict_torch(
        self,
        point_coords: Optional[torch.Tensor],
        point_labels: Optional[torch.Tensor],
        boxes: Optional[torch.Tensor] = None,
        mask_input: Optional[torch.Tensor] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        img_idx: int = -1,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode prompts given in the model frame (``B x N x 2`` points, ``B x N`` labels, ``B x 2 x 2``
        box corners or ``B x 4`` boxes, ``B x 1 x 256 x 256`` mask logits) for image ``img_idx``.

        Returns masks ``B x k x H x W`` (bool, or logits), IoU ``B x k``, low-res logits clamped to
        [-32, 32].
        """
        self._require_image()
        points = None
        if point_coords is not None:
            points = (point_coords, point_labels)
        if boxes is not None:
            corners = boxes.reshape(-1, 2, 2)
            corner_labels = torch.tensor([[2, 3]], dtype=torch.int32, device=corners.device).repeat(corners.shape[0], 1)
            if points is not None:
                points = (torch.cat([corners, points[0]], dim=1), torch.cat([corner_labels, points[1]], dim=1))
            else:
                points = (corners, corner_labels)
        low_res, iou = self.decode_low_res(points, mask_input, multimask_output, img_idx)
        config = speed.get_config(self.model)
        threshold = None if return_logits else self.mask_threshold
        masks = self._postprocess(low_res, self._orig_hw[img_idx], threshold,
                                  fast=config is not None and config.fast_postprocess)
        low_res = torch.clamp(low_res, -32.0, 32.0)
        return masks, iou, low_res

    @torch.inference_mode()
    def decode_low_res(self, points: Optional[Tuple[torch.Tensor, torch.Tensor]], mask_input: Optional[torch.Tensor],
                       multimask_output: bool, img_idx: int = -1) -> Tuple[torch.Tensor, torch.Tensor]:
        """One decoder pass for ``B`` prompts against image ``img_idx``: model-frame ``points``
        (``B x N x 2`` XY with ``B x N`` labels, box corners labelled 2 and 3 first) and/or
        ``B x 1 x 256 x 256`` mask logits -> low-res logits ``B x k x 256 x 256`` (not clamped) and IoU
        ``B x k``, float32. Through the fast decoder when :mod:`anyseg.speed` switched it on."""
        self._require_image()
        features = self._encoded
        idx = img_idx % features.vision.shape[0]
        config = speed.get_config(self.model)
        if config is not None and config.fast_decoder:
            # A mask prompt goes in before the prompt encoder's last (1 x 1) layer: the fast decoder folds
            # that layer into its per-image cache.
            sparse, _ = self.model.embed_prompts(points, None)
            hidden = None
            if mask_input is not None:
                hidden = self.model.sam_prompt_encoder.mask_features(mask_input)
                b = max(sparse.shape[0], hidden.shape[0])
                sparse = sparse.expand(b, -1, -1)
                hidden = hidden.expand(b, -1, -1, -1)
            with speed.decoder_autocast(self.model):
                low_res, iou = self.fast_decoder(idx)(sparse, None, multimask_output, mask_hidden=hidden)
        else:
            sparse, dense = self.model.embed_prompts(points, mask_input)
            embed = self._features["image_embed"][idx : idx + 1]
            high_res = tuple(f[idx : idx + 1] for f in features.high_res)
            low_res, iou, _, _ = self.model.decode(embed, high_res, sparse, dense, multimask_output)
        return low_res.float(), iou.float()

    def fast_decoder(self, img_idx: int = 0):
        """The :class:`anyseg.fast.sam2.Sam2FastDecoder` for image ``img_idx`` of the current image(s),
        with its per-image work done (kept for the last image asked for)."""
        self._require_image()
        if self._fast_decoder is None or self._fast_decoder[0] != img_idx:
            from .fast.decoder import CPU_UPSCALE_CHUNK
            from .fast.sam2 import Sam2FastDecoder

            model = self.model
            prompt = model.sam_prompt_encoder
            chunk = {"upscale_chunk": CPU_UPSCALE_CHUNK} if self.device.type == "cpu" else {}
            decoder = Sam2FastDecoder(model.sam_mask_decoder, prompt.get_dense_pe(), prompt.no_mask_embed.weight,
                                      mask_projection=prompt.mask_projection, **chunk)
            features = self._encoded
            with torch.inference_mode(), speed.decoder_autocast(model):
                decoder.set_image(self._features["image_embed"][img_idx : img_idx + 1],
                                  high_res=tuple(f[img_idx : img_idx + 1] for f in features.high_res))
            self._fast_decoder = (img_idx, decoder)
        return self._fast_decoder[1]

    # Reference name of the model-frame entry point.
    _predict = predict_torch

    def postprocess_masks(self, low_res: torch.Tensor, orig_hw: Tuple[int, int]) -> torch.Tensor:
        """Low-res logits ``B x k x 256 x 256`` -> ``B x k x H x W`` (optional small-region clean-up,
        then bilinear straight to the original size)."""
        return self._postprocess(low_res, orig_hw)

    def _postprocess(self, low_res: torch.Tensor, orig_hw: Tuple[int, int], threshold: Optional[float] = None,
                     fast: bool = False) -> torch.Tensor:
        """:meth:`postprocess_masks`, then ``> threshold`` when given; ``fast``: the resize as one banded
        resampling (:meth:`anyseg.fast.resize.MaskResizer.direct`, the same values to rounding)."""
        masks = self._clean(low_res.float())
        if fast:
            from .fast.resize import get_direct_resizer

            return get_direct_resizer(masks.shape[-1], tuple(orig_hw))(masks, threshold)
        masks = F.interpolate(masks, tuple(orig_hw), mode="bilinear", align_corners=False)
        return masks if threshold is None else masks > threshold

    def _clean(self, masks: torch.Tensor) -> torch.Tensor:
        """The optional small-region clean-up of the low-res logits (``max_hole_area``,
        ``max_sprinkle_area``)."""
        if self.max_hole_area > 0 or self.max_sprinkle_area > 0:
            original = masks
            if self.max_hole_area > 0:
                holes = small_components(original <= self.mask_threshold, self.max_hole_area)
                masks = torch.where(holes, self.mask_threshold + 10.0, masks)
            if self.max_sprinkle_area > 0:
                sprinkles = small_components(original > self.mask_threshold, self.max_sprinkle_area)
                masks = torch.where(sprinkles, self.mask_threshold - 10.0, masks)
        return masks
