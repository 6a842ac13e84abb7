"""``anyseg track``: follow objects through a video with SAM 2 from prompts on some frames."""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .common import int_at_least, parse_numbers, positive_int

FORMATS = ("png", "json", "video")
MAX_OBJECT_ID = 255

DESCRIPTION = """\
Track objects through VIDEO with a SAM 2 / 2.1 model: prompt each object on one or more frames
(clicks, a box or a mask) and get its mask on every tracked frame.

VIDEO is a video file (mp4, mov, webm, mkv, avi; read with PyAV) or a folder of JPEG frames named by
their number (00000.jpg, 00001.jpg, ...: the reference's layout). Frames are decoded when needed and
tracking state that the model can no longer use is spilled to disk, so long videos run in bounded memory.

Prompts (F = frame index from 0; X, Y = pixels of the frame, X to the right, Y down; OBJ = object id,
an integer 1..255, default 1; repeat an option for more prompts):
  --point F,X,Y[,LABEL][@OBJ]    a click; LABEL 1 = on the object (default), 0 = not on it
  --box F,X0,Y0,X1,Y1[@OBJ]      a box around the object
  --mask F,MASK.png[@OBJ]        the object's mask on frame F: a PNG of exactly the frame's size (it is not
                                 resized). A palette (indexed) PNG such as a DAVIS annotation gives one
                                 object per non-zero index (object id = index), or only index OBJ with
                                 @OBJ; any other PNG is one mask (non-zero = object) for object OBJ
Clicks and a box of one object on one frame are one prompt; a mask cannot be combined with clicks or a
box on the same frame. Every object needs a foreground click, a box or a mask somewhere.

Which frames are tracked:
  default              forward from the earliest prompted frame to the end and, when that frame is
                       not frame 0, then backward from it to frame 0: every frame gets a mask
  --reverse            only backward, from the latest prompted frame (or --start) to frame 0
  --start F            only from frame F (forward, or backward with --reverse)
  --max-frames N       at most N frames per direction, the start frame included

Outputs in OUTDIR (--format; every file written atomically, per-frame PNGs as they are tracked, the
JSON and the video at the end):
  png    masks/00000.png ...  one 8-bit palette PNG per tracked frame (DAVIS layout and palette):
                              0 = background, index i = object i; where objects overlap the pixel
                              goes to the object with the highest logit
  json   tracks.json          YouTube-VIS style: per object, one COCO RLE per frame in
                              "segmentations" (null where the object is absent or the frame was not
                              tracked), with "areas" and "bboxes" (XYWH); overlaps are kept; the
                              tracked frames are in "anyseg": {"tracked_frames": [[first, last]]}
  video  overlay.mp4          the tracked frames with the masks tinted and outlined (H.264; frame rate
                              of the input video, 24 for JPEG folders); if no mp4 encoder is available,
                              a PNG sequence overlay/00000.png ... instead (a note says so)
Files of an earlier run in OUTDIR are replaced when written again; others are left as they are.

Errors in the arguments (a frame outside the video, a point or box outside the frame, a mask PNG of
the wrong size, an object with only background clicks, an index missing from an indexed mask, a video
that cannot be read, no --model) are reported before any work, with exit status 2 and nothing written."""

EXAMPLES = """\
examples:
  anyseg track clip.mp4 --point 0,420,310 --model sam2.1_hiera_tiny.pt -o out/
  anyseg track frames/ --point 12,420,310 --point 12,380,120,0 --box 30,50,40,300,260@2 \\
      --model sam2.1_hiera_small.pt -o out/          # object 1 from clicks, object 2 from a box
  anyseg track clip.mp4 --mask 0,00000.png --model sam2.1_hiera_tiny.pt -o out/ --format png,json
  anyseg track clip.mp4 --point 99,200,150 --reverse --max-frames 50 --model sam2.1_hiera_tiny.pt -o out/"""


# --------------------------------------------------------------------------------------- arguments
def _split_object(text: str, what: str) -> Tuple[str, Optional[int]]:
    """'...@3' -> ('...', 3); no '@' -> (text, None)."""
    body, sep, obj = text.rpartition("@")
    if not sep:
        return text, None
    try:
        value = int(obj)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: the object after '@' must be an integer 1..{MAX_OBJECT_ID}, "
                                         f"got {obj!r} in {text!r}") from None
    if not 1 <= value <= MAX_OBJECT_ID:
        raise argparse.ArgumentTypeError(f"{what}: object ids are 1..{MAX_OBJECT_ID} (the index in the PNG masks), "
                                         f"got {value} in {text!r}")
    return body, value


