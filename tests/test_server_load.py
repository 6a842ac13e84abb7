"""``anyseg serve`` as a real process on 127.0.0.1: concurrent clients, the cache bound, and a crash.

Traffic stays on the loopback interface, and every loop is bounded in requests and in time.
"""
from __future__ import annotations

import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed (pip install 'anyseg[server]')")
pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install 'anyseg[server]')")
httpx = pytest.importorskip("httpx", reason="the tests talk to the server with httpx (pip install httpx)")

from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLIENTS = 16
DECODES_PER_CLIENT = 2
CACHE_MB = 13  # three 4 MiB embeddings (+ small images) fit; a fourth evicts one
MiB = 1024 * 1024


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(seed: int, h: int = 48, w: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    img = np.repeat(np.repeat(rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8), 8, 0), 8, 1)
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, format="PNG")
    return buffer.getvalue()


def box_rle(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> dict:
    mask = np.zeros((h, w), bool)
    mask[y0:y1, x0:x1] = True
    flat = mask.T.reshape(-1)  # column-major
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate(([0], changes, [flat.size]))).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"size": [h, w], "counts": counts}


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found")


class ServerProcess:
    def __init__(self, model: Path, annotations: Path, home: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "ANYSEG_HOME": str(home), "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        self.log = open(home / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "anyseg", "serve", "--model", str(model), "--port", str(self.port),
             "--annotations", str(annotations), "--cache-mb", str(CACHE_MB), "--no-browser-decoder",
             "--log-level", "warning"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=str(home),
        )
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {self.read_log()}")
            try:
                if httpx.get(f"{self.url}/api/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"the server did not start within 120 s: {self.read_log()}")
            time.sleep(0.2)

    def read_log(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-3000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self.log.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("load")


@pytest.fixture(scope="module")
def checkpoint(golden_dir):
    return golden_dir / "mobilesam_checkpoint.pth"


@pytest.fixture(scope="module")
def server(checkpoint, workdir):
    proc = ServerProcess(checkpoint, workdir / "labels.json", workdir)
    yield proc
    proc.kill()


def test_sixteen_concurrent_clients_within_the_cache_bound(server):
    images = [png(seed) for seed in range(3)]
    # Warm up (first encode and decode allocate the model's working memory), then measure.
    with httpx.Client(base_url=server.url, timeout=120) as c:
        first = c.post("/api/v1/images", files={"file": ("img0.png", images[0], "image/png")}).json()["id"]
        assert c.post(f"/api/v1/images/{first}/decode", json={"box": [1, 1, 30, 30]}).status_code == 200
    rss_before = rss_bytes(server.proc.pid)
    deadline = time.monotonic() + 240

    def client(i: int):
        failures = []
        rng = random.Random(i)
        with httpx.Client(base_url=server.url, timeout=120) as c:
            r = c.post("/api/v1/images", files={"file": (f"img{i % 3}.png", images[i % 3], "image/png")})
            if r.status_code != 200:
                return [f"encode {r.status_code} {r.text[:200]}"], 1
            image_id = r.json()["id"]
            for _ in range(DECODES_PER_CLIENT):
                if time.monotonic() > deadline:
                    failures.append("out of time")
                    break
                body = {"points": [[rng.uniform(0, 63), rng.uniform(0, 47)]], "labels": [1], "format": "coco_rle"}
                r = c.post(f"/api/v1/images/{image_id}/decode", json=body)
                if r.status_code != 200 or len(r.json()["masks"]) != 3:
                    failures.append(f"decode {r.status_code} {r.text[:200]}")
        return failures, 1 + DECODES_PER_CLIENT

    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(client, range(CLIENTS)))
    elapsed = time.perf_counter() - start
    failures = [f for fs, _ in results for f in fs]
    requests = sum(n for _, n in results)
    health = httpx.get(f"{server.url}/api/v1/health", timeout=30).json()
    rss_after = rss_bytes(server.proc.pid)
    print(f"\n{CLIENTS} clients, {requests} requests in {elapsed:.1f} s ({requests / elapsed:.1f} req/s); "
          f"encodes {health['encodes']}; cache {health['cache']['bytes'] / MiB:.1f} of {CACHE_MB} MiB; "
          f"server RSS {rss_before / MiB:.0f} -> {rss_after / MiB:.0f} MiB")
    assert not failures, failures[:5]
    assert requests == CLIENTS * (1 + DECODES_PER_CLIENT)
    assert health["encodes"] == 3  # concurrent uploads of one image are encoded once
    assert health["cache"]["entries"] == 3 and health["cache"]["bytes"] <= CACHE_MB * MiB
    # Memory grows by the cache plus the decoder's working buffers, not with the number of requests.
    assert rss_after - rss_before <= CACHE_MB * MiB + 150 * MiB


def test_killed_server_keeps_every_accepted_object(server, checkpoint, workdir):
    labels_path = workdir / "labels.json"
    # An image this server has encoded already (the load test ran first), or a new one.
    r = httpx.post(f"{server.url}/api/v1/images", files={"file": ("img1.png", png(1), "image/png")}, timeout=120)
    assert r.status_code == 200, r.text
    image_id = r.json()["id"]
    acknowledged = []
    lock = threading.Lock()
    stop = threading.Event()

    def writer(k: int):
        with httpx.Client(base_url=server.url, timeout=30) as c:
            for n in range(40):  # bounded; the kill normally ends it sooner
                if stop.is_set():
                    return
                body = {"image_id": image_id, "label": f"thing{k}", "segmentation": box_rle(48, 64, 2 + n % 20, 30, 3 + k, 40)}
                try:
                    r = c.post("/api/v1/annotations", json=body)
                except httpx.TransportError:
                    return  # the server is gone
                if r.status_code == 201:
                    with lock:
                        acknowledged.append(r.json()["id"])

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 12 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.proc.send_signal(signal.SIGKILL)  # no shutdown handler runs
    server.proc.wait(30)
    stop.set()
    for t in threads:
        t.join(60)
    assert len(acknowledged) >= 12

    doc = json.loads(labels_path.read_text())  # a complete JSON document, not a torn write
    saved = {a["id"] for a in doc["annotations"]}
    assert set(acknowledged) <= saved

    restarted = ServerProcess(checkpoint, labels_path, workdir)
    try:
        listed = httpx.get(f"{restarted.url}/api/v1/annotations", params={"image_id": image_id}, timeout=30).json()
        assert set(acknowledged) <= {a["id"] for a in listed["annotations"]}
        everything = httpx.get(f"{restarted.url}/api/v1/annotations", timeout=30).json()["annotations"]
        assert {a["id"] for a in everything} == saved
    finally:
        restarted.kill()
    print(f"\n{len(acknowledged)} objects acknowledged before the kill, {len(saved)} in the file, all back after restart")
