"""Role of SE blocks (paper Section 7, Figs. 6 and 7): analysing finished runs of a grid from the MLflow store.

For one trained run: its config and weights are read back from the store, its dataset's test split
(balanced over classes) goes through the model while every SE block's excitations are recorded
(`ablations.report.excitations`, statistics defined in `ablations.report.blockstats`), and the
figures, block table and findings (`ablations.report.findings`) are written under results/ and
logged to the run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from mlflow import MlflowClient

from ablations.config import ExperimentConfig
from ablations.errors import BadInput, StoreError, WeightsError
from ablations.data import Dataset, Split, load_dataset, stratified_indices
from ablations.report.excitations import collect_excitations
from ablations.report.findings import write_outputs
from ablations.report.paths import check_output_dir, dataset_folder, safe_name
from ablations.report.run_artifacts import get_run, load_run
from ablations.util.device import resolve_device
from ablations.util.timefmt import eta, fmt_duration
from ablations.tracking import has_weights, runs_of
from senet import build_model

__all__ = ["analyze_grid", "analyze_run", "balanced_subset", "output_dir", "se_runs"]

_ARTIFACT_DIR = "role_of_se"


def balanced_subset(split: Split, max_images: int | None) -> Split:
    """At most `max_images` images, each class's first ones, spread over classes as equally as they allow
    (stratified_indices; test splits may be sorted by class)."""
    if max_images is None or max_images >= len(split):
        return split
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    labels = np.asarray(split.labels)
    keep = stratified_indices(labels, max_images)  # unseeded: the same images every time
    return Split(np.ascontiguousarray(split.images[keep]), labels[keep])


# --------------------------------------------------------------------------- one run from MLflow


def output_dir(results_dir: str | Path, dataset: str, grid: str, variant: str, seed: int | str,
               study_preset: str | None = None) -> Path:
    """results/<dataset>/<grid>/role_of_se/<variant>_seed<seed>/ (<dataset>-<preset> for a study preset)"""
    # the same folder names as the grid reports, so role_of_se sits beside them
    run_folder = safe_name(f"{variant}_seed{seed}")
    return Path(results_dir) / dataset_folder(dataset, study_preset) / safe_name(grid) / _ARTIFACT_DIR / run_folder


def _test_data(config: ExperimentConfig, data_root: str | None, cache_dir: str | Path | None) -> Dataset:
    ds = config.dataset
    data = load_dataset(ds.name, data_root or ds.root, classes=ds.classes, train_size=ds.train_size,
                        test_size=ds.test_size, subset_seed=ds.subset_seed, image_size=ds.image_size,
                        download=ds.download, cache_dir=cache_dir)
    if len(data.classes) != config.model.num_classes:
        raise BadInput(f"dataset {ds.name} has {len(data.classes)} classes, the model {config.model.num_classes}")
    return data


def _preset_note(preset: str | None, config: ExperimentConfig, study: str | None = None) -> str | None:
    """For a preset run: what it is (a pipeline check, or a study at its own scale), so that nobody reads it
    against the paper as if it were the paper's setting."""
    if not preset:
        return None
    if study:
        return (f"This run belongs to the {study}: a small CIFAR backbone trained briefly, not the paper's "
                "ImageNet ResNet-50, so its statistics are compared with Section 7 in shape, not in value.")
    images = config.dataset.train_size or "all"
    epochs = config.train.epochs
    return (f"This run was trained with the {preset} preset ({epochs} epoch{'' if epochs == 1 else 's'} on {images} "
            "training images): a check that the pipeline runs end to end, not a trained model, so its statistics "
            "are not compared with the paper's Section 7 findings.")


