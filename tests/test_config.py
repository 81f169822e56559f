"""experiments.yaml: schema, layered resolution, grid expansion, cell ids and error messages."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ablations.config import (
    ConfigError,
    ExperimentConfig,
    load_experiments,
    parse_seeds,
    parse_set,
    resolve_cells,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "experiments.yaml"


@pytest.fixture(scope="module")
def shipped():
    return load_experiments(SHIPPED)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "experiments.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_experiments(write(tmp_path, text))
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------- shipped file


def test_shipped_grids_expand(shipped):
    sizes = {"reduction": 6, "squeeze": 2, "excitation": 3, "stage": 6, "integration": 4, "se_3x3": 2, "nosqueeze": 3}
    assert list(shipped.grids) == list(sizes) + [f"imagenet_{g}" for g in sizes]  # tests/test_imagenet_grids.py
    for name, n_variants in sizes.items():
        grid = shipped.grids[name]
        assert grid.description and 10 <= grid.paper_table <= 16
        cells = resolve_cells(shipped, name)
        assert len(cells) == n_variants * 3
        assert {c.seed for c in cells} == {0, 1, 2}
        for c in cells:
            assert c.config.dataset.name == "cifar10" and c.config.dataset.root == "data"
            assert c.config.seed == c.seed and c.grid == name
    assert {c.config.model.arch for c in resolve_cells(shipped, "se_3x3")} == {"resnet50_cifar"}


def test_reduction_grid(shipped):
    cells = resolve_cells(shipped, "reduction")
    assert len(cells) == 18
    assert cells[0].variant == "baseline" and cells[0].axes == {} and cells[0].config.model.se is None
    variants = list(dict.fromkeys(c.variant for c in cells))
    assert variants == ["baseline", "r=2", "r=4", "r=8", "r=16", "r=32"]
    for c in cells:
        if c.variant == "baseline":
            assert c.config.model.se is None
            continue
        assert c.config.model.se.reduction == c.axes["model.se.reduction"]
        assert c.config.model.se.squeeze == "avg"  # the rest of the default SE mapping survives
    assert cells[0].config.train == cells[1].config.train


def test_variant_names(shipped, tmp_path):
    names = lambda grid: list(dict.fromkeys(c.variant for c in resolve_cells(shipped, grid)))
    assert names("stage") == ["baseline", "stages=2", "stages=3", "stages=4", "stages=5", "stages=all"]
    assert names("nosqueeze") == ["baseline", "squeeze=none", "squeeze=avg"]
    assert names("se_3x3") == ["position=output", "position=3x3"]
    path = write(tmp_path, """
grids:
  g:
    description: two axes
    model: {arch: resnet18_cifar, se: {}}
    axes:
      model.se.squeeze: [max, avg]
      model.se.reduction: [8, 16]
      model.se.stages: [[2, 3], all]
""")
    cells = resolve_cells(load_experiments(path), "g")
    assert [c.variant for c in cells][:3] == ["squeeze=max, r=8, stages=2+3", "squeeze=max, r=8, stages=all", "squeeze=max, r=16, stages=2+3"]
    assert len(cells) == 8


def test_cell_id(shipped):
    cells = resolve_cells(shipped, "reduction")
    ids = [c.cell_id for c in cells]
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert ids == [c.cell_id for c in resolve_cells(load_experiments(SHIPPED), "reduction")]
    # paths are not identity; hyperparameters are
    moved = resolve_cells(shipped, "reduction", sets=["dataset.root=/elsewhere", "dataset.download=false"])
    assert [c.cell_id for c in moved] == ids
    faster = resolve_cells(shipped, "reduction", sets=["train.lr=0.2"])
    assert not set(c.cell_id for c in faster) & set(ids)


def test_cell_id_same_in_another_process(shipped):
    cells = resolve_cells(shipped, "stage")
    payload = json.dumps([c.config.model_dump(mode="json") for c in cells])
    child = (
        "import json, sys\n"
        "from ablations.config import ExperimentConfig, config_id\n"
        "print(json.dumps([config_id(ExperimentConfig.model_validate(d)) for d in json.load(sys.stdin)]))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", child], input=payload, capture_output=True, text=True, cwd=ROOT, env=env, check=True)
    assert json.loads(out.stdout) == [c.cell_id for c in cells]


# ----------------------------------------------------------------------------- resolution order


LAYERED = """
defaults:
  model: {arch: resnet20, se: {reduction: 4, squeeze: max}}
  train: {lr: 0.1, momentum: 0.9, weight_decay: 1.0e-4, gamma: 0.5, batch_size: 64, milestones: [0.3, 0.6, 0.9]}
  seeds: [0, 1, 2]
