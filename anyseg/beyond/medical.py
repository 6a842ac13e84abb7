"""Medical volumes (MedSAM): MedSAM's preprocessing, CT/MR windowing and box propagation through a volume.

MedSAM's checkpoint (``medsam_vit_b``) is a SAM ViT-B fine-tuned on medical images with its own
preprocessing: the slice is resized to the model's square input *without* keeping the aspect ratio, its
intensities are min-max scaled to [0, 1], and no pixel mean / std is applied; prompts are boxes.
:class:`MedSamPredictor` is an :class:`~anyseg.protocol.ImagePredictor` with that preprocessing
(``make_medical_predictor(model, preprocess="medsam")``); with ``preprocess="sam"`` the model's own.

:func:`segment_volume` segments one object through a volume from a box on one slice: the slice is
segmented, then the next slice in each direction is prompted with the previous mask's box (grown by a
margin), until the object ends (mask empty or much smaller than the previous one). Volumes are read and
written with :func:`read_volume` / :func:`write_volume`: NIfTI through ``nibabel``, a DICOM series (a
directory) through ``pydicom`` (the ``medical`` extra); the output keeps the input's geometry.

Axis convention: a volume is an array ``X x Y x Z`` (NIfTI's voxel order); slice ``z`` is shown as an image
whose columns are X and rows are Y, so a box ``X0, Y0, X1, Y1`` is in voxel indices of the first two axes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from . import require

__all__ = ["MedSamPredictor", "Volume", "WINDOWS", "VolumeSegmentation", "make_medical_predictor", "read_volume",
           "segment_volume", "window", "write_volume"]

#: Common CT windows, (low, high) in Hounsfield units (level -/+ width / 2).
WINDOWS: Dict[str, Tuple[float, float]] = {
    "soft-tissue": (-160.0, 240.0), "lung": (-1350.0, 150.0), "bone": (-500.0, 1300.0),
    "brain": (0.0, 80.0), "liver": (-25.0, 175.0),
}


# ------------------------------------------------------------------------------------ predictor
def _protocol():
    from .. import protocol

    return protocol


class MedSamPredictor(_protocol().SamSurfacePredictor):
    """A SAM 1 predictor with MedSAM's preprocessing: the image squashed to ``S x S`` (no aspect ratio, no
    padding), min-max intensities to [0, 1], no pixel mean / std. Prompts and masks stay in original-image
    pixels; the model frame is the whole square (``input_size == (S, S)``)."""

    preprocess_name = "medsam"

    @torch.inference_mode()
    def set_image(self, image, image_format: str = "RGB") -> None:
        from ..imageio import load_image

        if isinstance(image, np.ndarray) and image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if isinstance(image, np.ndarray) and image.ndim == 3 and image.dtype != np.uint8:
            arr = image.astype(np.float32)  # intensities of any range: min-max scaled below
        else:
            arr = load_image(image, image_format=image_format).astype(np.float32)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"expected an H x W or H x W x 3 image, got shape {arr.shape}")
        s = self.model.img_size
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None].to(self.device)
        x = F.interpolate(x, (s, s), mode="bilinear", align_corners=False, antialias=True)
        lo, hi = x.amin(), x.amax()
        x = (x - lo) / torch.clamp(hi - lo, min=1e-8)
        dtype = next(self.model.parameters()).dtype
        interm = None
        if getattr(self.model, "is_hq", False):
            features, interm = self.model.encode_image(x.to(dtype), return_interm=True)
        else:
            features = self.model.encode_image(x.to(dtype))
        self.set_embedding(features, (s, s), arr.shape[:2], interm_features=interm)

    def _scale(self) -> np.ndarray:
        h, w = self.original_size
        s = self.model.img_size
        return np.array([s / w, s / h])

    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None, multimask_output=True,
                return_logits=False, hq_token_only=False):
        from ..prompts import check_boxes, check_points

        self._require_image()
        coords, labels = check_points(point_coords, point_labels)
        boxes = check_boxes(box)
        if boxes is not None and boxes.shape[0] != 1:
            raise ValueError(f"predict takes one box; use decode_batch for {boxes.shape[0]} boxes")
        k = self._scale()
        coords_t = labels_t = box_t = mask_t = None
        if coords is not None:
            coords_t = torch.as_tensor((coords * k).astype(np.float32), device=self.device)[None]
            labels_t = torch.as_tensor(labels, dtype=torch.int64, device=self.device)[None]
        if boxes is not None:
            box_t = torch.as_tensor((boxes * np.tile(k, 2)).astype(np.float32), device=self.device)
        if mask_input is not None:
            mask_t = torch.as_tensor(self._check_mask_input(mask_input), device=self.device)[None]
        masks, scores, low = self.predict_torch(coords_t, labels_t, box_t, mask_t, multimask_output,
                                                return_logits=return_logits, hq_token_only=hq_token_only)
        return masks[0].cpu().numpy(), scores[0].float().cpu().numpy(), low[0].float().cpu().numpy()

    def decode_batch(self, point_coords=None, point_labels=None, boxes=None, mask_input=None,
                     multimask_output: bool = True, return_logits: bool = False, **options):
        p = _protocol()
        hq = self._hq_option(options)
        self._require_image()
        coords, labels, boxes, masks, _ = p.check_prompt_batch(point_coords, point_labels, boxes, mask_input,
                                                               self.mask_input_size)
        k, dev = self._scale(), self.device
        coords_t = None if coords is None else torch.as_tensor((coords * k).astype(np.float32), device=dev)
        labels_t = None if labels is None else torch.as_tensor(labels, device=dev)
        boxes_t = None if boxes is None else torch.as_tensor((boxes * np.tile(k, 2)).astype(np.float32), device=dev)
        masks_t = None if masks is None else torch.as_tensor(masks, device=dev)
        out, scores, low = self.predict_torch(coords_t, labels_t, boxes_t, masks_t, multimask_output,
                                              return_logits=return_logits, **hq)
        return p.Decoded(out.cpu().numpy(), scores.float().cpu().numpy(), low.float().cpu().numpy())


def make_medical_predictor(model, preprocess: str = "auto"):
    """The predictor for slices: ``"medsam"`` (:class:`MedSamPredictor`, SAM 1 models only), ``"sam"``
    (``make_predictor(model)``, any family) or ``"auto"`` (MedSAM's when the model was loaded as MedSAM, i.e.
    ``model.input_preprocessing == "medsam"``)."""
    if preprocess == "auto":
        preprocess = getattr(model, "input_preprocessing", "sam")
    if preprocess == "medsam":
        if _protocol().model_family(model) != "sam":
            raise ValueError("preprocess='medsam' is for SAM 1 checkpoints (MedSAM is a SAM ViT-B)")
        return MedSamPredictor(model)
    if preprocess == "sam":
        return _protocol().make_predictor(model)
    raise ValueError(f"preprocess must be 'auto', 'medsam' or 'sam', got {preprocess!r}")


def is_medsam_name(name) -> bool:
    """A model name / file that stands for MedSAM (``medsam_vit_b``, ``medsam_vit_b.pth``)."""
    return "medsam" in Path(str(name)).name.lower()


# ------------------------------------------------------------------------------------- volumes
@dataclass
class Volume:
    """``data`` ``X x Y x Z`` float32, ``affine`` 4 x 4 voxel -> world (RAS, mm), ``spacing`` (mm per voxel
    along X, Y, Z) and the ``header`` of the file it came from (NIfTI), kept for writing."""

    data: np.ndarray
    affine: np.ndarray
    spacing: Tuple[float, float, float]
    header: object = None
    source: str = ""


def read_volume(path) -> Volume:
    """A NIfTI file (``.nii`` / ``.nii.gz``) or a directory holding one DICOM series."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"volume not found: {path}")
    if path.is_dir():
        return _read_dicom_dir(path)
    if not (path.name.endswith(".nii") or path.name.endswith(".nii.gz")):
        raise ValueError(f"expected a NIfTI file (.nii / .nii.gz) or a DICOM directory, got {path}")
    nib = require("nibabel", "medical", "reading NIfTI volumes")
    img = nib.load(str(path))
    data = np.asarray(img.get_fdata(dtype=np.float32))
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"expected a 3-D volume, {path} has shape {data.shape}")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return Volume(data, np.asarray(img.affine, dtype=np.float64), zooms, img.header, str(path))


