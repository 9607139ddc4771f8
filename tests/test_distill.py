"""Stage 4: the outer loop — validation, resume ≡ uninterrupted, and the α / NaN guard."""
from dataclasses import replace

import pytest
import torch

from core_helpers import MemoryTrajectories, interrupt_then_resume, sgd_trajectories, tiny_convnet, toy_dataset
from mttlite.distill import PRESETS, DistillationDiverged, DistillConfig, Distiller, preset, run




@pytest.fixture(scope="module")
def setup():
    ds = toy_dataset()
    net = tiny_convnet(num_classes=3, width=4, im=8, dtype=torch.float32)
    experts = sgd_trajectories(net, ds.train_images, ds.train_labels, num_experts=2, epochs=4, lr=0.1)
    return ds, net, experts


def _config(**kw):
    base = dict(dataset="toy", ipc=2, syn_steps=3, expert_epochs=1, max_start_epoch=3, iterations=6,
                lr_img=10.0, lr_lr=1e-4, lr_teacher=0.05, dsa_strategy="color_crop_cutout_flip_scale_rotate",
                checkpoint_every=2, seed=7)
    base.update(kw)
    return DistillConfig(**base)


def test_config_validation_names_every_bad_field():
    with pytest.raises(ValueError) as e:
        DistillConfig(ipc=0, syn_steps=0, expert_epochs=-1, max_start_epoch=0, lr_img=-1, gradient="tesla",
                      pix_init="gan", dsa_strategy="crop_blur").validate()
    msg = str(e.value)
    for name in ("ipc", "syn_steps", "expert_epochs", "max_start_epoch", "lr_img", "gradient", "pix_init", "blur"):
        assert name in msg
    for name, cfg in PRESETS.items():
        cfg.validate()
    assert preset("cifar10-ipc10", iterations=3).iterations == 3
    with pytest.raises(ValueError, match="cifar10-ipc1"):
        preset("cifar-10")


def test_bad_inputs_against_data_and_buffer(setup):
    ds, net, experts = setup
    with pytest.raises(ValueError, match="max_start_epoch"):
        Distiller(_config(max_start_epoch=4, expert_epochs=2), ds, net, experts)  # needs epoch 5, has 0..4
    with pytest.raises(ValueError, match="smallest class"):
        Distiller(_config(ipc=9), ds, net, experts)
    with pytest.raises(ValueError, match="batch_syn"):
        Distiller(_config(batch_syn=7), ds, net, experts)


def test_images_initialised_from_real_samples_of_each_class(setup):
    ds, net, experts = setup
    d = Distiller(_config(), ds, net, experts)
    assert d.labels.tolist() == [0, 0, 1, 1, 2, 2]
    for img, lab in zip(d.images, d.labels):
        hits = (ds.train_images == img).flatten(1).all(1).nonzero().flatten()
        assert len(hits) == 1 and ds.train_labels[hits[0]] == lab


@pytest.mark.parametrize("gradient", ["exact", "unroll"])
def test_loss_decreases_and_alpha_moves(setup, gradient):
    ds, net, experts = setup
    d = Distiller(_config(iterations=30, gradient=gradient, dsa_strategy="", max_start_epoch=1, lr_img=100.0), ds, net, experts)
    run(d, progress=False)
    first, last = sum(d.history.loss[:5]) / 5, sum(d.history.loss[-5:]) / 5
    assert last < first, (first, last)  # same start epoch every time: the set must get better at matching it
    assert d.history.syn_lr[-1] != 0.05


