"""The GPU check (benchmarks/gpu_check.py) at toy size on the CPU, so the command a GPU session
fires in one call never rots: every section must run to the end and write its tables."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_every_section_at_toy_size(tmp_path):
    out = tmp_path / "gc"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny",
                        "--out", str(out), "--scale", "3"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "6 ok, 0 not ok" in r.stdout
    report = (out / "gpu_check.md").read_text()
    for section in ("env: ok", "speed: ok", "fmnist: ok", "memory: ok", "experts: ok", "suite: skipped"):
        assert f"## {section}" in report, section
    assert "| reference |" in report and "| exact |" in report  # iteration_speed's table
    res = json.loads((out / "fmnist" / "results.json").read_text())
    assert res["stages"]["buffer_w128"]["experts"] >= 1 and res["stages"]["buffer_w64"]["experts"] >= 1
    assert res["data"]["val"] > 0  # the held-out validation split exists ...
    rows = res["evaluation"]
    assert {(r["ipc"], r["method"]) for r in rows} == {(i, m) for i in (1, 10) for m in ("mtt", "random real")}
    for row in rows:
        assert 0.0 <= row["mean"] <= 1.0 and len(row["accs"]) == 2 and row["val_mean"] is not None  # ... and is scored
    for ipc in (1, 10):
        assert res["stages"][f"distill_ipc{ipc}"]["iterations"] == 3
        assert (out / "fmnist" / f"mtt_ipc{ipc}.safetensors").exists()
