"""benchmarks/notebook_times.py at the CI profile on one notebook, in a subprocess (about 30 s).

What it must get right: the notebook runs at the profile asked for (the line the notebook printed
when it resolved its profile), from a cold start in its own temporary folder (nothing written into
the working directory), and the table and JSON report the time and the executed size.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("papermill")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]


def test_one_notebook_at_ci_profile_from_a_cold_start(tmp_path):
    out = tmp_path / "nbt"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "notebook_times.py"), "--profile", "ci",
                        "--notebooks", "01", "--threads", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    doc = json.loads((out / "notebook_times.json").read_text())
    (row,) = doc["rows"]
    assert row["notebook"] == "01_expert_trajectories" and row["profile"] == "ci" and row["error"] is None
    assert row["seconds"] > 0 and row["executed_bytes"] > 10_000  # outputs kept: figures, printed text
    assert row["profile_line"].startswith("profile: ci (chosen)")  # what the notebook itself printed
    assert doc["warm"] is False and doc["threads"] == 1
    md = (out / "notebook_times.md").read_text()
    assert "| 01_expert_trajectories | ci |" in md and "benchmarks/notebook_times.py --profile ci" in md
    assert "cold start" in md
    # a cold start writes nothing into the checkout's own caches
    assert not (tmp_path / "runs").exists()


def test_unknown_notebook_is_refused():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "notebook_times.py"), "--notebooks", "99"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "matches none of" in r.stderr
