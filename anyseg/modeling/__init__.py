"""SAM's building blocks: pure tensor math, no I/O."""
from .sam import Sam, build_sam

__all__ = ["Sam", "build_sam"]
