"""Train and evaluate one cell: SGD + momentum, a per-step LR schedule, top-1/top-5 test error per epoch.

The loop keeps the GPU busy: batches come from `iterate_batches` (data already on the
device, augmented there), losses and correct counts accumulate on the device, and the
host reads them every `sync_every` steps and at the end of an epoch, which is also when
a NaN or inf loss is caught.
"""

from __future__ import annotations

import functools
import gc
import math
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ablations.train.checkpoint import TrainingStopped, set_rng_state, training_state
from ablations.config import ExperimentConfig, TrainConfig
from ablations.data import Dataset, Split, decide_residency, is_resident, iterate_batches, release_device_splits
from ablations.util.device import native_bf16


class CellFailed(RuntimeError):
    """A run that cannot go on (diverged, out of memory); the message is the recorded reason."""


class CellOutOfMemory(CellFailed):
    """The device ran out of memory. Unlike a divergence, the last checkpoint is still good: the
    memory was short (another process, a different GPU), not the training state."""


@dataclass(frozen=True)
class EpochStats:
    epoch: int  # 1-based
    train_loss: float
    train_err: float
    test_top1_err: float
    test_top5_err: float
    lr: float
    seconds: float
    images_per_s: float


@dataclass
class TrainResult:
    model: nn.Module
    history: list[EpochStats] = field(default_factory=list)
    compile_status: str = "off"  # "on", or "eager fallback: <reason>" (never silent); logged as a run tag
    precision: str = "fp32"  # what `precision: auto` chose (or was told): "bf16" or "fp32"; a run tag (precision_for)
    channels_last: bool = False  # likewise for `channels_last`

    @property
    def final(self) -> EpochStats:
        return self.history[-1]

    @property
    def best_top1_err(self) -> float:
        return min(s.test_top1_err for s in self.history)

    @property
    def best_top5_err(self) -> float:
        return min(s.test_top5_err for s in self.history)


class Observer(Protocol):
    def on_step(self, epoch: int, step: int, steps: int, loss: float | None) -> None: ...
    def on_epoch(self, stats: EpochStats) -> None: ...


