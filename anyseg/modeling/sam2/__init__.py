"""SAM 2 / SAM 2.1 modeling: one file per block (hiera, neck, decoder, memory_encoder,
memory_attention) and the wiring in ``sam2``."""
from .sam2 import NO_OBJ_SCORE, HeadsOutput, Sam2, Sam2Features, build_sam2_model

__all__ = ["NO_OBJ_SCORE", "HeadsOutput", "Sam2", "Sam2Features", "build_sam2_model"]
