"""The data-engine parts of the server over real HTTP (the built-in nano model): provenance and effort
of each object, the stats endpoint, auto-label proposals, switching models while clients decode, and
``coco:FILE`` training data from the app's annotation file."""
from __future__ import annotations

import io
import json
import threading

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed (pip install 'anyseg[server]')")
pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install 'anyseg[server]')")
httpx = pytest.importorskip("httpx", reason="the tests talk to the server with httpx (pip install httpx)")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from anyseg.masks import coco_rle_to_mask  # noqa: E402
from anyseg.server import ServerSettings, create_app, run_in_thread  # noqa: E402
from anyseg.server.annotations import AnnotationStore  # noqa: E402
from anyseg.train.datasets import open_dataset  # noqa: E402
from anyseg.train.synthetic import SyntheticDataset  # noqa: E402

API = "/api/v1"


def perturbed(model, part: str, seed: int):
    """A copy of ``model`` with the weights of ``part`` (image_encoder / mask_decoder) nudged."""
    import copy

    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in getattr(out, part).parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return out


@pytest.fixture(scope="module")
def nano():
    torch.set_num_threads(1)
    from anyseg import load_model

    return load_model("nano", device="cpu")


@pytest.fixture(scope="module")
def loop_server(nano, tmp_path_factory):
    from anyseg.checkpoint import save_model

    work = tmp_path_factory.mktemp("loop")
    folder, runs = work / "images", work / "runs"
    folder.mkdir()
    scenes = SyntheticDataset(count=2, seed=5, size=96, objects=(2, 3), parts=False)
    truth = {}
    for i in range(2):
        sample = scenes[i]
        Image.fromarray(sample.image).save(folder / f"scene{i}.png")
        truth[f"scene{i}.png"] = sample.masks
    save_model(perturbed(nano, "mask_decoder", 1), runs / "decoder" / "model.pth")
    save_model(perturbed(nano, "image_encoder", 2), runs / "encoder" / "model.pth")
    (runs / "decoder" / "last.pt").write_bytes(b"training state, not a model")
    settings = ServerSettings(images_dir=folder, annotations_path=work / "labels.json", models_dir=runs,
                              decoder_dir=work / "onnx", model_name="nano")
    app = create_app(nano, settings)
    running = run_in_thread(app)
    with httpx.Client(base_url=running.url + API, timeout=120) as client:
        yield client, app, settings, truth
    running.stop()
    app.state.engine.close()


def encode(client, name: str) -> dict:
    r = client.post("/images/from-file", json={"path": name})
    assert r.status_code == 200, r.text
    return r.json()


def test_objects_record_provenance_and_stats_sum_them_up(loop_server):
    client, app, settings, truth = loop_server
    info = encode(client, "scene0.png")
    masks = truth["scene0.png"]
    rle = lambda m: {"size": list(m.shape), "counts": np.asarray(m, np.uint8).ravel(order="F").tolist()}  # noqa: E731

    def add(mask, provenance):
        body = {"image_id": info["id"], "label": "shape", "segmentation": _uncompressed(mask)}
        if provenance is not None:
            body["provenance"] = provenance
        return client.post("/annotations", json=body)

    del rle
    before = client.get("/stats").json()
    a = add(masks[0], {"stage": "assisted", "clicks": 3, "seconds": 4.5})
    assert a.status_code == 201, a.text
    assert a.json()["provenance"]["model"] == "nano"  # the served model, when the client does not say
    assert a.json()["provenance"]["stage"] == "assisted" and a.json()["provenance"]["clicks"] == 3
    b = add(masks[1], {"stage": "auto", "model": "runs/x.pth", "seconds": 1.5})
    c = add(masks[0] & ~masks[1], None)  # no provenance: manual, no model
    assert b.status_code == c.status_code == 201
    assert c.json()["provenance"]["stage"] == "manual" and c.json()["provenance"]["model"] is None
    for bad in ({"stage": "robot"}, {"clicks": -1}, {"seconds": "slow"}, {"stage": "auto", "extra": 1}):
        r = add(masks[0], bad)
        assert r.status_code == 400, (bad, r.text)

    stats = client.get("/stats", params={"image_id": info["id"]}).json()
    assert stats["images"] == 1 and stats["objects"] == 3 and stats["masks_per_image"] == 3
    assert stats["stages"]["assisted"] == {"objects": 1, "share": pytest.approx(1 / 3, abs=1e-4),
                                           "seconds_per_mask": 4.5, "clicks_per_mask": 3.0}
    assert stats["stages"]["auto"]["objects"] == 1 and stats["stages"]["manual"]["objects"] == 1
    assert stats["seconds_per_mask"] == pytest.approx(3.0)  # (4.5 + 1.5) / 2: the manual one has no time
    assert stats["models"] == {"nano": 1, "runs/x.pth": 1}
    overall = client.get("/stats").json()
    assert overall["objects"] == before["objects"] + 3

    # On disk: the provenance is in the COCO file, and a restarted store reads the same figures.
    doc = json.loads(settings.annotations_path.read_text())
    assert doc["info"]["anyseg_images_dir"] == str(settings.images_dir)
    assert {a["provenance"]["stage"] for a in doc["annotations"]} >= {"manual", "assisted", "auto"}
    assert AnnotationStore(settings.annotations_path).stats(info["id"]) == stats
    for ann in client.get("/annotations", params={"image_id": info["id"]}).json()["annotations"]:
        client.delete(f"/annotations/{ann['id']}")


