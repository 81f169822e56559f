"""The training loop: LR schedules, learning on real(istic) data, divergence, determinism."""

from __future__ import annotations

import shutil

import pytest
import torch

from ablations.config import ExperimentConfig, TrainConfig
from ablations.data import load_dataset
from ablations.train import CellFailed, lr_at, seed_everything, train
from senet import build_model


def tc(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 10, "lr": 1.0, **kw})


def test_cosine_with_warmup():
    cfg = tc(schedule="cosine", warmup_epochs=2)
    lrs = [lr_at(s, 100, cfg, steps_per_epoch=10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.05) and lrs[19] == pytest.approx(1.0)  # linear ramp over 20 steps
    assert all(a < b for a, b in zip(lrs[:19], lrs[1:20]))
    assert lrs[20] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.5)  # half-way through the decay
    assert all(a >= b for a, b in zip(lrs[20:], lrs[21:])) and lrs[-1] < 1e-3


def test_onecycle_peaks_at_30_percent_then_falls_to_zero():
    cfg = tc(schedule="onecycle")
    lrs = [lr_at(s, 100, cfg, steps_per_epoch=10) for s in range(101)]
    assert lrs[0] == pytest.approx(1 / 25) and max(lrs) == pytest.approx(1.0) and lrs.index(max(lrs)) == 30
    assert lrs[100] == 0.0


def test_multistep_divides_at_milestones():
    cfg = tc(schedule="multistep", milestones=[0.5, 0.75], gamma=0.1)
    lrs = [lr_at(s, 100, cfg, steps_per_epoch=10) for s in range(100)]
    assert lrs[49] == 1.0 and lrs[50] == pytest.approx(0.1) and lrs[75] == pytest.approx(0.01)


def _config(**train) -> ExperimentConfig:
    return ExperimentConfig.model_validate({
        "dataset": {"name": "synthetic", "train_size": 256, "test_size": 128},
        "model": {"arch": "resnet20", "num_classes": 10, "se": {"reduction": 4}},
        "train": {"epochs": 2, "batch_size": 32, "lr": 0.05, "schedule": "cosine", **train},
        "seed": 0,
    })


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return load_dataset("synthetic", ".", train_size=256, test_size=128, cache_dir=tmp_path_factory.mktemp("c"))


def _run(cfg: ExperimentConfig, data):
    seed_everything(cfg.seed)
    return train(cfg, build_model(cfg.model), data, torch.device("cpu"), sync_every=4)


def test_learns_and_is_deterministic(synthetic):
    cfg = _config()
    a, b = _run(cfg, synthetic), _run(cfg, synthetic)
    assert len(a.history) == 2
    assert a.history[-1].train_loss < a.history[0].train_loss
    assert a.final.test_top1_err < 60  # chance is 90%
    assert 0 <= a.final.test_top5_err <= a.final.test_top1_err
    assert [s.train_loss for s in a.history] == [s.train_loss for s in b.history]
    assert [s.test_top1_err for s in a.history] == [s.test_top1_err for s in b.history]


def test_divergence_fails_the_cell(synthetic):
    with pytest.raises(CellFailed, match="loss became (nan|inf)"):
        _run(_config(lr=1e12, epochs=1), synthetic)



@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile on a CPU needs a C++ compiler (inductor's CPU code generation)")
@pytest.mark.slow
def test_compiled_training_matches_eager_and_saves_plain_weights(synthetic):
    """train.compile=true: the same numbers as eager (up to float reassociation), and the weights come
    back under the model's own keys, loadable into an uncompiled model (no `_orig_mod.` prefix)."""
    eager = _run(_config(epochs=1), synthetic)
    compiled = _run(_config(epochs=1, compile=True), synthetic)
    # up to reassociation at the training precision: one bf16 unit roundoff (2**-8) where `auto` trains in bf16
    # (seen on an AMD EPYC without AMX: 1.4e-3 apart), 1e-3 in fp32
    rel = 2.0**-8 if eager.precision == "bf16" else 1e-3
    assert compiled.history[0].train_loss == pytest.approx(eager.history[0].train_loss, rel=rel)
    assert abs(compiled.final.test_top1_err - eager.final.test_top1_err) <= 2.0  # a flip or two of 128 images
    state = compiled.model.state_dict()
    fresh = build_model(_config().model)
    assert set(state) == set(fresh.state_dict())
    fresh.load_state_dict(state)
