"""Output writers for video tracking, fed one frame at a time.

Each writer takes what :meth:`SAM2VideoPredictor.propagate_in_video` yields, frame by frame, and holds
nothing dense for the whole video:

* :class:`IndexedPngWriter` — one 8-bit palette PNG per frame, ``masks/00000.png`` ... (DAVIS layout and
  palette): 0 = background, index ``i`` = object ``i``; written as each frame arrives.
* :class:`RleJsonWriter` — one JSON file in the YouTube-VIS layout (``videos``, ``categories``,
  ``annotations`` with one ``segmentations`` list per object, one COCO RLE per frame, ``null`` where the
  object is absent or the frame was not tracked); it keeps only the compressed RLE strings (a few hundred
  bytes per object and frame) and writes the file at :meth:`~RleJsonWriter.close`.
* :class:`OverlayVideoWriter` — the frames with the masks tinted in the palette and outlined, encoded as
  an H.264 mp4 with PyAV while the run goes on and moved into place at ``close``. Frames that arrive ahead
  of the next one to encode (a backward pass after a forward one) are kept as small label PNGs in a
  temporary folder beside the output and drawn when their turn comes. Where no mp4 encoder is available
  (no PyAV, or an FFmpeg build without H.264 / MPEG-4) it writes a PNG sequence instead
  (``overlay/00000.png`` ...) and says so in :attr:`~OverlayVideoWriter.note`.

:class:`TrackOutputs` feeds the selected writers from one call per frame (masks and label map computed
once). Every file is written atomically (a temporary name in the same folder, then a rename): the PNGs
per frame, the JSON and the video at the end. After an error, :meth:`abort` removes the temporary files
and leaves finished per-frame PNGs in place.

**Object ids -> PNG indices.** Ids are assigned an index the first time they are seen: an integer id in
1..255 keeps its value (so ``obj_id=3`` is index 3, as in DAVIS); any other id (0, negative, > 255, a
string) gets the smallest free index >= 1. At most 255 objects. The JSON records each object's index.

**Overlapping objects.** Objects are tracked independently, so their masks may overlap. In the PNGs and
the overlay each pixel goes to the object with the highest logit among those whose logit is > 0 (ties:
the object that comes first in ``obj_ids``). The JSON keeps every object's full mask (``logits > 0``),
overlaps included.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Dict, Hashable, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["davis_palette", "ObjectIndex", "label_map", "IndexedPngWriter", "RleJsonWriter",
           "OverlayVideoWriter", "TrackOutputs", "FORMATS", "PNG_DIR", "JSON_FILE", "VIDEO_FILE",
           "OVERLAY_PNG_DIR"]

PathLike = Union[str, "os.PathLike[str]"]

FORMATS = ("png", "json", "video")
PNG_DIR = "masks"
JSON_FILE = "tracks.json"
VIDEO_FILE = "overlay.mp4"
OVERLAY_PNG_DIR = "overlay"       # the fallback when no mp4 encoder is available
MAX_OBJECTS = 255


def frame_name(index: int) -> str:
    """``00042`` for frame 42: the name stem of per-frame files (DAVIS / the reference's JPEG layout)."""
    return f"{int(index):05d}"


def davis_palette(n: int = 256) -> np.ndarray:
    """The DAVIS / PASCAL VOC colour map: ``n x 3`` uint8, index 0 black, 1 (128, 0, 0), 2 (0, 128, 0), ...

    Index ``i``'s colour spreads the bits of ``i`` over the high bits of R, G and B, so the first indices
    are well apart; DAVIS annotation PNGs use this palette.
    """
    out = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        out[i] = (r, g, b)
    return out


_PALETTE = davis_palette(256)


class ObjectIndex:
    """Object id -> PNG index (1..255), assigned at first sight (see the module docstring)."""

    def __init__(self) -> None:
        self._index: Dict[Hashable, int] = {}

    def __call__(self, obj_id: Hashable) -> int:
        index = self._index.get(obj_id)
        if index is not None:
            return index
        taken = set(self._index.values())
        if isinstance(obj_id, (int, np.integer)) and not isinstance(obj_id, bool) and 1 <= obj_id <= MAX_OBJECTS \
                and int(obj_id) not in taken:
            index = int(obj_id)
        else:
            index = next((i for i in range(1, MAX_OBJECTS + 1) if i not in taken), None)
            if index is None:
                raise ValueError(f"more than {MAX_OBJECTS} objects do not fit an 8-bit indexed PNG")
        self._index[obj_id] = index
        return index

    def mapping(self) -> Dict[Hashable, int]:
        return dict(self._index)


def _logits_array(masks) -> np.ndarray:
    """``N x 1 x H x W`` or ``N x H x W`` logits (torch or numpy) -> ``N x H x W`` float32 numpy."""
    if hasattr(masks, "detach"):
        masks = masks.detach().float().cpu().numpy()
    arr = np.asarray(masks, dtype=np.float32)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"expected N x 1 x H x W (or N x H x W) mask logits, got shape {arr.shape}")
    return arr


