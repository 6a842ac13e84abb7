"""int8 quantization of exported graphs with onnxruntime's tools, two ways.

What is quantized either way: the weight matrices of the linear layers (``MatMul`` nodes whose
second input is a stored weight). Left in float32 on purpose: convolutions (few weights, and
``ConvInteger`` is often slower than float convolution on CPU), products of two activations
(attention scores, the final mask product), and tiny contractions such as the 2 x 128
positional-encoding matrix, whose error would be multiplied by 2 pi inside a sine. The linear layers
hold nearly all weights, so this keeps most of the size gain.

* ``method="weights"`` (default): int8 weights, float activations. Each weight matrix is stored as
  symmetric int8 in blocks of 32 values along the input dimension, each block with its own scale
  (onnxruntime's ``MatMulNBits`` with 8 bits); products run in float32 on the dequantized weights.
  The masks stay within mask IoU ~0.98 of float32 on the golden checkpoints.
* ``method="dynamic"``: onnxruntime dynamic quantization; weights uint8 with one scale per output
  channel, activations quantized on the fly to uint8 at run time (``MatMulInteger``). Faster int8
  products on some CPUs, but activation rounding moves small masks more (mask IoU down to ~0.85 on
  the golden MobileSAM).
"""
from __future__ import annotations

import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence

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
    # The weight-only quantizer logs every node it visits at INFO level through its own logger.
    root, flt = logging.getLogger(), _DropWarnings()
    chatty = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = chatty.level
    root.addFilter(flt)
    chatty.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.removeFilter(flt)
        chatty.setLevel(level)


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


def linear_layer_names(path: PathLike) -> list:
    """Names of the linear-layer nodes of the graph at ``path`` that :func:`quantize` would quantize."""
    onnx = require_onnx()
    return _linear_weight_nodes(onnx.load(str(path), load_external_data=False))


METHODS = ("weights", "dynamic")
WEIGHT_BLOCK = 32
# Linear layers left in float32 by default, per encoder kind (export metadata ``anyseg.encoder``).
# MobileSAM's masks are sensitive to its last TinyViT stage: measured on the golden checkpoint,
# min mask IoU 0.879 with it in int8 weights, 0.988 with it in float32 (docs/onnx.md).
SENSITIVE_LAYERS = {"TinyViTConfig": ("image_encoder/layers.3/",)}


def _default_keep_float(metadata: dict, method: str) -> tuple:
    return SENSITIVE_LAYERS.get(metadata.get("anyseg.encoder"), ()) if method == "weights" else ()


def default_keep_float(path: PathLike, method: str = "weights") -> tuple:
    """The linear layers (name parts) :func:`quantize` keeps in float32 for ``path`` by default."""
    onnx = require_onnx()
    return _default_keep_float(read_metadata(onnx.load(str(path), load_external_data=False)), method)


def _weight_only(src: Path, staged: Path, nodes: list, external: bool) -> None:
    """int8 weights in blocks of ``WEIGHT_BLOCK`` (``MatMulNBits``), float activations; only ``nodes``."""
    onnx = require_onnx()
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 MatMulNBitsQuantizer)

    model = onnx.load(str(src), load_external_data=True)
    wanted = set(nodes)
    # The quantizer takes every MatMul with a stored weight unless excluded by name.
    exclude = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in wanted]
    config = DefaultWeightOnlyQuantConfig(block_size=WEIGHT_BLOCK, is_symmetric=True, bits=8)
    quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=WEIGHT_BLOCK, is_symmetric=True,
                                     nodes_to_exclude=exclude, algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(staged), external)


