"""Pieces shared by the encoder and decoder exporters: opset checks, metadata, saving with
external data, and the optional-dependency import."""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional, Union

# The TorchScript-based exporter of torch 2.x emits opsets 13..20; below 13 the graphs lose ops
# SAM needs (Resize with dynamic sizes, Split with input sizes), above 20 it has no symbolics.
MIN_OPSET = 13
MAX_OPSET = 20

# Protobuf refuses to serialise a message of 2 GiB or more; keep well clear of it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

#: metadata keys written into every exported graph (``ModelProto.metadata_props``).
META_KIND = "anyseg.kind"
META_FORMAT = "anyseg.format"
META_OPSET = "anyseg.opset"
META_IMG_SIZE = "anyseg.img_size"
#: the model family (``sam2``); absent in SAM 1 graphs, which predate it.
META_FAMILY = "anyseg.family"
FORMAT_VERSION = "1"
KIND_DECODER = "sam_decoder"
KIND_DECODER_CACHE = "sam_decoder_cache"
KIND_ENCODER = "sam_encoder"

PathLike = Union[str, "os.PathLike[str]"]


def require_onnx():
    """Import ``onnx`` or explain which extra provides it."""
    try:
        import onnx
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("ONNX export needs the 'onnx' package: pip install 'anyseg[onnx]'") from err
    return onnx


def model_family(model) -> str:
    """``"sam"`` or ``"sam2"``: which exporter a loaded model needs (SAM 2 models say so themselves)."""
    return getattr(model, "family", "sam")


def check_opset(opset: int) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be an integer in [{MIN_OPSET}, {MAX_OPSET}], got {opset!r}")
    return opset


def check_output_path(path: PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise ValueError(f"the output file must end in .onnx, got {str(path)!r}")
    if path.exists() and path.is_dir():
        raise ValueError(f"{str(path)!r} is a directory, expected a file name ending in .onnx")
    return path


def param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers()
    )


def _torch_export(module, args, path: Path, *, opset: int, input_names, output_names, dynamic_axes) -> None:
    import torch

    with warnings.catch_warnings():
        # The tracer warns about every Python-side shape computation it records; the graphs are
        # checked against the eager model by the tests instead.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(path), dynamo=False, opset_version=opset, input_names=list(input_names),
            output_names=list(output_names), dynamic_axes=dynamic_axes, do_constant_folding=True,
            export_params=True,
        )


def export_graph(
    module,
    args: tuple,
    path: PathLike,
    *,
    opset: int,
    input_names,
    output_names,
    dynamic_axes: Dict[str, Dict[int, str]],
    metadata: Dict[str, str],
    external_data: Optional[bool] = None,
    post: Optional[Callable] = None,
) -> Path:
    """Trace ``module`` to ONNX, add ``metadata``, check the graph and write it to ``path``.

    The file appears atomically: the graph is built in a temporary folder next to ``path`` and
    moved into place only when complete. With ``external_data`` (default: when the weights exceed
    ~1.8 GB) the tensors go to ``<name>.onnx.data`` beside the graph, as ONNX requires above 2 GB.
    """
    onnx = require_onnx()
    path = check_output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = param_bytes(module) > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        _torch_export(module, args, raw, opset=opset, input_names=input_names, output_names=output_names,
                      dynamic_axes=dynamic_axes)
        model = onnx.load(str(raw), load_external_data=True)
        if post is not None:
            post(model)
        del model.metadata_props[:]
        for key, value in metadata.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, str(value)
        staged = Path(tmp) / path.name
        if external_data:
            onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            onnx.checker.check_model(str(staged))
        else:
            onnx.checker.check_model(model)
            onnx.save_model(model, str(staged))
        if external_data:
            os.replace(Path(tmp) / data_name, path.parent / data_name)
        elif (path.parent / data_name).exists():
            # A stale weights file from an earlier external-data export would confuse readers.
            os.remove(path.parent / data_name)
        os.replace(staged, path)
    return path


def read_metadata(model) -> Dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}
