"""The one seam between user surfaces (CLI, server, evaluation) and the image models of every family.

A surface never asks which model it runs. It calls :func:`make_predictor` on a loaded model and talks
to the :class:`ImagePredictor` it gets back: set an image (encode it once), decode prompts given in
original-image pixels into masks, scores and low-res logits, hand the encoded image to a cache and take
it back, say the model's mask resolution, reset. Which family a model belongs to is decided here, in
:func:`model_family`, and nowhere else.

The predictors returned are the reference classes themselves, extended only where the surfaces need a
common convention: :class:`SamSurfacePredictor` *is a* :class:`~anyseg.SamPredictor` and
:class:`Sam2SurfacePredictor` *is a* :class:`~anyseg.sam2_predictor.SAM2ImagePredictor`, so their own
reference methods (``predict``, ``predict_torch``, ``get_image_embedding``, ...) keep their arguments
and return types; the protocol's methods are added beside them under other names (``decode`` returns
bool masks for both families, although SAM 2's ``predict`` returns float 0/1 masks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, NamedTuple, Optional, Protocol, Tuple, runtime_checkable

import numpy as np
import torch

from .geometry import boxes_to_model, coords_to_model
from .modeling.sam import Sam
from .modeling.sam2 import Sam2, Sam2Features
from .modeling.sam3 import Sam3
from .predictor import SamPredictor
from .prompts import check_boxes, check_mask_input, check_points
from .sam2_predictor import SAM2ImagePredictor

__all__ = ["FAMILY_NAMES", "Decoded", "EncodedImage", "ImagePredictor", "Sam2SurfacePredictor", "SamSurfacePredictor",
           "UnsupportedByModel", "apply_speed", "check_prompt_batch", "make_predictor", "model_family"]


class UnsupportedByModel(ValueError, NotImplementedError):
    """A surface asked a model family for something that family does not do (yet)."""


class Decoded(NamedTuple):
    """Masks for one object (``k x ...``) or a batch of objects (``B x k x ...``), original-image frame.

    masks: ``k x H x W`` bool (float logits when asked for ``return_logits``).
    scores: ``k`` predicted IoU. low_res_logits: ``k x s x s`` (``s`` = :attr:`ImagePredictor.mask_input_size`),
    what a later call takes back as ``mask_input`` to refine the object.
    """

    masks: np.ndarray
    scores: np.ndarray
    low_res_logits: np.ndarray


@dataclass(frozen=True)
class EncodedImage:
    """An encoded image as plain float32 arrays, for a cache (e.g. the server's), to decode later
    without running the image encoder again.

    embedding: ``1 x C x g x g``, the decoder's image embedding (what ``get_image_embedding`` returns).
    state: whatever else the family's decoder needs, in a family-specific order (empty for SAM 1; HQ-SAM:
        the encoder's intermediate feature; SAM 2: the raw vision feature, its position encoding and the
        high-resolution features).
    original_size: ``(H, W)`` of the image. input_size: ``(h, w)``, the image's extent in the model frame
        (SAM 1: long side = the model's input size; SAM 2: the whole ``S x S`` square).
    """

    embedding: np.ndarray
    state: Tuple[np.ndarray, ...]
    original_size: Tuple[int, int]
    input_size: Tuple[int, int]

    @property
    def nbytes(self) -> int:
        return int(self.embedding.nbytes + sum(a.nbytes for a in self.state))


@runtime_checkable
class ImagePredictor(Protocol):
    """What every surface needs from an image model, whatever its family.

    Coordinates are pixels of the original image, X to the right, Y down. Points are ``N x 2`` XY with
    labels 1 (on the object) / 0 (background); a box is XYXY; ``mask_input`` is the ``1 x s x s`` low-res
    logits of an earlier answer for the same object. Family-specific options (SAM 2's
    ``normalize_coords``, ...) pass through ``decode``'s keyword arguments; a family refuses options it
    does not know with a ``TypeError``. Bad prompts raise ``ValueError`` saying what was expected; a
    decode before an image is set raises :class:`~anyseg.prompts.ImageNotSetError`.

    Attributes:
        model: the loaded model. family: ``"sam"`` (SAM 1, MobileSAM) or ``"sam2"`` (SAM 2 / 2.1).
        is_image_set, original_size ``(H, W)`` and input_size ``(h, w)`` of the current image.
        mask_input_size: ``s``, the side of the low-res logits (256 for the public models).
        embedding_shape: ``(1, C, g, g)`` of the image embedding.
    """

    model: Any
    family: str
    is_image_set: bool
    original_size: Optional[Tuple[int, int]]
    input_size: Optional[Tuple[int, int]]

    @property
    def mask_input_size(self) -> int: ...

    @property
    def embedding_shape(self) -> Tuple[int, int, int, int]: ...

    def set_image(self, image) -> None:
        """Encode an image: ``H x W x 3`` uint8 RGB array, PIL image or path."""

    def decode(self, point_coords=None, point_labels=None, box=None, mask_input=None,
               multimask_output: bool = True, return_logits: bool = False, **options) -> Decoded:
        """One object: ``k x H x W`` bool masks, ``k`` scores, ``k x s x s`` logits (k = 3 or 1)."""

    def decode_batch(self, point_coords=None, point_labels=None, boxes=None, mask_input=None,
                     multimask_output: bool = True, return_logits: bool = False, **options) -> Decoded:
        """``B`` objects at once (see :func:`check_prompt_batch`): ``B x k x H x W`` masks, ``B x k``
        scores, ``B x k x s x s`` logits; each object as :meth:`decode` would answer it alone."""

    def encoded(self) -> EncodedImage:
        """The current image's encoding as arrays (for a cache)."""

    def set_encoded(self, encoded: EncodedImage, image: Optional[np.ndarray] = None) -> None:
        """Use an :class:`EncodedImage` instead of encoding. With ``image`` (its ``H x W x 3`` RGB pixels), a
        later ``set_image`` of exactly those pixels reuses the encoding."""

    def mask_generator(self, **params) -> Any:
        """The segment-everything generator over this predictor (``generate(image)`` -> records);
        :class:`UnsupportedByModel` where the family has none yet."""

    def reset(self) -> None:
        """Forget the current image."""


# ------------------------------------------------------------------------------------- dispatch
def model_family(model) -> str:
    """``"sam"``, ``"sam2"`` or ``"sam3"``: the family of a loaded model (the one place that tells them apart)."""
    for cls, family in _FAMILIES:
        if isinstance(model, cls):
            return family
    raise TypeError(f"expected a model loaded with anyseg.load_model (SAM 1 or SAM 2), got {type(model).__name__}")


def make_predictor(model, **family_options) -> ImagePredictor:
    """The :class:`ImagePredictor` for ``model``: a :class:`SamPredictor` for SAM 1 models, a
    :class:`~anyseg.sam2_predictor.SAM2ImagePredictor` for SAM 2 ones (:class:`SamSurfacePredictor` and
    :class:`Sam2SurfacePredictor`, which add the protocol's methods). ``family_options`` go to that
    family's constructor (SAM 2: ``mask_threshold``, ``max_hole_area``, ``max_sprinkle_area``; SAM 1 has
    none)."""
    family = model_family(model)
    if family not in _ADAPTERS:
        raise UnsupportedByModel(f"{family} models have no point / box predictor in anyseg yet; for SAM 3 "
                                 "use concept prompts (anyseg.Sam3Processor, or --text / --box-exemplar)")
    return _ADAPTERS[family](model, **family_options)


def apply_speed(model, speed, *, keep_freed_memory: bool = True) -> None:
    """Switch on the fast paths of ``speed`` (``"auto"``, ``"lossless"``, ``"faithful"`` or a
    :class:`~anyseg.speed.SpeedConfig`) that ``model``'s family has.

    ``"auto"`` means the sensible fast paths of the family on the model's device (SAM 1 and SAM 2 share
    :mod:`anyseg.speed`'s presets; ``anyseg.fast.sam2`` holds SAM 2's). ``keep_freed_memory=False`` leaves the C allocator as it is even where
    the preset would tune it (a long-running server).
    """
    _SPEED[model_family(model)](model, speed, keep_freed_memory)


def _sam_speed(model, speed, keep_freed_memory: bool) -> None:
    from dataclasses import replace

    from .speed import apply, resolve

    config = resolve(speed, model.device)
    if not keep_freed_memory:
        config = replace(config, keep_freed_memory=False)
    apply(model, config)


# ------------------------------------------------------------------------------------ prompt checks
def check_prompt_batch(point_coords, point_labels, boxes, mask_input, side: int):
    """Validate the prompts of ``B`` objects decoded together.

    point_coords ``B x N x 2`` XY with point_labels ``B x N`` (1 foreground, 0 background, -1 a padding
    point that is ignored: it lets objects with fewer clicks share a batch); boxes ``B x 4`` XYXY;
    mask_input ``B x 1 x s x s`` (or ``B x s x s``) low-res logits. Each is optional, at least one is
    needed, and all give the same ``B``.

    Returns ``(coords float64, labels int64, boxes float64, mask_input float32 B x 1 x s x s, B)`` with
    None for what was not given.
    """
    coords = labels = out_boxes = masks = None
    sizes = {}
    if (point_coords is None) != (point_labels is None):
        raise ValueError("point_coords and point_labels must be given together (labels: 1 = foreground, "
                         "0 = background, -1 = padding)")
    if point_coords is not None:
        coords = np.asarray(point_coords, dtype=np.float64)
        labels = np.asarray(point_labels)
        if coords.ndim != 3 or coords.shape[2] != 2:
            raise ValueError(f"expected point_coords of shape B x N x 2, got shape {coords.shape}")
        if labels.shape != coords.shape[:2]:
            raise ValueError(f"expected point_labels of shape {coords.shape[:2]} (one per point), got {labels.shape}")
        if not np.all(np.isfinite(coords)):
            raise ValueError("point_coords contain NaN or infinite values")
        if labels.size and not np.isin(labels, (-1, 0, 1)).all():
            raise ValueError(f"point_labels must be 1 (foreground), 0 (background) or -1 (padding), "
                             f"got {np.unique(labels).tolist()}")
        labels = labels.astype(np.int64)
        sizes["point_coords"] = coords.shape[0]
    if boxes is not None:
        arr = np.asarray(boxes, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != 4:
            raise ValueError(f"expected boxes of shape B x 4 (X0, Y0, X1, Y1), got shape {arr.shape}")
        out_boxes = check_boxes(arr) if len(arr) else arr
        sizes["boxes"] = arr.shape[0]
    if mask_input is not None:
        masks = np.asarray(mask_input, dtype=np.float32)
        if masks.ndim == 3:
            masks = masks[:, None]
        if masks.ndim != 4 or masks.shape[1:] != (1, side, side):
            raise ValueError(f"expected mask_input of shape B x 1 x {side} x {side} (low-res logits of earlier "
                             f"answers), got shape {masks.shape}")
        if not np.all(np.isfinite(masks)):
            raise ValueError("mask_input contains NaN or infinite values")
        sizes["mask_input"] = masks.shape[0]
    if not sizes:
        raise ValueError("decode_batch needs point_coords + point_labels, boxes and/or mask_input")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"every prompt must be given for the same number of objects, got {sizes}")
    b = next(iter(sizes.values()))
    if b == 0:
        raise ValueError("decode_batch needs at least one object")
    return coords, labels, out_boxes, masks, b


def _check_single(point_coords, point_labels, box, mask_input, side: int):
    """One object's prompts -> (coords N x 2, labels N, box 4, mask_input 1 x s x s), None where absent."""
    coords, labels = check_points(point_coords, point_labels)
    boxes = check_boxes(box)
    if boxes is not None and boxes.shape[0] != 1:
        raise ValueError(f"decode takes one box per object; use decode_batch for {boxes.shape[0]} boxes")
    mask = check_mask_input(mask_input, side) if mask_input is not None else None
    return coords, labels, None if boxes is None else boxes[0], mask


def _same_pixels(a: Optional[np.ndarray], b) -> bool:
    return (a is not None and isinstance(b, np.ndarray) and a.shape == b.shape and a.dtype == b.dtype
            and np.array_equal(a, b))


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A float32 numpy copy that keeps the tensor's memory layout (SAM 2's features are channels-last, and
    decoding from a differently laid out copy changes the logits in the last bits)."""
    return t.detach().float().cpu().numpy().copy(order="K")


# ----------------------------------------------------------------------------------------- SAM 1
class SamSurfacePredictor(SamPredictor):
    """:class:`~anyseg.SamPredictor` with the :class:`ImagePredictor` methods (SAM 1 and MobileSAM)."""

    family = "sam"

    def __init__(self, sam_model, **options) -> None:
        if options:
            raise TypeError(f"SAM 1 predictors take no options, got {sorted(options)}")
        self._reuse: Optional[Tuple[EncodedImage, np.ndarray]] = None
        super().__init__(sam_model)

    @property
    def mask_input_size(self) -> int:
        return int(self.model.prompt_encoder.mask_input_size[0])

    @property
    def embedding_shape(self) -> Tuple[int, int, int, int]:
        pe = self.model.prompt_encoder
        return (1, int(pe.embed_dim), int(pe.image_embedding_size[0]), int(pe.image_embedding_size[1]))

    def reset(self) -> None:
        self.reset_image()

    def set_image(self, image, image_format: str = "RGB") -> None:
        if self._reuse is not None and image_format == "RGB" and _same_pixels(self._reuse[1], image):
            self.set_encoded(*self._reuse)
            return
        super().set_image(image, image_format)

    def encoded(self) -> EncodedImage:
        self._require_image()
        state = () if self.interm_features is None else (_numpy(self.interm_features),)
        return EncodedImage(_numpy(self.features), state, tuple(self.original_size), tuple(self.input_size))

    def set_encoded(self, encoded: EncodedImage, image: Optional[np.ndarray] = None) -> None:
        dtype = next(self.model.parameters()).dtype
        embedding = torch.from_numpy(encoded.embedding).to(self.device, dtype)
        interm = torch.from_numpy(encoded.state[0]).to(self.device, dtype) if encoded.state else None
        self.set_embedding(embedding, encoded.input_size, encoded.original_size, interm_features=interm)
        self._reuse = None if image is None else (encoded, image)

    def decode(self, point_coords=None, point_labels=None, box=None, mask_input=None,
               multimask_output: bool = True, return_logits: bool = False, **options) -> Decoded:
        hq = self._hq_option(options)
        return Decoded(*self.predict(point_coords, point_labels, box, mask_input, multimask_output, return_logits,
                                     **hq))

    def _hq_option(self, options) -> dict:
        """SAM 1's one decode option: HQ-SAM's ``hq_token_only`` (refused by a model without the HQ token)."""
        unknown = sorted(set(options) - {"hq_token_only"})
        if unknown:
            raise TypeError(f"SAM 1 models take no decode options other than hq_token_only (HQ-SAM), got {unknown}")
        return {"hq_token_only": bool(options["hq_token_only"])} if "hq_token_only" in options else {}

    def decode_batch(self, point_coords=None, point_labels=None, boxes=None, mask_input=None,
                     multimask_output: bool = True, return_logits: bool = False, **options) -> Decoded:
        hq = self._hq_option(options)
        self._require_image()
        coords, labels, boxes, masks, _ = check_prompt_batch(point_coords, point_labels, boxes, mask_input,
                                                             self.mask_input_size)
        s, size, dev = self.model.img_size, self.original_size, self.device
        coords_t = None if coords is None else torch.as_tensor(coords_to_model(coords, size, s), device=dev)
        labels_t = None if labels is None else torch.as_tensor(labels, device=dev)
        boxes_t = None if boxes is None else torch.as_tensor(boxes_to_model(boxes, size, s), device=dev)
        masks_t = None if masks is None else torch.as_tensor(masks, device=dev)
        out, scores, low = self.predict_torch(coords_t, labels_t, boxes_t, masks_t, multimask_output,
                                              return_logits=return_logits, **hq)
        return Decoded(out.detach().cpu().numpy(), _numpy(scores), _numpy(low))

    def mask_generator(self, **params):
        from .automatic import MaskGenerator

        return MaskGenerator(self, **params)


# ----------------------------------------------------------------------------------------- SAM 2
class Sam2SurfacePredictor(SAM2ImagePredictor):
    """:class:`~anyseg.sam2_predictor.SAM2ImagePredictor` with the :class:`ImagePredictor` methods.

    ``decode`` validates prompts as SAM 1's predictor does and returns bool masks (the reference
    ``predict`` returns float 0/1); everything else is the reference computation.
    """

    family = "sam2"

    def __init__(self, sam_model, **options) -> None:
        self._reuse: Optional[Tuple[EncodedImage, np.ndarray]] = None
        super().__init__(sam_model, **options)

    @property
    def input_size(self) -> Optional[Tuple[int, int]]:
        """The model frame is the whole ``S x S`` square: the image is squashed, not padded."""
        return (self.model.img_size, self.model.img_size) if self.is_image_set else None

    @property
    def mask_input_size(self) -> int:
        return int(self.model.sam_prompt_encoder.mask_input_size[0])

    @property
    def embedding_shape(self) -> Tuple[int, int, int, int]:
        pe = self.model.sam_prompt_encoder
        return (1, int(pe.embed_dim), int(pe.image_embedding_size[0]), int(pe.image_embedding_size[1]))

    def reset(self) -> None:
        self.reset_predictor()

    def set_image(self, image) -> None:
        if self._reuse is not None and _same_pixels(self._reuse[1], image):
            self.set_encoded(*self._reuse)
            return
        super().set_image(image)

    def encoded(self) -> EncodedImage:
        self._require_image()
        if self._is_batch:
            raise ValueError("encoded() describes one image; this predictor holds a batch (set_image_batch)")
        features = self._encoded  # the reference predictor's cache of the image's features
        state = (features.vision, features.vision_pos, *features.high_res)
        return EncodedImage(_numpy(self.get_image_embedding()), tuple(_numpy(t) for t in state),
                            tuple(self.original_size), tuple(self.input_size))

    def set_encoded(self, encoded: EncodedImage, image: Optional[np.ndarray] = None) -> None:
        if len(encoded.state) < 3:
            raise ValueError("a SAM 2 encoding needs the vision feature, its position encoding and the "
                             f"high-resolution features; got {len(encoded.state)} arrays (a SAM 1 encoding?)")
        dtype = next(self.model.parameters()).dtype
        vision, pos, *high_res = (torch.from_numpy(a).to(self.device, dtype) for a in encoded.state)
        self.set_features(Sam2Features(vision, pos, tuple(high_res)), encoded.original_size)
        self._reuse = None if image is None else (encoded, image)

    def decode(self, point_coords=None, point_labels=None, box=None, mask_input=None,
               multimask_output: bool = True, return_logits: bool = False, **options) -> Decoded:
        self._require_image()
        coords, labels, box, mask = _check_single(point_coords, point_labels, box, mask_input,
                                                  self.mask_input_size)
        masks, scores, low = self.predict(coords, labels, box, mask, multimask_output, return_logits, **options)
        return Decoded(masks if return_logits else masks > 0.5, scores, low)

    def decode_batch(self, point_coords=None, point_labels=None, boxes=None, mask_input=None,
                     multimask_output: bool = True, return_logits: bool = False, **options) -> Decoded:
        self._require_image()
        coords, labels, boxes, masks, b = check_prompt_batch(point_coords, point_labels, boxes, mask_input,
                                                             self.mask_input_size)
        out = self.predict(coords, labels, boxes, masks, multimask_output, return_logits, **options)
        if b == 1:  # the reference drops a leading batch dimension of size 1
            out = tuple(a[None] for a in out)
        masks_out, scores, low = out
        return Decoded(masks_out if return_logits else masks_out > 0.5, scores, low)

    def mask_generator(self, **params):
        try:
            from .sam2_automatic import SAM2AutomaticMaskGenerator
        except ImportError as exc:
            raise UnsupportedByModel("segment everything is not available for SAM 2 models in this installation "
                                     f"({exc}): prompt objects with points or boxes instead") from exc
        # The generator runs its own predictor (its clean-up settings are its own), so it encodes again.
        return SAM2AutomaticMaskGenerator(self.model, **params)


#: Each family's model class, name for people, predictor class and fast paths: the only tables a new
#: family is added to.
def _sam3_speed(model, speed, keep_freed_memory: bool) -> None:
    """SAM 3's presets: its attention already runs fused, as the reference's does (``faithful`` and
    ``lossless`` are that computation); a preset with a reduced-precision encoder (``auto`` on CPUs with
    native bfloat16, and on CUDA) runs the ViT trunk in that dtype (``model.trunk_dtype``), the neck,
    fusion encoder, decoder and heads in float32. Other encoder switches of :class:`~anyseg.speed.SpeedConfig`
    (oneDNN, int8, compile) do not apply to SAM 3."""
    import torch

    from .speed import resolve

    config = resolve(speed, model.device)
    dtype = config.encoder_dtype
    model.trunk_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else None


_FAMILIES: Tuple[Tuple[type, str], ...] = ((Sam, "sam"), (Sam2, "sam2"), (Sam3, "sam3"))
FAMILY_NAMES: Dict[str, str] = {"sam": "SAM 1", "sam2": "SAM 2", "sam3": "SAM 3"}
_ADAPTERS: Dict[str, Any] = {"sam": SamSurfacePredictor, "sam2": Sam2SurfacePredictor}
_SPEED: Dict[str, Any] = {"sam": _sam_speed, "sam2": _sam_speed, "sam3": _sam3_speed}
