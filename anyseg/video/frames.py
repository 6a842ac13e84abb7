"""Frame sources: the frames of a video, decoded when asked for (spec/sam2.md section 9.7).

A :class:`FrameSource` says how many frames a video has and how large they are, and gives frame ``i``
as the model's input (``get``) or as pixels (``get_rgb``). Sources:

* :class:`JpegFolderSource` — a folder of JPEG frames in the reference layout: files ending in ``.jpg``,
  ``.jpeg``, ``.JPG`` or ``.JPEG`` (others are ignored), ordered by the integer value of their stem;
* :class:`VideoFileSource` — a video file (mp4, mov, webm, mkv, ...) or its bytes, read with PyAV
  (``pip install 'anyseg[video]'``);
* :class:`ArraySource` — a sequence of ``H x W x 3`` uint8 RGB arrays (or one ``N x H x W x 3`` array), or
  an iterator of them.

Unlike the reference, which decodes every frame into one ``N x 3 x 1024 x 1024`` float tensor
(12 MiB a frame), frames are decoded on demand. A small cache holds the frame just asked for and a
few frames ahead in the direction of travel, decoded by one background thread while the model works
(``lookahead``); nothing else is held. Going back to an earlier frame of a video file seeks to the
keyframe before it and decodes from there.

The model input (``get``) is the reference's: PIL ``resize((S, S))`` with bicubic filtering on the
uint8 RGB frame (the aspect ratio is not kept), ``/ 255``, then ``(x - mean) / std`` per channel.
Video files are resized the same way (the reference has decord resize them itself).

``height`` / ``width`` are those of the first frame (the reference's JPEG loader reports the last
frame's; they differ only for folders of mixed sizes, whose frames are all squashed to ``S x S`` anyway).
"""
from __future__ import annotations

import abc
import bisect
import io
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

__all__ = ["FrameSource", "JpegFolderSource", "VideoFileSource", "ArraySource", "open_frames",
           "preprocess_frame", "JPEG_EXTENSIONS", "VIDEO_EXTENSIONS", "PIXEL_MEAN", "PIXEL_STD"]

JPEG_EXTENSIONS = (".jpg", ".jpeg", ".JPG", ".JPEG")
VIDEO_EXTENSIONS = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v")
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)

VideoInput = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, Sequence[np.ndarray],
                   Iterable[np.ndarray], "FrameSource"]


def preprocess_frame(rgb: np.ndarray, image_size: int = 1024) -> torch.Tensor:
    """``H x W x 3`` uint8 RGB -> ``1 x 3 x S x S`` float32 model input (spec 9.7).

    Bicubic PIL resize to ``S x S`` on uint8, ``/ 255`` (in float64, as the reference's numpy division,
    then float32), then ``(x - mean) / std`` in float32.
    """
    resized = np.asarray(Image.fromarray(rgb).resize((image_size, image_size), Image.BICUBIC))
    x = torch.from_numpy((resized / 255.0).astype(np.float32)).permute(2, 0, 1)
    mean = torch.tensor(PIXEL_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(PIXEL_STD, dtype=torch.float32)[:, None, None]
    return ((x - mean) / std).unsqueeze(0).contiguous()


def _check_rgb(frame, what: str) -> np.ndarray:
    arr = np.asarray(frame)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"{what}: expected an H x W x 3 uint8 RGB array, got shape {arr.shape} "
                         f"dtype {arr.dtype}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{what}: the frame is empty ({arr.shape})")
    return arr


