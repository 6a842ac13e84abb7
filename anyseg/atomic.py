"""Atomic file writes: a file either appears complete under its final name or not at all.

Everything is first written to a temporary file beside the target (``.NAME.tmp-XXXXXXXX`` in the same
directory, so the final ``os.replace`` is a rename on one file system), flushed and fsynced, then
renamed over the target. If anything fails on the way the temporary file is removed and the target
is left untouched. Readers therefore never see a half-written file, and "the file exists" can be
taken to mean "the file is complete" (which is what resumable batch runs rely on).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
from pathlib import Path
from typing import IO, Any, Iterator, Optional, Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["atomic_write", "write_bytes_atomic", "write_json_atomic", "write_png_atomic"]


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", *, encoding: Optional[str] = None) -> Iterator[IO[Any]]:
    """Open a temporary file for writing that replaces ``path`` only when the block succeeds.

    Args:
        path: the final file name. Missing parent directories are created.
        mode: ``"wb"`` (bytes) or ``"w"`` (text; UTF-8 unless ``encoding`` says otherwise).
    Yields:
        The open file object. On a normal exit the data is fsynced and renamed onto ``path``; on any
        exception the temporary file is deleted, ``path`` keeps its previous content (or stays
        absent) and the exception propagates.
    """
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"atomic_write supports modes 'w', 'wt' and 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    if "b" in mode:
        handle = open(tmp, "xb")
    else:
        handle = open(tmp, "x", encoding=encoding or "utf-8", newline="")
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform allows opening a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_write(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_json_atomic(path: PathLike, obj: Any, indent: Optional[int] = None) -> Path:
    """Serialise ``obj`` as UTF-8 JSON and write it atomically; returns the path.

    The object is serialised before the file is opened, so an unserialisable object leaves nothing
    behind (not even a temporary file). Numpy scalars and arrays are converted to Python numbers and
    lists.
    """
    text = json.dumps(obj, indent=indent, default=_json_default, ensure_ascii=False)
    return write_bytes_atomic(path, text.encode("utf-8"))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"object of type {type(value).__name__} is not JSON serialisable")


def _to_pil(image: Any):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.ndim == 2:
        if array.dtype == np.uint16:
            return Image.fromarray(array)  # 16-bit grayscale PNG (label maps with > 255 labels)
        if array.dtype != np.uint8:
            raise ValueError(f"a 2-D PNG image must be bool, uint8 or uint16, got {array.dtype}")
        return Image.fromarray(array)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        if array.dtype != np.uint8:
            raise ValueError(f"a colour PNG image must be uint8, got {array.dtype}")
        return Image.fromarray(np.ascontiguousarray(array))
    raise ValueError(
        f"expected an image of shape HxW, HxWx3 or HxWx4 (bool, uint8; uint16 for HxW), got shape {array.shape}"
    )


def write_png_atomic(path: PathLike, image: Any) -> Path:
    """Write an image as PNG atomically; returns the path.

    Args:
        image: a PIL image, or an array: ``H x W`` bool (written as 0/255), ``H x W`` uint8 or uint16
            (grayscale), ``H x W x 3`` uint8 (RGB) or ``H x W x 4`` uint8 (RGBA).
    """
    pil = _to_pil(image)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return write_bytes_atomic(path, buffer.getvalue())
