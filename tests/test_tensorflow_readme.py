"""The README's Keras and TensorFlow quickstarts run exactly as written."""

from __future__ import annotations

import os
import pathlib
import re
import runpy

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
pytest.importorskip("tensorflow")

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def block(tag: str) -> str:
    m = re.search(rf"<!-- {tag} -->\s*```python\n(.*?)```\s*<!-- /{tag} -->", README.read_text(), re.S)
    assert m, f"README.md has no {tag} block"
    return m.group(1)


def _run(tag, tmp_path, monkeypatch, capsys) -> str:
    script = tmp_path / f"{tag}.py"
    script.write_text(block(tag))
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(script), run_name="__main__")
    return capsys.readouterr().out


def test_keras_quickstart_runs_as_written(tmp_path, monkeypatch, capsys):
    out = _run("quickstart-keras", tmp_path, monkeypatch, capsys)
    assert re.search(r"grad norm \d+\.\d+, skipped 1 of 100", out), out
    import gradguard as gg

    run = gg.load_run(tmp_path / "runs" / "quickstart-keras")
    assert len(run.steps) == 100 and int(run.steps.skipped.sum()) == 1


def test_tensorflow_quickstart_runs_as_written(tmp_path, monkeypatch, capsys):
    out = _run("quickstart-tf", tmp_path, monkeypatch, capsys)
    assert re.search(r"global norm \d+\.\d+", out), out
