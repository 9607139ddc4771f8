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
    assert "7 ok, 0 not ok" in r.stdout
    report = (out / "gpu_check.md").read_text()
    for section in ("env: ok", "speed: ok", "launches: ok", "fmnist: ok", "memory: ok", "experts: ok", "suite: skipped"):
        assert f"## {section}" in report, section
    # iteration_speed's table, the fused row included; op_count's tables, whole (nothing cut from a log)
    assert "| reference |" in report and "| exact |" in report and "| exact+fused |" in report
    assert "| fused | exact |" in report and "| eager | exact |" in report
    assert (out / "launches.log").read_text().strip() in report
    res = json.loads((out / "fmnist" / "results.json").read_text())
    assert {res["stages"][f"distill_ipc{i}"]["gradient"] for i in (1, 10)} == {"exact"}  # the library's defaults
    assert res["stages"]["buffer_w128"]["experts"] >= 1 and res["stages"]["buffer_w64"]["experts"] >= 1
    assert res["data"]["val"] > 0  # the held-out validation split exists ...
    rows = res["evaluation"]
    assert {(r["ipc"], r["method"]) for r in rows} == {(i, m) for i in (1, 10) for m in ("mtt", "random real")}
    for row in rows:
        assert 0.0 <= row["mean"] <= 1.0 and len(row["accs"]) == 2 and row["val_mean"] is not None  # ... and is scored
    for ipc in (1, 10):
        assert res["stages"][f"distill_ipc{ipc}"]["iterations"] == 3
        assert (out / "fmnist" / f"mtt_ipc{ipc}.safetensors").exists()


def test_a_section_past_its_limit_is_killed_with_its_workers(tmp_path):
    """A section that runs out of time is stopped, and so is every process it started (one left running
    would hold the GPU through the next section)."""
    import importlib.util
    import time

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    pid_file = tmp_path / "child.pid"
    code = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    t0 = time.perf_counter()
    r = gc.run_section("slow", [sys.executable, "-c", code], 3.0, tmp_path, "cpu")
    assert r["status"] == "stopped at its 3 s limit" and time.perf_counter() - t0 < 30
    child = int(pid_file.read_text())
    for _ in range(50):  # the grandchild is gone, or dead and waiting to be reaped by init
        try:
            os.kill(child, 0)
            if open(f"/proc/{child}/stat").read().split()[2] == "Z":
                break
        except (ProcessLookupError, FileNotFoundError):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the section's worker {child} is still running")
