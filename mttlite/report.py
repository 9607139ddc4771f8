"""The run report: one self-contained HTML page per distillation, ``report.html``.

What a person opens after ``mttlite distill`` or ``make demo``: the matching loss L and the learned
α after every iteration, and the synthetic set at a few iterations. The page fetches nothing and runs
no script, so it opens offline and from a mail attachment:

* curves are inline SVG ``<polyline>``s whose points are the run's history itself, (i, L_i) and
  (i, α_i) for iterations i = 1 … I, in data coordinates (the SVG's viewBox does the scaling);
* pictures are the PNGs of ``mttlite.grid`` (one row per class), embedded as ``data:image/png;base64``.

The pictures are taken while the run goes: ``distill_set`` (``pipeline.py``) writes
``<run>/snapshots/iteration_<i>.png`` at the iterations of :func:`snapshot_iterations` (0, a quarter,
half, three quarters, the end). A resumed run keeps the ones already written; a fresh start removes
them. The curves come from the run's checkpoint, which holds the whole history (``Distiller.history``).
"""
from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path

from .io import atomic_write, read_meta_only

SNAPSHOT_DIR = "snapshots"
_SNAPSHOT = re.compile(r"^iteration_(\d+)\.png$")
#: The run's settings shown at the top of the report, with the paper's symbol.
SETTINGS = (("dataset", "dataset"), ("ipc", "images per class"), ("syn_steps", "N, student steps"),
            ("expert_epochs", "M, expert epochs"), ("max_start_epoch", "T+, max start epoch"),
            ("lr_img", "lr of the pixels"), ("lr_lr", "lr of α"), ("lr_teacher", "α0, initial α"),
            ("iterations", "iterations"))


# -- the snapshots ------------------------------------------------------------------------------------


def snapshot_iterations(iterations: int, count: int = 4) -> list[int]:
    """The iterations pictured: 0 (the initial images) and ⌈k · I / count⌉ for k = 1 … count (I = iterations)."""
    return sorted({0, *(math.ceil(k * iterations / count) for k in range(1, count + 1))})


def snapshot_path(run_dir, iteration: int) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR / f"iteration_{iteration:06d}.png"


def read_snapshots(run_dir) -> dict[int, bytes]:
    """{iteration: PNG bytes} of the snapshots in ``run_dir``, by iteration."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    found = {}
    if folder.is_dir():
        for p in folder.iterdir():
            m = _SNAPSHOT.match(p.name)
            if m and p.is_file():
                found[int(m.group(1))] = p.read_bytes()
    return dict(sorted(found.items()))


def clear_snapshots(run_dir) -> None:
    """Remove the snapshots of a previous run (a fresh start in the same folder)."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    if folder.is_dir():
        for p in folder.iterdir():
            if _SNAPSHOT.match(p.name):
                p.unlink()


# -- the page -------------------------------------------------------------------------------------------


def _num(v: float) -> str:
    return repr(float(v))  # the shortest text that reads back as the same float


def svg_curve(values: list[float], label: str, width: int = 640, height: int = 220) -> str:
    """An SVG line chart of ``values`` against iterations 1 … len(values).

    The ``<polyline>`` points are (i, v_i) exactly (non-finite values are left out); an inner
    ``<svg>`` maps its viewBox [1, I] × [min v, max v] onto the plot area, y upwards (the polyline is
    drawn mirrored, ``scale(1, -1)``, in a viewBox over −v), with a stroke of constant width.
    """
    pts = [(i, float(v)) for i, v in enumerate(values, start=1) if math.isfinite(float(v))]
    left, top, right, bottom = 78, 24, 12, 28
    pw, ph = width - left - right, height - top - bottom
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="{html.escape(label)}">',
           f'<text x="{left}" y="16" font-size="13" font-family="sans-serif">{html.escape(label)}</text>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#bbb"/>']
    if pts:
        x0, x1 = (pts[0][0], pts[-1][0]) if len(pts) > 1 else (pts[0][0] - 0.5, pts[0][0] + 0.5)
        lo, hi = min(v for _, v in pts), max(v for _, v in pts)
        if hi == lo:
            lo, hi = lo - max(abs(lo), 1.0) * 0.05, hi + max(abs(hi), 1.0) * 0.05
        for y, v in ((top + 4, hi), (top + ph, lo)):
            out.append(f'<text x="{left - 4}" y="{y}" font-size="11" font-family="sans-serif" '
                       f'text-anchor="end">{v:.4g}</text>')
        for x, i in ((left, x0), (left + pw, x1)):
            out.append(f'<text x="{x}" y="{height - 10}" font-size="11" font-family="sans-serif" '
                       f'text-anchor="middle">{i:g}</text>')
        points = " ".join(f"{i},{_num(v)}" for i, v in pts)
        out += [f'<svg x="{left}" y="{top}" width="{pw}" height="{ph}" viewBox="{_num(x0)} {_num(-hi)} '
                f'{_num(x1 - x0)} {_num(hi - lo)}" preserveAspectRatio="none" overflow="visible">',
                f'<polyline class="curve" transform="scale(1,-1)" fill="none" stroke="#1f77b4" stroke-width="2" '
                f'vector-effect="non-scaling-stroke" points="{points}"/>',
                "</svg>"]
    out.append(f'<text x="{left + pw / 2}" y="{height - 10}" font-size="11" font-family="sans-serif" '
               'text-anchor="middle">iteration</text>')
    out.append("</svg>")
    return "\n".join(out)


