"""Speed switches over the faithful model, in one place.

    import anyseg
    from anyseg.speed import SpeedConfig, apply

    model = anyseg.load_model("vit_b")
    apply(model, SpeedConfig.auto(model.device))      # sensible fast paths for this device
    predictor = anyseg.SamPredictor(model)             # picks the fast paths up
    apply(model, SpeedConfig.faithful())               # back to the reference computation

The faithful float32 path is the default (a model nobody called :func:`apply` on runs exactly as before).
Fast paths come in two kinds (see ``docs/speed.md`` for numbers):

* **lossless** -- the same float32 math reordered or fused; outputs match the faithful path to rounding
  and stay within the golden tolerances: ``fused_attention`` (PyTorch SDPA, relative positions as an
  additive bias), ``fold_batchnorm`` (TinyViT), ``fast_decoder`` (:class:`anyseg.fast.FastDecoder`:
  per-image cache of the prompt-independent work, few-token attention without projecting the image,
  upscaling as matrix products, IoU before upscaling), ``fast_postprocess``
  (:class:`anyseg.fast.MaskResizer`: both bilinear resizes as one banded resampling), large point
  batches and on-device boxes / RLE / NMS in segment-everything.
* **reduced precision** -- ``encoder_dtype`` / ``decoder_dtype`` (bfloat16 on CPUs with AMX or
  AVX512-BF16, bfloat16 / float16 on GPUs, through ``torch.autocast``) and ``int8_encoder`` (dynamic int8
  linear layers, CPU). These keep the quality bar of ``docs/speed.md`` (mask IoU >= 0.98), not the
  golden tolerances.

Nothing here changes the model's parameters or state-dict keys: compiled / quantised encoders are kept
beside the model, in ``model.speed_runtime``.

SAM 2 / 2.1 models take the same switches (:mod:`anyseg.fast.sam2`): ``fused_attention`` in Hiera and
the decoder, ``onednn_encoder`` for the trunk, ``fast_decoder`` (:class:`anyseg.fast.sam2.Sam2FastDecoder`),
``fast_postprocess`` (one banded resize straight to the image size), ``encoder_dtype`` / ``encoder_cast``
for the trunk (the neck and the high-resolution projections stay float32); the runtime encoder is a
:class:`anyseg.fast.sam2.Sam2FastEncoder` that ``SAM2ImagePredictor`` calls.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ["SpeedConfig", "apply", "get_config", "cpu_capabilities", "encode", "encode_images", "ieee_float32",
           "keep_freed_memory"]

_DTYPES = {"float32": None, "fp32": None, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _dtype(value) -> Optional[torch.dtype]:
    if value is None or value == torch.float32:
        return None
    if isinstance(value, str):
        if value.lower() not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {value!r}")
        return _DTYPES[value.lower()]
    if value in (torch.bfloat16, torch.float16):
        return value
    raise ValueError(f"dtype must be None, float32, bfloat16 or float16, got {value!r}")


@dataclass(frozen=True)
class SpeedConfig:
    """Which fast paths to use. Every field off / None is the faithful computation.

    Attributes:
        fused_attention: scaled_dot_product_attention in every attention module (lossless).
        fold_batchnorm: fold TinyViT's BatchNorms into the convolutions (lossless).
        fast_decoder: :class:`anyseg.fast.FastDecoder` for prompts and segment-everything (lossless).
        fast_postprocess: one banded resampling from low-res logits to the original frame (lossless).
        encoder_dtype / decoder_dtype: None (float32), ``torch.bfloat16`` or ``torch.float16`` (autocast).
        encoder_cast: run a copy of the image encoder whose weights are cast to ``encoder_dtype``
            instead of autocasting (no per-call weight casts; layer norms run in that dtype too).
        int8_encoder: dynamically quantised int8 linear layers in the image encoder (CPU only).
        compile: ``torch.compile`` the image encoder (first call is slow); compile_mode is passed on.
        amg_points_per_batch: point prompts decoded together in segment-everything (None: the
            generator's own ``points_per_batch``); results do not depend on it, memory does.
        amg_device_masks: in segment-everything, keep masks on the model's device for boxes, stability
            and run-length encoding, moving only run boundaries to the CPU (useful on GPUs).
        encoder_batch_size: images encoded together by :func:`encode_images`.
        encoder_float32: names of image-encoder submodules that stay in float32 under a reduced-precision
            ``encoder_dtype`` (run in a copy of the encoder, autocast off inside them). None: the encoder
            kind's default from :data:`SENSITIVE_MODULES` for that dtype; ``()``: none.
        onednn_encoder: on a CPU, in float32 and without ``compile``: a copy of the image encoder's
            module tree (sharing its parameters) whose linear layers run through oneDNN with packed
            weights and the MLPs' GELU fused in (:mod:`anyseg.fast.onednn`; the same products summed in
            another order). The packed weights take the linear layers' size again in memory: None
            (the lossless preset) uses it only where that is at most :data:`ONEDNN_ENCODER_MAX_BYTES`
            (MobileSAM, not the ViTs), for SAM 2 :data:`ONEDNN_ENCODER_MAX_BYTES_SAM2` (Hiera-T and
            Hiera-S); True always.
        keep_freed_memory: on Linux with glibc, let the C allocator keep freed blocks (below 128 MiB,
            up to 512 MiB of them) for reuse instead of handing each large temporary back to the
            system, so the decoder's 4 MB-per-prompt temporaries do not page-fault afresh on every call
            (see :func:`keep_freed_memory`). Process-wide and not undone; the computation is unchanged.
    """

    fused_attention: bool = False
    fold_batchnorm: bool = False
    fast_decoder: bool = False
    fast_postprocess: bool = False
    encoder_dtype: Optional[torch.dtype] = None
    decoder_dtype: Optional[torch.dtype] = None
    int8_encoder: bool = False
    encoder_cast: bool = False
    compile: bool = False
    compile_mode: Optional[str] = None
    amg_points_per_batch: Optional[int] = None
    amg_device_masks: bool = False
    encoder_batch_size: int = 1
    encoder_float32: Optional[Tuple[str, ...]] = None
    keep_freed_memory: bool = False
    onednn_encoder: Optional[bool] = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "encoder_dtype", _dtype(self.encoder_dtype))
        object.__setattr__(self, "decoder_dtype", _dtype(self.decoder_dtype))
        if self.amg_points_per_batch is not None and int(self.amg_points_per_batch) < 1:
            raise ValueError(f"amg_points_per_batch must be >= 1, got {self.amg_points_per_batch}")
        if self.encoder_cast and (self.encoder_dtype is None or self.int8_encoder):
            raise ValueError("encoder_cast needs encoder_dtype=torch.bfloat16 or torch.float16 (and no int8_encoder)")
        if self.encoder_float32 is not None:
            if isinstance(self.encoder_float32, str):
                raise ValueError("encoder_float32 must be a sequence of module names, not a string")
            object.__setattr__(self, "encoder_float32", tuple(str(n) for n in self.encoder_float32))
        if int(self.encoder_batch_size) < 1:
            raise ValueError(f"encoder_batch_size must be >= 1, got {self.encoder_batch_size}")

    # ------------------------------------------------------------------------------------ presets
    @classmethod
    def faithful(cls) -> "SpeedConfig":
        """The reference computation (float32, explicit attention, two-step resize)."""
        return cls()

    @classmethod
    def lossless(cls, **overrides: Any) -> "SpeedConfig":
        """Every fast path that keeps float32 and the golden tolerances."""
        return replace(cls(fused_attention=True, fold_batchnorm=True, fast_decoder=True, fast_postprocess=True,
                           keep_freed_memory=True, onednn_encoder=None), **overrides)

    @classmethod
    def auto(cls, device: Union[str, torch.device, None] = None, **overrides: Any) -> "SpeedConfig":
        """Sensible defaults for a device: the lossless paths everywhere; a float16 copy of the encoder on
        GPUs, a bfloat16 encoder on CPUs with native bfloat16 matrix units (AMX or AVX512-BF16), with the
        encoder kind's sensitive modules kept in float32 (:data:`SENSITIVE_MODULES`: MobileSAM's last
        stage and neck); larger point batches and on-device mask processing on GPUs. ``overrides``
        replace single fields."""
        device = torch.device(device if device is not None else "cpu")
        base = cls.lossless()
        if device.type == "cuda":
            # A float16 copy of the encoder: float16 keeps 3 more mantissa bits than bfloat16, which
            # holds MobileSAM's masks at IoU >= 0.98 where bfloat16 does not (docs/speed.md). The
            # decoder stays float32: it is cheap on a GPU, and reduced precision there costs mask
            # quality on small objects (measured on the golden checkpoints).
            base = replace(base, encoder_dtype=torch.float16, encoder_cast=True, amg_points_per_batch=256,
                           amg_device_masks=True, encoder_batch_size=4)
        elif device.type == "cpu" and cpu_capabilities()["bf16_matmul"]:
            base = replace(base, encoder_dtype=torch.bfloat16)
        return replace(base, **overrides)

    @property
    def is_faithful(self) -> bool:
        return self == SpeedConfig()

    def describe(self) -> str:
        """Short text listing the fields that are not faithful."""
        on = []
        for key, value in asdict(self).items():
            default = getattr(SpeedConfig, key)
            if value != default and not (key == "encoder_batch_size" and value == 1):
                if key == "onednn_encoder" and value is None:
                    on.append(f"{key} (<= {ONEDNN_ENCODER_MAX_BYTES >> 20} MiB, SAM 2 "
                              f"{ONEDNN_ENCODER_MAX_BYTES_SAM2 >> 20} MiB)")
                else:
                    on.append(key if value is True else f"{key}={str(value).replace('torch.', '')}")
        return ", ".join(on) or "faithful"


def cpu_capabilities() -> Dict[str, Any]:
    """What this CPU offers: ``{"isa": "AVX2"|"AVX512"|..., "amx": bool, "avx512_bf16": bool,
    "bf16_matmul": bool}`` (bf16_matmul: native bfloat16 matrix math, where bfloat16 pays off)."""
    cpu = getattr(torch, "cpu", None)

    def probe(name: str) -> bool:
        fn = getattr(cpu, name, None)
        try:
            return bool(fn()) if fn is not None else False
        except Exception:  # pragma: no cover - probing must never fail
            return False

    amx = probe("_is_amx_tile_supported")
    avx512_bf16 = probe("_is_avx512_bf16_supported")
    try:
        isa = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover
        isa = "unknown"
    return {"isa": isa, "amx": amx, "avx512_bf16": avx512_bf16, "bf16_matmul": amx or avx512_bf16}


# Image-encoder submodules kept in float32 by default under a reduced-precision encoder, per encoder
# class and dtype. MobileSAM (TinyViT) with a bfloat16 encoder gives a minimum golden mask IoU of 0.928
# against float32; with its last stage and neck in float32, 0.991 (benchmarks/bench_bf16_encoder.py).
# float16 (GPU) keeps the bar without it.
SENSITIVE_MODULES: Dict[Tuple[str, torch.dtype], Tuple[str, ...]] = {
    ("TinyViT", torch.bfloat16): ("layers.3", "neck"),
}


def float32_modules(model: torch.nn.Module, config: "SpeedConfig") -> Tuple[str, ...]:
    """The encoder submodules ``config`` keeps in float32 on ``model`` (empty for a float32 encoder)."""
    if config.encoder_dtype is None or config.int8_encoder:
        return ()
    if config.encoder_float32 is not None:
        return config.encoder_float32
    return SENSITIVE_MODULES.get((type(model.image_encoder).__name__, config.encoder_dtype), ())


class _Float32(torch.nn.Module):
    """Runs ``inner`` in float32 with autocast off. Under autocast the output stays float32 (the next
    operations cast it as they need; the encoder's last module then hands over a float32 embedding); in
    a copy of the encoder cast to a reduced dtype it goes back to the input's dtype."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        autocast = torch.is_autocast_enabled(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            out = self.inner(x.float())
        return out if autocast else out.to(x.dtype)


def _with_float32(encoder: torch.nn.Module, names: Sequence[str]) -> torch.nn.Module:
    """``encoder`` (a copy, changed in place) with the named submodules wrapped in :class:`_Float32`."""
    modules = dict(encoder.named_modules())
    for name in names:
        if name not in modules or not name:
            raise ValueError(f"encoder_float32: no submodule {name!r} in {type(encoder).__name__}")
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else encoder, child, _Float32(modules[name]))
    return encoder