def _uncompressed(mask: np.ndarray) -> dict:
    """Uncompressed COCO RLE of an ``H x W`` bool mask (column-major runs, starting with zeros)."""
    flat = np.asarray(mask, bool).ravel(order="F")
    changes = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0]:
        runs = [0] + runs
    return {"size": list(mask.shape), "counts": runs}


def test_auto_label_proposes_and_hides_what_is_accepted(loop_server):
    client, app, settings, truth = loop_server
    info = encode(client, "scene1.png")
    body = {"points_per_side": 8, "pred_iou_thresh": 0.5, "stability_score_thresh": 0.8, "format": "coco_rle"}
    r = client.post(f"/images/{info['id']}/auto-label", json=body)
    assert r.status_code == 200, r.text
    first = r.json()
    assert first["model"] == "nano" and first["hidden"] == 0 and first["proposals"]
    scores = [p["predicted_iou"] for p in first["proposals"]]
    assert scores == sorted(scores, reverse=True) and min(scores) > 0.5
    masks = [coco_rle_to_mask(p["mask"]) for p in first["proposals"]]
    assert all(m.shape == (info["height"], info["width"]) and m.sum() == p["area"]
               for m, p in zip(masks, first["proposals"]))
    # Stricter thresholds propose no more.
    strict = client.post(f"/images/{info['id']}/auto-label", json={**body, "pred_iou_thresh": 0.95}).json()
    assert len(strict["proposals"]) <= len(first["proposals"])

    # Accept the most confident proposal: the next pass hides it (and anything mostly inside it).
    accepted = masks[0]
    r = client.post("/annotations", json={"image_id": info["id"], "label": "shape",
                                          "segmentation": first["proposals"][0]["mask"],
                                          "provenance": {"stage": "auto", "model": first["model"]}})
    assert r.status_code == 201
    second = client.post(f"/images/{info['id']}/auto-label", json=body).json()
    assert second["hidden"] >= 1
    assert len(second["proposals"]) + second["hidden"] == len(first["proposals"])
    for p in second["proposals"]:
        m = coco_rle_to_mask(p["mask"])
        assert (m & accepted).sum() / m.sum() < 0.5
    # overlap_thresh 1 hides only proposals wholly inside accepted objects; the accepted one is.
    loose = client.post(f"/images/{info['id']}/auto-label", json={**body, "overlap_thresh": 1.0}).json()
    assert loose["hidden"] >= 1 and loose["hidden"] <= second["hidden"]

    for bad in ({"pred_iou_thresh": 2}, {"points_per_side": 0}, {"overlap_thresh": -0.1}, {"what": 1}):
        assert client.post(f"/images/{info['id']}/auto-label", json={**body, **bad}).status_code == 400
    assert client.post(f"/images/{'0' * 64}/auto-label", json=body).status_code == 404
    client.delete(f"/annotations/{r.json()['id']}")


