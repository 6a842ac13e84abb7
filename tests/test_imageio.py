"""Tests for anyseg.imageio: decoding any image source into an HxWx3 uint8 RGB array."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anyseg.imageio import IMAGE_EXTENSIONS, image_size, list_images, load_image

RED = (255, 0, 0)
BLUE = (0, 0, 255)


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _check_rgb(arr: np.ndarray, shape: tuple[int, int]) -> None:
    assert isinstance(arr, np.ndarray)
    assert arr.shape == (*shape, 3)
    assert arr.dtype == np.uint8
    assert arr.flags.c_contiguous and arr.flags.writeable


def _marked_image(w: int = 60, h: int = 40, block: int = 12) -> Image.Image:
    """A blue ``w x h`` image with a red ``block x block`` square in its top-left corner."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[...] = BLUE
    arr[:block, :block] = RED
    return Image.fromarray(arr)


def _is_red(pixel) -> bool:
    r, g, b = (int(v) for v in pixel)
    return r > 200 and g < 60 and b < 60


def _is_blue(pixel) -> bool:
    r, g, b = (int(v) for v in pixel)
    return b > 200 and r < 60 and g < 60


# ------------------------------------------------------------------------------------------ arrays
def test_rgb_uint8_array_is_copied_unchanged():
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = load_image(src)
    _check_rgb(out, (5, 7))
    np.testing.assert_array_equal(out, src)
    assert not np.shares_memory(out, src)


def test_non_contiguous_array_becomes_contiguous():
    src = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)[:, ::2]
    out = load_image(src)
    _check_rgb(out, (4, 3))
    np.testing.assert_array_equal(out, src)


@pytest.mark.parametrize("shape", [(4, 5), (4, 5, 1)])
def test_grayscale_array_is_replicated(shape):
    src = np.arange(20, dtype=np.uint8).reshape(shape)
    out = load_image(src)
    _check_rgb(out, (4, 5))
    gray = src.reshape(4, 5)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], gray)


def test_rgba_array_drops_alpha():
    src = np.zeros((3, 4, 4), np.uint8)
    src[..., 0], src[..., 1], src[..., 2], src[..., 3] = 10, 20, 30, 0
    out = load_image(src)
    _check_rgb(out, (3, 4))
    assert (out == np.array([10, 20, 30], np.uint8)).all()


def test_bgr_array_is_reversed():
    src = np.zeros((2, 3, 3), np.uint8)
    src[..., 0], src[..., 1], src[..., 2] = 1, 2, 3  # B, G, R
    out = load_image(src, image_format="BGR")
    assert (out == np.array([3, 2, 1], np.uint8)).all()
    # BGRA: alpha dropped, colours reversed.
    bgra = np.concatenate([src, np.full((2, 3, 1), 9, np.uint8)], axis=2)
    assert (load_image(bgra, image_format="BGR") == np.array([3, 2, 1], np.uint8)).all()
    # Grayscale is unaffected by the channel order.
    gray = np.full((2, 3), 7, np.uint8)
    assert (load_image(gray, image_format="BGR") == 7).all()


def test_uint16_array_keeps_high_byte():
    src = np.array([[0, 255, 256, 32896], [65280, 65535, 1000, 40000]], np.uint16)
    out = load_image(src)
    _check_rgb(out, (2, 4))
    np.testing.assert_array_equal(out[..., 0], src >> 8)
    assert out[0, 3, 0] == 128 and out[1, 1, 0] == 255 and out[0, 0, 0] == 0
    # Byte order of the input does not matter.
    np.testing.assert_array_equal(load_image(src.astype(">u2")), out)


def test_bool_array_maps_to_0_255():
    src = np.array([[True, False], [False, True]])
    out = load_image(src)
    np.testing.assert_array_equal(out[..., 1], np.array([[255, 0], [0, 255]], np.uint8))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_float_array_in_unit_range_is_scaled(dtype):
    src = np.array([[0.0, 1.0], [0.5, 0.2]], dtype)
    out = load_image(src)
    _check_rgb(out, (2, 2))
    np.testing.assert_array_equal(out[..., 2], np.rint(src.astype(np.float64) * 255).astype(np.uint8))
    assert out[0, 0, 0] == 0 and out[0, 1, 0] == 255 and out[1, 0, 0] in (127, 128)


