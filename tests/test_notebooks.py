"""The notebooks, executed headless with papermill at CI size, and the .py/.ipynb pairs.

Every notebook writes the values it computed to ``results_path`` (a JSON file); the tests assert on
those values (loss went down, accuracy above chance, by-hand code equals the library, shapes), not
merely that the notebook ran. The kernel is this interpreter (``sys.executable``), registered in a
temporary Jupyter data directory put first on ``JUPYTER_PATH``, so it works from a fresh clone
after ``pip install -e .[test,notebooks]`` whatever kernels the machine has.

All notebooks share one expert buffer (2 experts × 3 epochs, width 16), trained by the first
notebook that needs it. Kernels run with OMP_NUM_THREADS=1 unless the variable is set.
Total: about 3 minutes on 2 CPU cores.
"""
from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
papermill = pytest.importorskip("papermill")
jupytext = pytest.importorskip("jupytext")

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(p.stem for p in NB_DIR.glob("[0-9][0-9]_*.py"))
KERNEL = "mttlite-nbtest"
CHANCE = 0.1  # 10 classes

# The CI size: the experts every notebook shares (must be identical for the buffer to be shared).
EXPERTS = {"width": 16, "num_experts": 2, "train_epochs": 3}


@pytest.fixture(scope="session")
def kernel(tmp_path_factory):
    """A kernelspec for this very interpreter, first on JUPYTER_PATH; MTTLITE_CI unset (we pass sizes)."""
    data = tmp_path_factory.mktemp("jupyter")
    spec = data / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "mttlite tests", "language": "python",
        # one thread unless told otherwise: several torch processes sharing 2 cores with 2 OpenMP
        # threads each run many times slower than with one
        "env": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
    }))
    saved = {k: os.environ.get(k) for k in ("JUPYTER_PATH", "MTTLITE_CI")}
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(data)] + ([saved["JUPYTER_PATH"]] if saved["JUPYTER_PATH"] else []))
    os.environ.pop("MTTLITE_CI", None)
    yield KERNEL
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def buffer_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("buffers"))


def execute(name: str, tmp_path: Path, kernel: str, buffer_root: str | None, extra: str | None = None,
            **params) -> dict:
    """Run notebooks/<name>.ipynb with papermill in tmp_path; return the JSON it recorded.

    ``extra``: code run as one more cell at the end, in the same kernel (e.g. ``drive(...)``)."""
    results = tmp_path / f"{name}.json"
    # "teaching": the sizes passed here as given (the default "auto" would pick the classroom CPU sizes)
    params = {"profile": "teaching", **params, "results_path": str(results)}
    if buffer_root is not None:
        params = {**EXPERTS, "buffer_root": buffer_root, **params}
    source = NB_DIR / f"{name}.ipynb"
    if extra is not None:
        nb = nbformat.read(source, as_version=4)
        nb.cells.append(nbformat.v4.new_code_cell(extra))
        source = tmp_path / f"{name}.with-extra.ipynb"
        nbformat.write(nb, source)
    papermill.execute_notebook(str(source), str(tmp_path / f"{name}.out.ipynb"),
                               parameters=params, kernel_name=kernel, cwd=str(tmp_path), progress_bar=False)
    return json.loads(results.read_text())


def drive(panel: str, control: int, value, out: Path) -> str:
    """A cell that sets control number ``control`` of the live widget ``panel`` (a ``live()`` VBox) to
    ``value`` as a user would, and writes what the callback drew to ``out``: each figure shown, by title
    and trace types (``Figure.show`` is wrapped for the moment of the change)."""
    return f"""
import json as _json
from pathlib import Path as _Path
import plotly.graph_objects as _go
_shown, _show = [], _go.Figure.show
_go.Figure.show = lambda self, *a, **k: _shown.append(
    {{"title": self.layout.title.text or "", "types": sorted({{t.type for t in self.data}})}})
try:
    _control = {panel}.children[0].children[{control}]
    _before = _control.value
    _control.value = {value!r}
finally:
    _go.Figure.show = _show
_Path({str(out)!r}).write_text(_json.dumps({{"before": repr(_before), "after": repr(_control.value), "shown": _shown}}))
"""


