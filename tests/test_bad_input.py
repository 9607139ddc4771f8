"""The command line given bad input, driven as a user drives it: ``python -m mttlite`` in a subprocess.

Every expected mistake (a bad setting, an output path that cannot be written, a foreign or damaged
file, a diverging run, Ctrl-C, a second writer) must end in ONE line on stderr, naming what is wrong
and what to do, with a non-zero exit code (2 bad input, 3 divergence, 1 system error, 130 Ctrl-C)
and no traceback, and must leave nothing written or overwritten. Only a bug prints a traceback, then
a line asking for a report (exit code 70). The cases are those of issue 13. A few need to fake the
system (a full disk) or the code (a bug, an expert that turns NaN): those call ``cli.main`` in-process.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mttlite import cli
from mttlite.buffers import ExpertBuffer, save_expert
from mttlite.data import load_dataset
from mttlite.distill import DistillConfig
from mttlite.errors import EXIT_BAD_INPUT, EXIT_BUG, EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_OS
from mttlite.experts import train_experts
from mttlite.io import RunLock, load_tensors, read_meta_only, save_tensors
from mttlite.pipeline import distill_set

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY = ["--iterations", "3", "--syn-steps", "3", "--max-start-epoch", "2", "--expert-epochs", "1"]


def mttlite(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mttlite", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def one_error(r, code: int, *fragments: str) -> str:
    """The run failed with ``code`` and exactly one ``mttlite <command>: …`` line holding every fragment."""
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("mttlite ")]
    assert len(lines) == 1, r.stderr[-3000:]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def tree(path: Path) -> dict:
    """Every file under ``path`` (or ``path`` itself) → sha256 of its bytes: to show nothing changed."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def flip_bytes(path: Path, keys=None) -> None:
    """Flip one bit in the first byte of each tensor's data (``keys``: only those tensors); the header stays valid."""
    b = bytearray(path.read_bytes())
    n = int.from_bytes(b[:8], "little")
    for k, v in json.loads(b[8:8 + n]).items():
        if k != "__metadata__" and (keys is None or k in keys) and v["data_offsets"][1] > v["data_offsets"][0]:
            b[8 + n + v["data_offsets"][0]] ^= 0x40
    path.write_bytes(bytes(b))


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """A width-4 buffer (1 expert, epochs 0..3), a width-8 one, a distilled set with its checkpoint, a file."""
    root = tmp_path_factory.mktemp("bad")
    ds = load_dataset("fashion-mnist-mini")
    buf = train_experts(ds, root / "buf", num_experts=1, train_epochs=3, width=4, progress=False)
    train_experts(ds, root / "wide", num_experts=1, train_epochs=3, width=8, progress=False)
    cfg = DistillConfig(iterations=2, syn_steps=3, max_start_epoch=2, expert_epochs=1, checkpoint_every=1)
    distill_set(cfg, buf, root / "run", dataset=ds, progress=False)
    (root / "afile").write_text("a file, not a directory\n")
    return SimpleNamespace(root=root, buf=root / "buf", wide=root / "wide", run=root / "run",
                           set=root / "run" / "synset.safetensors", file=root / "afile")


# -- every setting checked before any work ------------------------------------------------------
@pytest.mark.parametrize("args, fragments", [
    (["experts", "--lr-teacher", "nan"], ["lr_teacher must be a positive finite number", "got nan"]),
    (["experts", "--lr-teacher", "-1"], ["lr_teacher must be a positive finite number", "got -1.0"]),
    (["experts", "--lr-teacher", "1e30"], ["lr_teacher must be a positive finite number at most 100", "got 1e+30"]),
    (["experts", "--device", "nosuch"], ["--device 'nosuch' is not a device torch knows"]),
    (["distill", "--lr-lr", "nan"], ["lr_lr must be a finite number >= 0", "got nan"]),
    (["distill", "--lr-teacher", "1e300"], ["lr_teacher (α0) must be at most 100", "got 1e+300"]),
    (["distill", "--iterations", "0"], ["iterations must be a positive integer (>= 1), got 0"]),
    (["distill", "--batch-syn", "abc"], ["argument --batch-syn: invalid integer (or 'all') value: 'abc'"]),
], ids=["lr-teacher-nan", "lr-teacher-negative", "lr-teacher-1e30", "device", "lr-lr-nan", "alpha0-1e300",
        "iterations-0", "batch-syn-abc"])
def test_bad_settings_fail_before_any_work(w, args, fragments):
    out = w.root / f"never-{'-'.join(args)}"
    base = ["--buffer", w.buf, *TINY] if args[0] == "distill" else ["--width", "4", "--num-experts", "1"]
    r = mttlite(args[0], "--out", out, *base, *args[1:])  # the bad setting last: it is the one argparse keeps
    one_error(r, EXIT_BAD_INPUT, *fragments)
    assert not out.exists() and "config:" not in r.stdout


