"""The README's quickstart runs exactly as written."""

from __future__ import annotations

import pathlib
import re
import runpy

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def quickstart_code() -> str:
    text = README.read_text()
    block = re.search(r"<!-- quickstart -->\s*```python\n(.*?)```\s*<!-- /quickstart -->", text, re.S)
    assert block, "README.md has no quickstart block"
    return block.group(1)


def test_quickstart_runs_as_written(tmp_path, monkeypatch, capsys):
    script = tmp_path / "quickstart.py"
    script.write_text(quickstart_code())
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert re.search(r"grad norm \d+\.\d+, skipped 0 of 100", out), out


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text


def test_public_names_resolve_and_import_is_light():
    import subprocess
    import sys

    code = ("import sys, gradguard as gg, gradguard.monitor as mon; gg.load_run; mon.Run; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert sorted(gg.__all__) == sorted(gg._EXPORTS); "
            "assert sorted(mon.__all__) == sorted(mon._EXPORTS); "
            "[getattr(gg, n) for n in gg.__all__]; [getattr(mon, n) for n in mon.__all__]; "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=300)
    assert out.stdout.strip() == "ok"
