"""Packing: aggregate training images/s of K cells sharing one GPU, for K = 1, 2, 4, ...

    python bench/packing.py sweep --device cuda [--workers-per-gpu 1,2,4] [--data-root ../shared/data]
                                  [--batch-size 512] [--model se_resnet18_cifar] [--warmup 5]
                                  [--window 20] [--compile] [--allow-cpu] [--json-out PATH]
    python bench/packing.py cell  --device cuda [--data-root ...] [--batch-size 512] [--model KEY]
                                  [--train-size N] [--test-size 1000] [--compile]

`sweep` starts, for each K, K `cell` processes together, each with SENET_WORKERS_PER_DEVICE=K
(as `run_ablation.py --workers-per-gpu K` would: its data sized to 1/K of the GPU). Each cell
trains the harness (ablations.train.train) until its first host sync, so that data upload, cuDNN
algorithm choice and compilation are behind it, then says so; once all have, the sweep waits
--warmup seconds more and times all of them over one common wall-clock window of --window
seconds. Reported: images/s per process and their sum (train images; the per-epoch evaluation
of a 1,000-image test subset is included in the window). On a CPU, `sweep --device cpu` prints
that it skipped and exits 0; --allow-cpu runs it: K processes with cores/K threads each, as
`run_ablation.py --workers K` starts them, which tells one cell on every core from one cell per core.

`cell` is one process of the sweep, runnable by hand. Its protocol, on stdin/stdout: it prints
`READY` once warmed up, reads one line `T_START T_END` (time.time() seconds) from stdin, trains
through that window and prints `RESULT <json>` ({images_per_s, images, seconds, steps} or
{error}), then exits.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import _path  # noqa: F401  (first: this checkout on sys.path)

import torch

import benchlib
from ablations.config import TrainConfig
from ablations.data import WORKERS_PER_DEVICE_ENV, load_dataset
from ablations.train import train as harness_train
from benchlib import MODELS, SPEED_LR, HarnessObserver, WallWindow, WindowDone

SKIPPED_ON_CPU = "skipped: needs CUDA (K processes sharing one GPU; on a CPU they would only split the same cores)"


# --------------------------------------------------------------------------- one cell


def _window_from_parent() -> tuple[float, float]:
    """The protocol, cell side: say READY (warmed up), read 't_start t_end' from stdin."""
    print("READY", flush=True)
    t_start, t_end = (float(v) for v in sys.stdin.readline().split())
    return t_start, t_end


def run_cell(device: torch.device, root: Path, batch_size: int, spec_key: str, test_size: int,
             train_size: int | None, compile_: bool) -> dict[str, Any]:
    """One process of the sweep: train until warmed up, time the window the parent sends, return the rate."""
    spec = MODELS[spec_key]
    data = load_dataset("cifar10", root, test_size=test_size, train_size=train_size)
    tc = TrainConfig(epochs=10_000, batch_size=batch_size, lr=SPEED_LR, nesterov=True,
                     label_smoothing=0.0, compile=compile_)
    cfg = benchlib.harness_config(spec, tc, root, data, seed=os.getpid() % 1000)
    window = WallWindow(get_window=_window_from_parent)
    try:
        with contextlib.suppress(WindowDone):  # on a CPU every step is synchronous: stamp each one
            harness_train(cfg, benchlib.make_model(spec, len(data.classes)), data, device,
                          observer=HarnessObserver(window, tc.batch_size),
                          sync_every=50 if device.type == "cuda" else 1)
        steps, images, seconds = window.measured()
        return {"images_per_s": images / seconds, "images": images, "seconds": seconds, "steps": steps}
    except Exception as exc:  # reported to the parent, which carries on with the next K
        if window.get_window is not None:
            print("READY", flush=True)  # failed before warming up: keep the parent's protocol going
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}


def cell_main(args: argparse.Namespace) -> int:
    device = benchlib.bench_device(args.device)
    try:
        out = run_cell(device, Path(args.data_root), args.batch_size or 512, args.model, args.test_size,
                       args.train_size, args.compile)
    except Exception as exc:  # the data failed to load: still answer the protocol
        print("READY", flush=True)
        out = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
    print("RESULT " + json.dumps(out), flush=True)
    return 0


# --------------------------------------------------------------------------- the sweep


def _read_tagged(proc: subprocess.Popen, tag: str) -> str | None:
    """The rest of the first stdout line starting with `tag`, or None if the process ended first."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(tag):
            return line[len(tag):].strip()
    return None