def label_map(logits: np.ndarray, indices: Sequence[int]) -> np.ndarray:
    """``N x H x W`` logits and one PNG index per object -> ``H x W`` uint8 labels (0 = no object).

    A pixel goes to the object with the highest logit among those > 0 (ties: the first object)."""
    n, h, w = logits.shape
    if len(indices) != n:
        raise ValueError(f"{n} mask(s) but {len(indices)} object index(es)")
    if n == 0:
        return np.zeros((h, w), dtype=np.uint8)
    best = np.argmax(logits, axis=0)
    top = np.take_along_axis(logits, best[None], axis=0)[0]
    table = np.asarray(indices, dtype=np.uint8)
    return np.where(top > 0, table[best], 0).astype(np.uint8)


def _indexed_png(labels: np.ndarray) -> bytes:
    from PIL import Image

    labels = np.ascontiguousarray(labels, dtype=np.uint8)
    image = Image.frombytes("P", (labels.shape[1], labels.shape[0]), labels.tobytes())
    image.putpalette(_PALETTE.reshape(-1).tolist())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _read_labels(data: Union[bytes, PathLike]) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data) as im:
        return np.asarray(im)


class _Frame:
    """One frame's results, computed once for every writer."""

    def __init__(self, index: int, obj_ids: Sequence[Hashable], logits: np.ndarray, objects: ObjectIndex) -> None:
        self.index = int(index)
        self.obj_ids = list(obj_ids)
        if len(self.obj_ids) != logits.shape[0]:
            raise ValueError(f"frame {index}: {logits.shape[0]} mask(s) for {len(self.obj_ids)} object id(s)")
        self.logits = logits
        self.indices = [objects(o) for o in self.obj_ids]
        self._labels: Optional[np.ndarray] = None

    @property
    def masks(self) -> np.ndarray:
        return self.logits > 0

    @property
    def labels(self) -> np.ndarray:
        if self._labels is None:
            self._labels = label_map(self.logits, self.indices)
        return self._labels


class _Writer:
    """Base: ``write`` per frame, then ``close`` (finish) or ``abort`` (drop temporary files)."""

    def write_frame(self, frame: _Frame) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> List[Path]:
        return []

    def abort(self) -> None:
        pass


# ------------------------------------------------------------------------------------------------
class IndexedPngWriter(_Writer):
    """``DIR/00000.png`` ...: 8-bit palette PNGs, DAVIS palette, written atomically as frames arrive.

    A frame written twice is replaced (the later result wins)."""

    def __init__(self, directory: PathLike) -> None:
        self.directory = Path(directory)
        self.written: List[int] = []

    def path(self, index: int) -> Path:
        return self.directory / f"{frame_name(index)}.png"

    def write_frame(self, frame: _Frame) -> None:
        from ..atomic import write_bytes_atomic

        write_bytes_atomic(self.path(frame.index), _indexed_png(frame.labels))
        self.written.append(frame.index)

    def close(self) -> List[Path]:
        return [self.path(i) for i in sorted(set(self.written))]


# ------------------------------------------------------------------------------------------------
def _ranges(indices: Iterable[int]) -> List[List[int]]:
    out: List[List[int]] = []
    for i in sorted(set(indices)):
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


