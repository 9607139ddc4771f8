"""benchmarks/family_table.py end to end at ``--quick`` size, in a subprocess.

One module-scoped run into a temporary folder (about 25 s on 1 CPU thread, quiet), then: every
variant × IPC is in family.json with its per-network accuracies and std = np.std of them, the
soft-label rows carry both the soft-label and the hard-label accuracy (and the others only one),
every variant got the same iteration budget and its switches (and nothing else), the numbers are
what ``SyntheticSet.evaluate`` / ``evaluate_set`` give on the saved sets, and a rerun on the same
folder computes nothing and gives the same numbers, while a deleted cell is recomputed alone, to
the same numbers (its distillation resumes from its final checkpoint).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "family_table.py"
VARIANTS = ("mtt", "soft", "window", "auto", "ema", "all")
SOFT = ("soft", "all")
IPCS = (1, 10)
NUM_NETS = 2  # --quick

pytestmark = pytest.mark.slow


def run_script(out: Path, *extra: str) -> tuple[dict, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), *extra], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}"
    return json.loads((out / "family.json").read_text()), r.stdout


def rows_by_key(doc: dict) -> dict:
    return {(r["variant"], r["ipc"]): r for r in doc["rows"]}


def numbers(doc: dict) -> dict:
    """Every row's accuracies (per network, mean, std, the η used), α and distillation seconds."""
    def acc(a):
        return None if a is None else {k: a[k] for k in ("accs", "mean", "std", "lr")}
    return {k: (acc(r["acc"]), acc(r["acc_hard"]), r["syn_lr"], r["distill_seconds"]) for k, r in rows_by_key(doc).items()}


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    out = tmp_path_factory.mktemp("family") / "quick"
    doc, stdout = run_script(out)
    return out, doc, stdout


def test_every_variant_and_ipc_with_per_network_accuracies(first):
    out, doc, stdout = first
    rows = rows_by_key(doc)
    assert set(rows) == {(v, i) for v in VARIANTS for i in IPCS}
    assert doc["cells"] == {f"{v}-ipc{i}": "ran" for v in VARIANTS for i in IPCS} and doc["failures"] == []
    for key, r in rows.items():
        for acc in ([r["acc"], r["acc_hard"]] if key[0] in SOFT else [r["acc"]]):
            assert len(acc["accs"]) == NUM_NETS and all(0.0 <= a <= 1.0 for a in acc["accs"]), key
            assert acc["mean"] == pytest.approx(float(np.mean(acc["accs"])), abs=1e-12), key
            assert acc["std"] == pytest.approx(float(np.std(acc["accs"])), abs=1e-12), key  # over the networks
            assert acc["lr"] == pytest.approx(r["syn_lr"])  # trained with the learned α
        if key[0] in SOFT:  # both numbers: with the learned soft labels and the same images under hard labels
            assert r["labels"] == "soft" and r["acc_hard"] is not None
            st = r["label_stats"]
            assert st["n"] == 10 * key[1] and 0 <= st["argmax_agrees"] <= st["n"]
            assert 0 < st["max_prob_final"] <= 1
        else:
            assert r["labels"] == "hard" and r["acc_hard"] is None
        assert r["distill_seconds"] > 0 and r["eval_seconds"] > 0
        assert 1 <= r["n_star"]["min"] <= r["n_star"]["mean"] <= r["syn_steps"]
    # the table, the protocol and the command are printed and written
    md = (out / "family.md").read_text()
    for text in (md, stdout):
        assert "| + soft labels (TESLA/DATM) |" in text and "| all together |" in text
        assert "IPC 10, hard labels" in text and "benchmarks/family_table.py --quick --out" in text
    assert doc["command"].endswith(f"benchmarks/family_table.py --quick --out {out}")
    assert "final-epoch test accuracy" in doc["protocol_text"]


def test_one_protocol_one_buffer_one_budget_and_only_the_switches_differ(first):
    _, doc, _ = first
    p = doc["protocol"]
    assert (p["arch"], p["width"], p["epochs"], p["num_nets"], p["seed"]) == ("convnet", 8, 5, NUM_NETS, 0)
    assert doc["experts"]["status"] == "ran" and (doc["experts"]["num_experts"], doc["experts"]["train_epochs"]) == (2, 3)
    meta = json.loads((Path(doc["experts"]["path"]) / "meta.json").read_text())
    assert meta["arch_kwargs"]["width"] == 8 and meta["epochs"] == [0, 1, 2, 3]
    rows = rows_by_key(doc)
    family = ("soft_labels", "lr_y", "min_start_epoch", "current_max_start_epoch", "expansion_end_iteration",
              "auto_steps", "ema_decay")
    for i in IPCS:
        base = rows[("mtt", i)]["config"]
        assert (base["soft_labels"], base["auto_steps"], base["ema_decay"], base["current_max_start_epoch"]) == \
            (False, False, None, None)
        for v in VARIANTS:
            r = rows[(v, i)]
            assert r["iterations"] == r["config"]["iterations"] == 3  # the same budget for every variant
            assert {k: x for k, x in r["config"].items() if k not in family} == \
                {k: x for k, x in base.items() if k not in family}, (v, i)
            assert {k: r["config"][k] for k in r["switches"]} == r["switches"]
        assert rows[("soft", i)]["config"]["soft_labels"] and rows[("soft", i)]["config"]["lr_y"] == 2.0
        assert rows[("auto", i)]["config"]["auto_steps"]
        assert 0 < rows[("ema", i)]["config"]["ema_decay"] < 1
        w = rows[("window", i)]
        assert w["config"]["current_max_start_epoch"] == 1 and w["config"]["max_start_epoch"] == 2
        assert w["window"]["first"] == [0, 1] and rows[("mtt", i)]["window"]["first"] == [0, 2]
        assert set(rows[("all", i)]["switches"]) == set().union(*(rows[(v, i)]["switches"] for v in VARIANTS[1:5]))
        # same seed, hard labels: plain, window, auto and ema start from the same images (the EMA moved less)
        assert rows[("ema", i)]["images_moved"] < rows[("mtt", i)]["images_moved"]


