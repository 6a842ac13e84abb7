"""What the headless-Chromium tests of the labelling app share: the browser's location and flags, the
module-level requirements (server extra, Playwright, Chromium), a page fixture body and clicks in image
pixels."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("ANYSEG_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def require_browser():
    """Skip the calling test module (at import) unless the server extra, Playwright and Chromium are
    there; returns ``playwright.sync_api``."""
    pytest.importorskip("fastapi", reason="the server extra is not installed (pip install 'anyseg[server]')")
    pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install 'anyseg[server]')")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="Playwright is not installed (scripts/setup-test-env.sh installs it)")
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"Chromium not found at {CHROMIUM} (scripts/setup-test-env.sh installs Debian's chromium)",
                    allow_module_level=True)
    return sync_api


@contextlib.contextmanager
def chromium_page(artifacts: Path, **context_options):
    """A fresh ``artifacts`` folder and a 1280 x 800 page whose errors (uncaught exceptions, console
    errors) are collected in ``page.errors``."""
    from playwright import sync_api

    shutil.rmtree(artifacts, ignore_errors=True)
    artifacts.mkdir(parents=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        context = browser.new_context(viewport={"width": 1280, "height": 800}, **context_options)
        pg = context.new_page()
        pg.errors = []
        pg.on("pageerror", lambda exc: pg.errors.append(str(exc)))
        pg.on("console", lambda msg: pg.errors.append(msg.text) if msg.type == "error" else None)
        pg.set_default_timeout(120_000)
        try:
            yield pg
        finally:
            context.close()
            browser.close()


def click_image(pg, x: float, y: float, **kwargs) -> None:
    """Click at original-image pixel (x, y)."""
    box = pg.locator("#overlay-canvas").bounding_box()
    w, h = pg.evaluate("[window.anyseg.state.image.width, window.anyseg.state.image.height]")
    pg.mouse.click(box["x"] + (x + 0.5) * box["width"] / w, box["y"] + (y + 0.5) * box["height"] / h, **kwargs)
