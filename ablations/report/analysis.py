"""Role of SE blocks (paper Section 7, Figs. 6 and 7): excitation statistics per class and depth.

For one trained run, every SE block's excitation vector s (the output of `<block>.se.gate`) is
recorded for each test image with forward hooks and aggregated per class and over all classes.
Aggregates are streamed (per-class sums and sums of squares in float64), so the whole ImageNet
validation set costs no more memory than CIFAR's.

Definitions used in the figures, tables and `findings_paragraph`:

* Excitation per image: s[i, c] for image i and channel c. With squeeze=none (NoSqueeze) the gate
  outputs one value per position; s[i, c] is then that map averaged over all positions.
* Class statistics: mean and population standard deviation (ddof=0) of s[:, c] over the images
  of one class, and over all images.
* Class-specificity of a block (the correlation ratio eta^2, averaged over channels): with
  mu_kc the mean of class k, mu_c the all-image mean, n_k images in class k and N in all,
      B_c = sum_k (n_k / N) (mu_kc - mu_c)^2      (variance of the class means)
      T_c = (1 / N) sum_i (s[i, c] - mu_c)^2      (total variance)
      specificity = mean over channels with T_c > 1e-12 of B_c / T_c.
  0 means every class has the same mean (class-agnostic), 1 means every image sits on its class
  mean (fully class-determined). Activations that ignore the class still score about
  (K - 1) / (N - 1) on N images of K classes (the `chance_specificity` column).
* Saturated fraction: the share of (image, channel) values above 0.9 x the gate's upper bound:
  s > 0.9 for sigmoid, hardsigmoid and tanh (all bounded by 1). ReLU has no upper bound, so its
  saturated fraction is undefined (NaN).
* Class range of a block: per channel, the largest minus the smallest class mean, averaged over
  channels (how far apart the class curves of Fig. 6 lie).
"""

from __future__ import annotations

import math
import os
import pickle
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from mlflow import MlflowClient
from torch import Tensor, nn

from ablations.config import ExperimentConfig
from ablations.errors import BadInput, StoreError, WeightsError
from ablations.data import Dataset, Split, iterate_batches, load_dataset, stratified_indices
from ablations.run.progress import eta, fmt_duration
from ablations.tracking import runs_of
from senet import build_model, se_blocks

__all__ = [
    "BlockStats", "ExcitationStats", "SATURATION_LEVEL", "analyze_grid", "analyze_run", "balanced_subset",
    "block_label", "block_table", "collect_excitations", "findings_paragraph", "output_dir",
]

SATURATION_LEVEL = 0.9  # a value counts as saturated above this fraction of the gate's upper bound
_GATE_KINDS: dict[type[nn.Module], tuple[str, float | None]] = {  # gate -> (name, upper bound)
    nn.Sigmoid: ("sigmoid", 1.0),
    nn.Hardsigmoid: ("hardsigmoid", 1.0),
    nn.Tanh: ("tanh", 1.0),
    nn.ReLU: ("relu", None),
}
_MIN_VARIANCE = 1e-12  # channels with less total variance than this carry no class information
_BLOCK_NAME = re.compile(r"^stage(\d+)\.block(\d+)\.se$")
_ARTIFACT_DIR = "role_of_se"


# --------------------------------------------------------------------------- statistics


def block_label(module_name: str) -> str:
    """'stage3.block4.se' -> 'SE_3_4', the paper's name for the block."""
    m = _BLOCK_NAME.match(module_name)
    return f"SE_{m.group(1)}_{m.group(2)}" if m else module_name


def _stage_index(module_name: str) -> tuple[int, int]:
    m = _BLOCK_NAME.match(module_name)
    if m is None:
        raise ValueError(f"{module_name!r} is not named stage<S>.block<B>.se")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class BlockStats:
    """Aggregated excitations of one SE block (K classes, C channels)."""

    name: str  # module name, e.g. 'stage3.block4.se'
    counts: np.ndarray  # (K,) images per class
    class_mean: np.ndarray  # (K, C)
    class_std: np.ndarray  # (K, C), population std within each class
    all_mean: np.ndarray  # (C,)
    all_std: np.ndarray  # (C,), population std over all images
    saturated_fraction: float  # NaN where the gate has no upper bound

    @property
    def label(self) -> str:
        return block_label(self.name)

    @property
    def stage(self) -> int:
        return _stage_index(self.name)[0]

    @property
    def index(self) -> int:
        return _stage_index(self.name)[1]

    @property
    def channels(self) -> int:
        return int(self.all_mean.shape[0])

    def specificity_per_channel(self) -> np.ndarray:
        """B_c / T_c per channel (NaN where T_c is ~0); see the module docstring."""
        present = self.counts > 0  # an empty class has NaN means and no weight
        weights = self.counts[present] / self.counts.sum()
        between = (weights[:, None] * (self.class_mean[present] - self.all_mean) ** 2).sum(0)
        total = self.all_std**2
        out = np.full_like(total, np.nan)
        ok = total > _MIN_VARIANCE
        out[ok] = np.clip(between[ok] / total[ok], 0.0, 1.0)  # clip: float rounding only
        return out

    def specificity(self) -> float:
        per = self.specificity_per_channel()
        return float(np.nanmean(per)) if np.isfinite(per).any() else math.nan

    def class_range(self) -> float:
        present = self.class_mean[self.counts > 0]
        return float((present.max(0) - present.min(0)).mean())