# -- the pairs ----------------------------------------------------------------------------------------


def _cells(nb):
    return [(c.cell_type, c.source.strip(), sorted(c.metadata.get("tags", []))) for c in nb.cells]


def test_notebook_list():
    assert NOTEBOOKS == ["00_quickstart", "01_expert_trajectories", "02_unrolled_student", "03_matching_loss",
                         "04_learning_alpha_and_pixels", "05_evaluation", "06_long_vs_short_range",
                         "07_memory_and_speed", "08_reproduction", "09_the_family", "10_extensions"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_pair_in_sync_and_clean(name):
    """The .ipynb is what jupytext makes of the .py (same cells, sources, tags), without outputs."""
    from_py = jupytext.read(NB_DIR / f"{name}.py")
    ipynb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    assert _cells(ipynb) == _cells(from_py), f"{name}.ipynb is out of date: run `make notebooks`"
    for c in ipynb.cells:
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None, f"{name}.ipynb is committed with outputs"
    assert ipynb.metadata.kernelspec.name == "python3"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_parameters_cell(name):
    """Exactly one cell tagged `parameters`, holding plain `name = literal` assignments, with results_path."""
    nb = jupytext.read(NB_DIR / f"{name}.py")
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1
    names = []
    for stmt in ast.parse(cells[0].source).body:
        assert isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name), \
            ast.dump(stmt)
        ast.literal_eval(stmt.value)  # a literal: papermill can override it
        names.append(stmt.targets[0].id)
    assert "results_path" in names and "seed" in names
    # papermill's own parser (what `papermill --help-notebook` lists) sees every one of them: a quote in a
    # trailing comment, for one, makes it skip the line with an "Unable to parse" warning
    seen = papermill.inspect_notebook(str(NB_DIR / f"{name}.ipynb"))
    assert sorted(seen) == sorted(names), sorted(set(names) ^ set(seen))
    src = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "device = setup()" in src  # mttlite.notebook.setup: "cuda" if torch.cuda.is_available() else "cpu"


# -- Colab: badges and the set-up cell, from the one repository setting ------------------------------------


def _setup_cell(nb):
    return next(c for c in nb.cells if c.cell_type == "code")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_colab_badge_and_setup_cell(name):
    """The first line is the badge for this very notebook and the setting's repository; the set-up
    cell installs what the setting names (the [colab] extra, not [notebooks]) and gets the device from setup()."""
    from mttlite.notebook import colab_badge, pip_requirement, repository_url

    nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "markdown"
    badge = first.source.splitlines()[0]
    assert badge == colab_badge(f"notebooks/{name}.ipynb"), "run `make notebooks`"
    slug = repository_url().removeprefix("https://github.com/")
    assert badge.endswith(f"/github/{slug}/blob/main/notebooks/{name}.ipynb)")
    setup_src = _setup_cell(nb).source
    assert f'MTTLITE_REQUIREMENT = "{pip_requirement()}"' in setup_src, "run `make notebooks`"
    assert pip_requirement().startswith("mttlite[colab] @ ") and slug in pip_requirement()  # the light extra
    assert "device = setup()" in setup_src


