"""One cell -> one MLflow run: train a claimed cell and log it (ablations/run/worker.py claims the cells)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from mlflow import MlflowClient

from ablations.train import checkpoint as ckpt
from ablations.train.checkpoint import STOP, Checkpoints, TrainingStopped
from ablations.config import Cell, ConfigError, DatasetConfig, ExperimentConfig, with_num_classes
from ablations.data import Dataset, DataError, load_dataset
from ablations.run.progress import GridProgress
from ablations.tracking import CellRun, StoreUnreachable, process_gone, retry_outage
from ablations.train import CellFailed, CellOutOfMemory, EpochStats, seed_everything, train
from ablations.util.timefmt import fmt_duration
from senet import build_model, complexity, se_blocks

# A stop kind: the store did not answer when the cell was to start (a temporary failure, exit 75 as a
# preemption: the README's SLURM script requeues it); nothing was started or changed.
STORE_UNREACHABLE = "store_unreachable"


class CellAborted(Exception):
    """Stops a cell from outside (e.g. a worker lost its claim on it); its run is marked KILLED if still its own."""


class Superseded(CellAborted):
    """Another claim holds the cell now (it is written on the cell's run or checkpoint): stop, touching neither."""


@dataclass
class Fence:
    """A worker's claim on a cell (its queue trial: the fencing token), checked before every write that
    could hurt another owner of the cell: a checkpoint written or deleted, an epoch logged, the run ended.

    A worker taken for dead (frozen, cut off from the queue) can come back after another worker has
    claimed the cell and resumed the same run from the same checkpoint, each then carrying the newer
    claim: the stale worker finds it there and stops, touching nothing. The check is a read before
    the write, not a lock; what closes the gap is the heartbeat: a worker whose beats did not go
    through for the grace period stops by itself (Heartbeat.guard), before another can take it over.
    Without a claim (a cell trained outside the queue) nothing is checked.
    """

    claim: str | None
    checkpoints: Checkpoints | None = None
    found: frozenset = frozenset()  # claims of the cell's checkpoints when it started (the one it resumes from)
    run: CellRun | None = None

    def check(self) -> None:
        """Raise Superseded unless the run is still held by this claim (one read of the run)."""
        if self.claim is None or self.run is None:
            return
        holder = self.run.holder()
        if holder != self.claim:
            raise Superseded(f"claim lost: the cell's run is held by claim {holder} now, not {self.claim}; "
                             "left its run and checkpoint alone")

    def holds(self) -> bool:
        """Whether the run is still this claim's, for a cell that ends anyway: an error counts as no."""
        try:
            self.check()
        except Exception:
            return False
        return True

    def owns_checkpoint(self, cell_id: str) -> bool:
        """Whether the cell's checkpoint (if any) is this claim's to overwrite or delete: written by it,
        or already there when the cell started (then it is the one it resumed from, or older)."""
        meta = self.checkpoints.meta(cell_id) if self.checkpoints is not None else None
        return self.claim is None or meta is None or meta.get("claim") in self.found | {self.claim}

    def check_checkpoint(self, cell_id: str) -> None:
        self.check()
        if not self.owns_checkpoint(cell_id):
            raise Superseded(f"claim lost: the cell's checkpoint was written by another claim, not {self.claim}; "
                             "left its run and checkpoint alone")

    def discard(self, cell: Cell) -> None:
        """Delete the cell's checkpoints (it FINISHED or FAILED), those of this claim only."""
        if self.checkpoints is None or self.checkpoints.keep:
            return
        for cid in cell.ids:
            if self.owns_checkpoint(cid):
                self.checkpoints.discard(cid)


@dataclass
class CellResult:
    # FINISHED, FAILED, KILLED (aborted), or STOPPED: preempted or out of time, checkpointed (its run
    # KILLED, resumable) or not started (run_id ""), or the store unreachable at its start (not started,
    # its checkpoint kept); Ctrl-C is re-raised instead
    status: str
    run_id: str
    reason: str = ""
    final: dict[str, float] = field(default_factory=dict)
    exit_code: int = 0  # STOPPED: EXIT_PREEMPTED (also when the store is unreachable) or EXIT_TIME_LIMIT
    kind: str = ""  # STOPPED: 'preempted', 'time_limit' or STORE_UNREACHABLE


def dataset_key(ds: DatasetConfig) -> str:
    return json.dumps(ds.model_dump(mode="json"), sort_keys=True)


def raise_if_stopped() -> None:
    """Raise TrainingStopped when STOP asks to stop (a signal, the time limit): for the phases before a
    cell runs (decoding the data), where there is nothing to checkpoint."""
    if (why := STOP.check()) is not None:
        raise TrainingStopped(why[1], why[0])


def load_data(cells: Sequence[Cell], cache_dir: str | Path | None = None,
              stop_check: Callable[[], None] | None = None) -> dict[str, Dataset]:
    """Load each distinct dataset of `cells` once; check the model's class count against it.
    `stop_check()` is called between decode chunks and may raise to stop (raise_if_stopped)."""
    loaded: dict[str, Dataset] = {}
    for cell in cells:
        ds = cell.config.dataset
        key = dataset_key(ds)
        if key not in loaded:
            loaded[key] = load_dataset(
                ds.name, ds.root, classes=ds.classes, train_size=ds.train_size, test_size=ds.test_size,
                subset_seed=ds.subset_seed, image_size=ds.image_size, download=ds.download, cache_dir=cache_dir,
                stop_check=stop_check,
            )
        n = len(loaded[key].classes)
        model = cell.config.model
        if "num_classes" in model.model_fields_set and model.num_classes != n:
            raise ConfigError(f"model.num_classes: {model.num_classes} does not match the {n} classes of {ds.name}")
    return loaded


def model_summary(model: torch.nn.Module, config: ExperimentConfig, image_size: int) -> str:
    c = complexity(model, image_size)
    lines = [
        f"arch {config.model.arch}, {config.model.num_classes} classes, input {image_size}x{image_size}",
        f"trainable params {c.params:,}; Caffe-style params {c.caffe_params:,}; multiply-adds {c.macs:,} ({c.gflops:.4f} G)",
        "SE blocks (name: channels -> hidden):",
    ]
    lines += [f"  {name}: {b.channels} -> {b.hidden} ({b.squeeze})" for name, b in se_blocks(model).items()] or ["  none"]
    return "\n".join(lines) + "\n\n" + repr(model) + "\n"


class _Observer:
    """Sends each epoch to MLflow and to the progress display; `guard` may stop the cell between steps,
    and `fence` before an epoch is logged."""

    def __init__(self, run: CellRun, progress: GridProgress, guard: Callable[[bool], None] | None = None,
                 logged: set[int] | None = None, fence: Fence | None = None) -> None:
        self.run, self.progress, self.guard = run, progress, guard
        self.fence = fence or Fence(None)
        self.logged = logged or set()  # epochs a resumed run logged before it stopped: never logged twice

    def on_step(self, epoch: int, step: int, steps: int, loss: float | None) -> None:
        if self.guard:
            self.guard(False)
        self.progress.on_step(epoch, step, steps, loss)

    def on_epoch(self, s: EpochStats) -> None:
        if self.guard:
            self.guard(False)
        self.fence.check()
        self.log(s)
        self.progress.on_epoch(s)

    def log(self, s: EpochStats) -> None:
        if s.epoch in self.logged:
            return
        self.run.log_metrics({
            "train_loss": s.train_loss, "train_err": s.train_err, "test_top1_err": s.test_top1_err,
            "test_top5_err": s.test_top5_err, "lr": s.lr, "epoch_seconds": s.seconds, "images_per_s": s.images_per_s,
        }, step=s.epoch)
        self.logged.add(s.epoch)


def run_cell(cell: Cell, config: ExperimentConfig, data: Dataset, run: CellRun, device: torch.device,
             progress: GridProgress, guard: Callable[[bool], None] | None = None, *,
             resume: dict | None = None, checkpoints: Checkpoints | None = None,
             fence: Fence | None = None) -> dict[str, float]:
    """Train one cell (its config resolved against the data) into its open MLflow run; return its final metrics.

    `resume`: the checkpoint to continue from (the run is the one it was taken in). With `checkpoints`,
    the state is saved every `train.checkpoint_every` epochs and whenever STOP asks to stop. `fence`:
    the worker's claim, checked before each checkpoint and each epoch is written (and recorded in them).
    """
    fence = fence or Fence(None)
    seed_everything(cell.seed)
    model = build_model(config.model)
    c = complexity(model, data.image_size)
    observer = _Observer(run, progress, guard, fence=fence)
    if resume is None:
        run.log_text(config.model_dump_json(indent=2), "config.json")
        run.log_text(model_summary(model, config, data.image_size), "model_summary.txt")
    else:
        fence.check()
        observer.logged = run.logged_steps("test_top1_err")
        for h in resume["history"]:  # epochs checkpointed but not logged before the stop
            observer.log(EpochStats(**h))
    steps = len(data.train.labels) // config.train.batch_size or 1
    done = 0.0 if resume is None else (resume["epoch"] + resume["step_in_epoch"] / steps) / config.train.epochs
    progress.start_cell(cell, config.train.epochs, done)
    on_checkpoint = None
    if checkpoints is not None:

        def on_checkpoint(state: dict) -> None:
            if guard:  # a worker that may have lost its cell checkpoints nothing
                guard(False)
            fence.check_checkpoint(cell.cell_id)
            meta = {"run_id": run.run_id, "cell_id": cell.cell_id, "grid": cell.grid, "variant": cell.variant,
                    "seed": cell.seed, "epoch": state["epoch"], "step_in_epoch": state["step_in_epoch"],
                    "steps_per_epoch": steps, "epochs": config.train.epochs, "saved_at": time.time(),
                    "claim": fence.claim, "data_resident": state.get("data_resident")}
            ckpt.save(checkpoints.folder(cell.cell_id),
                      {**state, "run_id": run.run_id, "cell_id": cell.cell_id, "claim": fence.claim}, meta)

    if resume is not None:
        where = f"epoch {resume['epoch']}" + (f" + {resume['step_in_epoch']} steps" if resume["step_in_epoch"] else "")
        progress.note(f"    resuming {cell.variant} seed={cell.seed} from its checkpoint at {where} "
                      f"(run {run.run_id}, resume #{run.resumes})")
    result = train(config, model, data, device, observer=observer, resume=resume, on_checkpoint=on_checkpoint,
                   should_stop=STOP.check)
    if guard:
        guard(False)
    fence.check()
    if checkpoints is not None and (why := STOP.check()) is not None:
        # The last epoch's checkpoint is written: stop before the final metrics and the weights upload
        # (minutes to a remote store); the next run trains nothing, logs them once and finishes.
        raise TrainingStopped(why[1], why[0], config.train.epochs)
    # what `auto` chose: compile "off", "on" or "eager fallback: <why>"; precision bf16 | fp32
    run.set_tags({"compile": result.compile_status, "precision": result.precision,
                  "channels_last": str(result.channels_last).lower()})
    final = {
        "params": c.params, "caffe_params": c.caffe_params, "gflops": c.gflops,
        "final_top1_err": result.final.test_top1_err, "final_top5_err": result.final.test_top5_err,
        "best_top1_err": result.best_top1_err, "best_top5_err": result.best_top5_err,
    }
    run.log_metrics(final, step=config.train.epochs)
    run.log_state_dict(result.model.state_dict())
    return final


def resumable(client: MlflowClient, cell: Cell, checkpoints: Checkpoints) -> dict | None:
    """The checkpoint of `cell` to continue from, if its run stopped without finishing or failing:
    KILLED (Ctrl-C, preempted, out of time, a dead worker), or RUNNING with its process known to be
    gone (it ran in this PID namespace). A checkpoint of a FINISHED or FAILED run is stale: it is
    deleted (unless kept).
    A cell has one checkpoint per store (under its id, or its legacy id in an older store), whichever
    grid's worker took it: its run is resumed where it was started, in that grid's experiment.

    Only the store's own answer that the run is gone lets the cell start afresh (its checkpoint then
    overwritten): a store that does not answer is retried with backoff (`retry_outage`), and if it stays
    down StoreUnreachable is raised with the checkpoint untouched."""

    cid = next((cid for cid in cell.ids if checkpoints.exists(cid)), None)
    if cid is None:
        return None
    folder = checkpoints.folder(cid)
    try:
        state = ckpt.load(folder)
    except Exception as exc:  # unreadable: nothing to continue from (the next save replaces it)
        print(f"warning: checkpoint in {folder} not used ({type(exc).__name__}: {str(exc)[:200]})", file=sys.stderr)
        return None
    try:
        run = retry_outage(client.get_run, state["run_id"], what=f"the run of the checkpoint in {folder}")
    except StoreUnreachable:
        raise
    except Exception as exc:  # the store says the run is not there: start afresh
        print(f"warning: checkpoint in {folder} not used, its run is gone ({type(exc).__name__}: {str(exc)[:200]})",
              file=sys.stderr)
        return None
    status = run.info.status
    if state.get("cell_id") != cid or run.info.lifecycle_stage == "deleted":
        return None
    if status in ("FINISHED", "FAILED"):
        if not checkpoints.keep:
            checkpoints.discard(cid)
        return None
    if status == "RUNNING" and not process_gone(run):
        return None  # possibly alive (elsewhere, or in another PID namespace): not ours to take over
    return state


def _checkpoint_of_run(checkpoints: Checkpoints | None, cell: Cell, run_id: str) -> dict | None:
    """What the checkpoint of `cell` says (last.json), if there is one and it was taken in run `run_id`."""
    if checkpoints is None:
        return None
    for cid in cell.ids:
        meta = checkpoints.meta(cid)
        if meta is not None and meta.get("run_id") == run_id and checkpoints.exists(cid):
            return meta
    return None


def execute_cell(cell: Cell, data: Dataset, client: MlflowClient, experiment_id: str, device: torch.device,
                 progress: GridProgress, *, tags: Mapping[str, str] | None = None,
                 guard: Callable[[bool], None] | None = None,
                 on_run: Callable[[CellRun], None] | None = None,
                 checkpoints: Checkpoints | None = None, claim: str | None = None) -> CellResult:
    """Train one cell and end its MLflow run FINISHED, FAILED or KILLED; or return STOPPED.

    The one place a cell runs, serially or in a worker. With `checkpoints`, a cell whose earlier
    run stopped (killed, preempted, out of time) continues from its checkpoint in that same run.
    A failure (divergence, OOM, a bug) is recorded and returned, so the grid goes on; Ctrl-C marks
    the run KILLED and is re-raised. A stop request (STOP: SIGTERM/SIGUSR1, the time limit)
    checkpoints the cell and returns STOPPED; so does a time limit too near to reach a checkpoint,
    before anything starts. `guard(final)` is called between steps (final=False) and right before
    the run is marked FINISHED (final=True): raising CellAborted there ends the run KILLED. `on_run`
    sees the run as soon as it exists. Out of memory with a checkpoint of this run returns FAILED (an
    attempt used) but leaves the run KILLED and the checkpoint in place, so the next attempt resumes.

    `claim`: the queue claim the worker holds on the cell (see Fence). It is written on the run and
    in each checkpoint; once another claim is found there, the cell stops (KILLED) and its run and
    checkpoint are left as they are: nothing is ended, logged, written or deleted.
    """
    from ablations.run.timelimit import refuse_to_start

    config = with_num_classes(cell.config, len(data.classes))
    if (why := STOP.check()) is not None:
        return CellResult("STOPPED", "", f"{why[1]}; not started", exit_code=ckpt.exit_code_for(why[0]), kind=why[0])
    # the claims of the checkpoints there now: this cell may overwrite or delete those, and its own
    found = frozenset(m.get("claim") for cid in cell.ids if (m := checkpoints.meta(cid)) is not None) \
        if checkpoints is not None else frozenset()
    fence = Fence(claim, checkpoints, found)
    try:
        resume = resumable(client, cell, checkpoints) if checkpoints is not None else None
    except StoreUnreachable as exc:  # nothing started: the cell is left as it was, to be resumed later
        reason = f"{exc}; not started, its checkpoint kept for the next run"
        progress.note(f"[{cell.grid}] {cell.variant} seed={cell.seed}: {reason}")
        return CellResult("STOPPED", "", reason, exit_code=ckpt.exit_code_for(STORE_UNREACHABLE), kind=STORE_UNREACHABLE)
    refusal = refuse_to_start(client, cell, config, resume, len(data.train.labels))
    if refusal is not None:
        reason = f"time limit {fmt_duration(STOP.limit)}: not starting {cell.variant} seed={cell.seed}, {refusal}"
        progress.note(f"[{cell.grid}] {reason}")
        return CellResult("STOPPED", "", reason, exit_code=ckpt.exit_code_for("time_limit"), kind="time_limit")
    run = CellRun(client, experiment_id, cell, device, data.source, config, extra_tags=tags,
                  resume_run_id=resume["run_id"] if resume is not None else None, claim=claim)
    fence.run = run

    def end(status: str, reason: str | None = None, tags: Mapping[str, str] | None = None) -> bool:
        """End the run, unless another claim holds it by now: then touch nothing (False)."""
        if not fence.holds():
            return False
        if tags:
            run.set_tags(tags)
        run.end(status, reason)
        return True

    def left_alone(why: str) -> CellResult:
        why = why if "left its run" in why else f"{why}; the run is another claim's now: left its run and checkpoint alone"
        progress.end_cell(cell, "KILLED", why)
        return CellResult("KILLED", run.run_id, why)

    try:
        if on_run:
            on_run(run)
        final = run_cell(cell, config, data, run, device, progress, guard, resume=resume, checkpoints=checkpoints,
                         fence=fence)
        if guard:
            guard(True)  # the last moment a lost claim can keep a second FINISHED run of this cell out
    except TrainingStopped as exc:
        where = f"epoch {exc.epoch}" + (f" + {exc.step_in_epoch} steps" if exc.step_in_epoch else "")
        saved = f"checkpoint at {where}" if checkpoints is not None else "no checkpoint"
        if STOP.signalled_at is not None and exc.kind == "preempted":
            saved += f" {time.monotonic() - STOP.signalled_at:.2f}s after the signal"
        saved += "; the next run resumes it"
        if not end("KILLED", f"{exc.reason}: {saved}", {"stopped": exc.kind}):
            saved = "another claim holds the cell now: left its run and checkpoint alone"
        progress.end_cell(cell, "STOPPED", f"{exc.reason}: {saved}")
        return CellResult("STOPPED", run.run_id, exc.reason, exit_code=exc.exit_code, kind=exc.kind)
    except KeyboardInterrupt:
        end("KILLED", "interrupted (Ctrl-C)")
        progress.end_cell(cell, "KILLED")
        raise
    except CellAborted as exc:  # the claim is lost: end the run as whoever took the cell back would, if still ours
        if isinstance(exc, Superseded) or not end("KILLED", str(exc)):
            return left_alone(str(exc))
        progress.end_cell(cell, "KILLED", str(exc))
        return CellResult("KILLED", run.run_id, str(exc))
    except (CellFailed, DataError) as exc:
        reason = str(exc)
        kept = _checkpoint_of_run(checkpoints, cell, run.run_id) if isinstance(exc, CellOutOfMemory) else None
        if kept is not None:
            # Out of memory is a shortage, not a bad state: the run stays resumable (KILLED) with its
            # checkpoint, and the queue counts a failed attempt, so a cell that never fits ends failed.
            where = f"epoch {kept['epoch']}" + (f" + {kept['step_in_epoch']} steps" if kept.get("step_in_epoch") else "")
            reason = f"{reason}; its checkpoint at {where} is kept: the next attempt resumes it"
            run.end("KILLED", reason)
            progress.end_cell(cell, "FAILED", reason)
            return CellResult("FAILED", run.run_id, reason)
    except Exception as exc:  # a bug or a bad variant must not take the rest of the grid down
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
    else:
        if not end("FINISHED"):
            return left_alone("claim lost before the run could be marked FINISHED")
        fence.discard(cell)  # its weights are logged: the checkpoint is done with
        progress.end_cell(cell, "FINISHED", f"test err top-1 {final['final_top1_err']:.2f}%")
        return CellResult("FINISHED", run.run_id, final=final)
    if not end("FAILED", reason):
        return left_alone(f"claim lost when it failed ({reason})")
    fence.discard(cell)  # a FAILED cell starts afresh, never from here
    progress.end_cell(cell, "FAILED", reason)
    return CellResult("FAILED", run.run_id, reason)