def test_float_array_outside_unit_range_rejected():
    with pytest.raises(ValueError, match=r"values in \[0, 1\].*got values in \[0, 200\]"):
        load_image(np.array([[0.0, 200.0]], np.float32))
    with pytest.raises(ValueError, match="values in \\[0, 1\\].*-0.5"):
        load_image(np.full((2, 2, 3), -0.5))
    with pytest.raises(ValueError, match="NaN or infinite"):
        load_image(np.array([[0.0, np.nan]]))


@pytest.mark.parametrize(
    "shape", [(3, 10, 10, 2), (10,), (10, 10, 2), (10, 10, 5), (), (2, 2, 2, 3)]
)
def test_array_wrong_shape_rejected(shape):
    with pytest.raises(ValueError, match=r"expected an HxW, HxWx1, HxWx3 or HxWx4 image array, got shape"):
        load_image(np.zeros(shape, np.uint8))
    with pytest.raises(ValueError, match=r"got shape " + re.escape(str(tuple(shape)))):
        image_size(np.zeros(shape, np.uint8))


def test_channels_first_array_gets_a_hint():
    with pytest.raises(ValueError, match=r"got shape \(3, 10, 12\).*channels-first"):
        load_image(np.zeros((3, 10, 12), np.uint8))


@pytest.mark.parametrize("shape", [(0, 5, 3), (5, 0), (0, 0, 1)])
def test_empty_array_rejected(shape):
    with pytest.raises(ValueError, match=r"image array is empty.*height and width must be > 0"):
        load_image(np.zeros(shape, np.uint8))


@pytest.mark.parametrize("dtype", [np.int64, np.int8, np.uint32, np.complex64, object])
def test_array_unsupported_dtype_rejected(dtype):
    with pytest.raises(ValueError, match=r"unsupported image array dtype .*expected uint8, uint16, bool"):
        load_image(np.zeros((4, 4, 3), dtype))


@pytest.mark.parametrize("fmt", ["rgb", "BGRA", "L", "", None])
def test_bad_image_format_rejected(fmt):
    with pytest.raises(ValueError, match="image_format must be 'RGB' or 'BGR'"):
        load_image(np.zeros((2, 2, 3), np.uint8), image_format=fmt)


def test_unsupported_source_type_rejected():
    with pytest.raises(TypeError, match="expected a path, encoded image bytes, a PIL.Image.Image or a numpy array"):
        load_image([[0, 1], [2, 3]])
    with pytest.raises(TypeError, match="got builtins.int"):
        image_size(3)


# ------------------------------------------------------------------------------------- PIL images
def test_pil_rgb_and_modes():
    rgb = Image.new("RGB", (5, 3), (12, 34, 56))
    out = load_image(rgb)
    _check_rgb(out, (3, 5))
    assert (out == np.array([12, 34, 56], np.uint8)).all()

    assert (load_image(Image.new("L", (4, 2), 77)) == 77).all()
    la = load_image(Image.new("LA", (4, 2), (90, 0)))
    assert (la == 90).all()
    rgba = load_image(Image.new("RGBA", (4, 2), (1, 2, 3, 0)))
    assert (rgba == np.array([1, 2, 3], np.uint8)).all()
    one = load_image(Image.new("1", (3, 3), 1))
    assert (one == 255).all()
    cmyk = load_image(Image.new("CMYK", (3, 3), (0, 0, 0, 0)))
    assert (cmyk == 255).all()  # no ink = white
    ycc = load_image(Image.new("RGB", (3, 3), (200, 100, 50)).convert("YCbCr"))
    assert np.abs(ycc.astype(int) - [200, 100, 50]).max() <= 3


def test_pil_image_is_used_as_given_and_bgr_ignored():
    img = Image.new("RGB", (3, 2), (1, 2, 3))
    assert (load_image(img, image_format="BGR") == np.array([1, 2, 3], np.uint8)).all()
    assert image_size(img) == (2, 3)


def test_pil_palette_with_and_without_transparency(tmp_path):
    pal = Image.new("P", (4, 2))
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    pal.putpixel((0, 0), 1)
    out = load_image(pal)
    assert tuple(out[0, 0]) == (0, 255, 0) and tuple(out[1, 3]) == (255, 0, 0)

    # With a transparent index, through a PNG file on disk (tRNS chunk).
    path = tmp_path / "pal.png"
    pal.save(path, transparency=0)
    assert Image.open(path).mode == "P" and "transparency" in Image.open(path).info
    out = load_image(path)
    _check_rgb(out, (2, 4))
    assert tuple(out[0, 0]) == (0, 255, 0) and tuple(out[1, 3]) == (255, 0, 0)

    # Palette GIF.
    gif = tmp_path / "pal.gif"
    pal.save(gif)
    out = load_image(gif)
    assert tuple(out[0, 0]) == (0, 255, 0) and tuple(out[1, 3]) == (255, 0, 0)


