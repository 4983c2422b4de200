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


def table_rows() -> list[list[str]]:
    """The README's framework table (section "Functional API"): one list of cells per row."""
    text = README.read_text()
    section = text[text.index("## Functional API"):]
    section = section[:section.index("\n## ", 1)]
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")]
            for ln in section.splitlines() if ln.startswith("| `gg.")]
    assert len(rows) == 5 and all(len(r) == 5 for r in rows), rows
    return rows


def _code(cell: str) -> str:
    m = re.match(r"`([^`]+)`", cell)
    assert m, f"no code in the cell {cell!r}"
    return m.group(1)


def test_framework_table_tensorflow_and_keras_cells_give_the_gradguard_cells_numbers():
    """Every row's TensorFlow and Keras cells run as written and give the numbers of the row's
    gradguard (torch) cell on the same gradients (torch weights are (out, in), TF/Keras kernels
    (in, out): compared transposed)."""
    import keras
    import numpy as np
    import tensorflow as tf
    import torch

    import gradguard as gg
    import gradguard.keras as ggk
    import gradguard.tensorflow as ggtf

    rng = np.random.default_rng(0)
    w0, b0 = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    gw, gb = (rng.normal(size=(3, 4)) * 2).astype(np.float32), rng.normal(size=3).astype(np.float32)
    c = v = 0.5
    for row in table_rows():
        gg_code, tf_code, keras_code = _code(row[0]), _code(row[2]), _code(row[3])
        # the gradguard cell, on torch parameters
        params = [torch.nn.Parameter(torch.tensor(w0)), torch.nn.Parameter(torch.tensor(b0))]
        params[0].grad, params[1].grad = torch.tensor(gw), torch.tensor(gb)
        out = eval(gg_code, {"gg": gg, "params": params, "max_norm": c, "clip_value": v})
        if "grad_norm(" in gg_code:
            want = [float(out.total)]
        else:
            want = [params[0].grad.numpy().T, params[1].grad.numpy()]
            assert not np.allclose(want[0], gw.T), f"{gg_code} did not clip: the check is void"
        # the TensorFlow cell, on the same gradients as tf tensors
        ns = {"ggtf": ggtf, "grads": [tf.constant(gw.T), tf.constant(gb)],
              "params": [tf.constant(w0.T), tf.constant(b0)], "c": c, "lo": -v, "hi": v}
        got = eval(tf_code, ns)
        got = got[0] if isinstance(got, tuple) else got
        got = [float(got)] if isinstance(got, tf.Tensor) else [t.numpy() for t in got]
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-5, err_msg=tf_code)
        # the Keras cell: the optimizer it builds, stepping SGD(lr=1) once; the clipped
        # gradient is what the weights moved by
        kvars = [keras.Variable(w0.T.copy()), keras.Variable(b0.copy())]
        kgrads = [tf.constant(gw.T), tf.constant(gb)]
        if keras_code.startswith("opt."):  # a read of a guarded optimizer's statistics
            guarded = ggk.GuardedOptimizer(keras.optimizers.SGD(1.0), clipper=None)
            guarded.apply(kgrads, kvars)
            got = [float(eval(keras_code, {"opt": guarded}).numpy())]
        else:
            guarded = eval(keras_code, {"ggk": ggk, "gg": gg, "opt": keras.optimizers.SGD(1.0),
                                        "c": c, "v": v})
            assert isinstance(guarded, ggk.GuardedOptimizer), keras_code
            guarded.apply(kgrads, kvars)
            got = [w0.T - kvars[0].numpy(), b0 - kvars[1].numpy()]
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=keras_code)
