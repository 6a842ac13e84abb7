"""``anyseg auto --ray`` against a real local Ray cluster.

One cluster for the whole test session: ``ray start --head --block --num-cpus 2`` in a subprocess (its own
temp dir, token authentication off because it only listens for this test run), shut down at the end.
The tests connect to it in-process (``ray.init(address=...)``) or from the CLI (``--ray auto`` with
``RAY_ADDRESS``). The golden vit_small checkpoint checks that Ray and local mode write the same records;
the fault tests use the built-in nano model, which is ~20x faster on CPU.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anyseg.cli import main

if os.environ.get("CI") or os.environ.get("ANYSEG_REQUIRE_SHARED"):  # `make test` installs the ray extra
    import pyarrow.parquet as pq
    import ray
else:
    ray = pytest.importorskip("ray", reason="the Ray tests need the ray extra: pip install 'anyseg[ray]'")
    pq = pytest.importorskip("pyarrow.parquet", reason="the Ray tests need the ray extra (pyarrow)")

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
GOLDEN_ARGS = ["--points-per-side", "4", "--pred-iou-thresh", "-100", "--stability-score-thresh", "0.4",
               "--box-nms-thresh", "1", "--no-progress"]
NANO_ARGS = ["-m", "nano", *GOLDEN_ARGS, "--no-overlay"]


# ------------------------------------------------------------------------------------------ cluster
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> set:
    children: dict = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """(address, head process): a 2-CPU Ray cluster started once for the session."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the Ray cluster tests walk /proc to find and stop the cluster's processes (Linux only)")
    temp = tmp_path_factory.mktemp("ray")
    port = _free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    log = open(temp / "head.log", "wb")
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--num-cpus", "2",
         "--port", str(port), "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(temp)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while b"Ray runtime started" not in (temp / "head.log").read_bytes():
        if head.poll() is not None or time.monotonic() > deadline:
            head.kill()
            raise RuntimeError(f"ray start --head failed:\n{(temp / 'head.log').read_text()[-3000:]}")
        time.sleep(0.5)
    address = f"127.0.0.1:{port}"
    previous = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(address=address, log_to_driver=False)
    try:
        yield address, head
    finally:
        ray.shutdown()
        if previous is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = previous
        processes = _descendants(head.pid)  # actors run in their own sessions: stop them by id too
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(5)
        except subprocess.TimeoutExpired:
            pass
        for pid in processes | {head.pid}:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        head.wait()
        log.close()


def _cli_env(address: str) -> dict:
    return dict(os.environ, RAY_ADDRESS=address, RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO))


# ------------------------------------------------------------------------------------------- inputs
@pytest.fixture(scope="module")
def folder(images_dir, tmp_path_factory):
    """in/a.jpg, in/sub/b.png, in/sub/broken.jpg (corrupt): small images made here, never committed."""
    root = tmp_path_factory.mktemp("ray_in") / "in"
    (root / "sub").mkdir(parents=True)
    with Image.open(images_dir / "dog.jpg") as im:
        im.convert("RGB").resize((96, 64)).save(root / "a.jpg", quality=95)
    with Image.open(images_dir / "groceries.jpg") as im:
        im.convert("RGB").crop((300, 200, 372, 280)).save(root / "sub" / "b.png")
    (root / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"not a jpeg" * 10)
    return root


def _many(images_dir, root: Path, count: int) -> Path:
    root.mkdir(parents=True)
    with Image.open(images_dir / "groceries.jpg") as im:
        im = im.convert("RGB")
        for i in range(count):
            im.crop((40 * i, 30 * i, 40 * i + 80, 30 * i + 64)).save(root / f"img{i:02d}.png")
    return root


def _markers(out: Path) -> list:
    return sorted(p.name for p in (out / ".anyseg-auto").glob("*.done.json"))


def _check_index(out: Path, expected_files: list) -> None:
    """masks.parquet holds every finished image's masks exactly once, as in its SA-1B file."""
    table = pq.read_table(out / "masks.parquet").to_pylist()
    assert sorted({r["file_name"] for r in table}) <= sorted(expected_files)
    for name in expected_files:
        sa1b = json.loads((out / (name.rsplit(".", 1)[0] + ".json")).read_text())
        rows = [r for r in table if r["file_name"] == name]
        assert [r["mask_index"] for r in rows] == list(range(len(sa1b["annotations"]))), name
        for row, ann in zip(rows, sa1b["annotations"]):
            assert row["image_id"] == sa1b["image"]["image_id"]
            assert row["segmentation"] == {"size": ann["segmentation"]["size"],
                                           "counts": ann["segmentation"]["counts"]}
            assert row["bbox"] == pytest.approx(ann["bbox"]) and row["area"] == ann["area"]
            assert row["predicted_iou"] == pytest.approx(ann["predicted_iou"])
            assert row["stability_score"] == pytest.approx(ann["stability_score"])


