"""benchmarks/scores_table.py at ``--quick`` size, in a subprocess (about a minute on one thread).

Independent answers: the "random" set IS the random real subset the scores compare with (seed 0),
evaluated by the same networks, so its IOR is exactly 0 and both ARS terms are 0; every LRS / ARS in
the JSON is DD-Ranking's formula applied by hand to the accuracies beside it; the swap table's base row
is the set's own accuracy; a rerun reuses every result.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "scores_table.py"

pytestmark = pytest.mark.slow


def run(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def score(x: float) -> float:
    return (math.exp(x) - math.exp(-1)) / (math.e - math.exp(-1))


def test_scores_and_swaps_table(tmp_path):
    out = tmp_path / "scores"
    run(out)
    doc = json.loads((out / "scores.json").read_text())
    full = doc["full_acc"]["fashion-mnist-mini"]
    assert 0 < full <= 1 and set(doc["sets"]) == {"random", "random-lr"}
    # the full data was trained at the sets' protocol width (8 at --quick), the width of every set's networks
    assert json.loads((out / "full-fashion-mnist-mini.json").read_text())["inputs"]["width"] == 8
    assert all(d["protocol"]["width"] == 8 for d in doc["sets"].values())
    for name, d in doc["sets"].items():
        sc, acc = d["scores"], d["scores"]["accuracies"]
        assert acc["real_hard"] == full  # measured once, handed to every set
        assert acc["syn_any"] == d["result"]["mean"] == d["swaps"][0]["mean"]  # the base swap is the set itself
        hlr, ior = full - acc["syn_hard"], acc["syn_any"] - acc["rdm_any"]
        assert sc["hlr"] == pytest.approx(hlr) and sc["ior"] == pytest.approx(ior)
        assert sc["lrs"] == pytest.approx(score(0.5 * ior - 0.5 * hlr))
        beta = 0.5 * (acc["syn_aug"] - acc["rdm_aug"]) + 0.5 * (acc["syn_naug"] - acc["rdm_naug"])
        assert sc["ars"] == pytest.approx(score(beta))
    r = doc["sets"]["random"]["scores"]
    # the random subset scored against itself (η = 0.01 both): no improvement, ARS at β = 0
    assert r["ior"] == 0 and r["ars_with_aug"] == 0 and r["ars_without_aug"] == 0
    assert r["ars"] == pytest.approx(1 / (1 + math.e))
    md = (out / "scores.md").read_text()
    assert "| random | 1 |" in md and "| arch = mlp |" in md and "| augmentation = crop |" in md
    again = run(out)
    assert again.stdout.count("cached") == 2
    assert json.loads((out / "scores.json").read_text())["sets"] == doc["sets"]


def test_the_full_data_width_is_the_sets_own_and_must_be_shared(tmp_path):
    """Without --width the full-data networks take the sets' width (what `mttlite evaluate` gives each
    set); sets made for different widths are refused rather than scored under two protocols."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch

    import scores_table
    from mttlite.synset import SyntheticSet

    paths = []
    for width in (16, 16, 32):
        s = SyntheticSet(images=torch.zeros(2, 1, 8, 8), labels=torch.tensor([0, 1]), syn_lr=None, dataset="toy",
                         class_names=["a", "b"], mean=(0.0,), std=(1.0,), arch_kwargs={"width": width})
        paths.append(str(tmp_path / f"w{width}-{len(paths)}.safetensors"))
        s.save(paths[-1])
    assert scores_table.set_width(paths[:2]) == 16
    with pytest.raises(ValueError, match=r"different widths \[16, 32\]: pass --width"):
        scores_table.set_width(paths)
