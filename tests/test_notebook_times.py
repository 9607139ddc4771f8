"""benchmarks/notebook_times.py on a one-cell stand-in notebook, in a subprocess (seconds, not minutes:
nbval and tests/test_notebooks.py run the real notebooks already).

What it must get right: the notebook runs at the profile asked for (the line the notebook printed when
it resolved its profile with ``mttlite.notebook.choose_profile``), in its own temporary folder (nothing
written into the working directory), with ``buffer_root`` pointed at a fresh cache when the notebook
has that parameter, and the table and JSON report the time, the executed size and a failure as such.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("papermill")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "notebook_times.py"


def stand_in(folder: Path, name: str, body: str) -> None:
    """A notebook like the real ones: a parameters cell, then the profile resolved, then ``body``."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('profile = "auto"\nbuffer_root = "runs/notebooks/buffers"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(
        "from pathlib import Path\nfrom mttlite.notebook import choose_profile\n"
        "profile = choose_profile(profile, 'cpu')\nPath(buffer_root).mkdir(parents=True)\n" + body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, folder / f"{name}.ipynb")


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--threads", "1", *args], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)


def test_profile_cold_cache_sizes_and_failures(tmp_path):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    stand_in(nbs, "00_fine", "print('x' * 20_000)")  # outputs are kept: the executed file grows
    stand_in(nbs, "01_broken", "raise RuntimeError('boom')")
    out = tmp_path / "nbt"
    r = run(tmp_path, "--profile", "ci", "--dir", str(nbs), "--out", str(out))
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]  # one notebook failed
    doc = json.loads((out / "notebook_times.json").read_text())
    fine, broken = doc["rows"]
    assert fine["notebook"] == "00_fine" and fine["error"] is None and fine["seconds"] > 0
    assert fine["profile_line"].startswith("profile: ci (chosen)")  # what the notebook itself printed
    assert fine["executed_bytes"] > 20_000
    assert broken["error"] and "boom" in broken["error"]
    assert doc["warm"] is False and doc["threads"] == 1
    md = (out / "notebook_times.md").read_text()
    assert "| 00_fine | ci |" in md and "FAILED" in md and "cold start" in md
    # each notebook had its own fresh cache (mkdir would have failed on a shared one), none in the checkout
    assert not (tmp_path / "runs").exists()


def test_unknown_notebook_is_refused(tmp_path):
    r = run(tmp_path, "--notebooks", "99")
    assert r.returncode != 0 and "matches none of" in r.stderr
