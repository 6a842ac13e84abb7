"""Opening exported SAM / SAM 2 graphs with onnxruntime and checking that they are what they claim to be.

A graph's family (``"sam"``, ``"sam2"`` or ``"sam_hq"``) comes from its metadata (``anyseg.family``, written
by SAM 2 and HQ-SAM exports) or, for graphs without it, from its inputs and outputs (SAM 2's carry the
high-resolution features ``high_res_feats_0`` / ``high_res_feats_1``, HQ-SAM's the early feature
``interm_embeddings``). Depends on numpy and onnxruntime only (no torch,
no onnx).
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
FAMILY_SAM = "sam"
FAMILY_SAM2 = "sam2"
FAMILY_HQ = "sam_hq"

#: name -> rank of each input the decoder graph must have (the reference SAM ONNX names).
DECODER_INPUTS: Dict[str, int] = {
    "image_embeddings": 4, "point_coords": 3, "point_labels": 2, "mask_input": 4, "has_mask_input": 1,
    "orig_im_size": 1,
}
DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")
ENCODER_INPUTS: Dict[str, int] = {"image": 4}
ENCODER_OUTPUTS = ("image_embeddings",)
# SAM 2 (anyseg.export.sam2): the decoder also takes the two high-res feature maps the encoder gives.
SAM2_DECODER_INPUTS: Dict[str, int] = {
    "image_embeddings": 4, "high_res_feats_0": 4, "high_res_feats_1": 4, "point_coords": 3, "point_labels": 2,
    "mask_input": 4, "has_mask_input": 1, "orig_im_size": 1,
}
SAM2_DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")
SAM2_ENCODER_INPUTS: Dict[str, int] = {"image": 4}
SAM2_ENCODER_OUTPUTS = ("image_embeddings", "high_res_feats_0", "high_res_feats_1")
HIGH_RES_NAMES = ("high_res_feats_0", "high_res_feats_1")
# HQ-SAM (anyseg.export.hq): the encoder also gives the early feature, the decoder takes it and hq_token_only.
INTERM_NAME = "interm_embeddings"
HQ_DECODER_INPUTS: Dict[str, int] = {**DECODER_INPUTS, INTERM_NAME: 4, "hq_token_only": 1}
HQ_DECODER_OUTPUTS = DECODER_OUTPUTS
HQ_ENCODER_INPUTS: Dict[str, int] = {"image": 4}
HQ_ENCODER_OUTPUTS = ("image_embeddings", INTERM_NAME)

#: (inputs with ranks, leading outputs) of each family's graphs, per kind.
GRAPHS = {
    FAMILY_SAM: {KIND_DECODER: (DECODER_INPUTS, DECODER_OUTPUTS), KIND_ENCODER: (ENCODER_INPUTS, ENCODER_OUTPUTS)},
    FAMILY_SAM2: {KIND_DECODER: (SAM2_DECODER_INPUTS, SAM2_DECODER_OUTPUTS),
                  KIND_ENCODER: (SAM2_ENCODER_INPUTS, SAM2_ENCODER_OUTPUTS)},
    FAMILY_HQ: {KIND_DECODER: (HQ_DECODER_INPUTS, HQ_DECODER_OUTPUTS),
                KIND_ENCODER: (HQ_ENCODER_INPUTS, HQ_ENCODER_OUTPUTS)},
}
FAMILY_NAMES = {FAMILY_SAM: "SAM", FAMILY_SAM2: "SAM 2", FAMILY_HQ: "HQ-SAM"}


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

    def __init__(self, session, path: Path, kind: str, metadata: Dict[str, str], family: str = FAMILY_SAM) -> None:
        self.session = session
        self.path = path
        self.kind = kind
        self.family = family
        self.metadata = metadata
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def input_shape(self, name: str) -> tuple:
        """The declared shape of input ``name`` (ints, or strings for dynamic axes)."""
        return tuple(self.session.get_inputs()[self.input_names.index(name)].shape)

    def meta_floats(self, key: str, default: Tuple[float, ...]) -> Tuple[float, ...]:
        value = self.metadata.get(key)
        if value is None:
            return default
        try:
            return tuple(float(v) for v in value.split(","))
        except ValueError:
            raise GraphError(f"{self.path}: metadata {key}={value!r} is not a list of numbers") from None

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
    """Open ``path`` as a ``kind`` graph (``"sam_decoder"`` or ``"sam_encoder"``) of either family.

    Raises ``FileNotFoundError`` for a missing file and :class:`GraphError` (a ``ValueError``) for a
    file that is not an ONNX model onnxruntime can load (including an unsupported opset), a graph of
    the other kind, an unknown family, or inputs / outputs that are not those of an anyseg SAM or
    SAM 2 graph. The session's ``family`` says which family it is.
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
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    family = metadata.get("anyseg.family")
    if family is None:  # SAM 1 exports and other tools' graphs carry none: tell by the feature maps
        names = set(inputs) | set(outputs)
        family = (FAMILY_SAM2 if set(HIGH_RES_NAMES) & names else FAMILY_HQ if INTERM_NAME in names
                  else FAMILY_SAM)
    elif family not in GRAPHS:
        raise GraphError(f"{str(path)!r} is a graph of model family {family!r}; this version of anyseg runs "
                         f"{' and '.join(sorted(GRAPHS))}")
    expected_in, expected_out = GRAPHS[family][kind]
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
        raise GraphError(f"{str(path)!r} is not a {FAMILY_NAMES[family]} {_label(kind)} graph: " + "; ".join(problems))
    return GraphSession(session, path, kind, metadata, family)


def _label(kind: str) -> str:
    return {KIND_DECODER: "decoder", KIND_ENCODER: "image encoder"}.get(kind, kind)