def test_repository_setting_drives_everything(tmp_path):
    """pyproject.toml's [project.urls] Repository is the one setting: README and every notebook agree
    with it now, and changing it is changing pyproject.toml and running `python -m mttlite.notebook`."""
    from mttlite import notebook

    assert notebook.repository_url().startswith("https://github.com/")
    assert notebook.sync(ROOT, check=True) == [], "run `make notebooks`"
    readme = (ROOT / "README.md").read_text()
    assert notebook.colab_badge("notebooks/00_quickstart.ipynb") in readme

    # a copy of the checkout with another URL: both lines of a notebook and README's badge follow it
    (tmp_path / "notebooks").mkdir()
    src = NB_DIR / "00_quickstart.py"
    (tmp_path / "notebooks" / src.name).write_text(src.read_text())
    (tmp_path / "README.md").write_text(readme)
    pyproject = (ROOT / "pyproject.toml").read_text()
    url = notebook.repository_url()
    assert pyproject.count(url) == 1
    (tmp_path / "pyproject.toml").write_text(pyproject.replace(url, "https://github.com/someone/fork"))
    assert notebook.main(["--root", str(tmp_path), "--check"]) == 1
    assert notebook.main(["--root", str(tmp_path)]) == 0
    assert notebook.sync(tmp_path, check=True) == []
    text = (tmp_path / "notebooks" / src.name).read_text()
    assert url not in text and url not in (tmp_path / "README.md").read_text()
    assert "https://colab.research.google.com/github/someone/fork/blob/main/notebooks/00_quickstart.ipynb" in text
    assert 'MTTLITE_REQUIREMENT = "mttlite[colab] @ git+https://github.com/someone/fork.git"' in text
    with pytest.raises(ValueError, match="github.com"):
        notebook.colab_badge("notebooks/x.ipynb", url="https://gitlab.com/a/b")


def test_setup_cell_installs_only_where_mttlite_is_missing(monkeypatch, capsys):
    """Run the set-up cell itself: with mttlite importable it installs nothing; without, it pip-installs
    the requirement (and nothing else) into this interpreter. The device is printed and returned."""
    import importlib.util
    import subprocess
    import types

    import torch

    source = _setup_cell(jupytext.read(NB_DIR / "00_quickstart.py")).source
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append((a, k)))
    ns = {}
    exec(source, ns)
    assert calls == [] and ns["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert f"device: {ns['device']}" in capsys.readouterr().out

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "mttlite" else find_spec(n, *a))
    exec(source, {})
    assert calls == [(([sys.executable, "-m", "pip", "install", "-q", ns["MTTLITE_REQUIREMENT"]],), {"check": True})]

    # on Colab (a stand-in google.colab module): the custom widget manager is turned on
    enabled = []
    output = types.SimpleNamespace(enable_custom_widget_manager=lambda: enabled.append(True))
    colab = types.ModuleType("google.colab")
    colab.output = output
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    from mttlite.notebook import setup

    assert setup() == "cpu" and enabled == [True]
    assert "Change runtime type" in capsys.readouterr().out


# -- the notebooks, executed ------------------------------------------------------------------------------


def test_00_quickstart(kernel, buffer_root, tmp_path):
    r = execute("00_quickstart", tmp_path, kernel, buffer_root, iterations=20, syn_steps=10, max_start_epoch=2,
                eval_epochs=50, num_nets=2)
    assert r["iterations"] == 20
    assert r["loss_last"] < r["loss_first"]
    assert r["images_shape"] == [10, 1, 28, 28]
    assert r["pixels_changed"] > 0 and r["syn_lr"] > 0
    assert r["mtt_acc"] > 2 * CHANCE and r["random_acc"] > 2 * CHANCE
    assert all(a > 2 * CHANCE for a in r["expert_acc"])
    # the trajectory picture: the distilled student (images and α) ends nearer the target than the initial one
    before, after = r["plane_L"]["before: initial images, α0"], r["plane_L"]["after: distilled images, learned α"]
    assert 0 < after < before


