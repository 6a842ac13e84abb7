"""The HTTP API's contract: the OpenAPI document says exactly what the server answers.

Unit tests pin the rules of :mod:`anyseg.server.contract` (declared error answers, security only with a
token, 405 answers whose ``Allow`` is the document's); ``test_fuzz_live_server`` runs the schemathesis
fuzzer against a live server over real HTTP, with and without a token, bounded in examples and time.
"""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed (pip install 'anyseg[server]')")
pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install 'anyseg[server]')")
httpx = pytest.importorskip("httpx", reason="the tests talk to the server with httpx (pip install httpx)")

from PIL import Image  # noqa: E402

from anyseg.server import ServerSettings, create_app, run_in_thread  # noqa: E402

API = "/api/v1"
TOKEN = "contract-token"
MiB = 1024 * 1024
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def nano():
    import torch

    import anyseg

    torch.set_num_threads(1)
    return anyseg.load_model("nano")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract-images")
    rng = np.random.default_rng(0)
    (root / "sub").mkdir()
    for name, (h, w) in {"a.png": (48, 64), "sub/b.png": (40, 40)}.items():
        img = np.full((h, w, 3), 30, np.uint8)
        img[h // 4: h // 2, w // 4: w // 2] = rng.integers(100, 255, 3)
        (root / name).write_bytes(png_bytes(img))
    return root


def start(model, folder, tmp_path, token=None):
    settings = ServerSettings(images_dir=folder, annotations_path=tmp_path / "labels.json", token=token,
                              browser_decoder=False, cache_bytes=64 * MiB, max_request_bytes=4 * MiB,
                              max_everything_points_per_side=8, model_name="nano")
    running = run_in_thread(create_app(model, settings))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    client = httpx.Client(base_url=running.url, timeout=120, headers=headers)
    client.running = running
    return client


@pytest.fixture(scope="module")
def open_server(nano, folder, tmp_path_factory):
    client = start(nano, folder, tmp_path_factory.mktemp("open"))
    yield client
    client.close()
    client.running.stop()


@pytest.fixture(scope="module")
def token_server(nano, folder, tmp_path_factory):
    client = start(nano, folder, tmp_path_factory.mktemp("token"), token=TOKEN)
    yield client
    client.close()
    client.running.stop()


def spec_of(client) -> dict:
    r = client.get(f"{API}/openapi.json")
    assert r.status_code == 200
    return r.json()


def operations(spec):
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method.upper() in METHODS:
                yield path, method, op


def expect_error(response, status: int) -> dict:
    assert response.status_code == status, (response.request.method, response.request.url, response.text)
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert isinstance(body["detail"], str) and body["detail"]
    return body


# ---------------------------------------------------------------------------------------- security
def test_no_security_declared_without_a_token(open_server):
    spec = spec_of(open_server)
    assert "securitySchemes" not in spec.get("components", {})
    assert "security" not in spec
    for path, method, op in operations(spec):
        assert "security" not in op, (method, path)
        assert "401" not in op["responses"], (method, path)
    assert open_server.get(f"{API}/models").status_code == 200   # and indeed no token is needed


def test_bearer_required_and_401_declared_with_a_token(token_server):
    spec = spec_of(token_server)
    assert spec["components"]["securitySchemes"] == {
        "HTTPBearer": {"type": "http", "scheme": "bearer", "description": "the --token given to anyseg serve"}}
    for path, method, op in operations(spec):
        if path == f"{API}/health":
            assert "security" not in op and "401" not in op["responses"]
            continue
        assert op["security"] == [{"HTTPBearer": []}], (method, path)
        assert "401" in op["responses"], (method, path)
    bare = httpx.get(f"{token_server.running.url}{API}/models")
    expect_error(bare, 401)
    assert bare.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{token_server.running.url}{API}/health").status_code == 200


# ----------------------------------------------------------------------------------- status codes
def test_every_error_is_declared_with_the_error_body(open_server):
    spec = spec_of(open_server)
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    error = spec["components"]["schemas"]["ErrorResponse"]
    assert error["required"] == ["detail"] and error["properties"]["detail"]["type"] == "string"
    for path, method, op in operations(spec):
        responses = op["responses"]
        assert "422" not in responses, (method, path)   # invalid requests are answered 400
        params = op.get("parameters") or []
        if params or "requestBody" in op:
            assert "400" in responses, (method, path)
        if any(p["in"] == "path" for p in params):
            assert "404" in responses, (method, path)
        if "requestBody" in op:
            assert "413" in responses, (method, path)
        for code, response in responses.items():
            if code.startswith("4"):
                assert response["content"] == {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}, (method, path)
    health = spec["paths"][f"{API}/health"]["get"]["responses"]
    assert set(health) == {"200"}   # no input, no token: it cannot fail


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/images/0000", None), ("GET", "/images/0000/embedding", None), ("GET", "/images/0000/image.png", None),
    ("POST", "/images/0000/decode", {"points": [[1, 1]], "labels": [1]}), ("POST", "/images/0000/everything", {}),
    ("PATCH", "/annotations/999", {"label": "x"}), ("DELETE", "/annotations/999", None),
    ("GET", "/annotations/999/mask.png", None),
    ("POST", "/annotations", {"image_id": "0000", "label": "x", "segmentation": {"size": [2, 2], "counts": "04"}}),
    ("GET", "/export/masks.png?image_id=0000", None), ("GET", "/files/raw?path=nope.png", None),
    ("POST", "/images/from-file", {"path": "nope.png"}), ("GET", "/decoder.onnx", None),
    ("GET", "/decoder-cache.onnx", None),
])
def test_404_for_unknown_ids_and_files_is_declared(open_server, method, path, body):
    expect_error(open_server.request(method, API + path, json=body), 404)
    template = re.sub(r"/0000|/999", lambda m: "/{image_id}" if m.group() == "/0000" else "/{ann_id}",
                      path.split("?")[0])
    op = spec_of(open_server)["paths"][API + template][method.lower()]
    assert "404" in op["responses"]


