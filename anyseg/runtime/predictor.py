"""OnnxPredictor: SamPredictor's interface on exported ONNX graphs, without PyTorch.

Imports numpy, Pillow and onnxruntime only (plus the torch-free :mod:`anyseg.geometry` and
:mod:`anyseg.imageio`), so it runs where torch is not installed.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from ..geometry import boxes_to_model, coords_to_model, resized_shape
from ..imageio import load_image
from ..prompts import ImageNotSetError, check_boxes, check_mask_input, check_points
from .graphs import KIND_DECODER, KIND_ENCODER, GraphSession, open_graph

PathLike = Union[str, "os.PathLike[str]"]


class OnnxPredictor:
    """Encode an image with the ONNX encoder once, then decode prompts with the ONNX decoder.

    Args:
        encoder_path: graph from :func:`anyseg.export.export_encoder` (or ``anyseg export
            --encoder``); ``None`` for a decoder-only predictor fed by :meth:`set_image_embedding`.
        decoder_path: graph from :func:`anyseg.export.export_decoder` (all four masks, i.e. not
            ``return_single_mask``, for ``multimask_output=True``); the reference SAM ONNX decoder
            works too.
        providers: onnxruntime execution providers, e.g. ``["CPUExecutionProvider"]``
            (default: every local provider onnxruntime has, in its order of preference).
        sess_options: an optional ``onnxruntime.SessionOptions`` (threads, optimisation level).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a file that is not the
    expected graph.
    """

    def __init__(self, encoder_path: Optional[PathLike], decoder_path: PathLike,
                 providers: Optional[Sequence] = None, sess_options=None) -> None:
        self.encoder: Optional[GraphSession] = None
        if encoder_path is not None:
            self.encoder = open_graph(encoder_path, KIND_ENCODER, providers, sess_options)
        self.decoder = open_graph(decoder_path, KIND_DECODER, providers, sess_options)
        self.img_size = (self.encoder.meta_int("anyseg.img_size", 1024) if self.encoder is not None
                         else self.decoder.meta_int("anyseg.img_size", 1024))
        dec_size = self.decoder.meta_int("anyseg.img_size", self.img_size)
        if dec_size != self.img_size:
            raise ValueError(f"encoder and decoder graphs disagree on the input size: {self.img_size} vs {dec_size}")
        self.embedding_shape = tuple(self.decoder.session.get_inputs()[
            self.decoder.input_names.index("image_embeddings")].shape)
        self.num_masks = self.decoder.meta_int("anyseg.num_masks")
        self.mask_threshold = 0.0
        self.reset_image()

    # ----------------------------------------------------------------------------------------- image
    def reset_image(self) -> None:
        """Forget the current image and its embedding."""
        self.is_image_set = False
        self.features: Optional[np.ndarray] = None
        self.original_size: Optional[Tuple[int, int]] = None
        self.input_size: Optional[Tuple[int, int]] = None

    def transform_image(self, image: np.ndarray) -> np.ndarray:
        """``H x W x 3`` uint8 -> resized (PIL bilinear) so its long side is ``img_size``, as SamPredictor."""
        new_h, new_w = resized_shape(image.shape[0], image.shape[1], self.img_size)
        return np.array(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))

    def set_image(self, image, image_format: str = "RGB") -> None:
        """Encode an image: an ``H x W x 3`` uint8 array (RGB or BGR), a PIL image or a path."""
        if self.encoder is None:
            raise ValueError("this predictor has no encoder graph; use set_image_embedding(...)")
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        image = load_image(image, image_format=image_format)
        resized = self.transform_image(image)
        x = np.ascontiguousarray(resized.transpose(2, 0, 1)[None], dtype=np.float32)
        (embedding,) = self.encoder.run({"image": x})[:1]
        self._set(embedding, image.shape[:2])

    def set_image_embedding(self, embedding: np.ndarray, original_size: Tuple[int, int]) -> None:
        """Use a precomputed ``1 x 256 x 64 x 64`` embedding of an ``original_size`` (H, W) image."""
        emb = np.asarray(embedding, dtype=np.float32)
        if emb.ndim == 3:
            emb = emb[None]
        expected = tuple(d if isinstance(d, int) else -1 for d in self.embedding_shape)
        if emb.ndim != 4 or emb.shape[0] != 1 or any(e not in (-1, s) for e, s in zip(expected, emb.shape)):
            raise ValueError(f"expected an image embedding of shape {self.embedding_shape}, got {emb.shape}")
        size = tuple(int(v) for v in original_size)
        if len(size) != 2 or min(size) <= 0:
            raise ValueError(f"original_size must be (H, W) with positive sides, got {original_size!r}")
        self._set(emb, size)

    def _set(self, embedding: np.ndarray, original_size) -> None:
        self.reset_image()
        self.features = np.ascontiguousarray(embedding, dtype=np.float32)
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.input_size = resized_shape(self.original_size[0], self.original_size[1], self.img_size)
        self.is_image_set = True

    def get_image_embedding(self) -> np.ndarray:
        """The current image embedding ``1 x 256 x 64 x 64`` (float32)."""
        self._require_image()
        return self.features

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise ImageNotSetError("an image must be set with set_image(...) before predicting")

    # --------------------------------------------------------------------------------------- prompts
    def prompt_inputs(self, point_coords=None, point_labels=None, box=None) -> Tuple[np.ndarray, np.ndarray]:
        """Original-frame prompts -> the decoder's ``1 x N x 2`` model-frame coords and ``1 x N`` labels.

        Points come first, then the box corners (labels 2, 3) or, without a box, one padding
        point (0, 0) with label -1. No points and no box give ``N = 0``.
        """
        self._require_image()
        coords, labels = check_points(point_coords, point_labels)
        boxes = check_boxes(box)
        if boxes is not None and boxes.shape[0] != 1:
            raise ValueError(f"predict takes one box, got {boxes.shape[0]}")
        parts, part_labels = [], []
        if coords is not None:
            parts.append(coords_to_model(coords, self.original_size, self.img_size))
            part_labels.append(labels.astype(np.float32))
        if boxes is not None:
            parts.append(boxes_to_model(boxes, self.original_size, self.img_size).reshape(2, 2))
            part_labels.append(np.array([2.0, 3.0], dtype=np.float32))
        elif coords is not None:
            parts.append(np.zeros((1, 2), dtype=np.float32))
            part_labels.append(np.array([-1.0], dtype=np.float32))
        if not parts:
            return np.zeros((1, 0, 2), np.float32), np.zeros((1, 0), np.float32)
        return (np.concatenate(parts).astype(np.float32)[None],
                np.concatenate(part_labels).astype(np.float32)[None])

    def predict(
        self,
        point_coords: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        box: Optional[np.ndarray] = None,
        mask_input: Optional[np.ndarray] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predict masks for one object from prompts in original-image pixels (as SamPredictor.predict).

        Args:
            point_coords: ``N x 2`` XY points; point_labels: ``N`` labels, 1 foreground / 0 background.
            box: ``4`` or ``1 x 4`` XYXY box.
            mask_input: ``1 x 256 x 256`` low-res logits from a previous prediction.
            multimask_output: three masks (whole / part / sub-part) instead of one.
            return_logits: return unthresholded logits instead of boolean masks.
        Returns:
            masks ``k x H x W`` (bool, or float32 logits), scores ``k``, low-res logits ``k x 256 x 256``
            (k = 3 or 1). A decoder exported with ``return_single_mask`` gives its one chosen mask
            and requires ``multimask_output=False``.
        """
        coords, labels = self.prompt_inputs(point_coords, point_labels, box)
        side = 4 * int(self.features.shape[-1])
        if mask_input is not None:
            mask = check_mask_input(mask_input, side)
            mask, has_mask = mask[None], np.ones(1, np.float32)
        else:
            mask, has_mask = np.zeros((1, 1, side, side), np.float32), np.zeros(1, np.float32)
        if self.num_masks == 1 and multimask_output:
            raise ValueError("this decoder graph was exported with return_single_mask and gives one mask: "
                             "call predict(..., multimask_output=False)")
        masks, scores, low_res = self.decoder.run({
            "image_embeddings": self.features,
            "point_coords": coords,
            "point_labels": labels,
            "mask_input": mask,
            "has_mask_input": has_mask,
            "orig_im_size": np.array(self.original_size, dtype=np.float32),
        })[:3]
        if masks.shape[1] > 1:
            pick = slice(1, None) if multimask_output else slice(0, 1)
            masks, scores, low_res = masks[:, pick], scores[:, pick], low_res[:, pick]
        elif multimask_output:
            raise ValueError("this decoder graph gives one mask: call predict(..., multimask_output=False)")
        masks = masks[0] if return_logits else masks[0] > self.mask_threshold
        return masks, scores[0].astype(np.float32), low_res[0].astype(np.float32)