class RleJsonWriter(_Writer):
    """Per-frame COCO RLE per object, YouTube-VIS style, written atomically at ``close``.

    The file::

        {"info": {...}, "licenses": [],
         "videos": [{"id": 1, "name", "width", "height", "length", "file_names": [...]}],
         "categories": [{"id": 1, "name": "object", "supercategory": "object"}],
         "annotations": [{"id", "video_id": 1, "category_id": 1, "iscrowd": 0, "width", "height",
                          "length": 1, "object_id", "png_index",
                          "segmentations": [RLE or null per frame], "areas": [...], "bboxes": [[x, y, w, h] ...]}],
         "anyseg": {"tracked_frames": [[first, last], ...], ...}}

    RLEs are COCO compressed (``{"size": [H, W], "counts": str}``, decode with ``pycocotools.mask.decode``);
    ``null`` marks a frame where the object is absent (empty mask) or that was not tracked; which frames
    were tracked is in ``anyseg.tracked_frames``. Annotation ids are 1, 2, ... in the order objects were
    first seen.
    """

    def __init__(self, path: PathLike, *, num_frames: int, height: int, width: int, video_name: str = "video",
                 file_names: Optional[Sequence[str]] = None, info: Optional[Mapping[str, Any]] = None) -> None:
        self.path = Path(path)
        self.num_frames = int(num_frames)
        self.height, self.width = int(height), int(width)
        self.video_name = video_name
        if file_names is not None and len(file_names) != self.num_frames:
            raise ValueError(f"{len(file_names)} file names for {self.num_frames} frames")
        self.file_names = list(file_names) if file_names is not None else [frame_name(i) for i in range(self.num_frames)]
        self.info = dict(info or {})
        # object id -> frame -> (counts, area, bbox); only compressed strings are held.
        self._objects: Dict[Hashable, Dict[int, Tuple[str, int, List[int]]]] = {}
        self._indices: Dict[Hashable, int] = {}
        self._tracked: set = set()

    def write_frame(self, frame: _Frame) -> None:
        import torch

        from ..masks import coco_encode_rle, mask_to_rle

        if not 0 <= frame.index < self.num_frames:
            raise ValueError(f"frame {frame.index} is outside the video (frames 0..{self.num_frames - 1})")
        masks = frame.masks
        if masks.shape[1:] != (self.height, self.width):
            raise ValueError(f"frame {frame.index}: masks are {masks.shape[2]}x{masks.shape[1]}, "
                             f"the video is {self.width}x{self.height}")
        self._tracked.add(frame.index)
        rles = mask_to_rle(torch.from_numpy(masks)) if len(masks) else []
        for obj_id, index, mask, rle in zip(frame.obj_ids, frame.indices, masks, rles):
            per_frame = self._objects.setdefault(obj_id, {})
            self._indices[obj_id] = index
            area = int(sum(rle["counts"][1::2]))
            if area == 0:
                per_frame.pop(frame.index, None)
                continue
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            bbox = [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
            per_frame[frame.index] = (coco_encode_rle(rle)["counts"], area, bbox)

    def record(self) -> Dict[str, Any]:
        """The JSON object (what ``close`` writes)."""
        annotations = []
        size = [self.height, self.width]
        for ann_id, (obj_id, per_frame) in enumerate(self._objects.items(), start=1):
            segs: List[Optional[dict]] = [None] * self.num_frames
            areas: List[Optional[int]] = [None] * self.num_frames
            boxes: List[Optional[List[int]]] = [None] * self.num_frames
            for f, (counts, area, bbox) in per_frame.items():
                segs[f] = {"size": size, "counts": counts}
                areas[f] = area
                boxes[f] = bbox
            annotations.append({
                "id": ann_id, "video_id": 1, "category_id": 1, "iscrowd": 0,
                "width": self.width, "height": self.height, "length": 1,
                "object_id": obj_id if isinstance(obj_id, (int, str)) else str(obj_id),
                "png_index": self._indices[obj_id],
                "segmentations": segs, "areas": areas, "bboxes": boxes,
            })
        return {
            "info": {"description": f"anyseg track: {self.video_name}", **self.info},
            "licenses": [],
            "videos": [{"id": 1, "name": self.video_name, "width": self.width, "height": self.height,
                        "length": self.num_frames, "file_names": self.file_names}],
            "categories": [{"id": 1, "name": "object", "supercategory": "object"}],
            "annotations": annotations,
            "anyseg": {"tracked_frames": _ranges(self._tracked), "num_tracked_frames": len(self._tracked),
                       "mask_rule": "segmentation = logits > 0 per object (overlaps kept)"},
        }

    def close(self) -> List[Path]:
        from ..atomic import write_json_atomic

        write_json_atomic(self.path, self.record())
        return [self.path]


# ------------------------------------------------------------------------------------------------
#: Encoders tried in order for the overlay mp4.
MP4_CODECS = ("libx264", "h264", "mpeg4")


def _mp4_codec() -> Optional[str]:
    """The first usable mp4 video encoder, or None (no PyAV, or none of :data:`MP4_CODECS`)."""
    try:
        import av
    except ImportError:
        return None
    for name in MP4_CODECS:
        try:
            av.codec.Codec(name, "w")
        except Exception:  # PyAV: UnknownCodecError / ValueError depending on the version
            continue
        return name
    return None


def draw_overlay(rgb: np.ndarray, labels: np.ndarray, *, alpha: float = 0.5,
                 markers: Optional[Mapping[str, Any]] = None) -> np.ndarray:
    """``H x W x 3`` frame + ``H x W`` labels -> the frame with each label tinted in its palette colour and
    outlined. ``markers`` may give ``points`` (K x 2), ``point_labels`` (K) and ``boxes`` (M x 4) to draw."""
    from ..visualize import overlay_masks

    present = [int(i) for i in np.unique(labels) if i != 0]
    masks = np.stack([labels == i for i in present]) if present else np.zeros((0, *labels.shape), bool)
    markers = markers or {}
    return overlay_masks(rgb, masks, colors=_PALETTE[present] if present else np.zeros((0, 3), np.uint8),
                         alpha=alpha, points=markers.get("points"), point_labels=markers.get("point_labels"),
                         boxes=markers.get("boxes"))


class OverlayVideoWriter(_Writer):
    """The overlay video: frames with tinted, outlined masks, in frame order, H.264 mp4 by PyAV.

    Args:
        path: the mp4 file (written under a temporary name beside it and renamed at ``close``).
        get_rgb: frame index -> ``H x W x 3`` uint8 RGB (e.g. a frame source's ``get_rgb``).
        fps: frames per second of the video (default 24, DAVIS's rate).
        first_frame: the lowest frame index that will be written. Frames are encoded as soon as all
            frames before them (from ``first_frame`` on) have arrived; the others wait as label PNGs in a
            temporary folder. ``None``: everything waits and is encoded at ``close``.
        markers: frame index -> ``{"points", "point_labels", "boxes"}`` drawn on that frame (the prompts).
        fallback_dir: where the PNG-sequence fallback goes (default: ``overlay/`` beside ``path``).

    Frames that were never written are skipped (the video holds the tracked frames only, in order). A
    frame written again before it is encoded replaces the earlier one; after, the repeat is ignored.
    H.264 needs an even width and height: odd sizes are padded by repeating the last row / column.
    """

    def __init__(self, path: PathLike, get_rgb: Callable[[int], np.ndarray], *, fps: float = 24.0,
                 first_frame: Optional[int] = 0, markers: Optional[Mapping[int, Mapping[str, Any]]] = None,
                 fallback_dir: Optional[PathLike] = None, alpha: float = 0.5, codec: Optional[str] = "auto") -> None:
        self.path = Path(path)
        self.get_rgb = get_rgb
        self.fps = float(fps) if fps and fps > 0 else 24.0
        self.markers = dict(markers or {})
        self.alpha = alpha
        self._next = first_frame
        self._pending: Dict[int, Path] = {}
        self._pending_dir: Optional[Path] = None
        self._encoded = 0
        self._done: set = set()
        self.codec = _mp4_codec() if codec == "auto" else codec
        self.fallback_dir = Path(fallback_dir) if fallback_dir is not None else self.path.parent / OVERLAY_PNG_DIR
        self.note: Optional[str] = None
        self._stack = contextlib.ExitStack()
        self._container = None
        self._stream = None
        self._size: Optional[Tuple[int, int]] = None
        if self.codec is None:
            self.note = (f"no mp4 encoder available (PyAV with one of {', '.join(MP4_CODECS)}); the overlay is "
                         f"written as a PNG sequence in {self.fallback_dir}/ instead of {self.path.name}")

    @property
    def frames_written(self) -> int:
        """Frames encoded (or written as fallback PNGs) so far."""
        return self._encoded

    @property
    def output(self) -> Path:
        """The mp4 file, or the fallback folder of PNGs."""
        return self.path if self.codec is not None else self.fallback_dir

    # -- frames ----------------------------------------------------------------------------------
    def write_frame(self, frame: _Frame) -> None:
        i = frame.index
        if i in self._done:
            return
        if self._next is not None and i == self._next:
            self._emit(i, frame.labels)
            self._drain()
            return
        if self._next is not None and i < self._next:
            raise ValueError(f"frame {i} arrived after the overlay video passed it (next frame {self._next}); "
                             "give first_frame=None to let every frame wait until close()")
        if self._pending_dir is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._pending_dir = Path(tempfile.mkdtemp(prefix=f".{self.path.stem}-pending-", dir=self.path.parent))
        target = self._pending_dir / f"{frame_name(i)}.png"
        target.write_bytes(_indexed_png(frame.labels))
        self._pending[i] = target

    def _drain(self) -> None:
        while self._next in self._pending:
            i = self._next
            labels = _read_labels(self._pending.pop(i))
            self._emit(i, labels)

    def _emit(self, index: int, labels: np.ndarray) -> None:
        rgb = np.asarray(self.get_rgb(index))
        image = draw_overlay(rgb, labels, alpha=self.alpha, markers=self.markers.get(index))
        if self.codec is None:
            from ..atomic import write_png_atomic

            write_png_atomic(self.fallback_dir / f"{frame_name(index)}.png", image)
        else:
            self._encode(image)
        self._encoded += 1
        self._done.add(index)
        path = self._pending.pop(index, None)
        if path is not None:
            path.unlink(missing_ok=True)
        self._next = index + 1

    def _open(self, height: int, width: int) -> None:
        import av

        from ..atomic import atomic_write

        handle = self._stack.enter_context(atomic_write(self.path, "wb"))
        self._container = av.open(handle, mode="w", format="mp4")
        rate = Fraction(self.fps).limit_denominator(1001)
        stream = self._container.add_stream(self.codec, rate=rate)
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        if self.codec == "libx264":
            stream.options = {"crf": "20", "preset": "veryfast"}
        elif self.codec == "mpeg4":
            stream.options = {"qscale": "3"}
        self._stream = stream
        self._size = (height, width)

    def _encode(self, image: np.ndarray) -> None:
        import av

        h, w = image.shape[:2]
        if self._container is None:
            self._open(h, w)
        if (h, w) != self._size:
            raise ValueError(f"frame is {w}x{h}, the overlay video is {self._size[1]}x{self._size[0]}")
        if h % 2 or w % 2:
            image = np.pad(image, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    # -- end ---------------------------------------------------------------------------------------
    def close(self) -> List[Path]:
        """Encode the frames still waiting (in order), finish the file and move it into place."""
        try:
            for i in sorted(self._pending):
                if i in self._pending:
                    self._next = i
                    self._drain()
            if self.codec is None:
                return [self.fallback_dir] if self._encoded else []
            if self._container is None:
                return []   # no frame was written: no video
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
            self._container = None
        except BaseException:
            self.abort()
            raise
        self._stack.close()          # fsync + rename into place
        self._remove_pending()
        return [self.path]

    def abort(self) -> None:
        """Drop the unfinished video and the waiting frames (fallback PNGs already written stay)."""
        if self._container is not None:
            with contextlib.suppress(Exception):
                self._container.close()
            self._container = None
        # Leaving the atomic_write block with an exception removes its temporary file.
        with contextlib.suppress(_Aborted):
            self._stack.__exit__(_Aborted, _Aborted(), None)
        self._stack = contextlib.ExitStack()
        self._remove_pending()

    def _remove_pending(self) -> None:
        if self._pending_dir is not None:
            shutil.rmtree(self._pending_dir, ignore_errors=True)
            self._pending_dir = None
        self._pending.clear()


class _Aborted(Exception):
    pass


# ------------------------------------------------------------------------------------------------
class TrackOutputs:
    """The outputs of one tracking run in ``out_dir``, fed once per frame.

    Args:
        out_dir: the output folder (created on the first write).
        formats: any of ``"png"`` (``masks/00000.png`` ...), ``"json"`` (``tracks.json``) and ``"video"``
            (``overlay.mp4``).
        num_frames, height, width: the video's.
        get_rgb: frame index -> RGB frame (needed for ``"video"``).
        fps, first_frame, markers: for the overlay video (see :class:`OverlayVideoWriter`).
        video_name, file_names, info: for the JSON (see :class:`RleJsonWriter`).

    Use as a context manager, or call :meth:`close` after the last frame (:meth:`abort` on failure)::

        with TrackOutputs("out", num_frames=state["num_frames"], height=state["video_height"],
                          width=state["video_width"], get_rgb=state.frames.get_rgb) as outputs:
            for frame_idx, obj_ids, masks in predictor.propagate_in_video(state):
                outputs.write(frame_idx, obj_ids, masks)
    """

    def __init__(self, out_dir: PathLike, formats: Sequence[str] = FORMATS, *, num_frames: int, height: int,
                 width: int, get_rgb: Optional[Callable[[int], np.ndarray]] = None, fps: float = 24.0,
                 first_frame: Optional[int] = 0, markers: Optional[Mapping[int, Mapping[str, Any]]] = None,
                 video_name: str = "video", file_names: Optional[Sequence[str]] = None,
                 info: Optional[Mapping[str, Any]] = None) -> None:
        bad = [f for f in formats if f not in FORMATS]
        if bad or not formats:
            raise ValueError(f"formats must be some of {', '.join(FORMATS)}, got {list(formats)}")
        self.out_dir = Path(out_dir)
        self.num_frames, self.height, self.width = int(num_frames), int(height), int(width)
        self.objects = ObjectIndex()
        self.writers: Dict[str, _Writer] = {}
        if "png" in formats:
            self.writers["png"] = IndexedPngWriter(self.out_dir / PNG_DIR)
        if "json" in formats:
            self.writers["json"] = RleJsonWriter(self.out_dir / JSON_FILE, num_frames=num_frames, height=height,
                                                 width=width, video_name=video_name, file_names=file_names,
                                                 info=info)
        if "video" in formats:
            if get_rgb is None:
                raise ValueError("the overlay video needs get_rgb (frame index -> RGB frame)")
            self.writers["video"] = OverlayVideoWriter(self.out_dir / VIDEO_FILE, get_rgb, fps=fps,
                                                       first_frame=first_frame, markers=markers)
        self.frames_written = 0
        self.closed = False

    @property
    def notes(self) -> List[str]:
        """Things a user should know about the outputs (e.g. the overlay fell back to PNGs)."""
        video = self.writers.get("video")
        return [video.note] if video is not None and video.note else []

    def write(self, frame_idx: int, obj_ids: Sequence[Hashable], masks) -> None:
        """One frame as yielded by ``propagate_in_video``: ``masks`` are ``N_obj x 1 x H x W`` logits."""
        if self.closed:
            raise RuntimeError("TrackOutputs is closed")
        if not 0 <= int(frame_idx) < self.num_frames:
            raise ValueError(f"frame {frame_idx} is outside the video (frames 0..{self.num_frames - 1})")
        logits = _logits_array(masks)
        if logits.shape[1:] != (self.height, self.width):
            raise ValueError(f"frame {frame_idx}: masks are {logits.shape[2]}x{logits.shape[1]}, the video is "
                             f"{self.width}x{self.height}")
        frame = _Frame(frame_idx, obj_ids, logits, self.objects)
        for writer in self.writers.values():
            writer.write_frame(frame)
        self.frames_written += 1

    def close(self) -> Dict[str, List[Path]]:
        """Finish every output (JSON and video are moved into place now); returns the files per format."""
        if self.closed:
            return {}
        out: Dict[str, List[Path]] = {}
        try:
            for name, writer in self.writers.items():
                out[name] = writer.close()
        except BaseException:
            self.abort()
            raise
        self.closed = True
        return out

    def abort(self) -> None:
        """Remove temporary files; per-frame PNGs already written stay."""
        for writer in self.writers.values():
            with contextlib.suppress(Exception):
                writer.abort()
        self.closed = True

    def __enter__(self) -> "TrackOutputs":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