def lr_at(step: int, total: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """The learning rate at optimizer step `step` (0-based) of `total`.

    cosine:    linear warm-up over `warmup_epochs`, then cosine decay to 0.
    onecycle:  linear ramp from lr/25 to lr over `warmup_epochs` (30% of the run if 0), then linear to 0.
    multistep: linear warm-up, then lr * gamma**k after each milestone (fractions of the run).
    """
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "onecycle":
        peak_at = warmup or round(0.3 * total)
        if step < peak_at:
            return cfg.lr * (1 / 25 + (1 - 1 / 25) * step / peak_at)
        return cfg.lr * max(0.0, (total - step) / max(1, total - peak_at))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    passed = sum(step >= m * total for m in cfg.milestones)
    return cfg.lr * cfg.gamma**passed


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def precision_for(tc: TrainConfig, device: torch.device) -> str:
    """The compute precision of a cell: as asked, or for `auto` bf16 autocast where the device runs bf16
    natively (ablations.util.device.native_bf16: a CPU with AVX512-BF16/AMX, a GPU of compute capability
    8.0+), else fp32. A V100 or T4 gets fp32: fp16 autocast would need a GradScaler (its state in every
    checkpoint, skipped steps that bf16 and fp32 cells do not have), and no such GPU was at hand to
    measure it; bf16 there is emulated and slower than fp32."""
    if tc.precision != "auto":
        return tc.precision
    return "bf16" if native_bf16(device) else "fp32"


def _make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.SGD:
    kwargs = dict(lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                  weight_decay=cfg.weight_decay)
    if device.type == "cuda":
        try:  # one kernel for the whole update; older torch lacks fused SGD
            return torch.optim.SGD(model.parameters(), fused=True, **kwargs)
        except (TypeError, RuntimeError, ValueError):
            pass
    return torch.optim.SGD(model.parameters(), foreach=True, **kwargs)


def _is_oom(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, oom) or "out of memory" in str(exc).lower()


def _gpu_defaults(bf16: bool) -> None:
    """What every fast CIFAR trainer sets on a GPU.

    The GPU defaults of this harness are standard practice, and NONE of them has been measured on a
    GPU here (the machine this was written on has none; `bench/train_speed.py --device cuda` is what
    measures them): cudnn.benchmark (input shapes are fixed within a cell, drop_last, so autotuning
    once pays off); TF32 for fp32 matmuls and convolutions when bf16 autocast is off; batches that
    arrive in the compute dtype (normalize casts once, the model's first layer casts nothing);
    channels_last from the NHWC storage through augmentation without a layout copy (ablations.data.augment);
    and a zero-pad shortcut that keeps the layout (senet.resnet.PadShortcut). On a CPU only the
    layout and dtype behaviour is checked (tests/test_gpu_path.py), not any speed.
    """
    torch.backends.cudnn.benchmark = True
    if not bf16:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True  # torch's default for convolutions; stated, not assumed


def _compile_failures() -> tuple[type[BaseException], ...]:
    """What a compile failure raises: dynamo's errors (inductor wraps its own as InductorError, one of
    them), and inductor's and Triton's own where a kernel is built outside that wrapper (a C++ or CUDA
    kernel compiled at its first run, a lowering error)."""
    import torch._dynamo.exc as dynamo_exc

    found = [getattr(dynamo_exc, name) for name in ("TorchDynamoException", "FailOnRecompileLimitHit",
                                                     "TritonUnavailableError") if hasattr(dynamo_exc, name)]
    try:
        import torch._inductor.exc as inductor_exc

        found += [getattr(inductor_exc, name) for name in ("CppCompileError", "InvalidCxxCompiler", "OperatorIssue",
                                                           "SubgraphLoweringException", "CppWrapperCodegenError")
                  if hasattr(inductor_exc, name)]
    except ImportError:  # a torch without inductor
        pass
    return tuple(found)


def _compile_reason(exc: BaseException, where: str) -> str:
    inner = getattr(exc, "inner_exception", None)  # BackendCompilerFailed wraps the compiler's own error
    why = f"{type(inner).__name__}: {inner}" if inner is not None else str(exc)
    return f"{type(exc).__name__} in the {where}: {' '.join(why.split())[:240]}"


def _grads(fn: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, autocast, optimizer: torch.optim.Optimizer,
           smoothing: float) -> tuple[Tensor, Tensor]:
    """Forward, loss and backward of one training batch: (logits, loss), the gradients in place."""
    with autocast():
        logits = fn(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return logits, loss


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class _Compiled:
    """The training step's model, compiled once per cell, falling back to eager loudly, never silently.

    A worker or a multi-grid run trains many models in one process; each compile of a new
    architecture is a recompile of the same `forward` code, and past dynamo's recompile limit (8)
    dynamo would quietly run eager. So every cell starts from empty dynamo caches (reset), the
    limit raises instead of degrading, and a failure switches this cell to eager with a warning
    and `status` (the runner records it as the run's `compile` tag). The fallback covers the
    backward too: AOTAutograd compiles the backward graph at the first backward, after the forward ran.
    """

    def __init__(self, model: nn.Module, enabled: bool) -> None:
        self.model, self.fn = model, model
        self.status = "off"
        if enabled:
            import torch._dynamo

            torch._dynamo.reset()
            for flag in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):  # older torch: fail_on_cache_limit_hit
                if hasattr(torch._dynamo.config, flag):  # raise at the limit (caught below), never degrade quietly
                    setattr(torch._dynamo.config, flag, True)
                    break
            self.fn, self.status = torch.compile(model), "on"
            self.failures = _compile_failures()
            self.graphs_before = _graphs_compiled()
            self.checked = False

    def grads(self, x: Tensor, y: Tensor, autocast, optimizer: torch.optim.Optimizer,
              smoothing: float) -> tuple[Tensor, Tensor]:
        """Forward, loss and backward of one training batch: (logits, loss).

        A compile failure, in the forward (dynamo traces, inductor compiles the forward graph) or in
        the backward (its graph is compiled at the first backward), switches the cell to eager and
        the batch is done again eagerly: no optimizer step was taken and the gradients are cleared
        first; only BatchNorm's running statistics may have seen the batch twice.
        """
        if self.fn is self.model:
            return _grads(self.model, x, y, autocast, optimizer, smoothing)
        try:
            with autocast():
                logits = self.fn(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=smoothing)
        except self.failures as exc:
            self._fall_back(_compile_reason(exc, "forward"))
            return _grads(self.model, x, y, autocast, optimizer, smoothing)
        if not self.checked:
            self.checked = True
            if _graphs_compiled() == self.graphs_before:  # dynamo ran the frame eagerly without saying so
                self._fall_back("dynamo captured no graph for this model")
        optimizer.zero_grad(set_to_none=True)
        try:
            loss.backward()
        except self.failures as exc:
            self._fall_back(_compile_reason(exc, "backward"))
            return _grads(self.model, x, y, autocast, optimizer, smoothing)
        return logits, loss

    def _fall_back(self, reason: str) -> None:
        self.fn, self.status = self.model, f"eager fallback: {reason}"
        warnings.warn(f"torch.compile failed, this cell trains eagerly: {reason}", RuntimeWarning, stacklevel=3)


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, device: torch.device, batch_size: int,
             dtype: torch.dtype, channels_last: bool, autocast, flip: bool = False, *,
             resident: bool | None = None, stop_now: Callable[[], None] | None = None) -> tuple[float, float]:
    """(top-1, top-5) test error in percent; `flip` adds the mirrored image's logits (flip test-time augmentation).

    `resident`: as iterate_batches takes it (None: decided there). `stop_now()`, called before each
    batch, may raise to stop: a big test set takes longer than a stop request may wait.

    Runs the eager model even when training is compiled: evaluation is a forward pass over the
    test set once per epoch (a few percent of the work), and compiling it would add a second graph
    per cell (eval-mode BatchNorm) plus a recompile for the last, smaller batch, costing more
    compile time than it saves, with the same numbers.
    """
    model.eval()
    k = min(5, len(data.classes))
    top1 = torch.zeros((), device=device, dtype=torch.long)
    topk = torch.zeros((), device=device, dtype=torch.long)
    for x, y in iterate_batches(data.test, data, batch_size=batch_size, train=False, device=device,
                                dtype=dtype, channels_last=channels_last, resident=resident):
        if stop_now is not None:
            stop_now()
        with autocast():
            logits = model(x)
            if flip:  # the training distribution is mirror-symmetric: average both views' logits
                logits = logits + model(x.flip(3))
        pred = logits.topk(k, dim=1).indices
        hit = pred == y[:, None]
        top1 += hit[:, 0].sum()
        topk += hit.any(1).sum()
    n = len(data.test.labels)
    return 100.0 * (1 - top1.item() / n), 100.0 * (1 - topk.item() / n)


