"""Each notebook's run time at a profile, from a cold start, and the size of the executed notebook.

    .venv/bin/python benchmarks/notebook_times.py                      # the classroom CPU profile, every notebook
    .venv/bin/python benchmarks/notebook_times.py --notebooks 00,03    # some of them
    .venv/bin/python benchmarks/notebook_times.py --profile ci --notebooks 01 --out /tmp/nbt   # the CI size (toy)

Every notebook runs headless under papermill, as shipped except for ``-p profile <profile>`` (see
``mttlite.notebook.PROFILES``: "cpu" is the size a notebook picks by itself without a GPU), in its own
fresh working directory with its own EMPTY expert cache (``buffer_root``): a cold start, so the time
includes training the experts the notebook needs (``--warm`` shares one cache instead, so only the
first notebook pays for them). The kernel is this interpreter with ``--threads`` torch threads
(default 2: a 2-core laptop or Colab's CPU runtime).

Reports, per notebook: wall seconds of the whole execution, the executed ``.ipynb`` size (outputs
included: embedded plotly.js, figures, widgets' state), and whether it ran through. The classroom
target is 5 min per notebook on 2 cores; ``--limit`` (seconds) marks the rows over it. Writes
``<out>/notebook_times.md`` and ``.json`` (with the command and the hardware). Measure on a quiet
machine: anything else running on the cores slows torch several times over.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import hardware  # noqa: E402

NB_DIR = ROOT / "notebooks"
KERNEL = "mttlite-nbtimes"


def notebooks(selection: str | None, nb_dir: Path = NB_DIR) -> list[str]:
    """The notebook stems, all or those whose name starts with one of the comma-separated prefixes."""
    names = sorted(p.stem for p in nb_dir.glob("[0-9][0-9]_*.ipynb"))
    if not selection:
        return names
    picked = [n for n in names if any(n.startswith(s.strip()) for s in selection.split(",") if s.strip())]
    if not picked:
        raise SystemExit(f"--notebooks {selection!r} matches none of: {', '.join(names)}")
    return picked


def kernelspec(where: Path, threads: int) -> None:
    """A kernelspec for this interpreter with ``threads`` OpenMP threads, first on JUPYTER_PATH."""
    spec = where / "kernels" / KERNEL
    spec.mkdir(parents=True, exist_ok=True)
    spec.joinpath("kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "mttlite notebook times", "language": "python",
        "env": {"OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}}))
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(where)] + [p for p in [os.environ.get("JUPYTER_PATH")] if p])


def time_one(name: str, work: Path, profile: str, cache: Path, nb_dir: Path = NB_DIR) -> dict:
    import papermill

    source = json.dumps(json.loads((nb_dir / f"{name}.ipynb").read_text())["cells"])
    params = {"profile": profile}
    if "buffer_root = " in source:
        params["buffer_root"] = str(cache)
    out = work / f"{name}.out.ipynb"
    t0 = time.perf_counter()
    error = None
    try:
        papermill.execute_notebook(str(nb_dir / f"{name}.ipynb"), str(out), parameters=params, kernel_name=KERNEL,
                                   cwd=str(work), progress_bar=False)
    except Exception as e:  # noqa: BLE001 - a failing notebook is a row of the table, not the end of it
        error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    seconds = time.perf_counter() - t0
    return {"notebook": name, "profile": profile, "seconds": round(seconds, 1),
            "executed_bytes": out.stat().st_size if out.exists() else None, "error": error,
            "profile_line": profile_line(out)}


def profile_line(executed: Path) -> str | None:
    """What the notebook printed when it resolved its profile (``choose_profile``), from the executed file."""
    if not executed.exists():
        return None
    for cell in json.loads(executed.read_text()).get("cells", []):
        for o in cell.get("outputs", []):
            text = "".join(o.get("text", [])) if o.get("output_type") == "stream" else ""
            for line in text.splitlines():
                if line.startswith("profile: "):
                    return line
    return None


def table(rows: list[dict], limit: float) -> str:
    lines = ["| notebook | profile | wall (cold start) | executed size | status |", "|---|---|---|---|---|"]
    for r in rows:
        size = "—" if r["executed_bytes"] is None else f"{r['executed_bytes'] / 2**20:.1f} MiB"
        status = "FAILED: " + r["error"] if r["error"] else ("over the limit" if r["seconds"] > limit else "ok")
        lines.append(f"| {r['notebook']} | {r['profile']} | {r['seconds'] / 60:.1f} min ({r['seconds']:.0f} s) "
                     f"| {size} | {status} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="cpu", choices=("teaching", "cpu", "ci"))
    p.add_argument("--notebooks", default=None, help="comma-separated name prefixes, e.g. 00,03 (default: all)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the kernel (2)")
    p.add_argument("--warm", action="store_true", help="one shared expert cache (only the first notebook trains)")
    p.add_argument("--limit", type=float, default=300.0, help="the classroom target per notebook, seconds (300)")
    p.add_argument("--out", default="runs/bench/notebook_times")
    p.add_argument("--dir", default=str(NB_DIR), help="the folder of NN_name.ipynb notebooks (default notebooks/)")
    a = p.parse_args(argv)

    nb_dir = Path(a.dir).resolve()
    names = notebooks(a.notebooks, nb_dir)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "benchmarks/notebook_times.py", *(sys.argv[1:] if argv is None else argv)])
    rows = []
    with tempfile.TemporaryDirectory(prefix="nbtimes-") as tmp:
        tmp = Path(tmp)
        kernelspec(tmp / "jupyter", a.threads)
        os.environ.pop("MTTLITE_CI", None)  # the profile decides the sizes, not the CI switch
        for name in names:
            work = tmp / name
            work.mkdir()
            cache = tmp / "shared-buffers" if a.warm else work / "buffers"
            r = time_one(name, work, a.profile, cache, nb_dir)
            rows.append(r)
            size = "-" if r["executed_bytes"] is None else f"{r['executed_bytes'] / 2**20:.1f} MiB"
            print(f"{name}: {r['seconds']:.0f} s, {size}{'  ' + r['error'] if r['error'] else ''}", flush=True)
    text = table(rows, a.limit)
    start = "one shared expert cache (warm after the first)" if a.warm else "each from a cold start (empty expert cache)"
    md = [f"# Notebook run times, profile `{a.profile}`", "", f"Command: `{command}`", "",
          f"Hardware: {hardware()}; kernel with {a.threads} torch thread(s); {start}.", "", text, ""]
    (out / "notebook_times.md").write_text("\n".join(md))
    (out / "notebook_times.json").write_text(json.dumps({"command": command, "hardware": hardware(),
                                                         "threads": a.threads, "warm": a.warm, "rows": rows}, indent=1))
    print(text)
    print(f"wrote {out / 'notebook_times.md'}")
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
