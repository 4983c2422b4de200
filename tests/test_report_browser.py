"""The HTML report as a person sees it: Debian's chromium, headless, through selenium.

``make test`` installs ``chromium`` and ``chromium-driver`` (the ``browser`` target). Each page is
loaded from ``file://``; the tests assert no console errors, no network request other than the
file itself, every plot drawn (coloured pixels on its canvas and data points in the page's own
record), escaped names, and save a full-page screenshot under the test's temp folder.
"""

from __future__ import annotations

import base64
import json
import shutil
import time
from pathlib import Path

import pytest

from gradguard.report import make_report, open_run, write_html
from gradguard.report.synthetic import write_synthetic_run

EVIL = "<img src=x onerror=alert(1)>"
CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
]

# Per plot: canvases, coloured (data) pixels on them, and what the page's script recorded.
PLOT_PROBE = """
const out = {};
for (const node of document.querySelectorAll('[data-plot]')) {
  const id = node.getAttribute('data-plot');
  if (node.getAttribute('data-lazy') && !node.hasChildNodes()) { out[id] = {lazy: true}; continue; }
  let coloured = 0, canvases = 0;
  for (const c of node.querySelectorAll('canvas')) {
    canvases++;
    const copy = document.createElement('canvas');
    copy.width = c.width; copy.height = c.height;
    const cx = copy.getContext('2d', {willReadFrequently: true});
    cx.drawImage(c, 0, 0);
    const d = cx.getImageData(0, 0, c.width, c.height).data;
    for (let i = 0; i < d.length; i += 4) {
      const r = d[i], g = d[i + 1], b = d[i + 2], a = d[i + 3];
      if (a > 0 && Math.max(r, g, b) - Math.min(r, g, b) > 40) coloured++;
    }
  }
  out[id] = {canvases, coloured, status: (window.ggReport.plots || {})[id] || null};
}
return out;
"""


def _binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        pytest.fail(f"{name} not found: run `make test` (its `browser` target installs Debian's chromium and chromium-driver)")
    return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = _binary("chromium")
    for flag in CHROME_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(_binary("chromedriver")), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


class Page:
    """A loaded report: console messages, network requests, plot probe, screenshot."""

    def __init__(self, driver, path: Path):
        self.driver = driver
        self.path = path
        driver.get_log("browser")
        driver.get_log("performance")  # drop what an earlier page left
        driver.get(path.resolve().as_uri())
        deadline = time.time() + 30
        while time.time() < deadline:
            if driver.execute_script("return !!(window.ggReport && (window.ggReport.ready || window.ggReport.errors.length))"):
                break
            time.sleep(0.1)
        self.report = driver.execute_script("return window.ggReport")

    def console(self) -> list[dict]:
        return self.driver.get_log("browser")

    def requests(self) -> list[str]:
        urls = []
        for entry in self.driver.get_log("performance"):
            msg = json.loads(entry["message"])["message"]
            if msg.get("method") == "Network.requestWillBeSent":
                urls.append(msg["params"]["request"]["url"])
        return urls

    def plots(self) -> dict:
        return self.driver.execute_script(PLOT_PROBE)

    def screenshot(self, out: Path) -> Path:
        size = self.driver.execute_script(
            "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]"
        )
        shot = self.driver.execute_cdp_cmd(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True,
             "clip": {"x": 0, "y": 0, "width": size[0], "height": min(size[1], 16000), "scale": 1}},
        )
        out.write_bytes(base64.b64decode(shot["data"]))
        return out


def assert_clean(page: Page) -> None:
    """No script error, no console error or warning from the page, no request but the file."""
    assert page.report is not None, "the report script did not run"
    assert page.report["ready"] and page.report["errors"] == []
    bad = [m for m in page.console() if m["level"] in ("SEVERE", "WARNING")]
    assert bad == [], bad
    uri = page.path.resolve().as_uri()
    others = [u for u in page.requests() if u != uri]
    assert others == [], others


def assert_drawn(plots: dict, ids: list[str]) -> None:
    for pid in ids:
        p = plots.get(pid)
        assert p is not None, f"plot {pid} missing; have {sorted(plots)}"
        assert p["canvases"] >= 1, (pid, p)
        assert p["status"] and p["status"]["points"] > 0, (pid, p)
        assert p["coloured"] > 200, (pid, p)  # data drawn, not only axes and grid


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    a = write_synthetic_run(base / "clipped", steps=4000, layers=16, name="with clipping", spikes=5)
    b = write_synthetic_run(base / "plain", steps=4000, layers=16, clip=False, seed=2, name="without clipping", spikes=5)
    return a, b


