"""Quality of a fast path against the faithful float32 path, on the same model and images.

* Predictor: for every prompt case, the IoU of each fast mask with the faithful mask (the bar: >= 0.98
  for reduced precision; lossless paths keep the golden tolerances).
* Segment everything: the fraction of records of one run matched (mask IoU >= 0.9) by a record of the
  other, in both directions (the bar: >= 95% each way).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..masks import coco_rle_to_mask, rle_to_mask


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks of the same shape (1.0 when both are empty)."""
    a, b = a.astype(bool), b.astype(bool)
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def predictor_cases(manifest_entry: Dict[str, Any], image: str) -> List[Dict[str, Any]]:
    """The golden manifest's predictor cases for one image, as ``SamPredictor.predict`` keyword arguments
    (cases needing stored arrays are skipped)."""
    spec = next(p for p in manifest_entry["predictor"] if p["image"] == image)
    cases = []
    for case in spec["cases"]:
        if case["name"] in ("batched_boxes", "refine"):
            continue
        kwargs = {"multimask_output": case["multimask_output"]}
        if case.get("point_coords"):
            kwargs["point_coords"] = np.array(case["point_coords"], dtype=np.float64)
            kwargs["point_labels"] = np.array(case["point_labels"])
        if case.get("box") is not None:
            kwargs["box"] = np.array(case["box"], dtype=np.float64)
        cases.append({"name": case["name"], "kwargs": kwargs})
    return cases


def predictor_quality(model, config, images: Sequence[np.ndarray], cases_per_image: Sequence[List[Dict]],
                      reference=None) -> Dict:
    """Min mask IoU (fast vs faithful) per case over ``images``; the model ends in the faithful state.

    ``reference``: another copy of the model whose faithful outputs are the reference (e.g. on the CPU
    when ``model`` is on a GPU, where float32 convolutions may use TF32); default ``model`` itself.
    Returns ``{"min_iou": float, "per_case": {name: min IoU}, "max_score_err": float}``.
    """
    from ..predictor import SamPredictor
    from ..speed import SpeedConfig, apply

    predictor = SamPredictor(model)
    ref_predictor = predictor if reference is None else SamPredictor(reference)
    per_case: Dict[str, float] = {}
    score_err = 0.0
    for image, cases in zip(images, cases_per_image):
        apply(ref_predictor.model, SpeedConfig.faithful())
        ref_predictor.set_image(image)
        ref = [ref_predictor.predict(**c["kwargs"]) for c in cases]
        apply(model, config)
        predictor.set_image(image)
        for case, (masks0, scores0, _) in zip(cases, ref):
            masks, scores, _ = predictor.predict(**case["kwargs"])
            iou = min(mask_iou(a, b) for a, b in zip(masks, masks0))
            per_case[case["name"]] = min(per_case.get(case["name"], 1.0), iou)
            score_err = max(score_err, float(np.abs(scores - scores0).max()))
    apply(model, SpeedConfig.faithful())
    return {"min_iou": min(per_case.values()) if per_case else 1.0, "per_case": per_case, "max_score_err": score_err}


def _decode(record: Dict[str, Any]) -> np.ndarray:
    seg = record["segmentation"]
    if isinstance(seg, np.ndarray):
        return seg.astype(bool)
    if isinstance(seg.get("counts"), (str, bytes)):
        return coco_rle_to_mask(seg)
    return rle_to_mask(seg)


def match_records(a: Sequence[Dict[str, Any]], b: Sequence[Dict[str, Any]], thresh: float = 0.9) -> Dict[str, float]:
    """Fraction of ``a`` matched in ``b`` and of ``b`` matched in ``a`` (a match: mask IoU >= ``thresh``).

    Two empty lists match fully. Returns ``{"a_in_b", "b_in_a", "n_a", "n_b"}``.
    """
    if not a or not b:
        full = 1.0 if len(a) == len(b) else 0.0
        return {"a_in_b": full, "b_in_a": full, "n_a": len(a), "n_b": len(b)}
    ma = torch.from_numpy(np.stack([_decode(r).reshape(-1) for r in a])).float()
    mb = torch.from_numpy(np.stack([_decode(r).reshape(-1) for r in b])).float()
    inter = ma @ mb.t()
    union = ma.sum(1)[:, None] + mb.sum(1)[None, :] - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))
    ok = iou >= thresh
    return {"a_in_b": float(ok.any(1).float().mean()), "b_in_a": float(ok.any(0).float().mean()),
            "n_a": len(a), "n_b": len(b)}


def faithful_amg(model, image: np.ndarray, params: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Segment-everything records of the faithful path (uncompressed RLE); the model ends faithful."""
    from ..automatic import MaskGenerator
    from ..speed import SpeedConfig, apply

    apply(model, SpeedConfig.faithful())
    return MaskGenerator(model, **dict(params, output_mode="uncompressed_rle")).generate(image)


def amg_quality(model, config, image: np.ndarray, params: Dict[str, Any],
                reference_records: Optional[List[Dict[str, Any]]] = None) -> Dict[str, float]:
    """Segment ``image`` with the faithful path (or take its ``reference_records`` from
    :func:`faithful_amg`, e.g. computed once on the CPU) and with ``config`` (same generator
    parameters) and match the records both ways (see :func:`match_records`). The model ends in the
    faithful state."""
    from ..automatic import MaskGenerator
    from ..speed import SpeedConfig, apply

    params = dict(params, output_mode="uncompressed_rle")
    ref = faithful_amg(model, image, params) if reference_records is None else reference_records
    apply(model, config)
    try:
        fast = MaskGenerator(model, **params).generate(image)
    finally:
        apply(model, SpeedConfig.faithful())
    out = match_records(fast, ref)
    return {"fast_in_faithful": out["a_in_b"], "faithful_in_fast": out["b_in_a"], "n_fast": out["n_a"],
            "n_faithful": out["n_b"]}
