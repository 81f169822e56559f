#!/usr/bin/env python3
"""Preflight for the offline wheel set (bench/device/): run with PYTHONPATH=/tmp/site[:repo].

    python3 bench/device/check_env.py [--wheels .whl] [--torch]
    python3 bench/device/check_env.py --fallbacks .whl/fallback   # which fallback wheels to install

1. requirements: every installed distribution that came from the wheel set (the .whl/*.whl names)
   has its requirements checked against what is importable here; one that is absent on purpose
   (see OMITTED) is skipped, one that is absent or out of range otherwise is printed as a WARNING
   (not fatal: the import and API checks below are the verdict).
2. imports: mlflow, optuna, pydantic (and, with --torch, torch + the project's modules).
3. the API surface the project uses: an MlflowClient on a sqlite:/// store in a temporary folder
   (experiments, runs, log_batch, tags, log_text, log_artifact(s), search_runs with a filter,
   metric history, download_artifacts, set_terminated, delete/restore), and an Optuna study on a
   JournalStorage(JournalFileBackend) (enqueue, claim, params, user attrs, finish).
Exit 0 when 2 and 3 pass, 1 otherwise. Needs only the standard library, `packaging` and the checked packages.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

# Left out of the wheel set on purpose (fetch_wheels.sh): mlflow's full package (server web UI, ~11.5
# MiB) and mlflow-tracing (a subset of mlflow-skinny), with what only they, the tracking server or
# model flavors need. None is a requirement of a wheel in the set; listed so a warning about one is
# recognised as expected rather than as a gap.
OMITTED = {
    "mlflow", "mlflow-tracing", "flask", "flask-cors", "itsdangerous", "blinker", "gunicorn", "docker",
    "graphene", "graphql-core", "graphql-relay", "huey", "skops", "prettytable", "wcwidth", "aiohttp",
    "aiohappyeyeballs", "aiosignal", "frozenlist", "multidict", "propcache", "yarl", "narwhals", "greenlet",
}


def canon(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def wheel_names(wheel_dir: Path) -> list[str]:
    return sorted({canon(p.name.split("-")[0]) for p in wheel_dir.glob("*.whl")})


def check_requirements(names: list[str]) -> int:
    from packaging.requirements import Requirement

    env_extra = {"extra": ""}
    problems = 0
    for name in names:
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            print(f"  MISSING  {name}: in the wheel set but not installed/importable")
            problems += 1
            continue
        for raw in dist.requires or []:
            req = Requirement(raw)
            if req.marker is not None and not req.marker.evaluate(env_extra):
                continue
            dep = canon(req.name)
            try:
                have = md.version(req.name)
            except md.PackageNotFoundError:
                if dep in OMITTED:
                    continue
                print(f"  WARNING  {name} requires {raw}: not installed")
                problems += 1
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                print(f"  WARNING  {name} requires {raw}: found {req.name} {have}")
                problems += 1
    return problems


def needed_fallbacks(fallback_dir: Path, names: list[str]) -> list[Path]:
    """The wheels in fallback_dir whose package is missing here, or older/newer than the wheel set allows."""
    from packaging.requirements import Requirement

    out = []
    for whl in sorted(fallback_dir.glob("*.whl")):
        name = canon(whl.name.split("-")[0])
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            print(f"  {name}: not installed -> {whl.name}", file=sys.stderr)
            out.append(whl)
            continue
        for dist_name in names:
            try:
                reqs = md.distribution(dist_name).requires or []
            except md.PackageNotFoundError:
                continue
            bad = [r for r in map(Requirement, reqs) if canon(r.name) == name and r.specifier
                   and (r.marker is None or r.marker.evaluate({"extra": ""}))
                   and not r.specifier.contains(have, prereleases=True)]
            if bad:
                print(f"  {name} {have}: {dist_name} requires {bad[0]} -> {whl.name}", file=sys.stderr)
                out.append(whl)
                break
        else:
            print(f"  {name} {have}: fine, {whl.name} not needed", file=sys.stderr)
    return out


def step(label: str, fn) -> bool:
    t0 = time.perf_counter()
    try:
        detail = fn()
    except Exception:
        print(f"FAIL {label}")
        traceback.print_exc()
        return False
    print(f"ok   {label} ({time.perf_counter() - t0:.1f} s){': ' + detail if detail else ''}")
    return True


def imports() -> str:
    out = []
    for mod in ("pydantic", "optuna", "mlflow", "sqlalchemy", "alembic"):
        m = importlib.import_module(mod)
        out.append(f"{mod} {getattr(m, '__version__', '?')} ({Path(m.__file__).parent.parent})")
    import google.protobuf
    import typing_extensions  # noqa: F401

    out.append(f"protobuf {google.protobuf.__version__}")
    return "; ".join(out)


def mlflow_api(tmp: Path) -> str:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    uri = f"sqlite:///{tmp / 'store' / 'mlflow.db'}"
    (tmp / "store").mkdir()
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment("e", artifact_location=(tmp / "store" / "mlartifacts" / "e").as_uri(),
                              tags={"mlflow.note.content": "check"})
    assert c.get_experiment_by_name("e").experiment_id == exp
    assert c.get_experiment(exp).tags["mlflow.note.content"] == "check"
    run = c.create_run(exp, tags={"cell_id": "abc", "grid": "reduction"}, run_name="cell")
    rid = run.info.run_id
    now = int(time.time() * 1000)
    c.log_batch(rid, metrics=[Metric("test_top1_err", 0.5 - i / 100, now + i, i) for i in range(5)],
                params=[Param("model.se.reduction", "16")], tags=[RunTag("variant", "r16")])
    c.set_tag(rid, "device", "cpu")
    c.log_text(rid, '{"a": 1}', "config.json")
    f = tmp / "weights.bin"
    f.write_bytes(os.urandom(1024))
    c.log_artifact(rid, str(f), "model")
    d = tmp / "analysis"
    d.mkdir()
    (d / "stats.json").write_text("{}")
    c.log_artifacts(rid, str(d), artifact_path="analysis")
    c.set_terminated(rid, "FINISHED")
    hist = c.get_metric_history(rid, "test_top1_err")
    assert len(hist) == 5, hist
    page = c.search_runs([exp], filter_string="tags.cell_id = 'abc' and attributes.status = 'FINISHED'",
                         max_results=1000)
    assert len(page) == 1 and page.token is None, page
    assert c.get_run(rid).data.params["model.se.reduction"] == "16"
    got = Path(c.download_artifacts(rid, "model/weights.bin", str(tmp)))
    assert got.read_bytes() == f.read_bytes()
    assert "e" in [e.name for e in c.search_experiments()]
    c.delete_experiment(exp)
    c.restore_experiment(exp)
    return f"{uri}: {len(hist)} metric steps, 1 run found by filter, artifacts round-trip"


def optuna_api(tmp: Path) -> str:
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError  # noqa: F401
    from optuna.storages import BaseStorage, JournalStorage, RDBStorage  # noqa: F401
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(tmp / "optuna-journal.log")))
    study = optuna.create_study(storage=storage, study_name="grid-reduction", direction="minimize",
                                load_if_exists=True)
    for i in range(3):
        study.enqueue_trial({"cell": f"c{i}"}, user_attrs={"cell_id": f"c{i}"})
    sid = storage.get_study_id_from_name("grid-reduction")
    waiting = storage.get_all_trials(sid, deepcopy=False, states=(TrialState.WAITING,))
    assert len(waiting) == 3, waiting
    t = waiting[0]
    assert storage.set_trial_state_values(t._trial_id, TrialState.RUNNING)
    storage.set_trial_user_attr(t._trial_id, "heartbeat", time.time())
    dist = CategoricalDistribution(["c0", "c1", "c2"])
    storage.set_trial_param(t._trial_id, "cell", dist.to_internal_repr("c0"), dist)
    storage.set_trial_state_values(t._trial_id, TrialState.COMPLETE, [0.1])
    again = optuna.load_study(study_name="grid-reduction", storage=JournalStorage(
        JournalFileBackend(str(tmp / "optuna-journal.log"))))
    states = sorted(tr.state.name for tr in again.trials)
    assert states == ["COMPLETE", "WAITING", "WAITING"], states
    return f"journal study: {states}"


def project_imports() -> str:
    import torch

    import ablations.report.analysis  # noqa: F401
    import ablations.cli  # noqa: F401
    import ablations.report  # noqa: F401
    import ablations.run.runner  # noqa: F401
    import ablations.tracking  # noqa: F401
    import ablations.run.worker  # noqa: F401

    return f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheels", type=Path, default=Path(".whl"))
    ap.add_argument("--torch", action="store_true", help="also import torch and the project's modules")
    ap.add_argument("--fallbacks", type=Path, metavar="DIR",
                    help="only print (stdout) the wheels of DIR to install because the installed version does "
                         "not satisfy the wheel set; details on stderr")
    args = ap.parse_args()
    if args.fallbacks is not None:
        for whl in needed_fallbacks(args.fallbacks, wheel_names(args.wheels)):
            print(whl)
        return 0
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    print(f"python {sys.version.split()[0]} at {sys.executable}; PYTHONPATH={os.environ.get('PYTHONPATH', '')}")
    names = wheel_names(args.wheels)
    print(f"requirements of the {len(names)} distributions in {args.wheels}/:")
    problems = check_requirements(names) if names else 0
    print(f"  {problems} requirement problem(s)" + (" (warnings; see the API checks)" if problems else ""))
    ok = step("import mlflow, optuna, pydantic, sqlalchemy, alembic", imports)
    with tempfile.TemporaryDirectory() as tmp:
        ok = step("MlflowClient on sqlite:///", lambda: mlflow_api(Path(tmp))) and ok
    with tempfile.TemporaryDirectory() as tmp:
        ok = step("optuna JournalStorage(JournalFileBackend)", lambda: optuna_api(Path(tmp))) and ok
    if args.torch:
        ok = step("import torch + ablations.{cli,runner,tracking,report,analysis,workers}", project_imports) and ok
    print("CHECK " + ("PASSED" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
