"""anyseg: Segment Anything (SAM) in PyTorch, faithful to the public checkpoints."""
from .checkpoint import CheckpointError, load_model, save_model
from .config import SamConfig, TinyViTConfig, ViTConfig
from .modeling import Sam, build_sam
from .predictor import ImageNotSetError, Prediction, SamPredictor

__version__ = "0.1.0"


def __getattr__(name):
    # The generator pulls in pycocotools and friends; import it only when asked for.
    if name in ("MaskGenerator", "SamAutomaticMaskGenerator"):
        from . import automatic

        return getattr(automatic, name)
    raise AttributeError(f"module 'anyseg' has no attribute {name!r}")


__all__ = [
    "CheckpointError", "ImageNotSetError", "MaskGenerator", "Prediction", "Sam", "SamAutomaticMaskGenerator",
    "SamConfig", "SamPredictor", "TinyViTConfig", "ViTConfig", "__version__", "build_sam", "load_model",
    "save_model",
]
