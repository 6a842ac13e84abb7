"""A torch-free SAM / SAM 2 runtime on exported ONNX graphs (numpy, Pillow and onnxruntime only).

``OnnxPredictor(encoder_path, decoder_path, providers=None)`` mirrors :class:`anyseg.SamPredictor`:
``set_image``, ``predict``, ``get_image_embedding``, ``reset_image``, ``original_size``,
``input_size``; for SAM 2 graphs it computes what :class:`anyseg.sam2_predictor.SAM2ImagePredictor`
does (the model family is read from the graphs). Graphs come from :mod:`anyseg.export` or
``anyseg export``.
"""
from .graphs import GraphError, open_graph
from .predictor import ImageNotSetError, OnnxPredictor

__all__ = ["GraphError", "ImageNotSetError", "OnnxPredictor", "open_graph"]