class FrameSource(abc.ABC):
    """The frames of one video, decoded on demand.

    Attributes:
        num_frames: the number of frames.
        height, width: the video's size in pixels (the first frame's).
        image_size: the side of the square model input ``S``.
        lookahead: how many frames beyond the one asked for are decoded in the background (0: none).

    Sources are context managers; :meth:`close` stops the background thread and closes files.
    """

    def __init__(self, *, image_size: int = 1024, lookahead: int = 2) -> None:
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {lookahead}")
        self.image_size = int(image_size)
        self.lookahead = int(lookahead)
        self.num_frames = 0
        self.height = 0
        self.width = 0
        # frame index -> Future of (rgb, model input or None); at most lookahead + 1 entries.
        self._cache: "OrderedDict[int, Future]" = OrderedDict()
        self._lock = threading.Lock()
        self._executor: Optional[ThreadPoolExecutor] = None
        self._last_index: Optional[int] = None
        self._closed = False

    # -- what a source implements ---------------------------------------------------------------
    @abc.abstractmethod
    def _decode(self, index: int) -> np.ndarray:
        """Frame ``index`` as ``H x W x 3`` uint8 RGB. Always called from one thread at a time."""

    def _close(self) -> None:
        """Release the source's own resources."""

    # -- public API ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_frames

    @property
    def cached_frames(self) -> int:
        """How many decoded frames the source holds now (current one included)."""
        with self._lock:
            return len(self._cache)

    def get(self, index: int) -> torch.Tensor:
        """Frame ``index`` as the model input, ``1 x 3 x S x S`` float32 normalised (a fresh tensor)."""
        rgb, inp = self._fetch(index, with_input=True)
        if inp is None:
            inp = preprocess_frame(rgb, self.image_size)
        return inp.clone()

    def get_rgb(self, index: int) -> np.ndarray:
        """Frame ``index`` as ``H x W x 3`` uint8 RGB (its own size; read-only array)."""
        rgb, _ = self._fetch(index, with_input=False)
        return rgb

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(self.num_frames):
            yield self.get_rgb(i)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fut in self._cache.values():
                fut.cancel()
            self._cache.clear()
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        self._close()

    def __enter__(self) -> "FrameSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_frames={self.num_frames}, height={self.height}, "
                f"width={self.width}, image_size={self.image_size})")

    # -- cache and look-ahead --------------------------------------------------------------------
    def _load(self, index: int, with_input: bool) -> Tuple[np.ndarray, Optional[torch.Tensor]]:
        rgb = _check_rgb(self._decode(index), f"frame {index}")
        rgb = np.ascontiguousarray(rgb)
        rgb.setflags(write=False)
        return rgb, (preprocess_frame(rgb, self.image_size) if with_input else None)

    def _check_index(self, index) -> int:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"frame index must be an integer, got {index!r}")
        if not 0 <= index < self.num_frames:
            raise IndexError(f"frame {index} is outside the video (frames 0..{self.num_frames - 1})")
        return int(index)

    def _fetch(self, index, with_input: bool) -> Tuple[np.ndarray, Optional[torch.Tensor]]:
        index = self._check_index(index)
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{type(self).__name__} is closed")
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anyseg-frames")
            step = -1 if (self._last_index is not None and index < self._last_index) else 1
            self._last_index = index
            fut = self._cache.get(index)
            if fut is None:
                fut = self._executor.submit(self._load, index, with_input)
                self._cache[index] = fut
            self._cache.move_to_end(index)
            wanted = [index + step * k for k in range(1, self.lookahead + 1)
                      if 0 <= index + step * k < self.num_frames] if with_input else []
            for j in wanted:
                if j not in self._cache:
                    self._cache[j] = self._executor.submit(self._load, j, True)
            self._evict(keep={index, *wanted})
        try:
            rgb, inp = fut.result()
        except BaseException:
            with self._lock:
                if self._cache.get(index) is fut:
                    del self._cache[index]
            raise
        return rgb, inp

    def _evict(self, keep) -> None:
        limit = self.lookahead + 1
        for j in list(self._cache):
            if len(self._cache) <= limit:
                break
            if j not in keep:
                self._cache.pop(j).cancel()


# ------------------------------------------------------------------------------------------------
class JpegFolderSource(FrameSource):
    """A folder of JPEG frames, the reference's layout: ``.jpg`` / ``.jpeg`` / ``.JPG`` / ``.JPEG`` files
    ordered by ``int(stem)`` (``00000.jpg``, ``12.jpg``; gaps in the numbering are not frames). Other
    files are ignored. A stem that is not an integer, or a folder without JPEG files, raises."""

    def __init__(self, folder: Union[str, os.PathLike], *, image_size: int = 1024, lookahead: int = 2) -> None:
        super().__init__(image_size=image_size, lookahead=lookahead)
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"frame folder not found: {self.folder}")
        names = [p.name for p in self.folder.iterdir()
                 if os.path.splitext(p.name)[1] in JPEG_EXTENSIONS and p.is_file()]
        bad = []
        for name in names:
            try:
                int(os.path.splitext(name)[0])
            except ValueError:
                bad.append(name)
        if bad:
            shown = ", ".join(sorted(bad)[:5]) + (" ..." if len(bad) > 5 else "")
            raise ValueError(f"frame files in {self.folder} must be named by their frame number "
                             f"(00000.jpg, 00001.jpg, ...); {len(bad)} are not: {shown}")
        if not names:
            others = sorted(p.name for p in self.folder.iterdir())
            found = f" (found {len(others)} other entries, e.g. {', '.join(others[:3])})" if others else " (it is empty)"
            raise RuntimeError(f"no JPEG frames (.jpg / .jpeg) in {self.folder}{found}")
        names.sort(key=lambda n: int(os.path.splitext(n)[0]))
        self.paths: List[Path] = [self.folder / n for n in names]
        self.num_frames = len(self.paths)
        first = self.get_rgb(0)
        self.height, self.width = first.shape[:2]

    def _decode(self, index: int) -> np.ndarray:
        path = self.paths[index]
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as e:
            raise ValueError(f"frame {index} ({path}) cannot be read as an image: {e}") from e


