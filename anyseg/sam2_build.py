"""The reference's SAM 2 builders, with its signatures: ``build_sam2``, ``build_sam2_video_predictor`` and
their Hugging Face variants. Programs written for the reference port by changing the import::

    from anyseg import build_sam2, build_sam2_video_predictor
    model = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", "sam2.1_hiera_tiny.pt")
    predictor = build_sam2_video_predictor("my_model.yaml", "my_model.pt")

``config_file`` is a public config name (``configs/sam2.1/sam2.1_hiera_t.yaml``, ``sam2.1_hiera_t``, ...;
no file needed) or the path of a config file in the reference's YAML format (see :mod:`anyseg.sam2_yaml`).
``hydra_overrides_extra`` takes the reference's ``++model.<setting>=<value>`` strings. Loading is strict,
and the config is checked against the checkpoint's keys (every disagreement is reported).
"""
from __future__ import annotations

import inspect
import os
import re
import warnings
from typing import Any, Dict, List, Sequence, Tuple, Union

from .config_sam2 import Sam2Config
from .sam2_yaml import IMAGE_POSTPROCESSING, VIDEO_POSTPROCESSING, load_sam2_config

__all__ = ["build_sam2", "build_sam2_video_predictor", "build_sam2_hf", "build_sam2_video_predictor_hf"]

ConfigFile = Union[str, os.PathLike, Sam2Config]
# Reference video-predictor constructor options that its builder takes as ``++model.<name>=`` overrides.
_PREDICTOR_OPTIONS = ("non_overlap_masks", "clear_non_cond_mem_around_input", "add_all_frames_to_correct_as_cond")
_PREDICTOR_OVERRIDE = re.compile(r"^\+{0,2}model\.(" + "|".join(_PREDICTOR_OPTIONS) + r")=(.*)$", re.S)


def _model(config: Sam2Config, config_file, ckpt_path, device, mode: str):
    from .modeling.sam2 import build_sam2_model

    if ckpt_path is None:
        model = build_sam2_model(config)  # random initialisation, as the reference without a checkpoint
    else:
        from .checkpoint import read_state_dict
        from .hub import resolve_checkpoint
        from .sam2_checkpoint import sam2_model_from_state_dict

        path = resolve_checkpoint(ckpt_path)
        name = "the given Sam2Config" if isinstance(config_file, Sam2Config) else f"config {os.fspath(config_file)}"
        model = sam2_model_from_state_dict(read_state_dict(path), config=config, checkpoint_path=path,
                                           config_source=name)
    model = model.to(device)
    if mode == "eval":
        model.eval()
    else:
        model.train()
    return model


def build_sam2(config_file: ConfigFile, ckpt_path: Union[str, os.PathLike, None] = None, device="cpu",
               mode: str = "eval", hydra_overrides_extra: Sequence[str] = (), apply_postprocessing: bool = True,
               **kwargs: Any):
    """A :class:`~anyseg.modeling.sam2.Sam2` for images (and the blocks of video tracking).

    Args:
        config_file: a public config name or the path of a config file in the reference's YAML format (a
            ``Sam2Config`` is accepted too).
        ckpt_path: the checkpoint (file or registry name); None builds a randomly initialised model.
        device: where to put the model.
        mode: ``"eval"`` (default) or anything else for training mode.
        hydra_overrides_extra: ``++model.<setting>=<value>`` overrides, applied after the file.
        apply_postprocessing: the reference's post-processing settings (dynamic multimask fallback via
            stability, delta 0.05, threshold 0.98); they win over the file and the extra overrides.
        **kwargs: accepted and ignored, as by the reference (``from_pretrained`` passes predictor options).
    """
    overrides = list(hydra_overrides_extra) + (list(IMAGE_POSTPROCESSING) if apply_postprocessing else [])
    config = load_sam2_config(config_file, overrides)
    return _model(config, config_file, ckpt_path, device, mode)


def _split_predictor_overrides(overrides: Sequence[str]) -> Tuple[List[str], Dict[str, Any]]:
    import yaml

    rest: List[str] = []
    options: Dict[str, Any] = {}
    for text in overrides:
        match = _PREDICTOR_OVERRIDE.match(str(text).strip())
        if match:
            options[match.group(1)] = yaml.safe_load(match.group(2))
        else:
            rest.append(text)
    return rest, options


def _video_predictor_class():
    try:
        from .video import SAM2VideoPredictor
    except ImportError:
        from .video.predictor import SAM2VideoPredictor
    return SAM2VideoPredictor


def build_sam2_video_predictor(config_file: ConfigFile, ckpt_path: Union[str, os.PathLike, None] = None,
                               device="cpu", mode: str = "eval", hydra_overrides_extra: Sequence[str] = (),
                               apply_postprocessing: bool = True, vos_optimized: bool = False, **kwargs: Any):
    """An :class:`anyseg.video.SAM2VideoPredictor` (arguments as :func:`build_sam2`).

    ``apply_postprocessing`` adds, besides the image settings, binarised prompted masks for memory and hole
    filling up to 8 px (:meth:`Sam2Config.for_video`). The reference's predictor options
    (``++model.non_overlap_masks=true``, ``add_all_frames_to_correct_as_cond``, ...) may be given as
    overrides; keyword arguments that the predictor's constructor names (``keep_all_outputs``,
    ``spill_dir``, ...) are passed to it, others are ignored as by the reference. ``vos_optimized=True`` (the
    reference's compiled tracker) is not available: the faithful path runs, with a warning.
    """
    if vos_optimized:
        warnings.warn("vos_optimized=True (compiled tracking) is not available in anyseg; building the faithful "
                      "video predictor instead", stacklevel=2)
    extra, options = _split_predictor_overrides(hydra_overrides_extra)
    overrides = extra + (list(VIDEO_POSTPROCESSING) if apply_postprocessing else [])
    config = load_sam2_config(config_file, overrides)
    model = _model(config, config_file, ckpt_path, device, mode)
    predictor_class = _video_predictor_class()
    accepted = inspect.signature(predictor_class.__init__).parameters
    options.update({k: v for k, v in kwargs.items() if k in accepted and k not in ("self", "model")})
    return predictor_class(model, **options)


def build_sam2_hf(model_id: str, **kwargs: Any):
    """:func:`build_sam2` for a Hugging Face hub id (``facebook/sam2.1-hiera-tiny``); the checkpoint is
    fetched with :func:`anyseg.hub.resolve_hf_id` (needs ``huggingface_hub`` unless it is already cached)."""
    from .hub import hf_checkpoint_info, resolve_hf_id

    info = hf_checkpoint_info(model_id)
    return build_sam2(config_file=info.config_name, ckpt_path=resolve_hf_id(model_id), **kwargs)


def build_sam2_video_predictor_hf(model_id: str, **kwargs: Any):
    """:func:`build_sam2_video_predictor` for a Hugging Face hub id."""
    from .hub import hf_checkpoint_info, resolve_hf_id

    info = hf_checkpoint_info(model_id)
    return build_sam2_video_predictor(config_file=info.config_name, ckpt_path=resolve_hf_id(model_id), **kwargs)
