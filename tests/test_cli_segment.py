"""End-to-end: ``anyseg segment`` on a shared image with a golden checkpoint, and the help texts."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from anyseg.cli import build_parser, main


@pytest.fixture(scope="module")
def checkpoint(golden_dir):
    return str(golden_dir / "mobilesam_checkpoint.pth")


def test_segment_writes_masks_overlay_and_json(checkpoint, images_dir, tmp_path):
    out = tmp_path / "out"
    image_path = images_dir / "dog.jpg"
    status = main(["segment", str(image_path), "--point", "400,267", "--point", "100,50,0", "--box", "200,100,600,500",
                   "--multimask", "--model", checkpoint, "-o", str(out)])
    assert status == 0
    record = json.loads((out / "dog.json").read_text())
    width, height = Image.open(image_path).size
    assert record["image_size"] == {"height": height, "width": width}
    assert record["prompt"]["points"] == [[400.0, 267.0], [100.0, 50.0]]
    assert record["prompt"]["labels"] == [1, 0]
    assert record["prompt"]["box"] == [200.0, 100.0, 600.0, 500.0]
    assert len(record["masks"]) == 3
    scores = [m["score"] for m in record["masks"]]
    assert scores == sorted(scores, reverse=True)
    for entry in record["masks"]:
        mask = np.asarray(Image.open(out / entry["file"]))
        assert mask.shape == (height, width)
        binary = mask > 0
        assert entry["area"] == int(binary.sum())
        if entry["area"]:
            ys, xs = np.nonzero(binary)
            assert entry["bbox_xyxy"] == [xs.min(), ys.min(), xs.max(), ys.max()]
    overlay = np.asarray(Image.open(out / record["overlay"]))
    assert overlay.shape == (height, width, 3)
    original = np.asarray(Image.open(image_path).convert("RGB"))
    assert np.any(overlay != original), "the overlay should show the masks"
    assert not list(out.glob("*.tmp*")), "no temporary files are left behind"


def test_single_click_keeps_the_best_mask(checkpoint, images_dir, tmp_path):
    out = tmp_path / "one"
    assert main(["segment", str(images_dir / "dog.jpg"), "-p", "400,267", "-m", checkpoint, "-o", str(out)]) == 0
    record = json.loads((out / "dog.json").read_text())
    assert [m["file"] for m in record["masks"]] == ["dog_mask.png"]


def test_segment_without_prompt_is_an_error(checkpoint, images_dir, tmp_path, capsys):
    status = main(["segment", str(images_dir / "dog.jpg"), "-m", checkpoint, "-o", str(tmp_path)])
    assert status == 2
    assert "--point" in capsys.readouterr().err


@pytest.mark.parametrize("arg", ["--point=1", "--point=1,2,5", "--box=5,5,1,1", "--point=a,b"])
def test_bad_prompt_arguments(arg, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["segment", "x.jpg", arg, "-o", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "expected" in err or "needs" in err or "label" in err


def test_corrupt_image_is_reported(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    status = main(["segment", str(bad), "-p", "1,1", "-m", checkpoint, "-o", str(tmp_path / "o")])
    assert status == 2
    assert "bad.jpg" in capsys.readouterr().err


def test_help_texts_are_complete():
    parser = build_parser()
    top = parser.format_help()
    sub_actions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    assert sub_actions, "anyseg has subcommands"
    for name, sub in sub_actions[0].choices.items():
        assert name in top
        text = sub.format_help()
        assert sub.description, f"'anyseg {name}' has a description"
        assert "example" in text.lower(), f"'anyseg {name} --help' shows examples"
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"'anyseg {name} {action.option_strings[0]}' has a help text"


def test_module_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "anyseg", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "segment" in result.stdout