def quantize(src: PathLike, dst: PathLike, *, method: str = "weights", per_channel: bool = True,
             keep_float: Optional[Sequence[str]] = None) -> Path:
    """Write an int8-quantized copy of the ONNX graph ``src`` to ``dst``.

    ``method``: ``"weights"`` (int8 weights in blocks of 32, float activations; the default, closest
    to float32) or ``"dynamic"`` (onnxruntime dynamic quantization, activations quantized at run
    time; see the module docstring). The anyseg metadata of ``src`` is carried over (plus
    ``anyseg.quantized``: ``int8-weights-block32``, ``int8-per-channel`` or ``int8``), so the runtime
    accepts the quantized graph like the original. ``per_channel=False`` (dynamic only) uses one
    scale per weight matrix instead of one per output channel (a little less accurate). A result
    above ~1.8 GB is stored with external data (``<dst>.data``). ``keep_float``: parts of node names
    (e.g. ``"image_encoder/layers.3/"``) whose linear layers stay float32, for layers the masks are
    sensitive to; None (default) keeps :data:`SENSITIVE_LAYERS` of the graph's encoder kind with
    ``method="weights"`` (see :func:`default_keep_float`), ``()`` none. Raises ``ValueError`` for an
    unknown method, a missing or unreadable ``src``, ``dst == src``, a ``keep_float`` part that matches
    no linear layer, or a graph without linear layers left to quantize. Returns ``dst``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
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
    if keep_float is None:
        keep_float = _default_keep_float(metadata, method)
    for part in keep_float:
        if not any(part in n for n in nodes):
            raise ValueError(f"keep_float {part!r} matches none of the linear layers of {str(src)!r}")
    nodes = [n for n in nodes if not any(part in n for part in keep_float)]
    if not nodes:
        raise ValueError(f"{str(src)!r} has no linear layers to quantize")
    del header
    dst.parent.mkdir(parents=True, exist_ok=True)
    data_name = dst.name + ".data"
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".quantize-") as tmp:
        staged = Path(tmp) / dst.name
        with _quiet_root_logger():
            if method == "weights":
                _weight_only(src, staged, nodes, src_external)
                label = f"int8-weights-block{WEIGHT_BLOCK}"
            else:
                quantize_dynamic(str(src), str(staged), nodes_to_quantize=nodes, per_channel=per_channel,
                                 reduce_range=False, weight_type=QuantType.QUInt8,
                                 use_external_data_format=src_external)
                label = "int8-per-channel" if per_channel else "int8"
        model = onnx.load(str(staged), load_external_data=True)
        big = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
        del model.metadata_props[:]
        for key, value in {**metadata, "anyseg.quantized": label}.items():
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


def _plain_gemms(model) -> list:
    """``Gemm`` nodes ``A @ B + C`` with a stored weight ``B`` and neither input transposed. In anyseg's SAM
    decoder graphs (``fast=True``) these are exactly the upscaling network's two products (its transposed
    convolutions, written as matrix products on pixels); the linear layers export with ``transB=1``."""
    onnx = require_onnx()
    stored = {t.name for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type != "Gemm" or len(node.input) != 3 or node.input[1] not in stored:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if not attrs.get("transA", 0) and not attrs.get("transB", 0) and attrs.get("alpha", 1.0) == 1.0 \
                and attrs.get("beta", 1.0) == 1.0:
            found.append(node)
    return found


def quantize_upscaling(src: PathLike, dst: PathLike) -> Path:
    """The labelling page's approximate decoder graph: a copy of the SAM decoder graph ``src``
    (``export_decoder(..., fast=True)``) with the upscaling network's two matrix products in int8.

    Each product (``Gemm``) becomes ``MatMul`` + ``Add`` and the ``MatMul`` is dynamically quantized
    (``MatMulInteger``: weights uint8 with a scale per output channel, activations quantized at run
    time), which onnxruntime-web runs in WebAssembly. Everything else stays float32. The masks stay
    within mask IoU 0.98 of the float32 decoder on the golden checkpoints
    (``tests/test_page_graph.py``). Metadata is carried over, plus ``anyseg.quantized`` =
    ``int8-upscaling``. Raises ``ValueError`` when ``src`` has no such products. Returns ``dst``.
    """
    onnx = require_onnx()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), check_output_path(dst)
    model = onnx.load(str(src))
    metadata = read_metadata(model)
    gemms = _plain_gemms(model)
    if not gemms:
        raise ValueError(f"{str(src)!r} has no upscaling products (Gemm with a stored weight) to quantize")
    chosen = {id(n) for n in gemms}
    nodes, names = [], []
    for node in model.graph.node:
        if id(node) not in chosen:
            nodes.append(node)
            continue
        product = node.output[0] + "/int8_product"
        names.append(node.name + "/MatMul")
        nodes.append(onnx.helper.make_node("MatMul", list(node.input[:2]), [product], name=names[-1]))
        nodes.append(onnx.helper.make_node("Add", [product, node.input[2]], list(node.output), name=node.name + "/Add"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".quantize-") as tmp:
        plain, staged = Path(tmp) / "plain.onnx", Path(tmp) / "int8.onnx"
        onnx.save_model(model, str(plain))
        with _quiet_root_logger():
            quantize_dynamic(str(plain), str(staged), nodes_to_quantize=names, per_channel=True, reduce_range=False,
                             weight_type=QuantType.QUInt8)
        out = onnx.load(str(staged))
        del out.metadata_props[:]
        for key, value in {**metadata, "anyseg.quantized": "int8-upscaling"}.items():
            entry = out.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save_model(out, str(staged))
        os.replace(staged, dst)
    return dst
