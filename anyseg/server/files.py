"""Read-only access to the served image folder, refusing every path that leaves it.

A request names an image by its path relative to the folder, with ``/`` separators. The path must be
relative, free of ``..`` and NUL, resolve (symbolic links followed) to a regular file inside the
folder, and have an image extension. Anything else is answered as "not found", so that the answer
does not tell which files exist outside.
"""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import List

from ..imageio import IMAGE_EXTENSIONS


#: Media type of each image extension, as the folder's files are served.
IMAGE_MEDIA_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".bmp": "image/bmp",
                     ".tif": "image/tiff", ".tiff": "image/tiff", ".webp": "image/webp", ".gif": "image/gif"}


def media_type(path: Path) -> str:
    """The media type a served image file is answered with."""
    return IMAGE_MEDIA_TYPES.get(Path(path).suffix.lower(), "application/octet-stream")


class OutsideFolderError(LookupError):
    """The path is not an image inside the served folder."""


class ImageFolder:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def list(self, limit: int = 10_000) -> List[str]:
        """Image paths relative to the folder (sorted, hidden files and folders skipped)."""
        out: List[str] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                full = Path(dirpath) / name
                try:
                    rel = self.resolve(full.relative_to(self.root).as_posix())
                except OutsideFolderError:
                    continue  # e.g. a link pointing out of the folder
                out.append(rel.relative_to(self.root).as_posix())
                if len(out) >= limit:
                    return out
        return out

    def resolve(self, relative: str) -> Path:
        """The real path of image ``relative``; OutsideFolderError unless it is an image inside the folder."""
        if not isinstance(relative, str) or not relative or "\x00" in relative or "\\" in relative:
            raise OutsideFolderError(f"no image {relative!r} in the served folder")
        pure = PurePosixPath(relative)
        if pure.is_absolute() or any(part in ("..", "") for part in pure.parts) or relative.startswith("~"):
            raise OutsideFolderError(f"no image {relative!r} in the served folder")
        try:
            target = (self.root / pure).resolve()
            target.relative_to(self.root)
            is_image = target.is_file() and target.suffix.lower() in IMAGE_EXTENSIONS
        except (ValueError, OSError):   # outside, or a name the file system refuses (too long, ...)
            raise OutsideFolderError(f"no image {relative!r} in the served folder") from None
        if not is_image:
            raise OutsideFolderError(f"no image {relative!r} in the served folder")
        return target
