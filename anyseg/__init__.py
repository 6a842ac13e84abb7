"""anyseg: Segment Anything (SAM) in PyTorch, faithful to the public checkpoints.

The public names are imported on first use, so that light sub-packages (``anyseg.runtime``,
``anyseg.imageio``) can be used without PyTorch installed.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "checkpoint",
    "save_model": "checkpoint",
    "CheckpointError": "checkpoint",
    "SamConfig": "config",
    "ViTConfig": "config",
    "TinyViTConfig": "config",
    "Sam": "modeling.sam",
    "build_sam": "dropin",
    "sam_model_registry": "dropin",
    "build_sam_vit_h": "dropin",
    "build_sam_vit_l": "dropin",
    "build_sam_vit_b": "dropin",
    "build_sam_vit_t": "dropin",
    "sam_hq_model_registry": "dropin",
    "SamPredictor": "predictor",
    "Prediction": "predictor",
    "ImageNotSetError": "prompts",
    "MaskGenerator": "automatic",
    "SamAutomaticMaskGenerator": "automatic",
    "load_image": "imageio",
    "SAM2ImagePredictor": "sam2_predictor",
    "Sam2Config": "config_sam2",
    "build_sam2": "sam2_build",
    "build_sam2_video_predictor": "sam2_build",
    "build_sam2_hf": "sam2_build",
    "build_sam2_video_predictor_hf": "sam2_build",
    "Sam2": "modeling.sam2",
    "SAM2VideoPredictor": "video.predictor",
    "SAM2AutomaticMaskGenerator": "sam2_automatic",
    "make_predictor": "protocol",
    "Sam3": "modeling.sam3",
    "Sam3Config": "config_sam3",
    "Sam3Processor": "sam3_processor",
    "Sam3Result": "sam3_processor",
}


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'anyseg' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = sorted(_EXPORTS) + ["__version__"]