def test_pil_float_and_32bit_modes():
    f = Image.fromarray(np.array([[0.0, 1.0, 0.5]], np.float32))
    assert f.mode == "F"
    np.testing.assert_array_equal(load_image(f)[0, :, 0], [0, 255, 128])
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        load_image(Image.fromarray(np.array([[0.0, 3.0]], np.float32)))

    i32 = Image.fromarray(np.array([[0, 32896, 65535, 100000, -5]], np.int32))
    assert i32.mode == "I"
    np.testing.assert_array_equal(load_image(i32)[0, :, 0], [0, 128, 255, 255, 0])


def test_empty_pil_image_rejected():
    with pytest.raises(ValueError, match="image is empty"):
        load_image(Image.new("RGB", (0, 4)))


# ---------------------------------------------------------------------------- files and bytes
def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 255, 32896], [65535, 4096, 60000]], np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode in ("I;16", "I")
    out = load_image(path)
    _check_rgb(out, (2, 3))
    np.testing.assert_array_equal(out[..., 0], values >> 8)
    assert out[1, 0, 0] == 255 and out[0, 0, 0] == 0 and out[0, 2, 0] == 128
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()

    # Same file through mode "I" (how older Pillow versions open 16-bit PNGs).
    as_i = Image.open(path).convert("I")
    np.testing.assert_array_equal(load_image(as_i), out)

    # Big-endian 16-bit mode.
    big = Image.frombytes("I;16B", (3, 2), values.astype(">u2").tobytes())
    np.testing.assert_array_equal(load_image(big), out)


def test_png_rgba_and_grayscale_files(tmp_path):
    rgba = np.zeros((3, 5, 4), np.uint8)
    rgba[..., :3] = (10, 200, 30)
    rgba[..., 3] = np.arange(5, dtype=np.uint8)[None, :] * 60
    path = tmp_path / "a.png"
    Image.fromarray(rgba).save(path)
    out = load_image(path)
    _check_rgb(out, (3, 5))
    assert (out == np.array([10, 200, 30], np.uint8)).all()

    gray = np.arange(15, dtype=np.uint8).reshape(3, 5) * 10
    gpath = tmp_path / "g.png"
    Image.fromarray(gray).save(gpath)
    out = load_image(str(gpath))
    np.testing.assert_array_equal(out, np.repeat(gray[:, :, None], 3, axis=2))


def test_bytes_sources_and_bgr_does_not_apply(tmp_path):
    src = np.zeros((4, 6, 3), np.uint8)
    src[..., 0] = 250
    data = _encode(Image.fromarray(src), "PNG")
    for blob in (data, bytearray(data), memoryview(data)):
        out = load_image(blob)
        _check_rgb(out, (4, 6))
        np.testing.assert_array_equal(out, src)
        assert image_size(blob) == (4, 6)
    # Files and bytes are always decoded as RGB.
    np.testing.assert_array_equal(load_image(data, image_format="BGR"), src)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    np.testing.assert_array_equal(load_image(path, image_format="BGR"), src)
    np.testing.assert_array_equal(load_image(os.fspath(path)), src)


@pytest.mark.parametrize("ext", ["bmp", "tiff", "webp"])
def test_other_formats_round_trip(tmp_path, ext):
    src = np.zeros((8, 10, 3), np.uint8)
    src[:, :5] = (255, 255, 0)
    path = tmp_path / f"img.{ext}"
    Image.fromarray(src).save(path, **({"lossless": True} if ext == "webp" else {}))
    out = load_image(path)
    _check_rgb(out, (8, 10))
    np.testing.assert_array_equal(out, src)


