"""``anyseg train``: fine-tune or train SAM with the interactive prompt simulation."""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import get_type_hints

DESCRIPTION = """\
Train SAM the way it was trained: every instance mask gets 11 interactive iterations (a first
click or noisy box, 8 corrective clicks from the error region, 2 refinements with the previous mask
as prompt); loss = 20 x focal + dice (best of the three outputs for a single click) + IoU-head MSE.

Modes:
  decoder   image encoder frozen; embeddings are computed once and cached on disk, so fine-tuning
            the prompt encoder + mask decoder is fast, even on a CPU
  lora      low-rank adapters on the encoder's attention qkv / proj (merged into the weights on
            export) + prompt encoder + mask decoder
  full      every parameter (layer-wise LR decay on the encoder blocks)
  hq        HQ-SAM: only the HQ output token, its MLP and the feature-fusion layers train, the rest
            is frozen (the encoder runs without gradients); the loss is on the HQ token's mask alone.
            A SAM 1 model gets freshly initialised HQ parts; the export is an HQ-SAM checkpoint

Settings come from defaults, then --config FILE (lines 'key = value', '#' comments; keys are the
long flag names, e.g. 'batch-size = 4'), then the flags given. The run folder OUTPUT gets
last.pt (resumable state, written atomically every --save-every steps), log.csv, summary.json and
the final model (--export, public checkpoint layout: load it with anyseg.load_model or --model).
Running the same command again resumes from last.pt; --fresh starts over."""

EXAMPLES = """\
examples:
  # fine-tune the mask decoder of a checkpoint on COCO-format data (CPU is fine)
  anyseg train --model sam_vit_b_01ec64.pth --data train.json --images train/ --mode decoder \\
      --steps 2000 --lr 1e-4 -o runs/decoder
  # a tiny model from scratch on the synthetic scenes
  anyseg train --arch tiny --data synthetic:count=400,size=128 --mode full --steps 300 --lr 2e-3 \\
      --loss-res low -o runs/tiny
  # full fine-tuning on a GPU with bf16 and gradient checkpointing
  anyseg train --model vit_b --data sa1b/ --mode full --device cuda --bf16 --grad-checkpointing \\
      --batch-size 4 --masks-per-image 16 --lr 8e-5 --steps 20000 -o runs/full
  # decoder fine-tuning of a 1024 px ViT checkpoint run at 256 px (16x cheaper decoder on a CPU;
  # the exported model is a 256 px model: evaluate the original with 'anyseg eval --img-size 256')
  anyseg train --model vit_small_checkpoint.pth --img-size 256 --mode decoder --data synthetic:count=200,size=256 \\
      --lr 5e-4 --warmup-steps 5 --focal-weight 1 --focal-alpha -1 --focal-gamma 0 --point-iters 0 \\
      --refine-iters 0 --box-prob 0 --loss-res low --steps 200 --batch-size 4 --masks-per-image 4 -o runs/decoder256
  # LoRA on the encoder
  anyseg train --model vit_b --data labels_dir/ --mode lora --lora-rank 8 -o runs/lora
  # HQ-SAM: train the HQ parts of an HQ checkpoint (or fresh HQ parts on a SAM 1 checkpoint)
  anyseg train --model hq_vit_b --data train.json --images train/ --mode hq --lr 1e-3 -o runs/hq"""

# Flag spellings that differ from "--" + field name with dashes.
_SHORT = {"output": ("-o",), "data": ("-d",), "model": ("-m",)}


def register(subparsers) -> None:
    from ..train.config import HELP, InteractiveConfig, TrainConfig

    parser = subparsers.add_parser(
        "train", help="train / fine-tune (decoder, LoRA, full or HQ) with simulated interactive prompts",
        description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", "-c", default=None, metavar="FILE", help="settings file (key = value lines)")
    parser.add_argument("--fresh", action="store_true", help="ignore and replace OUTPUT/last.pt instead of resuming")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    hints = get_type_hints(TrainConfig)
    defaults = TrainConfig()
    # The run's own settings first, then the prompt simulation and loss (inherited fields come first
    # in fields()).
    inherited = {f.name for f in fields(InteractiveConfig)}
    ordered = [f for f in fields(TrainConfig) if f.name not in inherited] + list(fields(InteractiveConfig))
    for f in ordered:
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        default = getattr(defaults, f.name)
        help_text = f"{HELP.get(f.name, '')} (default: {default})"
        names = (flag,) + _SHORT.get(f.name, ())
        if kind is bool:
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:
            base = kind
            if getattr(kind, "__args__", None):
                base = next(a for a in kind.__args__ if a is not type(None))
            parser.add_argument(*names, dest=f.name, type=base, default=None, metavar=f.name.upper(),
                                help=help_text)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train.config import TrainConfig, load_config
    from ..train.trainer import Trainer

    overrides = {f.name: getattr(args, f.name, None) for f in fields(TrainConfig)}
    cfg = load_config(args.config, overrides)
    if cfg.model and _is_sam2_checkpoint(cfg.model):
        raise ValueError(f"training SAM 2 models is not supported: {cfg.model} is a SAM 2 / 2.1 checkpoint. 'anyseg "
                         "train' fine-tunes SAM 1 models (vit_b, vit_l, vit_h, vit_t, nano or a SAM 1 checkpoint "
                         "file); a SAM 2 model can be used with 'anyseg segment', 'anyseg eval' and 'anyseg serve'")
    trainer = Trainer(cfg, resume=not args.fresh, progress=not args.quiet,
                      log=lambda msg: print(msg, file=sys.stderr))
    summary = trainer.fit()
    last = summary["last"] or {}
    print(f"trained {summary['step']}/{summary['steps']} steps; last loss {last.get('loss', float('nan')):.4f}, "
          f"train IoU after the last iteration {last.get('last_iou', float('nan')):.3f}", file=sys.stderr)
    if summary["exported"]:
        print(f"model: {summary['exported']}")
    return 0


def _is_sam2_checkpoint(model: str) -> bool:
    """Whether ``model`` (a checkpoint file or registry name) holds a SAM 2 model, told without loading it:
    a file by its key names (the tensors are memory-mapped, not read), a registry name by its entry (no
    download). False when that cannot be told (the trainer then reports whatever is wrong)."""
    from collections.abc import Mapping
    from pathlib import Path

    import torch

    from ..hub import get_checkpoint_info
    from ..sam2_checkpoint import is_sam2_state_dict

    path = Path(model).expanduser()
    if not path.is_file():
        try:
            info = get_checkpoint_info(model)
        except ValueError:
            return False
        return info.config_name is not None  # only SAM 2 entries name a reference config
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return is_sam2_state_dict(list(f.keys()))
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    if not isinstance(obj, Mapping):
        return False
    nested = [v for k, v in obj.items() if k in ("model", "state_dict") and isinstance(v, Mapping)]
    return any(is_sam2_state_dict(sd) for sd in [obj, *nested])