# -- output paths checked up front ---------------------------------------------------------------
def test_out_paths_that_cannot_be_written(w):
    before, f = tree(w.root), w.file
    one_error(mttlite("experts", "--out", f, "--width", "4"), EXIT_BAD_INPUT, f"--out {f}: this is a file, not a directory")
    one_error(mttlite("experts", "--out", f / "sub", "--width", "4"), EXIT_BAD_INPUT,
              f"{f} is a file, so no directory can be created under it")
    r = mttlite("distill", "--buffer", w.buf, "--out", f / "run", *TINY)  # before: failed after the work was done
    one_error(r, EXIT_BAD_INPUT, f"--out {f / 'run'}: {f} is a file")
    assert "config:" not in r.stdout
    one_error(mttlite("demo", "--out", f), EXIT_BAD_INPUT, f"--out {f}: this is a file")
    one_error(mttlite("export", w.set, "--png", f / "grid.png"), EXIT_BAD_INPUT,
              f"--png {f / 'grid.png'}: {f} is a file, so nothing can be written under it")
    full = w.root / "full"
    (full / "0_x").mkdir(parents=True)
    one_error(mttlite("export", w.set, "--imagefolder", full), EXIT_BAD_INPUT,
              f"--imagefolder {full}: the folder exists and is not empty")
    assert tree(w.root) == before  # nothing written, nothing overwritten


@pytest.mark.skipif(os.access("/proc/sys", os.W_OK) or not os.path.isdir("/proc/sys"),
                    reason="needs a read-only directory (/proc/sys is writable or absent here)")
def test_read_only_out(w):
    one_error(mttlite("experts", "--out", "/proc/sys/mttlite-test", "--width", "4"), EXIT_BAD_INPUT,
              "cannot create it, /proc/sys is not writable")


# -- divergence: exit 3, the last sane state saved, the advice works ------------------------------
def test_diverging_lr_lr_keeps_the_sane_state_and_the_advice_resumes(w):
    out = w.root / "lr-lr"
    line = one_error(mttlite("distill", "--buffer", w.buf, "--out", out, "--lr-lr", "10", *TINY), EXIT_DIVERGED,
                     "α jumped from 0.01 to", "lr_lr = 10 is too large", "The state is the last good one (iteration 0)",
                     f"saved in {out / 'checkpoint.safetensors'}", "on the same --out", "--restart")
    ckpt = out / "checkpoint.safetensors"
    tensors, meta = load_tensors(ckpt, "mttlite-checkpoint", "checkpoint")
    assert meta["iteration"] == 0 and tensors["alpha_raw"].item() == torch.tensor(0.01).item()  # α0, not 205
    assert not (out / "synset.safetensors").exists()
    flag = re.search(r"rerun with (--lr-lr \S+)", line).group(1).split()
    r = mttlite("distill", "--buffer", w.buf, "--out", out, *flag, *TINY)
    assert r.returncode == 0 and "saved" in r.stdout, r.stderr[-2000:]
    assert read_meta_only(ckpt)["iteration"] == 3


def test_diverging_lr_img_is_not_saved_as_a_result(w):
    out = w.root / "lr-img"
    one_error(mttlite("distill", "--buffer", w.buf, "--out", out, "--lr-img", "1e15", *TINY), EXIT_DIVERGED,
              "the pixel norm ‖x‖ jumped", "lr_img = 1e+15 is too large", "--lr-img ")
    assert not (out / "synset.safetensors").exists()  # before: exit 0 and pixels of 1.6e12


# -- foreign, damaged and diverged files -----------------------------------------------------------
def test_a_foreign_expert_file_is_refused(w):
    mixed = w.root / "mixed"
    shutil.copytree(w.buf, mixed)
    shutil.copy(w.wide / "expert_00000.safetensors", mixed / "expert_00001.safetensors")  # width 8 into width 4
    one_error(mttlite("distill", "--buffer", mixed, "--out", w.root / "mixed-run", *TINY), EXIT_BAD_INPUT,
              f"{mixed / 'expert_00001.safetensors'} does not match", "another shape or dtype",
              "features.0.weight: float32 [8, 1, 3, 3] instead of float32 [4, 1, 3, 3]")
    assert not (w.root / "mixed-run").exists()


