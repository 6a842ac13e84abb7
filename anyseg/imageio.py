"""Image loading: any image in, an ``HxWx3`` ``uint8`` RGB numpy array out.

This module depends only on numpy and Pillow (no torch), so that runtimes without torch can use it.

Public functions
----------------
``load_image(source, image_format="RGB", max_pixels=None) -> np.ndarray``
    Decode a path, encoded bytes, a ``PIL.Image.Image`` or a numpy array into a C-contiguous, writable
    ``(H, W, 3)`` ``uint8`` RGB array.
``image_size(source) -> (H, W)``
    The height and width ``load_image`` would return, without a full decode where possible.
``list_images(inputs, recursive=True) -> list[Path]``
    Expand files, folders and glob patterns into a sorted, de-duplicated list of image paths.

Conversion rules
----------------
* Arrays: ``HxW`` and ``HxWx1`` are grayscale (replicated to 3 channels), ``HxWx4`` has its alpha
  channel dropped (colour channels kept as they are, no compositing).
* dtypes: ``uint8`` as is; ``uint16`` keeps its high byte (``value >> 8``, so 65535 -> 255 and
  32896 -> 128); ``bool`` -> 0 / 255; floating point is accepted only when every value lies in
  ``[0, 1]`` and is then scaled by 255 and rounded. Anything else raises ``ValueError``.
* ``image_format="BGR"`` reverses the channel order of a 3- or 4-channel array input (OpenCV order).
  Files, bytes and PIL images are always decoded as RGB, whatever ``image_format`` says.
* Files and bytes have their EXIF orientation applied (``PIL.ImageOps.exif_transpose``); PIL images
  passed in are used as given. Multi-frame files (GIF, TIFF) yield their first frame.
* Pillow modes: ``1``, ``L``, ``LA``, ``P`` (with or without transparency), ``PA``, ``RGB``, ``RGBA``,
  ``RGBX``, ``RGBa``, ``CMYK``, ``YCbCr``, ``HSV``, 16-bit ``I;16*`` (scaled like ``uint16``), 32-bit
  ``I`` (read as 16-bit data: clipped to ``[0, 65535]`` then scaled like ``uint16``; this is how
  older Pillow versions open 16-bit PNGs) and ``F`` (float, same rule as float arrays).

Errors
------
Every malformed input raises ``ValueError`` with what was expected and what was found; a path that
does not exist raises ``FileNotFoundError`` naming it; a source of an unsupported type (a list, a
tensor, ...) raises ``TypeError``.
"""
from __future__ import annotations

import glob
import io
import os
from pathlib import Path
from typing import Iterable, Union

import numpy as np
from PIL import Image, ImageOps

__all__ = ["IMAGE_EXTENSIONS", "ImageSource", "load_image", "image_size", "list_images"]

#: File extensions (lower case) that ``list_images`` treats as images when scanning folders and globs.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"})

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Image.Image, np.ndarray]