def render(history: dict, snapshots: dict[int, bytes], facts: list[tuple[str, str]] = (),
           title: str = "mttlite distillation") -> str:
    """The page. history: ``{"loss": [L_1 …], "syn_lr": [α_1 …]}`` (``Distiller.history``);
    snapshots: {iteration: PNG bytes}; facts: (name, value) rows shown first."""
    e = html.escape
    rows = "\n".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in facts)
    figures = "\n".join(
        f'<figure><img alt="the synthetic set at iteration {i}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode("ascii")}"><figcaption>iteration {i}</figcaption></figure>'
        for i, png in sorted(snapshots.items()))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{e(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} th, td {{ text-align: left; padding: 2px 12px 2px 0; }}
figure {{ display: inline-block; margin: 0 1em 1em 0; vertical-align: top; }}
figure img {{ max-width: 100%; image-rendering: pixelated; }}
</style>
</head>
<body>
<h1>{e(title)}</h1>
<table>
{rows}
</table>
<h2>Matching loss and learned learning rate</h2>
<p>L = ‖θ̂<sub>t+N</sub> − θ*<sub>t+M</sub>‖² / ‖θ*<sub>t</sub> − θ*<sub>t+M</sub>‖² of each iteration
(1 = the student got no closer than its start θ*<sub>t</sub>), and α after each update.</p>
{svg_curve(history.get("loss", []), "L, matching loss")}
{svg_curve(history.get("syn_lr", []), "α, learned learning rate (syn_lr)")}
<h2>The synthetic set</h2>
<p>One row per class, one column per image; iteration 0 is the initialisation.</p>
{figures}
</body>
</html>
"""


def write(path, history: dict, snapshots: dict[int, bytes], facts: list[tuple[str, str]] = (),
          title: str = "mttlite distillation") -> Path:
    """Write the page to ``path`` atomically (``io.atomic_write``)."""
    text = render(history, snapshots, facts, title)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_run_report(run_dir, path=None, facts: list[tuple[str, str]] = (), title: str = "mttlite distillation") -> Path:
    """``report.html`` of a distillation folder (default ``run_dir/report.html``), from its checkpoint
    (settings and history) and its snapshots; ``facts`` are added below the settings."""
    meta = read_meta_only(Path(run_dir) / "checkpoint.safetensors")
    if "history" not in meta:
        raise ValueError(f"{run_dir} holds no distillation checkpoint (checkpoint.safetensors) to report on")
    config, history = meta.get("config", {}), meta["history"]
    rows = [(name, config[key]) for key, name in SETTINGS if key in config]
    rows.append(("iterations done", meta.get("iteration", len(history.get("loss", [])))))
    if history.get("loss"):
        rows += [("final L", f"{history['loss'][-1]:.5g}"), ("final α", f"{history['syn_lr'][-1]:.5g}")]
    out = Path(path) if path is not None else Path(run_dir) / "report.html"
    return write(out, history, read_snapshots(run_dir), [*rows, *facts], title)
