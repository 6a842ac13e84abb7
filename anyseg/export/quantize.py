"""Dynamic int8 quantization of exported graphs (onnxruntime.quantization).

What is quantized: the weight matrices of the linear layers (``MatMul`` nodes whose second input
is a stored weight), as unsigned 8-bit with one scale per output channel by default; their
activations are quantized on the fly at run time. Left in float32 on purpose: convolutions (few
weights, and ``ConvInteger`` is often slower than float convolution on CPU), products of two
activations (attention scores, the final mask product), and tiny contractions such as the 2 x 128
positional-encoding matrix, whose error would be multiplied by 2 pi inside a sine. This keeps most
of the size gain (the linear layers hold nearly all weights) with the smallest change in the masks.
"""
from __future__ import annotations

import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ._common import (
    EXTERNAL_DATA_THRESHOLD,
    PathLike,
    check_output_path,
    read_metadata,
    require_onnx,
)


class _DropWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.WARNING


@contextmanager
def _quiet_root_logger():
    # onnxruntime.quantization logs a warning per tensor it leaves in float (shape bookkeeping
    # tensors of the attention windows); they are expected and would bury real messages.
    root, flt = logging.getLogger(), _DropWarnings()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def _linear_weight_nodes(model, min_side: int = 16) -> list:
    """Names of MatMul nodes multiplying by a stored ``K x N`` weight with ``min(K, N) >= min_side``."""
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    names = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        dims = weights.get(node.input[1])
        if dims is not None and len(dims) == 2 and min(dims) >= min_side:
            names.append(node.name)
    return names


def quantize(src: PathLike, dst: PathLike, *, per_channel: bool = True) -> Path:
    """Write a dynamically int8-quantized copy of the ONNX graph ``src`` to ``dst``.

    The anyseg metadata of ``src`` is carried over (plus ``anyseg.quantized = int8``), so the
    runtime accepts the quantized graph like the original. ``per_channel=False`` uses one scale per
    weight matrix instead of one per output channel (a little less accurate). A result above
    ~1.8 GB is stored with external data (``<dst>.data``). Raises ``ValueError`` for a missing or
    unreadable ``src``, ``dst == src`` or a graph without linear layers. Returns ``dst``.
    """
    onnx = require_onnx()
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("quantization needs onnxruntime: pip install 'anyseg[onnx]'") from err
    src, dst = Path(src), check_output_path(dst)
    if not src.is_file():
        raise ValueError(f"no ONNX file at {str(src)!r}")
    if src.resolve() == dst.resolve():
        raise ValueError("quantize writes a new file: give a destination different from the source")
    try:
        header = onnx.load(str(src), load_external_data=False)
    except Exception as err:
        raise ValueError(f"{str(src)!r} is not a readable ONNX model: {err}") from err
    metadata = read_metadata(header)
    src_external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer)
    nodes = _linear_weight_nodes(header)
    if not nodes:
        raise ValueError(f"{str(src)!r} has no linear layers to quantize")
    del header
    dst.parent.mkdir(parents=True, exist_ok=True)
    data_name = dst.name + ".data"
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".quantize-") as tmp:
        staged = Path(tmp) / dst.name
        with _quiet_root_logger():
            quantize_dynamic(str(src), str(staged), nodes_to_quantize=nodes, per_channel=per_channel,
                             reduce_range=False, weight_type=QuantType.QUInt8,
                             use_external_data_format=src_external)
        model = onnx.load(str(staged), load_external_data=True)
        big = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
        del model.metadata_props[:]
        for key, value in {**metadata, "anyseg.quantized": "int8-per-channel" if per_channel else "int8"}.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        final = Path(tmp) / "final" / dst.name
        final.parent.mkdir()
        if big:
            onnx.save_model(model, str(final), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name)
            os.replace(final.parent / data_name, dst.parent / data_name)
        else:
            onnx.save_model(model, str(final))
        os.replace(final, dst)
    return dst