grids:
  g:
    description: layered
    model: {se: {reduction: 8}}
    train: {momentum: 0.8, weight_decay: 2.0e-4, gamma: 0.4, batch_size: 32, milestones: [0.5]}
    seeds: [3, 4]
    axes:
      train.batch_size: [4]
  plain:
    description: no SE anywhere
    model: {se: null}
    axes:
      train.lr: [0.05]
presets:
  p:
    train: {weight_decay: 3.0e-4, gamma: 0.3, batch_size: 16}
    seeds: [5]
"""


def test_resolution_order(tmp_path):
    exps = load_experiments(write(tmp_path, LAYERED))
    # gamma is read by the multistep schedule only (a --set no cell reads is an error)
    (cell,) = resolve_cells(exps, "g", preset="p", sets=["train.schedule=multistep", "train.gamma=0.2"])
    t = cell.config.train
    assert (t.lr, t.momentum, t.weight_decay, t.gamma, t.batch_size) == (0.1, 0.8, 3e-4, 0.2, 4)
    assert t.milestones == [0.5]  # lists replace
    se = cell.config.model.se
    assert (se.reduction, se.squeeze) == (8, "max")  # mappings merge
    assert resolve_cells(exps, "plain")[0].config.model.se is None
    # --set beats the preset, which beats the grid
    assert resolve_cells(exps, "g", sets=["train.weight_decay=0"])[0].config.train.weight_decay == 0
    assert resolve_cells(exps, "g", sets=["model.se=null"])[0].config.model.se is None
    # the axis has the last word: a --set of the swept key would have no effect, so it is an error
    with pytest.raises(ConfigError, match=r"^--set train.batch_size=8: no cell of grid g uses it: .*sweeps"):
        resolve_cells(exps, "g", sets=["train.batch_size=8"])


def test_seed_precedence(tmp_path):
    exps = load_experiments(write(tmp_path, LAYERED))
    assert [c.seed for c in resolve_cells(exps, "plain")] == [0, 1, 2]
    assert [c.seed for c in resolve_cells(exps, "g")] == [3, 4]
    assert [c.seed for c in resolve_cells(exps, "g", preset="p")] == [5]
    assert [c.seed for c in resolve_cells(exps, "g", preset="p", seeds=[7, 8])] == [7, 8]


def test_presets_of_shipped_file(shipped):
    cells = resolve_cells(shipped, "squeeze", preset="smoke")
    assert len(cells) == 2 and {c.seed for c in cells} == {0}
    c = cells[0].config
    assert (c.dataset.train_size, c.dataset.test_size, c.train.epochs, c.train.batch_size, c.train.lr) == (320, 200, 1, 32, 0.05)
    quick = resolve_cells(shipped, "squeeze", preset="quick")
    assert [x.seed for x in quick] == [0, 0, 1, 1] and quick[0].config.train.epochs == 5


def _sizes(cells) -> set[tuple[str, int | None, int | None]]:
    return {(c.config.dataset.name, c.config.dataset.train_size, c.config.dataset.test_size) for c in cells}


def test_a_preset_gives_a_dataset_its_own_values(shipped):
    """presets.P.datasets.<name> overrides the preset's dataset values in the cells of that dataset only."""
    assert _sizes(resolve_cells(shipped, "imagenet_reduction", preset="smoke")) == {("imagenette", 320, 100)}
    assert _sizes(resolve_cells(shipped, "imagenet_reduction", preset="quick")) == {("imagenette", 5000, 2000)}
    # the dataset as the cell has it, after --set: Imagewoof's values
    woof = resolve_cells(shipped, "imagenet_stage", preset="quick", sets=["dataset={name: imagewoof, root: w}"])
    assert _sizes(woof) == {("imagewoof", 5000, 2000)}
    # a --set beats the preset's values for the dataset
    assert _sizes(resolve_cells(shipped, "imagenet_squeeze", preset="smoke", sets=["dataset.test_size=50"])) == {
        ("imagenette", 320, 50)}
    assert _sizes(resolve_cells(shipped, "reduction", preset="smoke")) == {("cifar10", 320, 200)}


