"""The notebooks as a student meets them: JupyterLab in a real browser, Run All, then every widget touched.

    python benchmarks/browser_pass.py                         # every notebook, CI sizes (minutes)
    python benchmarks/browser_pass.py --notebooks 04,06       # some of them
    python benchmarks/browser_pass.py --profile cpu           # the classroom CPU sizes (about an hour)

Needs a Chromium (Debian: ``apt install chromium``; ``--chromium`` or ``BROWSER_PATH`` names another)
and Playwright's Python package (``pip install playwright``; its own browser download is not needed).
Neither is a dependency of mttlite, and no test runs this script: it is the check a person would
otherwise do by hand before a class.

What it does, per notebook: a JupyterLab server (this interpreter's) over a temporary copy of
``notebooks/``, the notebook opened in headless Chromium, Run > Run All Cells, and a wait until every
cell has run. Then, read from the page as rendered (not from the ``.ipynb``):

- cells that did not run, and error outputs;
- plotly figures: how many, how many rendered empty (no SVG, or smaller than 50 px), the most figures
  in one cell's output (a live plot must redraw one figure, not append), figure text showing TeX
  source (``_{``, ``^{``, a backslash command, a dollar sign);
- figures the page shows that are not the ones the notebook holds (the notebook is saved and its
  outputs compared with the page: an output updated in place that the page never redrew);
- markdown with math left untypeset by MathJax (a ``$`` or ``\\(`` still in the rendered text);
- widgets: how many, any that failed to render, labels cut off by their box;
- then every slider is moved one step (keyboard; down from its maximum), every dropdown set to its
  next option and every button clicked (toggle buttons: those not on), one at a time, in the
  notebook's order, and the script waits until the notebook's figures or outputs change (up to
  ``--wait`` seconds): a control that changes nothing is reported (except the controls of an
  ``interact`` with a button, which wait for it; the button itself must change something).

Each cell with a figure or a widget is saved as a PNG under ``--out``. Writes ``browser_pass.md`` and
``.json`` there (command, hardware, one row per notebook, and each problem found). Exit status 1
when a notebook has a problem.
"""
from __future__ import annotations

import argparse
import html
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import hardware  # noqa: E402
from notebook_times import notebooks  # noqa: E402

from mttlite.buffers import write_json_atomic  # noqa: E402
from mttlite.io import atomic_write  # noqa: E402

NB_DIR = ROOT / "notebooks"
TOKEN = "mttlite-browser-pass"

# Everything below is read from the DOM of JupyterLab 4 (class names of @jupyterlab/cells and ipywidgets 8).
# The open notebook: the one panel not hidden behind another tab. Every JS snippet below takes it as its argument.
PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"
# The kernel's state as the notebook's toolbar shows it ('idle', 'busy', ...; null before the panel exists).
KERNEL_STATUS_JS = """panel => { const k = document.querySelector(panel + ' .jp-Notebook-ExecutionIndicator');
    return k ? k.getAttribute('data-status') : null; }"""

