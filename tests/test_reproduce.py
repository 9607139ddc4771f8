"""benchmarks/reproduce_fmnist.py end to end at ``--size tiny`` (the CI size), in a subprocess.

One module-scoped run into a temporary folder (about 20-30 s on 1 CPU thread), then:
every method × IPC is in results.json with test AND held-out validation accuracies, the std is
the one of the per-network accuracies, DC/DSA/DM got MTT's wall-clock budget, and a rerun on the
same folder computes nothing and gives the same numbers. A deleted piece (one set and its
evaluation) is rebuilt alone, to the same numbers.

``--size tiny`` uses a class-balanced subset of the full Fashion-MNIST when it is installed, else
of the embedded ``fashion-mnist-mini`` (so it runs everywhere).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "reproduce_fmnist.py"
METHODS = ("mtt", "random", "herding", "dc", "dsa", "dm")
IPCS = (1, 10)
NUM_NETS = 2  # SIZES["tiny"]["num_nets"]

pytestmark = pytest.mark.slow


def run_script(out: Path, *extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(SCRIPT), "--size", "tiny", "--out", str(out), "--threads", "1",
           "--cross-arch", "--archs", "convnet", "mlp", *extra]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}"
    return json.loads((out / "results.json").read_text())


def rows_by_key(doc: dict, section: str = "results") -> dict:
    return {(r["method"], r["ipc"], r["arch"]): r for r in doc[section]}


def numbers(doc: dict) -> dict:
    keep = ("test_accs", "test_mean", "test_std", "val_accs", "val_mean", "val_std", "lr")
    return {k: {f: r[f] for f in keep} for k, r in {**rows_by_key(doc), **rows_by_key(doc, "cross_arch")}.items()}


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce") / "tiny"
    return out, run_script(out)


def test_every_method_and_ipc_has_test_and_validation_accuracy(first):
    out, doc = first
    rows = rows_by_key(doc)
    assert set(rows) == {(m, i, "convnet") for m in METHODS for i in IPCS}
    for key, r in rows.items():
        for split in ("test", "val"):
            accs = r[f"{split}_accs"]
            assert len(accs) == NUM_NETS == r["num_nets"], key
            assert all(0.0 <= a <= 1.0 for a in accs), (key, split, accs)
            assert r[f"{split}_mean"] == pytest.approx(float(np.mean(accs))), key
            assert r[f"{split}_std"] == pytest.approx(float(np.std(accs))), key  # over the networks
        assert r["lr"] > 0
    assert rows[("random", 1, "convnet")]["lr"] == pytest.approx(0.01)  # real sets: the field's 0.01
    md = (out / "results.md").read_text()
    assert "IPC 1 val %" in md and "IPC 10 test %" in md
    for name in ("MTT", "random real", "herding", "DC", "DSA", "DM"):
        assert f"| {name} |" in md


def test_protocol_data_split_and_stages(first):
    out, doc = first
    p = doc["protocol"]
    assert (p["arch"], p["width"], p["epochs"], p["num_nets"]) == ("convnet", 8, 5, NUM_NETS)
    d = doc["data"]
    assert d["val"] == 10 * 50 and d["train"] == 10 * 200 and d["test"] == 1000
    assert d["val_per_class"] == [50] * 10 and d["train_per_class"] == [200] * 10
    meta = json.loads((out / "buffer" / "meta.json").read_text())
    assert meta["num_train"] == d["train"]  # the experts never saw the validation split
    assert set(doc["stages"]) == {"data", "experts", "distill", "baselines", "evaluate", "cross-arch"}
    assert all(s["status"] == "ran" and s["seconds"] >= 0 for s in doc["stages"].values()), doc["stages"]
    assert doc["hardware"]


def test_gradient_matching_baselines_get_mtt_budget(first):
    out, doc = first
    rows = rows_by_key(doc)
    for ipc in IPCS:
        mtt_seconds = rows[("mtt", ipc, "convnet")]["build"]["seconds"]
        assert mtt_seconds > 0
        for m in ("dc", "dsa", "dm"):
            b = rows[(m, ipc, "convnet")]["build"]
            assert b["budget_seconds"] == pytest.approx(mtt_seconds, abs=0.01), (m, ipc)
            assert b["iterations"] >= 1 and b["calibration"]["seconds_per_iteration"] > 0


def test_cross_architecture_rows(first):
    _, doc = first
    assert set(rows_by_key(doc, "cross_arch")) == {(m, 10, a) for m in ("mtt", "dm") for a in ("convnet", "mlp")}


def test_rerun_skips_every_stage_and_gives_the_same_numbers(first):
    out, doc = first
    again = run_script(out)
    assert all(s["status"] == "cached" and s["items_ran"] == 0 for s in again["stages"].values()), again["stages"]
    assert numbers(again) == numbers(doc)
    # a missing piece is rebuilt alone, to the same numbers
    for f in ("sets/random-ipc1.safetensors", "sets/random-ipc1.json", "eval/random-ipc1-convnet.json"):
        (out / f).unlink()
    third = run_script(out)
    ran = {k: s["items_ran"] for k, s in third["stages"].items()}
    assert ran == {"data": 0, "experts": 0, "distill": 0, "baselines": 1, "evaluate": 1, "cross-arch": 0}
    assert numbers(third) == numbers(doc)


def test_script_evaluation_matches_the_library_protocol(first):
    """The script's per-network evaluation (resumable, scoring the held-out split) gives exactly the
    test accuracies of ``SyntheticSet.evaluate`` under the same protocol (same per-network seeds)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import reproduce_fmnist as R
    from mttlite.evaluate import EvalProtocol
    from mttlite.synset import SyntheticSet

    out, doc = first
    data_choice = "mini" if doc["data"]["dataset"] == "fashion-mnist-mini" else "full"
    ds, _ = R.load_data("tiny", R.SIZES["tiny"], "cpu", data_choice)
    row = rows_by_key(doc)[("mtt", 10, "convnet")]
    s = SyntheticSet.load(out / "mtt-ipc10" / "synset.safetensors")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script ran (--threads 1): the same float rounding
    try:
        res = s.evaluate(ds, EvalProtocol(**doc["protocol"]), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert res.accs == pytest.approx(row["test_accs"], abs=1e-12)
    if res.val_accs is not None:  # a library that scores the held-out split itself
        assert res.val_accs == pytest.approx(row["val_accs"], abs=1e-12)


# -- benchmarks/tune_mtt.py: choosing MTT's settings on the held-out validation split ---------------

TUNE = ROOT / "benchmarks" / "tune_mtt.py"


def run_tune(out: Path, *extra: str) -> tuple[dict, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(TUNE), "--run", str(out), "--size", "tiny", "--ipc", "1", "--iterations", "2",
           "--grid", "lr_teacher=0.01,0.02", "lr_img=100,1e12", "--num-nets", "2", "--threads", "1", *extra]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}"
    return json.loads((out / "tune" / "ipc1" / "results.json").read_text()), r.stdout