def test_exact_and_unroll_modes_take_identical_steps(setup):
    ds, net, experts = setup
    runs = [run(Distiller(_config(gradient=m, iterations=3), ds, net, experts), progress=False) for m in ("exact", "unroll")]
    torch.testing.assert_close(runs[0].images, runs[1].images, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(runs[0].syn_lr, runs[1].syn_lr, rtol=1e-4, atol=1e-7)


def test_resume_is_bit_identical_to_uninterrupted(setup, tmp_path):
    ds, net, experts = setup
    full = run(Distiller(_config(), ds, net, experts), tmp_path / "a", progress=False)

    seen = []  # stopped after iteration 5; the last checkpoint is iteration 4
    resumed = interrupt_then_resume(lambda: Distiller(_config(), ds, net, experts), tmp_path / "b", stop_at=5,
                                    callbacks=(lambda i: seen.append(i.iteration),))
    assert seen == [5, 6]  # it continued from the checkpoint, it did not start over
    assert torch.equal(resumed.images, full.images)
    assert torch.equal(resumed.syn_lr, full.syn_lr)
    assert resumed.history.loss == full.history.loss


def test_resume_refuses_a_different_configuration(setup, tmp_path):
    ds, net, experts = setup
    run(Distiller(_config(iterations=2), ds, net, experts), tmp_path, progress=False)
    with pytest.raises(ValueError, match="syn_steps"):
        run(Distiller(_config(iterations=4, syn_steps=2), ds, net, experts), tmp_path, progress=False)
    with pytest.raises(ValueError, match="not a readable"):
        (tmp_path / "checkpoint.safetensors").write_bytes(b"\x00" * 10)
        run(Distiller(_config(iterations=4), ds, net, experts), tmp_path, progress=False)


def test_guard_fires_when_alpha_goes_non_positive_and_keeps_last_good_state(setup, tmp_path):
    """Constructed divergence: an expert that barely moves. Then L ≈ α²‖g‖²/‖θ*_t − θ*_{t+1}‖², so
    ∂L/∂α = 2α‖g‖²/… > 0 and one SGD step with a large lr_lr throws α below zero."""
    ds, net, experts = setup
    theta0 = experts.flat(0, 0)
    still = MemoryTrajectories([[theta0, theta0 + 1e-2 * torch.randn(theta0.shape, generator=torch.Generator().manual_seed(0))]])
    cfg = _config(iterations=3, max_start_epoch=1, expert_epochs=1, lr_lr=1.0)
    d = Distiller(cfg, ds, net, still)
    start_images = d.images.detach().clone()
    with pytest.raises(DistillationDiverged, match="lr_lr") as e:
        run(d, tmp_path, progress=False)
    assert "alpha_param='log'" in str(e.value) and "≤ 0" in str(e.value)
    # The last good state is the initial one: nothing was applied.
    assert torch.equal(d.images, start_images) and d.syn_lr.item() == torch.tensor(cfg.lr_teacher).item() and d.iteration == 0
    # It was written to the run directory and resumes once the knob is turned (lr_lr = 0 freezes α).
    d2 = run(Distiller(replace(cfg, lr_lr=0.0), ds, net, still), tmp_path, progress=False)
    assert d2.iteration == 3 and d2.syn_lr.item() == torch.tensor(cfg.lr_teacher).item()


def test_guard_fires_on_non_finite_pixels(setup):
    ds, net, experts = setup
    d = Distiller(_config(iterations=5, lr_img=1e38), ds, net, experts)
    with pytest.raises(DistillationDiverged, match="lr_img"):
        run(d, progress=False)
    assert torch.isfinite(d.images).all()


def test_log_alpha_stays_positive_and_follows_chain_rule(setup):
    ds, net, experts = setup
    lin = Distiller(_config(iterations=1, momentum=0.0, lr_lr=1e-3), ds, net, experts)
    log = Distiller(_config(iterations=1, momentum=0.0, lr_lr=1e-3, alpha_param="log"), ds, net, experts)
    info_lin, info_log = lin.step(), log.step()
    # Same first iteration → same ∂L/∂α; the log step is a ← a − lr·α·∂L/∂α.
    assert info_lin.grad_syn_lr == pytest.approx(info_log.grad_syn_lr, rel=1e-5)
    expected = 0.05 * torch.exp(torch.tensor(-1e-3 * 0.05 * info_log.grad_syn_lr)).item()
    assert log.syn_lr.item() == pytest.approx(expected, rel=1e-6)
    assert replace(_config(), alpha_param="log").validate().alpha_param == "log"


def test_docs_method_presets_table_matches_presets():
    """docs/method.md's table of the authors' values is the PRESETS dict, row by row (no drift)."""
    from pathlib import Path

    from mttlite.distill import PRESETS

    text = (Path(__file__).resolve().parents[1] / "docs" / "method.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `") and line.count("|") == 11]
    assert len(rows) == 9, rows
    for row in rows:
        name, n, m, t, lr_img, lr_lr, a0, batch, zca, its = (c.strip() for c in row.strip("|").split("|"))
        c = PRESETS[name.strip("`")]
        assert (int(n), int(m), int(t), int(its)) == (c.syn_steps, c.expert_epochs, c.max_start_epoch, c.iterations), name
        assert (float(lr_img), float(lr_lr), float(a0)) == (c.lr_img, c.lr_lr, c.lr_teacher), name
        assert (None if batch == "all" else int(batch)) == c.batch_syn and (zca == "yes") == c.zca, name


def test_a_ctrl_c_that_python_drops_still_stops_the_run(setup, tmp_path, monkeypatch):
    """A KeyboardInterrupt raised while Python runs a __del__ is printed and dropped ("Exception ignored"):
    with the command line's handler installed (mttlite.errors), the run stops at the next iteration anyway,
    its last checkpoint intact."""
    import gc
    import signal
    import sys

    from mttlite import errors

    class Dropper:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)  # the handler's KeyboardInterrupt is raised inside __del__

    def ctrl_c_in_a_destructor(info):
        if info.iteration == 3:
            d = Dropper()
            del d  # "Exception ignored in ... KeyboardInterrupt": Python drops it
            gc.collect()

    dropped = []  # what Python reports as "Exception ignored in ..." (sys.unraisablehook)
    monkeypatch.setattr(sys, "unraisablehook", lambda u: dropped.append(u.exc_type))
    previous = errors.install_interrupt_handler()
    try:
        with pytest.raises(KeyboardInterrupt):
            run(Distiller(_config(), *setup), tmp_path, progress=False, callbacks=(ctrl_c_in_a_destructor,))
    finally:
        errors.restore_interrupt_handler(previous)
    assert dropped == [KeyboardInterrupt]  # Python did drop it: without the handler's memory the run would go on
    from mttlite.io import read_meta_only

    assert read_meta_only(tmp_path / "checkpoint.safetensors")["iteration"] == 2  # stopped before iteration 4


def test_the_command_line_puts_back_the_ctrl_c_handler_it_found(tmp_path):
    """cli.main installs its remembering SIGINT handler for its own run only: an in-process caller (a
    notebook kernel, whose interrupt button sends SIGINT) gets its own handler back, with nothing pending."""
    import signal

    from mttlite import cli, errors
    from mttlite.errors import EXIT_BAD_INPUT

    def mine(signum, frame):
        pass

    before = signal.signal(signal.SIGINT, mine)
    try:
        assert cli.main(["export", str(tmp_path / "missing.safetensors"), "--png", str(tmp_path / "x.png")]) \
            == EXIT_BAD_INPUT
        assert signal.getsignal(signal.SIGINT) is mine
        errors.check_interrupt()  # nothing pending: does not raise
    finally:
        signal.signal(signal.SIGINT, before)
