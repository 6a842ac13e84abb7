"""ONNX export of SAM: the prompt decoder (the per-click part) and the image encoder.

``export_decoder(model, path, ...)`` and ``export_encoder(model, path, ...)`` write graphs that
:class:`anyseg.runtime.OnnxPredictor` (no torch needed) or any ONNX runtime can run;
``quantize(src, dst)`` makes an int8 copy (int8 weights; or dynamic quantization). Needs the ``onnx`` extra
(``pip install 'anyseg[onnx]'``) and torch.
"""
from .decoder import DECODER_INPUTS, DECODER_OUTPUTS, SamOnnxDecoder, export_decoder
from .encoder import ENCODER_INPUTS, ENCODER_OUTPUTS, SamOnnxEncoder, export_encoder
from .quantize import quantize

__all__ = ["DECODER_INPUTS", "DECODER_OUTPUTS", "ENCODER_INPUTS", "ENCODER_OUTPUTS", "SamOnnxDecoder",
           "SamOnnxEncoder", "export_decoder", "export_encoder", "quantize"]
