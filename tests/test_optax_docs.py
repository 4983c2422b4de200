"""docs/optax.md's comparison table is what the script measures now, and the README's JAX
quickstart runs as written."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

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


def test_readme_jax_quickstart_runs_as_written(tmp_path):
    """The block, saved as a script and run by a fresh interpreter in an empty folder (as a
    user of a fresh clone would run it): prints its line and leaves a readable run."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- quickstart-jax -->\s*```python\n(.*?)```\s*<!-- /quickstart-jax -->",
                      text, re.S)
    assert block, "README.md has no JAX quickstart block"
    script = tmp_path / "quickstart_jax.py"
    script.write_text(block.group(1))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.fullmatch(r"grad norm \d+\.\d+, skipped 0 of 100\n", out.stdout), out.stdout
    from gradguard.store import load_run

    run = load_run(tmp_path / "runs" / "quickstart-jax")
    assert list(run.steps["step"]) == list(range(100)) and run.meta["finished"]
    assert run.meta["layers"] == ["hidden/bias", "hidden/kernel", "out/bias", "out/kernel"]