class _Residency:
    """Whether each split of a cell's data lives on the device: decided once per cell, kept with its
    checkpoint (`data_resident`), reused on resume.

    The decision sizes a split against the device's peak memory measured so far
    (ablations.data.resident), so it waits until this process has trained some of the cell: until
    then the splits stream from host memory (a copy already there, from an earlier cell of the same
    data, is used). A resumed cell takes the decision its checkpoint holds: its process starts with
    a peak of zero, which would make room appear for a split that streamed, and its first step would
    then run out of memory.
    """

    SPLITS = ("train", "test")

    def __init__(self, data: Dataset, device: torch.device, saved: Mapping[str, Any] | None) -> None:
        self.data, self.device = data, device
        self.decided = {name: bool(v) for name, v in (saved or {}).items() if name in self.SPLITS}

    def _split(self, name: str) -> Split:
        return getattr(self.data, name)

    def keep(self) -> list[Split]:
        """The splits whose device copies this cell may use: not those it decided to stream."""
        return [self._split(name) for name in self.SPLITS if self.decided.get(name, True)]

    def resident(self, name: str) -> bool:
        return self.decided.get(name, False)

    def decide(self) -> None:
        """Once a training epoch ran here (the peak is measured): decide what is not decided yet."""
        for name in self.SPLITS:
            if name not in self.decided:
                split = self._split(name)
                self.decided[name] = is_resident(split, self.device) or decide_residency(split, self.device)

    def settle(self, name: str) -> None:
        """A copy that failed (the room went between sizing and copying): the split streams from now on."""
        if self.decided.get(name) and not is_resident(self._split(name), self.device):
            self.decided[name] = False

    def state(self) -> dict[str, bool]:
        return dict(self.decided)


