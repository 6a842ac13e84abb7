"""Checkpoint registry, cache resolution and verified downloads, against a local HTTP server."""
from __future__ import annotations

import hashlib
import http.server
import os
import threading
from pathlib import Path

import pytest

from anyseg import hub

PAYLOAD = bytes(range(256)) * 4099 + b"tail"  # > 1 MiB so the body arrives in several reads
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    # Filled in by the fixture: path -> (mode, body); mode is "ok" or "truncate".
    routes: dict = {}
    counts: dict = {}

    def do_GET(self):  # noqa: N802 (http.server naming)
        type(self).counts[self.path] = type(self).counts.get(self.path, 0) + 1
        route = type(self).routes.get(self.path)
        if route is None:
            self.send_error(404, "Not Found")
            return
        mode, body = route
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if mode == "truncate":
            # Promise more than is sent, then hang up mid-body.
            self.send_header("Content-Length", str(len(body) * 2))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            self.close_connection = True
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep test output clean
        pass


class Server:
    def __init__(self, httpd, handler):
        self.httpd = httpd
        self.handler = handler
        self.base = f"http://127.0.0.1:{httpd.server_address[1]}"

    def serve(self, path: str, body: bytes, mode: str = "ok") -> str:
        self.handler.routes[path] = (mode, body)
        return self.base + path

    def count(self, path: str) -> int:
        return self.handler.counts.get(path, 0)


@pytest.fixture
def server(monkeypatch):
    # Never route the loopback server through a proxy configured in the environment.
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    handler = type("Handler", (_Handler,), {"routes": {}, "counts": {}})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield Server(httpd, handler)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("ANYSEG_HOME", str(tmp_path))
    monkeypatch.delenv("ANYSEG_OFFLINE", raising=False)
    return tmp_path


@pytest.fixture
def register():
    """Register test checkpoints; remove them again after the test."""
    added = []

    def _register(info, **kw):
        hub.register_checkpoint(info, **kw)
        added.append(info.name)
        return info

    yield _register
    for name in added:
        hub.unregister_checkpoint(name)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".part" in p.name) if directory.exists() else []


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# --------------------------------------------------------------------------------------- downloads


def test_resolve_downloads_to_cache(server, home, register):
    url = server.serve("/w/test_ok.pth", PAYLOAD)
    register(hub.CheckpointInfo("test_ok", "test_ok.pth", url, sha256=PAYLOAD_SHA, size_bytes=len(PAYLOAD)))

    path = hub.resolve_checkpoint("test_ok", progress=False)

    assert path == home / "checkpoints" / "test_ok.pth"
    assert path.read_bytes() == PAYLOAD
    assert _leftovers(path.parent) == []
    assert _files(path.parent) == ["test_ok.pth", "test_ok.pth.sha256"]


def test_cached_file_reused_without_request_or_rehash(server, home, register, monkeypatch):
    url = server.serve("/w/cached.pth", PAYLOAD)
    register(hub.CheckpointInfo("test_cached", "cached.pth", url, sha256=PAYLOAD_SHA, size_bytes=len(PAYLOAD)))

    first = hub.resolve_checkpoint("test_cached", progress=False)
    assert server.count("/w/cached.pth") == 1

    def no_hashing(path):
        raise AssertionError(f"{path} was hashed again although its sidecar matches")

    monkeypatch.setattr(hub, "_sha256_file", no_hashing)
    second = hub.resolve_checkpoint("test_cached", progress=False)
    assert second == first
    assert server.count("/w/cached.pth") == 1


def test_cached_file_without_sidecar_is_hashed_once(home, register):
    register(hub.CheckpointInfo("test_manual", "manual.pth", "http://127.0.0.1:9/none", sha256=PAYLOAD_SHA))
    dest = home / "checkpoints" / "manual.pth"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(PAYLOAD)

    assert hub.resolve_checkpoint("test_manual", download=False) == dest
    assert (home / "checkpoints" / "manual.pth.sha256").is_file()


def test_cached_file_with_wrong_content_is_rejected(home, register):
    register(hub.CheckpointInfo("test_bad_cache", "bad.pth", "http://127.0.0.1:9/none", sha256=PAYLOAD_SHA))
    dest = home / "checkpoints" / "bad.pth"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"not the checkpoint")

    with pytest.raises(ValueError, match="sha256") as err:
        hub.resolve_checkpoint("test_bad_cache", download=False)
    assert str(dest) in str(err.value)
    assert dest.read_bytes() == b"not the checkpoint"  # a user's file is never deleted behind their back


def test_cached_file_with_wrong_size_is_rejected(home, register):
    register(hub.CheckpointInfo("test_short", "short.pth", "http://127.0.0.1:9/none", size_bytes=len(PAYLOAD)))
    dest = home / "checkpoints" / "short.pth"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(PAYLOAD[:100])

    with pytest.raises(ValueError, match=f"expected {len(PAYLOAD)}"):
        hub.resolve_checkpoint("test_short", download=False)


