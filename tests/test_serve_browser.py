"""The browser client in real headless Chromium (Debian's ``chromium`` package, driven by the
``playwright`` Python package with ``executable_path``; no browser download): it connects,
plays frames, turns a held arrow key into actions whose seq shows up in the frame headers, and
the picture moves the right way. Screenshots go to ``test-artifacts/``."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from streamkd.data.toyworld import ToyWorldConfig
from streamkd.bundle import CausalConfig
from streamkd.serve.backends import ModelBackend, WorldOracleBackend
from streamkd.serve.server import ServerConfig
from tests.test_serve import server_thread
from tests.test_serve_batching import tiny_causal_model

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        browser.close()


def _wait(page, condition: str, timeout_s: float = 20.0):
    page.wait_for_function(condition, timeout=timeout_s * 1000)
    return page.evaluate(condition)


CAPTURE = """() => {
    // test hook: keep the pixels and header of the last few frames the page put on the canvas
    window.__caps = []; let last = null;
    const canvas = document.getElementById('view');
    const tick = () => {
        const h = window.streamkd.lastShown;
        if (h && h !== last) {
            last = h;
            const px = Array.from(canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data);
            window.__caps.push({h, w: canvas.width, px});
            if (window.__caps.length > 4) window.__caps.shift();
        }
        requestAnimationFrame(tick);
    };
    requestAnimationFrame(tick);
}"""


def _captures(page, seq: int) -> list[tuple[dict, np.ndarray]]:
    """The last two captured frames, both generated after action ``seq`` took effect."""
    cond = f"window.__caps.length >= 2 && window.__caps.slice(-2).every(c => c.h.actionSeq >= {seq})"
    page.wait_for_function(cond, timeout=20_000)
    caps = page.evaluate("window.__caps.slice(-2)")
    return [(c["h"], np.asarray(c["px"], dtype=np.uint8).reshape(c["w"], c["w"], 4)[..., :3]) for c in caps]


def _shift_x(a: np.ndarray, b: np.ndarray, max_shift: int) -> int:
    """The horizontal shift d with b[:, x] ~ a[:, x + d] (content moving left = positive d)."""
    a, b = a.astype(float).mean(-1), b.astype(float).mean(-1)
    w = a.shape[1]
    errors = {d: np.abs(b[:, : w - d] - a[:, d:]).mean() if d >= 0 else np.abs(b[:, -d:] - a[:, : w + d]).mean()
              for d in range(-max_shift, max_shift + 1)}
    return min(errors, key=errors.get)


def _open(browser, url: str):
    page = browser.new_page(viewport={"width": 900, "height": 700}, bypass_csp=True)  # the test evaluates JS strings
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    _wait(page, "window.streamkd.welcome !== null")
    page.click("#start")
    _wait(page, "window.streamkd.framesShown >= 3")
    return page, errors


def test_browser_streams_and_steers_the_model(browser) -> None:
    backend = ModelBackend(tiny_causal_model(CausalConfig(2, 1, 4), guidance=1.0))
    with server_thread(ServerConfig(port=0), backend) as srv:
        page, errors = _open(browser, f"http://127.0.0.1:{srv.port}/")
        page.focus("#view")
        page.keyboard.down("ArrowRight")
        seq = _wait(page, "window.streamkd.actionSeq")
        assert seq >= 1
        applied = _wait(page, f"window.streamkd.lastShown && window.streamkd.lastShown.actionSeq >= {seq} && window.streamkd.lastShown.actionSeq")
        page.keyboard.up("ArrowRight")
        assert applied >= seq
        stats = page.evaluate("({ffl: window.streamkd.firstFrameLatency, lat: window.streamkd.actionLatencies.length})")
        assert stats["ffl"] is not None and stats["ffl"] > 0 and stats["lat"] >= 1
        time.sleep(0.5)  # let the stats table refresh
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "browser_model.png"))
        assert page.inner_text("#fps") != "–"
        assert not errors, errors
        page.close()


def test_browser_picture_moves_the_right_way(browser) -> None:
    """With the exact toy-world renderer behind the server, a held right arrow moves the camera
    right: the content on the canvas slides left by speed_px per frame."""
    world = ToyWorldConfig()
    with server_thread(ServerConfig(port=0), WorldOracleBackend(world, chunk_frames=3)) as srv:
        page, errors = _open(browser, f"http://127.0.0.1:{srv.port}/")
        page.focus("#view")
        page.evaluate(CAPTURE)
        page.keyboard.down("ArrowRight")
        seq = _wait(page, "window.streamkd.actionSeq")
        (h1, a), (h2, b) = _captures(page, seq)  # two frames shown after the move took effect
        page.keyboard.up("ArrowRight")
        gap = h2["frameSeq"] - h1["frameSeq"]
        assert 1 <= gap <= 2, "the canvas skipped too many frames to compare"
        assert _shift_x(a, b, max_shift=3 * world.speed_px) == gap * world.speed_px
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "browser_oracle.png"))
        assert not errors, errors
        page.close()
