"""The docs stay true: each statement a newcomer acts on is checked against what it describes (the
versions the suite runs with, the presets, the bench scripts, the paper's tables, the data's source).
Cheap: files are read, nothing trains."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from ablations.cli import main
from ablations.report.paper import TABLES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def requirement(name: str) -> str:
    """The dependency as pyproject.toml writes it, e.g. 'torch>=2.14.1,<2.15'."""
    (req,) = [r for r in PYPROJECT["project"]["dependencies"] if Requirement(r).name == name]
    return req


def section(text: str, heading: str) -> str:
    """A Markdown section's text, up to the next heading of the same or a higher level."""
    level = heading.split(" ")[0]
    start = text.index(heading + "\n")
    nxt = re.search(rf"^#{{1,{len(level)}}} ", text[start + len(heading):], re.M)
    return text[start:start + len(heading) + (nxt.start() if nxt else len(text))]


def test_the_torch_claim_is_what_the_suite_runs_with():
    """pyproject asks for the torch/torchvision release the suite runs on here, CI installs one inside
    it, and the README says the same."""
    versions = {"torch": Version(torch.__version__.split("+")[0]),
                "torchvision": Version(torchvision.__version__.split("+")[0])}
    pins = dict(re.findall(r"(torch|torchvision)==([\d.]+)", (ROOT / ".ci" / "run").read_text()))
    for name, running in versions.items():
        written = requirement(name)
        spec = Requirement(written).specifier
        assert running in spec, f"the suite runs with {name} {running}, outside pyproject's {spec}"
        assert Version(pins[name]) in spec, f".ci/run installs {name} {pins[name]}, outside {spec}"
        assert f"`{written}`" in README, f"README does not state pyproject's {written}"
    assert f"tested with torch {pins['torch']} and torchvision {pins['torchvision']} only" in README
    assert "supports torch 2.4" not in README


def test_the_smoke_comment_agrees_with_the_readme():
    """experiments.yaml's smoke comment quotes the wall time the README's "How long?" table gives."""
    text = (ROOT / "experiments.yaml").read_text(encoding="utf-8")
    comment = text[:text.index("\n  smoke:")].rsplit("\n\n", 1)[-1]
    comment = "\n".join(line for line in comment.splitlines() if line.strip().startswith("#"))
    figures = re.findall(r"\d[\d,.-]* s\b", comment)
    assert figures, comment
    row = next(line for line in section(README, "## How long?").splitlines() if line.startswith("| `--preset smoke`"))
    for figure in figures:
        assert figure in row, (figure, row)
    assert "minutes not hours" not in comment and "images/s" not in comment
    assert yaml.safe_load(text)["presets"]["smoke"]["train"]["epochs"] == 1 and "1 epoch on 320 images" in row


def test_how_long_marks_every_figure_and_defines_every_mark():
    """Each cell of the table is measured, derived or estimated, and each mark is explained below it."""
    text = section(README, "## How long?")
    rows = [line for line in text.splitlines() if line.startswith("| `--preset") or line.startswith("| no preset")]
    assert [r.split("|")[1].split("(")[0].strip() for r in rows] == \
        ["`--preset smoke`", "`--preset quick`", "`--preset cpu`", "no preset: the default recipe"]
    used = set()
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")[1:]]
        assert len(cells) == 4, row
        for cell in cells:
            marks = re.findall(r"\[([MDE]\d+)\]", cell)
            assert marks or cell.startswith("no: "), f"unmarked figure: {cell!r}"
            used.update(marks)
    defined = set(re.findall(r"^- \[([MDE]\d+)\] ", text, re.M))
    assert used == defined, (used, defined)
    assert "CPU, 2 cores" in text and "one GPU" in text and "Imagenette" in text


def test_imagenette_source_is_named_with_its_checksum_and_the_sample_command_resolves(tmp_path, monkeypatch, capsys):
    from torchvision.datasets import Imagenette

    url, md5 = Imagenette._ARCHIVES["320px"]  # what torchvision verifies the archive against
    assert "`imagenette2-320.tgz`" in README and url in README and f"MD5 `{md5}`" in README
    command = re.search(r"python run_ablation.py --grid imagenet_reduction --preset smoke .*?\n.*?\n", README).group(0)
    argv = command.replace("\\\n", " ").split()[2:]
    sample = argv[argv.index("--data-root") + 1]
    assert sample == "../shared/data/imagenette-224-mini.tar.gz"
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--config", str(ROOT / "experiments.yaml"), "--dry-run", "--json", "--device", "cpu"]) == 0
    assert '"test_size": 100' in capsys.readouterr().out


def test_the_notebook_has_an_extra_and_a_command():
    extra = [Requirement(r).name for r in PYPROJECT["project"]["optional-dependencies"]["notebook"]]
    assert "jupyterlab" in extra and "ipykernel" in extra
    assert 'pip install -e ".[notebook]"' in README and "jupyter lab notebooks/ablation_results.ipynb" in README
    assert (ROOT / "notebooks" / "ablation_results.ipynb").is_file()


def test_bench_readme_names_the_scripts_that_need_a_device():
    text = (ROOT / "bench" / "README.md").read_text(encoding="utf-8")
    needs = {p.name for p in (ROOT / "bench").glob("*.py")
             if re.search(r"add_argument\(\"--device\", required=True", p.read_text(encoding="utf-8"))}
    named = text[text.index("The scripts that time a model"):text.index("The others take no `--device`")]
    assert set(re.findall(r"`(\w+\.py)`", named)) == needs
    others = text[text.index("The others take no `--device`"):].split("\n\n")[0]
    scripts = {p.name for p in (ROOT / "bench").glob("*.py") if not p.name.startswith("_") and p.name != "benchlib.py"}
    assert set(re.findall(r"`(\w+\.py)`", others)) == scripts - needs


def test_bench_json_paths_are_written_one_way():
    for doc in ("README.md", "bench/README.md", "bench/RESULTS.md"):
        for path in re.findall(r"--json-out (bench/[\w./-]+)", (ROOT / doc).read_text(encoding="utf-8")):
            assert path.startswith("bench/results/") and path.endswith(".json"), (doc, path)


@pytest.mark.parametrize("doc", ["README.md", "results/README.md", "bench/README.md", "bench/RESULTS.md",
                                 "bench/device/README.md", "tests/test_bench.py"])
def test_the_product_speaks_of_itself(doc):
    """No word about the environment it was built in or how machines were obtained, no issue numbers."""
    text = (ROOT / doc).read_text(encoding="utf-8").lower()
    for phrase in ("workplace", "been lent", "lent to", "lent gpu", "the issue", "issue's", "(issue "):
        assert phrase not in text, (doc, phrase)


def test_stage_5_is_called_an_extension_where_table_13_is_mirrored():
    assert TABLES[13].row("stages=5").top1 is None  # the paper has no such row
    mirrored = README[README.index("the stage grid mirrors"):][:400]
    assert "stage 5 only: an extension that\nthe paper's table does not have" in mirrored
