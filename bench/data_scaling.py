"""Does the image-folder data path hold 100k+ images? Decode throughput, cache bytes per image and
peak memory, against the dataset's size, next to a torchvision ImageFolder + DataLoader pipeline.

    python bench/data_scaling.py all [--scratch /tmp/data_scaling] [--sizes 10000,30000,100000]
                                     [--image-size 64] [--workers 2] [--json-out PATH]
    python bench/data_scaling.py make-tree --root DIR --n N          (the synthetic JPEG folder alone)
    python bench/data_scaling.py measure --tree T --what W ...        (one measurement, JSON on stdout;
                                     --impl DIR imports ablations from another checkout: before/after)

`all` measures, each in a fresh process so that its peak memory is its own:
  harness-decode  ablations.data.load_dataset on a cold cache: JPEGs -> the uint8 .npy cache
                  (decode once at the training resolution, bounded chunks, streaming statistics);
  harness-epoch   one training-like epoch over the cached split: iterate_batches (random-resized
                  crop + flip + normalise per batch of 256, on the CPU here);
  dataloader      one epoch of torchvision ImageFolder + RandomResizedCrop + flip + ToTensor +
                  Normalize through DataLoader(num_workers), which decodes every JPEG every epoch.
on the Imagenette sample of ../shared/data (extracted to the scratch folder) at 160 px and on a
synthetic ImageFolder of N small random JPEGs (10 classes; the smaller trees are symlinks into the
largest) at --image-size.

Memory: peak RSS sampled every 20 ms from /proc over the process and its children (DataLoader
workers), split into anonymous memory (heap: what can run a machine out of RAM) and file-backed
pages (the memmapped cache and libraries: page cache the kernel reclaims under pressure).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

from _path import ROOT  # first: this checkout on sys.path

import numpy as np

SHARED = ROOT.parent / "shared" / "data"
IMAGENETTE = "imagenette-224-mini.tar.gz"
CLASSES = 10
VAL_PER_CLASS = 20


# --------------------------------------------------------------------------- memory sampling


def _status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile of one process in bytes (missing if it just exited)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def _descendants(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo += [int(c) for c in fh.read().split()]
        except OSError:
            pass
    return seen


class PeakMemory:
    """Peak of the summed RSS (and its anonymous / file-backed parts) of this process tree."""

    def __init__(self, every_s: float = 0.02) -> None:
        self.every_s, self.peak = every_s, {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
            for pid in _descendants(os.getpid()):
                st = _status(pid)
                for k in total:
                    total[k] += st.get(k, 0)
            for k in total:
                self.peak[k] = max(self.peak[k], total[k])
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def mb(self) -> dict[str, float]:
        return {f"peak_{k.lower()}_mb": round(v / 2**20, 1) for k, v in self.peak.items()}


# --------------------------------------------------------------------------- data


def _one_jpeg(args: tuple[Path, int, int, int]) -> None:
    """A smooth random 160x120 image tinted by its class: real JPEG decode work, ~5 KB on disk."""
    from PIL import Image

    path, cls, seed, _ = args
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    small[..., cls % 3] = np.maximum(small[..., cls % 3], 128 + 12 * cls)
    Image.fromarray(small).resize((160, 120), Image.BICUBIC).save(path, quality=85)


def make_tree(root: Path, n: int) -> Path:
    """root/train/c{k}/{i}.jpg (n images) and root/val/c{k}/ (20 per class); reused if complete."""
    from multiprocessing import Pool

    done = root / ".complete"
    if done.is_file() and int(done.read_text()) >= n:
        return root
    jobs = []
    for split, per_class in (("train", n // CLASSES), ("val", VAL_PER_CLASS)):
        for c in range(CLASSES):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            jobs += [(d / f"{i:06d}.jpg", c, (c * 2 + (split == "val")) * 10**7 + i, 0) for i in range(per_class)
                     if not (d / f"{i:06d}.jpg").is_file()]
    start = time.monotonic()
    with Pool(os.cpu_count() or 1) as pool:
        for k, _ in enumerate(pool.imap_unordered(_one_jpeg, jobs, chunksize=256)):
            if k % 10000 == 0:
                print(f"make-tree {root}: {k}/{len(jobs)} JPEGs, {time.monotonic() - start:.0f}s",
                      file=sys.stderr, flush=True)
    done.write_text(str(n))
    return root


def link_tree(pool: Path, root: Path, n: int) -> Path:
    """A tree of the first n / 10 training images per class of ``pool`` (symlinks), same val."""
    if (root / ".complete").is_file():
        return root
    for split, per_class in (("train", n // CLASSES), ("val", VAL_PER_CLASS)):
        for c in range(CLASSES):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                link = d / f"{i:06d}.jpg"
                if not link.exists():
                    link.symlink_to(pool / split / f"c{c}" / f"{i:06d}.jpg")
    (root / ".complete").write_text(str(n))
    return root


# --------------------------------------------------------------------------- one measurement


def measure(tree: Path, what: str, image_size: int, cache: Path, workers: int, batch_size: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out: dict[str, Any] = {"what": what, "tree": str(tree), "image_size": image_size}
    with PeakMemory() as mem:
        start = time.perf_counter()
        if what == "harness-decode":
            from ablations.data import load_dataset

            ds = load_dataset("imagefolder", tree, image_size=image_size, cache_dir=cache)
            n = len(ds.train) + len(ds.test)
            entry = next(p for p in cache.iterdir() if not p.name.startswith("."))
            out["cache_bytes_per_image"] = round(sum(f.stat().st_size for f in entry.glob("*_images.npy")) / n)
            out["stored_px"] = int(ds.train.images.shape[1])
        elif what == "harness-epoch":
            from ablations.data import iterate_batches, load_dataset

            ds = load_dataset("imagefolder", tree, image_size=image_size, cache_dir=cache)  # a cache hit
            start = time.perf_counter()
            n = 0
            for x, _ in iterate_batches(ds.train, ds, batch_size=batch_size, train=True, device="cpu"):
                n += x.shape[0]
        elif what == "dataloader":
            import torchvision
            from torchvision import transforms as T

            tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
            data = torchvision.datasets.ImageFolder(str(tree / "train"), transform=tf)
            loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, num_workers=workers,
                                                 drop_last=True)
            n = 0
            for x, _ in loader:
                n += x.shape[0]
        else:
            raise SystemExit(f"unknown measurement {what!r}")
        seconds = time.perf_counter() - start
    out.update(images=n, seconds=round(seconds, 2), images_per_s=round(n / seconds, 1), **mem.mb())
    return out


# --------------------------------------------------------------------------- driver


def _child(tree: Path, what: str, image_size: int, cache: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "measure", "--tree", str(tree), "--what", what, "--image-size",
           str(image_size), "--cache", str(cache), "--workers", str(args.workers), "--batch-size", str(args.batch_size)]
    print(f"[{time.strftime('%H:%M:%S')}] {what} on {tree.name} at {image_size} px ...", file=sys.stderr, flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{what} on {tree} failed:\n{res.stderr[-2000:]}")
    row = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"    {row}", file=sys.stderr, flush=True)
    return row


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    import benchlib
    import torch

    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    results: dict[str, Any] = {"env": {**benchlib.environment(torch.device("cpu")),
                                       "loadavg_at_start": open("/proc/loadavg").read().split()[:3]},
                               "rows": []}
    rows = results["rows"]
    whats = ("harness-decode", "harness-epoch", "dataloader")

    archive = SHARED / IMAGENETTE
    if archive.is_file() and not args.skip_imagenette:
        nette = scratch / "imagenette"
        if not (nette / "imagenette-224-mini").is_dir():
            with tarfile.open(archive) as tf:
                benchlib.extract_all(tf, nette)
        cache = scratch / "cache-imagenette"
        shutil.rmtree(cache, ignore_errors=True)
        for what in whats:
            rows.append({"data": "imagenette-224-mini", "n_train": 400,
                         **_child(nette / "imagenette-224-mini", what, 160, cache, args)})

    pool = make_tree(scratch / f"synthetic-{sizes[-1]}", sizes[-1])
    for n in sizes:
        tree = pool if n == sizes[-1] else link_tree(pool, scratch / f"synthetic-{n}", n)
        cache = scratch / f"cache-{n}"
        shutil.rmtree(cache, ignore_errors=True)
        for what in whats:
            if what == "dataloader" and n > args.dataloader_max:
                continue
            rows.append({"data": "synthetic", "n_train": n, **_child(tree, what, args.image_size, cache, args)})
        shutil.rmtree(cache, ignore_errors=True)  # keep the disk free for the next size
    results["env"]["loadavg_at_end"] = open("/proc/loadavg").read().split()[:3]
    return results


def table(results: dict[str, Any]) -> str:
    lines = ["| data | train images | px | what | images/s | peak RSS MB | of it anon MB | file-backed MB | cache B/image |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results["rows"]:
        lines.append(f"| {r['data']} | {r['n_train']:,} | {r['image_size']} | {r['what']} | {r['images_per_s']:,.0f} | "
                     f"{r['peak_vmrss_mb']:,.0f} | {r['peak_rssanon_mb']:,.0f} | {r['peak_rssfile_mb']:,.0f} | "
                     f"{r.get('cache_bytes_per_image', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("all")
    a.add_argument("--scratch", default="/tmp/data_scaling")
    a.add_argument("--sizes", default="10000,30000,100000")
    a.add_argument("--image-size", type=int, default=64)
    a.add_argument("--workers", type=int, default=2)
    a.add_argument("--batch-size", type=int, default=256)
    a.add_argument("--dataloader-max", type=int, default=10**9, help="skip the DataLoader epoch above this size")
    a.add_argument("--skip-imagenette", action="store_true")
    a.add_argument("--json-out")
    m = sub.add_parser("make-tree")
    m.add_argument("--root", required=True)
    m.add_argument("--n", type=int, required=True)
    s = sub.add_parser("measure")
    s.add_argument("--tree", required=True)
    s.add_argument("--what", required=True)
    s.add_argument("--image-size", type=int, required=True)
    s.add_argument("--cache", required=True)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--impl", help="import ablations from this checkout instead (e.g. an older commit, for a before/after)")
    args = p.parse_args(argv)
    if getattr(args, "impl", None):
        sys.path.insert(0, str(Path(args.impl).resolve()))
    if args.cmd == "make-tree":
        print(make_tree(Path(args.root), args.n))
    elif args.cmd == "measure":
        print(json.dumps(measure(Path(args.tree), args.what, args.image_size, Path(args.cache), args.workers,
                                 args.batch_size)))
    else:
        results = run_all(args)
        print(table(results))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
