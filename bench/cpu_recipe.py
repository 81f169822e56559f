"""The CPU recipe search: test accuracy against wall time for candidate recipes of the `cpu` preset.

    python bench/cpu_recipe.py --data-root ../shared/data --seeds 0,1 \\
        --candidate 'e8: train.epochs=8' --candidate 'e12-half: train.epochs=12 dataset.train_size=25000' \\
        --json-out bench/results/cpu_recipe.json
    python bench/cpu_recipe.py --table bench/results/cpu_recipe.json   # the Markdown table of RESULTS.md

Each candidate is a name and dotted overrides (values parsed as YAML) on top of BASE below, trained
in this process with the harness's own trainer (`ablations.train.train`) on CIFAR-10, evaluated on
the full 10,000-image test set after every epoch. Wall time counts everything a cell pays: loading
the (cached) dataset, building the model, compilation, every epoch and every evaluation. Rows are
appended to --json-out, so a search can go on over several invocations.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import _path  # noqa: F401  (first: this checkout on sys.path)

import torch
import yaml

from ablations.config import ExperimentConfig
from ablations.data import load_dataset
from ablations.train import seed_everything, train
from benchlib import environment
from senet import build_model

# The starting point: the study's backbone and a CIFAR ResNet recipe at CPU scale.
BASE: dict[str, Any] = {
    "dataset": {"name": "cifar10", "root": "data"},
    "model": {"arch": "resnet10_cifar_w32", "num_classes": 10, "se": {"reduction": 16}},
    "train": {"epochs": 8, "batch_size": 256, "lr": 0.4, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
              "label_smoothing": 0.1, "schedule": "onecycle", "warmup_epochs": 0, "precision": "bf16",
              "channels_last": True},
    "seed": 0,
}


def parse_candidate(text: str) -> tuple[str, dict[str, Any]]:
    """'name: a.b=1 c=[2, 3]' -> (name, {'a.b': 1, 'c': [2, 3]})."""
    name, _, rest = text.partition(":")
    overrides: dict[str, Any] = {}
    for item in rest.split():
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"error: --candidate {text!r}: {item!r} is not KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    return name.strip(), overrides


def config_for(overrides: dict[str, Any], seed: int, root: str) -> ExperimentConfig:
    raw = copy.deepcopy(BASE)
    raw["dataset"]["root"], raw["seed"] = root, seed
    for key, value in overrides.items():
        node, *path = key.split(".")
        target = raw.setdefault(node, {}) if path else raw
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1] if path else node] = value
    return ExperimentConfig.model_validate(raw)


class _Clock:
    """Per-epoch (wall seconds since the run began, test accuracy): the accuracy-against-budget curve."""

    def __init__(self, start: float) -> None:
        self.start, self.curve = start, []

    def on_step(self, epoch: int, step: int, steps: int, loss: float | None) -> None:
        pass

    def on_epoch(self, stats) -> None:
        self.curve.append((round(time.perf_counter() - self.start, 1), round(100 - stats.test_top1_err, 2)))
        print(f"    epoch {stats.epoch}: {100 - stats.test_top1_err:.2f}% at {self.curve[-1][0]:.0f}s "
              f"({stats.images_per_s:.0f} img/s)", flush=True)


def run_one(name: str, overrides: dict[str, Any], seed: int, root: str) -> dict[str, Any]:
    cfg = config_for(overrides, seed, root)
    load_before = os.getloadavg()
    start = time.perf_counter()
    ds = cfg.dataset
    data = load_dataset(ds.name, ds.root, classes=ds.classes, train_size=ds.train_size, test_size=ds.test_size,
                        subset_seed=ds.subset_seed, image_size=ds.image_size, download=False)
    seed_everything(seed)
    model = build_model(cfg.model)
    clock = _Clock(start)
    result = train(cfg, model, data, torch.device("cpu"), observer=clock)
    wall = time.perf_counter() - start
    return {"candidate": name, "overrides": overrides, "seed": seed, "wall_s": round(wall, 1),
            "top1_acc": round(100 - result.final.test_top1_err, 2), "curve": clock.curve,
            "train_images": len(data.train), "test_images": len(data.test), "compile": result.compile_status,
            "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "config": cfg.model_dump(mode="json")}


def table(rows: list[dict[str, Any]]) -> str:
    """Mean over seeds per candidate, in the order first run."""
    import statistics

    out = ["| candidate | overrides | seeds | wall s (mean) | top-1 acc % (each seed) | mean | load (1-min avg) |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    names = list(dict.fromkeys(r["candidate"] for r in rows))
    for name in names:
        rs = [r for r in rows if r["candidate"] == name]
        accs = [r["top1_acc"] for r in rs]
        over = " ".join(f"{k}={v}" for k, v in rs[0]["overrides"].items()) or "(base)"
        loads = sorted(x for r in rs for x in (r["loadavg_before"][0], r["loadavg_after"][0]))
        out.append(f"| {name} | `{over}` | {len(rs)} | {statistics.mean(r['wall_s'] for r in rs):.0f} | "
                   f"{', '.join(f'{a:.2f}' for a in accs)} | {statistics.mean(accs):.2f} | "
                   f"{loads[0]:.1f}-{loads[-1]:.1f} |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidate", action="append", default=[], help="'NAME: key=value ...' (repeatable)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--data-root", default="data")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--json-out", type=Path, help="append the rows to this JSON list")
    p.add_argument("--table", type=Path, help="print the Markdown table of a JSON file and exit")
    args = p.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    candidates = [parse_candidate(c) for c in args.candidate] or [("base", {})]
    seeds = [int(s) for s in args.seeds.split(",")]
    env = environment(torch.device("cpu"))
    for name, overrides in candidates:
        for seed in seeds:
            print(f"{name} seed={seed}: {overrides}", flush=True)
            row = {**run_one(name, overrides, seed, args.data_root), "env": env}
            print(f"  -> {row['top1_acc']:.2f}% in {row['wall_s']:.0f}s", flush=True)
            if args.json_out:
                old = json.loads(args.json_out.read_text()) if args.json_out.exists() else []
                args.json_out.parent.mkdir(parents=True, exist_ok=True)
                args.json_out.write_text(json.dumps(old + [row], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
