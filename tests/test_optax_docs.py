"""docs/optax.md's comparison table is what the script measures now, and the README's JAX
quickstart runs as written."""

from __future__ import annotations

import pathlib
import re
import runpy

import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_docs_table_matches_the_measurement():
    from gradguard.experiments.jax_seed import cases_markdown

    text = (ROOT / "docs" / "optax.md").read_text()
    block = re.search(r"<!-- optax-cases -->\n(.*?)\n<!-- /optax-cases -->", text, re.S)
    assert block, "docs/optax.md has no optax-cases block"
    assert block.group(1).strip() == cases_markdown().strip()


def test_readme_jax_quickstart_runs_as_written(tmp_path, monkeypatch, capsys):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- quickstart-jax -->\s*```python\n(.*?)```\s*<!-- /quickstart-jax -->",
                      text, re.S)
    assert block, "README.md has no JAX quickstart block"
    script = tmp_path / "quickstart_jax.py"
    script.write_text(block.group(1))
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert re.search(r"grad norm \d+\.\d+, skipped 0 of 100", out), out
    from gradguard.store import load_run

    assert len(load_run(tmp_path / "runs" / "quickstart-jax").steps) == 100