@dataclass(frozen=True)
class ExcitationStats:
    """Every SE block's statistics, in forward order, for one model on one split."""

    blocks: list[BlockStats]
    classes: tuple[str, ...]
    gate: str  # 'sigmoid', 'tanh', 'relu' or 'hardsigmoid'
    bound: float | None  # the gate's upper bound; None for unbounded gates (ReLU)
    spatial: bool  # True: the gate output had positions (squeeze=none) and was averaged over them

    @property
    def threshold(self) -> float | None:
        """Values above this count as saturated; None where saturation is undefined."""
        return SATURATION_LEVEL * self.bound if self.bound is not None else None

    @property
    def images(self) -> int:
        return int(self.blocks[0].counts.sum()) if self.blocks else 0


class _Accumulator:
    """Per-class running sums of s and s^2 (float64), plus the count of saturated values."""

    def __init__(self, n_classes: int, channels: int, threshold: float | None) -> None:
        self.count = np.zeros(n_classes, dtype=np.int64)
        self.sum = np.zeros((n_classes, channels))
        self.sumsq = np.zeros((n_classes, channels))
        self.threshold = threshold
        self.saturated = 0

    def add(self, s: Tensor, labels: Tensor) -> None:
        s64 = s.double().cpu()
        y = labels.cpu()
        k = len(self.count)
        self.count += np.bincount(y.numpy(), minlength=k)
        self.sum += torch.zeros(k, s64.shape[1], dtype=torch.float64).index_add_(0, y, s64).numpy()
        self.sumsq += torch.zeros(k, s64.shape[1], dtype=torch.float64).index_add_(0, y, s64 * s64).numpy()
        if self.threshold is not None:
            self.saturated += int((s64 > self.threshold).sum())

    def result(self, name: str) -> BlockStats:
        n = self.count[:, None].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):  # empty classes give NaN, on purpose
            mean = self.sum / n
            var = np.maximum(self.sumsq / n - mean**2, 0.0)
        total = self.count.sum()
        all_mean = self.sum.sum(0) / total
        all_var = np.maximum(self.sumsq.sum(0) / total - all_mean**2, 0.0)
        channels = self.sum.shape[1]
        saturated = self.saturated / (total * channels) if self.threshold is not None else math.nan
        return BlockStats(name, self.count.copy(), mean, np.sqrt(var), all_mean, np.sqrt(all_var), saturated)


def _gate_kind(se: nn.Module) -> tuple[str, float | None]:
    for cls, kind in _GATE_KINDS.items():
        if isinstance(se.gate, cls):
            return kind
    raise ValueError(f"unknown excitation gate {type(se.gate).__name__}")


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


@torch.no_grad()
def collect_excitations(model: nn.Module, split: Split, dataset: Dataset, *, device: str | torch.device = "cpu",
                        batch_size: int = 256) -> ExcitationStats:
    """Run `split` through `model` (eval mode) and aggregate every SE block's excitation per class.

    Hooks sit on `<block>.se.gate`; a spatial gate output (squeeze=none) is averaged over positions.
    """
    device = torch.device(device)
    blocks = se_blocks(model)
    if not blocks:
        raise ValueError("the model has no SE blocks")
    kinds = {_gate_kind(se) for se in blocks.values()}
    if len(kinds) != 1:
        raise ValueError(f"SE blocks use different gates: {sorted(k[0] for k in kinds)}")
    gate, bound = kinds.pop()
    threshold = SATURATION_LEVEL * bound if bound is not None else None
    n_classes = len(dataset.classes)
    accs = {name: _Accumulator(n_classes, se.channels, threshold) for name, se in blocks.items()}
    current: dict[str, Tensor] = {}
    spatial = False

    def hook_for(name: str):
        def hook(_module: nn.Module, _inputs: tuple, out: Tensor) -> None:
            nonlocal spatial
            s = out.detach().float()
            if s.dim() == 4 and s.shape[2] * s.shape[3] > 1:
                spatial = True
            accs[name].add(s.mean((2, 3)) if s.dim() == 4 else s, current["labels"])
        return hook

    model.to(device).eval()
    handles = [se.gate.register_forward_hook(hook_for(name)) for name, se in blocks.items()]
    try:
        for x, y in iterate_batches(split, dataset, batch_size=batch_size, train=False, device=device):
            current["labels"] = y
            model(x)
    finally:
        for h in handles:
            h.remove()
    return ExcitationStats([accs[name].result(name) for name in blocks], dataset.classes, gate, bound, spatial)