def _frame_number(value: float, what: str, text: str) -> int:
    if value != int(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{what}: the frame F must be an integer >= 0, got {text!r}")
    return int(value)


@dataclass
class PointArg:
    frame: int
    x: float
    y: float
    label: int
    obj: Optional[int]
    text: str


@dataclass
class BoxArg:
    frame: int
    box: List[float]
    obj: Optional[int]
    text: str


@dataclass
class MaskArg:
    frame: int
    path: str
    obj: Optional[int]
    text: str


def track_point_arg(text: str) -> PointArg:
    what = "--point F,X,Y[,LABEL][@OBJ]"
    body, obj = _split_object(text, what)
    values = parse_numbers(body, (3, 4), what)
    label = values[3] if len(values) == 4 else 1.0
    if label not in (0.0, 1.0):
        raise argparse.ArgumentTypeError(f"--point label must be 1 (on the object) or 0 (not on it), got {text!r}")
    return PointArg(_frame_number(values[0], what, text), values[1], values[2], int(label), obj, text)


def track_box_arg(text: str) -> BoxArg:
    what = "--box F,X0,Y0,X1,Y1[@OBJ]"
    body, obj = _split_object(text, what)
    values = parse_numbers(body, (5,), what)
    if values[3] < values[1] or values[4] < values[2]:
        raise argparse.ArgumentTypeError(f"--box needs X1 >= X0 and Y1 >= Y0, got {text!r}")
    return BoxArg(_frame_number(values[0], what, text), values[1:], obj, text)


def track_mask_arg(text: str) -> MaskArg:
    what = "--mask F,MASK.png[@OBJ]"
    frame, sep, rest = text.partition(",")
    if not sep or not rest:
        raise argparse.ArgumentTypeError(f"{what}: expected a frame and a PNG file, got {text!r}")
    try:
        number = float(frame)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: the frame F must be an integer >= 0, got {text!r}") from None
    # '@' followed by digits at the end is the object; any other '@' belongs to the file name.
    head, at, tail = rest.rpartition("@")
    path, obj = (head, _split_object("@" + tail, what)[1]) if at and tail.strip().lstrip("+-").isdigit() else (rest, None)
    return MaskArg(_frame_number(number, what, text), path, obj, text)


def _formats_arg(text: str) -> List[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in FORMATS]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"--format: expected some of {', '.join(FORMATS)} (comma-separated), got {text!r}")
    return names


_frame_arg = int_at_least(0, "a frame index")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "track", help="track objects through a video from prompts on some frames (SAM 2)",
        description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("video", metavar="VIDEO", help="video file (mp4, mov, webm, mkv, avi) or folder of JPEG frames")
    parser.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder (created)")
    parser.add_argument("--point", "-p", action="append", type=track_point_arg, default=[],
                        metavar="F,X,Y[,LABEL][@OBJ]",
                        help="a click on frame F: LABEL 1 = on the object (default), 0 = not on it; object OBJ "
                             "(default 1); repeatable")
    parser.add_argument("--box", "-b", action="append", type=track_box_arg, default=[], metavar="F,X0,Y0,X1,Y1[@OBJ]",
                        help="a box around object OBJ (default 1) on frame F; repeatable")
    parser.add_argument("--mask", action="append", type=track_mask_arg, default=[], metavar="F,MASK.png[@OBJ]",
                        help="the mask of object OBJ (default 1) on frame F, a PNG of the frame's size; a palette "
                             "PNG gives one object per index; repeatable")
    parser.add_argument("--reverse", action="store_true",
                        help="track backward only (from the latest prompted frame, or --start, to frame 0)")
    parser.add_argument("--start", type=_frame_arg, default=None, metavar="F",
                        help="track from frame F in one direction only (default: from the earliest prompted frame, "
                             "both ways)")
    parser.add_argument("--max-frames", type=positive_int, default=None, metavar="N",
                        help="track at most N frames per direction, the start frame included (default: to the end)")
    parser.add_argument("--format", "-f", dest="formats", action="append", type=_formats_arg, metavar="FORMATS",
                        help=f"outputs, comma-separated or repeated: {', '.join(FORMATS)} (default: all)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--model", "-m", default=None, metavar="NAME_OR_PATH",
        help="required: a SAM 2 / 2.1 checkpoint file (.pt/.safetensors; a .yaml with the same stem beside it "
             "is read for layouts that are not public) or a registered SAM 2 name; there is no built-in "
             "SAM 2 model")
    parser.add_argument("--device", default=None,
                        help="torch device, e.g. cpu or cuda (default: cuda if available, else cpu)")
    parser.add_argument(
        "--speed", choices=("faithful", "lossless", "auto"), default="faithful",
        help="faithful (default: the reference computation), lossless (objects batched per frame, memory keys "
             "reused across frames, the fast image encoder: the same float32 results to rounding, more memory "
             "per object) or auto (lossless plus bfloat16 memory attention where the hardware has native "
             "bfloat16); see docs/video.md")
    parser.set_defaults(func=run)


