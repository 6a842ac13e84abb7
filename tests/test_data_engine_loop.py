"""The data-engine loop end to end, on generated scenes with the built-in nano model:

1. the server auto-labels held-out scenes (first pass: how many proposals are correct);
2. a scripted annotator labels the training scenes through the HTTP API only, with clicks: a click at
   the object's deepest pixel, the best of the three candidates, corrective clicks at the largest
   error; an object the model cannot get right is drawn by hand (its true mask, stage "manual");
3. ``anyseg train --mode decoder --data coco:labels.json`` trains on the saved annotation file;
4. ``anyseg eval`` on held-out scenes: the 1-point mIoU of the new model is higher;
5. the server switches to the new model without a restart, and the next auto-label pass proposes
   more correct masks than the first.

The figures are printed and written to test-artifacts/data-engine-loop.json (docs/server.md quotes
them).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed (pip install 'anyseg[server]')")
pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install 'anyseg[server]')")
httpx = pytest.importorskip("httpx", reason="the tests talk to the server with httpx (pip install httpx)")

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import ndimage  # noqa: E402

from anyseg.cli import main as anyseg_main  # noqa: E402
from anyseg.masks import coco_rle_to_mask, rle_to_mask  # noqa: E402
from anyseg.server import ServerSettings, create_app, run_in_thread  # noqa: E402
from anyseg.train.synthetic import SyntheticDataset  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
API = "/api/v1"
# The scenes: textured objects with a part of another texture inside. nano was trained on scenes
# without parts, so a click on such an object often gives only the part under it; the annotator labels
# whole objects (parts included), and that is what the loop has to teach it. The held-out objects are
# written as label maps for anyseg eval.
SCENE = dict(size=128, objects=(2, 4), parts=True)
TRAIN_SCENES, HELDOUT_SCENES = 12, 6
MAX_CLICKS, GOOD_IOU, CORRECT_IOU = 4, 0.85, 0.8
# nano's predicted IoUs are low on these scenes (median ~0.5): "confident" for it is 0.55 / 0.75.
AUTO = {"points_per_side": 8, "pred_iou_thresh": 0.55, "stability_score_thresh": 0.75, "format": "coco_rle"}
# Decoder fine-tuning on the first click only (the multimask answer that 1-point mIoU and auto-label
# use), with the IoU head's loss weighted up so that its confidence follows the new masks.
TRAIN = ["--mode", "decoder", "--steps", "60", "--batch-size", "2", "--masks-per-image", "8", "--lr", "5e-4",
         "--iou-weight", "5", "--warmup-steps", "3", "--focal-weight", "1", "--dice-weight", "1", "--point-iters", "0",
         "--refine-iters", "0", "--loss-res", "low", "--seed", "0", "--threads", "1", "--quiet"]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def deepest_point(region: np.ndarray):
    """The pixel of ``region`` farthest from its boundary, as XY."""
    depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return [float(x), float(y)]


def uncompressed_rle(mask: np.ndarray) -> dict:
    flat = np.asarray(mask, bool).ravel(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat.astype(np.int8))) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    return {"size": list(mask.shape), "counts": ([0] + runs) if flat[0] else runs}


def count_correct(client, image_ids, truths) -> tuple:
    """(correct proposals, all proposals) of one auto-label pass: a proposal is correct when its IoU
    with a true mask not matched yet is at least CORRECT_IOU."""
    correct = total = 0
    for image_id, truth in zip(image_ids, truths):
        r = client.post(f"/images/{image_id}/auto-label", json=AUTO)
        assert r.status_code == 200, r.text
        free = list(range(len(truth)))
        for p in r.json()["proposals"]:
            total += 1
            mask = coco_rle_to_mask(p["mask"])
            scores = [(iou(mask, truth[k]), k) for k in free]
            if scores and max(scores)[0] >= CORRECT_IOU:
                correct += 1
                free.remove(max(scores)[1])
    return correct, total


def annotate(client, image_id: str, truth: np.ndarray) -> dict:
    """Label every true mask of one image with clicks through the API; returns the counts."""
    made = {"assisted": 0, "manual": 0, "clicks": 0}
    for target in truth:
        start = time.perf_counter()
        points, labels, best, best_iou = [deepest_point(target)], [1], None, -1.0
        low_res = None
        for _ in range(MAX_CLICKS):
            body = {"points": points, "labels": labels, "multimask": len(points) == 1, "format": "rle"}
            if low_res is not None:
                body["mask_input"] = low_res
            r = client.post(f"/images/{image_id}/decode", json=body)
            assert r.status_code == 200, r.text
            answer = r.json()
            candidates = [rle_to_mask(m["mask"]) for m in answer["masks"]]
            scores = [iou(c, target) for c in candidates]
            k = int(np.argmax(scores))  # the annotator cycles the candidates and keeps the best
            if scores[k] > best_iou:
                best, best_iou = candidates[k], scores[k]
            if best_iou >= GOOD_IOU:
                break
            # A corrective click at the deepest pixel of the largest error.
            missed, extra = target & ~candidates[k], candidates[k] & ~target
            fix, label = (missed, 1) if missed.sum() >= extra.sum() else (extra, 0)
            points.append(deepest_point(fix))
            labels.append(label)
            side = answer["low_res_shape"][1] * answer["low_res_shape"][2] * 4
            import base64

            raw = base64.b64decode(answer["low_res_logits"])
            low_res = base64.b64encode(raw[k * side:(k + 1) * side]).decode()
        clicks = len(points)
        if best_iou >= GOOD_IOU:
            segmentation, provenance = uncompressed_rle(best), {"stage": "assisted", "clicks": clicks}
            made["assisted"] += 1
        else:  # drawn by hand instead
            segmentation, provenance = uncompressed_rle(target), {"stage": "manual", "clicks": clicks}
            made["manual"] += 1
        made["clicks"] += clicks
        provenance["seconds"] = round(time.perf_counter() - start, 3)
        r = client.post("/annotations", json={"image_id": image_id, "label": "object", "segmentation": segmentation,
                                              "provenance": provenance})
        assert r.status_code == 201, r.text
    return made


def run_eval(model: str, data: Path, out: Path, name: str) -> dict:
    assert anyseg_main(["eval", "--model", model, "--data", str(data), "--clicks", "1", "--quiet",
                        "-o", str(out), "--name", name]) == 0
    return json.loads((out / f"{name}.json").read_text())["summary"]


@pytest.mark.slow
def test_label_retrain_switch_and_auto_label_better(tmp_path):
    torch.set_num_threads(1)
    from anyseg import load_model

    t0 = time.perf_counter()
    folder, runs = tmp_path / "images", tmp_path / "runs"
    (folder / "train").mkdir(parents=True)
    (folder / "heldout").mkdir()
    runs.mkdir()
    train = SyntheticDataset(count=TRAIN_SCENES, seed=0, **SCENE)
    heldout = SyntheticDataset(count=HELDOUT_SCENES, seed=1000, **SCENE)
    truths = {}
    evaluation = tmp_path / "heldout-eval"
    (evaluation / "images").mkdir(parents=True)
    (evaluation / "labels").mkdir()
    for split, data in (("train", train), ("heldout", heldout)):
        for i in range(len(data)):
            sample = data[i]
            objects = sample.masks[[k == "object" for k in sample.kinds]]
            Image.fromarray(sample.image).save(folder / split / f"{i:02d}.png")
            truths[f"{split}/{i:02d}.png"] = objects
            if split == "heldout":  # visible object regions do not overlap: one label map holds them
                Image.fromarray(sample.image).save(evaluation / "images" / f"{i:02d}.png")
                label_map = np.zeros(objects.shape[1:], np.uint8)
                for k, m in enumerate(objects, start=1):
                    label_map[m] = k
                Image.fromarray(label_map).save(evaluation / "labels" / f"{i:02d}.png")
    labels = tmp_path / "labels.json"
    settings = ServerSettings(images_dir=folder, annotations_path=labels, models_dir=runs, browser_decoder=False,
                              model_name="nano")
    app = create_app(load_model("nano", device="cpu"), settings)
    running = run_in_thread(app)
    numbers = {}
    try:
        with httpx.Client(base_url=running.url + API, timeout=300) as client:
            ids = {name: client.post("/images/from-file", json={"path": name}).json()["id"] for name in truths}
            held = sorted(n for n in truths if n.startswith("heldout/"))
            first = count_correct(client, [ids[n] for n in held], [truths[n] for n in held])

            made = {"assisted": 0, "manual": 0, "clicks": 0}
            t_label = time.perf_counter()
            for name in sorted(n for n in truths if n.startswith("train/")):
                for key, value in annotate(client, ids[name], truths[name]).items():
                    made[key] += value
            label_s = time.perf_counter() - t_label
            stats = client.get("/stats").json()
            assert stats["objects"] == sum(len(truths[n]) for n in truths if n.startswith("train/"))
            assert stats["stages"]["assisted"]["objects"] == made["assisted"] > 0
            assert stats["stages"]["manual"]["objects"] == made["manual"]
            assert stats["models"] == {"nano": made["assisted"]}

            # Retrain the decoder on the app's annotation file, images from the served folder.
            t_train = time.perf_counter()
            assert anyseg_main(["train", "--model", "nano", "--data", f"coco:{labels}", *TRAIN,
                                "-o", str(runs / "round1")]) == 0
            train_s = time.perf_counter() - t_train
            assert (runs / "round1" / "model.pth").is_file()

            before = run_eval("nano", evaluation, tmp_path / "eval", "nano")
            after = run_eval(str(runs / "round1" / "model.pth"), evaluation, tmp_path / "eval", "round1")

            r = client.post("/models/switch", json={"name": "round1/model.pth"})
            assert r.status_code == 200, r.text
            assert client.get("/health").json()["model"] == "round1/model.pth"
            second = count_correct(client, [ids[n] for n in held], [truths[n] for n in held])
    finally:
        running.stop()
        app.state.engine.close()

    numbers = {
        "train_scenes": TRAIN_SCENES, "heldout_scenes": HELDOUT_SCENES,
        "objects_labelled": stats["objects"], "assisted": made["assisted"], "manual": made["manual"],
        "clicks_per_mask": stats["clicks_per_mask"], "labelling_seconds": round(label_s, 1),
        "training_seconds": round(train_s, 1),
        "heldout_1point_oracle_miou": [round(before["point_oracle_miou"], 4), round(after["point_oracle_miou"], 4)],
        "heldout_1point_confident_miou": [round(before["point_confident_miou"], 4),
                                          round(after["point_confident_miou"], 4)],
        "auto_label_correct_of_proposed": [list(first), list(second)],
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "data-engine-loop.json").write_text(json.dumps(numbers, indent=1))
    print("\ndata-engine loop:", json.dumps(numbers))
    assert after["point_oracle_miou"] > before["point_oracle_miou"], numbers
    assert second[0] > first[0], numbers
