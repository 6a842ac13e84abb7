"""Per-object storage of tracking outputs with bounded memory.

The reference keeps every frame's outputs for every object in memory (about 0.75 MiB per object and
frame), although tracking frame t only reads the conditioning frames, the six frames before t (memory
features) and the fifteen before t (object pointers). :class:`OutputStore` keeps the small parts of
every record (object pointer and score, about 1 KiB) in memory and the large ones (bfloat16 memory
features and low-res logits) for the most recently used frames only; older large parts are spilled to a
temporary directory and read back if a later call needs them (a propagation that starts there, a
correction click), so results are exactly those of keeping everything.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections import OrderedDict
from typing import Dict, Iterator, MutableMapping, Optional, Tuple

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
    """A :class:`FrameOutput` whose large tensors may live on disk (loaded on first access)."""

    __slots__ = ("obj_ptr", "object_score", "_heavy", "_store", "_frame")

    def __init__(self, store: "OutputStore", frame: int, obj_ptr: torch.Tensor, object_score: torch.Tensor) -> None:
        self._store = store
        self._frame = frame
        self.obj_ptr = obj_ptr
        self.object_score = object_score
        self._heavy: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None

    @property
    def pred_masks(self) -> torch.Tensor:
        return self._store._heavy_parts(self._frame)[0]

    @property
    def maskmem_features(self) -> Optional[torch.Tensor]:
        return self._store._heavy_parts(self._frame)[1]

    def materialize(self) -> FrameOutput:
        pred, mem = self._store._heavy_parts(self._frame)
        return FrameOutput(pred, self.obj_ptr, self.object_score, mem)


class OutputStore(MutableMapping):
    """frame index -> output for one object and one kind (conditioning or not).

    Args:
        spill: where large parts go when more than ``keep_in_memory`` frames hold them; None keeps
            everything in memory (the reference's behaviour).
        keep_in_memory: frames whose large parts stay in memory (least recently used are spilled).
    """

    def __init__(self, spill: Optional[SpillDir], keep_in_memory: int = 8, name: str = "out") -> None:
        self._spill = spill
        self._keep = max(1, int(keep_in_memory))
        self._name = name
        self._light: Dict[int, StoredOutput] = {}
        self._heavy: "OrderedDict[int, Tuple[torch.Tensor, Optional[torch.Tensor]]]" = OrderedDict()
        self._on_disk: Dict[int, str] = {}

    # -------------------------------------------------------------------------------- mapping API
    def __getitem__(self, frame: int) -> StoredOutput:
        return self._light[frame]

    def __setitem__(self, frame: int, out) -> None:
        if isinstance(out, StoredOutput):
            out = out.materialize()
        self._drop_heavy(frame)
        self._light[frame] = StoredOutput(self, frame, out.obj_ptr, out.object_score)
        self._heavy[frame] = (out.pred_masks, out.maskmem_features)
        self._evict()

    def __delitem__(self, frame: int) -> None:
        del self._light[frame]
        self._drop_heavy(frame)

    def __iter__(self) -> Iterator[int]:
        return iter(self._light)

    def __len__(self) -> int:
        return len(self._light)

    def set_memory(self, frame: int, maskmem_features: torch.Tensor) -> None:
        """Attach memory features to a stored output (encoded when tracking starts)."""
        pred, _ = self._heavy_parts(frame)
        self._heavy[frame] = (pred, maskmem_features)
        self._heavy.move_to_end(frame)
        path = self._on_disk.pop(frame, None)
        if path is not None:
            os.unlink(path)
        self._evict()

    def clear(self) -> None:
        for frame in list(self._light):
            del self[frame]

    @property
    def frames_in_memory(self) -> int:
        """How many frames hold their large parts in memory now."""
        return len(self._heavy)

    # -------------------------------------------------------------------------------- internals
    def _heavy_parts(self, frame: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        parts = self._heavy.get(frame)
        if parts is not None:
            self._heavy.move_to_end(frame)
            return parts
        path = self._on_disk.pop(frame, None)
        if path is None:
            raise KeyError(frame)
        data = torch.load(path, weights_only=True)
        os.unlink(path)
        parts = (data["pred_masks"], data.get("maskmem_features"))
        self._heavy[frame] = parts
        self._evict()
        return parts

    def _drop_heavy(self, frame: int) -> None:
        self._heavy.pop(frame, None)
        path = self._on_disk.pop(frame, None)
        if path is not None and os.path.exists(path):
            os.unlink(path)

    def _evict(self) -> None:
        if self._spill is None:
            return
        while len(self._heavy) > self._keep:
            frame, (pred, mem) = self._heavy.popitem(last=False)
            path = os.path.join(self._spill.path, f"{self._name}-{id(self)}-{frame}.pt")
            tmp = path + ".tmp"
            data = {"pred_masks": pred.cpu()}
            if mem is not None:
                data["maskmem_features"] = mem.cpu()
            torch.save(data, tmp)
            os.replace(tmp, path)
            self._on_disk[frame] = path
