"""Driving an explore page in a real headless Chromium (Playwright with the system's browser): the
tests, the load-time benchmark and the README's screenshot use this one code. Needs the ``test``
extra (``pip install -e '.[test]'``) and a Chromium (Debian: ``apt-get install chromium``); every
request the page makes is blocked and recorded."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from apm.errors import ConfigError

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The Chromium to drive: ``$APM_CHROMIUM`` (when that file exists), else the first of
    ``BROWSERS`` on the PATH; None when there is none."""
    if os.environ.get("APM_CHROMIUM"):
        return os.environ["APM_CHROMIUM"] if Path(os.environ["APM_CHROMIUM"]).is_file() else None
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


@contextmanager
def open_page(path: str | Path, width: int = 1500, height: int = 1000) -> Iterator[tuple[object, list[str]]]:
    """The page at ``path`` loaded (``window.apmExplore.ready``) in headless Chromium; yields the
    Playwright page and the list of the URLs it requested besides its own file (each one blocked)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise ConfigError("Driving the page needs Playwright: pip install -e '.[test]'.") from None
    exe = find_chromium()
    if exe is None:
        raise ConfigError(f"No Chromium found (looked for $APM_CHROMIUM and {', '.join(BROWSERS)}); "
                          f"install it, e.g. apt-get install chromium.")
    url = Path(path).resolve().as_uri()
    requested: list[str] = []

    def record(request) -> None:
        if request.url != url and not request.url.startswith("data:"):
            requested.append(request.url)

    def block(route) -> None:
        route.continue_() if route.request.url == url else route.abort()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport={"width": width, "height": height})
            context.route("**/*", block)
            page = context.new_page()
            page.on("request", record)
            page.goto(url)
            page.wait_for_function("window.apmExplore && window.apmExplore.ready", timeout=30_000)
            yield page, requested
        finally:
            browser.close()


def click_pixel(page, canvas_id: str, x: int, y: int, size: int) -> None:
    """A mouse click at the centre of pixel (x, y) of the (size x size) canvas ``canvas_id``."""
    box = page.locator(f"#{canvas_id}").bounding_box()
    page.mouse.click(box["x"] + (x + 0.5) * box["width"] / size, box["y"] + (y + 0.5) * box["height"] / size)


def drawn_mask(page, canvas_id: str) -> np.ndarray:
    """(rows, columns) bool: the pixels a canvas draws anything on (alpha above 0)."""
    size, alpha = page.evaluate("""id => { const c = document.getElementById(id);
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const a = new Array(d.length / 4); for (let i = 0; i < a.length; i++) a[i] = d[4 * i + 3];
        return [[c.height, c.width], a]; }""", canvas_id)
    return np.asarray(alpha, dtype=np.uint8).reshape(size) > 0


def canvas_rgb(page, canvas_id: str) -> np.ndarray:
    """(rows, columns, 3) uint8: what a canvas holds."""
    size, data = page.evaluate("""id => { const c = document.getElementById(id);
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        return [[c.height, c.width, 4], Array.from(d)]; }""",
                               canvas_id)
    return np.asarray(data, dtype=np.uint8).reshape(size)[..., :3]
