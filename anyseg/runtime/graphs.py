"""Opening exported SAM graphs with onnxruntime and checking that they are what they claim to be.

Depends on numpy and onnxruntime only (no torch, no onnx).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

# Mirrors anyseg.export._common (not imported from there: that package needs torch).
MIN_OPSET = 13
MAX_OPSET = 20
FORMAT_VERSION = "1"
KIND_DECODER = "sam_decoder"
KIND_ENCODER = "sam_encoder"

#: name -> rank of each input the decoder graph must have (the reference SAM ONNX names).
DECODER_INPUTS: Dict[str, int] = {
    "image_embeddings": 4, "point_coords": 3, "point_labels": 2, "mask_input": 4, "has_mask_input": 1,
    "orig_im_size": 1,
}
DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")
ENCODER_INPUTS: Dict[str, int] = {"image": 4}
ENCODER_OUTPUTS = ("image_embeddings",)


class GraphError(ValueError):
    """An ONNX file that is not the SAM graph it was given as (wrong file, inputs or opset)."""


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the ONNX runtime needs onnxruntime: pip install 'anyseg[onnx]'") from err
    return onnxruntime


def _describe(items) -> List[Tuple[str, str, list]]:
    return [(i.name, i.type, list(i.shape)) for i in items]


class GraphSession:
    """An onnxruntime session for one exported graph plus its anyseg metadata."""

    def __init__(self, session, path: Path, kind: str, metadata: Dict[str, str]) -> None:
        self.session = session
        self.path = path
        self.kind = kind
        self.metadata = metadata
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, feeds: Dict[str, "object"]) -> list:
        return self.session.run(None, feeds)

    def meta_int(self, key: str, default: Optional[int] = None) -> Optional[int]:
        value = self.metadata.get(key)
        try:
            return int(value) if value is not None else default
        except ValueError:
            raise GraphError(f"{self.path}: metadata {key}={value!r} is not an integer") from None


def default_providers() -> List[str]:
    """Every local execution provider onnxruntime offers, best first (the remote Azure one left out)."""
    ort = require_onnxruntime()
    return [p for p in ort.get_available_providers() if p != "AzureExecutionProvider"] or ["CPUExecutionProvider"]


def open_graph(path: Union[str, "os.PathLike[str]"], kind: str, providers: Optional[Sequence] = None,
               sess_options=None) -> GraphSession:
    """Open ``path`` as a ``kind`` graph (``"sam_decoder"`` or ``"sam_encoder"``).

    Raises ``FileNotFoundError`` for a missing file and :class:`GraphError` (a ``ValueError``) for a
    file that is not an ONNX model onnxruntime can load (including an unsupported opset), a graph of
    the other kind, or inputs / outputs that are not those of an anyseg SAM graph.
    """
    ort = require_onnxruntime()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX {_label(kind)} graph at {str(path)!r}")
    if providers is None:
        providers = default_providers()
    try:
        session = ort.InferenceSession(str(path), sess_options=sess_options, providers=list(providers))
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own, unexported exception types
        raise GraphError(
            f"{str(path)!r} could not be loaded as an ONNX model (expected the SAM {_label(kind)} written by "
            f"'anyseg export', opset {MIN_OPSET}..{MAX_OPSET}): {str(err).strip()[:500]}"
        ) from None
    metadata = dict(session.get_modelmeta().custom_metadata_map or {})
    found_kind = metadata.get("anyseg.kind")
    if found_kind is not None and found_kind != kind:
        raise GraphError(f"{str(path)!r} is an anyseg {_label(found_kind)} graph, expected the {_label(kind)}")
    fmt = metadata.get("anyseg.format")
    if fmt is not None and fmt != FORMAT_VERSION:
        raise GraphError(f"{str(path)!r} has graph format {fmt!r}; this version of anyseg reads format "
                         f"{FORMAT_VERSION!r} (re-export it with 'anyseg export')")
    opset = metadata.get("anyseg.opset")
    if opset is not None and not (opset.isdigit() and MIN_OPSET <= int(opset) <= MAX_OPSET):
        raise GraphError(f"{str(path)!r} was exported with opset {opset}, expected {MIN_OPSET}..{MAX_OPSET}")
    if kind == KIND_ENCODER and found_kind is None:
        # Encoders differ in their pre-processing; only graphs that say what they do are accepted.
        raise GraphError(f"{str(path)!r} carries no anyseg metadata: expected an image encoder written by "
                         f"'anyseg export --encoder'")
    if kind == KIND_DECODER and metadata.get("anyseg.image_cache") == "1":
        raise GraphError(f"{str(path)!r} is a decoder graph exported with image_cache=True (it takes per-image "
                         f"projections from a second graph, for the browser app); OnnxPredictor needs one "
                         f"exported without it")
    if kind == KIND_DECODER and metadata.get("anyseg.upscale_masks") == "0":
        raise GraphError(f"{str(path)!r} is a decoder graph exported with upscale_masks=False (low-res logits "
                         f"only, for the browser app); OnnxPredictor needs a graph that upscales the masks")
    expected_in = DECODER_INPUTS if kind == KIND_DECODER else ENCODER_INPUTS
    expected_out = DECODER_OUTPUTS if kind == KIND_DECODER else ENCODER_OUTPUTS
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    problems = []
    if set(inputs) != set(expected_in):
        problems.append(f"inputs {sorted(inputs)} (expected {sorted(expected_in)})")
    else:
        for name, rank in expected_in.items():
            arg = inputs[name]
            if arg.type != "tensor(float)" or len(arg.shape) != rank:
                problems.append(f"input {name!r} is {arg.type} of rank {len(arg.shape)} "
                                f"(expected tensor(float) of rank {rank})")
    if list(outputs[: len(expected_out)]) != list(expected_out):
        problems.append(f"outputs {outputs} (expected {list(expected_out)})")
    if problems:
        raise GraphError(f"{str(path)!r} is not a SAM {_label(kind)} graph: " + "; ".join(problems))
    return GraphSession(session, path, kind, metadata)


def _label(kind: str) -> str:
    return {KIND_DECODER: "decoder", KIND_ENCODER: "image encoder"}.get(kind, kind)