@pytest.mark.parametrize(
    "orientation, shape, red_corner",
    [
        (1, (40, 60), (0, 0)),  # as stored
        (3, (40, 60), (-1, -1)),  # rotated 180 degrees
        (6, (60, 40), (0, -1)),  # rotate 90 degrees clockwise: top-left -> top-right
        (8, (60, 40), (-1, 0)),  # rotate 90 degrees counter-clockwise: top-left -> bottom-left
    ],
)
def test_exif_orientation_applied(tmp_path, orientation, shape, red_corner):
    img = _marked_image(w=60, h=40, block=12)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    img.save(path, format="JPEG", quality=95, exif=exif)
    assert Image.open(path).size == (60, 40)  # stored unrotated

    out = load_image(path)
    _check_rgb(out, shape)
    assert image_size(path) == shape
    assert image_size(path.read_bytes()) == shape
    np.testing.assert_array_equal(load_image(path.read_bytes()), out)

    h, w = shape
    corners = {(0, 0): (2, 2), (0, -1): (2, w - 3), (-1, 0): (h - 3, 2), (-1, -1): (h - 3, w - 3)}
    for corner, (y, x) in corners.items():
        if corner == red_corner:
            assert _is_red(out[y, x]), (corner, out[y, x])
        else:
            assert _is_blue(out[y, x]), (corner, out[y, x])


def test_image_size_matches_load_image(tmp_path, images_dir):
    cases = [
        np.zeros((3, 4), np.uint16),
        np.zeros((5, 2, 4), np.float32),
        Image.new("RGB", (7, 3)),
        _encode(Image.new("L", (9, 4)), "PNG"),
        images_dir / "dog.jpg",
    ]
    for source in cases:
        assert image_size(source) == load_image(source).shape[:2]


# ----------------------------------------------------------------------------------- file errors
def test_missing_file(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match=r"image file not found: .*nope\.jpg"):
        load_image(missing)
    with pytest.raises(FileNotFoundError, match=r"nope\.jpg"):
        image_size(str(missing))


def test_directory_rejected(tmp_path):
    with pytest.raises(ValueError, match="expected an image file, got a directory"):
        load_image(tmp_path)
    with pytest.raises(ValueError, match="got a directory"):
        image_size(tmp_path)


def test_empty_file_and_empty_bytes(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"image file '.*empty\.png' is empty \(0 bytes\)"):
        load_image(path)
    with pytest.raises(ValueError, match=r"image data is empty \(0 bytes\)"):
        load_image(b"")
    with pytest.raises(ValueError, match="is empty"):
        image_size(path)


def test_corrupt_and_non_image_files(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n")
    with pytest.raises(ValueError, match=r"could not decode image file '.*notes\.jpg': "):
        load_image(text)
    with pytest.raises(ValueError, match="could not decode image file"):
        image_size(text)
    noise = bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"could not decode image data \(500 bytes\): "):
        load_image(noise)


