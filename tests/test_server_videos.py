"""Video API (/api/v1/videos) over real HTTP: uvicorn on 127.0.0.1.

Two tiers:
* the golden SAM 2.1 model on 2-3 frames of ../shared/golden/sam2/clip (slow): masks of clicks and of the
  streamed propagation equal those of SAM2VideoPredictor for the same calls, correction and re-propagation,
  export, two sessions propagating at once, a session deleted while it propagates;
* a stand-in predictor (fast): the HTTP mechanics (paths, errors, limits, stream order, cancel, DELETE and
  disconnect mid-stream, concurrency) without model cost; and a SAM 1 model, which has no video API.
"""
from __future__ import annotations

import base64
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import GOLDEN, _require

pytest.importorskip("fastapi", reason="the server extra is not installed (pip install 'anyseg[server]')")
pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install 'anyseg[server]')")
httpx = pytest.importorskip("httpx", reason="the tests talk to the server with httpx (pip install httpx)")
av = pytest.importorskip("av", reason="the video tests need PyAV (pip install 'anyseg[video]')")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from anyseg.masks import coco_rle_to_mask  # noqa: E402
from anyseg.server import ServerSettings, create_app, run_in_thread  # noqa: E402
from anyseg.server.videos import VideoSettings  # noqa: E402

SAM2 = GOLDEN / "sam2"
CLIP = SAM2 / "clip"
API = "/api/v1"


# ------------------------------------------------------------------------------------------ helpers
def write_mp4(path: Path, frames) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def synthetic_frames(n: int, h: int = 48, w: int = 64):
    out = []
    for i in range(n):
        img = np.full((h, w, 3), 40, np.uint8)
        img[10:30, 8 + 4 * i:28 + 4 * i] = (230, 60, 40)
        out.append(img)
    return out


def start_server(model, images_dir, **settings):
    app = create_app(model, ServerSettings(images_dir=images_dir, browser_decoder=False, **settings))
    running = run_in_thread(app)
    client = httpx.Client(base_url=running.url, timeout=300)
    client.app = app
    client.running = running
    return client


def stop_server(client) -> None:
    client.close()
    client.running.stop()


def expect_error(response, status: int, *words: str) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail and "Traceback" not in response.text
    for word in words:
        assert word.lower() in detail.lower(), (word, detail)
    return detail


def decode(mask_entry) -> np.ndarray:
    return coco_rle_to_mask(mask_entry["mask"])


def stream(client, video_id: str, body: dict, on_line=None):
    """POST .../propagate and read the NDJSON lines as they come; returns them all."""
    lines = []
    with client.stream("POST", f"{API}/videos/{video_id}/propagate", json=body) as r:
        if r.status_code != 200:
            r.read()
            return r
        assert r.headers["content-type"].startswith("application/x-ndjson")
        for raw in r.iter_lines():
            if raw.strip():
                item = json.loads(raw)
                lines.append(item)
                if on_line is not None:
                    on_line(item)
    return lines


def frames_of(lines):
    assert lines[-1]["type"] == "end", lines[-1]
    return [line for line in lines if line["type"] == "frame"]


def open_folder(client, path: str) -> dict:
    r = client.post(f"{API}/videos/from-file", json={"path": path})
    assert r.status_code == 200, r.text
    return r.json()


