"""OnnxPredictor: SamPredictor's interface on exported ONNX graphs (SAM or SAM 2), without PyTorch.

Imports numpy, Pillow and onnxruntime only (plus the torch-free :mod:`anyseg.geometry` and
:mod:`anyseg.imageio`), so it runs where torch is not installed. The model family comes from the
graphs (:func:`~.graphs.open_graph`); what differs between families is in :mod:`.families`.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

from ..imageio import load_image
from ..prompts import ImageNotSetError, check_boxes, check_mask_input, check_points
from .families import FAMILIES
from .graphs import FAMILY_HQ, FAMILY_NAMES, KIND_DECODER, KIND_ENCODER, GraphError, GraphSession, open_graph

PathLike = Union[str, "os.PathLike[str]"]


class OnnxPredictor:
    """Encode an image with the ONNX encoder once, then decode prompts with the ONNX decoder.

    Runs the graphs of SAM 1, SAM 2 and HQ-SAM models alike (``family``: ``"sam"``, ``"sam2"``, ``"sam_hq"``;
    the two graphs must agree). HQ-SAM: one mask per prompt, ``predict(..., hq_token_only=...)``.
    For SAM 2 it does :class:`~anyseg.sam2_predictor.SAM2ImagePredictor`'s preprocessing (the image
    squashed to 1024 x 1024 by an antialiased bilinear resize, torch's arithmetic in numpy) and prompt
    layout, and the decoder graph applies its dynamic multimask fallback for ``multimask_output=False``.

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
        if self.encoder is not None and self.encoder.family != self.decoder.family:
            raise GraphError(f"the encoder graph is {FAMILY_NAMES[self.encoder.family]}'s and the decoder graph "
                             f"{FAMILY_NAMES[self.decoder.family]}'s: export both from the same model")
        #: ``"sam"`` or ``"sam2"``, from the graphs.
        self.family = self.decoder.family
        self.img_size = (self.encoder.meta_int("anyseg.img_size", 1024) if self.encoder is not None
                         else self.decoder.meta_int("anyseg.img_size", 1024))
        dec_size = self.decoder.meta_int("anyseg.img_size", self.img_size)
        if dec_size != self.img_size:
            raise ValueError(f"encoder and decoder graphs disagree on the input size: {self.img_size} vs {dec_size}")
        self._family = FAMILIES[self.family](self.img_size, self.encoder)
        self.embedding_shape = self.decoder.input_shape("image_embeddings")
        self.num_masks = self.decoder.meta_int("anyseg.num_masks")
        self.mask_threshold = 0.0
        self.reset_image()

    # ----------------------------------------------------------------------------------------- image
    def reset_image(self) -> None:
        """Forget the current image and its embedding."""
        self.is_image_set = False
        self.features: Optional[np.ndarray] = None
        self._image_feeds: Dict[str, np.ndarray] = {}
        self.original_size: Optional[Tuple[int, int]] = None
        self.input_size: Optional[Tuple[int, int]] = None

    def transform_image(self, image: np.ndarray) -> np.ndarray:
        """``H x W x 3`` uint8 RGB -> the resized image: SAM 1 ``h x w x 3`` uint8, the long side
        ``img_size`` (PIL bilinear, as SamPredictor); SAM 2 ``S x S x 3`` float32 in [0, 1] (antialiased
        bilinear, as SAM2ImagePredictor)."""
        return self._family.resize(image)

    def encoder_input(self, image: np.ndarray) -> np.ndarray:
        """``H x W x 3`` uint8 RGB -> what the encoder graph takes (``1 x 3 x h x w`` float32: SAM 1 the
        resized image's values 0..255, SAM 2 the normalised ``S x S`` model input)."""
        return self._family.encoder_input(image)

    def set_image(self, image, image_format: str = "RGB") -> None:
        """Encode an image: an ``H x W x 3`` uint8 array (RGB or BGR), a PIL image or a path."""
        if self.encoder is None:
            raise ValueError("this predictor has no encoder graph; use set_image_embedding(...)")
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        image = load_image(image, image_format=image_format)
        outputs = self.encoder.run({"image": self.encoder_input(image)})
        names = ("image_embeddings",) + self._family.extra_features
        self._set(dict(zip(names, outputs)), image.shape[:2])

    def set_image_embedding(self, embedding: np.ndarray, original_size: Tuple[int, int],
                            high_res_feats: Optional[Sequence[np.ndarray]] = None,
                            interm_embeddings: Optional[np.ndarray] = None) -> None:
        """Use a precomputed ``1 x 256 x 64 x 64`` embedding of an ``original_size`` (H, W) image.

        SAM 2 also needs the image's two high-res feature maps, ``high_res_feats`` =
        ``(1 x 32 x 256 x 256, 1 x 64 x 128 x 128)`` (the encoder graph's other outputs, or
        :meth:`get_high_res_features` of another predictor); HQ-SAM the encoder's early feature
        ``interm_embeddings`` (``1 x 64 x 64 x D``, :meth:`get_interm_embeddings`); SAM 1 takes none.
        """
        names = self._family.extra_features
        if self.family == FAMILY_HQ:
            if high_res_feats is not None:
                raise ValueError("high_res_feats are for SAM 2; an HQ-SAM decoder takes interm_embeddings")
            if interm_embeddings is None:
                raise ValueError("an HQ-SAM decoder also needs the image's early encoder feature: "
                                 "interm_embeddings (1 x 64 x 64 x D, the encoder graph's second output)")
            given = (interm_embeddings,)
        elif interm_embeddings is not None:
            raise ValueError(f"interm_embeddings are for HQ-SAM; a {FAMILY_NAMES[self.family]} decoder "
                             "does not take them")
        else:
            given = () if high_res_feats is None else tuple(high_res_feats)
        if len(given) != len(names):
            if names:
                raise ValueError(f"a {FAMILY_NAMES[self.family]} decoder also needs the image's high-res features: "
                                 f"high_res_feats=({', '.join(names)}), got {len(given)} arrays")
            raise ValueError(f"a {FAMILY_NAMES[self.family]} decoder takes the image embedding only; "
                             "high_res_feats are for SAM 2")
        feeds = {}
        for name, value in zip(("image_embeddings",) + names, (embedding,) + given):
            arr = np.asarray(value, dtype=np.float32)
            if arr.ndim == 3:
                arr = arr[None]
            shape = self.decoder.input_shape(name)
            expected = tuple(d if isinstance(d, int) else -1 for d in shape)
            if arr.ndim != 4 or arr.shape[0] != 1 or any(e not in (-1, s) for e, s in zip(expected, arr.shape)):
                what = "an image embedding" if name == "image_embeddings" else f"{name}"
                raise ValueError(f"expected {what} of shape {shape}, got {arr.shape}")
            feeds[name] = arr
        size = tuple(int(v) for v in original_size)
        if len(size) != 2 or min(size) <= 0:
            raise ValueError(f"original_size must be (H, W) with positive sides, got {original_size!r}")
        self._set(feeds, size)

    def _set(self, feeds: Dict[str, np.ndarray], original_size) -> None:
        self.reset_image()
        self._image_feeds = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feeds.items()}
        self.features = self._image_feeds["image_embeddings"]
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.input_size = self._family.input_size(self.original_size)
        self.is_image_set = True

    def get_image_embedding(self) -> np.ndarray:
        """The current image embedding ``1 x 256 x 64 x 64`` (float32; SAM 2: with ``no_mem_embed``)."""
        self._require_image()
        return self.features

    def get_high_res_features(self) -> Tuple[np.ndarray, ...]:
        """SAM 2: the current image's ``(1 x 32 x 256 x 256, 1 x 64 x 128 x 128)`` features (SAM 1: ``()``)."""
        self._require_image()
        return tuple(self._image_feeds[name] for name in self._family.extra_features)

    def get_interm_embeddings(self) -> np.ndarray:
        """HQ-SAM: the current image's early encoder feature ``1 x 64 x 64 x D`` (channels last)."""
        self._require_image()
        if self.family != FAMILY_HQ:
            raise ValueError(f"a {FAMILY_NAMES[self.family]} model has no early feature (HQ-SAM only)")
        return self._image_feeds["interm_embeddings"]

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise ImageNotSetError("an image must be set with set_image(...) before predicting")

    # --------------------------------------------------------------------------------------- prompts
    def prompt_inputs(self, point_coords=None, point_labels=None, box=None,
                      normalize_coords: bool = True) -> Tuple[np.ndarray, np.ndarray]:
        """Original-frame prompts -> the decoder's ``1 x N x 2`` model-frame coords and ``1 x N`` labels.

        SAM 1: points first, then the box corners (labels 2, 3) or, without a box, one padding point
        (0, 0) with label -1. SAM 2: the box corners first, then the points, then always the padding
        point. No points and no box give ``N = 0``. ``normalize_coords=False`` (SAM 2 only): the
        prompts are in [0, 1] of the image's width and height, not in pixels.
        """
        self._require_image()
        coords, labels = check_points(point_coords, point_labels)
        boxes = check_boxes(box)
        if boxes is not None and boxes.shape[0] != 1:
            raise ValueError(f"predict takes one box, got {boxes.shape[0]}")
        parts, part_labels = self._family.prompt_inputs(coords, labels, boxes, self.original_size,
                                                        normalize_coords)
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
        normalize_coords: bool = True,
        hq_token_only: bool = False,
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predict masks for one object from prompts in original-image pixels (as SamPredictor.predict).

        Args:
            point_coords: ``N x 2`` XY points; point_labels: ``N`` labels, 1 foreground / 0 background.
            box: ``4`` or ``1 x 4`` XYXY box.
            mask_input: ``1 x 256 x 256`` low-res logits from a previous prediction.
            multimask_output: three masks (whole / part / sub-part) instead of one.
            return_logits: return unthresholded logits instead of boolean masks.
            normalize_coords: SAM 2 only: False when the prompts are given in [0, 1] (as
                SAM2ImagePredictor's argument).
            hq_token_only: HQ-SAM only: the HQ mask alone instead of SAM mask + HQ mask.
        Returns:
            masks ``k x H x W`` (bool, or float32 logits), scores ``k``, low-res logits ``k x 256 x 256``
            (k = 3 or 1; SAM 2's clamped to [-32, 32], as SAM2ImagePredictor returns them). A decoder
            exported with ``return_single_mask`` gives its one chosen mask and requires
            ``multimask_output=False``. (SAM2ImagePredictor returns float 0/1 masks; this class returns
            bool masks for both families.) HQ-SAM gives one mask (k = 1) in both modes, as SamPredictor.
        """
        hq = self.family == FAMILY_HQ
        if hq_token_only and not hq:
            raise ValueError("hq_token_only needs an HQ-SAM model (these graphs have no HQ token)")
        coords, labels = self.prompt_inputs(point_coords, point_labels, box, normalize_coords)
        side = 4 * int(self.features.shape[-1])
        if mask_input is not None:
            mask = check_mask_input(mask_input, side)
            mask, has_mask = mask[None], np.ones(1, np.float32)
        else:
            mask, has_mask = np.zeros((1, 1, side, side), np.float32), np.zeros(1, np.float32)
        if self.num_masks == 1 and multimask_output:
            raise ValueError("this decoder graph was exported with return_single_mask and gives one mask: "
                             "call predict(..., multimask_output=False)")
        extra = {"hq_token_only": np.array([1.0 if hq_token_only else 0.0], np.float32)} if hq else {}
        masks, scores, low_res = self.decoder.run({
            **self._image_feeds,
            **extra,
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