_IMAGE_FORMATS = ("RGB", "BGR")
_SHAPE_HELP = "expected an HxW, HxWx1, HxWx3 or HxWx4 image array"
_EXIF_ORIENTATION = 0x0112
_GLOB_CHARS = frozenset("*?[")


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def load_image(source: ImageSource, image_format: str = "RGB", max_pixels: int | None = None) -> np.ndarray:
    """Load ``source`` as a C-contiguous, writable ``(H, W, 3)`` ``uint8`` RGB array.

    Args:
        source: a path (``str`` or ``os.PathLike``) to an image file; the encoded file content as
            ``bytes`` / ``bytearray`` / ``memoryview``; a ``PIL.Image.Image``; or a numpy array of
            shape ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` with dtype ``uint8``,
            ``uint16``, ``bool`` or float (values in ``[0, 1]``).
        image_format: channel order of an array ``source``: ``"RGB"`` or ``"BGR"`` (a BGR / BGRA
            array is reversed to RGB). Files, bytes and PIL images are always decoded as RGB; the
            argument must still be one of the two values.
        max_pixels: if given, refuse images whose ``width * height`` exceeds it. For files and bytes
            this is checked from the header, before the pixel data is decoded. Pillow's own guard
            (``PIL.Image.MAX_IMAGE_PIXELS``) applies as well; ``None`` leaves only Pillow's.

    Returns:
        ``np.ndarray`` of shape ``(H, W, 3)``, dtype ``uint8``, RGB order, never sharing memory with
        ``source``.

    Raises:
        FileNotFoundError: ``source`` is a path that does not exist.
        ValueError: bad ``image_format`` / ``max_pixels``, a wrong array shape or dtype, an empty
            image, an empty / corrupt / truncated file, a directory, or too many pixels.
        TypeError: ``source`` is none of the supported types.
    """
    if image_format not in _IMAGE_FORMATS:
        raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
    _check_max_pixels_arg(max_pixels)

    if isinstance(source, np.ndarray):
        arr = np.asarray(source)
        h, w = _array_hw(arr)
        _check_pixels(h, w, max_pixels, "image array")
        return _array_to_rgb(arr, bgr=image_format == "BGR")

    if isinstance(source, Image.Image):
        _check_pixels(source.height, source.width, max_pixels, "PIL image")
        _decode(source, "PIL image")
        return _pil_to_rgb(source)

    if isinstance(source, (bytes, bytearray, memoryview)):
        data = _as_bytes(source)
        with _open_bytes(data) as img:
            return _decode_opened(img, f"image data ({len(data)} bytes)", max_pixels)

    if isinstance(source, (str, os.PathLike)):
        path = _check_path(source)
        with open(path, "rb") as fh:
            with _open_file(fh, path) as img:
                return _decode_opened(img, f"image file '{path}'", max_pixels)

    raise TypeError(
        "expected a path, encoded image bytes, a PIL.Image.Image or a numpy array, "
        f"got {type(source).__module__}.{type(source).__qualname__}"
    )


def image_size(source: ImageSource) -> tuple[int, int]:
    """Return ``(H, W)`` of ``source``: the first two dimensions ``load_image(source)`` would return.

    Files and bytes are only opened (header and EXIF), not decoded; EXIF orientations 5-8 (the ones
    that rotate by 90 degrees) swap height and width. PIL images report their own size, and arrays
    their shape after the same shape checks as ``load_image``.

    Raises the same ``FileNotFoundError`` / ``ValueError`` / ``TypeError`` as ``load_image`` for
    missing paths, directories, empty or unreadable files and malformed arrays.
    """
    if isinstance(source, np.ndarray):
        return _array_hw(np.asarray(source))

    if isinstance(source, Image.Image):
        return int(source.height), int(source.width)

    if isinstance(source, (bytes, bytearray, memoryview)):
        with _open_bytes(_as_bytes(source)) as img:
            return _oriented_hw(img)

    if isinstance(source, (str, os.PathLike)):
        path = _check_path(source)
        with open(path, "rb") as fh:
            with _open_file(fh, path) as img:
                return _oriented_hw(img)

    raise TypeError(
        "expected a path, encoded image bytes, a PIL.Image.Image or a numpy array, "
        f"got {type(source).__module__}.{type(source).__qualname__}"
    )


