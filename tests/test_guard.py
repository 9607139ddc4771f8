"""The divergence guard on real small runs (embedded Fashion-MNIST, a width-4 ConvNet expert).

A diverged state must never be kept as "good": for each way a run diverges (α's learning rate too
large, linear or log; the pixels' learning rate too large; α0 too large; a checkpoint that had
already diverged) the guard must stop with the knob, its value and a suggested value, keep and save
the last *sane* state, and resuming with the suggested value (or restarting, when the knob cannot
change on resume) must then run.
"""
from __future__ import annotations

import math

import pytest
import torch

from mttlite import distill as D
from mttlite.data import load_dataset
from mttlite.distill import DistillationDiverged, DistillConfig, preset, run, suggest_lower
from mttlite.experts import train_experts
from mttlite.io import load_tensors
from mttlite.pipeline import make_distiller


@pytest.fixture(scope="module")
def ds():
    return load_dataset("fashion-mnist-mini")


@pytest.fixture(scope="module")
def buffer(ds, tmp_path_factory):
    return train_experts(ds, tmp_path_factory.mktemp("buf"), num_experts=1, train_epochs=3, width=4, progress=False)


def _cfg(**kw):
    base = dict(iterations=8, syn_steps=3, max_start_epoch=2, expert_epochs=1, checkpoint_every=50)
    base.update(kw)
    return DistillConfig(**base)


def _saved(run_dir):
    tensors, meta = load_tensors(run_dir / "checkpoint.safetensors", D.CHECKPOINT_FORMAT, "checkpoint")
    return tensors, meta


def test_thresholds_leave_healthy_runs_alone(ds, buffer):
    """The presets' rates, IPC 1 and 10: every per-iteration change far inside the guard's bounds."""
    for cfg in (preset("demo", max_start_epoch=2, expert_epochs=1, syn_steps=5, iterations=30),
                _cfg(ipc=10, syn_steps=5, iterations=15, lr_lr=1e-5)):
        d = make_distiller(cfg, buffer, dataset=ds)
        prev = [d.images.detach().norm().item(), d.syn_lr.item()]
        worst = {"alpha": 0.0, "pixels": 0.0, "loss": 0.0, "range": 1.0}

        def watch(info, prev=prev, worst=worst, a0=cfg.lr_teacher):
            n = info.images.detach().norm().item()
            worst["alpha"] = max(worst["alpha"], abs(info.syn_lr / prev[1] - 1))
            worst["pixels"] = max(worst["pixels"], abs(n / prev[0] - 1))
            worst["loss"] = max(worst["loss"], info.loss)
            worst["range"] = max(worst["range"], info.syn_lr / a0, a0 / info.syn_lr)
            prev[:] = [n, info.syn_lr]

        run(d, progress=False, callbacks=(watch,))
        assert d.iteration == cfg.iterations
        # Measured: α ≤ 7 %, ‖x‖ ≤ 0.7 % per iteration, α within ×2 of α0, L < 0.6.
        assert worst["alpha"] < 0.2 and worst["pixels"] < 0.05, worst
        assert worst["range"] < 3 and worst["loss"] < 2, worst
        # ... and the bounds leave a wide margin: ×5 on a jump, ×100 on the range and on L.
        assert 5 * (1 + worst["alpha"]) < D.ALPHA_JUMP and 5 * (1 + worst["pixels"]) < D.PIXEL_JUMP
        assert 100 * worst["loss"] < D.LOSS_MAX and 100 * worst["range"] < D.ALPHA_RANGE


@pytest.mark.parametrize("kw, knob, value", [
    (dict(lr_lr=10.0), "lr_lr", 10.0),                      # the issue: α = 3.4e19 and pixels of 6e23 were kept
    (dict(lr_lr=1.0), "lr_lr", 1.0),                        # the issue: α = 21.7 was kept
    (dict(alpha_param="log", lr_lr=1e3), "lr_lr", 1e3),     # the issue: the message advised alpha_param='log'
    (dict(lr_img=1e15), "lr_img", 1e15),                    # the issue: exit 0 with pixels of 1.6e12
])
def test_guard_keeps_the_last_sane_state_and_its_advice_resumes(ds, buffer, tmp_path, kw, knob, value):
    cfg = _cfg(**kw)
    d = make_distiller(cfg, buffer, dataset=ds)
    x0, a0 = d.images.detach().clone(), d.syn_lr.item()
    with pytest.raises(DistillationDiverged) as e:
        run(d, tmp_path, progress=False)
    err = e.value
    msg = str(err)
    assert err.knob == knob and err.value == value and err.resumable
    assert 0 < err.suggested <= value / 10
    flag = f"--{knob.replace('_', '-')} {err.suggested:g}"
    assert f"{knob} = {value:g} is too large" in msg and f"e.g. to {err.suggested:g}" in msg
    assert f"rerun with {flag}" in msg and "same --out" in msg and "--restart" in msg
    assert "last good one" in msg
    if kw.get("alpha_param") == "log":
        assert "alpha_param='log'" not in msg  # it is already log
    # The kept and saved state is the last sane one: here, the initial state (nothing was applied).
    tensors, meta = _saved(tmp_path)
    assert meta["iteration"] == d.iteration == err.iteration
    assert torch.equal(d.images.detach(), x0) and d.syn_lr.item() == a0
    assert torch.equal(tensors["images"], x0) and tensors["alpha_raw"].item() == d.alpha_raw.item()
    # Resuming with the suggested value (same run directory) runs to the end, sanely.
    d2 = make_distiller(_cfg(**{**kw, knob: err.suggested}), buffer, dataset=ds)
    run(d2, tmp_path, progress=False)
    assert d2.iteration == cfg.iterations
    assert a0 / D.ALPHA_RANGE < d2.syn_lr.item() < a0 * D.ALPHA_RANGE
    assert d2.images.detach().pow(2).mean().sqrt().item() < 10


