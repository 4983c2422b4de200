"""The command line as a user meets it: --version, the help, finding runs, missing extras,
damaged run folders (one line, never a traceback) and names that would drive the terminal."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from gradguard.cli import build_parser, main
from gradguard.report import make_report, open_run
from gradguard.report.discover import find_runs
from gradguard.report.inspect import inspect_run
from gradguard.report.synthetic import write_synthetic_run
from gradguard.report.text import printable

ESCAPES = "\x1b]0;owned\x07\x1b[2J"


def _cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gradguard.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_version(capsys):
    import gradguard

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"gradguard {gradguard.__version__}"


def test_top_level_help_is_plain_and_lists_every_command():
    text = build_parser([]).format_help()
    assert "``" not in text and ":func:" not in text
    for cmd in ("demo", "report", "inspect", "bench"):
        assert f"gradguard {cmd}" in text  # described in the overview
        assert f"    {cmd}" in text  # and listed as a command


def test_demo_framework_option_lists_the_registered_frameworks():
    from gradguard.cli import DEMO_FRAMEWORKS

    args = build_parser(["demo"]).parse_args(["demo"])
    assert args.framework == "torch" and "torch" in DEMO_FRAMEWORKS


@pytest.fixture()
def run_tree(tmp_path):
    """A folder of runs as the demo lays them out: runs/<experiment>/<strategy>."""
    base = tmp_path / "runs"
    write_synthetic_run(base / "mlp" / "none", steps=120, layers=3, name="mlp/none", clip=False)
    write_synthetic_run(base / "mlp" / "clip", steps=120, layers=3, name="mlp/clip")
    write_synthetic_run(base / "lstm" / "clip", steps=80, layers=3, name="lstm/clip")
    (base / "notes").mkdir()  # a folder with no run is passed over
    return base


def test_report_on_a_folder_of_runs_finds_the_runs_below_it(run_tree, tmp_path, capsys):
    assert [p.relative_to(run_tree).as_posix() for p in find_runs(run_tree)] == [
        "lstm/clip", "mlp/clip", "mlp/none"]
    assert find_runs(run_tree / "mlp" / "none") == [run_tree / "mlp" / "none"]
    out = tmp_path / "r.html"
    assert main(["report", str(run_tree), "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    text = out.read_text()
    for name in ("mlp/none", "mlp/clip", "lstm/clip"):
        assert name in text
    # inspect takes one run: on a folder of runs it names them
    assert main(["inspect", str(run_tree)]) == 2
    err = capsys.readouterr().err
    assert "holds 3 runs" in err and "mlp/none" in err and "gradguard report" in err
    # an empty folder is still "no run data", as before
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "-o", str(tmp_path / "e.html")]) == 2
    assert "no run data" in capsys.readouterr().err


def test_figures_without_matplotlib_say_what_to_install(run_tree, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rc = main(["report", str(run_tree), "--format", "png", "-o", str(tmp_path / "png")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "needs matplotlib" in err and "pip install" in err
    assert len(err.strip().splitlines()) == 1


def _damaged(tmp_path):
    d = write_synthetic_run(tmp_path / "bad", steps=50, layers=3, name="bad")
    meta = json.loads((d / "meta.json").read_text())
    meta["layers"] = 5  # not a list: the views cannot name the layers
    (d / "meta.json").write_text(json.dumps(meta))
    return d


@pytest.mark.parametrize("cmd", ["inspect", "report"])
def test_a_damaged_run_folder_gives_one_line_not_a_traceback(tmp_path, cmd):
    d = _damaged(tmp_path)
    args = [cmd, str(d)] + (["-o", str(tmp_path / "r.html")] if cmd == "report" else [])
    p = _cli(*args)
    assert "Traceback" not in p.stderr, p.stderr
    if p.returncode == 0:  # the reader may repair the meta with a warning; then it says so
        assert cmd == "report" or "steps" in p.stdout
    else:
        assert p.returncode == 2
        errors = [ln for ln in p.stderr.splitlines() if "error:" in ln]
        assert len(errors) == 1 and errors[0].startswith(f"gradguard {cmd}: error:"), p.stderr


def test_a_damaged_run_among_good_ones_is_listed_not_fatal(run_tree, tmp_path):
    d = _damaged(tmp_path)
    out, failed = make_report([run_tree, d], tmp_path / "r.html")
    text = out.read_text()
    assert "mlp/none" in text
    if failed:  # listed in the page, with the reason
        assert any("bad" in f for f in failed)


def test_printable_escapes_control_and_bidi_characters():
    assert printable("block0.attn.weight") == "block0.attn.weight"
    assert printable("Ünïcode 名前") == "Ünïcode 名前"
    assert printable(ESCAPES) == "\\x1b]0;owned\\x07\\x1b[2J"
    assert printable("a\u202eb\nc\x7f\x9b") == "a\\u202eb\\x0ac\\x7f\\x9b"
    for ch in map(chr, range(0x20)):
        assert "\x1b" not in printable(ch) and printable(ch).startswith("\\x")


def test_inspect_prints_control_characters_escaped(tmp_path):
    from rich.console import Console

    d = write_synthetic_run(tmp_path / "evil", steps=300, layers=3, name="run" + ESCAPES,
                            layer_names=[ESCAPES, "ok.weight", "b\x1b[31mred"])
    with open(d / "events.jsonl", "a") as f:
        f.write(json.dumps({"step": 299, "rule": "spike" + ESCAPES, "value": 9.0, "baseline": 1.0,
                            "action": "warn", "message": ESCAPES, "window": None, "time": 0.0,
                            "first_nonfinite_layer": ESCAPES,
                            "top_layers": [{"layer": ESCAPES, "norm": 9.0, "baseline": 1.0,
                                            "ratio": 9.0}]}) + "\n")
    buf = io.StringIO()
    inspect_run(open_run(d), console=Console(file=buf, width=200, color_system=None))
    out = buf.getvalue()
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b]0;owned\\x07\\x1b[2J" in out  # shown, escaped
    assert "b\\x1b[31mred" in out
    # through the command line too (what reaches the terminal)
    p = _cli("inspect", str(d))
    assert p.returncode == 0 and "\x1b" not in p.stdout and "\\x1b]0;owned" in p.stdout


def test_control_characters_stay_inert_in_the_html(tmp_path):
    from gradguard.report import render_html

    d = write_synthetic_run(tmp_path / "evil", steps=50, layers=2, name="r" + ESCAPES,
                            layer_names=[ESCAPES, "ok"])
    text = render_html([open_run(d)])
    assert "\x1b" not in text and "\x07" not in text  # JSON-escaped in the data block
    assert "\\u001b]0;owned\\u0007" in text