def test_01_expert_trajectories(kernel, buffer_root, tmp_path):
    widget = tmp_path / "widget.json"  # the "dims" toggle (control 1) from 2-D to 3-D
    r = execute("01_expert_trajectories", tmp_path, kernel, buffer_root, extra=drive("panel", 1, 3, widget))
    w = json.loads(widget.read_text())
    assert (w["before"], w["after"]) == ("2", "3")
    assert len(w["shown"]) == 1 and w["shown"][0]["types"] == ["scatter3d"]  # redrawn, in 3-D
    assert r["traj_shape"] == [2, 4, r["num_params"]] and r["epochs"] == [0, 1, 2, 3]
    for accs in r["test_acc"]:
        assert len(accs) == 3 and accs[-1] > accs[0] > CHANCE
    ev = r["explained_variance"]
    assert all(a >= b for a, b in zip(ev, ev[1:])) and 0 < sum(ev) <= 1 + 1e-9
    assert all(s > 0 for s in r["step_norms"])
    assert r["share_sum"] == pytest.approx(1.0, abs=1e-5)


def test_02_unrolled_student(kernel, buffer_root, tmp_path):
    widget = tmp_path / "widget.json"  # the N slider (control 0) from 10 to 4
    r = execute("02_unrolled_student", tmp_path, kernel, buffer_root, start_epoch=1, syn_steps=10,
                distill_iterations=10, extra=drive("panel", 0, 4, widget))
    w = json.loads(widget.read_text())
    assert (w["before"], w["after"]) == ("10", "4")
    assert any("Student path: N = 4 steps" in f["title"] for f in w["shown"]), w["shown"]
    assert r["one_step_diff_library"] < 1e-6 and r["one_step_diff_sgd"] < 1e-5
    assert r["path_len"] == 11 and len(r["student_losses"]) == 10
    assert r["L_real"][0] == pytest.approx(1.0) and r["L_distilled"][0] == pytest.approx(1.0)
    assert r["L_real"][-1] < 1.0
    assert r["L_distilled"][-1] < r["L_real"][-1]  # the distilled images bring the student closer


def test_03_matching_loss(kernel, buffer_root, tmp_path):
    widget = tmp_path / "widget.json"  # the N slider (control 1) from 10 to 5: the curves and the breakdown
    widget_m = tmp_path / "widget_m.json"  # then M (control 0) to E, the whole buffer: t must come back to 0
    then_m = f"""
_shown_m = []
_go.Figure.show = lambda self, *a, **k: _shown_m.append(self.layout.title.text or "")
try:
    panel.children[0].children[0].value = E
finally:
    _go.Figure.show = _show
_Path({str(widget_m)!r}).write_text(_json.dumps({{"E": E, "t": t_slider.value, "t_max": t_slider.max, "shown": _shown_m}}))
"""
    r = execute("03_matching_loss", tmp_path, kernel, buffer_root, start_epoch=1, syn_steps=10,
                extra=drive("panel", 1, 5, widget) + then_m)
    w = json.loads(widget.read_text())
    assert (w["before"], w["after"]) == ("10", "5")
    titles = [f["title"] for f in w["shown"]]
    assert len(titles) == 2 and "(t = 1, M = 2, N = 5)" in titles[1], titles
    wm = json.loads(widget_m.read_text())
    assert wm["t"] == wm["t_max"] == 0 and wm["E"] > 2, wm  # t + M stays inside the buffer
    assert wm["shown"] and f"(t = 0, M = {wm['E']}, N = 5)" in wm["shown"][-1], wm["shown"]
    assert r["hand_vs_library"] < 1e-6
    assert r["contribution_sum"] == pytest.approx(r["L"], rel=1e-4)
    assert len(r["layers"]) == 14
    for curve in r["curves"].values():
        assert curve[0] == pytest.approx(1.0) and len(curve) == 11
    assert r["expert_D"][0] > r["expert_D"][-1] > 0  # experts slow down
    assert all(0 < v < 2 for v in r["normalised"])
    # the conv biases in front of an instance norm get no gradient: the panel names them, and only them
    assert r["still"] == ["features.0.bias", "features.4.bias", "features.8.bias"]