def list_images(
    inputs: Iterable[str | os.PathLike[str]] | str | os.PathLike[str], recursive: bool = True
) -> list[Path]:
    """Expand files, folders and glob patterns into a sorted, de-duplicated list of image paths.

    * An existing file is kept whatever its extension (it was named explicitly).
    * A folder contributes the files in it whose extension is in ``IMAGE_EXTENSIONS`` (case
      insensitive), descending into sub-folders when ``recursive`` is true. Hidden files and folders
      (names starting with ``.``) inside it are skipped.
    * A pattern containing ``*``, ``?`` or ``[...]`` is expanded with :func:`glob.glob` (``**``
      matches any number of folders); matched files are kept if they have an image extension and
      matched folders are scanned as above.

    A single path or pattern may be passed instead of a list. ``~`` is expanded. Paths are returned
    as found (not resolved), de-duplicated by absolute path and sorted.

    Raises:
        FileNotFoundError: an input is a missing path, a pattern that matches no image, or a folder
            that holds no image; the message names it.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]

    found: dict[str, Path] = {}
    for item in inputs:
        text = os.path.expanduser(os.fspath(item))
        path = Path(text)
        if path.is_file():
            matches = [path]
        elif path.is_dir():
            matches = _scan_folder(path, recursive)
            if not matches:
                raise FileNotFoundError(f"no images ({_ext_list()}) found in folder '{item}'")
        elif any(c in text for c in _GLOB_CHARS):
            matches = []
            for hit in sorted(glob.glob(text, recursive=True)):
                hit_path = Path(hit)
                if hit_path.is_dir():
                    matches.extend(_scan_folder(hit_path, recursive))
                elif hit_path.is_file() and _is_image_name(hit_path):
                    matches.append(hit_path)
            if not matches:
                raise FileNotFoundError(f"no images matched the pattern '{item}'")
        else:
            raise FileNotFoundError(f"no such file or folder: '{item}'")
        for match in matches:
            found.setdefault(os.path.abspath(match), match)
    return sorted(found.values())


# --------------------------------------------------------------------------------------------------
# Arrays
# --------------------------------------------------------------------------------------------------
def _array_hw(arr: np.ndarray) -> tuple[int, int]:
    """Validate an image array's shape and return its ``(H, W)``; raise ``ValueError`` otherwise."""
    ok = arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4))
    if not ok:
        hint = ""
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (1, 3, 4):
            hint = " (channels-first arrays must be transposed to HxWxC, e.g. arr.transpose(1, 2, 0))"
        raise ValueError(f"{_SHAPE_HELP}, got shape {tuple(arr.shape)}{hint}")
    h, w = int(arr.shape[0]), int(arr.shape[1])
    if h == 0 or w == 0:
        raise ValueError(f"image array is empty: got shape {tuple(arr.shape)} (height and width must be > 0)")
    return h, w


def _array_to_rgb(arr: np.ndarray, bgr: bool = False) -> np.ndarray:
    """Convert a validated-shape image array to a new C-contiguous ``(H, W, 3)`` ``uint8`` array."""
    _array_hw(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3:
        arr = arr[:, :, :3]  # drop alpha
        if bgr:
            arr = arr[:, :, ::-1]
    arr = _to_uint8(arr)
    if arr.ndim == 2:
        out = np.empty(arr.shape + (3,), dtype=np.uint8)
        out[...] = arr[:, :, None]
        return out
    return np.array(arr, dtype=np.uint8, order="C", copy=True)


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Map pixel values to ``uint8`` following the module's dtype rules (may return a view)."""
    kind, size = arr.dtype.kind, arr.dtype.itemsize
    if kind == "u" and size == 1:
        return arr
    if kind == "u" and size == 2:
        return (arr.astype(np.uint16) >> 8).astype(np.uint8)
    if kind == "b":
        return arr.astype(np.uint8) * np.uint8(255)
    if kind == "f":
        values = arr.astype(np.float32) if size < 4 else arr
        if not np.isfinite(values).all():
            raise ValueError("float image array contains NaN or infinite values; expected values in [0, 1]")
        lo, hi = float(values.min()), float(values.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"float image arrays must hold values in [0, 1] (they are scaled by 255), got values in "
                f"[{lo:g}, {hi:g}]; pass 0-255 data as uint8 (e.g. arr.astype(np.uint8))"
            )
        return np.rint(values * 255.0).astype(np.uint8)
    raise ValueError(
        f"unsupported image array dtype {arr.dtype}; expected uint8, uint16, bool or a float type "
        "with values in [0, 1]"
    )


# --------------------------------------------------------------------------------------------------
# Pillow
# --------------------------------------------------------------------------------------------------
def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    """Convert a decoded PIL image of any supported mode to a ``(H, W, 3)`` ``uint8`` RGB array."""
    if img.width == 0 or img.height == 0:
        raise ValueError(f"image is empty: got size {img.width}x{img.height} (width x height)")
    mode = img.mode
    if mode in ("RGB", "RGBA", "RGBX", "L", "1", "F") or mode.startswith("I;16"):
        arr = np.asarray(img)
    elif mode == "LA":
        arr = np.asarray(img)[:, :, 0]
    elif mode == "La":
        arr = np.asarray(img.convert("LA"))[:, :, 0]
    elif mode in ("RGBa", "PA") or (mode == "P" and "transparency" in img.info):
        arr = np.asarray(img.convert("RGBA"))
    elif mode == "I":
        arr = np.clip(np.asarray(img), 0, 65535).astype(np.uint16)
    else:
        try:
            arr = np.asarray(img.convert("RGB"))
        except (ValueError, OSError) as exc:
            raise ValueError(f"unsupported image mode {mode!r}: {exc}") from exc
    if arr.dtype.kind == "i":  # e.g. a signed 16-bit mode: read as 16-bit data like mode "I"
        arr = np.clip(arr, 0, 65535).astype(np.uint16)
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4))):
        raise ValueError(f"unsupported image mode {mode!r} (decoded to shape {arr.shape})")
    return _array_to_rgb(arr)