# ---------------------------------------------------------------------------------------- planning
@dataclass
class Prompt:
    """Everything given for one object on one frame."""

    frame: int
    obj: int
    points: List[Tuple[float, float]] = field(default_factory=list)
    labels: List[int] = field(default_factory=list)
    box: Optional[List[float]] = None
    mask: Optional[np.ndarray] = None
    sources: List[str] = field(default_factory=list)

    @property
    def has_foreground(self) -> bool:
        return self.box is not None or self.mask is not None or any(label == 1 for label in self.labels)


def _frame_check(frame: int, num_frames: int, option: str, text: str) -> None:
    if not 0 <= frame < num_frames:
        raise ValueError(f"{option} {text}: frame {frame} is outside the video, which has {num_frames} frames "
                         f"(0..{num_frames - 1})")


def _inside(x: float, y: float, width: int, height: int) -> bool:
    return 0 <= x <= width and 0 <= y <= height


def read_mask_png(path: str, width: int, height: int, obj: Optional[int], text: str) -> Dict[int, np.ndarray]:
    """The object masks of a ``--mask`` PNG: ``{object id: H x W bool}`` (rules in the help)."""
    from PIL import Image, UnidentifiedImageError

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--mask {text}: mask file not found: {file}")
    try:
        with Image.open(file) as im:
            im.load()
            mode, size = im.mode, im.size
            if mode == "P":
                array = np.asarray(im)
            elif mode in ("RGB", "RGBA", "CMYK", "YCbCr", "HSV", "LAB"):
                array = np.asarray(im.convert("RGB")).any(axis=-1)
            elif mode in ("LA", "PA"):
                array = np.asarray(im.convert("L"))
            else:
                array = np.asarray(im)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"--mask {text}: {file} cannot be read as an image: {e}") from e
    if size != (width, height):
        raise ValueError(f"--mask {text}: {file} is {size[0]}x{size[1]} but the video frames are {width}x{height}; "
                         "masks are not resized (a resized mask would be misaligned): give one of the frame's size")
    if mode == "P":
        present = [int(v) for v in np.unique(array) if v != 0]
        if obj is not None:
            if obj not in present:
                shown = ", ".join(map(str, present)) if present else "none"
                raise ValueError(f"--mask {text}: object {obj} is not in the indexed mask {file} "
                                 f"(its non-zero indices: {shown})")
            return {obj: array == obj}
        if not present:
            raise ValueError(f"--mask {text}: {file} is empty (every pixel is 0 = background)")
        if max(present) > MAX_OBJECT_ID:
            raise ValueError(f"--mask {text}: index {max(present)} is not an object id 1..{MAX_OBJECT_ID}")
        return {v: array == v for v in present}
    mask = np.asarray(array) > 0
    if mask.ndim != 2:
        raise ValueError(f"--mask {text}: {file} has an unsupported layout (shape {mask.shape})")
    if not mask.any():
        raise ValueError(f"--mask {text}: {file} is empty (no non-zero pixel)")
    return {obj or 1: mask}