def test_04_learning_alpha_and_pixels(kernel, buffer_root, tmp_path):
    r = execute("04_learning_alpha_and_pixels", tmp_path, kernel, buffer_root, syn_steps=10, max_start_epoch=2,
                iterations=20, plot_every=5, snapshot_every=5, noise_iterations=10)
    assert r["iterations"] == 20 and r["callback_calls"] == 19  # the first iteration is run by hand
    # from noise, the images move towards their class's mean real image (noise starts orthogonal to it)
    assert r["noise_iterations"] == 10 and abs(r["noise_cos_start"]) < 0.1
    assert r["noise_cos_end"] > r["noise_cos_start"] + 0.1
    assert r["snapshots"] == [1, 5, 10, 15, 20]
    assert r["loss_last"] < r["loss_first"]
    assert r["syn_lr_last"] != r["syn_lr_first"] and r["pixels_changed"] > 0
    assert r["diverged"] and "lower" in r["message"] and "last good one" in r["message"]
    assert r["bad_state_finite"]
    # the live plot is ONE figure redrawn in place (clear_output(wait=True), then the new figure): the cell's
    # only display output is that figure, and it shows the LAST update (its title names the final iteration)
    nb = nbformat.read(tmp_path / "04_learning_alpha_and_pixels.out.ipynb", as_version=4)
    (cell,) = [c for c in nb.cells if "run(distiller, callbacks=[on_iteration]" in c.source]
    shown = [o for o in cell.outputs if o.output_type in ("display_data", "execute_result")]
    assert len(shown) == 1 and "application/vnd.plotly.v1+json" in shown[0].data, \
        [sorted(o.get("data", {})) for o in cell.outputs]
    fig = shown[0].data["application/vnd.plotly.v1+json"]
    assert fig["layout"]["title"]["text"] == "iteration 20 / 20"
    assert len(fig["data"][0]["x"]) == r["callback_calls"]


def test_05_evaluation(kernel, buffer_root, tmp_path):
    r = execute("05_evaluation", tmp_path, kernel, buffer_root, syn_steps=10, max_start_epoch=2, iterations=20,
                eval_epochs=50, num_nets=2, cross_archs=["mlp", "lenet"], cross_num_nets=1)
    assert r["confusion_total"] == 1000
    assert r["confusion_trace_acc"] == pytest.approx(r["one_net_acc"])
    assert sorted(r["cross"]) == ["convnet", "lenet", "mlp"]
    assert r["mtt_acc"] > 2 * CHANCE and all(v["mtt"] > CHANCE for v in r["cross"].values())
    assert r["lr_per_epoch"][1] == pytest.approx(0.1 * r["lr_per_epoch"][0])  # the decay at E/2
    assert r["lr_per_epoch"][0] == pytest.approx(r["syn_lr"])  # evaluation trains with the learned α


def test_06_long_vs_short_range(kernel, buffer_root, tmp_path):
    r = execute("06_long_vs_short_range", tmp_path, kernel, buffer_root, max_start_epoch=1, iterations=10,
                grid_syn_steps=[1, 10], grid_expert_epochs=[1, 2], eval_epochs=50, num_nets=1)
    assert [(g["syn_steps"], g["expert_epochs"]) for g in r["grid"]] == [(1, 1), (1, 2), (10, 1), (10, 2)]
    assert all(g["acc"] > 2 * CHANCE for g in r["grid"])
    assert r["one_step_formula_vs_library"] < 1e-4
    long = {(g["syn_steps"], g["expert_epochs"]): g for g in r["grid"]}
    assert long[(10, 1)]["loss_last"] < long[(10, 1)]["loss_first"]
    assert r["chooser_value"] == r["first_cell"] == [10, 1]  # the chooser starts on the cell it draws