def _read_dicom_dir(path: Path) -> Volume:
    pydicom = require("pydicom", "medical", "reading DICOM series")
    slices = []
    for f in sorted(path.iterdir()):
        if not f.is_file():
            continue
        try:
            ds = pydicom.dcmread(str(f))
        except Exception:  # not a DICOM file (a DICOMDIR index, a note): skipped
            continue
        if "PixelData" in ds:
            slices.append(ds)
    if not slices:
        raise ValueError(f"no DICOM images found in {path}")
    uids = {getattr(ds, "SeriesInstanceUID", None) for ds in slices}
    if len(uids) > 1:
        raise ValueError(f"{path} holds {len(uids)} DICOM series; put one series per directory")
    orientation = np.array([float(v) for v in getattr(slices[0], "ImageOrientationPatient", [1, 0, 0, 0, 1, 0])])
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row, col)
    position = lambda ds: np.array([float(v) for v in getattr(ds, "ImagePositionPatient", [0, 0, 0])])  # noqa: E731
    if all(hasattr(ds, "ImagePositionPatient") for ds in slices):
        slices.sort(key=lambda ds: float(position(ds) @ normal))
    else:
        slices.sort(key=lambda ds: int(getattr(ds, "InstanceNumber", 0)))
    # DICOM pixel arrays are rows x columns (Y x X); the volume is X x Y x Z.
    data = np.stack([ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1))
                     + float(getattr(ds, "RescaleIntercept", 0)) for ds in slices], axis=-1).transpose(1, 0, 2)
    dy, dx = (float(v) for v in getattr(slices[0], "PixelSpacing", [1, 1]))
    if len(slices) > 1:
        dz = float(np.linalg.norm(position(slices[-1]) - position(slices[0])) / (len(slices) - 1)) or 1.0
    else:
        dz = float(getattr(slices[0], "SliceThickness", 1) or 1)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = row * dx, col * dy, normal * dz
    lps[:3, 3] = position(slices[0])
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM's LPS -> NIfTI's RAS
    return Volume(data, affine, (dx, dy, dz), None, str(path))