def click(client, video_id: str, **body) -> dict:
    r = client.post(f"{API}/videos/{video_id}/prompts", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def wait_until(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# ------------------------------------------------------------------------------- stand-in predictor
class FakeState:
    def __init__(self, frames) -> None:
        self.frames = frames
        self.objects = {}
        self.closed = False

    @property
    def obj_ids(self):
        return list(self.objects)

    def __getitem__(self, key):
        return {"num_frames": self.frames.num_frames, "video_height": self.frames.height,
                "video_width": self.frames.width, "obj_ids": self.obj_ids}[key]

    def close(self) -> None:
        self.closed = True
        self.frames.close()


def fake_mask(h: int, w: int, frame_idx: int, obj_id: int) -> np.ndarray:
    """Object k on frame f: a 6x6 square at x = 2f + 8k, y = 3k."""
    m = np.zeros((h, w), bool)
    x, y = 2 * frame_idx + 8 * obj_id, 3 * obj_id
    m[y:y + 6, x:x + 6] = True
    return m


class FakePredictor:
    """The SAM2VideoPredictor calls the server makes, with made-up masks and a set time per tracked frame."""

    image_size = 32

    def __init__(self) -> None:
        self.step_s = 0.0
        self.states = []
        self.tracked = []          # (frame_idx, thread name) per tracked frame
        self.lock = threading.Lock()

    def _masks(self, state, frame_idx):
        h, w = state["video_height"], state["video_width"]
        out = np.stack([fake_mask(h, w, frame_idx, o) for o in state.objects]) if state.objects else np.zeros((0, h, w))
        return torch.from_numpy(np.where(out, 5.0, -5.0).astype(np.float32))[:, None]

    def init_state(self, frames):
        state = FakeState(frames)
        self.states.append(state)
        return state

    def add_new_points_or_box(self, state, frame_idx, obj_id, points=None, labels=None, clear_old_points=True,
                              box=None):
        state.objects.setdefault(obj_id, set()).add(frame_idx)
        return frame_idx, state.obj_ids, self._masks(state, frame_idx)

    def add_new_mask(self, state, frame_idx, obj_id, mask):
        state.objects.setdefault(obj_id, set()).add(frame_idx)
        return frame_idx, state.obj_ids, self._masks(state, frame_idx)

    def clear_all_prompts_in_frame(self, state, frame_idx, obj_id):
        state.objects[obj_id].discard(frame_idx)
        return frame_idx, state.obj_ids, self._masks(state, frame_idx)

    def remove_object(self, state, obj_id):
        frames = sorted(state.objects.pop(obj_id))
        return state.obj_ids, [(f, self._masks(state, f)) for f in frames] if state.objects else []

    def reset_state(self, state):
        state.objects.clear()

    def propagate_in_video_preflight(self, state):
        for obj_id, frames in state.objects.items():
            if not frames:
                raise RuntimeError(f"No input points or masks are provided for object id {obj_id}")

    def propagate_in_video(self, state, start_frame_idx=None, max_frame_num_to_track=None, reverse=False):
        if start_frame_idx is None:
            start_frame_idx = min(f for frames in state.objects.values() for f in frames)
        n = state["num_frames"] if max_frame_num_to_track is None else max_frame_num_to_track
        if reverse:
            order = range(start_frame_idx, max(start_frame_idx - n, 0) - 1, -1) if start_frame_idx > 0 else range(0)
        else:
            order = range(start_frame_idx, min(start_frame_idx + n, state["num_frames"] - 1) + 1)
        for f in order:
            time.sleep(self.step_s)
            with self.lock:
                self.tracked.append((f, threading.current_thread().name))
            yield f, state.obj_ids, self._masks(state, f)


@pytest.fixture(scope="module")
def nano():
    import anyseg

    return anyseg.load_model("nano")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    folder = root / "served"
    (folder / "frames").mkdir(parents=True)
    for i, img in enumerate(synthetic_frames(6)):
        Image.fromarray(img).save(folder / "frames" / f"{i:05d}.jpg", quality=95)
    write_mp4(folder / "clip.mp4", synthetic_frames(3))
    (folder / "notes.txt").write_text("not a video")
    write_mp4(root / "secret.mp4", synthetic_frames(2))
    (folder / "link_out.mp4").symlink_to(root / "secret.mp4")
    (root / "outside_frames").mkdir()
    Image.fromarray(synthetic_frames(1)[0]).save(root / "outside_frames" / "00000.jpg")
    (folder / "leaky").mkdir()
    (folder / "leaky" / "00000.jpg").symlink_to(root / "outside_frames" / "00000.jpg")
    return folder


@pytest.fixture(scope="module")
def fake_server(nano, served):
    client = start_server(nano, served)
    client.fake = FakePredictor()
    videos = client.app.state.videos
    videos.use_predictor(client.fake)
    videos.settings = VideoSettings(max_sessions=3, idle_timeout_s=600.0, release_wait_s=20.0)
    yield client
    stop_server(client)


@pytest.fixture()
def fake(fake_server):
    """The stand-in server, with no session left open by an earlier test."""
    for info in fake_server.get(f"{API}/videos").json()["sessions"]:
        fake_server.delete(f"{API}/videos/{info['id']}")
    fake_server.fake.step_s = 0.0
    fake_server.app.state.videos.settings = VideoSettings(max_sessions=3, idle_timeout_s=600.0, release_wait_s=20.0)
    return fake_server


# ------------------------------------------------------------------------------------ fast: no model
def test_sam1_model_has_no_video_api(nano, served):
    client = start_server(nano, served)
    try:
        for r in (client.post(f"{API}/videos/from-file", json={"path": "clip.mp4"}),
                  client.post(f"{API}/videos", files={"file": ("a.mp4", (served / "clip.mp4").read_bytes())}),
                  client.get(f"{API}/videos"), client.get(f"{API}/videos/abc")):
            expect_error(r, 400, "video tracking needs a SAM 2 model")
        spec = client.get(f"{API}/openapi.json").json()
        for path in ("/api/v1/videos", "/api/v1/videos/from-file", "/api/v1/videos/{video_id}/prompts",
                     "/api/v1/videos/{video_id}/propagate", "/api/v1/videos/{video_id}/export"):
            assert path in spec["paths"], path
    finally:
        stop_server(client)


def test_open_from_folder_and_by_upload(fake, served):
    frames = open_folder(fake, "frames/")
    assert (frames["num_frames"], frames["width"], frames["height"]) == (6, 64, 48)
    assert frames["name"] == "frames" and frames["obj_ids"] == [] and len(frames["id"]) == 32
    mp4 = open_folder(fake, "clip.mp4")
    assert (mp4["num_frames"], mp4["width"], mp4["height"]) == (3, 64, 48)
    up = fake.post(f"{API}/videos", files={"file": ("my clip.mp4", (served / "clip.mp4").read_bytes(), "video/mp4")})
    assert up.status_code == 200, up.text
    assert (up.json()["num_frames"], up.json()["name"]) == (3, "my clip.mp4")
    listed = fake.get(f"{API}/videos").json()
    assert {s["id"] for s in listed["sessions"]} == {frames["id"], mp4["id"], up.json()["id"]}
    assert listed["max_sessions"] == 3
    # The uploaded file lives as long as its session.
    session = fake.app.state.videos.get(up.json()["id"])
    upload_dir = Path(session.upload_dir)
    assert upload_dir.is_dir()
    r = fake.delete(f"{API}/videos/{up.json()['id']}")
    assert r.json() == {"id": up.json()["id"], "deleted": True, "released": True, "stopped_propagation": False}
    assert not upload_dir.exists() and session.state.closed
    expect_error(fake.get(f"{API}/videos/{up.json()['id']}"), 404, "deleted")
    bad = fake.post(f"{API}/videos", files={"file": ("x.mp4", b"this is not a video", "video/mp4")})
    expect_error(bad, 400, "video")
    expect_error(fake.post(f"{API}/videos", files={"file": ("x.mp4", b"", "video/mp4")}), 400, "empty")


@pytest.mark.parametrize("path", ["../secret.mp4", "/etc", "link_out.mp4", "notes.txt", "frames/../../secret.mp4",
                                  "missing.mp4", "leaky", "", "~/x.mp4"])
def test_paths_outside_the_folder_are_refused(fake, path):
    r = fake.post(f"{API}/videos/from-file", json={"path": path})
    expect_error(r, 404, "no video file or JPEG-frame folder")
    assert "secret" not in r.json()["detail"].replace(path, "")


def test_prompts_stream_and_export(fake):
    info = open_folder(fake, "frames")
    vid, h, w = info["id"], info["height"], info["width"]
    first = click(fake, vid, frame_idx=1, obj_id=1, points=[[20, 10]], labels=[1])
    assert (first["frame_idx"], first["obj_ids"], first["format"]) == (1, [1], "coco_rle")
    assert np.array_equal(decode(first["masks"][0]), fake_mask(h, w, 1, 1))
    assert first["masks"][0]["area"] == 36 and first["masks"][0]["bbox"] == [10.0, 3.0, 6.0, 6.0]
    second = click(fake, vid, frame_idx=1, obj_id=2, box=[10, 5, 40, 30], format="png")
    assert second["obj_ids"] == [1, 2] and second["format"] == "png"
    png = np.asarray(Image.open(io.BytesIO(base64.b64decode(second["masks"][1]["mask"]))))
    assert np.array_equal(png > 0, fake_mask(h, w, 1, 2))
    # Mask prompts: a PNG and an RLE of the frame's size.
    buf = io.BytesIO()
    Image.fromarray(fake_mask(h, w, 3, 3).astype(np.uint8) * 255).save(buf, format="PNG")
    third = click(fake, vid, frame_idx=3, obj_id=3, mask_png=base64.b64encode(buf.getvalue()).decode())
    assert third["obj_ids"] == [1, 2, 3]
    rle = {"size": [h, w], "counts": first["masks"][0]["mask"]["counts"]}
    click(fake, vid, frame_idx=3, obj_id=3, mask_rle=rle)

    def check(lines, want_frames, direction=None):
        got = frames_of(lines)
        assert [f["frame_idx"] for f in got] == want_frames
        assert lines[-1]["status"] == "completed" and lines[-1]["frames"] == len(want_frames)
        for f in got:
            assert f["obj_ids"] == [1, 2, 3] and f["id"] == vid
            if direction:
                assert f["direction"] == direction
            for entry in f["masks"]:
                assert np.array_equal(decode(entry), fake_mask(h, w, f["frame_idx"], entry["obj_id"]))

    check(stream(fake, vid, {}), [1, 2, 3, 4, 5], "forward")
    check(stream(fake, vid, {"direction": "backward"}), [3, 2, 1, 0], "backward")
    check(stream(fake, vid, {"direction": "both", "max_frames": 2}), [1, 2, 0])
    check(stream(fake, vid, {"start_frame_idx": 4, "max_frames": 5}), [4, 5])
    check(stream(fake, vid, {"direction": "backward", "start_frame_idx": 0}), [0])
    # Tracking ran off the event loop's thread.
    assert all(not name.startswith("anyseg-server") for _, name in fake.fake.tracked)

    frame = fake.get(f"{API}/videos/{vid}/frames/2").json()
    assert frame["tracked"] and [m["obj_id"] for m in frame["masks"]] == [1, 2, 3]
    assert np.array_equal(decode(frame["masks"][1]), fake_mask(h, w, 2, 2))
    polys = fake.get(f"{API}/videos/{vid}/frames/2", params={"format": "polygons"}).json()
    assert polys["format"] == "polygons" and len(polys["masks"]) == 3
    exported = fake.get(f"{API}/videos/{vid}/export").json()
    assert exported["videos"][0]["length"] == 6 and exported["videos"][0]["file_names"][0] == "00000.jpg"
    assert exported["anyseg"]["tracked_frames"] == [[0, 5]]
    anns = {a["object_id"]: a for a in exported["annotations"]}
    assert sorted(anns) == [1, 2, 3]
    for f in range(6):
        assert np.array_equal(coco_rle_to_mask(anns[2]["segmentations"][f]), fake_mask(h, w, f, 2))

    # Clear prompts, remove an object, reset.
    cleared = fake.post(f"{API}/videos/{vid}/clear-prompts", json={"frame_idx": 1, "obj_id": 2}).json()
    assert cleared["frame_idx"] == 1 and cleared["obj_ids"] == [1, 2, 3]
    assert fake.get(f"{API}/videos/{vid}").json()["prompted_frames"] == {"1": [1], "3": [3]}
    expect_error(stream(fake, vid, {}), 400, "cannot propagate", "object id 2")
    removed = fake.delete(f"{API}/videos/{vid}/objects/2").json()
    assert removed["obj_ids"] == [1, 3] and removed["updated_frames"] == []
    exported = fake.get(f"{API}/videos/{vid}/export").json()
    assert sorted(a["object_id"] for a in exported["annotations"]) == [1, 3]
    assert fake.post(f"{API}/videos/{vid}/reset").json()["obj_ids"] == []
    assert fake.get(f"{API}/videos/{vid}/export").json()["annotations"] == []
    assert fake.get(f"{API}/videos/{vid}/frames/2").json()["tracked"] is False


def test_bad_input_says_what_was_expected(fake):
    vid = open_folder(fake, "frames")["id"]
    prompts = f"{API}/videos/{vid}/prompts"
    expect_error(fake.get(f"{API}/videos/nope"), 404, "unknown video session")
    expect_error(fake.post(f"{API}/videos/nope/prompts", json={"frame_idx": 0, "obj_id": 1, "box": [1, 1, 5, 5]}),
                 404, "unknown video session")
    expect_error(fake.post(prompts, json={"frame_idx": 6, "obj_id": 1, "points": [[1, 1]], "labels": [1]}),
                 400, "frame_idx 6 is outside the video", "0..5")
    expect_error(fake.post(prompts, json={"frame_idx": -1, "obj_id": 1, "box": [1, 1, 5, 5]}), 400, "outside")
    expect_error(fake.post(prompts, json={"frame_idx": 0, "obj_id": 1, "box": [30, 5, 10, 20]}), 400, "x0 < x1")
    expect_error(fake.post(prompts, json={"frame_idx": 0, "obj_id": 1, "box": [1, 2, 3]}), 400, "4 numbers")
    expect_error(fake.post(prompts, json={"frame_idx": 0, "obj_id": 1, "box": [0, 0, 65, 20]}), 400, "inside the 64x48")
    expect_error(fake.post(prompts, json={"frame_idx": 0, "obj_id": 1, "points": [[70, 1]], "labels": [1]}),
                 400, "inside the 64x48 frame")
    expect_error(fake.post(prompts, json={"frame_idx": 0, "obj_id": 1, "points": [[7, 1]], "labels": [2]}),
                 400, "labels must be 1")
    expect_error(fake.post(prompts, json={"frame_idx": 0, "obj_id": 1, "points": [[7, 1]]}), 400, "together")
    expect_error(fake.post(prompts, json={"frame_idx": 0, "obj_id": 1}), 400, "needs points")
    expect_error(fake.post(prompts, json={"frame_idx": 0, "obj_id": 1, "mask_rle": {"size": [4, 4], "counts": [16]}}),
                 400, "does not match")
    small = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(small, format="PNG")
    expect_error(fake.post(prompts, json={"frame_idx": 0, "obj_id": 1,
                                          "mask_png": base64.b64encode(small.getvalue()).decode()}), 400, "64x48")
    expect_error(fake.post(prompts, json={"frame_idx": 0, "obj_id": 1, "mask_png": "@@@"}), 400, "base64")
    expect_error(fake.post(prompts, json={"frame_idx": 0, "obj_id": 1, "oops": 1, "box": [1, 1, 5, 5]}), 400, "oops")
    expect_error(stream(fake, vid, {}), 400, "nothing to track")
    click(fake, vid, frame_idx=0, obj_id=1, points=[[7, 1]], labels=[1])
    expect_error(fake.post(f"{API}/videos/{vid}/clear-prompts", json={"frame_idx": 0, "obj_id": 9}),
                 404, "unknown object id 9", "objects: 1")
    expect_error(fake.delete(f"{API}/videos/{vid}/objects/9"), 404, "unknown object id 9")
    expect_error(stream(fake, vid, {"start_frame_idx": 6}), 400, "start_frame_idx 6 is outside")
    expect_error(stream(fake, vid, {"max_frames": 0}), 400, "max_frames")
    expect_error(stream(fake, vid, {"direction": "sideways"}), 400, "direction")
    expect_error(fake.get(f"{API}/videos/{vid}/frames/6"), 400, "outside the video")
    expect_error(fake.get(f"{API}/videos/{vid}/frames/1", params={"format": "jpeg"}), 400, "format")


def test_session_limits(fake):
    videos = fake.app.state.videos
    videos.settings = VideoSettings(max_sessions=2, idle_timeout_s=600.0)
    a = open_folder(fake, "frames")["id"]
    open_folder(fake, "clip.mp4")
    expect_error(fake.post(f"{API}/videos/from-file", json={"path": "frames"}), 429,
                 "too many open video sessions: at most 2")
    # Idle sessions close by themselves; asking for one then says why it is gone.
    videos.settings = VideoSettings(max_sessions=2, idle_timeout_s=0.3)
    state = videos.get(a).state
    time.sleep(0.5)
    expect_error(fake.get(f"{API}/videos/{a}"), 404, "idle for more than 0.3 s")
    assert state.closed and fake.get(f"{API}/videos").json()["sessions"] == []
    assert open_folder(fake, "frames")["num_frames"] == 6


def test_delete_while_propagating_stops_the_stream(fake):
    fake.fake.step_s = 0.4
    vid = open_folder(fake, "frames")["id"]
    click(fake, vid, frame_idx=0, obj_id=1, points=[[7, 1]], labels=[1])
    session = fake.app.state.videos.get(vid)
    answers = {}

    def delete_after_first(item):
        if item["type"] == "frame" and "delete" not in answers:
            with httpx.Client(base_url=str(fake.base_url), timeout=60) as other:
                start = time.monotonic()
                answers["delete"] = other.delete(f"{API}/videos/{vid}")
                answers["delete_s"] = time.monotonic() - start

    lines = stream(fake, vid, {}, on_line=delete_after_first)
    assert answers["delete"].json() == {"id": vid, "deleted": True, "released": True, "stopped_propagation": True}
    assert answers["delete_s"] < 5.0
    end = lines[-1]
    assert end["type"] == "end" and end["status"] == "cancelled" and "deleted" in end["detail"]
    assert 1 <= len(frames_of(lines)) < 6
    assert session.released and session.state.closed
    with pytest.raises(RuntimeError, match="closed"):
        session.state.frames.get_rgb(0)
    expect_error(fake.get(f"{API}/videos/{vid}"), 404, "deleted")


def test_busy_session_cancel_and_disconnect(fake):
    fake.fake.step_s = 0.3
    vid = open_folder(fake, "frames")["id"]
    click(fake, vid, frame_idx=0, obj_id=1, points=[[7, 1]], labels=[1])
    seen = {}

    def during(item):
        if item["type"] == "frame" and not seen:
            with httpx.Client(base_url=str(fake.base_url), timeout=60) as other:
                seen["info"] = other.get(f"{API}/videos/{vid}").json()
                seen["click"] = other.post(f"{API}/videos/{vid}/prompts",
                                           json={"frame_idx": 2, "obj_id": 1, "points": [[7, 1]], "labels": [1]})
                seen["again"] = other.post(f"{API}/videos/{vid}/propagate", json={})
                seen["cancel"] = other.post(f"{API}/videos/{vid}/propagate/cancel").json()

    lines = stream(fake, vid, {}, on_line=during)
    assert seen["info"]["propagating"] is True
    expect_error(seen["click"], 409, "is propagating")
    expect_error(seen["again"], 409, "already propagating")
    assert seen["cancel"] == {"id": vid, "cancelled": True}
    assert lines[-1]["status"] == "cancelled" and len(frames_of(lines)) < 6
    assert fake.post(f"{API}/videos/{vid}/propagate/cancel").json()["cancelled"] is False
    click(fake, vid, frame_idx=2, obj_id=1, points=[[7, 1]], labels=[1])   # usable again

    # A client that goes away stops the tracking.
    fake.fake.tracked.clear()
    with fake.stream("POST", f"{API}/videos/{vid}/propagate", json={}) as r:
        next(r.iter_lines())
    assert wait_until(lambda: not fake.get(f"{API}/videos/{vid}").json()["propagating"], 20)
    assert len(fake.fake.tracked) < 6


def test_concurrent_sessions_with_stand_in(fake):
    fake.fake.step_s = 0.15
    ids = [open_folder(fake, "frames")["id"], open_folder(fake, "clip.mp4")["id"]]
    for vid in ids:
        click(fake, vid, frame_idx=0, obj_id=1, points=[[7, 1]], labels=[1])
    results, health = {}, []

    def run(vid):
        with httpx.Client(base_url=str(fake.base_url), timeout=60) as c:
            results[vid] = stream(c, vid, {})

    threads = [threading.Thread(target=run, args=(vid,)) for vid in ids]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        start = time.monotonic()
        assert fake.get(f"{API}/health").status_code == 200
        health.append(time.monotonic() - start)
        time.sleep(0.1)
    for t in threads:
        t.join()
    assert [f["frame_idx"] for f in frames_of(results[ids[0]])] == list(range(6))
    assert [f["frame_idx"] for f in frames_of(results[ids[1]])] == list(range(3))
    assert max(health) < 2.0


def test_stopping_the_server_releases_sessions(nano, served):
    client = start_server(nano, served)
    fake = FakePredictor()
    client.app.state.videos.use_predictor(fake)
    open_folder(client, "frames")
    stop_server(client)
    assert len(fake.states) == 1 and fake.states[0].closed


# ---------------------------------------------------------------------------- slow: the golden model
@pytest.fixture(scope="module")
def golden_server(tmp_path_factory):
    import anyseg

    _require(CLIP)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = anyseg.load_model(SAM2 / "sam2.1_golden.pt")        # image settings, as `anyseg serve` loads it
    client = start_server(model, SAM2)
    client.mp4 = tmp_path_factory.mktemp("golden-video") / "clip3.mp4"
    write_mp4(client.mp4, [np.asarray(Image.open(CLIP / f"{i:05d}.jpg").convert("RGB")) for i in range(3)])
    yield client
    stop_server(client)


@pytest.fixture(scope="module")
def reference():
    """SAM2VideoPredictor built as the reference builds it, and the calls the tests make, run once."""
    import anyseg
    from anyseg.video.predictor import SAM2VideoPredictor

    predictor = SAM2VideoPredictor(anyseg.load_model(SAM2 / "sam2.1_golden.pt", video=True))
    out = {"predictor": predictor}
    state = predictor.init_state(str(CLIP))
    out["click"] = predictor.add_new_points_or_box(state, 0, 1, points=[[288.0, 240.0]], labels=[1])[2]
    out["track"] = [(f, list(ids), m) for f, ids, m in predictor.propagate_in_video(state, max_frame_num_to_track=1)]
    out["correct"] = predictor.add_new_points_or_box(state, 1, 1, points=[[300.0, 300.0]], labels=[0],
                                                     clear_old_points=False)[2]
    out["retrack"] = [(f, list(ids), m) for f, ids, m in
                      predictor.propagate_in_video(state, start_frame_idx=0, max_frame_num_to_track=1)]
    state.close()
    return out


def same_masks(entries, logits) -> None:
    """The server's masks (COCO RLE per object) equal ``logits > 0`` of the predictor."""
    want = (logits[:, 0] > 0).numpy()
    assert len(entries) == want.shape[0]
    for entry, mask in zip(entries, want):
        got = decode(entry)
        assert got.shape == mask.shape
        assert np.array_equal(got, mask), f"object {entry['obj_id']}: {int((got != mask).sum())} pixels differ"


@pytest.mark.slow
@pytest.mark.golden
def test_golden_click_propagate_correct_export(golden_server, reference):
    client = golden_server
    info = open_folder(client, "clip")
    vid = info["id"]
    assert (info["num_frames"], info["width"], info["height"]) == (8, 640, 480)
    first = click(client, vid, frame_idx=0, obj_id=1, points=[[288, 240]], labels=[1])
    same_masks(first["masks"], reference["click"])
    assert first["masks"][0]["area"] > 1000

    lines = stream(client, vid, {"max_frames": 2})
    got = frames_of(lines)
    assert [f["frame_idx"] for f in got] == [f for f, _, _ in reference["track"]] == [0, 1]
    for line, (_, ids, masks) in zip(got, reference["track"]):
        assert line["obj_ids"] == ids == [1]
        same_masks(line["masks"], masks)

    corrected = click(client, vid, frame_idx=1, obj_id=1, points=[[300, 300]], labels=[0], clear_old_points=False)
    same_masks(corrected["masks"], reference["correct"])
    again = frames_of(stream(client, vid, {"start_frame_idx": 0, "max_frames": 2}))
    assert [f["frame_idx"] for f in again] == [0, 1]
    for line, (_, _, masks) in zip(again, reference["retrack"]):
        same_masks(line["masks"], masks)

    exported = client.get(f"{API}/videos/{vid}/export").json()
    video = exported["videos"][0]
    assert (video["length"], video["width"], video["height"], video["name"]) == (8, 640, 480, "clip")
    assert exported["anyseg"]["tracked_frames"] == [[0, 1]]
    (ann,) = exported["annotations"]
    assert ann["object_id"] == 1 and ann["segmentations"][2:] == [None] * 6
    for f in (0, 1):
        assert np.array_equal(coco_rle_to_mask(ann["segmentations"][f]),
                              (reference["retrack"][f][2][0, 0] > 0).numpy())
    assert client.delete(f"{API}/videos/{vid}").json()["released"] is True


@pytest.mark.slow
@pytest.mark.golden
def test_golden_two_sessions_at_once(golden_server, reference):
    """A folder session and an uploaded mp4 propagate at the same time; each equals its own predictor run."""
    client = golden_server
    predictor = reference["predictor"]
    a = open_folder(client, "clip")["id"]
    up = client.post(f"{API}/videos", files={"file": ("clip3.mp4", client.mp4.read_bytes(), "video/mp4")})
    assert up.status_code == 200, up.text
    b = up.json()["id"]
    assert (up.json()["num_frames"], up.json()["width"], up.json()["height"]) == (3, 640, 480)
    click(client, a, frame_idx=0, obj_id=1, points=[[288, 240]], labels=[1])
    b_click = click(client, b, frame_idx=0, obj_id=5, box=[96, 96, 384, 360])

    results, health = {}, []

    def run(vid):
        with httpx.Client(base_url=str(client.base_url), timeout=600) as c:
            results[vid] = stream(c, vid, {"max_frames": 2})

    threads = [threading.Thread(target=run, args=(vid,)) for vid in (a, b)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        start = time.monotonic()
        assert client.get(f"{API}/videos/{a}").status_code == 200
        health.append(time.monotonic() - start)
        time.sleep(0.5)
    for t in threads:
        t.join()

    got_a = frames_of(results[a])
    assert [f["frame_idx"] for f in got_a] == [0, 1]
    for line, (_, _, masks) in zip(got_a, reference["track"]):
        same_masks(line["masks"], masks)

    state = predictor.init_state(str(client.mp4))
    try:
        want_click = predictor.add_new_points_or_box(state, 0, 5, box=[96.0, 96.0, 384.0, 360.0])[2]
        same_masks(b_click["masks"], want_click)
        want = list(predictor.propagate_in_video(state, max_frame_num_to_track=1))
    finally:
        state.close()
    got_b = frames_of(results[b])
    assert [f["frame_idx"] for f in got_b] == [f for f, _, _ in want] == [0, 1]
    for line, (_, ids, masks) in zip(got_b, want):
        assert line["obj_ids"] == list(ids) == [5]
        same_masks(line["masks"], masks)
    assert max(health) < 5.0, health   # the server answered while both tracked
    for vid in (a, b):
        assert client.delete(f"{API}/videos/{vid}").json()["released"] is True


@pytest.mark.slow
@pytest.mark.golden
def test_golden_delete_mid_propagation(golden_server):
    client = golden_server
    vid = open_folder(client, "clip")["id"]
    click(client, vid, frame_idx=0, obj_id=1, points=[[288, 240]], labels=[1])
    session = client.app.state.videos.get(vid)
    answers = {}

    def delete_after_first(item):
        if item["type"] == "frame" and "delete" not in answers:
            answers["spill"] = Path(session.state.spill.path)
            assert answers["spill"].is_dir()
            with httpx.Client(base_url=str(client.base_url), timeout=600) as other:
                answers["delete"] = other.delete(f"{API}/videos/{vid}")

    lines = stream(client, vid, {"max_frames": 4}, on_line=delete_after_first)
    assert answers["delete"].json() == {"id": vid, "deleted": True, "released": True, "stopped_propagation": True}
    assert lines[-1]["type"] == "end" and lines[-1]["status"] == "cancelled"
    assert 1 <= len(frames_of(lines)) <= 2     # the frame in progress when DELETE came may still be sent
    assert session.released and not answers["spill"].exists()
    with pytest.raises(RuntimeError, match="closed"):
        session.state.frames.get_rgb(0)
    expect_error(client.get(f"{API}/videos/{vid}"), 404, "deleted")
    assert client.get(f"{API}/health").status_code == 200
