"""The semi-automatic stage of the labelling app in headless Chromium (the built-in nano model, one
generated scene): auto-label, accept some proposals, reject one, switch the model in the picker, add
one object by clicks, reload: every object is there with its provenance and the stats panel counts
them. Screenshots go to test-artifacts/browser-loop/."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "browser-loop"

from browser_support import chromium_page, click_image, require_browser  # noqa: E402

require_browser()

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import ndimage  # noqa: E402

from anyseg.server import ServerSettings, create_app, run_in_thread  # noqa: E402
from anyseg.train.synthetic import SyntheticDataset  # noqa: E402


@pytest.fixture(scope="module")
def loop_app(tmp_path_factory):
    import copy

    from anyseg import load_model
    from anyseg.checkpoint import save_model

    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("browser-loop")
    folder, runs = work / "images", work / "runs"
    folder.mkdir()
    sample = SyntheticDataset(count=1, seed=11, size=128, objects=(3, 4), parts=False)[0]
    Image.fromarray(sample.image).save(folder / "scene.png")
    model = load_model("nano", device="cpu")
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        tuned.mask_decoder.iou_prediction_head.layers[-1].bias.add_(0.01)  # another model, same behaviour
    save_model(tuned, runs / "tuned" / "model.pth")
    settings = ServerSettings(images_dir=folder, annotations_path=work / "labels.json", models_dir=runs,
                              browser_decoder=False, model_name="nano")
    app = create_app(model, settings)
    running = run_in_thread(app)
    yield running.url, app, settings, sample.masks
    running.stop()
    app.state.engine.close()


@pytest.fixture(scope="module")
def page():
    with chromium_page(ARTIFACTS) as pg:
        yield pg


def idle(pg) -> None:
    pg.wait_for_function("!window.anyseg.busy")


def open_scene(pg, url) -> None:
    pg.goto(url + "/")
    pg.wait_for_selector("body[data-ready=true]")
    pg.locator("#file-list button", has_text="scene.png").click()
    pg.wait_for_selector("body[data-image]")
    idle(pg)


def test_auto_label_accept_reject_click_and_reload(page, loop_app):
    url, app, settings, truth = loop_app
    pg = page
    open_scene(pg, url)
    assert pg.locator("#proposals-panel").is_hidden()
    assert pg.input_value("#model-select") == "nano"
    assert pg.locator("#model-select option").all_inner_texts() == ["nano", "tuned/model.pth"]

    # Auto-label with thresholds the small model reaches on this scene.
    pg.fill("#everything-points", "8")
    pg.fill("#auto-iou", "0.5")
    pg.fill("#auto-stability", "0.8")
    pg.click("#auto-label")
    pg.wait_for_function("window.anyseg.state.proposals !== null && !window.anyseg.busy")
    proposed = pg.locator("#proposal-list li").count()
    assert proposed >= 3, f"expected at least 3 proposals, got {proposed}"
    assert pg.inner_text("#proposal-count") == str(proposed)
    painted = pg.evaluate("""() => { const c = document.getElementById('proposals-canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
        for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }""")
    assert painted > 0  # their own layer
    assert pg.evaluate("window.anyseg.state.objects.length") == 0  # not objects until accepted
    pg.screenshot(path=str(ARTIFACTS / "01_proposals.png"))

    # Reject the least confident one, accept the two most confident.
    pg.locator("#proposal-list li").last.locator(".reject-proposal").click()
    assert pg.locator("#proposal-list li").count() == proposed - 1
    pg.locator("#proposal-list li").first.locator(".accept-proposal").click()
    pg.wait_for_function("window.anyseg.state.objects.length === 1 && !window.anyseg.busy")
    if pg.locator("#proposal-list li").count():
        pg.locator("#proposal-list li").first.locator(".accept-proposal").click()
        pg.wait_for_function("window.anyseg.state.objects.length === 2 && !window.anyseg.busy")
    auto_count = pg.evaluate("window.anyseg.state.objects.length")
    # Proposals covered by accepted objects are hidden: none shown overlaps them by half or more.
    overlap = pg.evaluate("""() => { const s = window.anyseg.state; const n = s.image.width * s.image.height;
        const cov = new Uint8Array(n); for (const o of s.objects) for (let i = 0; i < n; i++) if (o.mask[i]) cov[i] = 1;
        return s.proposals.items.filter((p) => p.status === 'shown').map((p) => {
          let k = 0; for (let i = 0; i < n; i++) if (p.mask[i] && cov[i]) k++; return k / p.area; }); }""")
    assert all(f < 0.5 for f in overlap), overlap
    assert pg.locator("#proposal-list li").count() == len(overlap)

    # Switch the model in the picker: the next object says it was made by the new model.
    pg.select_option("#model-select", "tuned/model.pth")
    pg.wait_for_function("window.anyseg.state.modelName === 'tuned/model.pth' && !window.anyseg.busy")
    assert app.state.engine.model_name == "tuned/model.pth"

    # Add one object by clicks, on the true object least covered by the accepted ones.
    objects = pg.evaluate("window.anyseg.state.objects.map((o) => Array.from(o.mask))")
    w, h = pg.evaluate("[window.anyseg.state.image.width, window.anyseg.state.image.height]")
    covered = np.zeros((h, w), bool)
    for m in objects:
        covered |= np.asarray(m, bool).reshape(h, w)
    target = min(truth, key=lambda m: (m & covered).sum() / m.sum())
    free = target & ~covered
    depth = ndimage.distance_transform_edt(np.pad(free, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    click_image(pg, float(x), float(y))
    pg.wait_for_function("window.anyseg.decodeCount >= 1 && !window.anyseg.busy")
    pg.fill("#label-input", "clicked")
    pg.click("#accept")
    pg.wait_for_function(f"window.anyseg.state.objects.length === {auto_count + 1} && !window.anyseg.busy")
    pg.screenshot(path=str(ARTIFACTS / "02_accepted.png"))

    def check_objects_and_stats():
        stages = pg.locator("#object-list li").evaluate_all("(lis) => lis.map((li) => li.dataset.stage)")
        assert sorted(stages) == sorted(["auto"] * auto_count + ["assisted"])
        texts = pg.locator("#object-list li").all_inner_texts()
        clicked = next(t for t in texts if t.startswith("clicked"))
        assert "1 click" in clicked and "tuned/model.pth" in clicked
        assert sum("auto-accepted" in t and "nano" in t for t in texts) == auto_count
        stats = {k: v for k, v in zip(pg.locator("#stats-panel dt").all_inner_texts(),
                                      pg.locator("#stats-panel dd").all_inner_texts())}
        assert stats["objects here"] == str(auto_count + 1) and stats["objects"] == str(auto_count + 1)
        assert stats["masks / image"] == f"{auto_count + 1:.1f}"
        assert stats["auto-accepted"].startswith(f"{auto_count} · ")
        assert stats["clicks"].startswith("1 · ")
        assert stats["s / mask"] != "–"

    check_objects_and_stats()

    # Reload: every object comes back with its provenance, and the stats panel shows them.
    pg.reload()
    pg.wait_for_selector("body[data-ready=true]")
    assert pg.input_value("#model-select") == "tuned/model.pth"  # the server still runs the new model
    pg.locator("#file-list button", has_text="scene.png").click()
    pg.wait_for_function(f"window.anyseg.state.objects.length === {auto_count + 1} && !window.anyseg.busy")
    check_objects_and_stats()
    pg.screenshot(path=str(ARTIFACTS / "03_reloaded.png"))
    saved = app.state.store.stats()
    assert saved["stages"]["auto"]["objects"] == auto_count and saved["stages"]["assisted"]["objects"] == 1
    assert saved["stages"]["assisted"]["clicks_per_mask"] == 1.0
    assert saved["models"] == {"nano": auto_count, "tuned/model.pth": 1}
    assert not pg.errors, pg.errors
