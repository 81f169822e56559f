"""The code's shape: no import cycles among the project's modules, and the claim loop's bench runs
(on a small synthetic queue: a real journal file, nothing trained). No timing assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_import_cycles():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "import_cycles.py")], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("0 import cycles"), out.stdout + out.stderr


def test_import_cycle_counter_sees_a_cycle(tmp_path):
    """The counter is not blind: a two-module ring (one import lazy, inside a function) is found."""
    for pkg in ("ablations", "senet"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "ablations" / "a.py").write_text("from ablations.b import x\n")
    (tmp_path / "ablations" / "b.py").write_text("x = 1\ndef f():\n    from ablations import a\n")
    (tmp_path / "senet" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                             "    from ablations.a import x\n")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "import_cycles.py"), "--root", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "ablations.a -> ablations.b -> ablations.a" in out.stdout
    assert out.stdout.strip().endswith("1 import cycles")


def test_claim_bench_drains_a_synthetic_queue(tmp_path):
    out = tmp_path / "claims.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "claim_cost.py"), "--cells", "40", "--json-out", str(out)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    (row,) = json.loads(out.read_text())
    assert row["cells"] == 40 and row["loop"] == "current" and row["cpu_s"] > 0 and row["cpu_ms_per_cell"] > 0