def block_table(stats: ExcitationStats) -> pd.DataFrame:
    """One row per SE block, in forward order (see the module docstring for each definition)."""
    k, n = len(stats.classes), stats.images
    chance = (k - 1) / (n - 1) if n > 1 else math.nan
    rows = []
    for depth, b in enumerate(stats.blocks, start=1):
        rows.append({
            "block": b.label, "module": b.name, "stage": b.stage, "index": b.index, "depth": depth,
            "channels": b.channels, "images": n, "classes": k, "gate": stats.gate,
            "averaged_over_positions": stats.spatial,  # squeeze=none: s is each image's map averaged over positions
            "class_specificity": b.specificity(), "chance_specificity": chance,
            "saturated_fraction": b.saturated_fraction,
            "mean_activation": float(b.all_mean.mean()),
            # total std over all (image, channel) values: within-channel variance plus the spread of channel means
            "std_activation": float(np.sqrt((b.all_std**2 + b.all_mean**2).mean() - b.all_mean.mean() ** 2)),
            "class_range": b.class_range(),
        })
    return pd.DataFrame(rows)


def _markdown(table: pd.DataFrame) -> str:
    """The block table as Markdown (pandas' to_markdown; NaN as n/a)."""
    shown = table.drop(columns=["module"], errors="ignore").replace([np.inf, -np.inf], np.nan)
    shown = shown.astype(object).where(shown.notna(), None)  # tabulate writes None as missingval
    return shown.to_markdown(index=False, floatfmt=".3f", missingval="n/a") + "\n"


def findings_paragraph(stats: pd.DataFrame, preset_note: str | None = None) -> str:
    """The paper's Section 7 findings next to what `stats` (a `block_table`) shows; numbers only from it.

    With `preset_note` (a preset run, e.g. smoke: one epoch on a few hundred images) the note stands in
    for the paper's findings: such a model is a pipeline check, not one to compare with the paper."""
    if stats.empty:
        return preset_note or "No SE block statistics to compare with the paper's Section 7."
    first, last = stats.iloc[0], stats.iloc[-1]
    n, k, gate = int(first["images"]), int(first["classes"]), str(first["gate"])
    paper = ("In the paper (SE-ResNet-50 on ImageNet, Section 7, Figs. 6 and 7) the excitations of early SE "
             "blocks are nearly class-agnostic, they become class-specific with depth, and SE_5_2 is close to "
             "saturation (most activations near 1, so the block acts almost as an identity).")
    per_stage = stats.groupby("stage", sort=True)["class_specificity"].mean()
    trend = _trend(per_stage.to_numpy())
    stage_text = ", ".join(f"stage {s} {v:.3f}" for s, v in per_stage.items())
    top = stats.loc[stats["class_specificity"].idxmax()]
    here = (f"Here ({n} test images of {k} classes, {gate} gate) the class-specificity score (between-class "
            f"share of each channel's variance, averaged over channels; about {first['chance_specificity']:.3f} "
            f"for class-independent activations) is {first['class_specificity']:.3f} at {first['block']} and "
            f"{last['class_specificity']:.3f} at {last['block']}; its mean per stage is {stage_text}, so it "
            f"{trend}. The highest score is {top['class_specificity']:.3f} at {top['block']}.")
    return f"{preset_note or paper} {here} {_saturation_sentence(stats)}"


def _trend(values: np.ndarray) -> str:
    steps = np.diff(values)
    if len(steps) == 0:
        return "cannot be compared across stages (one stage only)"
    if (steps > 0).all():
        return "rises from stage to stage"
    if (steps < 0).all():
        return "falls from stage to stage"
    return "does not change monotonically from stage to stage"


