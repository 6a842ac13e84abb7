"""``anyseg track`` and the video output writers.

Fast: the writers on synthetic logits (PNG indices and palette, JSON RLE, the overlay video with frames
out of order, odd sizes, the PNG fallback, abort), every validation error of the command (reported
before any model is loaded) and its help. Slow (``-m slow``): end to end with the golden SAM 2.1 model on
the golden clip (against the golden masks of scenario a) and on an mp4 made here (against the video
predictor run in the test with the same prompts), a few frames each.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anyseg.cli import build_parser, main
from anyseg.video.writers import (JSON_FILE, PNG_DIR, VIDEO_FILE, ObjectIndex, OverlayVideoWriter, TrackOutputs,
                                  davis_palette, label_map)

from conftest import GOLDEN, _require, mask_iou, unpack_masks

av = pytest.importorskip("av")

SAM2 = GOLDEN / "sam2"


def _decode_rle(rle):
    from anyseg.masks import coco_rle_to_mask

    return coco_rle_to_mask(rle)


def _video_frames(path: Path):
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def _no_temp_files(folder: Path):
    leftovers = [p for p in folder.rglob("*") if ".tmp-" in p.name or "-pending-" in p.name]
    assert not leftovers, f"temporary files left behind: {leftovers}"


# ---------------------------------------------------------------------------------------- writers
def _synthetic(n_frames=5, h=48, w=64):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for _ in range(n_frames)]

    def logits(i):
        out = np.full((2, 1, h, w), -4.0, np.float32)
        out[0, 0, 8:30, 4 + i:24 + i] = 3.0          # object A
        out[1, 0, 20:40, 16:40] = 1.0 + i             # object B overlaps A; wins where higher
        return out

    return frames, logits


def test_label_map_highest_logit_wins_and_ties_go_first():
    logits = np.array([[[1.0, 2.0, -1.0, 0.5]], [[3.0, 1.0, -2.0, 0.5]]], np.float32)
    assert label_map(logits, [4, 9]).tolist() == [[9, 4, 0, 4]]
    assert label_map(np.zeros((0, 2, 3), np.float32), []).shape == (2, 3)


def test_object_index_rule():
    index = ObjectIndex()
    assert [index(3), index(1), index("cat"), index(0), index(300), index(3)] == [3, 1, 2, 4, 5, 3]
    assert davis_palette(4).tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]


def test_outputs_png_json_video_with_frames_out_of_order(tmp_path):
    frames, logits = _synthetic()
    order = [2, 3, 4, 2, 1, 0]                      # forward from 2, then backward (2 repeated)
    with TrackOutputs(tmp_path, num_frames=6, height=48, width=64, get_rgb=lambda i: frames[i],
                      first_frame=0, markers={2: {"points": np.array([[10.0, 10.0]]), "point_labels": np.array([1])}},
                      video_name="synthetic") as outputs:
        for i in order:
            if i == 0:
                assert sorted(outputs.writers["video"]._pending) == [1, 2, 3, 4], "frames after frame 0 wait"
            outputs.write(i, [3, 7], logits(i))
        assert not outputs.writers["video"]._pending
        assert not (tmp_path / VIDEO_FILE).exists() and not (tmp_path / JSON_FILE).exists()
    _no_temp_files(tmp_path)
    # PNGs: 8-bit palette, DAVIS colours, index = object id, overlap to the highest logit.
    assert sorted(p.name for p in (tmp_path / PNG_DIR).iterdir()) == [f"{i:05d}.png" for i in range(5)]
    for i in range(5):
        im = Image.open(tmp_path / PNG_DIR / f"{i:05d}.png")
        assert im.mode == "P" and im.getpalette()[3:9] == [128, 0, 0, 0, 128, 0]
        want = label_map(logits(i)[:, 0], [3, 7])
        np.testing.assert_array_equal(np.asarray(im), want)
        assert set(np.unique(want)) == {0, 3, 7}
    # JSON: YouTube-VIS layout, full masks per object (overlaps kept), null on the untracked frame 5.
    record = json.loads((tmp_path / JSON_FILE).read_text())
    assert record["videos"][0]["length"] == 6 and record["videos"][0]["name"] == "synthetic"
    assert record["anyseg"]["tracked_frames"] == [[0, 4]]
    anns = {a["object_id"]: a for a in record["annotations"]}
    assert sorted(anns) == [3, 7] and anns[7]["png_index"] == 7
    for obj, k in ((3, 0), (7, 1)):
        segs = anns[obj]["segmentations"]
        assert len(segs) == 6 and segs[5] is None and anns[obj]["areas"][5] is None
        for i in range(5):
            mask = _decode_rle(segs[i])
            np.testing.assert_array_equal(mask, logits(i)[k, 0] > 0)
            assert anns[obj]["areas"][i] == int(mask.sum())
            ys, xs = np.nonzero(mask)
            assert anns[obj]["bboxes"][i] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    # Video: the five tracked frames in order, tinted where the labels are.
    video = _video_frames(tmp_path / VIDEO_FILE)
    assert len(video) == 5 and video[0].shape == (48, 64, 3)
    inside = label_map(logits(0)[:, 0], [3, 7]) == 7
    tint = davis_palette(8)[7].astype(float)
    assert np.abs(video[0][inside].mean(0) - tint).sum() < np.abs(frames[0][inside].mean(0) - tint).sum()


def test_empty_mask_is_null_and_odd_size_video(tmp_path):
    frame = np.full((33, 47, 3), 90, np.uint8)
    logits = np.full((1, 1, 33, 47), -1.0, np.float32)
    with TrackOutputs(tmp_path, num_frames=2, height=33, width=47, get_rgb=lambda i: frame) as outputs:
        outputs.write(0, [1], logits)
        logits = logits.copy()
        logits[0, 0, 5:9, 5:9] = 2.0
        outputs.write(1, [1], logits)
    record = json.loads((tmp_path / JSON_FILE).read_text())
    assert record["annotations"][0]["segmentations"][0] is None
    assert record["annotations"][0]["areas"][1] == 16
    video = _video_frames(tmp_path / VIDEO_FILE)
    assert len(video) == 2 and video[0].shape[:2] == (34, 48)  # padded to even by repeating the edge


def test_overlay_falls_back_to_pngs_without_an_encoder(tmp_path):
    frame = np.zeros((16, 16, 3), np.uint8)
    writer = OverlayVideoWriter(tmp_path / VIDEO_FILE, lambda i: frame, codec=None)
    outputs = TrackOutputs(tmp_path, ("video",), num_frames=2, height=16, width=16, get_rgb=lambda i: frame)
    outputs.writers["video"] = writer
    for i in (1, 0):
        outputs.write(i, [1], np.ones((1, 1, 16, 16), np.float32))
    assert outputs.notes and "PNG sequence" in outputs.notes[0]
    files = outputs.close()
    assert files["video"] == [tmp_path / "overlay"]
    assert sorted(p.name for p in (tmp_path / "overlay").iterdir()) == ["00000.png", "00001.png"]
    assert not (tmp_path / VIDEO_FILE).exists()


def test_abort_leaves_no_video_json_or_temporary_files(tmp_path):
    frame = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(RuntimeError):
        with TrackOutputs(tmp_path, num_frames=4, height=16, width=16, get_rgb=lambda i: frame) as outputs:
            for i in (0, 2):
                outputs.write(i, [1], np.ones((1, 1, 16, 16), np.float32))
            raise RuntimeError("stop")
    assert not (tmp_path / VIDEO_FILE).exists() and not (tmp_path / JSON_FILE).exists()
    assert sorted(p.name for p in (tmp_path / PNG_DIR).iterdir()) == ["00000.png", "00002.png"]
    _no_temp_files(tmp_path)


# ------------------------------------------------------------------------------------- validation
@pytest.fixture(scope="module")
def clip():
    return _require(SAM2 / "clip")


@pytest.fixture(scope="module")
def golden_model():
    return str(_require(SAM2 / "sam2.1_golden.pt"))


def _error(capsys, argv, out):
    """Run the command; it must fail with status 2, say why, and write nothing."""
    try:
        status = main(argv)
    except SystemExit as exc:   # argparse's own errors
        status = exc.code
    assert status == 2
    assert not out.exists(), "nothing is written when the arguments are wrong"
    return capsys.readouterr().err


def _png(path, array, palette=False):
    array = np.ascontiguousarray(array, dtype=np.uint8)
    im = Image.fromarray(array)
    if palette:
        im = Image.frombytes("P", im.size, array.tobytes())
        im.putpalette(davis_palette().reshape(-1).tolist())
    im.save(path)
    return str(path)


@pytest.mark.parametrize("args, message", [
    (["--point", "8,10,10"], "frame 8 is outside the video, which has 8 frames"),
    (["--box", "9,10,10,20,20"], "frame 9 is outside the video"),
    (["--point", "0,10,10", "--start", "8"], "--start 8: frame 8 is outside"),
    (["--point", "0,641,10"], "outside the frame, which is 640x480"),
    (["--point", "0,10,-1"], "outside the frame"),
    (["--box", "0,10,10,300,481@2"], "the box is outside the frame"),
    (["--point", "0,10,10", "--point", "3,50,50,0@2"], "object 2 is only named by background clicks"),
    (["--box", "0,1,1,5,5", "--box", "0,2,2,6,6"], "already has a box on frame 0"),
    ([], "give at least one prompt"),
])
def test_bad_prompts_fail_before_any_work(clip, golden_model, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    err = _error(capsys, ["track", str(clip), "-o", str(out), "-m", golden_model, *args], out)
    assert message in err


@pytest.mark.parametrize("args, message", [
    (["--point", "0,10,10@0"], "object ids are 1..255"),
    (["--point", "0,10,10@x"], "must be an integer"),
    (["--point", "0,10,10,2"], "label must be 1"),
    (["--point", "1.5,10,10"], "the frame F must be an integer"),
    (["--point", "0,10"], "expected 3 or 4"),
    (["--box", "0,30,10,20,20"], "X1 >= X0"),
    (["--mask", "0"], "expected a frame and a PNG file"),
    (["--point", "0,1,1", "--format", "png,gif"], "--format: expected some of png, json, video"),
    (["--point", "0,1,1", "--max-frames", "0"], "expected an integer >= 1"),
])
def test_bad_syntax_is_an_argument_error(clip, golden_model, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    err = _error(capsys, ["track", str(clip), "-o", str(out), "-m", golden_model, *args], out)
    assert message in err


def test_model_is_required(clip, tmp_path, capsys):
    out = tmp_path / "out"
    err = _error(capsys, ["track", str(clip), "-o", str(out), "--point", "0,10,10"], out)
    assert "--model is required" in err and "no built-in SAM 2 model" in err


def test_unreadable_or_missing_video(golden_model, tmp_path, capsys):
    out = tmp_path / "out"
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"this is not a video")
    assert "cannot read the video" in _error(capsys, ["track", str(bad), "-o", str(out), "-m", golden_model,
                                                      "-p", "0,1,1"], out)
    assert "not found" in _error(capsys, ["track", str(tmp_path / "nope.mp4"), "-o", str(out), "-m", golden_model,
                                          "-p", "0,1,1"], out)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no JPEG frames" in _error(capsys, ["track", str(empty), "-o", str(out), "-m", golden_model,
                                               "-p", "0,1,1"], out)


def test_mask_prompt_errors(clip, golden_model, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["track", str(clip), "-o", str(out), "-m", golden_model]
    small = _png(tmp_path / "small.png", np.full((240, 320), 255))
    assert "is 320x240 but the video frames are 640x480; masks are not resized" in _error(
        capsys, base + ["--mask", f"0,{small}"], out)
    labels = np.zeros((480, 640), np.uint8)
    labels[10:50, 10:50], labels[100:150, 200:300] = 1, 3
    indexed = _png(tmp_path / "ann.png", labels, palette=True)
    assert "object 2 is not in the indexed mask" in _error(capsys, base + ["--mask", f"0,{indexed}@2"], out)
    assert "frame 8 is outside" in _error(capsys, base + ["--mask", f"8,{indexed}"], out)
    empty = _png(tmp_path / "empty.png", np.zeros((480, 640)))
    assert "is empty" in _error(capsys, base + ["--mask", f"0,{empty}"], out)
    assert "has a mask and clicks or a box" in _error(
        capsys, base + ["--mask", f"0,{indexed}", "--point", "0,20,20@3"], out)
    assert "mask file not found" in _error(capsys, base + ["--mask", f"0,{tmp_path / 'none.png'}"], out)


def test_indexed_and_binary_mask_rules(tmp_path):
    from anyseg.cli.track import plan_prompts, track_mask_arg

    labels = np.zeros((48, 64), np.uint8)
    labels[1:5, 1:5], labels[10:20, 10:20] = 1, 3
    indexed = _png(tmp_path / "a@b.png", labels, palette=True)
    binary = _png(tmp_path / "bin.png", (labels > 0) * 255)
    plan = plan_prompts([], [], [track_mask_arg(f"2,{indexed}"), track_mask_arg(f"4,{indexed}@3"),
                                 track_mask_arg(f"5,{binary}@7")], num_frames=8, width=64, height=48)
    assert [(p.frame, p.obj) for p in plan] == [(2, 1), (2, 3), (4, 3), (5, 7)]
    np.testing.assert_array_equal(plan[1].mask, labels == 3)
    np.testing.assert_array_equal(plan[3].mask, labels > 0)


def test_passes_rule():
    from anyseg.cli.track import Prompt, plan_passes

    at = [Prompt(3, 1), Prompt(6, 2)]
    both = plan_passes(at, 10, start=None, reverse=False, max_frames=None)
    assert [(p.start, p.reverse, p.frames) for p in both] == [(3, False, 7), (3, True, 4)]
    assert [(p.start, p.reverse, p.frames) for p in plan_passes([Prompt(0, 1)], 10, start=None, reverse=False,
                                                                max_frames=4)] == [(0, False, 4)]
    assert [(p.start, p.reverse, p.frames) for p in plan_passes(at, 10, start=None, reverse=True,
                                                                max_frames=3)] == [(6, True, 3)]
    assert [(p.start, p.reverse, p.frames) for p in plan_passes(at, 10, start=8, reverse=False,
                                                                max_frames=None)] == [(8, False, 2)]


def test_help_lists_every_option():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices["track"]
    text = sub.format_help()
    for action in sub._actions:
        for option in action.option_strings:
            assert option in text, f"{option} missing from the help"
    for needle in ("F,X,Y[,LABEL][@OBJ]", "F,X0,Y0,X1,Y1[@OBJ]", "F,MASK.png[@OBJ]", "examples:", "masks/00000.png",
                   "tracks.json", "overlay.mp4", "highest logit", "exit status 2", "backward"):
        assert needle in text
    assert "track" in parser.format_help()


# ----------------------------------------------------------------------------------- end to end
@pytest.mark.slow
@pytest.mark.golden
@pytest.mark.parametrize("speed", ["faithful", "lossless"])
def test_track_golden_clip_matches_the_golden_masks(clip, golden_model, tmp_path, speed):
    """Scenario a of the golden data (a click on frame 0, forward): the first three frames, with the
    reference computation and with the lossless fast paths."""
    out = tmp_path / "out"
    status = main(["track", str(clip), "--point", "0,288,240", "--max-frames", "3", "-m", golden_model,
                   "-o", str(out), "--no-progress", "--speed", speed])
    assert status == 0
    golden = np.load(SAM2 / "video_a_points_forward.npz")
    manifest = json.loads((SAM2 / "manifest.json").read_text())
    scenario = next(s for s in manifest["video"]["scenarios"] if s["name"] == "a_points_forward")
    records = [r for call in scenario["calls"] if call["op"] == "propagate_in_video" for r in call["records"]]
    tol = manifest["tolerances"]["video"]["mask_iou"]
    assert sorted(p.name for p in (out / PNG_DIR).iterdir()) == ["00000.png", "00001.png", "00002.png"]
    record = json.loads((out / JSON_FILE).read_text())
    assert record["videos"][0]["file_names"][:2] == ["00000.jpg", "00001.jpg"]
    assert record["anyseg"]["tracked_frames"] == [[0, 2]]
    segs = record["annotations"][0]["segmentations"]
    assert segs[3:] == [None] * 5
    for rec in records[:3]:
        want = unpack_masks(golden[f"{rec['key']}_masks_packed"], golden[f"{rec['key']}_masks_shape"])[0]
        labels = np.asarray(Image.open(out / PNG_DIR / f"{rec['frame_idx']:05d}.png"))
        assert set(np.unique(labels)) <= {0, 1}
        assert mask_iou(labels == 1, want) >= tol
        np.testing.assert_array_equal(_decode_rle(segs[rec["frame_idx"]]), labels == 1)
    assert len(_video_frames(out / VIDEO_FILE)) == 3
    _no_temp_files(out)


def _make_mp4(path: Path, n=4, h=64, w=96):
    """Small frames of moving shapes: a bright square sliding right, a disc sliding down."""
    yy, xx = np.mgrid[:h, :w]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            img = np.full((h, w, 3), 40, np.uint8)
            img[10:30, 8 + 6 * i:28 + 6 * i] = (230, 60, 40)
            img[(yy - 20 - 5 * i) ** 2 + (xx - 65) ** 2 <= 121] = (40, 200, 240)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


@pytest.mark.slow
@pytest.mark.golden
def test_track_mp4_both_ways_matches_the_predictor(golden_model, tmp_path):
    """Two objects prompted on frame 1 (clicks; a mask), tracked forward and backward: PNG indices and JSON
    masks equal what the video predictor gives for the same calls; the overlay video has the tracked frames."""
    from anyseg.checkpoint import load_model
    from anyseg.video.predictor import SAM2VideoPredictor

    video = tmp_path / "shapes.mp4"
    _make_mp4(video)
    disc = np.zeros((64, 96), bool)
    yy, xx = np.mgrid[:64, :96]
    disc[(yy - 25) ** 2 + (xx - 65) ** 2 <= 121] = True
    mask_png = _png(tmp_path / "disc.png", disc * 255)
    out = tmp_path / "out"
    status = main(["track", str(video), "-p", "1,20,20", "-p", "1,80,55,0", "--mask", f"1,{mask_png}@2",
                   "--max-frames", "2", "-m", golden_model, "-o", str(out), "--no-progress"])
    assert status == 0

    predictor = SAM2VideoPredictor(load_model(golden_model, video=True))
    state = predictor.init_state(str(video))
    try:
        predictor.add_new_points_or_box(state, 1, 1, points=np.array([[20.0, 20.0], [80.0, 55.0]], np.float32),
                                        labels=np.array([1, 0], np.int32))
        predictor.add_new_mask(state, 1, 2, disc)
        got = {}
        for reverse in (False, True):
            for frame_idx, obj_ids, masks in predictor.propagate_in_video(state, start_frame_idx=1,
                                                                          max_frame_num_to_track=1, reverse=reverse):
                assert list(obj_ids) == [1, 2]
                got.setdefault(frame_idx, masks[:, 0].float().numpy())
    finally:
        state.close()
    assert sorted(got) == [0, 1, 2]

    record = json.loads((out / JSON_FILE).read_text())
    anns = {a["object_id"]: a for a in record["annotations"]}
    assert record["videos"][0]["length"] == 4 and record["anyseg"]["tracked_frames"] == [[0, 2]]
    for i, logits in got.items():
        labels = np.asarray(Image.open(out / PNG_DIR / f"{i:05d}.png"))
        best = np.argmax(logits, axis=0)
        want = np.where(np.take_along_axis(logits, best[None], 0)[0] > 0, np.array([1, 2])[best], 0)
        np.testing.assert_array_equal(labels, want)
        for k, obj in enumerate((1, 2)):
            seg = anns[obj]["segmentations"][i]
            mask = np.zeros((64, 96), bool) if seg is None else _decode_rle(seg)
            np.testing.assert_array_equal(mask, logits[k] > 0)
    assert all(anns[o]["segmentations"][3] is None for o in (1, 2))
    assert not (out / PNG_DIR / "00003.png").exists()
    frames = _video_frames(out / VIDEO_FILE)
    assert len(frames) == 3 and frames[0].shape == (64, 96, 3)
    _no_temp_files(out)