def _train_epoch(cfg: ExperimentConfig, epoch: int, step: int, total: int, steps_per_epoch: int,
                 step_fn: _Compiled, optimizer: torch.optim.Optimizer, data: Dataset, device: torch.device,
                 dtype: torch.dtype, channels_last: bool, autocast, observer: Observer | None, sync_every: int,
                 resident: bool, skip: int = 0, partial: Mapping[str, Any] | None = None,
                 stop_now: Callable[..., None] | None = None) -> tuple[int, float, dict[str, Any]]:
    """One epoch of SGD; returns (step, the last step's lr, the epoch's accumulators: loss_sum, wrong,
    seen and seconds, those of a resumed epoch's earlier part included). `skip`, `partial`: resume
    after step `skip` with those accumulators; `resident`: whether the training split is on the device;
    `stop_now(epochs done, step in epoch, global step, accumulators)` is called at every step boundary.

    Its own frame, so that after an out-of-memory error the batch's tensors die with the traceback.
    """
    tc = cfg.train
    step_fn.model.train()
    started = time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    wrong = torch.zeros((), device=device, dtype=torch.long)
    seen, lr, carried = 0, tc.lr, 0.0
    if skip and partial is not None:
        loss_sum, wrong = partial["loss_sum"].to(device), partial["wrong"].to(device)
        seen, carried = partial["seen"], partial["seconds"]
    batches = iterate_batches(data.train, data, batch_size=tc.batch_size, train=True, device=device,
                              epoch=epoch, seed=cfg.seed, drop_last=len(data.train.labels) >= tc.batch_size,
                              dtype=dtype, channels_last=channels_last, resident=resident,
                              start=skip)  # a resumed epoch: exactly the uninterrupted epoch's batches from `skip` on
    for i, (x, y) in enumerate(batches, start=skip):
        lr = lr_at(step, total, tc, steps_per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits, loss = step_fn.grads(x, y, autocast, optimizer, tc.label_smoothing)
        optimizer.step()
        loss_sum += loss.detach() * len(y)
        wrong += (logits.detach().argmax(1) != y).sum()
        seen += len(y)
        step += 1
        if (i + 1) % sync_every == 0:
            running = loss_sum.item() / seen  # the one host sync every `sync_every` steps
            if not math.isfinite(running):
                raise CellFailed(f"loss became {running} at epoch {epoch}, step {i + 1}")
            if observer:
                observer.on_step(epoch, i + 1, steps_per_epoch, running)
        elif observer:
            observer.on_step(epoch, i + 1, steps_per_epoch, None)
        if stop_now is not None:
            stop_now(epoch - 1, i + 1, step, {"loss_sum": loss_sum.detach(), "wrong": wrong, "seen": seen,
                                              "seconds": carried + time.perf_counter() - started})
    lr = lr_at(max(0, step - 1), total, tc, steps_per_epoch)  # the last step's (also after a resume at the epoch's end)
    return step, lr, {"loss_sum": loss_sum.detach(), "wrong": wrong, "seen": seen,
                      "seconds": carried + time.perf_counter() - started}


def train(cfg: ExperimentConfig, model: nn.Module, data: Dataset, device: torch.device,
          observer: Observer | None = None, sync_every: int = 50, *, resume: Mapping[str, Any] | None = None,
          on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
          should_stop: Callable[[], tuple[str, str] | None] | None = None) -> TrainResult:
    """Train `model` on `data` as `cfg.train` says; raise CellFailed on divergence, CellOutOfMemory on OOM.

    `resume`: a checkpoint (ablations.train.checkpoint) to continue from. `on_checkpoint(state)` gets the
    state every `train.checkpoint_every` epochs and at the last. `should_stop()`, polled before the
    first step (whose compile cannot be interrupted), at every step boundary and before each
    evaluation batch, returns (kind, reason) to stop: the state goes to `on_checkpoint` at once, even
    mid-epoch or mid-evaluation (then as the epoch's end, its evaluation to be done again), and
    TrainingStopped is raised.
    """
    tc = cfg.train
    cuda = device.type == "cuda"
    precision = precision_for(tc, device)
    bf16 = precision == "bf16"
    channels_last = (cuda or bf16) if tc.channels_last == "auto" else bool(tc.channels_last)
    compile_on = cuda if tc.compile == "auto" else tc.compile
    dtype = torch.bfloat16 if bf16 else torch.float32  # batches arrive in the compute dtype: no cast in the model
    autocast: Callable[[], object] = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    )
    residency = _Residency(data, device, resume.get("data_resident") if resume is not None else None)
    # Device copies of other data (an earlier cell's) and of splits this cell streams: a worker keeps
    # its datasets for its whole life, and their copies with them.
    release_device_splits(keep=residency.keep())
    if cuda:
        _gpu_defaults(bf16)
        gc.collect()  # the previous cell's tensors, then its cached blocks: this cell starts clean
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    step_fn = _Compiled(model, compile_on)
    optimizer = _make_optimizer(model, tc, device)
    steps_per_epoch = len(data.train.labels) // tc.batch_size or 1
    total = steps_per_epoch * tc.epochs
    eval_bs = tc.eval_batch_size or 2 * tc.batch_size
    result = TrainResult(model, compile_status=step_fn.status, precision=precision, channels_last=channels_last)
    step, first_epoch, skip, partial = 0, 1, 0, None
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        set_rng_state(resume["rng"])
        result.history = [EpochStats(**h) for h in resume["history"]]
        step, first_epoch = resume["global_step"], resume["epoch"] + 1
        skip, partial = resume["step_in_epoch"], resume["partial"]

    def snapshot(epochs_done: int, at_step: int, step_in_epoch: int = 0, accumulators: dict | None = None) -> dict:
        return training_state(model, optimizer, epoch=epochs_done, step_in_epoch=step_in_epoch, global_step=at_step,
                              history=[asdict(s) for s in result.history], partial=accumulators,
                              data_resident=residency.state())

    def stop_now(epochs_done: int, step_in_epoch: int, at_step: int, accumulators: Mapping[str, Any] | None) -> None:
        why = should_stop() if should_stop is not None else None
        if why is not None:
            if on_checkpoint is not None:
                on_checkpoint(snapshot(epochs_done, at_step, step_in_epoch, dict(accumulators) if accumulators else None))
            raise TrainingStopped(why[1], why[0], epochs_done, step_in_epoch)

    polled = stop_now if should_stop is not None else None
    oom = ""
    try:
        if polled is not None:  # a stop requested while the cell was set up does not wait for the first compile
            polled(first_epoch - 1, skip, step, partial)
        for epoch in range(first_epoch, tc.epochs + 1):
            step_before = step
            step, lr, acc = _train_epoch(
                cfg, epoch, step, total, steps_per_epoch, step_fn, optimizer, data, device, dtype, channels_last,
                autocast, observer, sync_every, residency.resident("train"), skip, partial, polled)
            skip, partial = 0, None
            residency.settle("train")
            if step > step_before:  # this process trained: the peak memory is measured
                residency.decide()
            result.compile_status = step_fn.status
            seen, wrong = acc["seen"], acc["wrong"].item()
            train_loss = acc["loss_sum"].item() / max(1, seen)
            if not math.isfinite(train_loss):
                raise CellFailed(f"loss became {train_loss} at epoch {epoch}")
            train_seconds = acc["seconds"]
            stop_in_eval = None if polled is None else functools.partial(
                polled, epoch - 1, steps_per_epoch, step, acc)  # the epoch trained, its evaluation to do again
            eval_start = time.perf_counter()
            top1, top5 = evaluate(model, data, device, eval_bs, dtype, channels_last, autocast, tc.eval_flip,
                                  resident=residency.resident("test"), stop_now=stop_in_eval)
            residency.settle("test")
            stats = EpochStats(
                epoch=epoch, train_loss=train_loss, train_err=100.0 * wrong / max(1, seen),
                test_top1_err=top1, test_top5_err=top5, lr=lr,
                seconds=train_seconds + time.perf_counter() - eval_start,
                images_per_s=seen / max(train_seconds, 1e-9),
            )
            result.history.append(stats)
            # Poll before the checkpoint is written (a request that comes later stops within the next
            # epoch), and write it before the epoch's metrics are logged (a resume logs no epoch twice).
            why = should_stop() if should_stop is not None and epoch < tc.epochs else None
            if on_checkpoint is not None and (why or epoch % tc.checkpoint_every == 0 or epoch == tc.epochs):
                on_checkpoint(snapshot(epoch, step))
            if observer:
                observer.on_epoch(stats)
            if why is not None:
                raise TrainingStopped(why[1], why[0], epoch)
    except RuntimeError as exc:
        if isinstance(exc, CellFailed) or not _is_oom(exc):
            raise
        oom = f"out of memory: {str(exc).splitlines()[0][:200]}"
        # Leaving this block drops `exc`, its traceback and the frames it holds (the batch's tensors).
    if oom:
        del step_fn, optimizer  # compiled graphs, momentum buffers
        release_device_splits()  # the data's device copies too: the next attempt starts from an empty device
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()  # only now is there something to give back
        raise CellOutOfMemory(oom)
    return result
