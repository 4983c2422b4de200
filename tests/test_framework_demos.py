"""``gradguard demo --framework NAME`` reaches each framework's demo."""

import importlib

import pytest

from gradguard import cli


def test_every_framework_names_a_demo():
    assert set(cli.DEMO_FRAMEWORKS) == {"torch", "jax", "keras", "tensorflow"}
    for name, module in cli.DEMO_FRAMEWORKS.items():
        if not module:
            continue
        pytest.importorskip({"jax": "jax", "keras": "keras", "tensorflow": "tensorflow"}[name])
        assert callable(importlib.import_module(module, "gradguard").demo)


def test_tensorflow_demo_prints_a_row_per_clip(capsys):
    pytest.importorskip("tensorflow")
    from gradguard.experiments import tf_seed

    assert cli.main(["demo", "--framework", "tensorflow", "--tiny"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split("|")[1].strip() for r in rows[1:]] == list(tf_seed.CLIPS)


def test_keras_demo_refuses_an_unknown_strategy(capsys):
    pytest.importorskip("keras")
    assert cli.main(["demo", "--framework", "keras", "--strategies", "nope"]) == 2
    assert "--strategies 'nope'" in capsys.readouterr().err
