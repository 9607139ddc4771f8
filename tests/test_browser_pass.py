"""benchmarks/browser_pass.py: what it calls a problem, its refusals, and (where Chromium and Playwright are
installed; CI has neither) one real pass over two stand-in notebooks, one fine and one broken in the ways the
pass looks for."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "browser_pass.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

import browser_pass  # noqa: E402


def findings(**over) -> dict:
    f = {"finished": True, "unexecuted": [], "errors": [], "empty_figures": [], "max_figures_in_one_cell": 1,
         "figure_tex": [], "untypeset_math": [], "widget_errors": [], "truncated_labels": []}
    f.update(over)
    return f


def test_problems_name_each_kind_of_finding():
    assert browser_pass.problems(findings(), [
        {"kind": "slider", "label": "N", "cell": 3, "changed": True, "seconds": 1.0},
        # the slider of an interact(manual=True) waits for its button: changing nothing is right
        {"kind": "slider", "label": "epochs", "cell": 4, "changed": False, "seconds": 3.0, "waits_for_button": True},
    ]) == []
    p = browser_pass.problems(
        findings(finished=False, unexecuted=[4], errors=[[5, "ValueError: x"]], empty_figures=[6, 6],
                 max_figures_in_one_cell=5, figure_tex=[[7, "θ*_{t+M}"]], untypeset_math=[[8, "$x$"]],
                 widget_errors=[9], truncated_labels=[[10, "N (syn_steps)"]]),
        [{"kind": "button", "label": "Evaluate", "cell": 11, "changed": False, "seconds": 60.0}])
    text = "\n".join(p)
    for needle in ("did not finish", "cells not run: [4]", "error in cell 5: ValueError: x", "empty in cells [6]",
                   "5 figures in one cell", "TeX source in a figure (cell 7)", "untypeset math (cell 8)",
                   "widget failed to render in cell 9", "label cut off (cell 10): 'N (syn_steps)'",
                   "button 'Evaluate' (cell 11) changed nothing"):
        assert needle in text, (needle, text)
    assert len(p) == 10


def test_refuses_without_chromium(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--chromium", str(tmp_path / "no-such-chromium"),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert ("no Chromium at" in r.stderr and "apt install chromium" in r.stderr) or "pip install playwright" in r.stderr
    assert not (tmp_path / "out" / "browser_pass.md").exists()


CHROMIUM = shutil.which("chromium") or (Path("/usr/bin/chromium").exists() and "/usr/bin/chromium")
HAVE = bool(CHROMIUM) and importlib.util.find_spec("playwright") is not None and \
    importlib.util.find_spec("jupyterlab") is not None


@pytest.mark.skipif(not HAVE, reason="needs Chromium (apt install chromium), playwright and jupyterlab")
def test_a_real_pass_over_stand_in_notebooks(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbs = tmp_path / "notebooks"
    nbs.mkdir()

    def write(name, cells):
        nb = nbformat.v4.new_notebook()
        nb.cells = cells
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, nbs / f"{name}.ipynb")

    fine = """import ipywidgets as widgets, plotly.graph_objects as go
from mttlite.notebook import live, setup
setup()
def draw(n):
    go.Figure(go.Scatter(y=list(range(n))), layout_title_text=f"n = {n}").show()
draw(3)
display(live(draw, n=widgets.IntSlider(value=3, min=1, max=9, description="n")))"""
    manual = """def measure(k):
    print(f"k = {k}")
display(widgets.interactive(measure, {"manual": True, "manual_name": "go"}, k=widgets.Dropdown(options=[1, 2])))"""
    write("00_fine", [nbformat.v4.new_markdown_cell("The loss $L = x^2$."), nbformat.v4.new_code_cell(fine),
                      nbformat.v4.new_code_cell(manual)])
    broken = """import plotly.graph_objects as go, plotly.io as pio, ipywidgets as widgets
from mttlite.notebook import setup
setup()
for i in range(5):
    go.Figure(go.Scatter(y=[1, i]), layout_title_text="θ*_{t+M}").show()
display(widgets.Button(description="does nothing"))
def rendered(fig):  # what fig.show() displays, as a dict
    return {k: v for n in pio.renderers.default.split("+") for k, v in pio.renderers[n].to_mimebundle(fig.to_dict()).items()}
handle = display(rendered(go.Figure(layout_title_text="first")), raw=True, display_id=True)
handle.update(rendered(go.Figure(layout_title_text="last")), raw=True)  # JupyterLab's plotly view keeps 'first'"""
    write("01_broken", [nbformat.v4.new_code_cell(broken), nbformat.v4.new_code_cell("raise RuntimeError('boom')"),
                        nbformat.v4.new_code_cell("print('never')")])
    monkeypatch.setattr(browser_pass, "NB_DIR", nbs)
    out = tmp_path / "out"
    code = browser_pass.main(["--out", str(out), "--wait", "5", "--timeout", "240", "--chromium", str(CHROMIUM)])
    assert code == 1  # the broken notebook
    rows = json.loads((out / "browser_pass.json").read_text())["notebooks"]
    ok = rows["00_fine"]
    assert ok["problems"] == [], ok["problems"]
    assert ok["figures"] == 1 and ok["widgets"] >= 1 and ok["math"] == 1
    slider, dropdown, go = ok["controls"]
    assert (slider["kind"], slider["changed"], slider["waits_for_button"]) == ("slider", True, False)
    assert (dropdown["kind"], dropdown["changed"], dropdown["waits_for_button"]) == ("dropdown", False, True)
    assert (go["kind"], go["label"], go["changed"]) == ("button", "go", True)
    bad = "\n".join(rows["01_broken"]["problems"])
    for needle in ("error in cell 1", "RuntimeError: boom", "cells not run: [2]", "6 figures in one cell",
                   "TeX source in a figure", "button 'does nothing' (cell 0) changed nothing",
                   "cell 0 shows figures titled", "'first'] but holds", "'last'] (an update the page never drew)"):
        assert needle in bad, (needle, bad)
    assert list((out / "00_fine").glob("cell*.png"))


def test_titles_compare_as_the_page_draws_them():
    """plotly draws <sub>/<sup> as text between zero-width spaces and <br> as separate lines; a title
    held as HTML must compare equal to what the page shows, and a different title must not."""
    held = "Student path from θ*<sub>1</sub>,<br>target θ*<sub>3</sub> &amp; more"
    shown = "Student path from θ*\u200b1\u200b,target θ*\u200b3\u200b & more"
    assert browser_pass._plain(held) == browser_pass._plain(shown)
    assert browser_pass._plain("iteration 0 / 20") != browser_pass._plain("iteration 20 / 20")
