"""Image embeddings cached by image content hash, in an LRU bounded by memory (bytes).

An entry holds what every later request about one image needs: the ``1 x 256 x g x g`` float32
embedding (plus, for models whose decoder needs more, e.g. SAM 2's high-resolution features, those
arrays), the decoded ``H x W x 3`` uint8 RGB pixels (for "segment everything" and for showing the
image), and the two frames (original ``H x W`` and the image's ``h x w`` extent in the model frame).
All arrays count towards the bound. Concurrent requests for the same new image compute it
once: the first caller encodes, the others wait for its result.

This module is pure Python + numpy (no torch, no web framework).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import numpy as np

__all__ = ["CacheEntry", "EmbeddingCache", "CacheTooSmallError"]


class CacheTooSmallError(ValueError):
    """One entry is larger than the whole cache bound."""


@dataclass(frozen=True)
class CacheEntry:
    """One encoded image.

    id: the image content hash (hex). embedding: ``1 x C x g x g`` float32, C-contiguous.
    image: ``H x W x 3`` uint8 RGB (original frame). original_size: ``(H, W)``.
    input_size: ``(h, w)``, the image's extent in the model frame (SAM 1: resized so its long side is
    the model's input size; SAM 2: the whole square).
    name: a display name (upload file name or path relative to the served folder).
    state: the other float32 arrays the model family's decoder needs (empty for SAM 1; see
    :class:`anyseg.protocol.EncodedImage`).
    model_key: which image encoder made the embedding (see :class:`anyseg.server.engine.Engine`).
    """

    id: str
    embedding: np.ndarray
    image: np.ndarray
    original_size: Tuple[int, int]
    input_size: Tuple[int, int]
    name: str = ""
    state: Tuple[np.ndarray, ...] = ()
    model_key: str = ""
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        extra = sum(int(a.nbytes) for a in self.state)
        object.__setattr__(self, "nbytes", int(self.embedding.nbytes + self.image.nbytes) + extra)


class EmbeddingCache:
    """Thread-safe LRU of :class:`CacheEntry` keyed by id, holding at most ``max_bytes`` bytes."""

    def __init__(self, max_bytes: int) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._entries: "OrderedDict[str, CacheEntry]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._pending: Dict[str, threading.Event] = {}
        self.hits = self.misses = self.evictions = 0

    # ------------------------------------------------------------------------------------ lookups
    def get(self, key: str) -> Optional[CacheEntry]:
        """The entry for ``key`` (now most recently used), or None."""
        with self._lock:
            entry = self._hit(key)
            if entry is None:
                self.misses += 1
            return entry

    def _hit(self, key: str) -> Optional[CacheEntry]:
        """With the lock held: the entry for ``key``, marked most recently used and counted as a hit."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        return entry

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    # ------------------------------------------------------------------------------------ updates
    def put(self, entry: CacheEntry) -> CacheEntry:
        """Insert (or refresh) ``entry``, evicting least recently used entries to stay in bounds."""
        if entry.nbytes > self.max_bytes:
            raise CacheTooSmallError(
                f"the image needs {entry.nbytes} bytes of cache (embedding + pixels) but the cache holds at "
                f"most {self.max_bytes} bytes; use a smaller image or start the server with a larger cache"
            )
        with self._lock:
            old = self._entries.pop(entry.id, None)
            if old is not None:
                self._bytes -= old.nbytes
            while self._entries and self._bytes + entry.nbytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
                self.evictions += 1
            self._entries[entry.id] = entry
            self._bytes += entry.nbytes
            return entry

    def get_or_create(self, key: str, factory: Callable[[], CacheEntry]) -> Tuple[CacheEntry, bool]:
        """Return ``(entry, cached)``; on a miss, call ``factory()`` once even under concurrent callers.

        ``factory`` must return an entry whose id is ``key``. If it raises, the waiting callers retry
        (and most likely raise the same error themselves).
        """
        while True:
            with self._lock:
                entry = self._hit(key)
                if entry is not None:
                    return entry, True
                event = self._pending.get(key)
                if event is None:
                    event = self._pending[key] = threading.Event()
                    owner = True
                    self.misses += 1
                else:
                    owner = False
            if not owner:
                event.wait()
                with self._lock:
                    entry = self._hit(key)
                if entry is not None:
                    return entry, True
                continue  # the owner failed or the entry was evicted already: try again
            try:
                entry = factory()
                if entry.id != key:
                    raise RuntimeError(f"cache factory returned id {entry.id!r} for key {key!r}")
                self.put(entry)
                return entry, False
            finally:
                with self._lock:
                    self._pending.pop(key, None)
                event.set()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> Dict[str, int]:
        """``entries``, ``bytes``, ``max_bytes``, ``hits``, ``misses``, ``evictions``."""
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
            }