def test_report_draws_every_view_offline(browser, two_runs, tmp_path):
    out, failed = make_report(list(two_runs), tmp_path / "report.html")
    assert failed == []
    page = Page(browser, out)
    assert_clean(page)
    plots = page.plots()
    views = ["norm", "rate", "heatmap", "flow", "ratio", "ratio-layers"]
    assert_drawn(plots, ["compare-norm", "compare-loss"] + [f"run{i}-{v}" for i in (0, 1) for v in views])
    # the events table: 5 incidents per run, each opens to rule, values, top layers and its window
    summaries = browser.find_elements("css selector", "#run0-events details.event > summary")
    assert len(summaries) == 5
    summaries[-1].click()
    body = browser.find_element("css selector", "#run0-events details.event[open] .evbody").text
    assert "nonfinite" in body and "Top layers" in body and "first non-finite layer" in body
    assert "window-r0-step" in body and "(embedded)" in body
    assert_drawn(page.plots(), ["run0-ev4-window"])
    assert page.screenshot(tmp_path / "report.png").stat().st_size > 50_000
    assert_clean(page)  # opening the event logged nothing either


def test_names_render_as_text_and_run_nothing(browser, tmp_path):
    d = write_synthetic_run(
        tmp_path / "evil", steps=300, layers=3, name=EVIL, layer_names=[EVIL, "</script><script>alert(2)</script>", "ok"]
    )
    with open(d / "events.jsonl", "a") as f:
        f.write(json.dumps({"step": 299, "rule": EVIL, "value": 1.0, "baseline": 1.0, "action": EVIL,
                            "top_layers": [{"layer": EVIL, "norm": 1.0, "baseline": 1.0, "ratio": 1.0}],
                            "first_nonfinite_layer": EVIL, "window": None, "message": EVIL, "time": 0.0}) + "\n")
    out = write_html([open_run(d)], tmp_path / "evil.html")
    page = Page(browser, out)
    assert_clean(page)
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018
    assert browser.find_elements("css selector", "img") == []
    assert browser.find_element("css selector", "#run0 .runname").text == EVIL
    assert browser.title == f"gradguard report: {EVIL}"
    for det in browser.find_elements("css selector", "#run0-events details.event > summary"):
        det.click()
    text = browser.find_element("css selector", "#run0-events").text
    assert text.count(EVIL) >= 4
    assert_drawn(page.plots(), ["run0-norm", "run0-heatmap", "run0-flow"])
    assert browser.find_elements("css selector", "img") == [] and browser.find_elements("css selector", "main script") == []
    page.screenshot(tmp_path / "evil.png")


def test_partial_and_half_written_runs_show_notes(browser, tmp_path):
    live = write_synthetic_run(tmp_path / "live", steps=3000, layers=5, shard_steps=1000, name="live")
    raw = (live / "steps-r0-000002.parquet").read_bytes()
    (live / "steps-r0-000002.parquet").write_bytes(raw[: len(raw) // 3])
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "meta.json").write_text(json.dumps({"name": "fresh", "layers": ["a"], "config": {}, "versions": {}}))
    (tmp_path / "empty").mkdir()
    out, failed = make_report([live, fresh, tmp_path / "empty"], tmp_path / "partial.html")
    assert len(failed) == 1
    page = Page(browser, out)
    assert_clean(page)
    text = browser.find_element("tag name", "main").text
    assert "Runs that could not be read" in text and "no run data" in text
    assert "unreadable shard skipped" in text and "no step records yet" in text
    plots = page.plots()
    assert_drawn(plots, ["run0-norm", "run0-heatmap"])
    assert plots["run1-norm"]["status"]["kind"] == "empty"
    page.screenshot(tmp_path / "partial.png")


def test_million_steps_500_layers_page_is_drawn(browser, tmp_path):
    d = write_synthetic_run(tmp_path / "big", steps=1_000_000, layers=500, layer_every=5000, shard_steps=250_000, spikes=6, name="big")
    out = write_html([open_run(d)], tmp_path / "big.html")
    assert out.stat().st_size < 10_000_000
    t = time.time()
    page = Page(browser, out)
    assert time.time() - t < 20
    assert_clean(page)
    plots = page.plots()
    assert_drawn(plots, [f"run0-{v}" for v in ("norm", "rate", "heatmap", "flow", "ratio", "ratio-layers")])
    assert plots["run0-heatmap"]["status"]["points"] == 500 * 200  # 500 layers x 200 recorded steps
    page.screenshot(tmp_path / "big.png")