def test_truncated_jpeg(tmp_path):
    rng = np.random.default_rng(2)
    noisy = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = _encode(noisy, "JPEG", quality=90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    # The header is intact, so the size is still readable without decoding.
    assert image_size(path) == (64, 64)
    with pytest.raises(ValueError, match=r"could not decode image file '.*cut\.jpg': .*truncated"):
        load_image(path)
    with pytest.raises(ValueError, match=r"could not decode image data .*truncated"):
        load_image(data[: len(data) // 2])


def test_max_pixels(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (30, 20)).save(path)
    assert load_image(path, max_pixels=600).shape == (20, 30, 3)
    with pytest.raises(ValueError, match=r"30x20 = 600 pixels .*more than max_pixels=599"):
        load_image(path, max_pixels=599)
    with pytest.raises(ValueError, match="more than max_pixels"):
        load_image(path.read_bytes(), max_pixels=100)
    with pytest.raises(ValueError, match="more than max_pixels"):
        load_image(np.zeros((20, 30, 3), np.uint8), max_pixels=100)
    with pytest.raises(ValueError, match="more than max_pixels"):
        load_image(Image.new("L", (30, 20)), max_pixels=100)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_pixels must be a positive integer or None"):
            load_image(path, max_pixels=bad)


def test_max_pixels_checked_before_decoding(tmp_path):
    # A valid header followed by truncated pixel data: refused for its size, not for the truncation.
    data = _encode(Image.new("RGB", (300, 200), (5, 5, 5)), "PNG")
    with pytest.raises(ValueError, match="more than max_pixels"):
        load_image(data[:80], max_pixels=1000)


# ---------------------------------------------------------------------------------- real photos
@pytest.mark.parametrize("name, shape", [("truck.jpg", (1200, 1800)), ("dog.jpg", (534, 800))])
def test_real_photos(images_dir, name, shape):
    path = images_dir / name
    out = load_image(path)
    _check_rgb(out, shape)
    assert image_size(path) == shape
    assert out.std() > 10  # real content, not a blank frame
    np.testing.assert_array_equal(load_image(path.read_bytes()), out)
    np.testing.assert_array_equal(load_image(Image.open(path)), out)
    assert load_image(out[:, :, ::-1], image_format="BGR").tobytes() == out.tobytes()


# ---------------------------------------------------------------------------------- list_images
@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for rel in ["a.jpg", "B.PNG", "c.tiff", "notes.txt", "sub/d.webp", "sub/e.GIF", "sub/deeper/f.bmp",
                "sub/deeper/g.jpeg", "sub/readme.md", ".hidden/h.jpg", ".dot.jpg"]:
        (root / rel).write_bytes(b"x")
    return root


def _rel(paths, root):
    return [p.relative_to(root).as_posix() for p in paths]


def test_list_images_folder_recursive(tree):
    found = list_images([tree])
    assert all(isinstance(p, Path) for p in found)
    assert _rel(found, tree) == ["B.PNG", "a.jpg", "c.tiff", "sub/d.webp", "sub/deeper/f.bmp",
                                 "sub/deeper/g.jpeg", "sub/e.GIF"]
    assert found == sorted(found)


def test_list_images_folder_flat(tree):
    assert _rel(list_images([str(tree)], recursive=False), tree) == ["B.PNG", "a.jpg", "c.tiff"]


def test_list_images_globs_and_files(tree):
    assert _rel(list_images([str(tree / "*.jpg")]), tree) == ["a.jpg"]
    assert _rel(list_images([str(tree / "**" / "*.jp*g")]), tree) == ["a.jpg", "sub/deeper/g.jpeg"]
    assert _rel(list_images([str(tree / "sub" / "?.webp")]), tree) == ["sub/d.webp"]
    # Non-image files matched by a pattern are skipped, matched folders are scanned; a file named
    # explicitly is kept whatever its extension.
    assert _rel(list_images([str(tree / "*")], recursive=False), tree) == [
        "B.PNG", "a.jpg", "c.tiff", "sub/d.webp", "sub/e.GIF"]
    assert _rel(list_images([tree / "notes.txt"]), tree) == ["notes.txt"]
    # A single path instead of a list.
    assert _rel(list_images(tree / "a.jpg"), tree) == ["a.jpg"]
    assert _rel(list_images(str(tree / "sub" / "deeper")), tree) == ["sub/deeper/f.bmp", "sub/deeper/g.jpeg"]


def test_list_images_deduplicates(tree, monkeypatch):
    monkeypatch.chdir(tree.parent)
    found = list_images(["data/a.jpg", "./data/a.jpg", str(tree / "a.jpg"), "data/*.jpg", "data"])
    names = [p.name for p in found]
    assert len(names) == len(set(names))
    assert sorted(names) == sorted(["B.PNG", "a.jpg", "c.tiff", "d.webp", "e.GIF", "f.bmp", "g.jpeg"])
    assert list_images([]) == []


def test_list_images_missing_inputs(tree):
    with pytest.raises(FileNotFoundError, match=r"no such file or folder: '.*missing\.jpg'"):
        list_images([tree / "a.jpg", tree / "missing.jpg"])
    with pytest.raises(FileNotFoundError, match=r"no images matched the pattern '.*\*\.xyz'"):
        list_images([str(tree / "*.xyz")])
    with pytest.raises(FileNotFoundError, match=r"no images matched the pattern '.*\*\.txt'"):
        list_images([str(tree / "*.txt")])
    empty = tree / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no images .* found in folder '.*empty'"):
        list_images([empty])


def test_image_extensions():
    assert IMAGE_EXTENSIONS == {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}


def test_module_does_not_import_torch():
    code = (
        "import sys, importlib.util\n"
        "spec = importlib.util.spec_from_file_location('imageio_only', sys.argv[1])\n"
        "mod = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(mod)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(mod.load_image(__import__('numpy').zeros((2, 2), 'uint8')).shape)\n"
    )
    module_file = Path(__file__).resolve().parents[1] / "anyseg" / "imageio.py"
    result = subprocess.run([sys.executable, "-c", code, str(module_file)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(2, 2, 3)"