def test_the_numbers_are_the_library_protocol_on_the_saved_sets(first):
    from mttlite.data import load_dataset
    from mttlite.evaluate import EvalProtocol, evaluate_set
    from mttlite.synset import SyntheticSet

    out, doc, _ = first
    ds = load_dataset("fashion-mnist-mini")
    protocol = EvalProtocol(**doc["protocol"])
    rows = rows_by_key(doc)
    for key in (("soft", 1), ("ema", 1)):
        s = SyntheticSet.load(out / "cells" / f"{key[0]}-ipc{key[1]}" / "synset.safetensors")
        r = rows[key]
        assert s.syn_lr == pytest.approx(r["syn_lr"])
        assert s.evaluate(ds, protocol, progress=False).accs == r["acc"]["accs"]
        if key[0] in SOFT:
            assert s.labels.is_floating_point() and s.labels.shape == (10, 10)
            classes = torch.arange(10).repeat_interleave(key[1])  # each image's original class
            hard = evaluate_set(s.images, classes, ds, protocol, lr=s.syn_lr, progress=False)
            assert hard.accs == r["acc_hard"]["accs"]


def test_rerun_computes_nothing_and_a_deleted_cell_is_recomputed_alone(first):
    out, doc, _ = first
    again, stdout = run_script(out)
    assert again["experts"]["status"] == "cached"
    assert set(again["cells"].values()) == {"cached"} and "(0 cell(s) computed, 12 cached)" in stdout
    assert numbers(again) == numbers(doc)
    (out / "cells" / "all-ipc1.json").unlink()  # the distillation's final checkpoint and set stay
    third, _ = run_script(out)
    assert [k for k, s in third["cells"].items() if s == "ran"] == ["all-ipc1"]
    assert numbers(third) == numbers(doc)


def test_a_cell_from_other_settings_is_refused(first, tmp_path):
    out, _, _ = first
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--lr-y", "3", "--variants", "soft",
                        "--ipcs", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode != 0 and "soft-ipc1.json was computed with other settings" in r.stderr
    assert "config" in r.stderr and "use another --out" in r.stderr


def test_extension_variants_run_beside_the_cached_family_with_their_switches(first):
    """The extensions (pruning, depth pruning, texture, perturbed θ*_t, bf16) on request, in the same folder: MTT's
    cells are read back (not recomputed), each extension row carries exactly its switches, and its
    set is what the switch makes (a texture set holds 56 × 56 canvases)."""
    from mttlite.synset import SyntheticSet

    out, doc, _ = first
    variants = ["mtt", "prune", "depth", "texture", "perturb"] + (["bf16"] if _bf16_ok() else [])
    ext, stdout = run_script(out, "--variants", ",".join(variants))
    assert ext["cells"]["mtt-ipc1"] == ext["cells"]["mtt-ipc10"] == "cached"
    assert numbers(ext)[("mtt", 1)] == numbers(doc)[("mtt", 1)]
    rows = rows_by_key(ext)
    for i in IPCS:
        assert rows[("prune", i)]["switches"] == {"prune_rule": "mismatch", "prune_fraction": 0.1}
        # PAD's depth ratio (0 at IPC 1, 0.5 from IPC 10), at least 0.25 so the IPC 1 row is not plain MTT
        assert rows[("depth", i)]["switches"] == {"prune_rule": "depth", "prune_fraction": 0.25 if i == 1 else 0.5}
        assert rows[("texture", i)]["switches"] == {"texture_canvas": 56, "lr_lr": 1e-7}
        assert rows[("perturb", i)]["switches"] == {"expert_perturb": 0.01}
        s = SyntheticSet.load(out / "cells" / f"texture-ipc{i}" / "synset.safetensors")
        assert tuple(s.images.shape[-2:]) == (56, 56) and s.texture == {"canvas": [56, 56], "input": [28, 28]}
        if "bf16" in variants:
            assert rows[("bf16", i)]["switches"] == {"precision": "bf16"}
        assert rows[("prune", i)]["iterations"] == rows[("mtt", i)]["iterations"]  # one budget
    assert "+ texture (MTT §5)" in (out / "family.md").read_text()


def test_a_cell_written_before_a_config_field_existed_is_still_read(first):
    """A cell's recorded DistillConfig lacking a field added since (its default then) is the same settings."""
    out, doc, _ = first
    path = out / "cells" / "mtt-ipc1.json"
    cell = json.loads(path.read_text())
    del cell["inputs"]["config"]["precision"]  # as written before the field existed
    path.write_text(json.dumps(cell))
    again, _ = run_script(out, "--variants", "mtt", "--ipcs", "1")
    assert again["cells"] == {"mtt-ipc1": "cached"}
    assert numbers(again)[("mtt", 1)] == numbers(doc)[("mtt", 1)]


def _bf16_ok() -> bool:
    from mttlite.precision import check_precision

    try:
        check_precision("bf16", "cpu")
    except ValueError:
        return False
    return True