def test_presets_fit_the_datasets_they_run_on(shipped):
    """No preset asks a dataset for more images than it has (the full datasets' sizes the estimate uses)."""
    from ablations.run.estimate import DATASET_SIZES

    for preset in (name for name, p in shipped.presets.items() if p.dataset or p.datasets):
        for grid in shipped.grids:
            for name in ("imagenette", "imagewoof") if grid.startswith("imagenet_") else ("cifar10",):
                for c in resolve_cells(shipped, grid, preset=preset, sets=[f"dataset.name={name}"], seeds=[0]):
                    ds, (train, test) = c.config.dataset, DATASET_SIZES[name]
                    assert (ds.train_size or 0) <= train and (ds.test_size or 0) <= test, (preset, grid, name)


def test_per_dataset_values_leave_the_cifar_cells_as_they_were(shipped):
    """A study's store is keyed by cell ids: the CIFAR cells of every preset keep theirs."""
    plain = shipped.model_copy(update={"presets": {
        k: p.model_copy(update={"datasets": {}}) for k, p in shipped.presets.items()}})
    assert any(p.datasets for p in shipped.presets.values())
    for preset in shipped.presets:
        for grid in (g for g in shipped.grids if not g.startswith("imagenet_")):
            ids = [(c.cell_id, c.legacy_id) for c in resolve_cells(shipped, grid, preset=preset)]
            assert ids == [(c.cell_id, c.legacy_id) for c in resolve_cells(plain, grid, preset=preset)], (preset, grid)


# ----------------------------------------------------------------------------- malformed files


HEAD = """\
defaults:
  model: {arch: resnet20, se: {reduction: 16}}
  train: {epochs: 2, warmup_epochs: 0}
grids:
  x:
    description: d
"""
AXES = HEAD + "    axes:\n"

