"""`anyseg train` / `anyseg eval` end to end on tiny models, the config file, and the eval helpers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from anyseg import load_model
from anyseg.cli import main
from anyseg.train.config import TrainConfig, load_config, parse_config_text
from anyseg.train.evaluate import EvalConfig, evaluate, farthest_from_boundary, next_click
from anyseg.train.plot import _pil_plot, plot_curves
from anyseg.train.synthetic import SyntheticDataset

DATA = "synthetic:count=4,seed=11,size=96"


def test_config_file_parsing(tmp_path):
    path = tmp_path / "run.cfg"
    path.write_text("# a run\ndata = synthetic:count=4\narch = tiny\nbatch-size = 3   # images\nlr = 1e-3\n"
                    "bf16 = yes\ncache_dir = none\n")
    cfg = load_config(path, {"lr": 5e-4, "steps": None})
    assert (cfg.data, cfg.arch, cfg.batch_size, cfg.lr, cfg.bf16, cfg.cache_dir) == (
        "synthetic:count=4", "tiny", 3, 5e-4, True, None)
    assert cfg.steps == TrainConfig().steps
    with pytest.raises(ValueError, match="unknown key 'learning_rate'"):
        parse_config_text("learning_rate = 1", "x.cfg")
    with pytest.raises(ValueError, match=r"x.cfg:2: expected 'key = value'"):
        parse_config_text("lr = 1\njunk\n", "x.cfg")
    with pytest.raises(ValueError, match="expected int"):
        parse_config_text("steps = many")


def test_train_then_eval_cli(tmp_path, capsys):
    cfg = tmp_path / "tiny.cfg"
    cfg.write_text(f"data = {DATA}\narch = tiny\nmode = full\nmasks-per-image = 3\nbatch-size = 1\n"
                   "point-iters = 1\nrefine-iters = 1\nloss-res = low\n")
    out = tmp_path / "run"
    argv = ["train", "--config", str(cfg), "--steps", "2", "--save-every", "1", "-o", str(out), "--quiet"]
    assert main(argv) == 0
    model_path = out / "model.pth"
    assert model_path.exists() and (out / "last.pt").exists()
    rows = (out / "log.csv").read_text().strip().splitlines()
    assert rows[0].startswith("step,") and len(rows) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 2 and summary["config"]["masks_per_image"] == 3
    model = load_model(model_path)
    assert model.img_size == 128
    # running it again resumes at the end: nothing more to do, the same model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert main(argv) == 0
    assert "resumed" in capsys.readouterr().err
    after = load_model(model_path).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    ev = tmp_path / "eval"
    assert main(["eval", "--model", str(model_path), "--data", DATA, "--clicks", "3", "-o", str(ev),
                 "--name", "tiny", "--quiet", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "1 point (oracle, best of 3)" in printed and "3 clicks" in printed
    record = json.loads((ev / "tiny.json").read_text())
    s = record["summary"]
    n = s["instances"]
    assert n > 0 and len(record["per_instance"]["box"]) == n
    assert len(s["clicks_miou"]) == 3
    assert s["point_oracle_miou"] >= s["point_confident_miou"] - 1e-9
    assert s["clicks_miou"][0] == pytest.approx(s["point_confident_miou"])
    with Image.open(ev / "tiny.png") as img:
        assert img.size[0] > 100 and img.size[1] > 100


def test_cli_errors(tmp_path, capsys):
    assert main(["train", "--data", DATA, "-o", str(tmp_path)]) == 2  # neither --model nor --arch
    assert "exactly one of --model" in capsys.readouterr().err
    assert main(["eval", "--model", "x.pth", "--data", DATA, "--clicks", "0"]) == 2
    assert "--clicks must be at least 1" in capsys.readouterr().err


def test_farthest_point_and_next_click():
    mask = np.zeros((9, 13), bool)
    mask[1:8, 3:10] = True  # 7 x 7 square: a unique centre
    assert farthest_from_boundary(mask) == (6, 4)
    edge = np.zeros((5, 5), bool)
    edge[:, :2] = True  # touching the image border: the border counts as boundary
    assert farthest_from_boundary(edge)[0] in (0, 1)
    with pytest.raises(ValueError, match="empty mask"):
        farthest_from_boundary(np.zeros((3, 3), bool))
    gt = np.zeros((20, 20), bool)
    gt[2:12, 2:12] = True
    pred = np.zeros_like(gt)
    pred[2:12, 2:6] = True  # misses a 10x6 block
    pred[15:18, 15:18] = True  # a 3x3 false positive
    x, y, label = next_click(pred, gt)
    assert label == 1 and gt[y, x] and not pred[y, x]
    pred2 = gt.copy()
    pred2[14:20, 0:20] = True
    x, y, label = next_click(pred2, gt)
    assert label == 0 and pred2[y, x] and not gt[y, x]
    assert next_click(gt, gt) is None


def test_evaluate_reports_consistent_metrics():
    ds = SyntheticDataset(count=2, seed=1, size=64)
    from anyseg.train.config import ARCHS
    from anyseg.modeling.sam import build_sam

    model = build_sam(ARCHS["tiny"]).eval()
    result = evaluate(model, ds, EvalConfig(clicks=2, max_instances=3), progress=False)
    s = result.summary()
    assert s["images"] == 2 and s["instances"] == len(result.box) <= 6
    assert all(0.0 <= v <= 1.0 for v in result.point_oracle + result.box)
    assert all(o >= c - 1e-12 for o, c in zip(result.point_oracle, result.point_confident))


def test_plot_writes_png_without_matplotlib(tmp_path):
    data = _pil_plot({"a": [0.2, 0.5, 0.7], "b": [0.1, 0.3, 0.35]}, {"box": 0.6}, "t")
    path = tmp_path / "p.png"
    path.write_bytes(data)
    with Image.open(path) as img:
        arr = np.asarray(img.convert("RGB"))
    assert arr.shape == (420, 640, 3)
    assert (np.abs(arr.astype(int) - [31, 119, 180]).sum(-1) == 0).sum() > 50  # the first curve is drawn
    assert plot_curves(tmp_path / "q.png", {"a": [0.5]}).exists()
