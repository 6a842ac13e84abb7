"""Fast paths over the faithful model: same weights, same results up to rounding (or, for reduced
precision, up to the quality bar in ``docs/speed.md``). Configure them with :mod:`anyseg.speed`."""
from .decoder import FastDecoder, ImageCache
from .resize import MaskResizer

__all__ = ["FastDecoder", "ImageCache", "MaskResizer"]
