"""The size and speed of an ``apm explore`` page in headless Chromium, and its screenshot.

    python experiments/explore_page.py --page explore.html --screenshot docs/figures/explore.png

Opens the page --runs times, each in a fresh browser, and records the time from the start of
navigation until the page is drawn (``window.apmExplore.loadMs``; the script's own share in
``scriptMs``), then the time a click (every level redrawn) and a change of k take. Writes the
numbers to --json and prints them; with --screenshot, clicks --pixel and saves a screenshot (the
same browser code as the tests: ``apm.explore.browser``), reduced to 256 colours to stay small.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from PIL import Image

from apm.explore.browser import click_pixel, open_page

TIMED = """async ([x, y, k]) => {
  const t0 = performance.now(); window.apmExplore.select(x, y); const t1 = performance.now();
  window.apmExplore.setK(k); const t2 = performance.now();
  return [t1 - t0, t2 - t1]; }"""


def page_contents(page_path: Path) -> dict:
    """What the page holds (from its JSON block): photographs, levels, k, sources, settings."""
    html = page_path.read_text(encoding="utf-8")
    d = json.loads(re.search(r'<script id="apm-data" type="application/json">(.*?)</script>', html, re.S)[1])
    return {"photos": len(d["photos"]), "levels": d["levels"], "ks": d["ks"], "sources": d["sources"],
            "size": d["size"], "note": d["note"], "fit": [p["fit"] for p in d["photos"]], "settings": d["settings"]}


def measure(page_path: Path, runs: int, pixel: tuple[int, int]) -> dict:
    loads, scripts, clicks, ks = [], [], [], []
    for _ in range(runs):
        with open_page(page_path) as (page, requested):
            loads.append(page.evaluate("window.apmExplore.loadMs"))
            scripts.append(page.evaluate("window.apmExplore.scriptMs"))
            ks_on_page = page.evaluate("Array.from(document.querySelectorAll('#kbuttons button'), b => +b.dataset.k)")
            click, k = page.evaluate(TIMED, [*pixel, ks_on_page[-1]])
            clicks.append(click)
            ks.append(k)
            assert not requested, requested
    med = lambda xs: round(statistics.median(xs), 1)  # noqa: E731
    return {"bytes": page_path.stat().st_size, "runs": runs, "load_ms_median": med(loads),
            "load_ms_max": round(max(loads), 1),
            "script_ms_median": med(scripts), "click_ms_median": med(clicks), "k_change_ms_median": med(ks),
            "requests": 0}


def screenshot(page_path: Path, out: Path, pixel: tuple[int, int], width: int, height: int) -> None:
    with open_page(page_path, width, height) as (page, _):
        size = page.evaluate("JSON.parse(document.getElementById('apm-data').textContent).size")
        click_pixel(page, "hl-photo", *pixel, size)
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out))
    Image.open(out).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--page", required=True, help="an HTML file written by apm explore")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--pixel", nargs=2, type=int, default=[100, 60], help="x y of the pixel clicked")
    p.add_argument("--screenshot", help="PNG to write")
    p.add_argument("--size", nargs=2, type=int, default=[1500, 1000], help="viewport width height")
    p.add_argument("--json", default="experiments/results/explore_page.json")
    a = p.parse_args()
    page = Path(a.page)
    result = {"page": page.name, **measure(page, a.runs, tuple(a.pixel)), "contents": page_contents(page)}
    if a.screenshot:
        screenshot(page, Path(a.screenshot), tuple(a.pixel), *a.size)
        result["screenshot"] = a.screenshot
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