def test_alpha_zero_for_too_large_a_teacher_lr_asks_for_a_restart(ds, buffer, tmp_path):
    """α0 = 50: the student diverges from the initial state (the issue: lr_teacher 1e300 blamed lr_img)."""
    cfg = _cfg(lr_teacher=50.0)
    d = make_distiller(cfg, buffer, dataset=ds)
    with pytest.raises(DistillationDiverged) as e:
        run(d, tmp_path, progress=False)
    err, msg = e.value, str(e.value)
    assert err.knob == "lr_teacher" and not err.resumable and err.iteration == 0
    assert "α0 = lr_teacher = 50 is too large" in msg and "lr_img" not in msg
    assert f"--lr-teacher {err.suggested:g} --restart" in msg
    d2 = make_distiller(_cfg(lr_teacher=err.suggested), buffer, dataset=ds)
    run(d2, tmp_path, resume=False, progress=False)  # the advice: --restart
    assert d2.iteration == cfg.iterations


def test_a_state_whose_own_loss_diverges_is_rolled_back(ds, buffer, tmp_path, monkeypatch):
    """An update that passes the jump checks but leads to a state whose L is refused (LOSS_MAX lowered
    to between the first and the second iteration's L): the run goes back to the state before it."""
    cfg = _cfg(lr_img=3e4, iterations=4)
    losses = []
    run(make_distiller(cfg, buffer, dataset=ds), progress=False, callbacks=(lambda i: losses.append(i.loss),))
    assert losses[1] > losses[0]
    monkeypatch.setattr(D, "LOSS_MAX", (losses[0] + losses[1]) / 2)
    d = make_distiller(cfg, buffer, dataset=ds)
    x0, a0, rng0 = d.images.detach().clone(), d.alpha_raw.item(), d.generator.get_state()
    with pytest.raises(DistillationDiverged) as e:
        run(d, tmp_path, progress=False)
    err, msg = e.value, str(e.value)
    assert "iteration 2: the student diverges" in msg and "update of iteration 1 that led there is undone" in msg
    assert err.knob == "lr_img" and err.iteration == 0 and d.iteration == 0 and d.history.loss == []
    assert torch.equal(d.images.detach(), x0) and d.alpha_raw.item() == a0
    assert torch.equal(d.generator.get_state(), rng0)  # resumes with the draws of iteration 1
    tensors, meta = _saved(tmp_path)
    assert meta["iteration"] == 0 and torch.equal(tensors["images"], x0)


def test_a_diverged_checkpoint_asks_for_a_restart(ds, buffer, tmp_path):
    """A checkpoint written with an insane α (by a run before this guard): resuming says --restart."""
    d = make_distiller(_cfg(iterations=1), buffer, dataset=ds)
    run(d, tmp_path, progress=False)
    with torch.no_grad():
        d.alpha_raw.fill_(50.0)
    d.save_checkpoint(tmp_path / "checkpoint.safetensors")
    with pytest.raises(DistillationDiverged) as e:
        run(make_distiller(_cfg(iterations=3), buffer, dataset=ds), tmp_path, progress=False)
    assert e.value.knob is None and "loaded from a checkpoint (iteration 1)" in str(e.value)
    assert str(e.value).endswith("Start over with --restart (resume=False).")
    d3 = make_distiller(_cfg(iterations=3), buffer, dataset=ds)
    run(d3, tmp_path, resume=False, progress=False)
    assert d3.iteration == 3


def test_suggested_values():
    assert suggest_lower(10.0) == 1.0 and suggest_lower(1e-5) == pytest.approx(1e-6)
    assert suggest_lower(10.0, 2.06e4) == pytest.approx(4e-5)  # a ×2e4 jump: a rate that moves α ~10 %
    assert suggest_lower(1e15, 1.56e11) == 600.0
    assert suggest_lower(1e3, math.inf) == 1.0
