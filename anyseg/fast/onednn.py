"""Float32 matrix products through oneDNN on a CPU, for the fast decoder's small products.

PyTorch runs float32 ``mm`` / ``bmm`` / ``linear`` on a CPU through MKL, which picks its kernels by CPU
vendor; oneDNN (also inside PyTorch) picks them by instruction set and can keep a weight in its own
blocked layout between calls. On an AMD EPYC (Zen 4) the decoder's products ran 1.1-3x faster through
oneDNN in one-off measurements: a prompt's token MLP (``7 x 256`` against ``256 x 2048``) about 2.8x
with the weight kept packed, the upscaling's second layer about 1.15x with its GELU fused in, the
hypernetworks' ``3 x 32`` against ``32 x 65536`` about 1.6x (``benchmarks/bench_decoder_ab.py`` times
the decoder against a revision from before them; ``benchmarks/results/speed-log.md`` has the
numbers). The results are those of the same float32 products summed in another order: differences at
rounding level.

The helpers fall back to the plain PyTorch ops where oneDNN cannot serve: another device or dtype,
autograd (the oneDNN op has no backward), a trace (ONNX export), autocast, or a PyTorch built
without oneDNN. ``ENABLED`` switches them off for the whole process (the fast decoder's results then
come from MKL, to rounding the same).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

ENABLED = True


def _ops_present() -> bool:
    try:
        return (torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                and "binary" in torch.ops.mkldnn._linear_pointwise.overloads()
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
    except (AttributeError, RuntimeError):
        return False


_PRESENT = _ops_present()


def available() -> bool:
    """Whether this PyTorch has the oneDNN ops and they are switched on (``ENABLED``)."""
    return ENABLED and _PRESENT


def usable(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether :func:`linear` may take the oneDNN route for these operands."""
    if not (ENABLED and _PRESENT) or torch.jit.is_tracing() or torch.is_autocast_enabled("cpu"):
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cpu" or t.dtype != torch.float32 or (grad and t.requires_grad):
            return False
    return True


def version(t: torch.Tensor) -> int:
    """``t``'s in-place version counter, 0 for an inference tensor (which keeps none)."""
    return 0 if t.is_inference() else t._version


def pack(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` (``N x K``, as ``nn.Linear`` keeps it) in oneDNN's blocked layout, for products with
    about ``rows`` input rows (any number works). Only :func:`linear` can read the result."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows)


# Activations oneDNN fuses into the product, by the name it knows them under, and their PyTorch form.
_ACTIVATIONS = {"none": lambda x: x, "relu": F.relu, "gelu": F.gelu}


def activation_name(module: torch.nn.Module) -> Optional[str]:
    """The name oneDNN fuses ``module`` under (``relu``, or ``gelu`` for the exact GELU), or None."""
    if isinstance(module, torch.nn.ReLU):
        return "relu"
    if isinstance(module, torch.nn.GELU) and module.approximate == "none":
        return "gelu"
    return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           activation: str = "none", packed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``activation(x @ weight^T + bias)`` (``x`` ``... x K``, ``weight`` ``N x K``, ``bias`` ``N``) with
    ``activation`` one of ``none``, ``relu``, ``gelu`` (exact, erf). Through oneDNN when :func:`usable`
    (with ``packed``, the weight from :func:`pack`, when given), else ``F.linear`` and the activation."""
    if usable(x, weight, bias):
        algorithm = "none" if activation == "gelu" else ""
        return torch.ops.mkldnn._linear_pointwise(x, weight if packed is None else packed, bias, activation, [],
                                                  algorithm)
    return _ACTIVATIONS[activation](F.linear(x, weight, bias))


def bmm_nt(a: torch.Tensor, b: torch.Tensor, add: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a @ b^T + add`` for ``a`` ``B x M x K`` and ``b`` ``B x N x K`` (``add`` ``B x M x N``, or
    ``B x M x 1`` / ``1 x M x 1`` broadcast, or None). For a single batch through oneDNN with ``b`` as its
    weight (a transposed view of ``b`` is read in place), the addition fused when ``add`` has the output's
    shape; for several, ``torch.bmm`` / ``torch.baddbmm`` (one oneDNN product per batch measured slower
    there)."""
    if a.shape[0] == 1 and b.shape[0] == 1 and usable(a, b, add):
        op = torch.ops.mkldnn._linear_pointwise
        if add is None:
            return op(a[0], b[0], None, "none", [], "").unsqueeze(0)
        if add.shape == (1, a.shape[1], b.shape[1]):
            return op.binary(a[0], add[0].contiguous(), b[0], None, "add").unsqueeze(0)
        return op(a[0], b[0], None, "none", [], "").unsqueeze(0).add_(add)
    if add is None:
        return torch.bmm(a, b.transpose(1, 2))
    return torch.baddbmm(add, a, b.transpose(1, 2))


class PackedLinear(torch.nn.Module):
    """An ``nn.Linear`` (its own weight and bias tensors, not copies) run through oneDNN with the weight
    kept in oneDNN's layout, packed again whenever the weight changes (another storage or in-place
    version), and ``activation`` (``none``, ``relu`` or exact ``gelu``) fused into the product. Where
    :func:`usable` says no (autograd, autocast, another dtype or device) it is ``F.linear`` plus the
    activation. The packed copy costs the weight's size again in memory."""

    def __init__(self, linear: torch.nn.Linear, activation: str = "none", rows: int = 4096) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.linear = linear
        self.activation = activation
        self.rows = int(rows)
        self._packed: Optional[tuple] = None

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"

    def __getstate__(self) -> dict:
        # oneDNN's packed tensors have no storage to copy or pickle: copies pack again on first use.
        state = self.__dict__.copy()
        state["_packed"] = None
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.linear.weight, self.linear.bias
        packed = None
        if usable(x, weight, bias):
            stamp = (weight.data_ptr(), version(weight), tuple(weight.shape))
            if self._packed is None or self._packed[0] != stamp:
                self._packed = (stamp, pack(weight, self.rows))
            packed = self._packed[1]
        return linear(x, weight, bias, self.activation, packed=packed)