def _saturation_sentence(stats: pd.DataFrame) -> str:
    sat = stats["saturated_fraction"]
    if not np.isfinite(sat).any():
        return (f"The {stats.iloc[0]['gate']} gate has no upper bound, so saturation is not defined; the mean "
                f"activation ranges from {stats['mean_activation'].min():.3g} to {stats['mean_activation'].max():.3g}.")
    top = stats.loc[sat.idxmax()]
    last_stage = stats["stage"] == stats["stage"].max()
    inner, outer = sat[last_stage].mean(), sat[~last_stage].mean()
    compare = ""
    if (~last_stage).any():
        closer = "closer to" if inner > outer else "not closer to"
        compare = (f" Averaged over the last stage's blocks it is {inner:.1%}, against {outer:.1%} over the earlier "
                   f"blocks, so the last stage is {closer} saturation than the earlier ones.")
    return (f"The fraction of activations above {SATURATION_LEVEL} of the gate's upper bound is highest at "
            f"{top['block']} ({top['saturated_fraction']:.1%}; mean activation {top['mean_activation']:.3f}).{compare}")


def _stats_arrays(stats: ExcitationStats) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {"classes": np.array(stats.classes)}
    for b in stats.blocks:
        out.update({f"{b.label}.counts": b.counts, f"{b.label}.class_mean": b.class_mean,
                    f"{b.label}.class_std": b.class_std, f"{b.label}.all_mean": b.all_mean,
                    f"{b.label}.all_std": b.all_std})
    return out


# --------------------------------------------------------------------------- one run from MLflow


def _safe(name: str) -> str:
    # the same folder-name rule as the grid reports, so role_of_se sits beside them
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", name) or "_"


def output_dir(results_dir: str | Path, dataset: str, grid: str, variant: str, seed: int | str) -> Path:
    """results/<dataset>/<grid>/role_of_se/<variant>_seed<seed>/"""
    return Path(results_dir) / _safe(dataset) / _safe(grid) / _ARTIFACT_DIR / _safe(f"{variant}_seed{seed}")


def _download(client: MlflowClient, run_id: str, path: str, dst: str) -> Path:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file: a bar is noise
    try:
        return Path(client.download_artifacts(run_id, path, dst))
    except Exception as exc:  # MLflow raises different types per store; the caller needs one clear message
        raise StoreError(f"run {run_id}: cannot read artifact {path!r}: {str(exc).splitlines()[0]}") from exc


