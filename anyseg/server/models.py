"""The models a server can switch to without a restart: the one it started with and the checkpoint
files of its ``--models`` folder (e.g. the runs folder of ``anyseg train``).

A model is named by the name it was served under (the ``--model`` argument) or by its file's path
relative to the folder (POSIX separators). Nothing outside the folder is ever loaded: names are looked
up in the listing, never used as paths. ``last.pt`` files (the trainer's resumable state, not a model)
are not listed.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors")
SKIPPED_NAMES = ("last.pt",)
MAX_DEPTH = 4
MAX_MODELS = 1000


class UnknownModelError(LookupError):
    """The name is not one of the models the server may switch to."""


class ModelCatalog:
    """The served model (kept in memory, so switching back to it is instant) and the checkpoints of
    ``folder`` (loaded when switched to, on the served model's device)."""

    def __init__(self, initial_name: str, initial_model, folder: Optional[Path] = None) -> None:
        self.initial_name = initial_name
        self.initial_model = initial_model
        self.folder = Path(folder).resolve() if folder is not None else None

    def files(self) -> List[str]:
        """Checkpoint files of the folder, relative POSIX paths, sorted (hidden entries skipped)."""
        if self.folder is None or not self.folder.is_dir():
            return []
        out: List[str] = []
        for dirpath, dirnames, filenames in os.walk(self.folder):
            depth = len(Path(dirpath).relative_to(self.folder).parts)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if depth < MAX_DEPTH else []
            for name in sorted(filenames):
                if name.startswith(".") or name in SKIPPED_NAMES or Path(name).suffix.lower() not in CHECKPOINT_SUFFIXES:
                    continue
                full = Path(dirpath) / name
                if not full.resolve().is_relative_to(self.folder):  # a link out of the folder
                    continue
                out.append(full.relative_to(self.folder).as_posix())
                if len(out) >= MAX_MODELS:
                    return sorted(out)
        return sorted(out)

    def names(self) -> List[str]:
        return [self.initial_name] + [f for f in self.files() if f != self.initial_name]

    def load(self, name: str, device):
        """The model called ``name``: UnknownModelError when it is not listed, ValueError when its file
        is not a model anyseg can load."""
        if name == self.initial_name:
            return self.initial_model
        if name not in self.files():
            raise UnknownModelError(f"no model {name!r} to switch to: expected one of GET /api/v1/models "
                                    f"({', '.join(self.names()[:20])})")
        from ..checkpoint import load_model

        path = self.folder / name
        try:
            return load_model(path, device=device)
        except (OSError, RuntimeError, KeyError, NotImplementedError) as exc:
            raise ValueError(f"could not load model {name!r}: {type(exc).__name__}: {exc}") from exc
