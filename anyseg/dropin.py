"""The reference's model builders: ``sam_model_registry`` and ``build_sam_vit_h/l/b/t``.

Code written for ``segment_anything`` (or MobileSAM's package) builds its model with::

    sam = sam_model_registry["vit_b"](checkpoint="sam_vit_b_01ec64.pth")

Here each builder is ``(checkpoint=None) -> Sam``: without a checkpoint it returns the named
architecture with random initialisation (eval mode), as the reference does; with one it loads the
file through :func:`anyseg.load_model`, so the architecture is read from the file, every key is
checked (one :class:`anyseg.CheckpointError` listing what is wrong) and a registered name such as
``"vit_b"`` resolves through the checkpoint cache. A file of another architecture than the key
names loads as what it is, with a warning (the reference fails on a shape mismatch instead).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import replace
from typing import Callable, Dict, Optional, Union

from .checkpoint import CheckpointError, load_model
from .config import HQ_VARIANTS, VARIANTS, SamConfig
from .modeling.sam import Sam
from .modeling.sam import build_sam as _build_from_config

__all__ = ["sam_model_registry", "build_sam", "build_sam_vit_h", "build_sam_vit_l", "build_sam_vit_b",
           "build_sam_vit_t", "sam_hq_model_registry", "build_sam_hq_vit_h", "build_sam_hq_vit_l",
           "build_sam_hq_vit_b", "build_sam_hq_vit_tiny"]

Checkpoint = Union[str, "os.PathLike[str]", None]


def _describe(config: SamConfig) -> str:
    enc = config.encoder
    if enc.kind == "vit":
        return f"ViT (embed_dim {enc.embed_dim}, depth {enc.depth}, heads {enc.num_heads}, {enc.img_size} px)"
    return f"TinyViT (embed_dims {tuple(enc.embed_dims)}, depths {tuple(enc.depths)}, {enc.img_size} px)"


def _build(variant: str, checkpoint: Checkpoint) -> Sam:
    expected = VARIANTS[variant] if variant in VARIANTS else HQ_VARIANTS[variant]
    if checkpoint is None:
        return _build_from_config(expected).eval()
    model = load_model(checkpoint)
    if not isinstance(model, Sam):
        raise CheckpointError(f"{os.fspath(checkpoint)} is not a SAM 1 checkpoint (it holds a "
                              f"{type(model).__name__}); load it with anyseg.load_model or anyseg.build_sam2")
    # HQ-SAM is SAM plus decoder keys: an HQ file under a SAM name (or the reverse) is the same encoder,
    # and segment-anything-hq code passes HQ files to the SAM names, so only the architecture is compared.
    if replace(model.config, hq=None) != replace(expected, hq=None):
        warnings.warn(f"sam_model_registry[{variant!r}]: {os.fspath(checkpoint)} holds a "
                      f"{_describe(model.config)}, not {variant} ({_describe(expected)}); it was loaded as "
                      "the architecture the file holds", UserWarning, stacklevel=3)
    return model


def build_sam_vit_h(checkpoint: Checkpoint = None) -> Sam:
    """SAM ViT-H (632M parameters): random initialisation, or ``checkpoint`` loaded by ``load_model``."""
    return _build("vit_h", checkpoint)


def build_sam_vit_l(checkpoint: Checkpoint = None) -> Sam:
    """SAM ViT-L (308M parameters): random initialisation, or ``checkpoint`` loaded by ``load_model``."""
    return _build("vit_l", checkpoint)


def build_sam_vit_b(checkpoint: Checkpoint = None) -> Sam:
    """SAM ViT-B (91M parameters): random initialisation, or ``checkpoint`` loaded by ``load_model``."""
    return _build("vit_b", checkpoint)


def build_sam_vit_t(checkpoint: Checkpoint = None) -> Sam:
    """MobileSAM's TinyViT (5.7M parameters): random initialisation, or ``checkpoint`` loaded by ``load_model``."""
    return _build("vit_t", checkpoint)


def build_sam(config: Union[SamConfig, str, "os.PathLike[str]", None] = None,
              checkpoint: Checkpoint = None) -> Sam:
    """Build a SAM from a config, or as the reference's ``build_sam`` (ViT-H) from a checkpoint.

    - ``build_sam(config)``: an untrained model of that :class:`SamConfig` (in training mode, as
      :func:`anyseg.modeling.sam.build_sam`); with ``checkpoint=`` as well, the file loaded into that
      architecture by ``load_model(checkpoint, config=config)``.
    - ``build_sam()``, ``build_sam(checkpoint=path)`` or ``build_sam(path)``: the reference form,
      :func:`build_sam_vit_h`.
    """
    if isinstance(config, SamConfig):
        if checkpoint is None:
            return _build_from_config(config)
        return load_model(checkpoint, config=config)
    if config is not None:
        if not isinstance(config, (str, os.PathLike)):
            raise TypeError(f"build_sam takes a SamConfig or a checkpoint path, got {type(config).__name__}")
        if checkpoint is not None:
            raise TypeError("build_sam got two checkpoints: pass the path once, as checkpoint=")
        checkpoint = config
    return build_sam_vit_h(checkpoint)


def build_sam_hq_vit_h(checkpoint: Checkpoint = None) -> Sam:
    """HQ-SAM ViT-H: random initialisation, or ``checkpoint`` (``sam_hq_vit_h.pth``) loaded by ``load_model``."""
    return _build("hq_vit_h", checkpoint)


def build_sam_hq_vit_l(checkpoint: Checkpoint = None) -> Sam:
    """HQ-SAM ViT-L: random initialisation, or ``checkpoint`` (``sam_hq_vit_l.pth``) loaded by ``load_model``."""
    return _build("hq_vit_l", checkpoint)


def build_sam_hq_vit_b(checkpoint: Checkpoint = None) -> Sam:
    """HQ-SAM ViT-B: random initialisation, or ``checkpoint`` (``sam_hq_vit_b.pth``) loaded by ``load_model``."""
    return _build("hq_vit_b", checkpoint)


def build_sam_hq_vit_tiny(checkpoint: Checkpoint = None) -> Sam:
    """Light HQ-SAM (TinyViT): random initialisation, or ``checkpoint`` (``sam_hq_vit_tiny.pth``)."""
    return _build("hq_vit_tiny", checkpoint)


#: ``model_type -> builder(checkpoint=None)``, with the reference's keys (``default`` is ViT-H),
#: MobileSAM's ``vit_t`` and Light HQ-SAM's ``vit_tiny``. A checkpoint decides what is built: an HQ-SAM
#: file under ``vit_b`` gives HQ-SAM ViT-B, as ``segment_anything_hq.sam_model_registry`` does.
sam_model_registry: Dict[str, Callable[..., Sam]] = {
    "default": build_sam_vit_h,
    "vit_h": build_sam_vit_h,
    "vit_l": build_sam_vit_l,
    "vit_b": build_sam_vit_b,
    "vit_t": build_sam_vit_t,
    "vit_tiny": build_sam_hq_vit_tiny,
}

#: The registry of the ``segment-anything-hq`` package (``from segment_anything_hq import
#: sam_model_registry``): the same names, every builder HQ-SAM (also without a checkpoint).
sam_hq_model_registry: Dict[str, Callable[..., Sam]] = {
    "default": build_sam_hq_vit_h,
    "vit_h": build_sam_hq_vit_h,
    "vit_l": build_sam_hq_vit_l,
    "vit_b": build_sam_hq_vit_b,
    "vit_tiny": build_sam_hq_vit_tiny,
}