def test_a_file_name_too_long_for_the_file_system_is_404_not_500(open_server):
    name = "x" * 300 + ".png"   # longer than a file name may be (255 bytes)
    expect_error(open_server.get(f"{API}/files/raw", params={"path": name}), 404)
    expect_error(open_server.post(f"{API}/images/from-file", json={"path": name}), 404)


def test_success_media_types_are_exact(open_server, folder):
    spec = spec_of(open_server)
    paths = spec["paths"]

    def types(path, method="get", code="200"):
        return set(paths[API + path][method]["responses"][code].get("content", {}))

    assert types("/images/{image_id}/embedding") == {"application/octet-stream"}
    assert types("/images/{image_id}/image.png") == {"image/png"}
    assert types("/annotations/{ann_id}/mask.png") == {"image/png"}
    assert types("/export/masks.png") == {"image/png"}
    assert types("/decoder.onnx") == {"application/octet-stream"}
    assert types("/videos/{video_id}/propagate", "post") == {"application/x-ndjson"}
    assert types("/health") == {"application/json"}
    assert {"image/png", "image/jpeg", "image/tiff", "image/webp"} <= types("/files/raw")
    r = open_server.get(f"{API}/files/raw", params={"path": "sub/b.png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == (folder / "sub" / "b.png").read_bytes()


# ------------------------------------------------------------------------------------ 405 and Allow
def test_allow_header_lists_exactly_the_documented_methods(open_server):
    spec = spec_of(open_server)
    for path, item in spec["paths"].items():
        documented = [m for m in METHODS if m.lower() in item]
        url = API + re.sub(r"\{[^}]+\}", "7", path[len(API):])
        for method in METHODS:
            if method in documented:
                continue
            r = open_server.request(method, url)
            assert r.status_code == 405, (method, url, r.status_code)
            assert r.headers["allow"] == ", ".join(documented), (method, url)
            if method != "HEAD":
                assert r.json()["detail"].startswith(f"method {method} is not allowed")


def test_concrete_paths_match_before_templated_ones(open_server):
    # /images/from-file is its own path (POST only), not an image id of /images/{image_id} (GET).
    r = open_server.get(f"{API}/images/from-file")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    r = open_server.get(f"{API}/videos/from-file")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    # An encoded '/' in an id would reach another route once decoded: it is refused as unknown.
    expect_error(open_server.get(f"{API}/images/abc%2Fembedding"), 404)
    expect_error(open_server.put(f"{API}/annotations/1%2F2"), 404)


def test_405_comes_before_the_token(token_server):
    r = httpx.request("OPTIONS", f"{token_server.running.url}{API}/annotations/3")
    assert r.status_code == 405 and r.headers["allow"] == "PATCH, DELETE"


def test_routes_added_later_inherit_the_contract(nano, folder):
    from fastapi.testclient import TestClient

    from fastapi import Depends

    from anyseg.server.contract import errors

    app = create_app(nano, ServerSettings(images_dir=folder, browser_decoder=False, token=TOKEN))
    auth = [Depends(app.state.require_token)]

    @app.get(f"{API}/things/{{thing_id}}", dependencies=auth, responses=errors(409))
    def get_thing(thing_id: int):
        return {"id": thing_id}

    @app.post(f"{API}/things", dependencies=auth)
    def add_thing(body: dict):
        return body

    spec = TestClient(app).get(f"{API}/openapi.json").json()
    got = spec["paths"][f"{API}/things/{{thing_id}}"]["get"]["responses"]
    assert set(got) == {"200", "400", "401", "404", "409"}
    assert set(spec["paths"][f"{API}/things"]["post"]["responses"]) == {"200", "400", "401", "413"}
    client = TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"})
    r = client.delete(f"{API}/things/3")
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    assert client.get(f"{API}/things/abc").status_code == 400


# ------------------------------------------------------------------------------------- the fuzzer
def _schemathesis(url: str, workdir, token=None, seed: int = 24) -> subprocess.CompletedProcess:
    """``schemathesis run`` on the live document: every check but positive_data_acceptance, which takes
    any schema-valid input as acceptable (an empty upload, or video calls to a SAM 1 model, are not)."""
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{url}{API}/openapi.json",
           "--checks", "all", "--exclude-checks", "positive_data_acceptance",
           "--phases", "examples,coverage,fuzzing", "--max-examples", os.environ.get("ANYSEG_FUZZ_EXAMPLES", "5"),
           "--seed", os.environ.get("ANYSEG_FUZZ_SEED", str(seed)), "--workers", "1", "--request-timeout", "60",
           "--max-failures", "20", "--generation-database", "none", "--no-color", "--output-truncate", "true"]
    if token:
        cmd += ["--header", f"Authorization: Bearer {token}"]
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "120"}
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize("token", [None, TOKEN], ids=["open", "token"])
def test_fuzz_live_server(nano, folder, tmp_path, token):
    pytest.importorskip("schemathesis", reason="the fuzzer is not installed (pip install -e '.[dev]')")
    client = start(nano, folder, tmp_path, token=token)
    try:
        # Something to find: an encoded image and an accepted object.
        info = client.post(f"{API}/images/from-file", json={"path": "a.png"})
        assert info.status_code == 200, info.text
        started = time.monotonic()
        run = _schemathesis(client.running.url, tmp_path, token)
        elapsed = time.monotonic() - started
        health = client.get(f"{API}/health")
    finally:
        client.close()
        client.running.stop()
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-20000:]
    tested = re.search(r"Tested: (\d+)", report)
    generated = re.search(r"(\d+) generated, (\d+) passed", report)
    assert tested and int(tested.group(1)) >= 30, report[-4000:]
    assert generated and generated.group(1) == generated.group(2) and int(generated.group(1)) >= 300, report[-4000:]
    assert health.status_code == 200
    print(f"schemathesis ({'token' if token else 'open'}): {generated.group(1)} requests, {elapsed:.0f} s")
