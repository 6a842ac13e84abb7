"""ONNX export of SAM: the prompt decoder (the per-click part) and the image encoder.

``export_decoder(model, path, ...)`` and ``export_encoder(model, path, ...)`` write graphs that
:class:`anyseg.runtime.OnnxPredictor` (no torch needed) or any ONNX runtime can run;
``quantize(src, dst)`` makes an int8 copy (int8 weights; or dynamic quantization). Needs the ``onnx`` extra
(``pip install 'anyseg[onnx]'``) and torch.
"""
from .decoder import (CACHE_OUTPUTS, DECODER_INPUTS, DECODER_OUTPUTS, SamOnnxDecoder, SamOnnxDecoderCache,
                      export_decoder, export_decoder_cache)
from .encoder import ENCODER_INPUTS, ENCODER_OUTPUTS, SamOnnxEncoder, export_encoder
from .quantize import quantize

__all__ = ["CACHE_OUTPUTS", "DECODER_INPUTS", "DECODER_OUTPUTS", "ENCODER_INPUTS", "ENCODER_OUTPUTS",
           "SamOnnxDecoder", "SamOnnxDecoderCache", "SamOnnxEncoder", "export_decoder", "export_decoder_cache",
           "export_encoder", "quantize"]