def workers_sweep(ks: Sequence[int], device: torch.device, root: Path, batch_size: int, warmup_s: float,
                  window_s: float, compile_: bool = False, spec_key: str = "se_resnet18_cifar",
                  train_size: int | None = None, test_size: int = 1000, log: Any = print) -> list[dict[str, Any]]:
    """For each K: K `cell` processes started together; once all have warmed up (READY),
    all are timed over the same wall-clock window; images/s per process and their sum."""
    rows = []
    for k in ks:
        cmd = [sys.executable, str(Path(__file__).resolve()), "cell", "--device", str(device),
               "--data-root", str(root), "--batch-size", str(batch_size), "--model", spec_key,
               "--test-size", str(test_size)]
        cmd += ["--train-size", str(train_size)] if train_size else []
        cmd += ["--compile"] if compile_ else []
        env = {**os.environ, WORKERS_PER_DEVICE_ENV: str(k)}  # as --workers-per-gpu K: data sized to 1/K of the GPU
        if device.type == "cpu":  # as `--workers K` on a CPU: the cores split between the processes
            threads = str(max(1, (os.cpu_count() or 1) // k))
            env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
                 for _ in range(k)]
        results: list[dict[str, Any]] = []
        try:
            ready = [_read_tagged(p, "READY") is not None for p in procs]
            t_start = time.time() + warmup_s  # all are warmed up; let the last one reach steady state
            t_end = t_start + window_s
            for p, ok in zip(procs, ready):
                if ok:
                    assert p.stdin is not None
                    with contextlib.suppress(OSError):  # a child that failed early has gone already
                        p.stdin.write(f"{t_start} {t_end}\n")
                        p.stdin.flush()
            for p, ok in zip(procs, ready):
                text = _read_tagged(p, "RESULT ") if ok else None
                results.append(json.loads(text) if text else {"error": f"process exited with {p.wait()}"})
        finally:
            for p in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=60)
                if p.poll() is None:
                    p.kill()  # only the processes started here
                    p.wait()
                for pipe in (p.stdin, p.stdout):
                    with contextlib.suppress(OSError):
                        pipe.close()
        rates = [r["images_per_s"] for r in results if "images_per_s" in r]
        row = {"k": k, "per_process_images_per_s": rates,
               "aggregate_images_per_s": sum(rates) if len(rates) == k else None,
               "errors": [r["error"] for r in results if "error" in r]}
        log(f"  K={k}: aggregate {benchlib.fmt_num(row['aggregate_images_per_s'])} images/s "
            f"(per process: {', '.join(f'{r:.0f}' for r in rates) or '-'})"
            + (f"  errors: {row['errors']}" if row["errors"] else ""))
        rows.append(row)
    return rows


def sweep_main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    device = benchlib.bench_device(args.device)
    cuda = device.type == "cuda"
    env = benchlib.environment(device)
    report: dict[str, Any] = {"environment": env}
    if not (cuda or args.allow_cpu):
        print(f"Several cells per GPU: {SKIPPED_ON_CPU}")
        report["workers_per_gpu"] = {"skipped": SKIPPED_ON_CPU}
        benchlib.end_report(report, t0, device, args.json_out)
        return 0
    benchlib.preflight_cuda(device, args.compile)
    batch = args.batch_size or (512 if cuda else 16)
    spec = MODELS[args.model]
    print(f"device {device} ({env['device_name']}), torch {env['torch']}, CUDA {env['cuda']}, {env['date']}")
    print(f"Several cells per GPU: K concurrent harness processes of {spec.label}, batch {batch}; each warms "
          f"up to its first host sync ({50 if cuda else 1} steps), then {args.warmup:.0f} s, then all are timed "
          f"over the same {args.window:.0f} s window (train images/s; evaluation of a {args.test_size}-image "
          f"test subset per epoch included)")
    report["workers_per_gpu"] = workers_sweep(args.workers_per_gpu, device, Path(args.data_root).expanduser().resolve(),
                                              batch, args.warmup, args.window, args.compile, args.model,
                                              args.train_size, args.test_size)
    benchlib.end_report(report, t0, device, args.json_out)
    return 0


def parse_ks(text: str) -> list[int]:
    ks = [int(v) for v in text.split(",") if v.strip()]
    if not ks or any(k < 1 for k in ks):
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers, e.g. 1,2,4")
    return ks


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="sweep|cell")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", required=True, help=benchlib.DEVICE_HELP)
    common.add_argument("--data-root", default="../shared/data")
    common.add_argument("--batch-size", type=int, help="per process (default 512 on a GPU, 16 on a CPU)")
    common.add_argument("--model", default="se_resnet18_cifar", choices=list(MODELS))
    common.add_argument("--train-size", type=int, help="train images per process (default: all)")
    common.add_argument("--test-size", type=int, default=1000, help="test images evaluated per epoch (default 1000)")
    common.add_argument("--compile", action="store_true", help="harness with torch.compile (train.compile=true)")
    s = sub.add_parser("sweep", parents=[common], help="time K = 1, 2, 4, ... cells sharing one GPU")
    s.add_argument("--workers-per-gpu", type=parse_ks, default=[1, 2, 4], metavar="K,K,...",
                   help="the K to time (default 1,2,4)")
    s.add_argument("--warmup", type=float, default=5.0,
                   help="seconds between all processes being warmed up and the common window (default 5)")
    s.add_argument("--window", type=float, default=20.0, help="seconds of the common timed window (default 20)")
    s.add_argument("--allow-cpu", action="store_true",
                   help="run on a CPU too (tests the process protocol; the figures mean nothing there)")
    s.add_argument("--json-out", type=Path, help="also write the numbers as JSON")
    sub.add_parser("cell", parents=[common], help="one process of the sweep (protocol: see above)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return cell_main(args) if args.cmd == "cell" else sweep_main(args)


if __name__ == "__main__":
    sys.exit(main())