def test_damaged_files_are_named(w):
    # a flipped bit in an expert's tensors
    flipped = w.root / "flipped"
    shutil.copytree(w.buf, flipped)
    flip_bytes(flipped / "expert_00000.safetensors")
    one_error(mttlite("distill", "--buffer", flipped, "--out", w.root / "flipped-run", *TINY), EXIT_BAD_INPUT,
              f"expert file {flipped / 'expert_00000.safetensors'} is corrupt", "sha256")
    # a NaN in an expert (as a diverged expert was saved before)
    nan = w.root / "nan"
    shutil.copytree(w.buf, nan)
    b = ExpertBuffer.open(nan)
    traj = {e: b.params(0, e) for e in b.epochs}
    traj[1]["classifier.weight"][0, 0] = float("nan")  # epoch 1 is read whatever t is drawn (t ∈ {0, 1}, M = 1)
    save_expert(nan, 0, traj, b.metrics(0))
    one_error(mttlite("distill", "--buffer", nan, "--out", w.root / "nan-run", *TINY), EXIT_BAD_INPUT,
              f"expert file {nan / 'expert_00000.safetensors'} holds non-finite values", "epoch 1")
    # meta.json without the fields a buffer needs
    edited = w.root / "edited"
    shutil.copytree(w.buf, edited)
    meta = json.loads((edited / "meta.json").read_text())
    del meta["param_names"], meta["dataset"]
    (edited / "meta.json").write_text(json.dumps(meta))
    one_error(mttlite("distill", "--buffer", edited, "--out", w.root / "edited-run", *TINY), EXIT_BAD_INPUT,
              "lacks the field(s) ['dataset', 'param_names']")
    for name in ("flipped-run", "nan-run", "edited-run"):
        assert not (w.root / name).exists()


def test_damaged_set_and_checkpoint_are_named(w):
    run = w.root / "damaged-run"
    shutil.copytree(w.run, run)
    flip_bytes(run / "synset.safetensors", keys={"images"})
    one_error(mttlite("export", run / "synset.safetensors", "--png", run / "grid.png"), EXIT_BAD_INPUT,
              f"{run / 'synset.safetensors'} is corrupt")
    assert not (run / "grid.png").exists()
    flip_bytes(run / "checkpoint.safetensors", keys={"images"})
    before = tree(run)
    one_error(mttlite("distill", "--buffer", w.buf, "--out", run, *TINY), EXIT_BAD_INPUT,
              f"{run / 'checkpoint.safetensors'} is corrupt")  # before: resumed from pixels off by up to 958
    assert tree(run) == before


# -- Ctrl-C and a second writer ---------------------------------------------------------------------
def test_ctrl_c_says_what_was_saved_and_a_second_writer_is_refused(w):
    out = w.root / "long"
    cmd = [sys.executable, "-m", "mttlite", "distill", "--buffer", str(w.buf), "--out", str(out), "--iterations",
           "100000", "--syn-steps", "3", "--max-start-epoch", "2", "--expert-epochs", "1", "--checkpoint-every", "1"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.time() + 90
        while not (out / "checkpoint.safetensors").exists():
            assert p.poll() is None and time.time() < deadline, "the long run did not start"
            time.sleep(0.2)
        # two runs on one --out: before, both reported "saved" and one silently won
        one_error(mttlite("distill", "--buffer", w.buf, "--out", out, *TINY), EXIT_BAD_INPUT,
                  f"{out} is in use by another `mttlite distill` run", "pid ")
        p.send_signal(signal.SIGINT)
        try:
            _, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # say what the run was doing instead of only that it went on
            p.kill()
            _, err = p.communicate()
            raise AssertionError(f"still running 60 s after SIGINT; its stderr ends with:\n{err[-3000:]}") from None
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == EXIT_INTERRUPTED, err[-3000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("mttlite ")]
    assert len(lines) == 1, err[-3000:]
    it = read_meta_only(out / "checkpoint.safetensors")["iteration"]
    assert lines[0] == (f"mttlite distill: interrupted (Ctrl-C): the checkpoint of iteration {it} is saved in "
                        f"{out / 'checkpoint.safetensors'}; rerun the same command to resume from it "
                        "(--restart starts over)")
    assert not list(out.glob(".*"))  # no lock file, no temporary file left


# -- in-process: a full disk, a bug, an expert that turns NaN --------------------------------------
def test_full_disk_is_one_line_and_leaves_nothing(w, tmp_path, monkeypatch, capsys):
    def full(*a, **k):  # Path.write_bytes(tmp, data): the PNG's bytes, written to the temporary file
        raise OSError(errno.ENOSPC, "No space left on device", str(a[0]))

    monkeypatch.setattr(Path, "write_bytes", full)
    assert cli.main(["export", str(w.set), "--png", str(tmp_path / "grid.png")]) == EXIT_OS
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("mttlite export: error: No space left on device") and "free some space" in err
    assert list(tmp_path.iterdir()) == []  # not even the temporary file


def test_a_bug_keeps_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "cmd_presets", broken)
    assert cli.main(["presets"]) == EXIT_BUG
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: boom" in err
    assert err.rstrip().splitlines()[-1].startswith("mttlite presets: internal error: this is a bug in mttlite")


