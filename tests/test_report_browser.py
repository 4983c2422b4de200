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
from test_report import extreme_runs

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
    views = ["norm", "lr", "rate", "heatmap", "flow", "ratio", "ratio-layers"]
    assert_drawn(plots, ["exp0-norm", "exp0-loss"] + [f"run{i}-{v}" for i in (0, 1) for v in views])
    # the events table: 5 incidents per run, each opens to rule, values, top layers and its window
    summaries = browser.find_elements("css selector", "#run0-events details.event > summary")
    assert len(summaries) == 5
    summaries[-1].click()
    body = browser.find_element("css selector", "#run0-events details.event[open] .evbody").text
    assert "nonfinite" in body and "Top layers" in body and "first non-finite layer" in body
    assert "window-r0-step" in body and "(embedded)" in body
    assert_drawn(page.plots(), ["run0-ev4-window"])
    # the first incident is open at the top of the run, its window drawn without a click
    assert "Top layers" in browser.find_element("css selector", "#run0-incident").text
    assert_drawn(page.plots(), ["run0-incident-window"])
    assert page.screenshot(tmp_path / "report.png").stat().st_size > 50_000
    assert_clean(page)  # opening the event logged nothing either


def test_learning_rate_chart_draws_every_group(browser, tmp_path):
    d = write_synthetic_run(tmp_path / "lr", steps=3000, layers=3, lr_groups=3, name="three groups")
    out, failed = make_report([d], tmp_path / "report.html")
    assert failed == []
    page = Page(browser, out)
    assert_clean(page)
    assert_drawn(page.plots(), ["run0-lr"])
    card = browser.find_element("css selector", "#run0-lr").text
    assert "Learning rate" in card and "3 param groups" in card and "log axis" in card
    axes = page.plots()["run0-lr"]["status"]["axes"]
    left = [a for a in axes if a["scale"] == "y"][0]
    assert left["label"] == "learning rate" and left["log"] and len([t for t in left["ticks"] if t]) >= 2
    assert [ln["label"] for ln in page.plots()["run0-lr"]["status"]["lines"]] == ["group 0", "group 1", "group 2"]


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


# ---------------------------------------------------------------- reading at a glance (issue 12)

AXIS_PROBE = """
// per uPlot chart: text pixels left of the plot area (the y tick labels) and right of it
const out = {};
for (const node of document.querySelectorAll('[data-plot]')) {
  const id = node.getAttribute('data-plot'), u = node.querySelector('.uplot');
  if (!u) continue;
  const c = u.querySelector('canvas'), over = u.querySelector('.u-over');
  const scale = c.width / c.getBoundingClientRect().width;
  const left = Math.floor((over.getBoundingClientRect().left - c.getBoundingClientRect().left) * scale);
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let dark = 0;
  for (let y = 0; y < c.height; y++) for (let x = 0; x < left; x++) {
    const i = 4 * (y * c.width + x);
    if (d[i + 3] > 0 && d[i] < 120 && d[i + 1] < 120 && d[i + 2] < 120) dark++;
  }
  out[id] = {leftPx: left, darkLeft: dark, caption: (node.querySelector('.axes-text') || {}).textContent || ''};
}
return out;
"""


def assert_axes_labelled(page: Page, ids: list[str]) -> dict:
    """Every chart's axes have tick labels, short ones, that fit the axis (none cut, none over
    the axis title), also in the page's text; the y axis strip holds drawn text."""
    pixels = page.driver.execute_script(AXIS_PROBE)
    plots = page.driver.execute_script("return window.ggReport.plots")
    for pid in ids:
        rec = plots[pid]
        for axis in rec["axes"]:
            ticks = [t for t in axis["ticks"] if t]
            assert len(ticks) >= 2, (pid, axis)
            assert all(len(t) <= 7 for t in ticks), (pid, axis)  # 1e38, never 0,000,000,000
            assert not any(w in t for t in ticks for w in ("NaN", "Infinity", ","))
            if axis["scale"] != "x":
                assert axis["width"] + 15 <= axis["size"], (pid, axis)  # fits beside the ticks
        cap = pixels[pid]["caption"]
        assert "left axis" in cap and all(t in cap for a in rec["axes"] for t in a["ticks"] if t)
        assert pixels[pid]["darkLeft"] > 150, (pid, pixels[pid])  # labels drawn, not blank
    return pixels