def load_weights(path: Path, what: str) -> dict[str, Tensor]:
    """A plain state dict (names -> tensors) from `path`, loaded with weights_only=True and nothing else.

    Anything more (a pickled object, code to run) is refused with WeightsError: such a file is never
    loaded, and there is no switch that would load it.
    """
    refused = f"{what} is not a plain state dict of tensors and will not be loaded"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only met something other than tensors and containers
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        raise WeightsError(f"{refused} (it refers to {found[1]})" if found else refused) from None
    except (RuntimeError, EOFError, OSError) as exc:  # truncated, or not a torch file at all
        raise WeightsError(f"{what} cannot be read as torch weights: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise WeightsError(refused)
    # a torch.compile'd model's state dict prefixes every key; the plain model has none
    return {k.removeprefix("_orig_mod."): v for k, v in state.items()}


def _get_run(client: MlflowClient, run_id: str):
    try:
        return client.get_run(run_id)
    except Exception as exc:  # MLflow's own error for an unknown id, per store kind
        raise StoreError(f"--run-id {run_id}: no such run in the store ({str(exc).splitlines()[0][:120]})") from None


def _load_run(client: MlflowClient, run_id: str) -> tuple[ExperimentConfig, dict[str, Tensor]]:
    with tempfile.TemporaryDirectory() as tmp:
        config = ExperimentConfig.model_validate_json(_download(client, run_id, "config.json", tmp).read_text())
        state = load_weights(_download(client, run_id, "model/weights.pt", tmp), f"run {run_id}: model/weights.pt")
    return config, state


def _test_data(config: ExperimentConfig, data_root: str | None, cache_dir: str | Path | None) -> Dataset:
    ds = config.dataset
    data = load_dataset(ds.name, data_root or ds.root, classes=ds.classes, train_size=ds.train_size,
                        test_size=ds.test_size, subset_seed=ds.subset_seed, image_size=ds.image_size,
                        download=ds.download, cache_dir=cache_dir)
    if len(data.classes) != config.model.num_classes:
        raise BadInput(f"dataset {ds.name} has {len(data.classes)} classes, the model {config.model.num_classes}")
    return data


def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    from ablations.train import resolve_device

    return resolve_device(device)


def _preset_note(preset: str | None, config: ExperimentConfig) -> str | None:
    """For a preset run: what it is (a pipeline check), so that nobody reads it against the paper."""
    if not preset:
        return None
    images = config.dataset.train_size or "all"
    epochs = config.train.epochs
    return (f"This run was trained with the {preset} preset ({epochs} epoch{'' if epochs == 1 else 's'} on {images} "
            "training images): a check that the pipeline runs end to end, not a trained model, so its statistics "
            "are not compared with the paper's Section 7 findings.")


def write_outputs(stats: ExcitationStats, directory: Path, title: str, preset_note: str | None = None) -> list[Path]:
    """Figures (PNG + PDF), the block table (CSV + Markdown), per-channel arrays and the findings.

    `preset_note` (a preset run) replaces the comparison with the paper in the findings."""
    from ablations.report import role_plots

    directory.mkdir(parents=True, exist_ok=True)
    table = block_table(stats)
    written = role_plots.save_all(stats, table, directory, title)
    table.to_csv(directory / "block_stats.csv", index=False)
    (directory / "block_stats.md").write_text(_markdown(table), encoding="utf-8")
    np.savez_compressed(directory / "channel_stats.npz", **_stats_arrays(stats))
    (directory / "findings.md").write_text(findings_paragraph(table, preset_note) + "\n", encoding="utf-8")
    written += [directory / n for n in ("block_stats.csv", "block_stats.md", "channel_stats.npz", "findings.md")]
    return written


def analyze_run(tracking_uri: str, run_id: str, *, results_dir: str | Path = "results", data_root: str | None = None,
                device: str | torch.device = "cpu", max_images: int | None = None,
                cache_dir: str | Path | None = None) -> Path:
    """Excitation statistics and figures of one finished SE run; returns the folder they were written to.

    Reads the run's `config.json` and `model/weights.pt`, evaluates its dataset's test split (at most
    `max_images`, balanced over classes; `data_root` replaces `dataset.root`), writes into
    results/<dataset>/<grid>/role_of_se/<variant>_seed<seed>/ and logs the same files to the run
    under `role_of_se/`.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    run = _get_run(client, run_id)
    config, state = _load_run(client, run_id)
    if config.model.se is None:
        raise BadInput(f"run {run_id} is the plain backbone: it has no SE blocks to analyse")
    device = _resolve_device(device)
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
    directory = output_dir(results_dir, tags.get("dataset", config.dataset.name), grid, variant, seed)
    preset = tags.get("preset") or None
    label = f"{grid} ({preset} preset)" if preset else grid
    title = f"{label} / {variant}, seed {seed}: {config.model.arch} on {config.dataset.name} test ({stats.images} images)"
    write_outputs(stats, directory, title, _preset_note(preset, config))
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
        if cell is None or not _has_se(run):  # no cell_id: e.g. the grid's report run
            continue
        if run.data.tags.get("preset", "") != (preset or ""):
            continue
        if cell not in latest or run.info.start_time > latest[cell].info.start_time:
            latest[cell] = run
    return sorted(latest.values(), key=lambda r: (r.data.tags.get("variant", ""), int(r.data.tags.get("seed", 0))))


def analyze_grid(tracking_uri: str, grid: str, *, results_dir: str | Path = "results", data_root: str | None = None,
                 device: str | torch.device = "cpu", max_images: int | None = None,
                 run_id: str | None = None, preset: str | None = None) -> list[Path]:
    """`analyze_run` for every FINISHED SE run of `grid` trained with `preset` (or just `run_id`);
    one progress line per run on stderr."""
    from ablations.report import check_output_dir

    check_output_dir(results_dir)
    client = MlflowClient(tracking_uri=tracking_uri)
    runs = [_get_run(client, run_id)] if run_id else se_runs(client, grid, preset)
    if not runs:
        which = f" with preset {preset}" if preset else " without a preset"
        print(f"role of SE: grid {grid} has no FINISHED run with SE blocks{which}", file=sys.stderr, flush=True)
    device = _resolve_device(device)
    if runs:
        print(f"role of SE: {len(runs)} run(s) of {grid} on {device}", file=sys.stderr, flush=True)
    out: list[Path] = []
    started = time.monotonic()
    for i, run in enumerate(runs, start=1):
        tags = run.data.tags
        out.append(analyze_run(tracking_uri, run.info.run_id, results_dir=results_dir, data_root=data_root,
                               device=device, max_images=max_images))
        elapsed = time.monotonic() - started
        left = eta(elapsed, i / len(runs))  # mean time per run so far, times the runs left
        print(f"role of SE [{i}/{len(runs)}] {grid} {tags.get('variant', '?')} seed={tags.get('seed', '?')} "
              f"(run {run.info.run_id[:8]}) -> {out[-1]}; {fmt_duration(elapsed)} so far, ETA {fmt_duration(left)}",
              file=sys.stderr, flush=True)
    return out
