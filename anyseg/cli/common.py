"""Pieces shared by the subcommands: model options and prompt parsing."""
from __future__ import annotations

import argparse
from typing import List, Optional, Tuple

# Used when --model is not given: the small built-in model, so every command runs offline.
DEFAULT_MODEL = "nano"
NANO_NOTICE = (
    "using the small built-in model 'nano' (2.9 MB, trained by anyseg on synthetic shapes; a demo, not "
    "for real photographs): pass --model vit_b, vit_l, vit_h, vit_t or a checkpoint file for real images"
)


def int_at_least(minimum: int, what: str = ""):
    """An argparse type: an integer >= ``minimum``; ``what`` names it in the message (``a frame index``)."""
    expected = f"{what} (an integer >= {minimum})" if what else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    return parse


#: argparse type: an integer >= 1, with a message that says so.
positive_int = int_at_least(1)


def add_model_arguments(parser: argparse.ArgumentParser, *, speed: bool = True, device: bool = True) -> None:
    parser.add_argument(
        "--model", "-m", default=DEFAULT_MODEL, metavar="NAME_OR_PATH",
        help="checkpoint file (.pth/.pt/.safetensors; SAM 1 or SAM 2 / 2.1, a SAM 2 file with a custom layout "
             "needs its .yaml config beside it) or a name: nano (the small built-in demo model, the default) or "
             "vit_b, vit_l, vit_h, vit_t (the public SAM checkpoints, downloaded once into $ANYSEG_HOME, default "
             "~/.cache/anyseg)",
    )
    if device:
        parser.add_argument("--device", default=None,
                            help="torch device, e.g. cpu or cuda (default: cuda if available, else cpu)")
    if not speed:
        return
    parser.add_argument(
        "--speed", choices=("auto", "lossless", "faithful"), default="auto",
        help="fast paths: auto (lossless fast paths, plus bf16 where the hardware has it; default), lossless "
             "(same float32 results as the reference, faster) or faithful (the reference computation); SAM 1 "
             "and SAM 2 models alike",
    )


def load_model_from_args(args: argparse.Namespace, *, img_size: Optional[int] = None,
                         keep_freed_memory: bool = True):
    """The model of ``--model`` on ``--device`` with ``--speed`` (and at ``img_size`` px when given).

    SAM 1 and SAM 2 checkpoints alike; ``--speed auto`` switches on the fast paths of
    :mod:`anyseg.speed` for the model's family. What a family cannot do (``--img-size`` with SAM 2) is a
    ValueError that says so. ``keep_freed_memory=False`` leaves the C allocator as it is even where the
    speed preset would tune it (a long-running server whose memory should follow its cache bound)."""
    import torch

    from ..checkpoint import load_model
    from ..protocol import UnsupportedByModel, apply_speed

    device = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    speed = getattr(args, "speed", None)
    if str(args.model).strip().lower() == "nano":
        import sys

        print(f"anyseg: {NANO_NOTICE}", file=sys.stderr)
    try:
        model = load_model(args.model, device=device, img_size=img_size)
    except NotImplementedError as exc:  # an option the checkpoint's family does not have
        raise UnsupportedByModel(str(exc)) from exc
    if speed is not None:
        apply_speed(model, speed, keep_freed_memory=keep_freed_memory)
    return model


def parse_numbers(text: str, counts: Tuple[int, ...], what: str) -> List[float]:
    """'1,2' -> [1.0, 2.0]; the number of values must be one of ``counts``."""
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        values = []
    if len(values) not in counts or not values:
        expected = " or ".join(str(c) for c in counts)
        raise argparse.ArgumentTypeError(f"{what}: expected {expected} comma-separated numbers, got {text!r}")
    return values


def point_arg(text: str) -> List[float]:
    values = parse_numbers(text, (2, 3), "--point X,Y[,LABEL]")
    if len(values) == 3 and values[2] not in (0.0, 1.0):
        raise argparse.ArgumentTypeError(f"--point label must be 1 (foreground) or 0 (background), got {text!r}")
    return values if len(values) == 3 else values + [1.0]


def box_arg(text: str) -> List[float]:
    values = parse_numbers(text, (4,), "--box X0,Y0,X1,Y1")
    if values[2] < values[0] or values[3] < values[1]:
        raise argparse.ArgumentTypeError(f"--box needs X1 >= X0 and Y1 >= Y0, got {text!r}")
    return values