def test_axes_stay_labelled_with_float32_max_inf_and_nan(browser, tmp_path):
    a, b = extreme_runs(tmp_path)
    out, failed = make_report([tmp_path], tmp_path / "extreme.html")
    assert failed == []
    page = Page(browser, out)
    assert_clean(page)
    ids = ["exp0-norm", "exp0-loss", "run0-norm", "run1-norm"]
    assert_drawn(page.plots(), ids)
    assert_axes_labelled(page, ids)
    plots = browser.execute_script("return window.ggReport.plots")
    norm_y = next(x for x in plots["exp0-norm"]["axes"] if x["scale"] == "y")
    assert norm_y["log"] and any(t in norm_y["ticks"] for t in ("1e38", "1e39", "1e36", "1e35", "1e30"))
    loss_y = next(x for x in plots["exp0-loss"]["axes"] if x["scale"] == "y")
    assert loss_y["log"] and any(t.startswith("1e1") for t in loss_y["ticks"])  # 1e10 .. 1e12
    # the run with inf / NaN steps has its non-finite marks in the comparison
    assert "none non-finite" in browser.find_element("css selector", "#exp0-norm").text
    page.screenshot(tmp_path / "extreme.png")


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    """The report of the demo as `make demo` writes it, at the --tiny size (seconds)."""
    import subprocess
    import sys

    base = tmp_path_factory.mktemp("demo")
    p = subprocess.run(
        [sys.executable, "-m", "gradguard.cli", "demo", "--tiny", "--seeds", "1", "--jobs", "2",
         "--runs-dir", str(base / "runs"), "--report", str(base / "runs" / "report.html")],
        capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "report:" in p.stdout
    return base / "runs" / "report.html", p.stdout


def test_demo_report_one_comparison_per_experiment(browser, demo_report, tmp_path):
    out, table = demo_report
    page = Page(browser, out)
    assert_clean(page)
    groups = browser.find_elements("css selector", "section.group")
    titles = [g.find_element("css selector", "h2").text for g in groups]
    assert len(groups) == 4 and titles[0].startswith("seed MLP") and titles[-1].startswith("char LSTM LM")
    for g in groups:  # one norm and one loss chart per experiment, nothing else drawn on load
        assert len(g.find_elements("css selector", "[data-plot$='-norm'].plot, [data-plot$='-loss'].plot")) == 2
    ids = [f"exp{k}-{v}" for k in range(4) for v in ("norm", "loss")]
    assert_drawn(page.plots(), ids)
    assert_axes_labelled(page, ids)
    plots = browser.execute_script("return window.ggReport.plots")
    for k in range(4):  # distinct colours within a comparison
        lines = plots[f"exp{k}-norm"]["lines"]
        assert len(lines) == 8 and len({(x["color"], x["dash"]) for x in lines}) == 8
    # 32 runs: the header names the experiments; each run opens on a click
    header = browser.find_element("tag name", "header").text
    assert "32 runs in 4 experiments" in header and "value-1" not in header
    assert page.report["collapsed"] and len(browser.find_elements("css selector", "details.run")) == 32
    # the table's result is the demo's, labelled with its metric
    mlp = groups[0]
    head = mlp.find_element("css selector", "table.cmp thead").text
    assert "train MSE" in head and "seed 0 (this run)" in head
    row = next(r for r in mlp.find_elements("css selector", "table.cmp tbody tr") if r.text.startswith("mlp/none"))
    assert "diverged" in row.text
    assert "diverged" in table  # and the terminal table says the same
    page.screenshot(tmp_path / "demo-report.png")


def test_demo_exploded_run_opens_on_its_first_incident(browser, demo_report, tmp_path):
    out, _ = demo_report
    page = Page(browser, out)
    runs = browser.find_elements("css selector", "details.run")
    det = next(d for d in runs if d.find_element("css selector", "summary .runname").text == "mlp/none")
    rid = det.get_attribute("id")
    assert "diverged" in det.find_element("css selector", "summary").text
    det.find_element("css selector", "summary").click()
    from selenium.webdriver.support.ui import WebDriverWait

    # the run's body is drawn when it opens: wait for it (a loaded CI machine is slow)
    card = WebDriverWait(browser, 20).until(
        lambda b: b.find_element("css selector", f"#{rid}-incident"))
    assert card.text.startswith("First incident: step") and "Top layers" in card.text
    sections = [e.get_attribute("id") for e in det.find_elements("css selector", ".runbody > .card")]
    assert sections[0] == f"{rid}-incident"  # at the top of the run's section
    plots = page.plots()
    assert_drawn(plots, [f"{rid}-incident-window", f"{rid}-norm"])
    assert_axes_labelled(page, [f"{rid}-norm"])
    assert_clean(page)
    page.screenshot(tmp_path / "demo-mlp-none.png")