# ------------------------------------------------------------------------------------------------
def _import_av():
    try:
        import av  # noqa: F401
    except ImportError as e:
        raise ImportError("reading video files needs PyAV: pip install 'anyseg[video]' (or pip install av); "
                          "a folder of JPEG frames or a list of arrays works without it") from e
    return av


class VideoFileSource(FrameSource):
    """A video file (or its bytes) read with PyAV; frames in presentation order.

    At opening the file's packets are read once (no decoding) to count the frames and learn their
    timestamps and keyframes; frame ``i`` is the ``i``-th smallest timestamp. Reading forward decodes
    sequentially; reading an earlier frame (or one past the next keyframe) seeks to the keyframe at or
    before it. Streams without timestamps are counted in decoding order and rewound to the start to go
    back.
    """

    def __init__(self, source: Union[str, os.PathLike, bytes, bytearray, memoryview], *, image_size: int = 1024,
                 lookahead: int = 2) -> None:
        super().__init__(image_size=image_size, lookahead=lookahead)
        av = _import_av()
        if isinstance(source, (bytes, bytearray, memoryview)):
            self.name = f"<{len(source)} bytes of video>"
            self._file = io.BytesIO(bytes(source))
        else:
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"video file not found: {path}")
            self.name = str(path)
            self._file = path
        try:
            self._container = av.open(self._file if isinstance(self._file, io.BytesIO) else str(self._file))
        except Exception as e:  # PyAV raises its own error types (av.error.*), all Exceptions
            raise ValueError(f"{self.name} cannot be opened as a video: {e}") from e
        if not self._container.streams.video:
            self._container.close()
            raise ValueError(f"{self.name} has no video stream")
        self._stream = self._container.streams.video[0]
        self._stream.thread_type = "AUTO"
        try:
            self._index_packets()
        except Exception as e:
            self._container.close()
            raise ValueError(f"{self.name} cannot be read as a video: {e}") from e
        if self.num_frames == 0:
            self._container.close()
            raise RuntimeError(f"{self.name} has no video frames")
        self._frames = None   # the decoding iterator
        self._last_decoded: Optional[int] = None
        first = self.get_rgb(0)
        self.height, self.width = first.shape[:2]

    def _index_packets(self) -> None:
        pts, key_pts = [], []
        count = 0
        for packet in self._container.demux(self._stream):
            if packet.size == 0:        # the demuxer's final flush packet
                continue
            count += 1
            if packet.pts is None:
                pts = None
            elif pts is not None:
                pts.append(packet.pts)
                if packet.is_keyframe:
                    key_pts.append(packet.pts)
        self.num_frames = count
        if pts is not None and len(set(pts)) == len(pts):
            self._pts: Optional[List[int]] = sorted(pts)
            self._key_index = sorted(bisect.bisect_left(self._pts, p) for p in key_pts) or [0]
        else:
            self._pts, self._key_index = None, [0]

    def _rewind(self, index: int) -> None:
        """Position the decoder at the keyframe at or before frame ``index`` (the start without timestamps)."""
        if self._pts is None:
            self._container.seek(0)
            self._last_decoded = -1
        else:
            k = self._key_index[max(0, bisect.bisect_right(self._key_index, index) - 1)]
            self._container.seek(self._pts[k], backward=True, any_frame=False, stream=self._stream)
            self._last_decoded = None
        self._frames = self._container.decode(self._stream)

    def _frame_index(self, frame) -> Optional[int]:
        if self._pts is None:
            return self._last_decoded + 1
        if frame.pts is None:
            return None
        return bisect.bisect_left(self._pts, frame.pts)

    def _decode(self, index: int) -> np.ndarray:
        last = getattr(self, "_last_decoded", None)
        nearest_key = self._key_index[max(0, bisect.bisect_right(self._key_index, index) - 1)]
        # Decode on from where the decoder is unless the frame lies behind it or past the next keyframe.
        if self._frames is None or last is None or index <= last or (self._pts is not None and nearest_key > last + 1):
            self._rewind(index)
        for attempt in range(2):
            for frame in self._frames:
                i = self._frame_index(frame)
                if i is None:
                    continue
                self._last_decoded = i
                if i == index:
                    return frame.to_ndarray(format="rgb24")
                if i > index:
                    break  # the seek landed past the frame: rewind to the start below
            # Ran out or overshot: decode from the very start once before giving up.
            if attempt == 0:
                self._container.seek(0)
                self._frames = self._container.decode(self._stream)
                self._last_decoded = -1 if self._pts is None else None
        raise RuntimeError(f"{self.name}: frame {index} of {self.num_frames} could not be decoded")

    def _close(self) -> None:
        self._container.close()


