"""Pipelines that feed SAM prompts from elsewhere or use its masks downstream, on any anyseg image model
(SAM 1, HQ-SAM, SAM 2 / 2.1) through :func:`anyseg.protocol.make_predictor`:

* :mod:`anyseg.beyond.text`: text prompts (Grounded SAM): a box source turns a caption into boxes with
  phrase labels, SAM turns the boxes into masks.
* :mod:`anyseg.beyond.personalize`: one-shot personalization (PerSAM, training-free).
* :mod:`anyseg.beyond.remove`: object removal (Inpaint Anything): mask, dilate, fill.
* :mod:`anyseg.beyond.medical`: medical volumes (MedSAM): its preprocessing, windowing and slice-by-slice
  propagation of a box through a NIfTI or DICOM volume.

The optional dependencies are imported only when used; a missing one raises :class:`MissingExtra`, which
names the extra to install.
"""
from __future__ import annotations

import importlib


class MissingExtra(ImportError, ValueError):
    """An optional dependency is not installed; the message names the ``anyseg[...]`` extra that has it."""


def require(module: str, extra: str, what: str):
    """Import ``module`` or raise :class:`MissingExtra` naming ``pip install 'anyseg[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(f"{what} needs the optional package {module.split('.')[0]!r}, which is not installed: "
                           f"pip install 'anyseg[{extra}]'") from exc


__all__ = ["MissingExtra", "require"]
