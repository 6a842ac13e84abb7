"""``Sam3Processor``: SAM 3's image API (spec/sam3.md sections 2 and 11) -- a phrase and / or exemplar
boxes in, every matching instance out, as masks, boxes and scores in original-image pixels.

The methods and the ``state`` dictionary follow the reference, so a SAM 3 program ports by changing
the import::

    from anyseg import Sam3Processor, load_model
    processor = Sam3Processor(load_model("sam3"))
    state = processor.set_image(Image.open("groceries.jpg"))
    state = processor.set_text_prompt("green vegetables", state)
    state["masks"], state["boxes"], state["scores"]

:meth:`Sam3Processor.segment` is the same as one call returning a typed :class:`Sam3Result`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .imageio import load_image
from .modeling.sam3 import Detections, Sam3
from .modeling.sam3.text import TextFeatures

__all__ = ["Sam3Processor", "Sam3Result", "preprocess_image", "VISUAL_PHRASE"]

#: The phrase the reference encodes when only exemplar boxes are given.
VISUAL_PHRASE = "visual"
State = Dict[str, Any]


@dataclass(frozen=True)
class Sam3Result:
    """Every detected instance of one prompt, in query order (no sorting, no NMS -- as the reference).

    masks: ``N x H x W`` bool; boxes: ``N x 4`` XYXY in original-image pixels (not clipped);
    scores: ``N`` probabilities (query score x presence); mask_probs: ``N x H x W`` float32 (the
    reference's ``masks_logits``, which are probabilities); presence: the probability that the
    concept is in the image at all.
    """

    masks: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    mask_probs: np.ndarray
    presence: float

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def preprocess_image(image: np.ndarray, resolution: int) -> torch.Tensor:
    """``H x W x 3`` uint8 RGB -> ``1 x 3 x S x S`` float in [-1, 1]: square resize (aspect ratio not
    kept), bilinear with antialias on the uint8 image (the reference's native uint8 path), then
    ``x * (1/255)`` and ``(x - 0.5) / 0.5``."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    x = x.float() * (1 / 255)
    return (x - 0.5) / 0.5


class Sam3Processor:
    """Promptable concept segmentation of images with a SAM 3 model.

    Args:
        model: a :class:`~anyseg.modeling.sam3.Sam3` (``anyseg.load_model("sam3")``).
        resolution: the square input size (must be the model's, 1008 for the public one).
        device: where to run (default: the model's device).
        confidence_threshold: instances with score strictly above it are kept.
    """

    def __init__(self, model: Sam3, resolution: int = 1008, device: Union[str, torch.device, None] = None,
                 confidence_threshold: float = 0.5) -> None:
        if not isinstance(model, Sam3):
            raise TypeError(f"Sam3Processor needs a SAM 3 model, got {type(model).__name__}")
        if resolution != model.image_size:
            raise ValueError(f"this SAM 3 model runs at {model.image_size} px, not resolution={resolution}")
        self.model = model
        self.resolution = resolution
        self.device = torch.device(device) if device is not None else model.device
        self.confidence_threshold = float(confidence_threshold)
        self._text_cache: Dict[str, TextFeatures] = {}
        folder = getattr(model, "checkpoint_dir", None)
        self.vocab_dirs: Sequence[str] = (folder,) if folder else ()

    # --- image ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def set_image(self, image, state: Optional[State] = None) -> State:
        """Encode one image (a PIL image, an ``H x W x 3`` array or a path); returns the state."""
        rgb = load_image(image)
        h, w = rgb.shape[:2]
        x = preprocess_image(rgb, self.resolution).to(self.device, self.model.dtype)
        state = {} if state is None else state
        state.clear()
        state.update(original_height=h, original_width=w, backbone_out=self.model.encode_image(x))
        return state

    @torch.inference_mode()
    def set_image_batch(self, images: Sequence[Any], state: Optional[State] = None) -> State:
        """Encode several images at once (``original_heights`` / ``original_widths``)."""
        rgbs = [load_image(image) for image in images]
        x = torch.cat([preprocess_image(rgb, self.resolution) for rgb in rgbs]).to(self.device, self.model.dtype)
        state = {} if state is None else state
        state.clear()
        state.update(original_heights=[r.shape[0] for r in rgbs], original_widths=[r.shape[1] for r in rgbs],
                     backbone_out=self.model.encode_image(x))
        return state

    # --- prompts -------------------------------------------------------------------------------------
    def encode_text(self, phrase: str) -> TextFeatures:
        """The text part of the prompt for ``phrase`` (cached per phrase: it does not depend on the image)."""
        cached = self._text_cache.get(phrase)
        if cached is None:
            from .sam3_tokenizer import get_tokenizer

            ids = get_tokenizer(self.vocab_dirs)(phrase, self.model.config.text.context_length)
            with torch.inference_mode():
                cached = self.model.encode_text(ids.to(self.device))
            if len(self._text_cache) >= 256:
                self._text_cache.pop(next(iter(self._text_cache)))
            self._text_cache[phrase] = cached
        return cached

    def set_text_prompt(self, prompt: str, state: State) -> State:
        """Set the phrase (replacing any previous one; exemplar boxes are kept) and detect."""
        self._need_image(state)
        state["text_prompt"] = str(prompt)
        return self._run(state)

    def add_geometric_prompt(self, box: Sequence[float], label: bool, state: State) -> State:
        """Add one exemplar box ``[cx, cy, w, h]`` normalised to [0, 1]; ``label`` True = positive."""
        self._need_image(state)
        box = [float(v) for v in box]
        if len(box) != 4 or not all(np.isfinite(box)):
            raise ValueError(f"a box is [cx, cy, w, h] normalised to [0, 1], got {box}")
        state.setdefault("geometric_prompt", []).append((box, bool(label)))
        return self._run(state)

    def replay(self, calls: Sequence[Sequence[Any]], state: State) -> State:
        """Clear the prompts, then apply recorded prompt calls in order: ``("set_text_prompt", phrase)`` and
        ``("add_geometric_prompt", box, label)`` (the form the golden files record a session in)."""
        self.reset_all_prompts(state)
        for call in calls:
            if call[0] == "set_text_prompt":
                self.set_text_prompt(call[1], state)
            elif call[0] == "add_geometric_prompt":
                self.add_geometric_prompt(call[1], call[2], state)
            else:
                raise ValueError(f"unknown prompt call {call[0]!r}: expected set_text_prompt or add_geometric_prompt")
        return state

    def reset_all_prompts(self, state: State) -> None:
        """Remove the phrase, the boxes and the results; keep the image features."""
        for key in ("text_prompt", "geometric_prompt", "detections", "masks_logits", "masks", "boxes", "scores"):
            state.pop(key, None)

    def set_confidence_threshold(self, threshold: float, state: Optional[State] = None) -> Optional[State]:
        self.confidence_threshold = float(threshold)
        if state is not None and "detections" in state:
            self._postprocess(state)
        return state

    # --- typed one-call API --------------------------------------------------------------------------
    def segment(self, image=None, *, text: Optional[str] = None, boxes: Sequence[Sequence[float]] = (),
                labels: Optional[Sequence[bool]] = None, box_format: str = "cxcywh_norm",
                state: Optional[State] = None) -> Sam3Result:
        """Detect every instance of ``text`` and / or the exemplar ``boxes`` in ``image`` (or in the image
        already set in ``state``). ``box_format``: ``"cxcywh_norm"`` (the reference's) or ``"xyxy"``
        (original-image pixels). ``labels`` default to positive."""
        if state is None or image is not None:
            state = self.set_image(image, state)
        self.reset_all_prompts(state)
        if labels is None:
            labels = [True] * len(boxes)
        if len(labels) != len(boxes):
            raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels")
        if not boxes and text is None:
            raise ValueError("give a phrase (text=...) or at least one exemplar box")
        state["text_prompt"] = text
        for box, label in zip(boxes, labels):
            if box_format == "xyxy":
                box = self.xyxy_to_cxcywh_norm(box, state["original_height"], state["original_width"])
            elif box_format != "cxcywh_norm":
                raise ValueError(f"box_format must be 'cxcywh_norm' or 'xyxy', got {box_format!r}")
            state.setdefault("geometric_prompt", []).append(([float(v) for v in box], bool(label)))
        self._run(state)
        return self.result(state)

    @staticmethod
    def xyxy_to_cxcywh_norm(box: Sequence[float], height: int, width: int) -> List[float]:
        """An XYXY box in original pixels -> ``[cx, cy, w, h]`` normalised to the image."""
        x0, y0, x1, y1 = (float(v) for v in box)
        if x1 < x0 or y1 < y0:
            raise ValueError(f"box {list(box)} is not XYXY (x1 < x0 or y1 < y0)")
        return [(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height]

    def result(self, state: State) -> Sam3Result:
        """The current results of ``state`` as a :class:`Sam3Result` (numpy, original pixels)."""
        if "scores" not in state:
            raise ValueError("no results yet: set a text prompt or add a box first")
        probs = state["masks_logits"][:, 0].float().cpu().numpy()
        return Sam3Result(masks=state["masks"][:, 0].cpu().numpy(), boxes=state["boxes"].float().cpu().numpy(),
                          scores=state["scores"].float().cpu().numpy(), mask_probs=probs,
                          presence=float(state["detections"].presence_logit.sigmoid()[0, 0]))

    # --- internals -----------------------------------------------------------------------------------
    @staticmethod
    def _need_image(state: State) -> None:
        if not isinstance(state, dict) or "backbone_out" not in state:
            raise ValueError("no image: call set_image first and pass its state")
        if "original_heights" in state:
            raise NotImplementedError("prompts on a batched state are not supported yet; set one image")

    @torch.inference_mode()
    def _run(self, state: State) -> State:
        phrase = state.get("text_prompt")
        text = self.encode_text(VISUAL_PHRASE if phrase is None else phrase)
        geometric = state.get("geometric_prompt", [])
        boxes = labels = None
        if geometric:
            boxes = torch.tensor([[b for b, _ in geometric]], dtype=torch.float32, device=self.device)
            labels = torch.tensor([[int(l) for _, l in geometric]], dtype=torch.long, device=self.device)
        features = state["backbone_out"]
        prompt = self.model.encode_prompt(features, text, boxes, labels)
        state["detections"] = self.model.detect(features, prompt)
        self._postprocess(state)
        return state

    @torch.inference_mode()
    def _postprocess(self, state: State) -> None:
        det: Detections = state["detections"]
        h, w = state["original_height"], state["original_width"]
        scores = det.scores[0]
        keep = scores > self.confidence_threshold
        cx, cy, bw, bh = det.pred_boxes[0, keep].float().unbind(-1)
        boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1)
        state["boxes"] = boxes * torch.tensor([w, h, w, h], dtype=boxes.dtype, device=boxes.device)
        state["scores"] = scores[keep].float()
        logits = det.pred_masks[0, keep][:, None].float()
        if logits.shape[0]:
            probs = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False).sigmoid()
        else:
            probs = logits.new_zeros(0, 1, h, w)
        state["masks_logits"] = probs
        state["masks"] = probs > 0.5
