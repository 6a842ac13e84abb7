"""Low-rank adapters (LoRA) on the image encoder's attention projections.

:class:`LoRALinear` keeps the frozen base weights under the same names as ``nn.Linear`` (``weight``,
``bias``), so a model with adapters still loads the public checkpoint keys; the adapters add
``lora_a`` (``r x in``) and ``lora_b`` (``out x r``, zero at the start, so training starts from
the base model exactly). :func:`merge_lora` folds ``W + (alpha / r) B A`` back into plain
``nn.Linear`` modules, after which the model has exactly the public key layout again.
"""
from __future__ import annotations

import math
from typing import Iterable, List

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_TARGETS = ("qkv", "proj")


class LoRALinear(nn.Module):
    """``y = x W^T + b + (alpha / r) * dropout(x) A^T B^T`` with ``W``, ``b`` frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        self.rank = rank
        self.scaling = alpha / rank
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return out + F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function (without dropout)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_b.float() @ self.lora_a.float()) * self.scaling
            linear.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}"


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def apply_lora(encoder: nn.Module, rank: int = 4, alpha: float = 4.0, dropout: float = 0.0,
               targets: Iterable[str] = DEFAULT_TARGETS) -> List[str]:
    """Wrap every ``nn.Linear`` inside an attention module of ``encoder`` whose name ends in one of
    ``targets`` (ViT ``blocks.*.attn.qkv`` / ``.proj``; TinyViT ``layers.*.blocks.*.attn.*``).
    Returns the wrapped module names."""
    targets = tuple(targets)
    names = [name for name, mod in encoder.named_modules()
             if isinstance(mod, nn.Linear) and name.rpartition(".")[2] in targets and ".attn." in f".{name}"]
    if not names:
        raise ValueError(f"no attention projection named {targets} found in the encoder for LoRA")
    for name in names:
        _replace(encoder, name, LoRALinear(encoder.get_submodule(name), rank, alpha, dropout))
    return names


def merge_lora(model: nn.Module) -> int:
    """Replace every :class:`LoRALinear` in ``model`` by its merged ``nn.Linear`` (in place).
    Returns how many were merged."""
    names = [name for name, mod in model.named_modules() if isinstance(mod, LoRALinear)]
    for name in names:
        _replace(model, name, model.get_submodule(name).merged())
    return len(names)


def lora_parameters(model: nn.Module) -> List[nn.Parameter]:
    return [p for mod in model.modules() if isinstance(mod, LoRALinear) for p in (mod.lora_a, mod.lora_b)]


def merged_state_dict(model: nn.Module) -> dict:
    """``model.state_dict()`` with every adapter folded into its base weight and the ``lora_*`` keys
    dropped: the public key layout, without modifying ``model``."""
    sd = dict(model.state_dict())
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            prefix = f"{name}." if name else ""
            sd[prefix + "weight"] = mod.merged().weight.detach()
            sd.pop(prefix + "lora_a")
            sd.pop(prefix + "lora_b")
    return sd
