"""Which parameters train in each mode, their optimiser groups (layer-wise LR decay, no weight decay
on norms / biases / embeddings), and gradient checkpointing of the encoder blocks."""
from __future__ import annotations

import re
from typing import Dict, List

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .lora import LoRALinear

MODES = ("decoder", "lora", "full")

# Parts of an encoder that take no part in the image embedding (MobileSAM's ImageNet classifier).
_UNUSED_ENCODER = ("head.", "norm_head.")


def set_trainable(model: nn.Module, mode: str) -> List[str]:
    """Freeze / unfreeze for ``mode``; returns the trainable parameter names.

    - ``decoder``: prompt encoder + mask decoder; the image encoder is frozen.
    - ``lora``: the same plus the LoRA adapters inside the encoder (apply them first).
    - ``full``: everything except encoder parts unused by SAM.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    for name, p in model.named_parameters():
        if name.startswith("image_encoder."):
            local = name[len("image_encoder."):]
            if mode == "full":
                p.requires_grad_(not local.startswith(_UNUSED_ENCODER))
            elif mode == "lora":
                p.requires_grad_(local.endswith(("lora_a", "lora_b")))
            else:
                p.requires_grad_(False)
        else:
            p.requires_grad_(True)
    if mode == "lora" and not any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("mode 'lora' needs adapters: call anyseg.train.lora.apply_lora on the encoder first")
    return [n for n, p in model.named_parameters() if p.requires_grad]


def encoder_layer_ids(model: nn.Module) -> Dict[str, int]:
    """Encoder parameter name -> depth index (0 = input stem, ``L`` = neck) for layer-wise decay;
    also returns ``"__num_layers__" -> L``."""
    ids: Dict[str, int] = {}
    enc = "image_encoder."
    names = [n for n, _ in model.named_parameters() if n.startswith(enc)]
    block_order: Dict[str, int] = {}
    for n in names:
        m = re.match(r"image_encoder\.(blocks\.\d+|layers\.\d+\.blocks\.\d+|layers\.\d+\.downsample)\.", n)
        if m and m.group(1) not in block_order:
            block_order[m.group(1)] = len(block_order) + 1
    last = len(block_order) + 1
    for n in names:
        m = re.match(r"image_encoder\.(blocks\.\d+|layers\.\d+\.blocks\.\d+|layers\.\d+\.downsample)\.", n)
        if m:
            ids[n] = block_order[m.group(1)]
        elif n.startswith(enc + "neck.") or n.startswith(enc + "norm_head") or n.startswith(enc + "head"):
            ids[n] = last
        else:  # patch embedding, position embedding
            ids[n] = 0
    ids["__num_layers__"] = last
    return ids


def _no_weight_decay(model: nn.Module) -> set:
    names = set()
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if (p.ndim <= 1 or isinstance(mod, nn.Embedding) or p_name in ("pos_embed", "rel_pos_h", "rel_pos_w",
                                                                           "attention_biases")):
                names.add(full)
    return names


def param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float = 1.0) -> List[dict]:
    """AdamW groups for the trainable parameters: encoder parameters at depth ``i`` get
    ``lr * layer_decay ** (L - i)`` (the neck and everything outside the encoder get ``lr``);
    norms, biases, position tables and embeddings get no weight decay."""
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    ids = encoder_layer_ids(model)
    last = ids["__num_layers__"]
    no_wd = _no_weight_decay(model)
    groups: Dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = layer_decay ** (last - ids[name]) if name in ids else 1.0
        wd = 0.0 if name in no_wd else weight_decay
        key = (round(scale, 12), wd)
        group = groups.setdefault(key, {"params": [], "names": [], "lr": lr * scale, "lr_scale": scale,
                                        "weight_decay": wd})
        group["params"].append(p)
        group["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def enable_gradient_checkpointing(encoder: nn.Module) -> int:
    """Recompute each encoder block's activations in the backward pass instead of storing them.

    Wraps the ``forward`` of every element of a ``blocks`` ModuleList (ViT blocks, TinyViT blocks)
    on the instance, so module names and checkpoint keys are unchanged. Returns the number wrapped.
    """
    count = 0
    for name, mod in encoder.named_modules():
        if name.rpartition(".")[2] == "blocks" and isinstance(mod, nn.ModuleList):
            for block in mod:
                if getattr(block, "_checkpointed", False):
                    continue
                original = block.forward

                def forward(*args, _original=original, **kwargs):
                    if torch.is_grad_enabled():
                        return checkpoint(_original, *args, use_reentrant=False, **kwargs)
                    return _original(*args, **kwargs)

                block.forward = forward
                block._checkpointed = True
                count += 1
    return count
