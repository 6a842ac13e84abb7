"""Frame sources: JPEG folders, video files (PyAV), arrays; preprocessing, bounded caching, errors."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from anyseg.video import ArraySource, FrameSource, JpegFolderSource, VideoFileSource, open_frames
from anyseg.video.frames import preprocess_frame

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def _reference_input(path, size=1024) -> torch.Tensor:
    """Spec 9.7 written out: PIL RGB -> resize((S, S)) bicubic on uint8 -> /255 -> (x - mean) / std."""
    with Image.open(path) as im:
        arr = np.array(im.convert("RGB").resize((size, size), Image.BICUBIC)) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1).float()
    x = (x - torch.from_numpy(MEAN)[:, None, None]) / torch.from_numpy(STD)[:, None, None]
    return x[None]


@pytest.fixture(scope="module")
def clip_dir(golden_dir):
    path = golden_dir / "sam2" / "clip"
    assert path.is_dir(), f"golden clip missing at {path}"
    return path


# --- JPEG folder ------------------------------------------------------------------------------------

def test_jpeg_folder_golden_clip(clip_dir):
    with open_frames(clip_dir, lookahead=2) as src:
        assert isinstance(src, JpegFolderSource)
        assert (src.num_frames, src.height, src.width) == (8, 480, 640)
        assert len(src) == 8
        assert [p.name for p in src.paths] == [f"{i:05d}.jpg" for i in range(8)]
        for i in (0, 5, 7):
            x = src.get(i)
            assert x.shape == (1, 3, 1024, 1024) and x.dtype == torch.float32
            assert torch.equal(x, _reference_input(clip_dir / f"{i:05d}.jpg"))
        rgb = src.get_rgb(5)
        assert rgb.shape == (480, 640, 3) and rgb.dtype == np.uint8
        with Image.open(clip_dir / "00005.jpg") as im:
            assert np.array_equal(rgb, np.asarray(im.convert("RGB")))
        # frame 5 is the dimmed one
        assert src.get_rgb(5).mean() < 0.3 * src.get_rgb(4).mean()


def test_jpeg_folder_holds_a_bounded_number_of_frames(clip_dir):
    with JpegFolderSource(clip_dir, lookahead=2) as src:
        sizes = []
        for i in range(src.num_frames):
            src.get(i)
            sizes.append(src.cached_frames)
        assert max(sizes) <= 3, sizes
        for i in reversed(range(src.num_frames)):
            src.get(i)
            assert src.cached_frames <= 3
    with JpegFolderSource(clip_dir, lookahead=0) as src:
        for i in range(src.num_frames):
            src.get_rgb(i)
            assert src.cached_frames == 1


def test_jpeg_folder_order_and_filters(tmp_path):
    colours = {"10.jpg": 10, "2.JPEG": 200, "0003.jpeg": 100, "1.JPG": 50}
    for name, v in colours.items():
        Image.new("RGB", (32, 24), (v, v, v)).save(tmp_path / name, quality=100)
    Image.new("RGB", (32, 24)).save(tmp_path / "0.png")          # not a JPEG extension: ignored
    (tmp_path / "notes.txt").write_text("x")
    with open_frames(tmp_path) as src:
        assert src.num_frames == 4
        assert [p.name for p in src.paths] == ["1.JPG", "2.JPEG", "0003.jpeg", "10.jpg"]
        means = [src.get_rgb(i).mean() for i in range(4)]
        assert np.allclose(means, [50, 200, 100, 10], atol=2)
    # Frames of another size: the video's size is the first frame's; every frame is squashed to S x S.
    Image.new("RGB", (40, 30), (0, 0, 0)).save(tmp_path / "11.jpg")
    with open_frames(tmp_path, image_size=16) as src:
        assert (src.num_frames, src.height, src.width) == (5, 24, 32)
        assert src.get_rgb(4).shape == (30, 40, 3) and src.get(4).shape == (1, 3, 16, 16)


def test_jpeg_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RuntimeError, match="no JPEG frames"):
        open_frames(empty)
    only_png = tmp_path / "png"
    only_png.mkdir()
    Image.new("RGB", (8, 8)).save(only_png / "00000.png")
    with pytest.raises(RuntimeError, match="no JPEG frames.*00000.png"):
        open_frames(only_png)
    named = tmp_path / "named"
    named.mkdir()
    for name in ("00000.jpg", "frame_001.jpg"):
        Image.new("RGB", (8, 8)).save(named / name)
    with pytest.raises(ValueError, match="frame number.*frame_001.jpg"):
        open_frames(named)
    with pytest.raises(FileNotFoundError):
        open_frames(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.new("RGB", (8, 8)).save(bad / "0.jpg")
    (bad / "1.jpg").write_bytes(b"not a jpeg")
    with open_frames(bad) as src:
        with pytest.raises(ValueError, match="frame 1 .*cannot be read"):
            src.get(1)
        with pytest.raises(IndexError, match="outside the video"):
            src.get(2)
        with pytest.raises(TypeError):
            src.get(0.5)
        assert src.get(0).shape == (1, 3, 1024, 1024)      # a failed frame does not poison the source


# --- arrays -----------------------------------------------------------------------------------------

def _frames(n=6, h=40, w=56):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def test_array_sources_list_stack_iterator():
    frames = _frames()
    for given in (frames, np.stack(frames)):
        with open_frames(given, image_size=64) as src:
            assert isinstance(src, ArraySource)
            assert (src.num_frames, src.height, src.width) == (6, 40, 56)
            for i in (3, 0, 5):
                assert np.array_equal(src.get_rgb(i), frames[i])
                assert torch.equal(src.get(i), preprocess_frame(frames[i], 64))
            assert src.get(1).shape == (1, 3, 64, 64)
    # An iterator without a length is read into a list; with num_frames it streams.
    with open_frames(iter(frames), image_size=64) as src:
        assert src.num_frames == 6 and np.array_equal(src.get_rgb(4), frames[4])
    pulled = []

    def gen():
        for f in frames:
            pulled.append(1)
            yield f

    with open_frames(gen(), image_size=64, num_frames=6, lookahead=1) as src:
        assert len(pulled) == 1                 # only the first frame, for the size
        src.get(2)
        assert len(pulled) <= 4
        assert np.array_equal(src.get_rgb(2), frames[2])     # still cached
        src.get(5)
        with pytest.raises(IndexError, match="already consumed"):
            src.get(0)


def test_preprocess_matches_spec():
    frame = _frames(1, 30, 50)[0]
    x = preprocess_frame(frame, 96)
    ref = np.array(Image.fromarray(frame).resize((96, 96), Image.BICUBIC)) / 255.0
    ref = (torch.from_numpy(ref).permute(2, 0, 1).float() - torch.from_numpy(MEAN)[:, None, None]) \
        / torch.from_numpy(STD)[:, None, None]
    assert torch.equal(x[0], ref)


def test_array_errors():
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        open_frames([np.zeros((8, 8), np.uint8)])
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        open_frames([np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(RuntimeError, match="no frames"):
        open_frames([])
    with pytest.raises(ValueError, match="N x H x W x 3"):
        open_frames(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(RuntimeError, match="ended after 2 frames"):
        src = open_frames(iter(_frames(2)), num_frames=4, lookahead=0)
        src.get(3)
    with pytest.raises(TypeError):
        open_frames(42)


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "a.gif"
    Image.new("RGB", (8, 8)).save(path)
    with pytest.raises(ValueError, match="neither a folder of JPEG frames nor a video file"):
        open_frames(path)


def test_an_open_source_is_passed_through():
    src = ArraySource(_frames(2), image_size=32)
    assert open_frames(src) is src
    src.close()
    with pytest.raises(RuntimeError, match="closed"):
        src.get(0)


# --- video files ------------------------------------------------------------------------------------

def _need_av():
    if importlib.util.find_spec("av") is None:
        pytest.skip("PyAV is not installed (pip install 'anyseg[video]'); video-file tests need it")
    import av
    return av


LEVELS = [16 + 28 * i for i in range(9)]


def _write_video(path, codec, n=9, w=96, h=64, gop=4, rate=10):
    """Frame i is a flat grey of LEVELS[i] (identifiable after lossy coding)."""
    av = _need_av()
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.gop_size = gop
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), LEVELS[i], np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _level_index(rgb):
    return int(np.argmin([abs(rgb.mean() - v) for v in LEVELS]))


@pytest.mark.parametrize("name,codec", [("clip.mp4", "libx264"), ("clip.mkv", "mpeg4"), ("clip.webm", "libvpx-vp9")])
def test_video_file_random_access(tmp_path, name, codec):
    path = tmp_path / name
    _write_video(path, codec)
    with open_frames(path, image_size=64, lookahead=2) as src:
        assert isinstance(src, VideoFileSource)
        assert (src.num_frames, src.height, src.width) == (9, 64, 96)
        forward = [_level_index(src.get_rgb(i)) for i in range(9)]
        assert forward == list(range(9))
        assert src.cached_frames <= 3
        backward = [_level_index(src.get_rgb(i)) for i in reversed(range(9))]
        assert backward == list(reversed(range(9)))
        for i in (6, 1, 8, 0, 4, 3):
            assert _level_index(src.get_rgb(i)) == i
            assert src.get(i).shape == (1, 3, 64, 64)
        assert src.cached_frames <= 3


def test_video_bytes_and_model_input(tmp_path):
    path = tmp_path / "clip.mp4"
    _write_video(path, "libx264", n=5)
    with open_frames(path.read_bytes(), lookahead=1) as src:
        assert (src.num_frames, src.height, src.width) == (5, 64, 96)
        rgb = src.get_rgb(2)
        assert torch.equal(src.get(2), preprocess_frame(rgb, 1024))
        assert src.cached_frames <= 2


def test_video_file_errors(tmp_path):
    _need_av()
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="cannot be"):
        open_frames(bad)
    with pytest.raises(FileNotFoundError):
        open_frames(tmp_path / "missing.mp4")


def test_missing_pyav_message(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "av":
            raise ImportError("No module named 'av'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    path = tmp_path / "x.mp4"
    path.write_bytes(b"")
    with pytest.raises(ImportError, match=r"anyseg\[video\]"):
        open_frames(path)


def test_frame_source_is_abstract():
    with pytest.raises(TypeError):
        FrameSource()
