"""The report in a real browser: headless Debian Chromium opens it through `alignscope view`'s server.

It checks what only a browser can: the page parses into the sections and plots we expect, hostile
strings render as visible text, no dialog opens (an injected ``alert`` would), and the console
stays clean — which also catches Content-Security-Policy violations, i.e. any attempt to load or
run something. A screenshot goes to the test's tmp dir, and to ``$ALIGNSCOPE_SCREENSHOT`` when set
(the README's docs/report.png).
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest
from test_report_support import IMG, SCRIPT, report_run  # noqa: F401  (fixture)

from alignscope.report import build_report
from alignscope.report.serve import make_server, url

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SECTIONS = ["provenance", "training", "comparison", "metrics", "planted", "guise", "covert-overt", "stereo-pairs",
            "agreement", "toxicity", "attribution", "curation"]
PLOTS = ["plot-training-curves", "plot-planted-gap", "plot-guise-adjectives", "plot-covert-overt", "plot-stereo-pairs",
         "plot-agreement-heatmap", "plot-toxicity", "plot-attribution-recovery", "plot-curation-curve"]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium package to run the browser test")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def served(report_run: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    paths = build_report(report_run, tmp_path_factory.mktemp("browser-report"))
    server = make_server(paths.html, 0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield url(server)
    server.shutdown()
    server.server_close()


def test_report_renders_in_chromium(browser, served, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning")
            else None)
    page.on("pageerror", lambda e: problems.append(f"uncaught: {e}"))
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    page.on("request", lambda r: problems.append(f"request: {r.url}") if r.url != served else None)
    response = page.goto(served, wait_until="load")
    assert response is not None and response.status == 200

    for id in SECTIONS:
        assert page.locator(f"section#{id}").is_visible(), id
        assert page.locator(f"section#{id}").get_attribute("data-status") == "shown", id
    assert page.locator("section#privacy").get_attribute("data-status") == "absent"
    assert "was not audited" in page.locator("section#privacy .absent").inner_text()
    for id in PLOTS:
        svg = page.locator(f"figure#{id} svg")
        assert svg.count() == 1, id
        box = svg.bounding_box()
        assert box is not None and box["width"] > 100 and box["height"] > 80, (id, box)

    assert page.title().endswith(SCRIPT)  # the hostile config value is the title's text
    assert page.locator("td", has_text=SCRIPT).count() >= 1  # pair text
    assert page.locator("td", has_text=IMG).count() >= 1  # model output / pair text
    assert page.locator("#plot-guise-adjectives svg text", has_text=SCRIPT).count() == 1  # SVG label
    assert page.locator("body script, body img").count() == 0
    assert page.evaluate("document.scripts.length") == 0

    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("ALIGNSCOPE_SCREENSHOT"):
        target = Path(os.environ["ALIGNSCOPE_SCREENSHOT"])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)
    page.close()
    assert problems == []