def _no_temp_files(out: Path) -> None:
    assert not [p for p in out.rglob(".*.tmp-*")], "a half-written temporary file was left behind"


# -------------------------------------------------------------------------------------------- tests
def test_local_auto_never_imports_ray(tmp_path, folder):
    code = ("import sys; from anyseg.cli import main; "
            f"main(['auto', {str(folder / 'a.jpg')!r}, '-o', {str(tmp_path / 'o')!r}, '-m', 'nano', "
            "'--points-per-side', '2', '--no-progress']); "
            "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')); "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "o" / "a.json").is_file()


def test_without_ray_the_error_names_the_extra(tmp_path, folder, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    status = main(["auto", str(folder / "a.jpg"), "-o", str(tmp_path / "o"), "--ray", *NANO_ARGS])
    assert status == 2
    assert 'pip install "anyseg[ray]"' in capsys.readouterr().err


def test_bad_ray_options_say_what_was_expected(tmp_path, folder, capsys):
    with pytest.raises(SystemExit):
        main(["auto", str(folder), "-o", str(tmp_path / "o"), "--ray", "--gpus-per-worker", "-1"])
    assert "expected a number >= 0" in capsys.readouterr().err
    status = main(["auto", str(folder), "-o", "s3://bucket/out", "--ray", *NANO_ARGS])
    assert status == 2 and "not to a URI" in capsys.readouterr().err
    status = main(["auto", str(folder), "-o", str(tmp_path / "o"), "--ray", *NANO_ARGS, "-m", str(tmp_path / "x.pth")])
    assert status == 2 and "checkpoint file not found" in capsys.readouterr().err


def test_ray_matches_local_mode_on_a_golden_checkpoint(ray_cluster, folder, golden_dir, tmp_path, capsys):
    ckpt = str(golden_dir / "vit_small_checkpoint.pth")
    common = [str(folder), "-f", "sa1b,coco,png,polygons", "-m", ckpt, *GOLDEN_ARGS]
    local, scaled = tmp_path / "local", tmp_path / "ray"
    assert main(["auto", *common, "-o", str(local)]) == 1  # the corrupt file fails in both modes
    capsys.readouterr()
    assert main(["auto", *common, "-o", str(scaled), "--ray", ray_cluster[0], "--workers", "1"]) == 1
    out, err = capsys.readouterr()
    assert "2 processed, 0 skipped (already done), 1 failed" in out
    assert "failed:" in err and "broken.jpg" in err
    assert "images/s" in err and "masks/s" in err
    for name in ("a.json", "sub/b.json"):  # same records, same order
        want, got = json.loads((local / name).read_text()), json.loads((scaled / name).read_text())
        assert got["image"] == want["image"]
        assert len(got["annotations"]) == len(want["annotations"]) > 0
        for g, w in zip(got["annotations"], want["annotations"]):
            assert g["segmentation"] == w["segmentation"] and g["bbox"] == w["bbox"]
            assert g["point_coords"] == w["point_coords"] and g["crop_box"] == w["crop_box"]
            assert g["predicted_iou"] == pytest.approx(w["predicted_iou"], abs=1e-5)
            assert g["stability_score"] == pytest.approx(w["stability_score"], abs=1e-5)
    for name in ("a_labels.png", "sub/b_labels.png", "a_yolo.txt", "sub/b_polygons.json"):
        assert (scaled / name).read_bytes() == (local / name).read_bytes(), name
    coco_local = json.loads((local / "coco_instances.json").read_text())
    coco_ray = json.loads((scaled / "coco_instances.json").read_text())
    assert coco_ray["images"] == coco_local["images"]
    assert [a["segmentation"] for a in coco_ray["annotations"]] == [a["segmentation"] for a in coco_local["annotations"]]
    _check_index(scaled, ["a.jpg", "sub/b.png"])
    _no_temp_files(scaled)

    # Run again: nothing to do, same summary rules (the corrupt file is retried and fails again).
    assert main(["auto", *common, "-o", str(scaled), "--ray", ray_cluster[0]]) == 1
    assert "0 processed, 2 skipped (already done), 1 failed" in capsys.readouterr().out
    _check_index(scaled, ["a.jpg", "sub/b.png"])


def test_interrupted_cli_run_on_a_ray_start_cluster_resumes_with_each_image_once(
        ray_cluster, images_dir, tmp_path):
    """`ray start --head` (the session cluster) + `anyseg auto --ray auto`, killed mid-run, then run again."""
    address, _ = ray_cluster
    inputs = _many(images_dir, tmp_path / "in", 8)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "anyseg", "auto", str(inputs), "-o", str(out), "--ray", "auto",
           "--workers", "1", *NANO_ARGS]
    first = subprocess.Popen(cmd, env=_cli_env(address), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    deadline = time.monotonic() + 240
    while len(_markers(out)) < 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert first.poll() is None, "the first run should still be going: " + first.stdout.read().decode()[-2000:]
    done_before = len(_markers(out))
    os.killpg(first.pid, signal.SIGKILL)  # the driver dies; Ray ends its job's actors
    first.wait()
    assert done_before < 8

    second = subprocess.run(cmd, env=_cli_env(address), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    processed = int(second.stdout.split(" processed, ")[0].rsplit(" ", 1)[-1])
    skipped = int(second.stdout.split(" skipped")[0].rsplit(" ", 1)[-1])
    assert processed + skipped == 8 and skipped >= done_before and processed >= 1
    assert len(_markers(out)) == 8
    names = [f"img{i:02d}.png" for i in range(8)]
    table = pq.read_table(out / "masks.parquet").to_pylist()
    assert sorted({r["file_name"] for r in table}) == names
    _check_index(out, names)
    for name in names:
        json.loads((out / name.replace(".png", ".json")).read_text())  # every file complete
    _no_temp_files(out)


def test_a_killed_worker_is_replaced_and_nothing_is_lost_or_duplicated(ray_cluster, images_dir, tmp_path, capsys):
    """Kills one model actor process mid-run (inputs read through a pyarrow file:// URI)."""
    address, head = ray_cluster
    inputs = _many(images_dir, tmp_path / "in", 8)
    out = tmp_path / "out"
    args = ["auto", f"file://{inputs}", "-o", str(out), "--ray", address, "--workers", "1", *NANO_ARGS]
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault("status", main(args)))
    runner.start()
    killed, done_at_kill = None, None
    deadline = time.monotonic() + 240
    while runner.is_alive() and time.monotonic() < deadline and killed is None:
        if _markers(out):
            actors = [p for p in _descendants(head.pid) if "MapBatches(Segmenter)" in _cmdline(p)]
            if actors:
                killed, done_at_kill = actors[0], len(_markers(out))
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    runner.join(300)
    assert not runner.is_alive()
    assert killed is not None, "the run ended before a worker could be killed"
    assert done_at_kill < 8, "every image was done before the kill"
    assert result["status"] == 0
    assert "8 processed, 0 skipped (already done), 0 failed" in capsys.readouterr().out
    names = [f"img{i:02d}.png" for i in range(8)]
    _check_index(out, names)
    table = pq.read_table(out / "masks.parquet").to_pylist()
    pairs = [(r["image_id"], r["mask_index"]) for r in table]
    assert len(pairs) == len(set(pairs)), "a mask is in the index twice"
    assert sorted({r["file_name"] for r in table}) == names
    assert len(_markers(out)) == 8
    _no_temp_files(out)


def test_uri_inputs_are_named_like_local_paths(images_dir, tmp_path):
    from anyseg.scale.sources import plan_sources

    inputs = _many(images_dir, tmp_path / "in", 3)
    (inputs / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(inputs / "sub" / "img00.jpg")
    local = plan_sources([str(inputs)], tmp_path / "out")
    uri = plan_sources([f"file://{inputs}"], tmp_path / "out")
    assert [(s.job.index, s.job.rel, s.job.base) for s in uri] == [(s.job.index, s.job.rel, s.job.base) for s in local]
    assert [s.stamp for s in uri] == [s.stamp for s in local]
    assert [s.uri for s in uri][0] == f"file://{inputs}/img00.png"
    globbed = plan_sources([f"file://{inputs}/img0[12].png"], tmp_path / "out")
    assert [s.job.rel for s in globbed] == ["img01.png", "img02.png"]
    with pytest.raises(ValueError, match="not both"):
        plan_sources([str(inputs), f"file://{inputs}"], tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no such object"):
        plan_sources([f"file://{inputs}/missing"], tmp_path / "out")
