"""benchmarks/precision_gradient.py end to end at ``--quick`` (the CI size), in a subprocess.

About 15 s on one CPU thread: a one-expert buffer (width 8), then 2 fp32 distillation iterations at
N = 10 and at N = 30, each compared with its bf16 meta-gradient on the same state and plan. Skipped on
a CPU without native bfloat16 (the script refuses bf16 there, in one line).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mttlite.precision import cpu_bf16_supported

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "precision_gradient.py"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not cpu_bf16_supported(), reason="this CPU has no native bfloat16 (AVX512-BF16/AMX)")]


def test_quick_run_writes_the_table_and_bf16_tracks_fp32(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path), "--threads", "1"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    assert "| N | mode | cos x mean |" in r.stdout and "| 10 | exact |" in r.stdout and "| 30 | exact |" in r.stdout
    doc = json.loads((tmp_path / "results.json").read_text())
    assert [(s["N"], s["mode"]) for s in doc["summary"]] == [(10, "exact"), (30, "exact")]
    assert len(doc["rows"]) == 2 * 2  # K = 2 iterations at each N
    for s in doc["summary"]:
        assert s["finite"] == s["iterations"] == 2
        assert s["cos_x_min"] >= 0.98  # measured 0.998 at this size
        assert s["rel_a_max"] <= 0.1 and s["sign_a"] == 1.0
        assert s["rel_L_max"] <= 0.01
    assert (tmp_path / "buffer" / "meta.json").is_file()
