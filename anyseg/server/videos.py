"""Video sessions behind ``/api/v1/videos``: one :class:`~anyseg.video.SAM2VideoPredictor` state per opened
video, prompts, propagation in a worker thread, results kept as COCO RLE, limits.

Threads and the model:

* Every model call (opening a video encodes its first frame; prompts; each tracked frame) runs on the
  server's model thread (``Engine.run``), one call at a time, shared with the image API. Propagation is
  fed to it one frame at a time, so two sessions that propagate at once take turns frame by frame and an
  image request waits for at most one frame step.
* Each session is used by one request at a time (its ``lock``). A propagation holds the lock from its
  start to its last frame, in its own thread; the HTTP response streams the frames as they come. While it
  runs, other requests that change the session are refused with 409 (read-only ones: info, stored frames
  and the export, are answered).
* Stopping (``cancel``, DELETE, the client going away) is checked between frames: the frame being tracked
  finishes, then the stream ends with an ``end`` line and, for DELETE, the frames and spilled outputs are
  released.

Results: for each frame the masks last computed (by a prompt or by tracking), per object, as COCO RLE
strings with area and box: a few hundred bytes per object and frame, like the predictor's own per-frame
records; the large tensors stay in the predictor's bounded store (spilled to disk).

Limits: at most ``max_sessions`` sessions at once (429 beyond); a session without requests for
``idle_timeout_s`` is closed (checked by a background thread and on every request), unless it propagates.
"""
from __future__ import annotations

import base64
import binascii
import copy
import io
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np

log = logging.getLogger("anyseg.server")

__all__ = ["VideoSettings", "VideoSessions", "VideoSession", "PropagationJob", "VideoAPIError", "UnknownSession",
           "SessionBusy", "TooManySessions", "VideoNeedsSam2", "resolve_video_path"]


# ------------------------------------------------------------------------------------------ errors
class VideoAPIError(Exception):
    """An error with the HTTP status it is answered with."""

    status = 400


class VideoNeedsSam2(VideoAPIError):
    status = 400


class UnknownSession(VideoAPIError):
    status = 404


class UnknownObject(VideoAPIError):
    status = 404


class NotInFolder(VideoAPIError):
    status = 404


class SessionBusy(VideoAPIError):
    status = 409


class TooManySessions(VideoAPIError):
    status = 429