# ------------------------------------------------------------------------------------------------
class ArraySource(FrameSource):
    """Frames given as arrays: a sequence (list, tuple, ``N x H x W x 3`` array) read by index, or an
    iterator read once, in order.

    An iterator needs ``num_frames`` to be streamed: its frames are then taken as they are asked for,
    and only the cached ones can be read again (going further back raises). Without ``num_frames`` an
    iterator is read into a list first (its frames are then all held).
    """

    def __init__(self, frames: Union[np.ndarray, Sequence[np.ndarray], Iterable[np.ndarray]], *,
                 num_frames: Optional[int] = None, image_size: int = 1024, lookahead: int = 2) -> None:
        super().__init__(image_size=image_size, lookahead=lookahead)
        self._iter: Optional[Iterator[np.ndarray]] = None
        self._seq = None
        if isinstance(frames, np.ndarray):
            if frames.ndim != 4:
                raise ValueError(f"an array of frames must be N x H x W x 3 uint8, got shape {frames.shape}")
            self._seq = frames
        elif hasattr(frames, "__len__") and hasattr(frames, "__getitem__"):
            self._seq = frames
        elif num_frames is None:
            self._seq = list(frames)
        else:
            self._iter = iter(frames)
            self._next = 0
        if self._seq is not None:
            if num_frames is not None and num_frames != len(self._seq):
                raise ValueError(f"num_frames={num_frames} but {len(self._seq)} frames were given")
            self.num_frames = len(self._seq)
        else:
            self.num_frames = int(num_frames)
        if self.num_frames == 0:
            raise RuntimeError("no frames were given")
        first = self.get_rgb(0)
        self.height, self.width = first.shape[:2]

    def _decode(self, index: int) -> np.ndarray:
        if self._seq is not None:
            return self._seq[index]
        if index < self._next:
            raise IndexError(f"frame {index} of a frame iterator was already consumed and is no longer "
                             "cached; pass a list (or a video file / JPEG folder) for random access")
        frame = None
        while self._next <= index:
            try:
                frame = next(self._iter)
            except StopIteration:
                raise RuntimeError(f"the frame iterator ended after {self._next} frames, "
                                   f"but num_frames={self.num_frames}") from None
            self._next += 1
        return frame


# ------------------------------------------------------------------------------------------------
def open_frames(video: VideoInput, *, image_size: int = 1024, lookahead: int = 2,
                num_frames: Optional[int] = None) -> FrameSource:
    """Open any supported video input as a :class:`FrameSource`.

    ``video``: a folder of JPEG frames, a video file path (``.mp4``, ``.mov``, ``.webm``, ``.mkv``, ...),
    the bytes of a video file, an ``N x H x W x 3`` uint8 array, a sequence or iterator of ``H x W x 3``
    uint8 RGB arrays (``num_frames`` lets an iterator stream), or a source already opened (returned
    as is).
    """
    if isinstance(video, FrameSource):
        return video
    if isinstance(video, (bytes, bytearray, memoryview)):
        return VideoFileSource(video, image_size=image_size, lookahead=lookahead)
    if isinstance(video, (str, os.PathLike)):
        path = Path(video)
        if path.is_dir():
            return JpegFolderSource(path, image_size=image_size, lookahead=lookahead)
        if not path.exists():
            raise FileNotFoundError(f"video not found: {path}")
        if path.suffix.lower() in VIDEO_EXTENSIONS:
            return VideoFileSource(path, image_size=image_size, lookahead=lookahead)
        raise ValueError(f"{path} is neither a folder of JPEG frames nor a video file "
                         f"({', '.join(VIDEO_EXTENSIONS)})")
    if isinstance(video, np.ndarray) or isinstance(video, (list, tuple)) or hasattr(video, "__iter__"):
        return ArraySource(video, num_frames=num_frames, image_size=image_size, lookahead=lookahead)
    raise TypeError(f"cannot read frames from {type(video).__name__}: expected a JPEG folder, a video file "
                    "or its bytes, or H x W x 3 uint8 arrays")