MALFORMED = {
    "unknown top-level key": (HEAD + "    axes: {model.se.reduction: [2]}\nfoo: 1\n", "foo: unknown key"),
    "unknown nested key": (HEAD.replace("epochs: 2,", "epoch: 2,") + "    axes: {model.se.reduction: [2]}\n", "defaults.train.epoch: unknown key"),
    "wrong type": (HEAD.replace("epochs: 2", "epochs: two") + "    axes: {model.se.reduction: [2]}\n", "defaults.train.epochs: 'two':"),
    "zero reduction in axis": (AXES + "      model.se.reduction: [2, 4, 0]\n", "grids.x.axes.model.se.reduction[2]: 0: Input should be greater than 0"),
    "bad enum in axis": (AXES + "      model.se.squeeze: [max, mean]\n", "grids.x.axes.model.se.squeeze[1]: 'mean':"),
    "r too large": (AXES + "      model.se.reduction: [16, 32]\n", "grids.x.axes.model.se.reduction[1]: r=32 is too large for stage 2 of resnet20"),
    "missing stage": (AXES + "      model.se.stages: [[2], [5]]\n", "grids.x.axes.model.se.stages[1]: stage 5 does not exist in resnet20"),
    "3x3 on basic blocks": (AXES + "      model.se.position: [output, 3x3]\n", "grids.x.axes.model.se.position[1]: '3x3' needs bottleneck blocks"),
    "empty axes": (HEAD + "    axes: {}\n", "grids.x.axes: {}:"),
    "empty axis list": (AXES + "      model.se.reduction: []\n", "grids.x.axes.model.se.reduction: []:"),
    "non-list axis value": (AXES + "      model.se.reduction: 8\n", "grids.x.axes.model.se.reduction: 8: Input should be a valid list"),
    "duplicate axis value": (AXES + "      model.se.reduction: [2, 4, 2]\n", "grids.x.axes.model.se.reduction[2]: 2: duplicate value"),
    "unknown axis key": (AXES + "      model.se.reductio: [2]\n", "grids.x.axes.model.se.reductio: unknown key"),
    # a float field takes YAML 1.1's string form of a number (1e-3 has no dot), so 0.1 and '0.1' collide
    "colliding variant names": (AXES + "      train.lr: [0.1, '0.1']\n", "grids.x.axes: two variants are named 'lr=0.1'"),
    "quoted int (strict)": (AXES + "      model.se.reduction: [2, '4']\n", "grids.x.axes.model.se.reduction[1]: '4': a string, not an integer"),
    "bad YAML": (AXES + "      model.se.reduction: [2, 4\n  y: 1\n", "{file}:9: invalid YAML:"),
    "duplicate YAML key": (AXES + "      model.se.reduction: [2]\n  x: {description: e, axes: {model.se.reduction: [4]}}\n", "{file}:9: invalid YAML: duplicate key 'x'"),
    "warmup >= epochs": (HEAD.replace("warmup_epochs: 0", "warmup_epochs: 2") + "    axes: {model.se.reduction: [2]}\n", "defaults.train.warmup_epochs: 2: must be less than epochs (2)"),
    "milestones not increasing": (
        HEAD.replace("warmup_epochs: 0", "warmup_epochs: 0, schedule: multistep, milestones: [0.5, 0.3]") + "    axes: {model.se.reduction: [2]}\n",
        "defaults.train.milestones: [0.5, 0.3]: must be strictly increasing",
    ),
    "milestone out of range": (HEAD.replace("warmup_epochs: 0", "warmup_epochs: 0, milestones: [0.5, 1.5]") + "    axes: {model.se.reduction: [2]}\n", "defaults.train.milestones[1]: 1.5:"),
    "bad grid override": (AXES + "      model.se.reduction: [2]\n    train: {lr: -1}\n", "grids.x.train.lr: -1: Input should be greater than 0"),
    "unknown key in grid override": (AXES + "      model.se.reduction: [2]\n    model: {se: {reductio: 3}}\n", "grids.x.model.se.reductio: unknown key"),
    "grid override breaks the model": (AXES + "      model.se.squeeze: [avg]\n    model: {se: {reduction: 32}}\n", "grids.x.model.se.reduction: r=32 is too large"),
    "unknown key in preset": (AXES + "      model.se.reduction: [2]\npresets:\n  p: {train: {epoch: 1}}\n", "presets.p.train.epoch: unknown key"),
    "preset dataset values: unknown key": (AXES + "      model.se.reduction: [2]\npresets:\n  p: {datasets: {imagenette: {train_sizee: 5}}}\n",
                                           "presets.p.datasets.imagenette.train_sizee: unknown key"),
    "preset dataset values: bad value": (AXES + "      model.se.reduction: [2]\npresets:\n  p: {datasets: {imagewoof: {test_size: 0}}}\n",
                                         "presets.p.datasets.imagewoof.test_size: 0: Input should be greater than 0"),
    "preset dataset values: no such dataset": (AXES + "      model.se.reduction: [2]\npresets:\n  p: {datasets: {imagenet_te: {test_size: 5}}}\n",
                                               "presets.p.datasets.imagenet_te: no such dataset (have: cifar10, cifar100, imagefolder,"),
    "preset dataset values: a name": (AXES + "      model.se.reduction: [2]\npresets:\n  p: {datasets: {imagenette: {name: imagewoof}}}\n",
                                      "presets.p.datasets.imagenette.name: the key imagenette names the dataset"),
    "preset dataset values: not a mapping": (AXES + "      model.se.reduction: [2]\npresets:\n  p: {datasets: {imagenette: 100}}\n",
                                             "presets.p.datasets.imagenette: 100: Input should be a valid dictionary"),
    "grid without description": ("grids:\n  x: {axes: {model.se.reduction: [2]}}\n", "grids.x.description: Field required"),
    "variants resolve to the same config": (AXES + "      model.se: [null]\n    baseline: true\n", "grids.x: variants 'baseline' and 'se=none'"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_file(tmp_path, case):
    text, expected = MALFORMED[case]
    expected = expected.replace("{file}", str(tmp_path / "experiments.yaml"))
    assert error_of(tmp_path, text).startswith(expected)


def test_paths_are_exact(tmp_path):
    # startswith: the path comes first, exactly as written
    assert error_of(tmp_path, MALFORMED["zero reduction in axis"][0]) == (
        "grids.x.axes.model.se.reduction[2]: 0: Input should be greater than 0"
    )
    assert error_of(tmp_path, MALFORMED["unknown axis key"][0]) == "grids.x.axes.model.se.reductio: unknown key"
    assert error_of(tmp_path, MALFORMED["r too large"][0]) == (
        "grids.x.axes.model.se.reduction[1]: r=32 is too large for stage 2 of resnet20: 16 channels // 32 = 0 hidden units"
    )


def test_empty_missing_and_non_mapping_files(tmp_path):
    assert error_of(tmp_path, "# only a comment\n").endswith("experiments.yaml: empty file")
    assert "top level must be a mapping" in error_of(tmp_path, "- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such file$"):
        load_experiments(tmp_path / "nope.yaml")


# ----------------------------------------------------------------------------- command line


def test_resolve_cells_errors(shipped):
    def err(**kw) -> str:
        with pytest.raises(ConfigError) as info:
            resolve_cells(shipped, kw.pop("grid", "reduction"), **kw)
        return str(info.value)

    cifar = "reduction, squeeze, excitation, stage, integration, se_3x3, nosqueeze"
    imagenet = ", ".join(f"imagenet_{g}" for g in cifar.split(", "))
    assert err(grid="foo") == f"--grid foo: no such grid (have: {cifar}, {imagenet})"
    assert err(preset="foo") == "--preset foo: no such preset (have: cpu, smoke, quick)"
    assert err(sets=["train.epoch=5"]) == "--set train.epoch=5: unknown key"
    assert err(sets=["train.epochs=abc"]).startswith("--set train.epochs=abc: 'abc':")
    assert err(sets=["model.se.squeeze=mean"]).startswith("--set model.se.squeeze=mean: 'mean':")
    # a cross-field problem is blamed on what introduced it, not on the default it clashes with
    assert err(sets=["train.epochs=1"]).startswith("--set train.epochs=1: train.warmup_epochs:")
    # the axis value that breaks the model is named, even though --set chose the backbone
    assert err(sets=["model.arch=resnet20"]).startswith("grids.reduction.axes.model.se.reduction[4]: r=32 is too large for stage 2 of resnet20")
    assert err(grid="squeeze", sets=["model.arch=resnet20", "model.se.reduction=32"]).startswith(
        "--set model.se.reduction=32: r=32 is too large"
    )
    assert err(seeds=[1, 1]) == "--seeds: 1 repeats"
    assert err(seeds=[]).startswith("--seeds:")


def _dry_run_configs(capsys, *args: str) -> list[dict]:
    """The configs `--dry-run --json` resolves, one per cell, through the command line in this process."""
    from ablations.cli import main

    assert main(["--config", str(SHIPPED), "--dry-run", "--json", "--device", "cpu", "--seeds", "0", *args]) == 0
    return [row["config"] for row in json.loads(capsys.readouterr().out)]


def test_a_later_set_of_a_sub_key_merges_into_an_earlier_mapping(capsys):
    """The README's pair in either order: the mapping's other keys stay, the sub-key is the later one's."""
    mapping = "dataset={name: imagewoof, root: data/imagewoof2-320}"
    for sets in ([mapping, "dataset.image_size=128"], ["dataset.image_size=128", mapping]):
        configs = _dry_run_configs(capsys, "--grid", "imagenet_reduction", *(a for s in sets for a in ("--set", s)))
        assert len(configs) == 6
        assert {(c["dataset"]["name"], c["dataset"]["root"], c["dataset"]["image_size"]) for c in configs} == {
            ("imagewoof", "data/imagewoof2-320", 128)}  # the mapping has no image_size: it merges either way


def test_a_set_whose_every_key_later_sets_replace_is_an_error(shipped):
    """Only when each key an earlier --set gave is overwritten does it reach no cell."""
    with pytest.raises(ConfigError) as info:
        resolve_cells(shipped, "imagenet_reduction",
                      sets=["dataset={name: imagewoof, image_size: 128}", "dataset.name=imagenette", "dataset.image_size=224"])
    assert str(info.value) == ("--set dataset={name: imagewoof, image_size: 128}: no cell of grid imagenet_reduction "
                               "uses it: the later --set dataset.image_size=224 replaces it")
    # one key left standing is enough
    (cell,) = resolve_cells(shipped, "imagenet_reduction", seeds=[0],
                            sets=["dataset={name: imagewoof, image_size: 128}", "dataset.name=imagenette"])[:1]
    assert (cell.config.dataset.name, cell.config.dataset.image_size) == ("imagenette", 128)


def test_preset_blamed(tmp_path):
    # the preset is fine on the defaults (checked at load) but clashes with grid g's warmup
    text = LAYERED.replace("batch_size: 16}", "batch_size: 16, epochs: 2}").replace("momentum: 0.8,", "momentum: 0.8, warmup_epochs: 2,")
    exps = load_experiments(write(tmp_path, text))
    with pytest.raises(ConfigError, match=r"^presets\.p: train\.warmup_epochs: 2: must be less than epochs \(2\)$"):
        resolve_cells(exps, "g", preset="p")
    # a preset that cannot work even on the defaults fails at load
    text = LAYERED.replace("batch_size: 16}", "batch_size: 16, epochs: 1}").replace("lr: 0.1,", "lr: 0.1, warmup_epochs: 1,")
    assert error_of(tmp_path, text).startswith("presets.p: train.warmup_epochs: 1.0: must be less than epochs (1)")


@pytest.mark.parametrize(
    "item, expected",
    [
        ("train.epochs=5", ("train.epochs", 5)),
        ("train.lr=0.1", ("train.lr", 0.1)),
        ("model.se.stages=[2,3]", ("model.se.stages", [2, 3])),
        ("model.se=null", ("model.se", None)),
        ("train.nesterov=true", ("train.nesterov", True)),
        ("dataset.root=/data/cifar=10", ("dataset.root", "/data/cifar=10")),
        ("model.se.position=3x3", ("model.se.position", "3x3")),
    ],
)
def test_parse_set(item, expected):
    assert parse_set(item) == expected


@pytest.mark.parametrize("item", ["train.epochs", "=5", "train..lr=1", "train.lr=", "model.se.stages=[2,3", "a b=1"])
def test_parse_set_rejects(item):
    with pytest.raises(ConfigError) as info:
        parse_set(item)
    assert str(info.value).startswith(f"--set {item}: ")


def test_parse_seeds():
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds(" 7 ") == [7]
    assert parse_seeds("3, 1") == [3, 1]
    for bad in ("", "a", "1,,2", "1,1", "-1", "0.5"):
        with pytest.raises(ConfigError, match=r"^--seeds: "):
            parse_seeds(bad)


def test_experiment_config_is_strict():
    cells_cfg = {"dataset": {}, "model": {"arch": "resnet20"}, "train": {}, "seed": 0}
    ExperimentConfig.model_validate(cells_cfg)
    with pytest.raises(Exception):
        ExperimentConfig.model_validate({**cells_cfg, "train": {"warmup_epochs": 40}})