def test_sha256_mismatch_leaves_nothing(server, home):
    url = server.serve("/w/mismatch.pth", PAYLOAD)
    dest = home / "checkpoints" / "mismatch.pth"
    wrong = "0" * 64

    with pytest.raises(ValueError) as err:
        hub.download(url, dest, sha256=wrong, progress=False)

    assert wrong in str(err.value) and PAYLOAD_SHA in str(err.value)
    assert not dest.exists()
    assert _files(dest.parent) == []


def test_prefix_verification(server, home):
    url = server.serve("/w/prefix.pth", PAYLOAD)
    dest = home / "checkpoints" / "prefix.pth"

    assert hub.download(url, dest, sha256_prefix=PAYLOAD_SHA[:6].upper(), progress=False) == dest
    assert dest.read_bytes() == PAYLOAD

    wrong_prefix = "ffffff" if not PAYLOAD_SHA.startswith("ffffff") else "000000"
    dest2 = home / "checkpoints" / "prefix2.pth"
    with pytest.raises(ValueError, match=wrong_prefix):
        hub.download(url, dest2, sha256_prefix=wrong_prefix, progress=False)
    assert not dest2.exists()
    assert _leftovers(dest.parent) == []


def test_prefix_only_registry_entry(server, home, register):
    url = server.serve("/w/pfx_entry.pth", PAYLOAD)
    register(hub.CheckpointInfo("test_pfx", "pfx_entry.pth", url, sha256_prefix=PAYLOAD_SHA[:6]))
    path = hub.resolve_checkpoint("test_pfx", progress=False)
    assert path.read_bytes() == PAYLOAD


def test_http_404_is_clear_and_leaves_nothing(server, home):
    url = server.base + "/w/missing.pth"
    dest = home / "checkpoints" / "missing.pth"

    with pytest.raises(ConnectionError) as err:
        hub.download(url, dest, progress=False)

    message = str(err.value)
    assert "404" in message and url in message and str(dest) in message
    assert _files(dest.parent) == []


def test_connection_dropped_mid_body_leaves_nothing(server, home):
    url = server.serve("/w/drop.pth", PAYLOAD, mode="truncate")
    dest = home / "checkpoints" / "drop.pth"

    with pytest.raises(ConnectionError) as err:
        hub.download(url, dest, progress=False)

    assert url in str(err.value)
    assert _files(dest.parent) == []


def test_unreachable_server_is_an_oserror(home):
    import socket

    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.pth"
    dest = home / "checkpoints" / "x.pth"
    with pytest.raises(OSError, match="manually"):
        hub.download(url, dest, progress=False, timeout=5)
    assert _files(dest.parent) == []


def test_interrupt_removes_temp_file(server, home, monkeypatch):
    url = server.serve("/w/interrupt.pth", PAYLOAD)
    dest = home / "checkpoints" / "interrupt.pth"
    calls = {"n": 0}
    real_sha = hashlib.sha256

    class Interrupting:
        def __init__(self):
            self._h = real_sha()

        def update(self, data):
            calls["n"] += 1
            if calls["n"] == 1:
                raise KeyboardInterrupt
            self._h.update(data)

        def hexdigest(self):
            return self._h.hexdigest()

    monkeypatch.setattr(hub.hashlib, "sha256", Interrupting)
    with pytest.raises(KeyboardInterrupt):
        hub.download(url, dest, progress=False)
    assert _files(dest.parent) == []


