"""The IDX reader (with a tiny MNIST the test writes) and ``gradguard demo`` run in-process."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
import torch

from gradguard.cli import main
from gradguard.experiments import seed_mlp, seq_lstm
from gradguard.experiments.idx import find_mnist, load_mnist, read_idx, write_idx
from gradguard.experiments.strategies import strategies


def _tiny_mnist(folder, n_train=40, n_test=20, gz=False):
    """Images whose class is readable (a bright row at the label's index), IDX-encoded."""
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        images[np.arange(n), labels * 2 + 3, :] = 255
        write_idx(folder / f"{prefix}-images-idx3-ubyte{sfx}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{sfx}", labels)
    return folder


def test_idx_bytes_by_hand(tmp_path):
    # header written independently of write_idx: magic 0x00000803, dims big-endian
    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 2, 3, 4) + data.tobytes()
    (tmp_path / "a.idx").write_bytes(raw)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx"), data)
    with gzip.open(tmp_path / "a.idx.gz", "wb") as f:
        f.write(raw)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx.gz"), data)
    # big-endian int32 and float32 payloads come back in native order
    ints = np.array([1, -2, 70000], dtype=np.int32)
    raw = bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 3) + ints.astype(">i4").tobytes()
    (tmp_path / "b.idx").write_bytes(raw)
    np.testing.assert_array_equal(read_idx(tmp_path / "b.idx"), ints)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_roundtrip(tmp_path, dtype):
    a = (np.arange(60) - 20).reshape(3, 4, 5).astype(dtype)
    write_idx(tmp_path / "x.idx", a)
    b = read_idx(tmp_path / "x.idx")
    assert b.dtype == np.dtype(dtype) and b.shape == a.shape
    np.testing.assert_array_equal(a, b)


def test_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    (tmp_path / "type").write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="type"):
        read_idx(tmp_path / "type")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x00")
    with pytest.raises(ValueError, match="data bytes"):
        read_idx(tmp_path / "short")
    with pytest.raises(ValueError, match="dtype"):
        write_idx(tmp_path / "c.idx", np.zeros(2, dtype=np.complex64))


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_and_train_on_it(tmp_path, gz):
    _tiny_mnist(tmp_path, gz=gz)
    xtr, ytr, xte, yte = load_mnist(tmp_path)
    assert xtr.shape == (40, 28, 28) and xte.shape == (20, 28, 28)
    assert ytr.dtype == np.int64 and yte.shape == (20,)
    torch.set_num_threads(1)
    cfg = seq_lstm.LSTMConfig(epochs=1, hidden=8, batch_size=20, mnist_dir=str(tmp_path))
    r = seq_lstm.run(strategies()[2], 0, cfg)
    assert r.history.steps == 2 and 0.0 <= r.value <= 1.0
    assert "MNIST" in cfg.describe()


def test_find_mnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        find_mnist(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="train-images"):
        find_mnist(tmp_path)
    # Kaggle-style names with a dot are found too
    _tiny_mnist(tmp_path)
    for p in list(tmp_path.iterdir()):
        p.rename(tmp_path / p.name.replace("-idx", ".idx"))
    assert set(find_mnist(tmp_path)) == {"train_images", "train_labels", "test_images", "test_labels"}


def test_demo_table_in_process(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rc = main(["demo", "--tiny", "--seeds", "2", "--only", "mlp", "--no-progress", "--jobs", "1",
               "--runs-dir", str(tmp_path / "runs"), "--no-report", "--json", str(out),
               "--strategies", "none", "global norm", "--curves", "--markdown"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "seed MLP" in text and "global norm 1" in text and "none" in text
    assert "loss against steps" in text
    assert "| seed MLP (train MSE) | none | nan | diverged | 0,0 | 0% | 0 |" in text
    rows = json.loads(out.read_text())
    assert [r["strategy"] for r in rows] == ["none", "global norm 1"]
    none, clip = rows
    assert none["first_nonfinite_epoch"] == [0, 0]  # the seed's explosion, both seeds
    assert clip["first_nonfinite_epoch"] == [None, None] and len(clip["values"]) == 2
    assert clip["clip_rate"] > 0.9 and clip["skipped_steps"] == 0
    import gradguard as gg

    if hasattr(gg, "Monitor"):  # one run folder per experiment and strategy (seed 0)
        folders = sorted(p.name for p in (tmp_path / "runs" / "mlp").iterdir())
        assert folders == ["global-norm-1", "none"]
        run = gg.load_run(tmp_path / "runs" / "mlp" / "global-norm-1")
        assert len(run.steps) == seed_mlp.MLPConfig().tiny().total_steps()  # seed 0 only


def test_parallel_jobs_give_the_same_rows():
    from gradguard.experiments.suite import plan, run_suite

    exps = plan("quick", only=["mlp"], tiny=True)
    kw = dict(names=["none", "global norm"], run_dir=None, progress=False)
    one, _ = run_suite(exps, "quick", 2, jobs=1, **kw)
    two, _ = run_suite(exps, "quick", 2, jobs=2, **kw)
    assert [r.strategy for r in two] == ["none", "global norm 1"]
    for a, b in zip(one, two):
        assert [x.seed for x in b.results] == [0, 1]
        np.testing.assert_equal(a.to_dict()["epoch_loss"], b.to_dict()["epoch_loss"])  # NaN == NaN


def test_demo_rejects_unknown_experiment(capsys):
    assert main(["demo", "--only", "gan", "--no-progress", "--no-runs"]) == 2
    assert "unknown experiment" in capsys.readouterr().err


def test_demo_and_its_report_need_only_the_core_and_scikit_learn(tmp_path):
    """`make demo` installs `.[demo]` only: the demo and its HTML report must not import
    matplotlib or any test-only extra (blocked here: importing them raises ImportError)."""
    import subprocess
    import sys

    blocked = ["matplotlib", "tensorboard", "wandb", "mlflow", "neptune", "selenium",
               "hypothesis", "pytest", "tensorflow", "keras", "jax", "optax", "triton",
               "pytorch_lightning", "lightning", "transformers", "accelerate"]
    code = ("import sys\n"
            f"for m in {blocked!r}: sys.modules[m] = None\n"
            "from gradguard.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    runs = tmp_path / "runs"
    p = subprocess.run(
        [sys.executable, "-c", code, "demo", "--tiny", "--seeds", "1", "--only", "mlp",
         "--strategies", "none", "global norm", "--jobs", "1", "--runs-dir", str(runs),
         "--report", str(runs / "report.html")],
        capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "report not written" not in p.stdout and "report:" in p.stdout
    assert (runs / "report.html").stat().st_size > 50_000
    assert (runs / "demo-results.json").exists()