def test_switch_models_while_clients_decode(loop_server):
    client, app, settings, truth = loop_server
    info = encode(client, "scene0.png")
    listed = client.get("/models").json()
    assert [m["name"] for m in listed] == ["nano", "decoder/model.pth", "encoder/model.pth"]  # no last.pt
    assert listed[0]["loaded"] and not listed[1]["loaded"] and listed[0]["img_size"] == 128
    for name, code in (("nope.pth", 404), ("../labels.json", 404), ("decoder/last.pt", 404), ("", 400)):
        assert client.post("/models/switch", json={"name": name}).status_code == code, name

    url = str(client.base_url)
    point = {"points": [[30, 30]], "labels": [1], "format": "rle", "return_logits": False}
    failures, seen, stop = [], set(), threading.Event()

    def hammer():
        with httpx.Client(base_url=url, timeout=120) as own:
            while not stop.is_set():
                for path, kind in ((f"/images/{info['id']}/decode", "decode"),
                                   (f"/images/{info['id']}/embedding", "embedding")):
                    r = own.post(path, json=point) if kind == "decode" else own.get(path)
                    if r.status_code != 200:
                        failures.append((kind, r.status_code, r.text[:200]))
                    elif kind == "decode":
                        seen.add(r.json()["model"])

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    embeddings, encodes = {}, {}
    try:
        for name in ("decoder/model.pth", "encoder/model.pth", "nano", "decoder/model.pth", "nano"):
            r = client.post("/models/switch", json={"name": name})
            assert r.status_code == 200, r.text
            assert r.json()["name"] == name and r.json()["loaded"]
            assert client.get("/health").json()["model"] == name
            embeddings[name] = np.frombuffer(client.get(f"/images/{info['id']}/embedding").content, "<f4")
            encodes[name] = client.get("/health").json()["encodes"]
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not failures, failures[:3]
    assert {"nano", "decoder/model.pth"} <= seen  # decodes were answered by both models
    # A decoder-only change keeps the cached embedding; a new encoder encodes the image again.
    assert np.array_equal(embeddings["decoder/model.pth"], embeddings["nano"])
    assert not np.array_equal(embeddings["encoder/model.pth"], embeddings["nano"])
    # Objects record the model that made them.
    mask = truth["scene0.png"][0]
    r = client.post("/annotations", json={"image_id": info["id"], "label": "x", "segmentation": _uncompressed(mask),
                                          "provenance": {"stage": "assisted", "clicks": 1}})
    assert r.json()["provenance"]["model"] == "nano"
    client.post("/models/switch", json={"name": "decoder/model.pth"})
    r2 = client.post("/annotations", json={"image_id": info["id"], "label": "x", "segmentation": _uncompressed(mask),
                                           "provenance": {"stage": "assisted", "clicks": 1}})
    assert r2.json()["provenance"]["model"] == "decoder/model.pth"
    # The page's decoder graphs follow the switch: exported for the new weights.
    app.state.decoder.wait(timeout=240)
    after = client.get("/decoder").json()
    if after["status"] == "ready":
        graph_now = client.get("/decoder.onnx").content
        client.post("/models/switch", json={"name": "nano"})
        app.state.decoder.wait(timeout=240)
        assert client.get("/decoder.onnx").content != graph_now
    else:
        assert "onnx" in after["reason"].lower() or "export" in after["reason"].lower()
    client.post("/models/switch", json={"name": "nano"})
    for ann_id in (r.json()["id"], r2.json()["id"]):
        client.delete(f"/annotations/{ann_id}")


def test_train_data_from_the_app_annotation_file(loop_server, tmp_path):
    client, app, settings, truth = loop_server
    info = encode(client, "scene1.png")
    ids = []
    for mask in truth["scene1.png"]:
        r = client.post("/annotations", json={"image_id": info["id"], "label": "shape",
                                              "segmentation": _uncompressed(mask)})
        ids.append(r.json()["id"])
    # An upload that is not in the folder is left out, with a warning.
    buffer = io.BytesIO()
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(buffer, format="PNG")
    up = client.post("/images", files={"file": ("upload.png", buffer.getvalue(), "image/png")}).json()
    r = client.post("/annotations", json={"image_id": up["id"], "label": "x",
                                          "segmentation": _uncompressed(np.ones((20, 30), bool))})
    ids.append(r.json()["id"])
    with pytest.warns(UserWarning, match="upload.png"):
        data = open_dataset(f"coco:{settings.annotations_path}")
    names = [im["file_name"] for im in data.images]
    assert "scene1.png" in names and "upload.png" not in names
    sample = data[names.index("scene1.png")]
    assert np.array_equal(sample.masks, truth["scene1.png"])
    # Without the folder recorded, and without --images, the error says what to give.
    bare = tmp_path / "bare.json"
    doc = json.loads(settings.annotations_path.read_text())
    doc["info"].pop("anyseg_images_dir")
    bare.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="--images"):
        open_dataset(f"coco:{bare}")
    with pytest.warns(UserWarning, match="upload.png"):
        assert len(open_dataset(f"coco:{bare}", images=str(settings.images_dir))) >= 1
    with pytest.raises(FileNotFoundError):
        open_dataset(f"coco:{tmp_path / 'missing.json'}")
    for ann_id in ids:
        client.delete(f"/annotations/{ann_id}")