FINDINGS_JS = r"""
panel => {
  const nb = document.querySelector(panel + ' .jp-Notebook');
  const out = {cells: 0, code_cells: 0, unexecuted: [], errors: [], figures: 0, empty_figures: [],
               max_figures_in_one_cell: 0, figure_tex: [], untypeset_math: [], math: 0,
               widgets: 0, widget_errors: [], truncated_labels: []};
  if (!nb) return out;
  const cells = [...nb.querySelectorAll(':scope .jp-Cell')];
  out.cells = cells.length;
  const tex = /[_^]\{|\\[a-zA-Z]{2,}|\$/;
  cells.forEach((c, i) => {
    if (c.classList.contains('jp-CodeCell')) {
      out.code_cells++;
      const prompt = (c.querySelector('.jp-InputPrompt') || {}).textContent || '';
      const empty = !(c.querySelector('.jp-InputArea-editor') || {}).textContent;
      if (/\[\s*\]/.test(prompt) && !empty) out.unexecuted.push(i);
      // JupyterLab renders an error output as stderr text holding the traceback
      c.querySelectorAll('[data-mime-type="application/vnd.jupyter.error"], [data-mime-type="application/vnd.jupyter.stderr"]')
        .forEach(e => { if (/Traceback \(most recent call last\)/.test(e.textContent)) out.errors.push(
          [i, e.textContent.trim().split('\n').filter(l => l.trim()).slice(-1)[0].slice(0, 300)]); });
      const figs = [...c.querySelectorAll('.js-plotly-plot')];
      out.figures += figs.length;
      out.max_figures_in_one_cell = Math.max(out.max_figures_in_one_cell, figs.length);
      figs.forEach(f => {
        const r = f.getBoundingClientRect();
        if (!f.querySelector('svg.main-svg') || r.width < 50 || r.height < 50) out.empty_figures.push(i);
        f.querySelectorAll('svg text').forEach(t => {
          if (tex.test(t.textContent)) out.figure_tex.push([i, t.textContent.slice(0, 80)]);
        });
      });
      c.querySelectorAll('.jupyter-widgets').forEach(() => out.widgets++);
      if (/Error displaying widget|Loading widget|Failed to load model/i.test(c.querySelector('.jp-Cell-outputArea')?.textContent || ''))
        out.widget_errors.push(i);
      c.querySelectorAll('.widget-label, .widget-label-basic').forEach(l => {
        if (l.textContent.trim() && l.scrollWidth > l.clientWidth + 1) out.truncated_labels.push([i, l.textContent.trim()]);
      });
    } else if (c.classList.contains('jp-MarkdownCell')) {
      const md = c.querySelector('.jp-RenderedMarkdown');
      if (!md) return;
      out.math += md.querySelectorAll('mjx-container').length;
      const clone = md.cloneNode(true);
      clone.querySelectorAll('mjx-container, code, pre, script, mjx-assistive-mml').forEach(e => e.remove());
      const t = clone.textContent;
      const m = t.match(/\$[^$\s][^$]*\$|\\\(|\\\[/);
      if (m) out.untypeset_math.push([i, m[0].slice(0, 80)]);
    }
  });
  return out;
}
"""

# A fingerprint of everything the outputs show: figure text, path geometry, images and plain text.
SIGNATURE_JS = r"""
panel => {
  const nb = document.querySelector(panel + ' .jp-Notebook');
  if (!nb) return '';
  const parts = [];
  nb.querySelectorAll('.jp-Cell-outputArea').forEach(o => {
    o.querySelectorAll('.js-plotly-plot').forEach(f => {
      parts.push([...f.querySelectorAll('svg text')].map(t => t.textContent).join('|'));
      let d = 0; f.querySelectorAll('path').forEach(p => d += (p.getAttribute('d') || '').length);
      parts.push(String(d));
      f.querySelectorAll('image').forEach(im => parts.push(String((im.getAttribute('href') || '').length)));
    });
    o.querySelectorAll('img').forEach(im => parts.push(String((im.getAttribute('src') || '').length)));
    o.querySelectorAll('.jp-RenderedText, .widget-readout, .widget-html-content').forEach(t => parts.push(t.textContent));
  });
  return parts.join('\n');
}
"""

# Per cell, the titles of the figures the page shows in the cell's own outputs (not inside widgets).
SHOWN_TITLES_JS = r"""
panel => {
  const nb = document.querySelector(panel + ' .jp-Notebook');
  return [...nb.querySelectorAll(':scope .jp-Cell')].map(c => [...c.querySelectorAll('.js-plotly-plot')]
    .filter(f => !f.closest('.jupyter-widgets'))
    .map(f => { const t = f.querySelector('.gtitle'); return t ? t.textContent : ''; }));
}
"""