# Packed-weight memory up to which SpeedConfig(onednn_encoder=None) packs the encoder's linear layers.
# MobileSAM's take about 20 MB (encode 5-8 % faster); ViT-B's about 340 MB for 2-5 % (peak RSS of an
# encode 1226 -> 1598 MB), so ViT-B / ViT-L / ViT-H stay on MKL unless onednn_encoder=True.
ONEDNN_ENCODER_MAX_BYTES = 64 << 20
# SAM 2: Hiera's MLPs run a separate GELU pass over large maps that oneDNN fuses, and its linear layers
# ran 11 % faster through oneDNN (Hiera-T, 102 MiB of linear weights; benchmarks/results/speed-log.md,
# "SAM 2 images"), so the lossless preset packs Hiera-T and Hiera-S (129 MiB), not Hiera-B+ / -L.
ONEDNN_ENCODER_MAX_BYTES_SAM2 = 160 << 20


def _onednn():
    from .fast import onednn

    return onednn


def onednn_encoder(encoder: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``encoder``'s module tree that shares its parameters and buffers, with every
    ``nn.Linear`` run as an :class:`anyseg.fast.onednn.PackedLinear`; in the MLPs
    (:class:`~anyseg.modeling.common.MLPBlock`, TinyViT's ``Mlp``) the activation (exact GELU or ReLU)
    is fused into the first layer."""
    from .modeling.common import MLP, MLPBlock
    from .modeling.tiny_vit import Mlp

    onednn = _onednn()
    memo = {id(t): t for t in list(encoder.parameters()) + list(encoder.buffers())}
    twin = copy.deepcopy(encoder, memo)
    fused = {MLPBlock: ("lin1", "act"), Mlp: ("fc1", "act")}
    for module in list(twin.modules()):
        if type(module) is MLP and len(module.layers) == 2 and not module.sigmoid_output:
            # Hiera's MLPs (layers.0 -> act -> layers.1): the activation runs only after the first layer.
            activation = onednn.activation_name(module.act)
            if activation is not None and type(module.layers[0]) is torch.nn.Linear:
                module.layers[0] = onednn.PackedLinear(module.layers[0], activation)
                module.act = torch.nn.Identity()
            continue
        names = fused.get(type(module))
        if names is None:
            continue
        first, act = (getattr(module, n) for n in names)
        activation = onednn.activation_name(act)
        if activation is not None and type(first) is torch.nn.Linear:
            setattr(module, names[0], onednn.PackedLinear(first, activation))
            setattr(module, names[1], torch.nn.Identity())
    for module in list(twin.modules()):
        if isinstance(module, onednn.PackedLinear):
            continue
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(module, name, onednn.PackedLinear(child))
    return twin


class SpeedRuntime:
    """State kept beside a model by :func:`apply`: the encoder to call (compiled / quantised copy, or
    the model's own) and the config."""

    def __init__(self, config: SpeedConfig, encoder: torch.nn.Module) -> None:
        self.config = config
        self.encoder = encoder


def apply(model: torch.nn.Module, config: Optional[SpeedConfig] = None) -> torch.nn.Module:
    """Switch a :class:`~anyseg.modeling.Sam` to ``config`` (default :meth:`SpeedConfig.auto` for its
    device) in place and return it. ``SpeedConfig.faithful()`` switches everything back. Predictors and
    mask generators created before or after the call pick the setting up at their next image."""
    if config is None:
        config = SpeedConfig.auto(model.device)
    if not isinstance(config, SpeedConfig):
        raise ValueError(f"expected a SpeedConfig, got {type(config).__name__}")
    for module in model.modules():
        if hasattr(module, "fused"):
            module.fused = bool(config.fused_attention)
        if hasattr(module, "fold_bn"):
            module.fold_bn = bool(config.fold_batchnorm)
    model.eval()
    if config.keep_freed_memory and model.device.type == "cpu":
        keep_freed_memory()
    encoder = model.image_encoder
    if config.int8_encoder:
        if model.device.type != "cpu":
            raise ValueError("int8_encoder is a CPU path; use encoder_dtype=torch.bfloat16/float16 on GPUs")
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            encoder = quantize_dynamic(copy.deepcopy(encoder).float(), {torch.nn.Linear}, dtype=torch.qint8)
    if config.encoder_cast:
        encoder = copy.deepcopy(encoder).to(config.encoder_dtype)
    if (config.onednn_encoder is not False and model.device.type == "cpu" and encoder is model.image_encoder
            and config.encoder_dtype is None and not config.compile and _onednn().available()):
        linear_bytes = sum(m.weight.numel() * m.weight.element_size() for m in encoder.modules()
                           if type(m) is torch.nn.Linear)
        limit = ONEDNN_ENCODER_MAX_BYTES_SAM2 if getattr(model, "family", "sam") == "sam2" else ONEDNN_ENCODER_MAX_BYTES
        if config.onednn_encoder or linear_bytes <= limit:
            encoder = onednn_encoder(encoder)
    islands = float32_modules(model, config)
    if islands:
        encoder = _with_float32(encoder if encoder is not model.image_encoder else copy.deepcopy(encoder), islands)
    if getattr(model, "family", "sam") == "sam2":
        # SAM 2: the trunk (or its copy) inside the fast encoder (anyseg.fast.sam2), which also runs the
        # neck and the decoder's high-resolution projections, and autocasts the trunk itself.
        from .fast.sam2 import fast_encoder

        dtype = None if config.int8_encoder else config.encoder_dtype
        encoder = fast_encoder(model, encoder, dtype=dtype, cast=config.encoder_cast)
    if config.compile:
        encoder = torch.compile(encoder, mode=config.compile_mode, dynamic=False)
    model.speed_config = None if config.is_faithful else config
    model.speed_runtime = None if config.is_faithful else SpeedRuntime(config, encoder)
    return model


# glibc mallopt parameters (malloc.h), and the values keep_freed_memory sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD, TRIM_THRESHOLD = 128 << 20, 512 << 20
_MALLOC_TUNED: Optional[bool] = None


def keep_freed_memory() -> bool:
    """Tune glibc's allocator for PyTorch's large CPU temporaries; returns whether it applied.

    By default glibc serves every block above a (dynamic, at most 32 MiB) threshold with a fresh
    ``mmap`` and returns it to the system on ``free``, so each new ``B x 4096 x 256`` float tensor of
    the mask decoder is zero-filled page by page by the kernel (about 1000 page faults per 4 MB). Here
    blocks below ``MMAP_THRESHOLD`` (128 MiB) come from the heap, and up to ``TRIM_THRESHOLD`` (512 MiB)
    of free heap is kept for reuse: more than one batch of segment-everything's decoder temporaries
    (about 400 MB for 16 prompts), which a lower bound handed back to the system after every batch.
    Larger blocks are still mapped and unmapped, so big one-off tensors (full-size masks) do not pin
    memory in the heap. Results are unchanged. Process-wide and
    idempotent; a no-op (False) where glibc is not the C library.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED is None:
        _MALLOC_TUNED = False
        import platform

        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                import ctypes

                libc = ctypes.CDLL("libc.so.6")
                ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                ok = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) and ok
                _MALLOC_TUNED = bool(ok)
            except (OSError, AttributeError):  # pragma: no cover - no usable libc
                _MALLOC_TUNED = False
    return _MALLOC_TUNED


@contextlib.contextmanager
def ieee_float32(device: Union[str, torch.device, None]):
    """On CUDA, run float32 convolutions and matrix products in true float32 inside the block.

    PyTorch lets cuDNN convolutions use TF32 (10-bit mantissa) by default, which moves MobileSAM's
    masks by up to 0.5 % IoU. Reduced-precision fast paths (autocast to bfloat16 / float16) are not
    affected. A no-op on other devices."""
    if device is None or torch.device(device).type != "cuda":
        yield
        return
    conv = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
    if conv is not None:  # torch >= 2.9: per-backend precision settings
        matmul = torch.backends.cuda.matmul.fp32_precision
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            torch.backends.cudnn.conv.fp32_precision = conv
            torch.backends.cuda.matmul.fp32_precision = matmul
    else:
        conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


def ieee_float32_method(method):
    """Decorator: run a predictor / generator method under :func:`ieee_float32` for ``self.model``."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with ieee_float32(self.model.device):
            return method(self, *args, **kwargs)
    return wrapper


def get_config(model: torch.nn.Module) -> Optional[SpeedConfig]:
    """The model's active :class:`SpeedConfig`, or None for the faithful path."""
    return getattr(model, "speed_config", None)


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def encode(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Encode preprocessed ``B x 3 x S x S`` images with the model's fast paths -> ``B x 256 x g x g``
    (float32 unless the model's parameters are of another dtype)."""
    runtime = getattr(model, "speed_runtime", None)
    if getattr(model, "family", "sam") == "sam2":
        raise TypeError("anyseg.speed.encode is for SAM 1 models; SAM 2 features come from "
                        "anyseg.fast.sam2.encode (or SAM2ImagePredictor.set_image)")
    param_dtype = next(model.parameters()).dtype
    with ieee_float32(x.device):
        if runtime is None:
            return model.encode_image(x.to(param_dtype))
        config = runtime.config
        encoder = runtime.encoder
        if config.int8_encoder:
            x = x.float()
        elif config.encoder_cast:
            return encoder(x.to(config.encoder_dtype)).to(param_dtype)
        else:
            x = x.to(param_dtype)
        with _autocast(x.device, config.encoder_dtype):
            out = encoder(x)
        return out.to(param_dtype)


def decoder_autocast(model: torch.nn.Module):
    """Context manager running the decoder in the configured dtype (a no-op for float32)."""
    config = get_config(model)
    return _autocast(model.device, None if config is None else config.decoder_dtype)


def preprocess_image(model: torch.nn.Module, image: np.ndarray) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """An ``H x W x 3`` uint8 RGB image resized (long side = the model's input size, PIL bilinear, as
    :meth:`anyseg.SamPredictor.transform_image`), normalised and padded: ``(1 x 3 x S x S`` on the
    model's device, the resized ``(h, w))``."""
    from PIL import Image

    from .geometry import resized_shape

    h, w = resized_shape(image.shape[0], image.shape[1], model.img_size)
    resized = np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    t = torch.as_tensor(resized, device=model.device).permute(2, 0, 1)[None].float()
    return model.preprocess(t), (h, w)


@torch.inference_mode()
def encode_images(model: torch.nn.Module, images: Sequence[np.ndarray],
                  batch_size: Optional[int] = None) -> List[Tuple[torch.Tensor, Tuple[int, int], Tuple[int, int]]]:
    """Encode many ``H x W x 3`` uint8 RGB images, ``batch_size`` at a time (default: the config's
    ``encoder_batch_size``). Returns ``(embedding 1 x 256 x g x g, input_size, original_size)`` per image,
    ready for :meth:`anyseg.SamPredictor.set_embedding`."""
    config = get_config(model) or SpeedConfig()
    batch_size = int(batch_size or config.encoder_batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = []
    for start in range(0, len(images), batch_size):
        group = images[start : start + batch_size]
        tensors, sizes = [], []
        for image in group:
            image = np.asarray(image)
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"expected H x W x 3 uint8 RGB images, got shape {image.shape} dtype {image.dtype}")
            x, input_size = preprocess_image(model, image)
            tensors.append(x)
            sizes.append((input_size, (int(image.shape[0]), int(image.shape[1]))))
        emb = encode(model, torch.cat(tensors))
        out.extend((emb[i : i + 1], *sizes[i]) for i in range(len(group)))
    return out


PRESETS = ("faithful", "lossless", "auto")


def resolve(speed: Union[None, str, "SpeedConfig"], device: Union[str, torch.device, None] = None) -> "SpeedConfig":
    """``None`` / ``"faithful"`` / ``"lossless"`` / ``"auto"`` / a :class:`SpeedConfig` -> a config."""
    if speed is None:
        return SpeedConfig.faithful()
    if isinstance(speed, SpeedConfig):
        return speed
    if speed == "faithful":
        return SpeedConfig.faithful()
    if speed == "lossless":
        return SpeedConfig.lossless()
    if speed == "auto":
        return SpeedConfig.auto(device)
    raise ValueError(f"speed must be one of {', '.join(PRESETS)} or a SpeedConfig, got {speed!r}")