def test_07_memory_and_speed(kernel, tmp_path):
    r = execute("07_memory_and_speed", tmp_path, kernel, None, width=16, ipc=2, syn_steps_list=[2, 8, 16],
                fused_width=4, fused_steps=2)
    assert r["rel_err_images"] < 1e-6 and r["rel_err_alpha"] < 1e-6
    # section 4: the fused step issues a fraction of the eager step's operations (it also checked, in the
    # notebook, that both give the same meta-gradient) and its compile was timed apart
    speed = r["speed"]
    assert 0 < speed["fused"]["ops"] < speed["eager"]["ops"] / 2, speed
    assert speed["fused"]["seconds"] > 0 and r["compile_seconds"] > 0
    rows = {(x["mode"], x["N"]): x for x in r["rows"]}
    assert len(rows) == 6
    # the unroll keeps every step's activations: its memory grows with N, the adjoint's hardly
    assert rows[("unroll", 16)]["mb"] > rows[("exact", 16)]["mb"] + 30
    assert r["slope_mb"]["unroll"] > 4 * max(r["slope_mb"]["exact"], 0.5)
    assert rows[("unroll", 16)]["loss"] == pytest.approx(rows[("exact", 16)]["loss"], rel=1e-5)


def test_08_reproduction_grid(kernel, buffer_root, tmp_path, monkeypatch):
    """notebooks/reproduce_grid.py runs 08_reproduction through papermill and assembles the table."""
    monkeypatch.syspath_prepend(str(NB_DIR))
    monkeypatch.chdir(tmp_path)
    import reproduce_grid

    out = tmp_path / "grid"
    args = ["--out", str(out), "--ipc", "1", "--iterations", "20", "--kernel", kernel,
            "-p", "buffer_root", buffer_root, "-p", "syn_steps", "10", "-p", "max_start_epoch", "2",
            "-p", "eval_epochs", "50", "-p", "num_nets", "2"]
    for k, v in EXPERTS.items():
        args += ["-p", k, str(v)]
    assert reproduce_grid.main(args) == 0
    run = out / "fashion-mnist-mini-ipc1-demo"
    r = json.loads((run / "results.json").read_text())
    assert r["config"]["syn_steps"] == 10 and r["config"]["iterations"] == 20 and r["iterations"] == 20
    assert r["experts"] == {**{k: r["experts"][k] for k in ("final_test_acc",)}, "num_experts": 2, "train_epochs": 3,
                            "width": 16}
    assert r["mtt"]["mean"] > 2 * CHANCE and r["random_real"]["mean"] > 2 * CHANCE
    assert r["loss_last_quarter"] < r["loss_first_quarter"]
    for f in ("synset.safetensors", "synset.png", "loss.html", "checkpoint.safetensors", "08_reproduction.ipynb"):
        assert (run / f).exists(), f
    table = (out / "results.md").read_text()
    row = [line for line in table.splitlines() if line.startswith("| fashion-mnist-mini |")]
    assert len(row) == 1 and f"{100 * r['mtt']['mean']:.1f} ± " in row[0]
    # a second call skips the finished configuration and rebuilds the same table
    assert reproduce_grid.main(args) == 0
    assert (out / "results.md").read_text() == table