def test_download_replaces_existing_file_atomically(server, home):
    url = server.serve("/w/replace.pth", PAYLOAD)
    dest = home / "replace.pth"
    dest.write_bytes(b"old")
    hub.download(url, dest, sha256=PAYLOAD_SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD

    with pytest.raises(ValueError):
        hub.download(url, dest, sha256="1" * 64, progress=False)
    assert dest.read_bytes() == PAYLOAD  # a failed download never touches the existing file


# ----------------------------------------------------------------------------- offline / names


def test_offline_missing_checkpoint_says_where_to_put_it(home, monkeypatch):
    monkeypatch.setenv("ANYSEG_OFFLINE", "1")
    info = hub.REGISTRY["vit_b"]

    with pytest.raises(FileNotFoundError) as err:
        hub.resolve_checkpoint("vit_b")

    message = str(err.value)
    assert str(home / "checkpoints" / "sam_vit_b_01ec64.pth") in message
    assert info.url in message
    assert "ANYSEG_HOME" in message
    assert not (home / "checkpoints" / "sam_vit_b_01ec64.pth").exists()


def test_download_false_missing_checkpoint(home):
    with pytest.raises(FileNotFoundError, match="mobile_sam.pt"):
        hub.resolve_checkpoint("mobilesam", download=False)


def test_unknown_name_lists_known_names(home):
    with pytest.raises(ValueError) as err:
        hub.resolve_checkpoint("vit_gigantic")
    message = str(err.value)
    assert "vit_gigantic" in message
    for name in ("vit_b", "vit_l", "vit_h", "vit_t"):
        assert name in message


def test_existing_local_path_returned_unchanged(tmp_path, monkeypatch):
    ckpt = tmp_path / "my weights.pth"
    ckpt.write_bytes(b"x")
    assert hub.resolve_checkpoint(str(ckpt)) == ckpt
    assert hub.resolve_checkpoint(ckpt) == ckpt
    monkeypatch.chdir(tmp_path)
    assert hub.resolve_checkpoint("my weights.pth") == Path("my weights.pth")


@pytest.mark.parametrize("missing", ["does/not/exist.pth", "nothing_here.pt", "weights.safetensors", "a/b"])
def test_missing_local_path_raises(tmp_path, monkeypatch, missing):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
        hub.resolve_checkpoint(missing)
    with pytest.raises(FileNotFoundError):
        hub.resolve_checkpoint(tmp_path / missing)


def test_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ANYSEG_HOME", str(tmp_path / "new" / "home"))
    assert hub.cache_dir() == tmp_path / "new" / "home"
    assert hub.cache_dir().is_dir()
    assert hub.checkpoints_dir() == tmp_path / "new" / "home" / "checkpoints"

    monkeypatch.delenv("ANYSEG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert hub.cache_dir() == tmp_path / "user" / ".cache" / "anyseg"


def test_aliases():
    assert hub.get_checkpoint_info("default").name == "vit_h"
    assert hub.get_checkpoint_info("sam_vit_h").name == "vit_h"
    assert hub.get_checkpoint_info("VIT-H").name == "vit_h"
    assert hub.get_checkpoint_info("mobilesam").name == "vit_t"
    assert hub.get_checkpoint_info("mobile_sam").name == "vit_t"


def test_register_rejects_duplicates(register):
    info = register(hub.CheckpointInfo("test_dup", "dup.pth", "http://127.0.0.1:9/dup.pth"), aliases=["test_dup2"])
    assert hub.get_checkpoint_info("test_dup2") is info
    with pytest.raises(ValueError, match="already registered"):
        hub.register_checkpoint(hub.CheckpointInfo("test_dup", "other.pth", "http://127.0.0.1:9/o"))
    with pytest.raises(ValueError, match="already registered"):
        hub.register_checkpoint(hub.CheckpointInfo("vit_b", "other.pth", "http://127.0.0.1:9/o"))
    newer = hub.CheckpointInfo("test_dup", "newer.pth", "http://127.0.0.1:9/n")
    hub.register_checkpoint(newer, overwrite=True)
    assert hub.REGISTRY["test_dup"] is newer
    with pytest.raises(TypeError):
        hub.REGISTRY["x"] = newer  # the public view is read-only


def test_checkpoint_info_validates_digests():
    with pytest.raises(ValueError):
        hub.CheckpointInfo("x", "x.pth", "http://h/x.pth", sha256="abc")
    with pytest.raises(ValueError):
        hub.CheckpointInfo("x", "x.pth", "http://h/x.pth", sha256_prefix="xyz")
    info = hub.CheckpointInfo("x", "x.pth", "http://h/x.pth", sha256="A" * 64)
    assert info.sha256 == "a" * 64


# --------------------------------------------------------------------------------- the registry

# Published sha256 digests and sizes of the official files.
PUBLIC = {
    "vit_h": (
        "sam_vit_h_4b8939.pth",
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        2564550879,
    ),
    "vit_l": (
        "sam_vit_l_0b3195.pth",
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        1249524607,
    ),
    "vit_b": (
        "sam_vit_b_01ec64.pth",
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        375042383,
    ),
    "vit_t": (
        "mobile_sam.pt",
        "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
        "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
        40728226,
    ),
}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_registry_public_entries(name):
    filename, url, sha, size = PUBLIC[name]
    info = hub.REGISTRY[name]
    assert info.name == name
    assert info.filename == filename
    assert info.url == url
    assert url.endswith("/" + filename)
    assert info.sha256 == sha
    assert info.size_bytes == size


def test_registry_digests_are_not_the_filename_hex():
    # The hex in SAM file names is not a sha256 prefix of the file, so it must not be used to verify.
    for name in ("vit_h", "vit_l", "vit_b"):
        info = hub.REGISTRY[name]
        assert info.sha256 is not None and info.sha256_prefix is None
        assert not info.sha256.startswith(info.filename.rsplit("_", 1)[1][:6])


def test_import_does_not_load_tqdm():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    code = "import sys, anyseg.hub; print('tqdm' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root, env=env)
    assert out.stdout.strip() == "False"


def test_medsam_is_registered_for_placing_by_hand(home, monkeypatch):
    """MedSAM has no fixed download address: a missing file says where to get it and where to save it,
    even when downloads are allowed (nothing is fetched); a file put there by hand is used."""
    info = hub.REGISTRY["medsam_vit_b"]
    assert info.manual and info.filename == "medsam_vit_b.pth" and "bowang-lab/MedSAM" in info.url
    monkeypatch.delenv("ANYSEG_OFFLINE", raising=False)
    dest = hub.checkpoints_dir() / "medsam_vit_b.pth"
    with pytest.raises(FileNotFoundError) as err:
        hub.resolve_checkpoint("medsam_vit_b", download=True)
    assert str(dest) in str(err.value) and info.url in str(err.value)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(b"placed by hand")
    assert hub.resolve_checkpoint("medsam_vit_b") == dest