# The controls to touch, as (cell index, kind, index of that kind in the cell, label, waits for a button).
CONTROLS_JS = r"""
panel => {
  const nb = document.querySelector(panel + ' .jp-Notebook');
  const found = [];
  [...nb.querySelectorAll(':scope .jp-Cell')].forEach((c, i) => {
    const label = el => ((el.closest('.widget-inline-hbox, .widget-hbox, .jupyter-widgets') || el)
                         .querySelector('.widget-label') || {}).textContent || el.textContent || '';
    // a control of an interact with a button (manual=True) waits for that button: it should change nothing
    const manual = el => { const box = el.closest('.widget-interact');
                           return !!(box && [...box.querySelectorAll('button.jupyter-button')].some(b => !toggle(b))); };
    const toggle = b => !!b.closest('.widget-toggle-buttons, .jupyter-widget-toggle-buttons');
    c.querySelectorAll('.widget-slider .noUi-handle').forEach((h, k) => found.push([i, 'slider', k, label(h).trim(), manual(h)]));
    c.querySelectorAll('.widget-dropdown select').forEach((s, k) => found.push([i, 'dropdown', k, label(s).trim(), manual(s)]));
    // a toggle button already on changes nothing when clicked: touch the others
    c.querySelectorAll('button.jupyter-button').forEach((b, k) => {
      if (!(toggle(b) && b.classList.contains('mod-active')))
        found.push([i, 'button', k, b.textContent.trim(), toggle(b) && manual(b)]);
    });
  });
  return found;
}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lab(root_dir: Path, settings: Path, env: dict, port: int, log_path: Path) -> subprocess.Popen:
    """JupyterLab over ``root_dir``; notebooks laid out whole (windowing off) so every cell renders."""
    tracker = settings / "@jupyterlab" / "notebook-extension"
    tracker.mkdir(parents=True, exist_ok=True)
    (tracker / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    notes = settings / "@jupyterlab" / "apputils-extension"
    notes.mkdir(parents=True, exist_ok=True)
    (notes / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
           f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root_dir}",
           f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={settings / 'workspaces'}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # containers and CI machines run as root
    with open(log_path, "w") as log:  # the server keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={TOKEN}", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"JupyterLab exited at start; see {log_path}") from None
            time.sleep(1)
    proc.terminate()
    raise SystemExit("JupyterLab did not answer within 2 minutes")


def running(page) -> bool:
    return page.evaluate("""panel => [...document.querySelectorAll(panel + ' .jp-InputPrompt')]
        .some(p => p.textContent.includes('*'))""", PANEL)


def kernel_busy(page) -> bool:
    return page.evaluate(KERNEL_STATUS_JS, PANEL) == "busy"


def wait_done(page, timeout: float) -> bool:
    """Until no cell is running and the kernel is idle for 3 s in a row (False at the timeout)."""
    t0, quiet = time.time(), 0
    while time.time() - t0 < timeout:
        quiet = quiet + 1 if not (running(page) or kernel_busy(page)) else 0
        if quiet >= 6:
            return True
        page.wait_for_timeout(500)
    return False


def menu(page, top: str, item: str) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text=top).first.click()
    page.locator(".lm-Menu-itemLabel", has_text=item).first.click()


def cells(page):
    """The open notebook's cells, in the order the JS snippets above number them."""
    return page.locator(f"{PANEL} .jp-Notebook .jp-Cell")


