"""Run notebooks/08_reproduction over a grid of configurations with papermill; assemble a markdown table.

    python notebooks/reproduce_grid.py --out runs/grid --dataset fashion-mnist-mini --ipc 1 10 \\
        --preset demo --iterations 500 -p width 128 -p eval_epochs 300 -p num_nets 3

Every (dataset, ipc, preset) combination is one papermill run of ``08_reproduction.ipynb``; its
executed notebook and files land in ``OUT/<run_name>/``, and ``OUT/results.md`` / ``OUT/results.json``
collect every run found under OUT. A configuration whose ``results.json`` exists is skipped
(``--force`` re-runs it; the distillation itself also resumes from its checkpoint).
``-p NAME VALUE`` passes any other notebook parameter (VALUE is parsed as JSON when it can be:
``-p num_nets 5``, ``-p syn_steps null``). The notebook runs at ``profile`` "teaching" (its parameters as
shipped and as passed, on a CPU too: ``mttlite.notebook.PROFILES``) unless ``-p profile cpu`` is given.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOTEBOOK = HERE / "08_reproduction.ipynb"


def run_name(dataset: str, ipc: int, preset: str) -> str:
    """The notebook's default run_name, so results land where the notebook would put them."""
    return f"{dataset}-ipc{ipc}-{preset}"


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def notebook_path() -> Path:
    """08_reproduction.ipynb, generated from its paired .py if the .ipynb is missing."""
    if NOTEBOOK.exists():
        return NOTEBOOK
    import jupytext

    tmp = Path(tempfile.mkdtemp()) / NOTEBOOK.name
    jupytext.write(jupytext.read(NOTEBOOK.with_suffix(".py")), tmp)
    return tmp


def run_grid(out: Path, datasets, ipcs, presets, extra: dict, kernel_name: str | None = None, force=False,
             log_output=False) -> list[Path]:
    """Execute the notebook once per configuration; return the results.json paths."""
    import papermill as pm

    out.mkdir(parents=True, exist_ok=True)
    done = []
    for dataset, ipc, preset in itertools.product(datasets, ipcs, presets):
        name = run_name(dataset, ipc, preset)
        res = out / name / "results.json"
        if res.exists() and not force:
            print(f"[skip] {name}: {res} exists (use --force to re-run)")
            done.append(res)
            continue
        (out / name).mkdir(parents=True, exist_ok=True)
        # profile "teaching": the notebook's parameters as given here (not its CPU sizes), unless -p profile says
        params = {"profile": "teaching", **extra, "dataset": dataset, "ipc": ipc, "preset_name": preset, "out_dir": str(out),
                  "run_name": name}
        print(f"[run ] {name}: {json.dumps(params)}")
        pm.execute_notebook(str(notebook_path()), str(out / name / "08_reproduction.ipynb"), parameters=params,
                            kernel_name=kernel_name, cwd=os.getcwd(), log_output=log_output, progress_bar=False)
        done.append(res)
    return done


def load_results(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*/results.json"))]


def assemble_table(results: list[dict]) -> str:
    """One markdown row per run: accuracy (mean ± std over nets) of MTT and of random real, and the settings."""
    head = ("| dataset | ipc | preset | N | M | T+ | iterations | experts | eval epochs × nets | "
            "MTT (%) | random real (%) | α | distil time (s) |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        c, p, e = r["config"], r["protocol"], r["experts"]
        rows.append(
            f"| {r['dataset']} | {r['ipc']} | {r['preset']} | {c['syn_steps']} | {c['expert_epochs']} | "
            f"{c['max_start_epoch']} | {r['iterations']} | {e['num_experts']} × {e['train_epochs']} ep, width {e['width']} | "
            f"{p['epochs']} × {p['num_nets']} | {100 * r['mtt']['mean']:.1f} ± {100 * r['mtt']['std']:.1f} | "
            f"{100 * r['random_real']['mean']:.1f} ± {100 * r['random_real']['std']:.1f} | {r['syn_lr']:.4g} | "
            f"{r['seconds']['distill']:.0f} |"
        )
    note = ("\nFinal-epoch test accuracy of fresh ConvNets (mean ± std over the nets), not the best "
            "evaluation during distillation; random real = the same number of random training images per class.\n")
    return "\n".join(rows) + "\n" + note


def write_summary(out: Path) -> Path:
    results = load_results(out)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    md = out / "results.md"
    md.write_text(assemble_table(results))
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", default="runs/reproduction-grid", help="output folder (default %(default)s)")
    ap.add_argument("--dataset", nargs="+", default=["fashion-mnist-mini"])
    ap.add_argument("--ipc", nargs="+", type=int, default=[1])
    ap.add_argument("--preset", nargs="+", default=["demo"], help="keys of mttlite.distill.PRESETS")
    ap.add_argument("--iterations", type=int, default=None, help="outer iterations (default: the notebook's)")
    ap.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="any other notebook parameter")
    ap.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebook's, python3)")
    ap.add_argument("--force", action="store_true", help="re-run configurations that already have results")
    ap.add_argument("--log-output", action="store_true", help="stream the notebook's output")
    args = ap.parse_args(argv)
    extra = {k: parse_value(v) for k, v in args.param}
    if args.iterations is not None:
        extra["iterations"] = args.iterations
    out = Path(args.out)
    run_grid(out, args.dataset, args.ipc, args.preset, extra, kernel_name=args.kernel, force=args.force,
             log_output=args.log_output)
    md = write_summary(out)
    print(md.read_text())
    print(f"wrote {md} and {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
