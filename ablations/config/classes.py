"""What a dataset section implies for the model before any data is loaded: its class count and input size.

Cells are named by the config as trained, so `model.num_classes` is filled in from the dataset
section when the cells are expanded (ablations/config/cells.py), not when the data is loaded.
"""

from __future__ import annotations

from pathlib import Path

from ablations.config.schema import DatasetConfig, ExperimentConfig

KNOWN_CLASSES = {"cifar10": 10, "cifar100": 100, "synthetic": 10}
IMAGE_TREE_CLASSES = {"imagenette": 10, "imagewoof": 10, "imagenet": 1000}  # 224 px unless image_size


def with_num_classes(config: ExperimentConfig, num_classes: int) -> ExperimentConfig:
    return config.model_copy(update={"model": config.model.model_copy(update={"num_classes": num_classes})})


def _listed_classes(path: str, root: str) -> int | None:
    """How many ids a class list file names (the data package reads it for real, errors and all);
    None when it cannot be read here."""
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.is_file():
        p = Path(root).expanduser() / p
    try:
        lines = p.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    return sum(bool(line.split("#", 1)[0].strip()) for line in lines) or None


def expected_num_classes(ds: DatasetConfig, fallback: int) -> int:
    """The class count of a dataset without loading it."""
    if isinstance(ds.classes, str):  # a class list file (ImageNet-100)
        return _listed_classes(ds.classes, ds.root) or fallback
    if ds.classes:
        return len(ds.classes)
    if ds.name in KNOWN_CLASSES:
        return KNOWN_CLASSES[ds.name]
    train_dir = Path(ds.root) / "train"
    if train_dir.is_dir():
        return sum(p.is_dir() for p in train_dir.iterdir())
    return IMAGE_TREE_CLASSES.get(ds.name, fallback)


def expected_image_size(ds: DatasetConfig) -> int:
    return ds.image_size or (32 if ds.name in KNOWN_CLASSES or "cifar" in ds.root.lower() else 224)


def as_trained(config: ExperimentConfig) -> ExperimentConfig:
    """`config` with the class count its dataset implies, unless the file sets one."""
    if "num_classes" in config.model.model_fields_set:
        return config
    return with_num_classes(config, expected_num_classes(config.dataset, config.model.num_classes))