def _decode(img: Image.Image, what: str) -> None:
    """Fully decode ``img`` so that truncated or corrupt data fails here, as ``ValueError``."""
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise ValueError(f"could not decode {what}: {exc}") from exc


def _decode_opened(img: Image.Image, what: str, max_pixels: int | None) -> np.ndarray:
    """Check size, decode, apply EXIF orientation and convert an image opened from a file or bytes."""
    _check_pixels(img.height, img.width, max_pixels, what)
    _decode(img, what)
    try:
        oriented = ImageOps.exif_transpose(img)
    except Exception:  # malformed EXIF metadata: keep the pixels as stored
        oriented = img
    if oriented is None:  # in-place variants of exif_transpose return None
        oriented = img
    return _pil_to_rgb(oriented)


def _open_file(fh, path: Path) -> Image.Image:
    try:
        return Image.open(fh)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise ValueError(f"could not decode image file '{path}': {exc}") from exc


def _open_bytes(data: bytes) -> Image.Image:
    if not data:
        raise ValueError("image data is empty (0 bytes); expected the content of an encoded image file")
    try:
        return Image.open(io.BytesIO(data))
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise ValueError(f"could not decode image data ({len(data)} bytes): {exc}") from exc


def _oriented_hw(img: Image.Image) -> tuple[int, int]:
    """``(H, W)`` of an opened image after its EXIF orientation (5-8 swap the two)."""
    h, w = int(img.height), int(img.width)
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # malformed EXIF metadata is ignored, as in load_image
        orientation = 1
    if orientation in (5, 6, 7, 8):
        h, w = w, h
    return h, w


# --------------------------------------------------------------------------------------------------
# Small checks
# --------------------------------------------------------------------------------------------------
def _as_bytes(data: bytes | bytearray | memoryview) -> bytes:
    return data if isinstance(data, bytes) else bytes(data)


def _check_path(source: str | os.PathLike[str]) -> Path:
    path = Path(os.path.expanduser(os.fspath(source)))
    if not path.exists():
        raise FileNotFoundError(f"image file not found: '{path}'")
    if path.is_dir():
        raise ValueError(f"expected an image file, got a directory: '{path}'")
    if path.stat().st_size == 0:
        raise ValueError(f"image file '{path}' is empty (0 bytes)")
    return path


def _check_max_pixels_arg(max_pixels: int | None) -> None:
    if max_pixels is None:
        return
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive integer or None, got {max_pixels!r}")


def _check_pixels(h: int, w: int, max_pixels: int | None, what: str) -> None:
    if max_pixels is not None and h * w > max_pixels:
        raise ValueError(
            f"{what} has {w}x{h} = {w * h} pixels (width x height), more than max_pixels={int(max_pixels)}"
        )


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _ext_list() -> str:
    return ", ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))


def _scan_folder(folder: Path, recursive: bool) -> list[Path]:
    """Image files in ``folder`` (and its sub-folders when ``recursive``), skipping hidden entries."""
    out: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        for name in sorted(files):
            if name.startswith("."):
                continue
            candidate = Path(root) / name
            if _is_image_name(candidate) and candidate.is_file():
                out.append(candidate)
    return out