def touch(page, cell: int, kind: str, k: int, wait: float) -> tuple[bool, float]:
    """Operate one control; return (did the outputs change, seconds until they did)."""
    before = page.evaluate(SIGNATURE_JS, PANEL)
    c = cells(page).nth(cell)
    if kind == "slider":
        h = c.locator(".widget-slider .noUi-handle").nth(k)
        h.scroll_into_view_if_needed()
        h.focus()
        at_max = h.get_attribute("aria-valuenow") == h.get_attribute("aria-valuemax")
        page.keyboard.press("ArrowLeft" if at_max else "ArrowRight")  # one step, inside the range
    elif kind == "dropdown":
        s = c.locator(".widget-dropdown select").nth(k)
        s.scroll_into_view_if_needed()
        options = s.evaluate("s => [...s.options].map(o => o.value)")
        current = s.evaluate("s => s.value")
        if len(options) < 2:
            return True, 0.0
        s.select_option(options[(options.index(current) + 1) % len(options)])
    else:
        b = c.locator("button.jupyter-button").nth(k)
        b.scroll_into_view_if_needed()
        b.click()
    t0 = time.time()
    while time.time() - t0 < wait:
        page.wait_for_timeout(500)
        if page.evaluate(SIGNATURE_JS, PANEL) != before and not kernel_busy(page):
            page.wait_for_timeout(500)
            return True, time.time() - t0
    return False, time.time() - t0


def problems(f: dict, controls: list[dict]) -> list[str]:
    """The findings of one notebook as a list of human-readable problems (empty: nothing found)."""
    p = []
    if not f.get("finished"):
        p.append("Run All did not finish in time")
    p += [f"a dialog on opening: {t!r}" for t in f.get("dialogs", [])]
    p += f.get("stale_figures", [])
    if f["unexecuted"]:
        p.append(f"cells not run: {f['unexecuted']}")
    p += [f"error in cell {i}: {t}" for i, t in f["errors"]]
    if f["empty_figures"]:
        p.append(f"figures rendered empty in cells {sorted(set(f['empty_figures']))}")
    if f["max_figures_in_one_cell"] > 3:
        p.append(f"{f['max_figures_in_one_cell']} figures in one cell (a live plot appending?)")
    p += [f"TeX source in a figure (cell {i}): {t!r}" for i, t in f["figure_tex"]]
    p += [f"untypeset math (cell {i}): {t!r}" for i, t in f["untypeset_math"]]
    p += [f"widget failed to render in cell {i}" for i in f["widget_errors"]]
    p += [f"label cut off (cell {i}): {t!r}" for i, t in f["truncated_labels"]]
    p += [f"{c['kind']} {c['label']!r} (cell {c['cell']}) changed nothing in {c['seconds']:.0f} s"
          for c in controls if not c["changed"] and not c.get("waits_for_button")]
    return p


def dismiss_dialogs(page, wait_ms: int = 1500) -> list[str]:
    """Answer every dialog that shows up within ``wait_ms`` (Discard / Shut Down / OK); return their texts."""
    seen = []
    t0 = time.time()
    while time.time() - t0 < wait_ms / 1000:
        d = page.locator(".jp-Dialog")
        if d.count():
            seen.append(d.first.inner_text()[:200])
            for label in ("Discard", "Don't Save", "Shut Down", "OK", "Restart"):
                b = d.first.locator("button", has_text=label)
                if b.count():
                    b.first.click()
                    break
            else:
                d.first.locator("button.jp-mod-accept").first.click()
            t0 = time.time()
        page.wait_for_timeout(250)
    return seen


def close_all(page, url: str) -> None:
    """Close the notebook without saving and stop every kernel (REST API: no dialogs)."""
    dismiss_dialogs(page, 500)
    menu(page, "File", "Close All Tabs")
    dismiss_dialogs(page)
    with urllib.request.urlopen(f"{url}/api/kernels?token={TOKEN}", timeout=10) as r:
        kernels = json.load(r)
    for k in kernels:
        req = urllib.request.Request(f"{url}/api/kernels/{k['id']}?token={TOKEN}", method="DELETE")
        urllib.request.urlopen(req, timeout=30).close()


def _plain(text: str) -> str:
    """A figure title as text to compare: no HTML tags (<br>, <sub>) or entities, no whitespace, and none
    of the zero-width spaces plotly puts around a <sub> or <sup> when it draws one."""
    return re.sub(r"[\s\u200b\u200c\u200d\ufeff]+", "", html.unescape(re.sub(r"<[^>]+>", "", text or "")))


