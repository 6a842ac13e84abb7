"""SamPredictor: encode one image once, then answer many prompts.

Same methods, arguments, shapes and semantics as the reference ``segment_anything.SamPredictor``,
so existing code works by changing the import. Prompts of :meth:`SamPredictor.predict` are in
original-image pixels (XY); those of :meth:`SamPredictor.predict_torch` are already in the model
frame (see :mod:`anyseg.geometry`).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from .geometry import boxes_to_model, boxes_to_model_torch, coords_to_model
from . import speed
from .fast.decoder import CPU_UPSCALE_CHUNK, FastDecoder
from .fast.resize import get_resizer
from .modeling.sam import Sam
from .prompts import ImageNotSetError, check_boxes, check_mask_input, check_points
from .speed import get_config
from .utils.transforms import ResizeLongestSide


class Prediction(NamedTuple):
    """Masks for a group of objects prompted together on one image.

    masks: ``B x k x H x W`` bool (or float logits with ``return_logits``), original frame.
    scores: ``B x k`` predicted IoU. low_res_logits: ``B x k x 256 x 256``.
    """

    masks: np.ndarray
    scores: np.ndarray
    low_res_logits: np.ndarray


class SamPredictor:
    """Computes the image embedding once and decodes prompts against it."""

    def __init__(self, sam_model: Sam) -> None:
        self.model = sam_model
        #: The reference's resize helper for this model's input size: ``transform.apply_coords`` /
        #: ``apply_boxes_torch`` map original-image prompts to the frame :meth:`predict_torch` takes.
        self.transform = ResizeLongestSide(sam_model.img_size)
        self.reset_image()

    # ----------------------------------------------------------------------------------------- image
    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_image(self) -> None:
        """Forget the current image and its embedding."""
        self.is_image_set = False
        self.features: Optional[torch.Tensor] = None
        #: HQ-SAM only: the encoder's intermediate feature ``1 x g x g x D`` and the HQ feature made from it.
        self.interm_features: Optional[torch.Tensor] = None
        self._hq_features: Optional[torch.Tensor] = None
        self.orig_h = self.orig_w = self.input_h = self.input_w = None
        self.original_size: Optional[Tuple[int, int]] = None
        self.input_size: Optional[Tuple[int, int]] = None
        self._fast_decoder = None  # per-image cache of the fast decoder (anyseg.speed)

    def transform_image(self, image: np.ndarray) -> np.ndarray:
        """``H x W x 3`` uint8 -> the image resized (PIL bilinear) so its long side is the model's input."""
        return self.transform.apply_image(image)

    @torch.inference_mode()
    def set_image(self, image, image_format: str = "RGB") -> None:
        """Encode an image: an ``H x W x 3`` uint8 array (RGB or BGR), a PIL image or a path."""
        from .imageio import load_image

        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        image = load_image(image, image_format=image_format)
        resized = self.transform_image(image)
        tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        self.set_torch_image(tensor, image.shape[:2])

    @torch.inference_mode()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: Tuple[int, ...]) -> None:
        """Encode a ``1 x 3 x h x w`` image already resized so its long side is the model's input size."""
        s = self.model.img_size
        if (not isinstance(transformed_image, torch.Tensor) or transformed_image.ndim != 4
                or transformed_image.shape[1] != 3 or max(transformed_image.shape[2:]) != s):
            shape = tuple(getattr(transformed_image, "shape", ()))
            raise ValueError(f"set_torch_image expects a B x 3 x h x w tensor with long side {s}, got {shape}")
        self.reset_image()
        self.original_size = (int(original_image_size[0]), int(original_image_size[1]))
        self.input_size = (int(transformed_image.shape[-2]), int(transformed_image.shape[-1]))
        self.orig_h, self.orig_w = self.original_size
        self.input_h, self.input_w = self.input_size
        x = self.model.preprocess(transformed_image.to(self.device, torch.float32))
        if getattr(self.model, "is_hq", False):
            # HQ-SAM's decoder also reads an early encoder feature, which the speed runtime's encoder copies
            # do not hand over: the model's own encoder runs (with fused attention when that is on).
            with speed.ieee_float32(x.device):
                self.features, self.interm_features = self.model.encode_image(
                    x.to(next(self.model.parameters()).dtype), return_interm=True)
        else:
            self.features = speed.encode(self.model, x)  # the faithful encoder unless fast paths are on
        self.is_image_set = True

    def set_embedding(self, embedding: torch.Tensor, input_size: Tuple[int, int],
                      original_size: Tuple[int, int], interm_features: Optional[torch.Tensor] = None) -> None:
        """Use an image embedding computed elsewhere (e.g. by :func:`anyseg.speed.encode_images`):
        ``1 x 256 x g x g``, with the resized ``input_size`` (h, w) and the ``original_size`` (H, W).
        An HQ-SAM model also needs the encoder's ``interm_features`` (``1 x g x g x D``)."""
        g = self.model.config.embedding_size
        if (not isinstance(embedding, torch.Tensor) or embedding.ndim != 4 or embedding.shape[0] != 1
                or tuple(embedding.shape[2:]) != (g, g)):
            raise ValueError(f"expected a 1 x C x {g} x {g} embedding, got {tuple(getattr(embedding, 'shape', ()))}")
        self.reset_image()
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.orig_h, self.orig_w = self.original_size
        self.input_h, self.input_w = self.input_size
        self.features = embedding.to(self.device)
        if interm_features is not None:
            self.interm_features = interm_features.to(self.device)
        self.is_image_set = True

    def get_image_embedding(self) -> torch.Tensor:
        """The current image embedding ``1 x 256 x 64 x 64``."""
        self._require_image()
        return self.features

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise ImageNotSetError("an image must be set with set_image(...) before predicting")

    # --------------------------------------------------------------------------------------- prompts
    def predict(
        self,
        point_coords: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        box: Optional[np.ndarray] = None,
        mask_input: Optional[np.ndarray] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        hq_token_only: bool = False,
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predict masks for one object from prompts in original-image pixels.

        Args:
            point_coords: ``N x 2`` XY points; point_labels: ``N`` labels, 1 foreground / 0 background.
            box: ``4`` or ``1 x 4`` XYXY box.
            mask_input: ``1 x 256 x 256`` low-res logits from a previous prediction.
            multimask_output: three masks (whole / part / sub-part) instead of one.
            return_logits: return unthresholded logits instead of boolean masks.
            hq_token_only: HQ-SAM only: the HQ token's mask alone instead of the best SAM mask plus it.
        Returns:
            masks ``k x H x W``, scores ``k``, low-res logits ``k x 256 x 256`` (k = 3 or 1; always 1
            for HQ-SAM, which returns one mask per prompt).
        """
        self._require_image()
        coords, labels = check_points(point_coords, point_labels)
        boxes = check_boxes(box)
        if boxes is not None and boxes.shape[0] != 1:
            raise ValueError(f"predict takes one box; use predict_batch for {boxes.shape[0]} boxes")
        coords_t = labels_t = box_t = mask_t = None
        if coords is not None:
            coords_t = torch.as_tensor(coords_to_model(coords, self.original_size, self.model.img_size),
                                       device=self.device)[None]
            labels_t = torch.as_tensor(labels, dtype=torch.int64, device=self.device)[None]
        if boxes is not None:
            box_t = torch.as_tensor(boxes_to_model(boxes, self.original_size, self.model.img_size),
                                    device=self.device)
        if mask_input is not None:
            mask_t = torch.as_tensor(self._check_mask_input(mask_input), device=self.device)[None]
        masks, scores, low_res = self.predict_torch(coords_t, labels_t, box_t, mask_t, multimask_output,
                                                    return_logits=return_logits, hq_token_only=hq_token_only)
        return (masks[0].detach().cpu().numpy(), scores[0].float().detach().cpu().numpy(),
                low_res[0].float().detach().cpu().numpy())

    def _check_mask_input(self, mask_input) -> np.ndarray:
        return check_mask_input(mask_input, self.model.prompt_encoder.mask_input_size[0])

    @torch.inference_mode()
    @speed.ieee_float32_method
    def predict_torch(
        self,
        point_coords: Optional[torch.Tensor],
        point_labels: Optional[torch.Tensor],
        boxes: Optional[torch.Tensor] = None,
        mask_input: Optional[torch.Tensor] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        hq_token_only: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Predict masks for ``B`` prompts given in the model frame.

        Args:
            point_coords: ``B x N x 2`` model-frame XY; point_labels ``B x N``.
            boxes: ``B x 4`` model-frame XYXY. mask_input: ``B x 1 x 256 x 256`` low-res logits.
            hq_token_only: HQ-SAM only (see :meth:`predict`); HQ-SAM returns k = 1.
        Returns:
            masks ``B x k x H x W`` (bool, or logits with ``return_logits``), IoU ``B x k``,
            low-res logits ``B x k x 256 x 256``.
        """
        self._require_image()
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels must be given together")
        points = (point_coords, point_labels) if point_coords is not None else None
        config = get_config(self.model)
        hq = getattr(self.model, "is_hq", False)
        if hq_token_only and not hq:
            raise ValueError("hq_token_only needs an HQ-SAM model (this one has no HQ token)")
        if hq:
            # HQ-SAM takes the faithful decoder under every speed preset (the fast decoder has no HQ token).
            sparse, dense = self.model.embed_prompts(points=points, boxes=boxes, masks=mask_input)
            low_res, iou = self.model.decode(self.features, sparse.to(self.features.dtype),
                                             dense.to(self.features.dtype), multimask_output,
                                             hq_features=self.hq_features(), hq_token_only=hq_token_only)
        elif config is not None and config.fast_decoder:
            # A mask prompt goes in before the prompt encoder's last (1 x 1) layer: the fast decoder folds
            # that layer into its per-image cache.
            sparse, _ = self.model.embed_prompts(points=points, boxes=boxes)
            hidden = None
            if mask_input is not None:
                hidden = self.model.prompt_encoder.mask_features(mask_input).to(self.features.dtype)
                if sparse.shape[0] != hidden.shape[0]:
                    sparse = sparse.expand(hidden.shape[0], -1, -1)
            with speed.decoder_autocast(self.model):
                low_res, iou = self.fast_decoder()(sparse.to(self.features.dtype), None, multimask_output,
                                                   mask_hidden=hidden)
        else:
            sparse, dense = self.model.embed_prompts(points=points, boxes=boxes, masks=mask_input)
            low_res, iou = self.model.decode(self.features, sparse.to(self.features.dtype),
                                             dense.to(self.features.dtype), multimask_output)
        low_res = low_res.float()
        threshold = None if return_logits else self.model.mask_threshold
        if config is not None and config.fast_postprocess:
            resizer = get_resizer(low_res.shape[-1], self.model.img_size, self.input_size, self.original_size)
            masks = resizer(low_res, threshold)
        else:
            masks = self.model.postprocess_masks(low_res, self.input_size, self.original_size)
            if threshold is not None:
                masks = masks > threshold
        return masks, iou.float(), low_res

    def hq_features(self) -> torch.Tensor:
        """HQ-SAM: the prompt-independent HQ feature ``1 x 32 x 256 x 256`` of the current image (cached)."""
        self._require_image()
        if self._hq_features is None:
            if self.interm_features is None:
                raise ValueError("HQ-SAM needs the encoder's intermediate feature: set the image with set_image, "
                                 "or pass interm_features to set_embedding")
            self._hq_features = self.model.mask_decoder.hq_features(self.features, self.interm_features)
        return self._hq_features

    def fast_decoder(self):
        """The :class:`anyseg.fast.FastDecoder` for the current image (built on first use)."""
        self._require_image()
        if self._fast_decoder is None:
            model = self.model
            chunk = {"upscale_chunk": CPU_UPSCALE_CHUNK} if self.features.device.type == "cpu" else {}
            self._fast_decoder = FastDecoder(model.mask_decoder, model.prompt_encoder.get_dense_pe(),
                                             model.prompt_encoder.no_mask_embed.weight,
                                             mask_projection=model.prompt_encoder.mask_projection, **chunk)
            with speed.decoder_autocast(model):
                self._fast_decoder.set_image(self.features)
        return self._fast_decoder

    def predict_batch(
        self,
        boxes: Optional[np.ndarray] = None,
        point_coords: Optional[Sequence[np.ndarray]] = None,
        point_labels: Optional[Sequence[np.ndarray]] = None,
        multimask_output: bool = False,
        return_logits: bool = False,
        hq_token_only: bool = False,
    ) -> Prediction:
        """Prompt many objects on the current image at once (original-image pixels).

        Args:
            boxes: ``B x 4`` XYXY, one box per object (or None).
            point_coords: a list of ``N_i x 2`` arrays, one per object (ragged: N_i may differ);
                point_labels: the matching list of ``N_i`` label arrays.
        Objects with the same number of points are decoded together in one batch, so every object
        gets exactly the masks a separate :meth:`predict` call would give.
        Returns:
            :class:`Prediction` with ``B x k x H x W`` masks, ``B x k`` scores, ``B x k x 256 x 256`` logits.
        """
        self._require_image()
        checked_boxes = check_boxes(boxes) if boxes is not None else None
        if point_coords is None and point_labels is not None:
            raise ValueError("point_labels were given without point_coords")
        if point_coords is not None:
            if point_labels is None or len(point_labels) != len(point_coords):
                raise ValueError("expected one point_labels array per point_coords array")
            objects = [check_points(c, l) for c, l in zip(point_coords, point_labels)]
        else:
            objects = []
        n = len(objects) if objects else (0 if checked_boxes is None else checked_boxes.shape[0])
        if checked_boxes is not None and objects and checked_boxes.shape[0] != len(objects):
            raise ValueError(f"{checked_boxes.shape[0]} boxes but {len(objects)} point lists: give one of each per object")
        if n == 0:
            raise ValueError("predict_batch needs boxes and/or point lists for at least one object")

        groups: dict = {}
        for i in range(n):
            n_points = objects[i][0].shape[0] if objects else 0
            groups.setdefault(n_points, []).append(i)
        results: List[Optional[Tuple[torch.Tensor, ...]]] = [None] * n
        for n_points, idx in groups.items():
            coords_t = labels_t = box_t = None
            if n_points:
                coords = np.stack([objects[i][0] for i in idx])
                labels = np.stack([objects[i][1] for i in idx])
                coords_t = torch.as_tensor(coords_to_model(coords, self.original_size, self.model.img_size),
                                           device=self.device)
                labels_t = torch.as_tensor(labels, device=self.device)
            if checked_boxes is not None:
                box_t = torch.as_tensor(boxes_to_model(checked_boxes[idx], self.original_size,
                                                       self.model.img_size), device=self.device)
            if coords_t is None and box_t is None:
                raise ValueError("every object needs at least one point or a box")
            out = self.predict_torch(coords_t, labels_t, box_t, None, multimask_output, return_logits,
                                     hq_token_only=hq_token_only)
            for j, i in enumerate(idx):
                results[i] = tuple(t[j] for t in out)
        masks, scores, low_res = (torch.stack([r[k] for r in results]).cpu().numpy() for k in range(3))
        return Prediction(masks, scores, low_res)

    def transform_boxes_torch(self, boxes: torch.Tensor) -> torch.Tensor:
        """Original-frame ``B x 4`` boxes -> model frame, for use with :meth:`predict_torch`."""
        self._require_image()
        return boxes_to_model_torch(boxes, self.original_size, self.model.img_size)
