"""SAM 3 image detector (spec/sam3.md): Perception Encoder ViT, neck, CLIP-style text encoder, geometry
encoder, fusion encoder, DETR-style decoder, dot-product scoring and segmentation head."""
from .sam3 import Detections, Prompt, Sam3, build_sam3

__all__ = ["Detections", "Prompt", "Sam3", "build_sam3"]