def plan_prompts(points: Sequence[PointArg], boxes: Sequence[BoxArg], masks: Sequence[MaskArg], *,
                 num_frames: int, width: int, height: int) -> List[Prompt]:
    """Check every prompt against the video and group them per (frame, object); raises ValueError."""
    prompts: Dict[Tuple[int, int], Prompt] = {}

    def entry(frame: int, obj: int) -> Prompt:
        return prompts.setdefault((frame, obj), Prompt(frame, obj))

    for p in points:
        _frame_check(p.frame, num_frames, "--point", p.text)
        if not _inside(p.x, p.y, width, height):
            raise ValueError(f"--point {p.text}: ({p.x:g}, {p.y:g}) is outside the frame, which is "
                             f"{width}x{height} (X in 0..{width}, Y in 0..{height})")
        e = entry(p.frame, p.obj or 1)
        e.points.append((p.x, p.y))
        e.labels.append(p.label)
        e.sources.append(f"--point {p.text}")
    for b in boxes:
        _frame_check(b.frame, num_frames, "--box", b.text)
        x0, y0, x1, y1 = b.box
        if not (_inside(x0, y0, width, height) and _inside(x1, y1, width, height)):
            raise ValueError(f"--box {b.text}: the box is outside the frame, which is {width}x{height} "
                             f"(X in 0..{width}, Y in 0..{height})")
        e = entry(b.frame, b.obj or 1)
        if e.box is not None:
            raise ValueError(f"--box {b.text}: object {e.obj} already has a box on frame {b.frame}; "
                             "give one box per object and frame")
        e.box = list(b.box)
        e.sources.append(f"--box {b.text}")
    for m in masks:
        _frame_check(m.frame, num_frames, "--mask", m.text)
        for obj, mask in read_mask_png(m.path, width, height, m.obj, m.text).items():
            e = entry(m.frame, obj)
            if e.mask is not None:
                raise ValueError(f"--mask {m.text}: object {obj} already has a mask on frame {m.frame}")
            e.mask = mask
            e.sources.append(f"--mask {m.text}")
    for e in prompts.values():
        if e.mask is not None and (e.points or e.box is not None):
            raise ValueError(f"object {e.obj} on frame {e.frame} has a mask and clicks or a box "
                             f"({'; '.join(e.sources)}): a mask replaces the other prompts, give one or the other")
    by_object: Dict[int, List[Prompt]] = {}
    for e in prompts.values():
        by_object.setdefault(e.obj, []).append(e)
    for obj, entries in sorted(by_object.items()):
        if not any(e.has_foreground for e in entries):
            given = "; ".join(s for e in entries for s in e.sources)
            raise ValueError(f"object {obj} is only named by background clicks ({given}): it is not defined by a "
                             f"foreground click, a box or a mask on any frame (a typo in @{obj}?)")
    return sorted(prompts.values(), key=lambda e: (e.frame, e.obj))


@dataclass
class Pass:
    start: int
    reverse: bool
    frames: int  # how many frames it yields


def plan_passes(prompts: Sequence[Prompt], num_frames: int, *, start: Optional[int], reverse: bool,
                max_frames: Optional[int]) -> List[Pass]:
    """The propagation passes (see the help: default both ways from the earliest prompt)."""
    limit = max_frames or num_frames

    def count(s: int, rev: bool) -> int:
        return min(limit, s + 1) if rev else min(limit, num_frames - s)

    if start is not None:
        return [Pass(start, reverse, count(start, reverse))]
    if reverse:
        s = max(p.frame for p in prompts)
        return [Pass(s, True, count(s, True))]
    s = min(p.frame for p in prompts)
    passes = [Pass(s, False, count(s, False))]
    if s > 0:
        passes.append(Pass(s, True, count(s, True)))
    return passes


def _video_fps(path: Path) -> float:
    """The input video's frame rate (24 for JPEG folders or when unknown)."""
    if path.is_dir():
        return 24.0
    try:
        import av

        with av.open(str(path)) as container:
            rate = container.streams.video[0].average_rate
            return float(rate) if rate else 24.0
    except Exception:
        return 24.0


def _open_video(path: str):
    from ..video.frames import open_frames

    try:
        return open_frames(path, lookahead=2)
    except FileNotFoundError:
        raise
    except (ValueError, RuntimeError, ImportError, OSError) as e:
        raise ValueError(f"cannot read the video {path}: {e}") from e


# ---------------------------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    if not args.model:
        raise ValueError("--model is required: there is no built-in SAM 2 model; pass a SAM 2 / 2.1 checkpoint, "
                         "e.g. --model sam2.1_hiera_tiny.pt (from the SAM 2 release)")
    if not (args.point or args.box or args.mask):
        raise ValueError("give at least one prompt: --point F,X,Y[,LABEL][@OBJ], --box F,X0,Y0,X1,Y1[@OBJ] "
                         "or --mask F,MASK.png[@OBJ]")
    formats = sorted({f for group in (args.formats or [list(FORMATS)]) for f in group}, key=FORMATS.index)
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"-o {out}: exists and is not a folder")

    video_path = Path(args.video)
    frames = _open_video(args.video)
    try:
        return _track(args, frames, video_path, formats, out)
    finally:
        frames.close()


