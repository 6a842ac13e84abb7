"""HTTP API over real HTTP: uvicorn on 127.0.0.1 serving the golden MobileSAM checkpoint."""
from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import threading
import time
from urllib.parse import urlparse

import numpy as np
import pytest

from conftest import mask_iou, unpack_masks

pytest.importorskip("fastapi", reason="the server extra is not installed (pip install 'anyseg[server]')")
pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install 'anyseg[server]')")
httpx = pytest.importorskip("httpx", reason="the tests talk to the server with httpx (pip install httpx)")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from anyseg.masks import coco_rle_to_mask, rle_to_mask  # noqa: E402
from anyseg.polygons import polygons_to_mask  # noqa: E402
from anyseg.server import ServerSettings, create_app, run_in_thread  # noqa: E402
from anyseg.server.annotations import AnnotationStore  # noqa: E402
from anyseg.server.cache import CacheEntry, CacheTooSmallError, EmbeddingCache  # noqa: E402

MiB = 1024 * 1024
TOKEN = "s3cret-token"


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def make_image(h: int, w: int, seed: int) -> np.ndarray:
    """A small picture with a few flat shapes, so that masks have something to follow."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), rng.integers(0, 255, 3), dtype=np.uint8)
    for _ in range(3):
        y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        img[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.integers(0, 255, 3)
    return img


@pytest.fixture(scope="module")
def model(golden_dir):
    import torch

    torch.set_num_threads(1)
    from anyseg import load_model

    return load_model(golden_dir / "mobilesam_checkpoint.pth", device="cpu")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    folder = root / "served"
    (folder / "sub").mkdir(parents=True)
    (folder / "small.png").write_bytes(png_bytes(make_image(64, 96, 1)))
    (folder / "sub" / "other.png").write_bytes(png_bytes(make_image(60, 80, 2)))
    (folder / "notes.txt").write_text("not an image")
    (root / "secret.png").write_bytes(png_bytes(np.full((8, 8, 3), 7, np.uint8)))
    (folder / "link_out.png").symlink_to(root / "secret.png")
    return folder


@pytest.fixture(scope="module")
def server(model, served, tmp_path_factory):
    work = tmp_path_factory.mktemp("server")
    settings = ServerSettings(images_dir=served, annotations_path=work / "labels.json",
                              decoder_dir=tmp_path_factory.getbasetemp() / "onnx-decoder",
                              cache_bytes=64 * MiB, max_pixels=4_000_000, max_request_bytes=8 * MiB,
                              model_name="mobilesam")
    app = create_app(model, settings)
    running = run_in_thread(app)
    client = httpx.Client(base_url=running.url, timeout=120)
    client.app = app
    client.settings = settings
    yield client
    client.close()
    running.stop()


@pytest.fixture(scope="module")
def dog(server, images_dir):
    data = (images_dir / "dog.jpg").read_bytes()
    r = server.post("/api/v1/images", files={"file": ("dog.jpg", data, "image/jpeg")})
    assert r.status_code == 200, r.text
    return {"info": r.json(), "bytes": data}


@pytest.fixture(scope="module")
def small(server):
    r = server.post("/api/v1/images/from-file", json={"path": "small.png"})
    assert r.status_code == 200, r.text
    return r.json()


def expect_error(response, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert isinstance(body["detail"], str) and body["detail"]
    assert "Traceback" not in response.text
    return body["detail"]


# ------------------------------------------------------------------------------------- basics
def test_health_models_and_openapi(server):
    health = server.get("/api/v1/health").json()
    assert health["status"] == "ok" and health["model"] == "mobilesam" and health["images_dir"] is True
    assert health["cache"]["max_bytes"] == 64 * MiB
    models = server.get("/api/v1/models").json()
    assert models[0]["embedding_shape"] == [1, 256, 64, 64] and models[0]["img_size"] == 1024
    spec = server.get("/api/v1/openapi.json").json()
    for path in ("/api/v1/images", "/api/v1/images/{image_id}/decode", "/api/v1/images/{image_id}/everything",
                 "/api/v1/images/{image_id}/embedding", "/api/v1/models", "/api/v1/health", "/api/v1/annotations"):
        assert path in spec["paths"], path
    page = server.get("/")
    assert page.status_code == 200 and "app.js" in page.text


def test_upload_is_cached_by_content_hash(server, dog):
    info = dog["info"]
    assert info["id"] == hashlib.sha256(dog["bytes"]).hexdigest()
    assert (info["width"], info["height"], info["input_width"], info["input_height"]) == (800, 534, 1024, 684)
    encodes = server.get("/api/v1/health").json()["encodes"]
    again = server.post("/api/v1/images", params={"include_embedding": "true"},
                        files={"file": ("renamed.jpg", dog["bytes"], "image/jpeg")})
    assert again.status_code == 200 and again.json()["cached"] is True and again.json()["id"] == info["id"]
    assert server.get("/api/v1/health").json()["encodes"] == encodes
    raw = server.get(f"/api/v1/images/{info['id']}/embedding")
    assert raw.headers["x-embedding-shape"] == "1,256,64,64"
    assert base64.b64decode(again.json()["embedding"]) == raw.content


def test_embedding_matches_golden(server, dog, golden_dir):
    raw = server.get(f"/api/v1/images/{dog['info']['id']}/embedding").content
    embedding = np.frombuffer(raw, dtype="<f4").reshape(1, 256, 64, 64)
    golden = np.load(golden_dir / "mobilesam_dog_predictor.npz")["image_embedding"]
    assert np.abs(embedding - golden).max() <= 1e-3


@pytest.mark.parametrize("case_name", ["point_fg_multi", "points_fg_bg", "box_only", "box_and_points", "refine"])
def test_decode_matches_golden(server, dog, golden_dir, manifest, case_name):
    cases = next(p for p in manifest["mobilesam"]["predictor"] if p["image"] == "dog.jpg")["cases"]
    case = next(c for c in cases if c["name"] == case_name)
    golden = np.load(golden_dir / "mobilesam_dog_predictor.npz")
    body = {"multimask": case["multimask_output"], "format": "coco_rle"}
    if case["point_coords"] is not None:
        body.update(points=case["point_coords"], labels=case["point_labels"])
    if case["box"] is not None:
        body["box"] = case["box"]
    if "mask_input" in case:
        body["mask_input"] = base64.b64encode(golden["refine_mask_input"].astype("<f4").tobytes()).decode()
    r = server.post(f"/api/v1/images/{dog['info']['id']}/decode", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    want_masks = unpack_masks(golden[f"{case_name}_masks_packed"], golden[f"{case_name}_masks_shape"])
    want_iou = golden[f"{case_name}_iou"]
    order = np.argsort(-want_iou, kind="stable")  # the API answers best first
    assert len(out["masks"]) == len(order)
    for got, k in zip(out["masks"], order):
        assert abs(got["score"] - float(want_iou[k])) <= 1e-3
        mask = coco_rle_to_mask(got["mask"])
        assert mask_iou(mask, want_masks[k]) >= 0.999
        assert got["area"] == int(mask.sum())
    logits = np.frombuffer(base64.b64decode(out["low_res_logits"]), "<f4").reshape(out["low_res_shape"])
    want_logits = golden[f"{case_name}_low_res_logits"][order]
    assert np.abs(logits - want_logits).max() <= 1e-2


def test_mask_formats_describe_the_same_mask(server, small):
    url = f"/api/v1/images/{small['id']}/decode"
    prompt = {"points": [[40, 30], [5, 5]], "labels": [1, 0], "multimask": False, "return_logits": False}
    results = {fmt: server.post(url, json={**prompt, "format": fmt}).json() for fmt in ("coco_rle", "rle", "png", "polygons")}
    reference = coco_rle_to_mask(results["coco_rle"]["masks"][0]["mask"])
    assert results["coco_rle"]["low_res_logits"] is None
    assert np.array_equal(rle_to_mask(results["rle"]["masks"][0]["mask"]), reference)
    png = np.array(Image.open(io.BytesIO(base64.b64decode(results["png"]["masks"][0]["mask"]))))
    assert np.array_equal(png > 127, reference)
    assert np.array_equal(polygons_to_mask(results["polygons"]["masks"][0]["mask"], reference.shape), reference)


# ----------------------------------------------------------------------------- error handling
@pytest.mark.parametrize("body, words", [
    ({"points": [[400, 267]], "labels": [5]}, "0 (background) or 1"),
    ({"points": [[400, 267]], "labels": [1, 0]}, "one label per point"),
    ({"points": [[400]], "labels": [1]}, "[x, y]"),
    ({"points": [[4000, 267]], "labels": [1]}, "inside the 800x534 image"),
    ({"box": [300, 300, 100, 100]}, "X1 >= X0"),
    ({"box": [1, 2, 3]}, "box"),
    ({}, "at least one point or a box"),
    ({"points": [[1, 1]] * 65, "labels": [1] * 65}, "at most 64 points"),
    ({"points": [[400, 267]], "labels": [1], "mask_input": "not base64!"}, "base64"),
    ({"points": [[400, 267]], "labels": [1], "mask_input": base64.b64encode(b"\0" * 16).decode()}, "256x256"),
    ({"points": [[400, 267]], "labels": [1], "format": "jpeg"}, "format"),
    ({"points": [[400, 267]], "labels": [1], "colour": "red"}, "colour"),
])
def test_bad_prompts_get_400(server, dog, body, words):
    detail = expect_error(server.post(f"/api/v1/images/{dog['info']['id']}/decode", json=body), 400)
    assert words in detail


def test_malformed_json_and_unknown_ids(server, dog):
    r = server.post(f"/api/v1/images/{dog['info']['id']}/decode", content=b"{not json",
                    headers={"content-type": "application/json"})
    expect_error(r, 400)
    assert "upload the image again" in expect_error(server.post("/api/v1/images/" + "0" * 64 + "/decode",
                                                                json={"box": [0, 0, 5, 5]}), 404)
    expect_error(server.get("/api/v1/images/abc/embedding"), 404)
    expect_error(server.post(f"/api/v1/images/{dog['info']['id']}/everything", json={"points_per_side": 0}), 400)


def test_bad_images_get_400(server, dog):
    bomb = io.BytesIO()
    Image.new("1", (3000, 3000)).save(bomb, format="PNG")  # 9 Mpx in a few kB
    cases = {
        "garbage.jpg": (b"this is not an image", "could not decode"),
        "empty.png": (b"", "empty"),
        "truncated.jpg": (dog["bytes"][: len(dog["bytes"]) // 3], "could not decode"),
        "bomb.png": (bomb.getvalue(), "max_pixels=4000000"),
    }
    for name, (data, words) in cases.items():
        detail = expect_error(server.post("/api/v1/images", files={"file": (name, data)}), 400)
        assert words in detail, (name, detail)
    expect_error(server.post("/api/v1/images", data={"nofile": "x"}), 400)
    assert server.get("/api/v1/health").json()["status"] == "ok"


# ------------------------------------------------------------------------------ served folder
def test_folder_listing_and_everything(server, small):
    files = server.get("/api/v1/files").json()["files"]
    assert files == ["small.png", "sub/other.png"]  # no text file, no link leaving the folder
    raw = server.get("/api/v1/files/raw", params={"path": "sub/other.png"})
    assert raw.status_code == 200 and np.array(Image.open(io.BytesIO(raw.content))).shape == (60, 80, 3)
    info = small
    assert (info["width"], info["height"], info["name"]) == (96, 64, "small.png")
    r = server.post(f"/api/v1/images/{info['id']}/everything",
                    json={"points_per_side": 2, "pred_iou_thresh": 0, "stability_score_thresh": 0, "format": "rle"})
    assert r.status_code == 200, r.text
    masks = r.json()["masks"]
    assert masks, "thresholds are off, so some mask must be kept"
    for m in masks:
        mask = rle_to_mask(m["mask"])
        assert mask.shape == (64, 96) and m["area"] == int(mask.sum())
    pixels = server.get(f"/api/v1/images/{info['id']}/image.png")
    assert np.array_equal(np.array(Image.open(io.BytesIO(pixels.content))), np.array(Image.open(served_file(server, "small.png"))))


def served_file(server, name):
    return server.settings.images_dir / name


@pytest.mark.parametrize("path", [
    "../secret.png", "sub/../../secret.png", "/etc/passwd", "link_out.png", "notes.txt", "missing.png", "",
    "..\\secret.png", "sub/./../../secret.png", "~/secret.png", "%2e%2e/secret.png", "a\x00.png",
])
def test_path_traversal_is_refused(server, served, path):
    absolute = str(served.parent / "secret.png")
    for p in (path, absolute):
        r = server.get("/api/v1/files/raw", params={"path": p})
        assert r.status_code in (400, 404), (p, r.status_code)
        r = server.post("/api/v1/images/from-file", json={"path": p})
        assert r.status_code in (400, 404), (p, r.status_code)


def test_raw_url_traversal_on_static_files(server):
    url = urlparse(str(server.base_url))
    for target in ("/static/../app.py", "/static/..%2fapp.py", "/static/%2e%2e/%2e%2e/settings.py", "/static//etc/passwd"):
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
        conn.request("GET", target)
        response = conn.getresponse()
        body = response.read()
        conn.close()
        assert response.status == 404, (target, response.status)
        assert b"ServerSettings" not in body and b"root:" not in body


# -------------------------------------------------------------------------------- annotations
def test_annotations_are_saved_after_every_change(server, dog):
    path = server.settings.annotations_path
    image_id = dog["info"]["id"]
    decoded = server.post(f"/api/v1/images/{image_id}/decode",
                          json={"points": [[400, 267]], "labels": [1], "format": "rle", "multimask": False}).json()
    mask = rle_to_mask(decoded["masks"][0]["mask"])
    second = np.zeros_like(mask)
    second[10:60, 20:90] = True
    first = server.post("/api/v1/annotations", json={"image_id": image_id, "label": "dog",
                                                     "segmentation": decoded["masks"][0]["mask"], "score": 0.5})
    assert first.status_code == 201, first.text
    assert json.loads(path.read_text())["annotations"][-1]["id"] == first.json()["id"]
    polygon = [[20, 10], [90, 10], [90, 60], [20, 60]]
    other = server.post("/api/v1/annotations", json={"image_id": image_id, "label": "box thing",
                                                     "segmentation": [{"exterior": polygon}]}).json()
    doc = json.loads(path.read_text())
    assert {c["name"] for c in doc["categories"]} >= {"dog", "box thing"}
    assert doc["images"][0]["file_name"] == "dog.jpg" and doc["images"][0]["anyseg_id"] == image_id
    assert np.array_equal(coco_rle_to_mask(doc["annotations"][-2]["segmentation"]), mask)
    assert np.array_equal(coco_rle_to_mask(doc["annotations"][-1]["segmentation"]), second)

    assert server.patch(f"/api/v1/annotations/{other['id']}", json={"label": "cushion"}).json()["label"] == "cushion"
    listed = server.get("/api/v1/annotations", params={"image_id": image_id}).json()
    assert listed["persistent"] is True
    assert [a["label"] for a in listed["annotations"]][-2:] == ["dog", "cushion"]

    label_map = np.array(Image.open(io.BytesIO(server.get("/api/v1/export/masks.png", params={"image_id": image_id}).content)))
    assert label_map.shape == mask.shape and set(np.unique(label_map)) <= set(range(len(listed["annotations"]) + 1))
    assert (label_map[second] == len(listed["annotations"])).all()  # the last object is drawn on top
    one = np.array(Image.open(io.BytesIO(server.get(f"/api/v1/annotations/{first.json()['id']}/mask.png").content)))
    assert np.array_equal(one > 127, mask)
    coco_poly = server.get("/api/v1/export/coco", params={"segmentation": "polygons"}).json()
    assert polygons_to_mask(coco_poly["annotations"][-1]["segmentation"], mask.shape).sum() == second.sum()
    polygons = server.get("/api/v1/export/polygons", params={"image_id": image_id}).json()
    assert polygons["images"][0]["objects"][-1]["label"] == "cushion"

    assert server.delete(f"/api/v1/annotations/{other['id']}").status_code == 204
    expect_error(server.delete(f"/api/v1/annotations/{other['id']}"), 404)
    reloaded = AnnotationStore(path)  # what a restarted server reads
    assert [a["label"] for a in reloaded.list(image_id)] == [a["label"] for a in listed["annotations"]][:-1]


def test_bad_annotations_get_400(server, dog):
    image_id = dog["info"]["id"]
    empty = {"size": [534, 800], "counts": [534 * 800]}
    for body, words in [
        ({"image_id": image_id, "label": "x", "segmentation": empty}, "empty"),
        ({"image_id": image_id, "label": "x", "segmentation": {"size": [10, 10], "counts": [100]}}, "does not match"),
        ({"image_id": image_id, "label": "x", "segmentation": {"size": [534, 800], "counts": [5, 5]}}, "sum"),
        ({"image_id": image_id, "label": "", "segmentation": empty}, "label"),
        ({"image_id": image_id, "label": "x", "segmentation": "blob"}, "segmentation"),
    ]:
        assert words in expect_error(server.post("/api/v1/annotations", json=body), 400)
    expect_error(server.post("/api/v1/annotations", json={"image_id": "f" * 64, "label": "x", "segmentation": empty}), 404)


# ----------------------------------------------------------------------- token and size limits
def test_token_and_request_limits(model, tmp_path):
    settings = ServerSettings(token=TOKEN, max_request_bytes=100_000, max_pixels=1_000_000, browser_decoder=False)
    running = run_in_thread(create_app(model, settings))
    try:
        with httpx.Client(base_url=running.url, timeout=60) as client:
            assert client.get("/api/v1/health").json()["auth"] is True
            assert "token" in expect_error(client.get("/api/v1/models"), 401)
            expect_error(client.get("/api/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
            auth = {"Authorization": f"Bearer {TOKEN}"}
            assert client.get("/api/v1/models", headers=auth).status_code == 200
            expect_error(client.post("/api/v1/images", files={"file": ("x.png", b"x" * 10)}), 401)
            big = client.post("/api/v1/images", headers=auth, files={"file": ("big.bin", b"\0" * 200_000)})
            assert "too large" in expect_error(big, 413)
            bomb = io.BytesIO()
            Image.new("L", (1200, 1000)).save(bomb, format="PNG")
            assert "max_pixels" in expect_error(client.post("/api/v1/images", headers=auth,
                                                            files={"file": ("b.png", bomb.getvalue())}), 400)
            assert client.get("/api/v1/decoder", headers=auth).json()["status"] == "unavailable"
    finally:
        running.stop()


# ---------------------------------------------------------------------------- browser decoder
def test_exported_decoder_graph_matches_server_decoding(server, dog, model):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'anyseg[onnx]')")
    pytest.importorskip("onnx", reason="onnx is not installed (pip install 'anyseg[onnx]')")
    status = server.app.state.decoder.wait(timeout=240)
    info = server.get("/api/v1/decoder").json()
    if status == "unavailable" and "not available" in info["reason"]:
        pytest.skip(f"decoder export is not available in this installation: {info['reason']}")
    assert status == "ready", info
    assert info["img_size"] == 1024 and info["mask_side"] == 256 and "orig_im_size" not in info["inputs"]
    session = ort.InferenceSession(server.get(info["url"]).content, providers=["CPUExecutionProvider"])
    cache_session = ort.InferenceSession(server.get(info["cache_url"]).content, providers=["CPUExecutionProvider"])
    # The page's graph stops at the low-res logits; the page upscales the candidates itself.
    assert [o.name for o in session.get_outputs()] == ["iou_predictions", "low_res_masks"] == list(info["outputs"])
    # The per-image graph's outputs are the decoder graphs' image inputs, by name.
    cache_outputs = [o.name for o in cache_session.get_outputs()]
    assert [i.name for i in session.get_inputs()] == list(info["inputs"])
    prompt_inputs = {"point_coords", "point_labels", "mask_input", "has_mask_input", "upscale_grid"}
    assert set(info["inputs"]) - set(cache_outputs) <= prompt_inputs
    nomask = ort.InferenceSession(server.get(info["nomask_url"]).content, providers=["CPUExecutionProvider"])
    assert [i.name for i in nomask.get_inputs()] == list(info["nomask_inputs"])
    assert set(info["nomask_inputs"]) - set(cache_outputs) <= {"point_coords", "point_labels", "upscale_grid"}
    assert [i.name for i in cache_session.get_inputs()] == list(info["cache_inputs"]) == ["image_embeddings"]
    image = dog["info"]
    embedding = np.frombuffer(server.get(f"/api/v1/images/{image['id']}/embedding").content, "<f4").reshape(1, 256, 64, 64)
    points = np.array([[400.0, 267.0], [150.0, 100.0]])
    scale = np.array([image["input_width"] / image["width"], image["input_height"] / image["height"]])
    feeds = {
        **dict(zip(cache_outputs, cache_session.run(None, {"image_embeddings": embedding}))),
        "point_coords": np.concatenate([points * scale, [[0.0, 0.0]]])[None].astype(np.float32),
        "point_labels": np.array([[1, 0, -1]], np.float32),
        "mask_input": np.zeros((1, 1, 256, 256), np.float32),
        "has_mask_input": np.zeros(1, np.float32),
    }
    served_out = server.post(f"/api/v1/images/{image['id']}/decode",
                             json={"points": points.tolist(), "labels": [1, 0], "format": "coco_rle"}).json()
    # The graph with mask inputs, and the first-click graph (whole map) as the page runs them.
    feeds["upscale_grid"] = np.zeros((64, 64), np.float32)
    first = {k: v for k, v in feeds.items() if k in info["nomask_inputs"]}
    for graph, graph_feeds in ((session, {k: v for k, v in feeds.items() if k in info["inputs"]}), (nomask, first)):
        scores, low_res = graph.run(None, graph_feeds)
        # The page upscales as the model does: to 1024 x 1024, crop to the model frame, to the image size.
        masks = model.postprocess_masks(torch.from_numpy(low_res), (image["input_height"], image["input_width"]),
                                        (image["height"], image["width"])).numpy()
        picks = [1, 2, 3] if masks.shape[1] == 4 else list(range(masks.shape[1]))
        picks.sort(key=lambda k: -scores[0, k])
        for k, got in zip(picks, served_out["masks"]):
            assert abs(float(scores[0, k]) - got["score"]) <= 1e-3
            # the default page graph is the approximate one (int8 upscaling): masks within IoU 0.98
            least = 0.98 if info["graph"] == "approximate" else 0.999
            assert mask_iou(masks[0, k] > 0, coco_rle_to_mask(got["mask"])) >= least


# ------------------------------------------------------------------------------ embedding cache
def _entry(key: str, nbytes: int) -> CacheEntry:
    return CacheEntry(key, np.zeros(nbytes // 4, np.float32), np.zeros((1, 0, 3), np.uint8), (1, 1), (1, 1))


def test_cache_is_an_lru_bounded_in_bytes():
    cache = EmbeddingCache(1000)
    for key in "abc":
        cache.put(_entry(key, 400))
    assert "a" not in cache and cache.nbytes == 800 and cache.stats()["evictions"] == 1
    assert cache.get("b") is not None  # b is now the most recent: c goes next
    cache.put(_entry("d", 400))
    assert "c" not in cache and "b" in cache and cache.nbytes <= 1000
    with pytest.raises(CacheTooSmallError, match="at most 1000 bytes"):
        cache.put(_entry("huge", 2000))
    with pytest.raises(ValueError):
        EmbeddingCache(0)


def test_cache_computes_each_key_once_under_concurrency():
    cache = EmbeddingCache(10_000)
    calls = []

    def factory(key):
        def make():
            calls.append(key)
            time.sleep(0.05)
            return _entry(key, 40)
        return make

    results = []
    threads = [threading.Thread(target=lambda k=k: results.append(cache.get_or_create(k, factory(k))))
               for k in ["x", "y"] * 8]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(calls) == ["x", "y"]
    assert sum(1 for _, cached in results if not cached) == 2 and len(results) == 16


def test_serve_command_help():
    from anyseg.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["serve", "--model", "m.pth", "--images", ".", "--token", "t"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.token == "t"
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["serve", "--help"])
    assert exc.value.code == 0