def test_tune_chooses_on_validation_and_keeps_diverged_points(first):
    out, _ = first
    doc, stdout = run_tune(out)
    recs = {(r["point"]["lr_teacher"], r["point"]["lr_img"]): r for r in doc["records"]}
    assert set(recs) == {(a, b) for a in (0.01, 0.02) for b in (100, 1e12)}
    for (a, b), r in recs.items():
        if b == 1e12:  # a pixel rate 10^10 too large: refused by the divergence guard, kept in the table
            assert r["status"] == "diverged" and "pixel" in r["reason"], r
            continue
        assert r["status"] == "ok" and r["config"]["lr_teacher"] == a and r["config"]["iterations"] == 2
        assert len(r["val_accs"]) == 2 and r["val_mean"] == pytest.approx(float(np.mean(r["val_accs"])))
        assert "test_accs" not in r and "test_mean" not in r  # the test set is never looked at
    ok = [r for r in recs.values() if r["status"] == "ok"]
    assert doc["best"] == max(ok, key=lambda r: r["val_mean"])["point"]
    assert "--mtt 1:lr_teacher=" in stdout
    md = (out / "tune" / "ipc1" / "results.md").read_text()
    assert md.count("diverged") == 2 and "val %" in md
    # a rerun reads every point back: same records, nothing distilled again
    again, stdout = run_tune(out)
    assert again["records"] == doc["records"]
    # --cached-only lists a point that was never computed instead of computing it
    _, stdout = run_tune(out, "--cached-only", "--grid", "lr_teacher=0.01,0.03", "lr_img=100")
    assert "lr_teacher=0.03_lr_img=100: not computed" in stdout
    assert not (out / "tune" / "ipc1" / "lr_teacher=0.03_lr_img=100").exists()