def write_volume(path, mask: np.ndarray, like: Volume) -> Path:
    """Write ``mask`` (``X x Y x Z``) as NIfTI with ``like``'s affine and spacing, atomically."""
    nib = require("nibabel", "medical", "writing NIfTI volumes")
    from ..atomic import write_bytes_atomic

    path = Path(path)
    if not (path.name.endswith(".nii") or path.name.endswith(".nii.gz")):
        raise ValueError(f"the output must be a NIfTI file name (.nii or .nii.gz), got {path}")
    if mask.shape != like.data.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the volume's {like.data.shape}")
    header = like.header.copy() if like.header is not None else None
    img = nib.Nifti1Image(mask.astype(np.uint8), like.affine, header=header)
    img.header.set_data_dtype(np.uint8)
    img.header.set_zooms(like.spacing)
    img.header["scl_slope"], img.header["scl_inter"] = 1, 0
    if header is None:
        img.set_qform(like.affine, code=1)
        img.set_sform(like.affine, code=1)
    # Encoded in memory, then written through a temporary file and renamed: never a half-written volume.
    data = img.to_bytes()
    if path.name.endswith(".gz"):
        import gzip

        data = gzip.compress(data, mtime=0)
    return write_bytes_atomic(path, data)


def window(data: np.ndarray, bounds: Union[None, str, Sequence[float]] = None) -> np.ndarray:
    """Intensities -> uint8 through a window ``(low, high)``, a named CT window (:data:`WINDOWS`), or (None)
    the 0.5 and 99.5 percentiles of ``data``."""
    if isinstance(bounds, str):
        if bounds not in WINDOWS:
            raise ValueError(f"unknown window {bounds!r}: give LO,HI or one of {', '.join(WINDOWS)}")
        bounds = WINDOWS[bounds]
    if bounds is None:
        lo, hi = (float(v) for v in np.percentile(data, [0.5, 99.5]))
    else:
        lo, hi = (float(v) for v in bounds)
    if not hi > lo:
        raise ValueError(f"the window needs HI > LO, got {lo}, {hi}")
    return np.round(np.clip((data - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


# ---------------------------------------------------------------------------------- propagation
@dataclass
class VolumeSegmentation:
    """``mask`` ``X x Y x Z`` bool, the ``slices`` segmented (in order of z) and each one's ``score``."""

    mask: np.ndarray
    scores: Dict[int, float] = field(default_factory=dict)

    @property
    def slices(self) -> List[int]:
        return sorted(self.scores)


def _slice_image(windowed: np.ndarray, z: int) -> np.ndarray:
    plane = windowed[:, :, z].T  # rows = Y, columns = X
    return np.ascontiguousarray(np.repeat(plane[..., None], 3, axis=2))


def _grow(box: np.ndarray, margin: float, width: int, height: int) -> np.ndarray:
    x0, y0, x1, y1 = box
    mx, my = max(2.0, (x1 - x0) * margin), max(2.0, (y1 - y0) * margin)
    return np.array([max(0, x0 - mx), max(0, y0 - my), min(width - 1, x1 + mx), min(height - 1, y1 + my)])


def segment_volume(predictor, volume: Union[np.ndarray, Volume], z: int, box: Sequence[float], *,
                   window_bounds=None, margin: float = 0.1, min_area: int = 10, min_ratio: float = 0.2,
                   min_score: float = 0.0, max_shift: float = 0.2, progress: bool = False) -> VolumeSegmentation:
    """Segment one object through ``volume`` (``X x Y x Z``) from ``box`` (X0, Y0, X1, Y1 voxels) on slice ``z``.

    Each neighbouring slice, in both directions, is prompted with the previous slice's mask box grown by
    ``margin`` (a fraction of its size, at least 2 voxels); propagation in a direction stops (the object has
    ended) when a mask has fewer than ``min_area`` voxels, less than ``min_ratio`` of the previous slice's
    area, a predicted IoU below ``min_score``, or a mean windowed intensity that differs from the previous
    slice's mask by more than ``max_shift`` of the window (the mask has moved onto other tissue)."""
    data = volume.data if isinstance(volume, Volume) else np.asarray(volume)
    if data.ndim != 3:
        raise ValueError(f"expected an X x Y x Z volume, got shape {data.shape}")
    nx, ny, nz = data.shape
    if not 0 <= z < nz:
        raise ValueError(f"slice {z} is outside the volume's {nz} slices (0..{nz - 1})")
    box = np.asarray(box, dtype=np.float64)
    if box.shape != (4,) or box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"expected a box X0,Y0,X1,Y1 with X1 > X0 and Y1 > Y0, got {box.tolist()}")
    if box[0] < 0 or box[1] < 0 or box[2] > nx or box[3] > ny:
        raise ValueError(f"the box {box.tolist()} is outside the slice (X 0..{nx}, Y 0..{ny})")
    windowed = window(data, window_bounds)
    out = np.zeros(data.shape, dtype=bool)
    result = VolumeSegmentation(out)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=nz, desc="slices", unit="slice", leave=False)

    def mean_in(k: int, m: np.ndarray) -> float:
        return float(windowed[:, :, k].T[m].mean()) / 255.0 if m.any() else 0.0

    def segment(k: int, prompt: np.ndarray) -> Tuple[np.ndarray, float]:
        predictor.set_image(_slice_image(windowed, k))
        decoded = predictor.decode(box=prompt, multimask_output=False)
        if bar is not None:
            bar.update(1)
        return np.asarray(decoded.masks[0]).astype(bool), float(decoded.scores[0])

    try:
        mask, score = segment(z, box)
        out[:, :, z] = mask.T
        result.scores[z] = score
        for step in (1, -1):
            prev, prev_mean = mask, mean_in(z, mask)
            k = z + step
            while 0 <= k < nz and prev.sum() >= min_area:
                ys, xs = np.nonzero(prev)
                prompt = _grow(np.array([xs.min(), ys.min(), xs.max(), ys.max()], float), margin, nx, ny)
                m, s = segment(k, prompt)
                area = int(m.sum())
                if area < min_area or area < min_ratio * prev.sum() or s < min_score:
                    break
                m_mean = mean_in(k, m)
                if abs(m_mean - prev_mean) > max_shift:
                    break
                out[:, :, k] = m.T
                result.scores[k] = s
                prev, prev_mean, k = m, m_mean, k + step
    finally:
        if bar is not None:
            bar.close()
    return result


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean arrays (1 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


MEDSAM_NAME = "medsam_vit_b"
MEDSAM_FILE = "medsam_vit_b.pth"


def load_medsam(name_or_path=MEDSAM_NAME, device=None):
    """Load MedSAM (a SAM ViT-B state dict) marked for MedSAM's preprocessing (``model.input_preprocessing``).

    ``"medsam_vit_b"`` is the registry name (:data:`anyseg.hub.REGISTRY`) of
    ``$ANYSEG_HOME/checkpoints/medsam_vit_b.pth``: the MedSAM authors publish the file on a file-sharing
    page rather than at a fixed download address, so it is placed there by hand (the error says where);
    a path to the file works too."""
    from ..checkpoint import load_model

    model = load_model(name_or_path, device=device)
    model.input_preprocessing = "medsam"
    return model