def test_09_the_family(kernel, buffer_root, tmp_path):
    import numpy as np

    r = execute("09_the_family", tmp_path, kernel, buffer_root, syn_steps=10, max_start_epoch=2, iterations=8,
                eval_epochs=20, num_nets=2, check_steps=30)
    v = r["variants"]
    assert list(v) == ["mtt", "soft", "window", "auto", "ema", "all"]
    for name, x in v.items():
        assert x["iterations"] == 8 and len(x["loss"]) == len(x["t"]) == len(x["student_steps"]) == 8  # one budget
        for key in ("", "_hard") if x["labels"] == "soft" else ("",):
            accs = x[f"accs{key}"]
            assert len(accs) == 2 and all(0 <= a <= 1 for a in accs)
            assert x[f"acc{key}"] == pytest.approx(np.mean(accs)) and x[f"std{key}"] == pytest.approx(np.std(accs))
        soft = name in ("soft", "all")
        assert (x["labels"] == "soft") == soft and (x["acc_hard"] is not None) == soft  # both numbers for soft labels
        if soft:
            assert x["label_rows_sum"] == pytest.approx([1.0] * 10, abs=1e-5)
        auto = name in ("auto", "all")
        assert all(1 <= n <= 10 for n in x["student_steps"]) and (auto or set(x["student_steps"]) == {10.0})
    # the window: T− = 0, T_cur from T+ // 2 = 1 to T+ = 2 by iteration E = round(0.6 · 8) = 5 (DATM's formula),
    # the draws inside it
    w = r["window"]
    assert w["low"] == [0] * 8 and w["high"] == [min(2, 1 + (2 - 1) * i // 5) - 1 for i in range(8)] == [0] * 5 + [1] * 3
    for name in ("window", "all"):
        assert all(w["low"][i] <= t <= w["high"][i] for i, t in enumerate(v[name]["t"]))
    assert set(v["mtt"]["t"]) <= {0, 1} and v["mtt"]["switches"] == {}
    assert r["datm_window_high"] == [19, 29, 38, 39, 39]  # T_cur: 20, 30, 39, 40, 40 at iterations 0, 1500, 2999, …
    # the inline derivations agree with the library
    assert r["ema_closed_form_err"] < 1e-5 and r["ema_decay"] == round(0.999 ** (5000 / 8), 3)
    assert r["n_star_brute"] == r["n_star_library"] and len(r["n_star_curve"]) == r["check_steps"] == 30
    assert r["n_star_curve"][r["n_star_brute"] - 1] == pytest.approx(min(r["n_star_curve"]))
    assert r["chooser_value"] == r["chooser_start"] == "all"
    # the comparison: the chooser's first variant drawn statically (3 figures for "all": curves and accuracy,
    # images, label matrix), then the chooser over an Output that only a change writes into (headless, nothing
    # is written into it: see the cell's comment)
    nb = nbformat.read(tmp_path / "09_the_family.out.ipynb", as_version=4)
    (cell,) = [c for c in nb.cells if "display(widgets.VBox([chooser, comparison]))" in c.source]
    shown = [o for o in cell.outputs if o.output_type in ("display_data", "execute_result")]
    kinds = ["widget" if "application/vnd.jupyter.widget-view+json" in o.data else
             "plotly" if "application/vnd.plotly.v1+json" in o.data else "other" for o in shown]
    assert kinds == ["plotly"] * 3 + ["widget"], [sorted(o.get("data", {})) for o in cell.outputs]
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    assert all(m["state"].get("outputs", []) == [] for m in state.values() if m["model_name"] == "OutputModel")


def test_10_extensions(kernel, buffer_root, tmp_path):
    import math

    import numpy as np

    r = execute("10_extensions", tmp_path, kernel, buffer_root, syn_steps=10, max_start_epoch=2, iterations=8,
                texture_iterations=8, score_draws=4, noise_draws=2)
    P, names, sizes = r["num_params"], r["tensor_names"], r["tensor_sizes"]
    assert sizes == [math.prod(s) for s in r["tensor_shapes"]] and sum(sizes) == P
    # 1. the masks, counted by arithmetic: "depth" prunes the first ⌊0.5 P⌋ entries in layer order (whole tensors,
    # then a cut), "mismatch" ⌊0.1 P⌋ entries anywhere
    k, start = math.floor(0.5 * P), 0
    for name, size in zip(names, sizes):
        assert r["mask_counts"]["depth"][name] == {"masked": min(max(k - start, 0), size), "total": size}, name
        start += size
    mismatch = r["mask_counts"]["mismatch"]
    assert all(mismatch[n]["total"] == s and 0 <= mismatch[n]["masked"] <= s for n, s in zip(names, sizes))
    assert sum(c["masked"] for c in mismatch.values()) == math.floor(0.1 * P)
    assert 0.1 - 1e-6 <= r["share_pruned"] <= 1  # the largest 10 % of |d| hold at least 10 % of Σ d²
    # L_m by hand = the library's; its gradient is 0 on the pruned entries; the per-layer contributions sum to L
    assert set(r["L"]) == {"none", "mismatch", "depth"} and all(0 < v < 10 for v in r["L"].values())
    assert all(e < 1e-6 for e in r["hand_err"].values()) and all(g == 0 for g in r["grad_pruned_max"].values())
    for rule, total in r["contribution_sums"].items():
        assert total == pytest.approx(r["L"][rule], rel=1e-4)
    # the same budget for every run, finite losses, the rule each was asked for
    assert {n: x["prune_rule"] for n, x in r["runs"].items()} == {"MTT": None, "prune: mismatch": "mismatch",
                                                                   "prune: depth": "depth"}
    for x in r["runs"].values():
        assert x["iterations"] == 8 and len(x["loss"]) == 8 and np.isfinite(x["loss"]).all() and x["syn_lr"] > 0
    assert set(r["plain_scores"]) == {"initial", *r["runs"]} and all(0 < v < 10 for v in r["plain_scores"].values())
    # 2. every filter (the rows of the tensors with ≥ 2 dimensions) moved by ρ times its norm; by hand = library
    assert r["filters"] == sum(s[0] for s in r["tensor_shapes"] if len(s) >= 2)
    for rho in r["rhos"]:
        assert r["ratio_min"][str(rho)] == pytest.approx(rho, abs=1e-6 + 1e-5 * rho)
        assert r["ratio_max"][str(rho)] == pytest.approx(rho, abs=1e-6 + 1e-5 * rho)
        assert r["perturb_hand_vs_library"][str(rho)] < 1e-6
    cos = {float(k): v for k, v in r["cosines"].items()}
    assert cos[0.0] == [1.0] and r["cos_self"] == pytest.approx(1.0, abs=1e-5)
    assert all(len(v) == 2 and all(-1 - 1e-6 <= c <= 1 + 1e-6 for c in v) for rho, v in cos.items() if rho > 0)
    assert np.mean(cos[0.01]) > np.mean(cos[0.3])  # a larger step turns the meta-gradient further
    assert all(np.isfinite(v).all() for v in r["rho_loss"].values()) and len(r["cos_other_plans"]) == 2
    assert r["slider_value"] == r["slider_start"] == max(r["rhos"])
    # 3. the texture set: the canvas asked for (2 × 28), the roll identity, the crop = the modular gather
    tex = r["texture"]
    assert tex["asked"] == 56 and tex["record"] == {"canvas": [56, 56], "input": [28, 28]}
    assert tex["images_shape"] == [10, 1, 56, 56]
    assert tex["iterations"] == 8 and len(tex["loss"]) == 8 and np.isfinite(tex["loss"]).all()
    assert tex["roll_identity"] is True and tex["crop_hand_err"] == 0
    # the exercises' answers: the share of offsets whose 28 × 28 crop wraps, 1 − (56 − 28 + 1)² / 56², and
    # ‖θ̃ − θ‖ = ρ ‖θ restricted to the tensors with ≥ 2 dimensions‖
    assert r["exercise_2"]["expected"] == pytest.approx(1 - (56 - 28 + 1) ** 2 / 56**2)
    assert r["exercise_1"]["expected"] == pytest.approx(r["exercise_1"]["by_filter_norms"], rel=1e-5)
    # the ρ slider: the figure drawn statically, then the slider over an Output that only a change writes into
    nb = nbformat.read(tmp_path / "10_extensions.out.ipynb", as_version=4)
    (cell,) = [c for c in nb.cells if "display(widgets.VBox([rho_slider, gradient_view]))" in c.source]
    shown = [o for o in cell.outputs if o.output_type in ("display_data", "execute_result")]
    kinds = ["widget" if "application/vnd.jupyter.widget-view+json" in o.data else
             "plotly" if "application/vnd.plotly.v1+json" in o.data else "other" for o in shown]
    assert kinds == ["plotly", "widget"], [sorted(o.get("data", {})) for o in cell.outputs]
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    assert all(m["state"].get("outputs", []) == [] for m in state.values() if m["model_name"] == "OutputModel")