def saved_titles(path: Path) -> list[list[str]]:
    """Per cell of the saved notebook, the titles of the plotly figures among its outputs (the kernel's last word)."""
    titles = []
    for cell in json.loads(path.read_text())["cells"]:
        row = []
        for o in cell.get("outputs", []):
            fig = o.get("data", {}).get("application/vnd.plotly.v1+json")
            if fig is not None:
                title = fig.get("layout", {}).get("title", "")
                row.append(title.get("text", "") if isinstance(title, dict) else str(title))
        titles.append(row)
    return titles


def stale_figures(page, path: Path) -> list[str]:
    """Cells whose figures on the page are not the figures the notebook holds: an output updated in the
    notebook (``display_id`` + ``update``, say) that the page never redrew. Saves the notebook to compare."""
    before = path.stat().st_mtime_ns
    save = page.locator(f'{PANEL} [data-command="docmanager:save"]')
    if save.count():
        save.first.click()
    else:
        page.keyboard.press("Control+s")
    for _ in range(40):
        page.wait_for_timeout(250)
        if path.stat().st_mtime_ns != before:
            break
    else:
        return ["could not save the notebook to compare its figures with the page"]
    page.wait_for_timeout(500)
    shown = page.evaluate(SHOWN_TITLES_JS, PANEL)
    found = []
    for i, (held, seen) in enumerate(zip(saved_titles(path), shown)):
        if [_plain(t) for t in held] != [_plain(t) for t in seen]:
            found.append(f"cell {i} shows figures titled {seen} but holds {held} (an update the page never drew)")
    return found


def check_notebook(page, url: str, name: str, out: Path, run_timeout: float, wait: float,
                   path: Path | None = None) -> dict:
    page.goto(f"{url}/lab/tree/{name}.ipynb?token={TOKEN}")
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=120_000)
    page.wait_for_function(f"panel => ({KERNEL_STATUS_JS})(panel) === 'idle'", arg=PANEL, timeout=120_000)
    dialogs = dismiss_dialogs(page, 2000)  # e.g. a kernel chooser: answered with its default, and reported
    t0 = time.time()
    for _ in range(5):  # the menu item does nothing until the kernel is connected: click until cells start
        menu(page, "Run", "Run All Cells")
        try:
            page.wait_for_function("""panel => [...document.querySelectorAll(panel + ' .jp-InputPrompt')]
                .some(p => /\\[[*0-9]/.test(p.textContent))""", arg=PANEL, timeout=15_000)
            break
        except Exception:  # noqa: BLE001 - playwright's TimeoutError: try the menu again
            page.keyboard.press("Escape")
            dialogs += dismiss_dialogs(page, 1000)
    finished = wait_done(page, run_timeout)
    seconds = time.time() - t0
    page.wait_for_timeout(3000)  # MathJax and plotly finish asynchronously
    f = page.evaluate(FINDINGS_JS, PANEL)
    f["finished"], f["run_seconds"], f["dialogs"] = finished, round(seconds, 1), dialogs
    f["stale_figures"] = stale_figures(page, path) if finished and path is not None else []
    controls = []
    if finished:
        for cell, kind, k, label, manual in page.evaluate(CONTROLS_JS, PANEL):
            changed, s = touch(page, cell, kind, k, 3.0 if manual else wait)
            controls.append({"cell": cell, "kind": kind, "label": label[:60], "changed": changed, "seconds": round(s, 1),
                             "waits_for_button": manual})
    shots = out / name
    shots.mkdir(parents=True, exist_ok=True)
    all_cells = cells(page)
    for i in range(all_cells.count()):
        c = all_cells.nth(i)
        if c.locator(".js-plotly-plot, .jupyter-widgets, .jp-RenderedImage").count():
            try:
                c.screenshot(path=str(shots / f"cell{i:02d}.png"))
            except Exception:  # noqa: BLE001 - a screenshot is a convenience, not a finding
                pass
    f["controls"] = controls
    f["problems"] = problems(f, controls)
    return f


