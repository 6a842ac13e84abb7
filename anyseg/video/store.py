"""Per-object storage of tracking outputs with bounded memory.

The reference keeps every frame's outputs for every object in memory (about 0.75 MiB per object and
frame), although tracking frame t only reads the conditioning frames, the six frames before t (memory
features) and the fifteen before t (object pointers). :class:`OutputStore` keeps the large parts of a
record (bfloat16 memory features and low-res logits) for the most recently used frames only, and the
small ones (object pointer and score, about 1 KiB) for the frames the pointers reach (all of them
unless bounded); older parts are spilled to a temporary directory (large parts a file per frame,
pointers fixed-size records in one file) and read back if a later call needs them (a propagation that
starts there, a correction click), so results are exactly those of keeping everything. Beyond these
bounds only the frame's index stays in memory.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections import OrderedDict
from typing import Dict, Iterator, MutableMapping, Optional, Set, Tuple

import torch

from ..modeling.sam2.tracking import FrameOutput


class SpillDir:
    """A temporary directory for spilled tensors, removed when the owner is garbage-collected or closed."""

    def __init__(self, parent: Optional[str] = None) -> None:
        self._parent = parent
        self._path: Optional[str] = None
        self._finalizer = None

    @property
    def path(self) -> str:
        if self._path is None:
            self._path = tempfile.mkdtemp(prefix="anyseg-video-", dir=self._parent)
            self._finalizer = weakref.finalize(self, shutil.rmtree, self._path, True)
        return self._path

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self._path = None
        self._finalizer = None


class StoredOutput:
    """A view of one stored :class:`FrameOutput` whose tensors may live on disk (loaded on access)."""

    __slots__ = ("_store", "_frame")

    def __init__(self, store: "OutputStore", frame: int) -> None:
        self._store = store
        self._frame = frame

    @property
    def obj_ptr(self) -> torch.Tensor:
        return self._store._light_parts(self._frame)[0]

    @property
    def object_score(self) -> torch.Tensor:
        return self._store._light_parts(self._frame)[1]

    @property
    def pred_masks(self) -> torch.Tensor:
        return self._store._heavy_parts(self._frame)[0]

    @property
    def maskmem_features(self) -> Optional[torch.Tensor]:
        return self._store._heavy_parts(self._frame)[1]

    def materialize(self) -> FrameOutput:
        pred, mem = self._store._heavy_parts(self._frame)
        ptr, score = self._store._light_parts(self._frame)
        return FrameOutput(pred, ptr, score, mem)


class _PointerFile:
    """Fixed-size records (object pointer and score bytes) of spilled frames in one file, at
    ``frame x record size``: no per-frame file or Python object."""

    def __init__(self, path: str, like: Tuple[torch.Tensor, torch.Tensor]) -> None:
        self.path = path
        self.layout = tuple((tuple(t.shape), t.dtype) for t in like)
        self.sizes = [t.numel() * t.element_size() for t in like]
        self.record = sum(self.sizes)
        self._file = open(path, "w+b")

    def fits(self, parts: Tuple[torch.Tensor, torch.Tensor]) -> bool:
        return tuple((tuple(t.shape), t.dtype) for t in parts) == self.layout

    def write(self, frame: int, parts: Tuple[torch.Tensor, torch.Tensor]) -> None:
        data = b"".join(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() for t in parts)
        self._file.seek(frame * self.record)
        self._file.write(data)

    def read(self, frame: int) -> Tuple[torch.Tensor, torch.Tensor]:
        self._file.seek(frame * self.record)
        data = bytearray(self._file.read(self.record))
        out, offset = [], 0
        for (shape, dtype), size in zip(self.layout, self.sizes):
            raw = torch.frombuffer(data, dtype=torch.uint8, count=size, offset=offset).clone()
            out.append(raw.view(dtype).reshape(shape))
            offset += size
        return out[0], out[1]

    def close(self) -> None:
        self._file.close()


class OutputStore(MutableMapping):
    """frame index -> output for one object and one kind (conditioning or not).

    Args:
        spill: where large parts go when more than ``keep_in_memory`` frames hold them; None keeps
            everything in memory (the reference's behaviour).
        keep_in_memory: frames whose large parts (memory features, low-res logits) stay in memory
            (least recently used are spilled).
        pointers_in_memory: with ``spill``, frames whose object pointer and score stay in memory (least
            recently used go to one file of fixed-size records); None keeps every frame's in memory.

    Per frame only its index is held in memory beyond these bounds, so memory does not grow with the
    length of the video.
    """

    def __init__(self, spill: Optional[SpillDir], keep_in_memory: int = 8, name: str = "out",
                 pointers_in_memory: Optional[int] = None) -> None:
        self._spill = spill
        self._keep = max(1, int(keep_in_memory))
        self._keep_light = None if pointers_in_memory is None else max(1, int(pointers_in_memory))
        self._name = name
        self._frames: Dict[int, None] = {}
        self._heavy: "OrderedDict[int, Tuple[torch.Tensor, Optional[torch.Tensor]]]" = OrderedDict()
        self._on_disk: Set[int] = set()
        self._light: "OrderedDict[int, Tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()
        self._light_on_disk: Dict[int, bool] = {}  # frame -> in the pointer file (else a file of its own)
        self._ptr_file: Optional[_PointerFile] = None

    # -------------------------------------------------------------------------------- mapping API
    def __getitem__(self, frame: int) -> StoredOutput:
        if frame not in self._frames:
            raise KeyError(frame)
        return StoredOutput(self, frame)

    def __setitem__(self, frame: int, out) -> None:
        if isinstance(out, StoredOutput):
            out = out.materialize()
        self._drop(frame)
        self._frames[frame] = None
        self._light[frame] = (out.obj_ptr, out.object_score)
        self._heavy[frame] = (out.pred_masks, out.maskmem_features)
        self._evict()

    def __delitem__(self, frame: int) -> None:
        if frame not in self._frames:
            raise KeyError(frame)
        del self._frames[frame]
        self._drop(frame)

    def __iter__(self) -> Iterator[int]:
        return iter(self._frames)

    def __len__(self) -> int:
        return len(self._frames)

    def __contains__(self, frame) -> bool:
        return frame in self._frames

    def set_memory(self, frame: int, maskmem_features: torch.Tensor) -> None:
        """Attach memory features to a stored output (encoded when tracking starts)."""
        pred, _ = self._heavy_parts(frame)
        self._heavy[frame] = (pred, maskmem_features)
        self._heavy.move_to_end(frame)
        self._remove_file(frame)
        self._evict()

    def clear(self) -> None:
        for frame in list(self._frames):
            del self[frame]
        if self._ptr_file is not None:
            path = self._ptr_file.path
            self.close()
            if os.path.exists(path):
                os.unlink(path)

    def close(self) -> None:
        """Close the pointer file (the spill directory's owner removes the files)."""
        if self._ptr_file is not None:
            self._ptr_file.close()
            self._ptr_file = None

    @property
    def frames_in_memory(self) -> int:
        """How many frames hold their large parts in memory now."""
        return len(self._heavy)

    @property
    def pointers_in_memory(self) -> int:
        """How many frames hold their object pointer and score in memory now."""
        return len(self._light)

    # -------------------------------------------------------------------------------- internals
    def _path(self, frame: int) -> str:
        return os.path.join(self._spill.path, f"{self._name}-{id(self)}-{frame}.pt")

    def _remove_file(self, frame: int) -> None:
        if frame in self._on_disk:
            self._on_disk.discard(frame)
            path = self._path(frame)
            if os.path.exists(path):
                os.unlink(path)

    def _heavy_parts(self, frame: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        parts = self._heavy.get(frame)
        if parts is not None:
            self._heavy.move_to_end(frame)
            return parts
        if frame not in self._on_disk:
            raise KeyError(frame)
        path = self._path(frame)
        data = torch.load(path, weights_only=True)
        self._remove_file(frame)
        parts = (data["pred_masks"], data.get("maskmem_features"))
        self._heavy[frame] = parts
        self._evict()
        return parts

    def _light_parts(self, frame: int) -> Tuple[torch.Tensor, torch.Tensor]:
        parts = self._light.get(frame)
        if parts is not None:
            return parts
        in_file = self._light_on_disk.get(frame)
        if in_file is None:
            raise KeyError(frame)
        if in_file:
            return self._ptr_file.read(frame)
        data = torch.load(self._path(frame) + ".ptr", weights_only=True)
        return data["obj_ptr"], data["object_score"]

    def _drop(self, frame: int) -> None:
        self._heavy.pop(frame, None)
        self._remove_file(frame)
        self._light.pop(frame, None)
        if self._light_on_disk.pop(frame, True) is False:
            os.unlink(self._path(frame) + ".ptr")

    def _evict(self) -> None:
        if self._spill is None:
            return
        while len(self._heavy) > self._keep:
            frame, (pred, mem) = self._heavy.popitem(last=False)
            path = self._path(frame)
            tmp = path + ".tmp"
            data = {"pred_masks": pred.cpu()}
            if mem is not None:
                data["maskmem_features"] = mem.cpu()
            torch.save(data, tmp)
            os.replace(tmp, path)
            self._on_disk.add(frame)
        if self._keep_light is None:
            return
        while len(self._light) > self._keep_light:
            frame, parts = self._light.popitem(last=False)
            if self._ptr_file is None:
                path = os.path.join(self._spill.path, f"{self._name}-{id(self)}.pointers")
                self._ptr_file = _PointerFile(path, parts)
            if self._ptr_file.fits(parts):
                self._ptr_file.write(frame, parts)
                self._light_on_disk[frame] = True
            else:  # a record of another shape or dtype: a file of its own
                path = self._path(frame) + ".ptr"
                torch.save({"obj_ptr": parts[0].cpu(), "object_score": parts[1].cpu()}, path + ".tmp")
                os.replace(path + ".tmp", path)
                self._light_on_disk[frame] = False


class TrackedFrames:
    """frame index -> direction it was tracked in (False forward, True reverse), for one object: one
    byte per frame of the video, allocated once, so that it does not grow while tracking.

    Supports the dict operations the predictor uses (``in``, ``[]``, ``[] =``, ``pop``, ``len``, iteration
    in frame order)."""

    __slots__ = ("_flags", "_count")

    def __init__(self, num_frames: int) -> None:
        self._flags = bytearray(num_frames)  # 0 not tracked, 1 forward, 2 reverse
        self._count = 0

    def __contains__(self, frame) -> bool:
        return 0 <= frame < len(self._flags) and self._flags[frame] != 0

    def __getitem__(self, frame: int) -> bool:
        if frame not in self:
            raise KeyError(frame)
        return self._flags[frame] == 2

    def get(self, frame: int, default=None):
        return self[frame] if frame in self else default

    def __setitem__(self, frame: int, reverse: bool) -> None:
        if not 0 <= frame < len(self._flags):
            raise IndexError(f"frame {frame} is outside the video (frames 0..{len(self._flags) - 1})")
        if self._flags[frame] == 0:
            self._count += 1
        self._flags[frame] = 2 if reverse else 1

    def pop(self, frame: int, *default):
        if frame in self:
            value = self._flags[frame] == 2
            self._flags[frame] = 0
            self._count -= 1
            return value
        if default:
            return default[0]
        raise KeyError(frame)

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[int]:
        return (i for i, f in enumerate(self._flags) if f)
