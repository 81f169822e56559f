"""The code's shape: no import cycles, upward imports between layers or private names taken across
packages among the project's modules (bench/import_cycles.py, checked on tiny synthetic trees too),
and the claim loop's bench runs (on a small synthetic queue: a real journal file, nothing trained).
No timing assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


CHECKER = ROOT / "bench" / "import_cycles.py"


def _tree(root: Path, files: dict[str, str]) -> Path:
    """A synthetic project: ablations/ and senet/ with empty __init__.py files, plus `files` (path -> source)."""
    for pkg in ("ablations", "senet"):
        (root / pkg).mkdir(parents=True, exist_ok=True)
        (root / pkg / "__init__.py").touch()
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.parent.name != "ablations" and not (path.parent / "__init__.py").exists():
            (path.parent / "__init__.py").touch()  # a subpackage
        path.write_text(text)
    return root


def _check(root: Path | None = None) -> tuple[int, str]:
    cmd = [sys.executable, str(CHECKER)] + (["--root", str(root)] if root else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert not out.stderr, out.stderr
    return out.returncode, out.stdout


def _count(stdout: str, what: str) -> int:
    """The number on the checker's summary line ending in `what` ('import cycles', 'upward imports', ...)."""
    (line,) = [ln for ln in stdout.splitlines() if ln.endswith(what) and ln[:1].isdigit()]
    return int(line.split()[0])


def test_no_import_cycles():
    """The real tree: no cycle (TYPE_CHECKING and lazy imports count), no upward import between layers,
    no private name taken from another package, no module outside the layers."""
    out = subprocess.run([sys.executable, str(CHECKER)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("0 import cycles"), out.stdout + out.stderr
    for what in ("modules outside the layers", "upward imports", "private imports across packages"):
        assert _count(out.stdout, what) == 0, out.stdout


def test_checker_passes_a_tree_that_keeps_the_rules(tmp_path):
    """No false alarms: downward and sideways imports, private names inside one package, dunders."""
    rc, out = _check(_tree(tmp_path, {
        "ablations/errors.py": "class BadInput(Exception): ...\n",
        "ablations/util/fs.py": "from ablations.errors import BadInput\n",
        "senet/resnet.py": "from ablations.util.fs import BadInput\n",
        "ablations/config/__init__.py": "from senet.resnet import BadInput\n",
        "ablations/run/storage.py": "def _lock(): ...\n",
        "ablations/run/runner.py": "from ablations.run.storage import _lock\nfrom ablations import __doc__\n"
                                   "from ablations.config import BadInput\n",
        "ablations/cli.py": "import ablations.run.runner as runner\nrunner.main = None\n",
    }))
    assert rc == 0, out
    assert [_count(out, w) for w in ("modules outside the layers", "upward imports", "private imports across packages",
                                     "import cycles")] == [0, 0, 0, 0], out


def test_checker_counts_a_type_checking_only_cycle(tmp_path):
    """A ring closed only by an import under `if TYPE_CHECKING:` is a cycle."""
    rc, out = _check(_tree(tmp_path, {
        "ablations/report/analysis.py": "from ablations.report.role_plots import draw\n",
        "ablations/report/role_plots.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                          "    from ablations.report.analysis import Stats\ndef draw(): ...\n",
    }))
    assert rc == 1 and "ablations.report.analysis -> ablations.report.role_plots -> ablations.report.analysis" in out
    assert _count(out, "import cycles") == 1 and _count(out, "upward imports") == 0, out


def test_checker_catches_upward_imports(tmp_path):
    """A lower layer importing a higher one, lazily or for types only, is reported with file and line."""
    rc, out = _check(_tree(tmp_path, {
        "ablations/train/loop.py": "def train(): ...\n",
        "ablations/data/__init__.py": "import os\n\ndef load():\n    from ablations.train.loop import train\n",
        "senet/se.py": "import typing\nif typing.TYPE_CHECKING:\n    from ablations.config import ModelConfig\n",
        "ablations/config/__init__.py": "ModelConfig = dict\n",
        "ablations/report/__init__.py": "from ablations.train.loop import train\n",  # downward: fine
    }))
    assert rc == 1 and _count(out, "upward imports") == 2, out
    assert "ablations/data/__init__.py:4: ablations.data (data) imports ablations.train.loop (train)" in out
    assert "senet/se.py:3: senet.se (senet) imports ablations.config (config)" in out
    assert _count(out, "import cycles") == 0 and _count(out, "private imports across packages") == 0, out


def test_checker_catches_private_imports_across_packages(tmp_path):
    """`from M import _x`, `import M._x` and `M._x` on an imported module, M in another package; not inside one."""
    rc, out = _check(_tree(tmp_path, {
        "ablations/tracking.py": "def _pid_alive(pid): ...\n",
        "ablations/run/_paths.py": "def journal(): ...\n",
        "ablations/run/storage.py": "def _lock(): ...\n",
        "ablations/run/worker.py": "from ablations.run.storage import _lock\n",  # same package: fine
        "ablations/run/runner.py": "def alive(pid):\n    from ablations.tracking import _pid_alive\n",
        "ablations/report/__init__.py": "import ablations.tracking\nablations.tracking._pid_alive(1)\n",
        "ablations/cli.py": "from ablations.run._paths import journal\n",
    }))
    assert rc == 1 and _count(out, "private imports across packages") == 3, out
    assert "ablations/run/runner.py:2: ablations.run.runner takes ablations.tracking._pid_alive" in out
    assert "ablations/report/__init__.py:2: ablations.report takes ablations.tracking._pid_alive" in out
    assert "ablations/cli.py:1: ablations.cli takes ablations.run._paths" in out
    assert "_lock" not in out and _count(out, "upward imports") == 0 and _count(out, "import cycles") == 0, out


def test_checker_reports_a_module_outside_the_layers(tmp_path):
    """A new module must take its place in the layer order; ablations/__init__.py itself is neutral."""
    rc, out = _check(_tree(tmp_path, {"ablations/__init__.py": "from ablations.misc import x\n",
                                       "ablations/misc.py": "x = 1\n"}))
    assert rc == 1 and "ablations.misc is in no layer" in out and _count(out, "modules outside the layers") == 1, out


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


def test_a_plain_install_ships_every_subpackage():
    """pyproject.toml finds packages (no hand-kept list): every folder of ablations/ and senet/ with an
    __init__.py is in what `pip install .` installs."""
    import tomllib

    from setuptools import find_packages

    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    shipped = set(find_packages(str(ROOT), include=spec["include"]))
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for top in ("ablations", "senet")
               for p in (ROOT / top).rglob("__init__.py")}
    assert on_disk and on_disk <= shipped, on_disk - shipped
