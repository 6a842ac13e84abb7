"""Which parameters train in each mode, their optimiser groups (layer-wise LR decay, no weight decay
on norms / biases / embeddings), and gradient checkpointing of the encoder blocks."""
from __future__ import annotations

import re
from typing import Dict, List

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .lora import LoRALinear

MODES = ("decoder", "lora", "full", "hq")

# Parts of an encoder that take no part in the image embedding (MobileSAM's ImageNet classifier).
_UNUSED_ENCODER = ("head.", "norm_head.")


def set_trainable(model: nn.Module, mode: str) -> List[str]:
    """Freeze / unfreeze for ``mode``; returns the trainable parameter names.

    - ``decoder``: prompt encoder + mask decoder; the image encoder is frozen.
    - ``lora``: the same plus the LoRA adapters inside the encoder (apply them first).
    - ``full``: everything except encoder parts unused by SAM.
    - ``hq``: only HQ-SAM's HQ parts (the HQ token, its MLP, the feature fusion); everything else is
      frozen, as in the HQ-SAM paper. The model must be an HQ-SAM model (see :func:`attach_hq`).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "hq":
        from ..modeling.hq import hq_parameters

        hq = {name for name, _ in hq_parameters(model)}
        if not hq:
            raise ValueError("mode 'hq' trains the HQ-SAM parts (hf_token, hf_mlp, compress_vit_feat, "
                             "embedding_encoder, embedding_maskfeature), but this model has none: give an HQ-SAM "
                             "model, or attach fresh HQ parts with anyseg.train.params.attach_hq")
        for name, p in model.named_parameters():
            p.requires_grad_(name in hq)
        return sorted(hq)
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


def attach_hq(model: nn.Module) -> nn.Module:
    """A SAM 1 model with freshly initialised HQ-SAM parts (the HQ-SAM paper trains them from scratch
    on a frozen SAM): the same weights for every SAM key, the HQ token, its MLP and the fusion layers
    at their default init. An HQ model is returned unchanged."""
    from dataclasses import replace

    from ..config import HQConfig, ViTConfig
    from ..modeling.sam import build_sam

    if getattr(model, "is_hq", False):
        return model
    config = model.config
    encoder = config.encoder
    if isinstance(encoder, ViTConfig):
        vit_dim = encoder.embed_dim
    else:
        if len(encoder.embed_dims) < 3:
            raise ValueError("HQ-SAM needs a TinyViT with at least three stages")
        vit_dim = encoder.embed_dims[2]
    hq_model = build_sam(replace(config, hq=HQConfig(vit_dim=vit_dim)))
    missing, unexpected = hq_model.load_state_dict(model.state_dict(), strict=False)
    from ..modeling.hq import HQ_KEY_PREFIXES

    stray = [k for k in missing if not (k.startswith("mask_decoder.") and k.split(".")[1] in HQ_KEY_PREFIXES)]
    if stray or unexpected:
        raise ValueError(f"cannot attach HQ parts: keys differ ({', '.join(stray + list(unexpected))})")
    return hq_model.to(next(model.parameters()).device).train(model.training)


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