def _track(args, frames, video_path: Path, formats: List[str], out: Path) -> int:
    import torch
    from tqdm import tqdm

    from .. import __version__
    from ..checkpoint import load_model
    from ..video.frames import open_frames
    from ..video.predictor import SAM2VideoPredictor
    from ..video.writers import TrackOutputs

    num_frames, height, width = frames.num_frames, frames.height, frames.width
    prompts = plan_prompts(args.point, args.box, args.mask, num_frames=num_frames, width=width, height=height)
    if args.start is not None:
        _frame_check(args.start, num_frames, "--start", str(args.start))
    passes = plan_passes(prompts, num_frames, start=args.start, reverse=args.reverse, max_frames=args.max_frames)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.model, device=device, video=True)
    predictor = SAM2VideoPredictor(model, speed=getattr(args, "speed", None))
    if frames.image_size != predictor.image_size:
        frames.close()
        frames = open_frames(str(video_path), image_size=predictor.image_size, lookahead=2)

    # Frames each pass will yield, in order; the reverse pass repeats its start frame.
    order: List[int] = []
    for p in passes:
        step = -1 if p.reverse and p.start > 0 else 1
        order += [p.start + step * k for k in range(p.frames)]
    todo = sorted(set(order))
    markers: Dict[int, dict] = {}
    for e in prompts:
        m = markers.setdefault(e.frame, {"points": [], "point_labels": [], "boxes": []})
        m["points"] += e.points
        m["point_labels"] += e.labels
        if e.box is not None:
            m["boxes"].append(e.box)
    markers = {f: {k: (np.asarray(v, dtype=np.float64) if v else None) for k, v in m.items()}
               for f, m in markers.items()}
    info = {
        "anyseg_version": __version__, "video": str(video_path), "model": str(args.model),
        "prompts": [{"frame": e.frame, "object_id": e.obj, "points": [list(p) for p in e.points],
                     "labels": e.labels, "box": e.box, "mask": e.mask is not None, "given_as": e.sources}
                    for e in prompts],
        "passes": [{"start": p.start, "reverse": p.reverse, "frames": p.frames} for p in passes],
    }
    file_names = [p.name for p in frames.paths] if hasattr(frames, "paths") else None

    state = predictor.init_state(frames)
    bar = None
    outputs = TrackOutputs(out, formats, num_frames=num_frames, height=height, width=width,
                           get_rgb=state.frames.get_rgb, fps=_video_fps(video_path), first_frame=todo[0],
                           markers=markers, video_name=video_path.name or str(video_path),
                           file_names=file_names, info=info)
    written = set()
    obj_ids: List[int] = []
    try:
        with outputs:
            for e in prompts:
                if e.mask is not None:
                    predictor.add_new_mask(state, e.frame, e.obj, e.mask)
                else:
                    predictor.add_new_points_or_box(
                        state, e.frame, e.obj,
                        points=np.asarray(e.points, dtype=np.float32) if e.points else None,
                        labels=np.asarray(e.labels, dtype=np.int32) if e.points else None, box=e.box)
            started = time.perf_counter()
            bar = tqdm(total=len(todo), desc="track", unit="frame", disable=args.no_progress, file=sys.stderr)
            for p in passes:
                if p.reverse and p.start == 0:
                    # The reference's reverse pass from frame 0 yields nothing; frame 0 is its only frame.
                    stream = predictor.propagate_in_video(state, start_frame_idx=0, max_frame_num_to_track=0)
                else:
                    stream = predictor.propagate_in_video(state, start_frame_idx=p.start,
                                                          max_frame_num_to_track=p.frames - 1, reverse=p.reverse)
                for frame_idx, obj_ids, masks in stream:
                    if frame_idx in written:
                        continue
                    outputs.write(frame_idx, obj_ids, masks)
                    written.add(frame_idx)
                    bar.update(1)
            files = outputs.close()
    finally:
        if bar is not None:
            bar.close()
        state.close()
    elapsed = time.perf_counter() - started
    for note in outputs.notes:
        print(f"anyseg track: note: {note}", file=sys.stderr)
    span = f"frames {min(written)}..{max(written)}" if written else "no frames"
    shown = {"png": lambda g: f"{len(g)} PNG(s) in {out / 'masks'}", "json": lambda g: str(g[0]),
             "video": lambda g: str(g[0])}
    where = "; ".join(shown[k](g) for k, g in files.items() if g) or "nothing"
    print(f"tracked {len(obj_ids)} object(s) over {len(written)} frame(s) ({span}) in {elapsed:.1f} s "
          f"({len(written) / max(elapsed, 1e-9):.2f} frames/s); wrote {where}", file=sys.stderr)
    return 0