def table(rows: dict) -> str:
    lines = ["| notebook | Run All | figures (most in a cell) | widgets | controls that redrew | math | problems |",
             "|---|---|---|---|---|---|---|"]
    for name, f in rows.items():
        ok = sum(c["changed"] or bool(c.get("waits_for_button")) for c in f["controls"])
        lines.append(f"| {name} | {f['run_seconds']:.0f} s | {f['figures']} ({f['max_figures_in_one_cell']}) | "
                     f"{f['widgets']} | {ok} / {len(f['controls'])} | {f['math']} | "
                     f"{'; '.join(f['problems']) or 'none'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--notebooks", default=None, help="comma-separated name prefixes (default: all)")
    p.add_argument("--profile", default="ci", choices=("ci", "cpu", "teaching"),
                   help="the sizes the notebooks run at (default ci: the test sizes, minutes in all)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the kernel (2)")
    p.add_argument("--chromium", default=os.environ.get("BROWSER_PATH") or shutil.which("chromium") or "/usr/bin/chromium")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds for Run All per notebook (900)")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for a control's effect (60)")
    p.add_argument("--out", default="runs/bench/browser_pass")
    a = p.parse_args(argv)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise SystemExit("needs Playwright: pip install playwright (it drives the system's Chromium; no download)") from None
    if not Path(a.chromium).exists():
        raise SystemExit(f"no Chromium at {a.chromium}: apt install chromium, or pass --chromium / set BROWSER_PATH")

    names = notebooks(a.notebooks, NB_DIR)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "benchmarks/browser_pass.py", *(sys.argv[1:] if argv is None else argv)])
    rows = {}
    with tempfile.TemporaryDirectory(prefix="browser-pass-") as tmp:
        tmp = Path(tmp)
        work = tmp / "notebooks"
        work.mkdir()
        for name in names:
            shutil.copy(NB_DIR / f"{name}.ipynb", work)
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), PYTHONPATH=str(ROOT),
                   JUPYTER_CONFIG_DIR=str(tmp / "config"), JUPYTER_RUNTIME_DIR=str(tmp / "runtime"))
        env.pop("MTTLITE_CI", None)
        if a.profile == "ci":
            env["MTTLITE_CI"] = "1"  # the notebooks' profile "auto" picks the CI sizes under it
        elif a.profile == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # "auto" picks the CPU profile without a GPU
        port = free_port()
        lab = start_lab(work, tmp / "settings", env, port, out / "jupyterlab.log")
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=a.chromium, headless=True)
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                for name in names:
                    try:
                        f = check_notebook(page, f"http://127.0.0.1:{port}", name, out, a.timeout, a.wait,
                                           work / f"{name}.ipynb")
                    except Exception as e:  # noqa: BLE001 - one notebook's failure is a row, not the end
                        f = {"run_seconds": 0, "figures": 0, "max_figures_in_one_cell": 0, "widgets": 0, "math": 0,
                             "controls": [], "problems": [f"the pass itself failed: {type(e).__name__}: {e}"[:400]]}
                    rows[name] = f
                    print(f"{name}: {'; '.join(f['problems']) or 'no problem found'}", flush=True)
                    close_all(page, f"http://127.0.0.1:{port}")
                browser.close()
        finally:
            lab.terminate()
            lab.wait(timeout=30)
    md = ["# Browser pass", "", f"Command: `{command}`", "",
          f"Hardware: {hardware()}; JupyterLab in headless Chromium ({a.chromium}); profile `{a.profile}`, "
          f"kernel with {a.threads} torch thread(s). Screenshots: `{out}/<notebook>/cellNN.png`.", "", table(rows), ""]
    atomic_write(out / "browser_pass.md", lambda tmp: Path(tmp).write_text("\n".join(md)))
    write_json_atomic(out / "browser_pass.json", {"command": command, "hardware": hardware(), "profile": a.profile,
                                                  "notebooks": rows})
    print("\n".join(md))
    return 1 if any(f["problems"] for f in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
