"""Training settings: one flat dataclass, readable from a simple ``key = value`` file and from flags.

The config file format is deliberately tiny (no JSON / YAML needed)::

    # comments start with '#'
    data = synthetic:count=400,seed=0,size=128
    arch = tiny
    mode = full
    steps = 600
    lr = 1e-3

Keys are the field names below (``-`` and ``_`` are interchangeable); values are parsed to the field's
type (``true`` / ``false`` for booleans; ``none`` for "not set").
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Dict, Optional, get_type_hints

from ..config import MaskDecoderConfig, PromptEncoderConfig, SamConfig, VARIANTS, ViTConfig

# Small architectures for training from scratch (CPU tests, pre-training experiments).
ARCHS: Dict[str, SamConfig] = {
    "tiny": SamConfig(
        encoder=ViTConfig(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=4,
                          patch_size=16, img_size=128, out_chans=128),
        prompt=PromptEncoderConfig(embed_dim=128, mask_in_chans=16),
        # 128 wide so that the decoder's 8 heads (a fixed 8 in the checkpoint format) are not too narrow
        decoder=MaskDecoderConfig(transformer_dim=128, depth=2, num_heads=8, mlp_dim=256, iou_head_hidden_dim=128),
    ),
    "small": SamConfig(
        encoder=ViTConfig(embed_dim=96, depth=4, num_heads=4, global_attn_indexes=(1, 3), window_size=8,
                          patch_size=8, img_size=256, out_chans=128),
        prompt=PromptEncoderConfig(embed_dim=128, mask_in_chans=16),
        decoder=MaskDecoderConfig(transformer_dim=128, depth=2, num_heads=8, mlp_dim=512, iou_head_hidden_dim=128),
    ),
    # The shipped "nano" model: 8 px patches at 128 px (a 16 x 16 embedding grid, 64 x 64 low-res masks).
    "nano": SamConfig(
        encoder=ViTConfig(embed_dim=96, depth=4, num_heads=3, global_attn_indexes=(1, 3), window_size=8,
                          patch_size=8, img_size=128, out_chans=128),
        prompt=PromptEncoderConfig(embed_dim=128, mask_in_chans=16),
        decoder=MaskDecoderConfig(transformer_dim=128, depth=2, num_heads=8, mlp_dim=512, iou_head_hidden_dim=128),
    ),
    **VARIANTS,
}


@dataclass
class InteractiveConfig:
    """The interactive prompt simulation and the loss of one training example (SAM's recipe)."""

    point_iters: int = 8
    refine_iters: int = 2
    box_prob: float = 0.5
    box_noise: float = 0.1
    # At most this many pixels of a 1024 model frame (scaled to the model's input size).
    box_max_noise: float = 20.0
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


@dataclass
class TrainConfig(InteractiveConfig):
    """Every training setting: the run's own fields below plus those of :class:`InteractiveConfig`."""

    data: str = ""
    images: Optional[str] = None
    output: str = "runs/train"
    model: Optional[str] = None
    arch: Optional[str] = None
    img_size: Optional[int] = None
    mode: str = "decoder"
    steps: int = 1000
    batch_size: int = 2
    masks_per_image: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.1
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    layer_decay: float = 0.8
    clip_grad: float = 1.0
    loss_res: str = "input"
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_dropout: float = 0.0
    hflip: bool = False
    bf16: bool = False
    grad_checkpointing: bool = False
    device: str = "auto"
    seed: int = 0
    threads: int = 0
    workers: int = 0
    save_every: int = 100
    cache_dir: Optional[str] = None
    cache_dtype: str = "float16"
    tensorboard: bool = False
    export: str = "model.pth"
    preset: Optional[str] = None

    def validate(self) -> "TrainConfig":
        from .params import MODES

        if not self.data:
            raise ValueError("no training data: give --data (e.g. 'synthetic', a COCO .json or a folder)")
        if (self.model is None) == (self.arch is None):
            raise ValueError("give exactly one of --model (a checkpoint to start from) or --arch (a new model "
                             f"from scratch: {', '.join(ARCHS)})")
        if self.img_size is not None and self.img_size <= 0:
            raise ValueError(f"--img-size must be a positive number of pixels, got {self.img_size}")
        if self.arch is not None and self.arch not in ARCHS:
            raise ValueError(f"unknown --arch {self.arch!r}; expected one of {', '.join(ARCHS)}")
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.loss_res not in ("input", "low"):
            raise ValueError(f"--loss-res must be 'input' or 'low', got {self.loss_res!r}")
        if self.cache_dtype not in ("float16", "float32", "bfloat16"):
            raise ValueError(f"--cache-dtype must be float16, bfloat16 or float32, got {self.cache_dtype!r}")
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")
        for name in ("steps", "batch_size", "masks_per_image", "save_every", "lora_rank"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown --preset {self.preset!r}; expected one of {', '.join(PRESETS)}")
        if self.mode == "decoder" and self.hflip:
            raise ValueError("--hflip needs the encoder to see the flipped image; it does not work with "
                             "--mode decoder (cached embeddings)")
        return self

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def sam_config(self) -> Optional[SamConfig]:
        """The architecture of ``--arch`` (at ``--img-size`` when given), None with ``--model``."""
        if not self.arch:
            return None
        config = ARCHS[self.arch]
        if self.img_size is not None:
            config = replace(config, encoder=replace(config.encoder, img_size=self.img_size))
        return config


# Named bundles of settings, applied on top of the defaults and under the config file and flags.
# "scratch" trains a new model (--arch) on a CPU budget. It deviates from SAM's recipe on purpose:
# with SAM's 20 : 1 focal : dice weighting an untrained model collapses to empty masks within ~10
# steps (the alpha = 0.25 focal term is smallest when every logit is negative) and stays there for
# hundreds of steps, so the preset weights focal and dice 1 : 1; it also uses one corrective click
# per session (instead of 8 + 2 refinements), low-res losses and a high learning rate.
PRESETS: Dict[str, Dict[str, object]] = {
    "sam": {},
    "scratch": dict(mode="full", lr=2e-3, warmup_steps=20, focal_weight=1.0, dice_weight=1.0, point_iters=1,
                    refine_iters=0, loss_res="low"),
}

# Settings that define the model being trained: resuming with other values would mix two runs.
IDENTITY_FIELDS = ("model", "arch", "img_size", "mode", "lora_rank", "lora_alpha", "seed")

HELP = {
    "data": "training data: 'synthetic[:count=N,seed=S,size=PX,objects=A-B,parts=1]', a COCO instances .json, "
            "coco:FILE (the annotation file of anyseg serve, images from its served folder), a folder with images/ + labels/ (instance label maps), or an SA-1B folder (jpg + json pairs)",
    "images": "image folder of a COCO .json (default: next to the JSON or its images/ subfolder)",
    "output": "run folder: last.pt (resumable state), log.csv, the exported model",
    "model": "checkpoint to start from (file or registered name)",
    "arch": "build an untrained model instead: " + ", ".join(ARCHS),
    "img_size": "model input size in px (square frame); a ViT checkpoint's position tables are resampled, e.g. 256 "
                "runs a 1024 px checkpoint on a 16 x 16 embedding grid (16x cheaper decoder); the exported model "
                "keeps this size (default: the checkpoint's / arch's own size)",
    "mode": "decoder: encoder frozen, embeddings cached once; lora: adapters on encoder attention; full: all; "
            "hq: only HQ-SAM's HQ token, its MLP and fusion layers (fresh ones are attached to a SAM 1 model)",
    "steps": "optimiser steps in total (a resumed run continues up to this)",
    "batch_size": "images per step",
    "masks_per_image": "instance masks drawn per image per step (each gets its own interactive session)",
    "lr": "peak learning rate (AdamW)",
    "weight_decay": "AdamW weight decay (not applied to norms, biases, embeddings)",
    "warmup_steps": "linear warm-up steps before the cosine decay",
    "min_lr_ratio": "the cosine decay ends at lr * this",
    "layer_decay": "layer-wise LR decay for encoder blocks (1 = off); lora / full modes",
    "clip_grad": "clip the global gradient norm to this (0 = off)",
    "point_iters": "iterations that add an error-region point (SAM: 8)",
    "refine_iters": "iterations without a new point (SAM: 2)",
    "box_prob": "chance that the first prompt is a box instead of a point",
    "box_noise": "std of the box-corner noise as a fraction of the box side",
    "box_max_noise": "the box-corner noise is clamped to this many pixels of a 1024 frame",
    "focal_weight": "weight of the focal loss", "dice_weight": "weight of the dice loss",
    "iou_weight": "weight of the IoU-head MSE loss",
    "focal_alpha": "focal loss foreground weight (background gets 1 - alpha; negative = no weighting)",
    "focal_gamma": "focal loss focusing exponent",
    "loss_res": "input: losses on the upsampled S x S masks (as SAM); low: on the 4g x 4g low-res masks (faster)",
    "lora_rank": "LoRA rank", "lora_alpha": "LoRA alpha (scaling = alpha / rank)",
    "lora_dropout": "dropout on the LoRA input",
    "hflip": "random left-right flips (lora / full modes)",
    "bf16": "bfloat16 autocast for the forward passes (CUDA, or recent CPUs)",
    "grad_checkpointing": "recompute encoder block activations in backward (less memory)",
    "device": "auto, cpu, cuda, cuda:1, ...",
    "seed": "seed for the model init, data order and prompt simulation",
    "threads": "torch CPU threads (0 = leave as is)",
    "workers": "processes that read / generate the next steps' images ahead of the GPU (0 = in the "
               "training process); results do not depend on it",
    "save_every": "write the resumable checkpoint every N steps",
    "cache_dir": "where decoder mode caches image embeddings (default OUTPUT/cache)",
    "cache_dtype": "storage dtype of cached embeddings: float16 (default), bfloat16, float32",
    "tensorboard": "also log to TensorBoard (needs the 'train' extra: pip install anyseg[train])",
    "export": "file name (in OUTPUT) of the final model, public key layout (.pth or .safetensors)",
    "preset": "named settings applied before the config file and flags: sam (the defaults) or scratch "
              "(new models on a CPU: full mode, lr 2e-3, focal : dice 1 : 1, 1 corrective click, low-res loss)",
}


def _parse_value(text: str, kind, key: str):
    value = text.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    optional = getattr(kind, "__origin__", None) is not None or kind is type(None)
    base = kind
    if optional:
        args = [a for a in getattr(kind, "__args__", ()) if a is not type(None)]
        base = args[0] if args else str
        if value.lower() in ("none", "null", ""):
            return None
    try:
        if base is bool:
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base is int:
            return int(float(value)) if float(value).is_integer() else int(value)
        if base is float:
            return float(value)
    except ValueError:
        raise ValueError(f"config key {key!r}: expected {base.__name__}, got {text.strip()!r}") from None
    return value


def parse_config_text(text: str, source: str = "config") -> Dict[str, object]:
    """``key = value`` lines -> ``{field: typed value}``; raises ValueError naming the line."""
    hints = get_type_hints(TrainConfig)
    out: Dict[str, object] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if "=" not in line:
            raise ValueError(f"{source}:{number}: expected 'key = value', got {raw.strip()!r}")
        key, value = (s.strip() for s in line.split("=", 1))
        name = key.replace("-", "_")
        if name not in hints:
            raise ValueError(f"{source}:{number}: unknown key {key!r}; known keys: {', '.join(hints)}")
        out[name] = _parse_value(value, hints[name], key)
    return out


def preset_values(name: Optional[str]) -> Dict[str, object]:
    """The settings of a named preset (empty for None); ValueError for an unknown name."""
    if name is None:
        return {}
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def load_config(path=None, overrides: Optional[Dict[str, object]] = None) -> TrainConfig:
    """Defaults, then the preset (``preset`` from the flags, else from the file), then the file's
    values, then ``overrides`` (non-None flag values)."""
    from_file: Dict[str, object] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"config file not found: {file}")
        from_file = parse_config_text(file.read_text(), str(file))
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    preset = flags.get("preset", from_file.get("preset"))
    cfg = replace(TrainConfig(), **preset_values(preset))
    cfg = replace(cfg, **from_file)
    return replace(cfg, **flags)