def test_an_expert_that_turns_nan_is_never_saved(tmp_path, monkeypatch, capsys):
    from mttlite import experts

    real = experts.sgd_step

    def poisoned(params, grads, lr, **kw):
        new, bufs = real(params, grads, lr, **kw)
        return {n: v * float("nan") for n, v in new.items()}, bufs

    monkeypatch.setattr(experts, "sgd_step", poisoned)
    out = tmp_path / "buf"
    rc = cli.main(["experts", "--out", str(out), "--num-experts", "1", "--train-epochs", "2", "--width", "4",
                   "--lr-teacher", "0.5"])
    err = capsys.readouterr().err
    assert rc == EXIT_DIVERGED and "Traceback" not in err
    line = [x for x in err.splitlines() if x.startswith("mttlite ")]
    assert len(line) == 1 and "expert(s) [0] diverged in epoch 1" in line[0]
    assert "lr_teacher = 0.5; lower it (e.g. --lr-teacher 0.05" in line[0] and "Nothing of them was saved." in line[0]
    assert not out.exists()  # no meta.json either: a rerun with a lower lr_teacher starts clean


def test_ctrl_c_while_experts_train_counts_what_was_saved(tmp_path, monkeypatch, capsys):
    from mttlite import experts

    real, calls = experts._Group.train_epoch, []

    def interrupted(self, X, Y):
        calls.append(1)
        if len(calls) == 2:  # expert 0 is complete (1 epoch), expert 1 is training
            raise KeyboardInterrupt
        return real(self, X, Y)

    monkeypatch.setattr(experts._Group, "train_epoch", interrupted)
    out = tmp_path / "buf"
    rc = cli.main(["experts", "--out", str(out), "--num-experts", "2", "--train-epochs", "1", "--width", "4"])
    err = capsys.readouterr().err
    assert rc == EXIT_INTERRUPTED and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"mttlite experts: interrupted (Ctrl-C): 1 complete expert(s) are saved in {out} (the one "
                           "in training is lost); rerun the same command to train the rest")
    assert sorted(p.name for p in out.iterdir()) == ["expert_00000.safetensors", "meta.json"]


# -- files: umask, stale temporary files, the lock ---------------------------------------------------
def test_files_honour_the_umask_and_stale_tmp_files_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a writer that was killed: its pid is gone
    host = socket.gethostname().replace(".", "_")
    stale = tmp_path / f".x.safetensors.{host}.{dead.pid}.abcd1234.tmp"
    stale.write_bytes(b"half a file")
    alive = tmp_path / f".x.safetensors.{host}.{os.getpid()}.live0000.tmp"  # ours: in use
    alive.write_bytes(b"")
    old = os.umask(0o022)
    try:
        save_tensors(tmp_path / "x.safetensors", {"a": torch.zeros(2)}, "mttlite-synset/1", {})
        assert (tmp_path / "x.safetensors").stat().st_mode & 0o777 == 0o644  # before: 0600 whatever the umask
        os.umask(0o077)
        save_tensors(tmp_path / "y.safetensors", {"a": torch.zeros(2)}, "mttlite-synset/1", {})
        assert (tmp_path / "y.safetensors").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
    assert not stale.exists() and alive.exists()


def test_the_lock_refuses_a_second_writer_and_leaves_nothing(tmp_path):
    run = tmp_path / "run"
    with RunLock(run, "`mttlite distill` run"):
        with pytest.raises(ValueError, match=r"is in use by another `mttlite distill` run \(pid \d+"):
            with RunLock(run, "`mttlite distill` run"):
                pass
    assert not run.exists()  # it created the directory, nothing was written: removed again
    run.mkdir()
    (run / "keep").write_text("x")
    with RunLock(run, "`mttlite distill` run"):
        pass
    assert sorted(p.name for p in run.iterdir()) == ["keep"]


def test_demo_prints_the_path_it_writes(tmp_path, monkeypatch, capsys):
    from mttlite import pipeline

    monkeypatch.setattr(pipeline, "DEMO", dict(num_experts=1, train_epochs=2, width=4, eval_epochs=1, num_nets=1))
    monkeypatch.setattr(pipeline, "preset", lambda name: DistillConfig(iterations=1, syn_steps=2, max_start_epoch=1,
                                                                       expert_epochs=1))
    assert cli.main(["demo", "--out", str(tmp_path / "demo")]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("wrote ")][0]
    written = Path(line.split()[1].rstrip(","))
    assert written == tmp_path / "demo" / "distill" / "synset.safetensors" and written.is_file()
