"""ONNX export of SAM's image encoder (ViT or TinyViT) with normalisation and padding in-graph.

Graph input
-----------
``image``  ``B x 3 x h x w`` float32, RGB values in [0, 255] (a uint8 image cast to float), already
resized so that its long side is ``img_size`` (1024): ``(h, w) = anyseg.geometry.resized_shape(H, W)``,
PIL bilinear as :meth:`anyseg.SamPredictor.transform_image` does. ``B``, ``h`` and ``w`` are dynamic
(every image of one batch has the same ``h x w``).

Graph output
------------
``image_embeddings``  ``B x 256 x 64 x 64`` float32, the decoder's input.

In-graph: ``(image - pixel_mean) / pixel_std`` per channel, then zero padding at the bottom and right
up to ``img_size x img_size`` -- exactly :meth:`anyseg.modeling.sam.Sam.preprocess`.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._common import (
    FORMAT_VERSION,
    KIND_ENCODER,
    META_FORMAT,
    META_IMG_SIZE,
    META_KIND,
    META_OPSET,
    PathLike,
    check_opset,
    export_graph,
)

ENCODER_INPUTS = ("image",)
ENCODER_OUTPUTS = ("image_embeddings",)


class SamOnnxEncoder(nn.Module):
    """Normalise, pad and encode: ``B x 3 x h x w`` RGB in [0, 255] -> ``B x 256 x g x g``."""

    def __init__(self, model, image_encoder: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.image_encoder = image_encoder if image_encoder is not None else model.image_encoder
        self.img_size = int(model.img_size)
        self.register_buffer("pixel_mean", model.pixel_mean.detach().float().cpu().reshape(1, 3, 1, 1).clone(),
                             persistent=False)
        self.register_buffer("pixel_std", model.pixel_std.detach().float().cpu().reshape(1, 3, 1, 1).clone(),
                             persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = (image - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        x = F.pad(x, (0, self.img_size - w, 0, self.img_size - h))
        return self.image_encoder(x)


@contextmanager
def _plain_eval(module: nn.Module):
    """Eval mode and the plain attention path while exporting; the previous state is restored."""
    fused = [(m, m.fused) for m in module.modules() if hasattr(m, "fused")]
    training = module.training
    try:
        for m, _ in fused:
            m.fused = False
        module.eval()
        yield module
    finally:
        for m, flag in fused:
            m.fused = flag
        module.train(training)


def export_encoder(model, path: PathLike, *, opset: int = 17, external_data: Optional[bool] = None) -> Path:
    """Export the image encoder of ``model`` (ViT or TinyViT) to the ONNX file ``path``.

    See the module docstring for the graph's input and output. Weights above ~1.8 GB (ViT-L,
    ViT-H) are written as ONNX external data in ``<path>.data`` next to the graph, as protobuf
    cannot hold 2 GB; ``external_data=True`` / ``False`` forces the choice. Keep the two files
    together. Returns the written path.
    """
    check_opset(opset)
    encoder = model.image_encoder
    params = list(encoder.parameters())
    if params and (params[0].dtype != torch.float32 or params[0].device.type != "cpu"):
        # Export traces on CPU in float32; a copy leaves the caller's model where it was.
        encoder = copy.deepcopy(encoder).float().cpu()
    wrapper = SamOnnxEncoder(model, encoder)
    img = wrapper.img_size
    example = torch.rand(1, 3, img, (img * 3) // 4) * 255.0
    metadata = {
        META_KIND: KIND_ENCODER,
        META_FORMAT: FORMAT_VERSION,
        META_OPSET: str(opset),
        META_IMG_SIZE: str(img),
        "anyseg.embedding_size": str(model.config.embedding_size),
        "anyseg.encoder": type(model.config.encoder).__name__,
        "anyseg.pixel_mean": ",".join(f"{v:g}" for v in model.config.pixel_mean),
        "anyseg.pixel_std": ",".join(f"{v:g}" for v in model.config.pixel_std),
    }
    dynamic_axes = {"image": {0: "batch", 2: "height", 3: "width"}, "image_embeddings": {0: "batch"}}
    with _plain_eval(encoder), torch.no_grad():
        return export_graph(wrapper, (example,), path, opset=opset, input_names=ENCODER_INPUTS,
                            output_names=ENCODER_OUTPUTS, dynamic_axes=dynamic_axes, metadata=metadata,
                            external_data=external_data)
