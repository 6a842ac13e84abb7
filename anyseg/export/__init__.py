"""ONNX export of SAM and SAM 2: the prompt decoder (the per-click part) and the image encoder.

``export_decoder(model, path, ...)`` and ``export_encoder(model, path, ...)`` write graphs that
:class:`anyseg.runtime.OnnxPredictor` (no torch needed) or any ONNX runtime can run, for a model of either
family (SAM 1: :mod:`.decoder`, :mod:`.encoder`; SAM 2: :mod:`.sam2`, whose graphs also take or give the
high-resolution features; HQ-SAM: :mod:`.hq`, whose graphs also give or take the encoder's early
feature); ``quantize(src, dst)`` makes an int8 copy (int8 weights; or dynamic
quantization). Needs the ``onnx`` extra (``pip install 'anyseg[onnx]'``) and torch.
"""
from pathlib import Path

from . import decoder as _sam_decoder
from . import encoder as _sam_encoder
from ._common import PathLike, model_family
from .decoder import (CACHE_OUTPUTS, DECODER_INPUTS, DECODER_OUTPUTS, SamOnnxDecoder, SamOnnxDecoderCache,
                      export_decoder_cache)
from .encoder import ENCODER_INPUTS, ENCODER_OUTPUTS, SamOnnxEncoder
from .hq import (HQ_DECODER_INPUTS, HQ_DECODER_OUTPUTS, HQ_ENCODER_INPUTS, HQ_ENCODER_OUTPUTS, SamHQOnnxDecoder,
                 SamHQOnnxEncoder, export_hq_decoder, export_hq_encoder)
from .quantize import quantize
from .sam2 import (SAM2_DECODER_INPUTS, SAM2_DECODER_OUTPUTS, SAM2_ENCODER_INPUTS, SAM2_ENCODER_OUTPUTS,
                   Sam2OnnxDecoder, Sam2OnnxEncoder, export_sam2_decoder, export_sam2_encoder)

__all__ = ["CACHE_OUTPUTS", "DECODER_INPUTS", "DECODER_OUTPUTS", "ENCODER_INPUTS", "ENCODER_OUTPUTS",
           "HQ_DECODER_INPUTS", "HQ_DECODER_OUTPUTS", "HQ_ENCODER_INPUTS", "HQ_ENCODER_OUTPUTS",
           "SamHQOnnxDecoder", "SamHQOnnxEncoder", "export_hq_decoder", "export_hq_encoder",
           "SAM2_DECODER_INPUTS", "SAM2_DECODER_OUTPUTS", "SAM2_ENCODER_INPUTS", "SAM2_ENCODER_OUTPUTS",
           "SamOnnxDecoder", "SamOnnxDecoderCache", "SamOnnxEncoder", "Sam2OnnxDecoder", "Sam2OnnxEncoder",
           "export_decoder", "export_decoder_cache", "export_encoder", "export_sam2_decoder", "export_sam2_encoder",
           "quantize"]

_DECODERS = {"sam": _sam_decoder.export_decoder, "sam2": export_sam2_decoder, "sam_hq": export_hq_decoder}
_ENCODERS = {"sam": _sam_encoder.export_encoder, "sam2": export_sam2_encoder, "sam_hq": export_hq_encoder}


def _graph_family(model) -> str:
    """Which exporter: ``sam``, ``sam2``, or ``sam_hq`` for an HQ-SAM model (a SAM 1 with the HQ token)."""
    family = model_family(model)
    return "sam_hq" if family == "sam" and getattr(model, "is_hq", False) else family


def export_decoder(model, path: PathLike, **options) -> Path:
    """Export the decoder graph of ``model`` (SAM 1 or SAM 2) to ``path``.

    SAM 1: :func:`anyseg.export.decoder.export_decoder` (options ``opset``, ``return_single_mask``,
    ``gelu_approximate``, ``use_stability_score``, ``fast``, ``upscale_masks``, ``image_cache``).
    SAM 2: :func:`anyseg.export.sam2.export_sam2_decoder` (``opset``, ``return_single_mask``,
    ``gelu_approximate``, ``upscale_masks``; the SAM 1-only options raise ``ValueError`` when set).
    HQ-SAM: :func:`anyseg.export.hq.export_hq_decoder` (SAM 1's options except ``fast`` / ``image_cache``;
    the graph also takes ``interm_embeddings`` and ``hq_token_only``).
    """
    return _DECODERS[_graph_family(model)](model, path, **options)


def export_encoder(model, path: PathLike, **options) -> Path:
    """Export the image encoder graph of ``model`` (SAM 1: :func:`anyseg.export.encoder.export_encoder`,
    SAM 2: :func:`anyseg.export.sam2.export_sam2_encoder`; options ``opset``, ``external_data``)."""
    return _ENCODERS[_graph_family(model)](model, path, **options)
