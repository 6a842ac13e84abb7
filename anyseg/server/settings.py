"""Server settings: one frozen dataclass, filled by ``anyseg serve`` or by a test."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

MiB = 1024 * 1024


@dataclass(frozen=True)
class ServerSettings:
    """What the HTTP app serves and the limits it enforces.

    images_dir: folder whose images the app may list, read and encode (None: uploads only). Nothing
        outside it is ever read.
    annotations_path: COCO JSON file where accepted objects are written after every change (None:
        they are kept in memory only).
    token: when set, every ``/api/v1`` request except ``health`` needs ``Authorization: Bearer TOKEN``.
    max_request_bytes: largest request body (uploads included); larger ones get 413.
    max_pixels: largest image (width x height) accepted, checked from the header before decoding,
        against decompression bombs.
    cache_bytes: bound of the embedding cache (embedding + decoded pixels of each image).
    max_points: most prompt points in one decode request.
    browser_decoder: export the decoder to ONNX (once, cached on disk in ``decoder_dir``) so that the
        page can decode clicks itself; False keeps all decoding on the server.
    decoder_dir: where the exported decoder graphs are kept (default: ``$ANYSEG_HOME/onnx``).
    page_graph: the page's decoder graph, ``"approximate"`` (faster; masks within mask IoU 0.98 of the
        float32 decode) or ``"exact"`` (the float32 decoder), see :mod:`anyseg.server.page_decoder`.
    model_name: the name shown by ``/api/v1/models``.
    models_dir: folder of checkpoints the server may switch to without a restart (``POST
        /api/v1/models/switch``), e.g. the runs folder of ``anyseg train`` (None: only the served model).
    """

    images_dir: Optional[Path] = None
    annotations_path: Optional[Path] = None
    token: Optional[str] = None
    max_request_bytes: int = 32 * MiB
    max_pixels: int = 40_000_000
    cache_bytes: int = 1024 * MiB
    max_points: int = 64
    max_everything_points_per_side: int = 64
    browser_decoder: bool = True
    decoder_dir: Optional[Path] = None
    page_graph: str = "approximate"
    model_name: str = "model"
    models_dir: Optional[Path] = None

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_pixels", "cache_bytes", "max_points", "max_everything_points_per_side"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.page_graph not in ("approximate", "exact"):
            raise ValueError(f"page_graph must be 'approximate' or 'exact', got {self.page_graph!r}")
        if self.token is not None and not self.token.strip():
            raise ValueError("token must not be empty (leave it unset to serve without authentication)")
        if self.images_dir is not None:
            path = Path(self.images_dir).expanduser()
            if not path.is_dir():
                raise ValueError(f"images_dir must be an existing folder, got '{self.images_dir}'")
            object.__setattr__(self, "images_dir", path.resolve())
        if self.annotations_path is not None:
            path = Path(self.annotations_path).expanduser()
            if path.is_dir():
                raise ValueError(f"annotations_path must be a file name, got the folder '{self.annotations_path}'")
            object.__setattr__(self, "annotations_path", path.resolve())
        if self.models_dir is not None:
            path = Path(self.models_dir).expanduser()
            if not path.is_dir():
                raise ValueError(f"models_dir must be an existing folder, got '{self.models_dir}'")
            object.__setattr__(self, "models_dir", path.resolve())