# ---------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class VideoSettings:
    """Limits of the video API.

    max_sessions: open sessions at most (each holds a frame source, the first frames' features and the
        predictor's bounded per-object store).
    idle_timeout_s: a session without requests for this long is closed (a running propagation counts as use).
    spill_dir: parent folder of the predictor's spill directories (default: the system's temporary folder).
    lookahead: frames decoded ahead of the one being tracked.
    release_wait_s: how long DELETE waits for the frame being tracked before it answers.
    frames_ahead: frames the tracker may run ahead of a slow client before it waits.
    """

    max_sessions: int = 4
    idle_timeout_s: float = 900.0
    spill_dir: Optional[str] = None
    lookahead: int = 2
    release_wait_s: float = 60.0
    frames_ahead: int = 8

    def __post_init__(self) -> None:
        for name in ("max_sessions", "frames_ahead"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("idle_timeout_s", "release_wait_s"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {self.lookahead}")

    @classmethod
    def from_server(cls, settings: Any) -> "VideoSettings":
        """Defaults, overridden by ``video_max_sessions`` / ``video_idle_timeout_s`` / ``video_spill_dir``
        where the server settings have them."""
        kwargs = {}
        for field, attr in (("max_sessions", "video_max_sessions"), ("idle_timeout_s", "video_idle_timeout_s"),
                            ("spill_dir", "video_spill_dir")):
            value = getattr(settings, attr, None)
            if value is not None:
                kwargs[field] = str(value) if field == "spill_dir" else value
        return cls(**kwargs)


# ------------------------------------------------------------------------------------------- paths
def resolve_video_path(root: Path, relative: str) -> Path:
    """The real path of a video file or JPEG-frame folder ``relative`` to the served folder ``root``.

    Refused (:class:`NotInFolder`, answered 404 so that nothing is told about files outside): absolute
    paths, ``..``, paths leaving the folder through symbolic links, files that are not videos, and frame
    folders holding a JPEG that links out of the served folder."""
    from ..video.frames import JPEG_EXTENSIONS, VIDEO_EXTENSIONS

    root = Path(root).resolve()
    missing = NotInFolder(f"no video file or JPEG-frame folder {relative!r} in the served folder "
                          f"(expected a path relative to it, e.g. 'clip.mp4' or 'frames/')")
    if not isinstance(relative, str) or "\x00" in relative or "\\" in relative or relative.startswith("~"):
        raise missing
    relative = relative.rstrip("/")
    if not relative:
        raise missing
    pure = PurePosixPath(relative)
    if pure.is_absolute() or any(part in ("..", "") for part in pure.parts):
        raise missing
    try:
        target = (root / pure).resolve()
        target.relative_to(root)
        target.stat()
    except (ValueError, OSError):   # outside, missing, or a name the file system refuses (too long, ...)
        raise missing from None
    if target.is_dir():
        for entry in target.iterdir():
            if os.path.splitext(entry.name)[1] in JPEG_EXTENSIONS:
                try:
                    entry.resolve().relative_to(root)
                except ValueError:
                    raise missing from None
        return target
    if target.is_file() and target.suffix.lower() in VIDEO_EXTENSIONS:
        return target
    raise missing


# ------------------------------------------------------------------------------------------- model
def video_model(model):
    """``model`` with the video builder's settings (``Sam2Config.for_video()``), sharing its weights; a
    :class:`VideoNeedsSam2` error for any other model."""
    from ..modeling.sam2 import Sam2

    if not isinstance(model, Sam2):
        raise VideoNeedsSam2(f"video tracking needs a SAM 2 model; this server runs {type(model).__name__} "
                             "(a SAM 1 family model). Start it with a SAM 2 / 2.1 checkpoint, e.g. "
                             "anyseg serve --model sam2.1_hiera_tiny")
    wanted = model.config.for_video()
    if model.config == wanted:
        return model
    twin = copy.copy(model)   # the same modules and weights; only the config differs
    twin.config = wanted
    return twin


# ------------------------------------------------------------------------------------------ masks
def decode_mask_prompt(png_b64: Optional[str], rle: Optional[dict], height: int, width: int) -> np.ndarray:
    """A mask prompt (base64 PNG, non-zero = object, or an RLE) -> ``H x W`` bool of the frame's size."""
    if png_b64 is not None and rle is not None:
        raise ValueError("give the mask either as mask_png or as mask_rle, not both")
    if rle is not None:
        from .formats import segmentation_to_mask

        if not isinstance(rle, dict):
            raise ValueError("mask_rle must be an RLE object {'size': [H, W], 'counts': ...}")
        return segmentation_to_mask(rle, (height, width))
    from PIL import Image, UnidentifiedImageError

    try:
        data = base64.b64decode(png_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"mask_png must be a base64-encoded PNG: {exc}") from exc
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.size != (width, height):
                raise ValueError(f"mask_png must be {width}x{height} (the frame's size), got "
                                 f"{image.size[0]}x{image.size[1]}")
            array = np.asarray(image)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"mask_png cannot be read as an image: {exc}") from exc
    if array.ndim == 3:
        array = array.any(axis=2)
    return array != 0


@dataclass
class ObjectRecord:
    """One object's mask on one frame, compact: COCO RLE counts, area, XYWH box."""

    obj_id: int
    counts: str
    area: int
    bbox: List[float]


class FrameResults:
    """Per frame, the masks last computed for every object, as COCO RLE (thread-safe)."""

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = int(height), int(width)
        self._frames: Dict[int, Dict[int, ObjectRecord]] = {}
        self._lock = threading.Lock()

    def put(self, frame_idx: int, obj_ids: Sequence[int], masks: np.ndarray) -> List[ObjectRecord]:
        """Store a frame's ``N x H x W`` bool masks (one per id), replacing what the frame held."""
        from .formats import encode_masks, mask_record

        rles = encode_masks(masks, "coco_rle") if len(obj_ids) else []
        records = []
        for obj_id, rle, mask in zip(obj_ids, rles, masks):
            info = mask_record(mask)
            records.append(ObjectRecord(int(obj_id), rle["counts"], info["area"], info["bbox"]))
        with self._lock:
            if records:
                self._frames[int(frame_idx)] = {r.obj_id: r for r in records}
            else:
                self._frames.pop(int(frame_idx), None)
        return records

    def get(self, frame_idx: int) -> Optional[List[ObjectRecord]]:
        with self._lock:
            frame = self._frames.get(int(frame_idx))
            return list(frame.values()) if frame is not None else None

    def remove_object(self, obj_id: int) -> None:
        with self._lock:
            for frame_idx in list(self._frames):
                self._frames[frame_idx].pop(obj_id, None)
                if not self._frames[frame_idx]:
                    del self._frames[frame_idx]

    def clear(self) -> None:
        with self._lock:
            self._frames.clear()

    def snapshot(self) -> List[Tuple[int, List[ObjectRecord]]]:
        with self._lock:
            return [(f, list(self._frames[f].values())) for f in sorted(self._frames)]

    def __len__(self) -> int:
        with self._lock:
            return len(self._frames)

    def rle(self, record: ObjectRecord) -> Dict[str, Any]:
        return {"size": [self.height, self.width], "counts": record.counts}

    def dense(self, records: Sequence[ObjectRecord]) -> np.ndarray:
        from ..masks import coco_rle_to_mask

        if not records:
            return np.zeros((0, self.height, self.width), dtype=bool)
        return np.stack([coco_rle_to_mask(self.rle(r)) for r in records])


def frame_payload(session_id: str, frame_idx: int, records: Sequence[ObjectRecord], results: FrameResults,
                  fmt: str, masks: Optional[np.ndarray] = None, tracked: bool = True) -> Dict[str, Any]:
    """The JSON of one frame's masks (:class:`~.video_schemas.FrameMasks`), in format ``fmt``."""
    if fmt == "coco_rle":
        encoded = [results.rle(r) for r in records]
    else:
        from .formats import encode_masks

        dense = masks if masks is not None else results.dense(records)
        encoded = encode_masks(dense, fmt) if len(records) else []
    return {
        "id": session_id, "frame_idx": int(frame_idx), "obj_ids": [r.obj_id for r in records], "format": fmt,
        "masks": [{"obj_id": r.obj_id, "mask": m, "area": r.area, "bbox": r.bbox} for r, m in zip(records, encoded)],
        "tracked": tracked,
    }


# ---------------------------------------------------------------------------------------- sessions
class VideoSession:
    """One opened video: its predictor state, prompts, results and lock."""

    def __init__(self, session_id: str, name: str, state, upload_dir: Optional[str], clock: Callable[[], float]):
        self.id = session_id
        self.name = name
        self.state = state
        self.num_frames = int(state["num_frames"])
        self.height = int(state["video_height"])
        self.width = int(state["video_width"])
        self.upload_dir = upload_dir
        self.lock = threading.Lock()
        self.job: Optional["PropagationJob"] = None
        self.results = FrameResults(self.height, self.width)
        self.prompts: Dict[int, Set[int]] = {}   # object id -> frames with its prompts
        self.obj_ids: List[int] = []
        self.deleted = False
        self._released = False
        self._release_lock = threading.Lock()
        self._clock = clock
        self.last_used = clock()

    def touch(self) -> None:
        self.last_used = self._clock()

    @property
    def busy(self) -> bool:
        return self.lock.locked()

    @property
    def released(self) -> bool:
        return self._released

    def release_resources(self) -> None:
        """Close the frame source, remove the spilled outputs and any uploaded file (idempotent)."""
        with self._release_lock:
            if self._released:
                return
            self._released = True
        try:
            self.state.close()
        except Exception:  # pragma: no cover - closing must not fail a request
            log.exception("closing video session %s", self.id)
        if self.upload_dir is not None:
            shutil.rmtree(self.upload_dir, ignore_errors=True)

    def check_frame(self, frame_idx: int, what: str = "frame_idx") -> int:
        if isinstance(frame_idx, bool) or not isinstance(frame_idx, (int, np.integer)):
            raise ValueError(f"{what} must be an integer frame index, got {frame_idx!r}")
        if not 0 <= frame_idx < self.num_frames:
            raise ValueError(f"{what} {frame_idx} is outside the video: it has {self.num_frames} frames "
                             f"(0..{self.num_frames - 1})")
        return int(frame_idx)

    def check_object(self, obj_id: int) -> int:
        if obj_id not in self.obj_ids:
            known = ", ".join(str(o) for o in self.obj_ids) or "none yet"
            raise UnknownObject(f"unknown object id {obj_id} in video session {self.id} (objects: {known})")
        return obj_id

    def info(self, idle_timeout_s: float) -> Dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "num_frames": self.num_frames, "width": self.width,
            "height": self.height, "obj_ids": list(self.obj_ids),
            "prompted_frames": {str(o): sorted(f) for o, f in list(self.prompts.items()) if f},
            "frames_with_results": len(self.results), "propagating": self.job is not None,
            "idle_timeout_s": float(idle_timeout_s),
        }