def analyze_run(tracking_uri: str, run_id: str, *, results_dir: str | Path = "results", data_root: str | None = None,
                device: str | torch.device = "cpu", max_images: int | None = None,
                cache_dir: str | Path | None = None, study: str | None = None) -> Path:
    """Excitation statistics and figures of one finished SE run; returns the folder they were written to.
    `study`: the label of the run's preset when that preset makes real results (a study of its own).

    Reads the run's `config.json` and `model/weights.pt`, evaluates its dataset's test split (at most
    `max_images`, balanced over classes; `data_root` replaces `dataset.root`), writes into
    results/<dataset>/<grid>/role_of_se/<variant>_seed<seed>/ and logs the same files to the run
    under `role_of_se/`.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    run = get_run(client, run_id)
    # A cell trained in another grid is linked into this one without weights: read them from the run that has them.
    config, state = load_run(client, run.data.tags.get("reused_from_run") or run_id)
    if config.model.se is None:
        raise BadInput(f"run {run_id} is the plain backbone: it has no SE blocks to analyse")
    device = resolve_device(device)
    data = _test_data(config, data_root, cache_dir)
    model = build_model(config.model)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # missing or unexpected keys, wrong shapes
        raise WeightsError(f"run {run_id}: model/weights.pt does not fit the run's model: "
                           f"{' '.join(str(exc).split())[:300]}") from None
    split = balanced_subset(data.test, max_images)
    batch = config.train.eval_batch_size or config.train.batch_size
    stats = collect_excitations(model, split, data, device=device, batch_size=batch)

    tags = run.data.tags
    grid = tags.get("grid") or client.get_experiment(run.info.experiment_id).name
    variant, seed = tags.get("variant", run_id[:8]), tags.get("seed", str(config.seed))
    preset = tags.get("preset") or None
    directory = output_dir(results_dir, tags.get("dataset", config.dataset.name), grid, variant, seed,
                           preset if study else None)
    label = f"{grid}, {study}" if study else f"{grid} ({preset} preset)" if preset else grid
    title = f"{label} / {variant}, seed {seed}: {config.model.arch} on {config.dataset.name} test ({stats.images} images)"
    write_outputs(stats, directory, title, _preset_note(preset, config, study))
    client.log_artifacts(run_id, str(directory), artifact_path=_ARTIFACT_DIR)
    return directory


# --------------------------------------------------------------------------- a grid


def _has_se(run) -> bool:
    params = run.data.params
    if run.data.tags.get("variant") == "baseline" or params.get("model.se") == "None":
        return False
    return any(k.startswith("model.se.") for k in params)


def se_runs(client: MlflowClient, grid: str, preset: str | None = None) -> list:
    """The FINISHED cell runs of a grid that have SE blocks, trained with `preset` (None: without
    one); the latest run per cell (re-runs replace)."""
    experiment = client.get_experiment_by_name(grid)
    if experiment is None:
        raise StoreError(f"no MLflow experiment named {grid!r}: run the grid first")
    latest: dict[str, object] = {}
    for run in runs_of(client, experiment.experiment_id, "attributes.status = 'FINISHED'"):
        cell = run.data.tags.get("cell_id")
        if cell is None or not _has_se(run):  # no cell_id: e.g. the grid's parent run
            continue
        if run.data.tags.get("preset", "") != (preset or ""):
            continue
        if cell not in latest or run.info.start_time > latest[cell].info.start_time:
            latest[cell] = run
    return sorted(latest.values(), key=lambda r: (r.data.tags.get("variant", ""), int(r.data.tags.get("seed", 0))))


def analyze_grid(tracking_uri: str, grid: str, *, results_dir: str | Path = "results", data_root: str | None = None,
                 device: str | torch.device = "cpu", max_images: int | None = None,
                 run_id: str | Sequence[str] | None = None, preset: str | None = None,
                 study: str | None = None) -> list[Path]:
    """`analyze_run` for every FINISHED SE run of `grid` trained with `preset` that has its weights in the
    store (or just the run(s) `run_id`); one progress line per run on stderr.

    Runs without weights (a store restored from a record keeps only the models named at export) are
    skipped with one line; a named run without them is an error."""
    check_output_dir(results_dir)
    client = MlflowClient(tracking_uri=tracking_uri)
    named = [run_id] if isinstance(run_id, str) else list(run_id or [])
    if named:
        runs = [get_run(client, r) for r in named]
    else:
        found = se_runs(client, grid, preset)
        runs = [r for r in found if has_weights(client, r.info.run_id)]
        if len(runs) < len(found):
            print(f"role of SE: {len(found) - len(runs)} of {len(found)} SE run(s) of {grid} have no weights in this "
                  f"store (a restored record keeps only the models named at export): skipped",
                  file=sys.stderr, flush=True)
    if not runs:
        which = f" with preset {preset}" if preset else " without a preset"
        print(f"role of SE: grid {grid} has no FINISHED run with SE blocks and weights{which}", file=sys.stderr,
              flush=True)
    device = resolve_device(device)
    if runs:
        print(f"role of SE: {len(runs)} run(s) of {grid} on {device}", file=sys.stderr, flush=True)
    out: list[Path] = []
    started = time.monotonic()
    for i, run in enumerate(runs, start=1):
        tags = run.data.tags
        out.append(analyze_run(tracking_uri, run.info.run_id, results_dir=results_dir, data_root=data_root,
                               device=device, max_images=max_images, study=study))
        elapsed = time.monotonic() - started
        left = eta(elapsed, i / len(runs))  # mean time per run so far, times the runs left
        print(f"role of SE [{i}/{len(runs)}] {grid} {tags.get('variant', '?')} seed={tags.get('seed', '?')} "
              f"(run {run.info.run_id[:8]}) -> {out[-1]}; {fmt_duration(elapsed)} so far, ETA {fmt_duration(left)}",
              file=sys.stderr, flush=True)
    return out