# -- benchmarks/family_table.py --from-run: the family on a reproduction run's data, experts and MTT ----------


def test_family_table_from_the_run_reuses_its_data_experts_and_mtt_set(first, tmp_path):
    """The mtt row IS the run's MTT set (same per-network accuracies: same split, protocol, seeds); a switch
    row is the run's MTT configuration plus that switch and nothing else."""
    out, doc = first
    fam = tmp_path / "family"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "family_table.py"), "--from-run", str(out),
                        "--ipcs", "1", "--variants", "mtt,ema", "--out", str(fam)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    fdoc = json.loads((fam / "family.json").read_text())
    rows = {row["variant"]: row for row in fdoc["rows"]}
    run_mtt = rows_by_key(doc)[("mtt", 1, "convnet")]
    assert rows["mtt"]["acc"]["accs"] == run_mtt["test_accs"]
    assert fdoc["from_run"] == str(out) and fdoc["dataset"] == doc["data"]["dataset"]
    assert fdoc["protocol"]["epochs"] == doc["protocol"]["epochs"] and fdoc["protocol"]["width"] == 8
    run_config = json.loads((out / "mtt-ipc1" / "distill.json").read_text())["config"]
    assert rows["mtt"]["config"] == run_config
    ema = rows["ema"]["config"]
    assert {k: v for k, v in ema.items() if ema[k] != run_config[k]} == {"ema_decay": ema["ema_decay"]}
    assert 0 < ema["ema_decay"] < 1
    # a wrong folder is refused with the reason
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "family_table.py"), "--from-run", str(tmp_path),
                          "--out", str(tmp_path / "x")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "is missing" in bad.stderr


def test_baseline_iterations_fix_the_count_without_budget_or_calibration(tmp_path):
    """``--baseline-iterations dm=3``: DM runs exactly 3 iterations with no MTT run to take a budget from."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    base = [sys.executable, str(SCRIPT), "--size", "tiny", "--out", str(tmp_path), "--threads", "1",
            "--stages", "baselines", "--methods", "dm", "--ipc", "1"]
    r = subprocess.run([*base, "--baseline-iterations", "dm=3"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((tmp_path / "sets" / "dm-ipc1.json").read_text())
    assert rec["config"]["iterations"] == 3 and rec["iterations_fixed"] is True
    assert "budget_seconds" not in rec and "calibration" not in rec
    md = (tmp_path / "results.md").read_text()
    assert "3 it (fixed)" in md and 'marked "(fixed)"' in md
    # the same folder with another count: refused, not silently reused
    r = subprocess.run([*base, "--baseline-iterations", "dm=4"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0 and "built with 3 iterations" in r.stderr, r.stderr[-500:]
    # without it the budgeted method asks for MTT's run; a malformed count is refused before anything runs
    (tmp_path / "sets" / "dm-ipc1.json").unlink()
    r = subprocess.run(base, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "needs MTT's wall-clock budget" in r.stderr + r.stdout
    for bad in ("dm=0", "dm=x", "mtt=3", "dm"):
        r = subprocess.run([*base, "--out", str(tmp_path / "bad"), "--baseline-iterations", bad], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode != 0 and "--baseline-iterations" in r.stderr, (bad, r.stderr[-500:])
        assert not (tmp_path / "bad").exists(), bad