class _Pass:
    def __init__(self, start: Optional[int], reverse: bool, max_track: Optional[int], skip_first: bool = False):
        self.start, self.reverse, self.max_track, self.skip_first = start, reverse, max_track, skip_first


class PropagationJob:
    """Tracks a session's objects in its own thread and hands each frame to ``sink``.

    ``sink.put(item, stopped)`` delivers a frame line (it may wait for a slow reader; it returns False
    when the item could not be delivered because ``stopped()`` became true or the reader is gone);
    ``sink.finish(item)`` delivers the final line, which is always sent."""

    def __init__(self, sessions: "VideoSessions", session: VideoSession, passes: List[_Pass], fmt: str, sink) -> None:
        self.sessions = sessions
        self.session = session
        self.passes = passes
        self.format = fmt
        self.sink = sink
        self.stop_event = threading.Event()
        self.reason: Optional[str] = None
        self.done = threading.Event()
        self.frames_sent = 0
        self.thread = threading.Thread(target=self._run, name=f"anyseg-video-{session.id[:8]}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def cancel(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.stop_event.set()

    @property
    def stopped(self) -> bool:
        return self.stop_event.is_set()

    def _run(self) -> None:
        session, predictor = self.session, self.sessions.predictor
        status, detail = "completed", None

        def step(gen):
            item = next(gen, None)
            if item is None:
                return None
            frame_idx, obj_ids, logits = item
            return int(frame_idx), list(obj_ids), (logits[:, 0] > 0).cpu().numpy()

        try:
            first_frame: Optional[int] = None
            for p in self.passes:
                if self.stopped:
                    break
                start = p.start if p.start is not None else first_frame
                if p.reverse and start == 0:
                    # The reference's reverse pass from frame 0 yields nothing; frame 0 is its only frame.
                    if p.skip_first:
                        continue
                    gen = predictor.propagate_in_video(session.state, start_frame_idx=0, max_frame_num_to_track=0)
                else:
                    gen = predictor.propagate_in_video(session.state, start_frame_idx=start,
                                                       max_frame_num_to_track=p.max_track, reverse=p.reverse)
                try:
                    skip = p.skip_first
                    while not self.stopped:
                        item = self.sessions.run(step, gen)
                        if item is None or self.stopped:
                            break
                        frame_idx, obj_ids, masks = item
                        session.touch()
                        if first_frame is None:
                            first_frame = frame_idx
                        if skip:
                            skip = False
                            continue
                        records = session.results.put(frame_idx, obj_ids, masks)
                        session.obj_ids = [int(o) for o in obj_ids]
                        line = {"type": "frame", "direction": "backward" if p.reverse else "forward",
                                **frame_payload(session.id, frame_idx, records, session.results, self.format, masks)}
                        if not self.sink.put(line, lambda: self.stopped):
                            if not self.stopped:
                                self.cancel("the client stopped reading")
                            break
                        self.frames_sent += 1
                finally:
                    gen.close()
            if self.stopped:
                status, detail = "cancelled", self.reason
        except Exception as exc:  # reported in the stream's last line; the details go to the log
            log.exception("propagation of video session %s failed", session.id)
            status = "error"
            detail = str(exc) if isinstance(exc, (ValueError, RuntimeError)) else "internal error (see the server log)"
        finally:
            try:
                self.sink.finish({"type": "end", "id": session.id, "status": status, "frames": self.frames_sent,
                                  "detail": detail})
            finally:
                session.job = None
                session.touch()
                if session.deleted:
                    session.release_resources()
                session.lock.release()
                self.done.set()


class QueueSink:
    """A thread-safe sink for :class:`PropagationJob` read with :meth:`get` (for callers without an event loop)."""

    def __init__(self, frames_ahead: int = 8) -> None:
        import queue

        self.queue: "queue.Queue" = queue.Queue()
        self.slots = threading.Semaphore(frames_ahead)

    def put(self, item, stopped: Callable[[], bool]) -> bool:
        while not self.slots.acquire(timeout=0.2):
            if stopped():
                return False
        self.queue.put(item)
        return True

    def finish(self, item) -> None:
        self.queue.put(item)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        while True:
            item = self.queue.get()
            yield item
            if item.get("type") == "end":
                return
            self.slots.release()


class VideoSessions:
    """The open video sessions of one server and the predictor they share.

    Args:
        model: the served model; video needs a SAM 2 model (any other answers :class:`VideoNeedsSam2`).
        run: runs a callable on the model thread and returns its result (``Engine.run``).
        settings: the limits.
        max_pixels: the largest frame (width x height) accepted.
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(self, model, run: Callable, settings: Optional[VideoSettings] = None, *,
                 max_pixels: Optional[int] = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings or VideoSettings()
        self.run = run
        self.max_pixels = max_pixels
        self.clock = clock
        self._unsupported: Optional[str] = None
        self.predictor = None
        try:
            from ..video.predictor import SAM2VideoPredictor

            self.predictor = SAM2VideoPredictor(video_model(model), spill_dir=self.settings.spill_dir)
        except VideoNeedsSam2 as exc:
            self._unsupported = str(exc)
        self._sessions: "OrderedDict[str, VideoSession]" = OrderedDict()
        self._gone: "OrderedDict[str, str]" = OrderedDict()   # recently closed ids -> why
        self._opening = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sweeper: Optional[threading.Thread] = None

    def use_predictor(self, predictor) -> None:
        """Track with ``predictor`` (a :class:`~anyseg.video.SAM2VideoPredictor`, e.g. with other options) in
        sessions opened from now on."""
        self.predictor = predictor
        self._unsupported = None

    # ------------------------------------------------------------------------------------ registry
    @property
    def supported(self) -> bool:
        return self._unsupported is None

    def require_video(self) -> None:
        if self._unsupported is not None:
            raise VideoNeedsSam2(self._unsupported)

    def list(self) -> List[VideoSession]:
        self.sweep()
        with self._lock:
            return list(self._sessions.values())

    def get(self, session_id: str) -> VideoSession:
        self.require_video()
        self.sweep()
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                why = self._gone.get(session_id)
                if why is not None:
                    raise UnknownSession(f"video session {session_id} was closed: {why}")
                raise UnknownSession(f"unknown video session {session_id!r}: open a video first "
                                     "(POST /api/v1/videos or /api/v1/videos/from-file)")
        session.touch()
        return session

    def _forget(self, session_id: str, why: str) -> Optional[VideoSession]:
        """Remove a session from the registry (caller holds ``_lock``)."""
        session = self._sessions.pop(session_id, None)
        if session is not None:
            self._gone[session_id] = why
            while len(self._gone) > 256:
                self._gone.popitem(last=False)
        return session

    def sweep(self) -> List[str]:
        """Close sessions idle for longer than the timeout (not those in use). Returns their ids."""
        now = self.clock()
        expired = []
        with self._lock:
            for sid, session in list(self._sessions.items()):
                if session.busy or now - session.last_used <= self.settings.idle_timeout_s:
                    continue
                if not session.lock.acquire(blocking=False):
                    continue
                try:
                    self._forget(sid, f"it was idle for more than {self.settings.idle_timeout_s:g} s")
                    session.deleted = True
                finally:
                    session.lock.release()
                expired.append(session)
        for session in expired:
            session.release_resources()
            log.info("closed idle video session %s", session.id)
        return [s.id for s in expired]

    def _start_sweeper(self) -> None:
        if self._sweeper is not None:
            return
        interval = min(60.0, max(0.5, self.settings.idle_timeout_s / 4))

        def loop():
            while not self._stop.wait(interval):
                try:
                    self.sweep()
                except Exception:  # pragma: no cover - keep sweeping
                    log.exception("sweeping idle video sessions")

        self._sweeper = threading.Thread(target=loop, name="anyseg-video-sweeper", daemon=True)
        self._sweeper.start()

    # ---------------------------------------------------------------------------------------- open
    def open(self, video, name: str, upload_dir: Optional[str] = None) -> VideoSession:
        """Open ``video`` (a path of a video file or JPEG folder) as a new session.

        ``upload_dir`` (a folder holding an uploaded file) is removed with the session, or now on failure."""
        try:
            self.require_video()
            self.sweep()
            with self._lock:
                if len(self._sessions) + self._opening >= self.settings.max_sessions:
                    raise TooManySessions(
                        f"too many open video sessions: at most {self.settings.max_sessions}; DELETE one "
                        f"(DELETE /api/v1/videos/ID) or wait for an idle one to close after "
                        f"{self.settings.idle_timeout_s:g} s")
                self._opening += 1
        except BaseException:
            if upload_dir is not None:
                shutil.rmtree(upload_dir, ignore_errors=True)
            raise
        frames = state = None
        try:
            frames = self._open_frames(video)
            if self.max_pixels is not None and frames.width * frames.height > self.max_pixels:
                raise ValueError(f"the video's frames are {frames.width}x{frames.height}, more than the "
                                 f"{self.max_pixels} pixels this server accepts")
            state = self.run(self.predictor.init_state, frames)
            session = VideoSession(uuid.uuid4().hex, name, state, upload_dir, self.clock)
        except BaseException:
            if state is not None:
                state.close()
            elif frames is not None:
                frames.close()
            if upload_dir is not None:
                shutil.rmtree(upload_dir, ignore_errors=True)
            raise
        finally:
            with self._lock:
                self._opening -= 1
        with self._lock:
            self._sessions[session.id] = session
        self._start_sweeper()
        return session

    def _open_frames(self, video):
        from ..video.frames import JpegFolderSource, VideoFileSource

        path = Path(video)
        size = self.predictor.image_size
        try:
            if path.is_dir():
                return JpegFolderSource(path, image_size=size, lookahead=self.settings.lookahead)
            return VideoFileSource(path, image_size=size, lookahead=self.settings.lookahead)
        except ImportError as exc:
            raise ValueError(str(exc)) from exc
        except RuntimeError as exc:   # no frames
            raise ValueError(str(exc)) from exc

    # ------------------------------------------------------------------------------------ delete
    def delete(self, session_id: str) -> Dict[str, Any]:
        """Close a session now; a running propagation is told to stop and its stream ends."""
        self.require_video()
        with self._lock:
            session = self._forget(session_id, "it was deleted")
        if session is None:
            self.get(session_id)   # raises the right 404
            raise UnknownSession(f"unknown video session {session_id!r}")
        session.deleted = True
        job = session.job
        if job is not None:
            job.cancel("the video session was deleted")
        released = False
        if session.lock.acquire(timeout=self.settings.release_wait_s):
            try:
                session.release_resources()
                released = True
            finally:
                session.lock.release()
        return {"id": session.id, "deleted": True, "released": released, "stopped_propagation": job is not None}

    def close_all(self) -> None:
        """Stop every propagation and release every session (server shutdown)."""
        self._stop.set()
        with self._lock:
            sessions = list(self._sessions.values())
            for s in sessions:
                self._forget(s.id, "the server stopped")
        for session in sessions:
            session.deleted = True
            if session.job is not None:
                session.job.cancel("the server is stopping")
            if session.lock.acquire(timeout=5.0):
                try:
                    session.release_resources()
                finally:
                    session.lock.release()

    # --------------------------------------------------------------------------------- operations
    @contextmanager
    def using(self, session_id: str, wait_s: float = 120.0) -> Iterator[VideoSession]:
        """The session, held for one request that changes it (409 while it propagates)."""
        session = self.get(session_id)
        if session.job is not None:
            raise SessionBusy(f"video session {session_id} is propagating; wait for its stream to end or stop it "
                              f"(POST /api/v1/videos/{session_id}/propagate/cancel)")
        if not session.lock.acquire(timeout=wait_s):
            raise SessionBusy(f"video session {session_id} is busy with another request; try again")
        try:
            if session.deleted:
                raise UnknownSession(f"video session {session_id} was closed")
            yield session
        finally:
            session.touch()
            if session.deleted:
                session.release_resources()
            session.lock.release()

    def add_prompt(self, session_id: str, frame_idx: int, obj_id: int, *, points=None, labels=None, box=None,
                   clear_old_points: bool = True, mask: Optional[np.ndarray] = None, max_points: int = 64):
        """Clicks / a box, or a mask, for an object on a frame. Returns ``(session, frame_idx, records, masks)``."""
        with self.using(session_id) as session:
            frame_idx = session.check_frame(frame_idx)
            w, h = session.width, session.height
            if mask is not None:
                if points is not None or labels is not None or box is not None:
                    raise ValueError("a mask prompt cannot be combined with points or a box on the same call")
                if mask.shape != (h, w):
                    raise ValueError(f"the mask must be {w}x{h} (the frame's size), got {mask.shape[1]}x{mask.shape[0]}")
                call = lambda: self.predictor.add_new_mask(session.state, frame_idx, obj_id, mask)  # noqa: E731
            else:
                coords = lbls = box_arr = None
                if points is not None or labels is not None:
                    if points is None or labels is None or len(points) != len(labels):
                        raise ValueError("points and labels must be given together, one label per point")
                    if len(points) > max_points:
                        raise ValueError(f"at most {max_points} points per request, got {len(points)}")
                    if any(len(p) != 2 for p in points):
                        raise ValueError("each point must be [x, y] (pixels of the frame)")
                    if any(int(v) not in (0, 1) or v != int(v) for v in labels):
                        raise ValueError(f"labels must be 1 (on the object) or 0 (not on it), got {list(labels)}")
                    if points:
                        coords = np.asarray(points, dtype=np.float64)
                        lbls = np.asarray(labels, dtype=np.int64)
                        self._check_inside(coords, w, h, "point")
                if box is not None:
                    box_arr = np.asarray(box, dtype=np.float64)
                    if box_arr.shape != (4,) or not np.all(np.isfinite(box_arr)):
                        raise ValueError(f"box must be 4 numbers [x0, y0, x1, y1], got {list(box)}")
                    if not (box_arr[0] < box_arr[2] and box_arr[1] < box_arr[3]):
                        raise ValueError(f"box must be [x0, y0, x1, y1] with x0 < x1 and y0 < y1, got {list(box)}")
                    self._check_inside(box_arr.reshape(2, 2), w, h, "box")
                    if not clear_old_points:
                        raise ValueError("a box replaces the object's earlier prompts on the frame: send it with "
                                         "clear_old_points=true (the default)")
                if coords is None and box_arr is None:
                    raise ValueError("a prompt needs points (with labels), a box or a mask (mask_png / mask_rle)")
                call = lambda: self.predictor.add_new_points_or_box(  # noqa: E731
                    session.state, frame_idx, obj_id, points=coords, labels=lbls, box=box_arr,
                    clear_old_points=clear_old_points)
            frame, obj_ids, masks = self._masks(self.run(call))
            session.prompts.setdefault(obj_id, set()).add(frame_idx)
            session.obj_ids = obj_ids
            return session, frame, session.results.put(frame, obj_ids, masks), masks

    @staticmethod
    def _check_inside(xy: np.ndarray, w: int, h: int, what: str) -> None:
        if not np.all(np.isfinite(xy)):
            raise ValueError(f"{what} coordinates must be finite numbers")
        outside = (xy[:, 0] < 0) | (xy[:, 0] > w) | (xy[:, 1] < 0) | (xy[:, 1] > h)
        if outside.any():
            raise ValueError(f"{what} coordinates must lie inside the {w}x{h} frame (XY pixels), "
                             f"got {xy[outside].tolist()}")

    @staticmethod
    def _masks(result) -> Tuple[int, List[int], np.ndarray]:
        frame_idx, obj_ids, logits = result
        return int(frame_idx), [int(o) for o in obj_ids], (logits[:, 0] > 0).cpu().numpy()

    def clear_prompts(self, session_id: str, frame_idx: int, obj_id: int):
        """Remove an object's prompts on a frame. Returns ``(session, frame_idx, records, masks)``."""
        with self.using(session_id) as session:
            frame_idx = session.check_frame(frame_idx)
            session.check_object(obj_id)
            frame, obj_ids, masks = self._masks(self.run(
                self.predictor.clear_all_prompts_in_frame, session.state, frame_idx, obj_id))
            session.prompts.get(obj_id, set()).discard(frame_idx)
            session.obj_ids = obj_ids
            return session, frame, session.results.put(frame, obj_ids, masks), masks

    def remove_object(self, session_id: str, obj_id: int):
        """Remove an object and its results. Returns ``(session, [(frame_idx, records, masks), ...])``."""
        with self.using(session_id) as session:
            session.check_object(obj_id)
            obj_ids, updated = self.run(self.predictor.remove_object, session.state, obj_id)
            obj_ids = [int(o) for o in obj_ids]
            session.prompts.pop(obj_id, None)
            session.results.remove_object(obj_id)
            if not obj_ids:
                session.results.clear()
            session.obj_ids = obj_ids
            frames = []
            for frame_idx, logits in updated:
                masks = (logits[:, 0] > 0).cpu().numpy()
                frames.append((int(frame_idx), session.results.put(int(frame_idx), obj_ids, masks), masks))
            return session, frames

    def reset(self, session_id: str) -> VideoSession:
        """Remove every object, prompt and result (the video stays open)."""
        with self.using(session_id) as session:
            self.run(self.predictor.reset_state, session.state)
            session.prompts.clear()
            session.results.clear()
            session.obj_ids = []
            return session

    # ------------------------------------------------------------------------------- propagation
    def start_propagation(self, session_id: str, sink, *, direction: str = "forward",
                          start_frame_idx: Optional[int] = None, max_frames: Optional[int] = None,
                          fmt: str = "coco_rle") -> PropagationJob:
        """Check the request, commit the prompts and start tracking in a thread that feeds ``sink``."""
        if direction not in ("forward", "backward", "both"):
            raise ValueError(f"direction must be forward, backward or both, got {direction!r}")
        if max_frames is not None and (isinstance(max_frames, bool) or int(max_frames) < 1):
            raise ValueError(f"max_frames must be at least 1 (the start frame counts), got {max_frames}")
        session = self.get(session_id)
        if session.job is not None:
            raise SessionBusy(f"video session {session_id} is already propagating; wait for its stream to end or "
                              f"stop it (POST /api/v1/videos/{session_id}/propagate/cancel)")
        if not session.lock.acquire(timeout=120.0):
            raise SessionBusy(f"video session {session_id} is busy with another request; try again")
        try:
            if session.deleted:
                raise UnknownSession(f"video session {session_id} was closed")
            if start_frame_idx is not None:
                start_frame_idx = session.check_frame(start_frame_idx, "start_frame_idx")
            if not session.obj_ids:
                raise ValueError("nothing to track: add a click, box or mask for an object first "
                                 f"(POST /api/v1/videos/{session_id}/prompts)")
            try:
                self.run(self.predictor.propagate_in_video_preflight, session.state)
            except RuntimeError as exc:   # an object without any prompt left
                raise ValueError(f"cannot propagate: {exc}") from exc
            max_track = None if max_frames is None else int(max_frames) - 1
            if direction == "forward":
                passes = [_Pass(start_frame_idx, False, max_track)]
            elif direction == "backward":
                if start_frame_idx is None:
                    prompted = [f for frames in session.prompts.values() for f in frames]
                    start_frame_idx = max(prompted) if prompted else session.num_frames - 1
                passes = [_Pass(start_frame_idx, True, max_track)]
            else:
                # Backward from wherever the forward pass started; that frame is not sent twice.
                passes = [_Pass(start_frame_idx, False, max_track),
                          _Pass(start_frame_idx, True, max_track, skip_first=True)]
            job = PropagationJob(self, session, passes, fmt, sink)
            session.job = job
            job.start()
        except BaseException:
            session.job = None
            session.lock.release()
            raise
        return job

    def cancel(self, session_id: str) -> bool:
        session = self.get(session_id)
        job = session.job
        if job is None:
            return False
        job.cancel("stopped by a request (POST .../propagate/cancel)")
        return True

    # ------------------------------------------------------------------------------------ export
    def export(self, session_id: str) -> Dict[str, Any]:
        """The session's results as YouTube-VIS style JSON (:class:`anyseg.video.writers.RleJsonWriter`)."""
        from ..video.writers import JSON_FILE, TrackOutputs

        session = self.get(session_id)
        file_names = None
        paths = getattr(session.state.frames, "paths", None)
        if paths is not None and len(paths) == session.num_frames:
            file_names = [Path(p).name for p in paths]
        with tempfile.TemporaryDirectory(prefix="anyseg-export-") as tmp:
            outputs = TrackOutputs(tmp, ("json",), num_frames=session.num_frames, height=session.height,
                                   width=session.width, video_name=session.name, file_names=file_names,
                                   info={"session": session.id})
            with outputs:
                for frame_idx, records in session.results.snapshot():
                    masks = session.results.dense(records)
                    outputs.write(frame_idx, [r.obj_id for r in records], np.where(masks, 1.0, -1.0)[:, None])
            return json.loads((Path(tmp) / JSON_FILE).read_text(encoding="utf-8"))
