"""Concept prompts over real HTTP: the built-in nano model decodes clicks and the golden SAM 3 checkpoint
answers ``POST /images/{id}/concept`` (every instance of a phrase and / or exemplar boxes), checked
against the golden detections of the reference; accepted objects hide the instances they cover."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed (pip install 'anyseg[server]')")
pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install 'anyseg[server]')")
httpx = pytest.importorskip("httpx", reason="the tests talk to the server with httpx (pip install httpx)")

from conftest import GOLDEN, IMAGES, _require, mask_iou, unpack_masks  # noqa: E402

pytestmark = [pytest.mark.golden, pytest.mark.slow]

API = "/api/v1"
SAM3 = GOLDEN / "sam3"


@pytest.fixture(scope="module")
def nano():
    from anyseg import load_model

    return load_model("nano", device="cpu")


def _start(nano, folder, **concept):
    from anyseg.server import ServerSettings, create_app, run_in_thread

    app = create_app(nano, ServerSettings(images_dir=folder, browser_decoder=False, model_name="nano"), **concept)
    running = run_in_thread(app)
    return app, running, httpx.Client(base_url=running.url + API, timeout=300)


@pytest.fixture(scope="module")
def server(nano, tmp_path_factory):
    from anyseg import load_model

    folder = tmp_path_factory.mktemp("sam3_server")
    (folder / "groceries.jpg").write_bytes((_require(IMAGES) / "groceries.jpg").read_bytes())
    sam3 = load_model(_require(SAM3) / "sam3_checkpoint.pt", device="cpu")
    app, running, client = _start(nano, folder, concept_model=sam3, concept_model_name="sam3_checkpoint.pt")
    info = client.post("/images/from-file", json={"path": "groceries.jpg"})
    assert info.status_code == 200, info.text
    yield client, info.json()["id"]
    client.close()
    running.stop()
    app.state.engine.close()


def _golden(case):
    golden = np.load(SAM3 / "sam3_groceries.npz")
    masks = unpack_masks(golden[f"{case}_masks_packed"], golden[f"{case}_masks_shape"])[:, 0]
    order = np.argsort(-golden[f"{case}_scores"], kind="stable")  # the server answers highest score first
    return golden[f"{case}_scores"][order], golden[f"{case}_boxes"][order], masks[order]


def _check(instances, case, phrase):
    from anyseg.masks import coco_rle_to_mask

    scores, boxes, masks = _golden(case)
    assert len(instances) == len(scores) > 0
    assert all(i["phrase"] == phrase for i in instances)
    np.testing.assert_allclose([i["score"] for i in instances], scores, atol=2e-3)
    np.testing.assert_allclose([i["box"] for i in instances], boxes, atol=1.0)
    for inst, want in zip(instances, masks):
        got = coco_rle_to_mask(inst["mask"])
        assert got.shape == want.shape and mask_iou(got, want) >= 0.999
        assert inst["area"] == int(got.sum())


def test_text_prompt_returns_every_instance_and_accepted_ones_are_hidden(server):
    client, image_id = server
    r = client.post(f"/images/{image_id}/concept", json={"text": "green vegetables. red apple"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "sam3_checkpoint.pt" and (body["width"], body["height"]) == (800, 534)
    assert body["presence"]["green vegetables"] > 0.5 and body["presence"]["red apple"] < 0.05
    assert body["hidden"] == 0
    _check(body["instances"], "text_a", "green vegetables")  # phrase B: no instance

    first = body["instances"][0]
    accepted = client.post("/annotations", json={"image_id": image_id, "label": "green vegetables",
                                                 "segmentation": first["mask"]})
    assert accepted.status_code == 201, accepted.text
    again = client.post(f"/images/{image_id}/concept", json={"text": "green vegetables"}).json()
    assert again["hidden"] == 1 and again["instances"] == []
    assert client.delete(f"/annotations/{accepted.json()['id']}").status_code in (200, 204)


def test_text_with_positive_and_negative_exemplar_boxes(server):
    client, image_id = server
    # The golden boxes [0.40, 0.45, 0.30, 0.35] (positive) and [0.72, 0.60, 0.22, 0.30] (negative), normalised
    # cx, cy, w, h, in groceries.jpg's pixels (800 x 534).
    boxes = [{"xyxy": [200, 146.85, 440, 333.75]}, {"xyxy": [488, 240.3, 664, 400.5], "positive": False}]
    r = client.post(f"/images/{image_id}/concept", json={"text": "green vegetables", "boxes": boxes})
    assert r.status_code == 200, r.text
    _check(r.json()["instances"], "text_a_pos_neg_box", "green vegetables")
    alone = client.post(f"/images/{image_id}/concept", json={"boxes": boxes[:1], "format": "png"})
    assert alone.status_code == 200 and set(alone.json()["presence"]) == {"exemplar"}


def test_bad_requests(server, nano, tmp_path):
    client, image_id = server
    for body, words in (({}, "phrase"), ({"text": " . "}, "no phrase"),
                        ({"text": "cup", "boxes": [{"xyxy": [10, 10, 5, 20]}]}, "X0 <= X1"),
                        ({"boxes": [{"xyxy": [0, 0, 900, 20]}]}, "inside"),
                        ({"text": "cup", "threshold": 2}, ""), ({"text": "cup", "extra": 1}, "")):
        r = client.post(f"/images/{image_id}/concept", json=body)
        assert r.status_code == 400 and words in r.json()["detail"], (body, r.text)
    assert client.post("/images/0000/concept", json={"text": "cup"}).status_code == 404
    op = client.get("/openapi.json").json()["paths"][f"{API}/images/{{image_id}}/concept"]["post"]
    assert {"400", "404", "413"} <= set(op["responses"]) and "422" not in op["responses"]
    assert "--concept-model" in op["responses"]["400"]["description"]

    # A server without a SAM 3 model says how to start one.
    (tmp_path / "a.png").write_bytes((IMAGES / "dog.jpg").read_bytes())
    app, running, plain = _start(nano, tmp_path)
    try:
        info = plain.post("/images/from-file", json={"path": "a.png"}).json()
        r = plain.post(f"/images/{info['id']}/concept", json={"text": "dog"})
        assert r.status_code == 400 and "--concept-model" in r.json()["detail"]
    finally:
        plain.close()
        running.stop()
        app.state.engine.close()


def test_a_sam3_model_is_not_the_click_model():
    from anyseg import load_model
    from anyseg.server import create_app

    with pytest.raises(ValueError, match="--concept-model"):
        create_app(load_model(SAM3 / "sam3_checkpoint.pt", device="cpu"))
