"""Video: frame sources (decoded on demand), the memory bank and the SAM 2 video predictor.

Frame sources are imported at once; the predictor names are resolved when first used, so that reading
frames does not import the model.
"""
from .frames import (ArraySource, FrameSource, JpegFolderSource, VideoFileSource, open_frames,
                     preprocess_frame)

__all__ = ["ArraySource", "FrameSource", "JpegFolderSource", "VideoFileSource", "open_frames",
           "preprocess_frame", "SAM2VideoPredictor", "InferenceState"]


def __getattr__(name: str):
    if name in ("SAM2VideoPredictor", "InferenceState"):
        from . import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
