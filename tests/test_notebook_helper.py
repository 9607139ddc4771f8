"""``mttlite.notebook`` on Colab, without Colab: the light ``colab`` extra and the requirement the set-up
cell installs, the expert cache (a folder, e.g. on Google Drive, linked where the notebooks keep their
experts) and ``setup()`` with a stand-in ``google.colab`` (``on_colab`` monkeypatched)."""
from __future__ import annotations

import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from mttlite import notebook

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
Requirement = pytest.importorskip("packaging.requirements").Requirement


def extras() -> dict[str, dict[str, Requirement]]:
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {name: {Requirement(r).name: Requirement(r) for r in reqs}
            for name, reqs in doc["project"]["optional-dependencies"].items()}


def test_colab_installs_the_light_extra():
    colab = extras()["colab"]
    assert sorted(colab) == ["ipywidgets", "plotly", "tqdm"]  # no jupyterlab, papermill, jupytext
    notebooks = extras()["notebooks"]
    for name in ("plotly", "ipywidgets"):  # the versions the notebooks are tested with
        assert colab[name].specifier == notebooks[name].specifier
    req = Requirement(notebook.pip_requirement("https://github.com/someone/fork"))
    assert (req.name, req.extras, req.url) == ("mttlite", {"colab"}, "git+https://github.com/someone/fork.git")


def test_expert_cache_dir_argument_then_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(notebook.EXPERT_CACHE_ENV, raising=False)
    assert notebook.expert_cache_dir() is None
    monkeypatch.setenv(notebook.EXPERT_CACHE_ENV, "")
    assert notebook.expert_cache_dir() is None
    monkeypatch.setenv(notebook.EXPERT_CACHE_ENV, str(tmp_path / "env"))
    assert notebook.expert_cache_dir() == tmp_path / "env"
    assert notebook.expert_cache_dir(tmp_path / "arg") == tmp_path / "arg"  # the argument wins
    monkeypatch.setenv("HOME", str(tmp_path))
    assert notebook.expert_cache_dir("~/cache") == tmp_path / "cache"


def test_needs_drive():
    assert notebook.needs_drive("/content/drive/MyDrive/mttlite")
    assert not notebook.needs_drive("/content/drive2/x") and not notebook.needs_drive("/content/runs")


def test_link_expert_cache(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    link = Path(notebook.BUFFER_ROOT)
    a, b = tmp_path / "drive" / "a", tmp_path / "drive" / "b"
    assert notebook.link_expert_cache(a) == link and link.is_symlink() and a.is_dir()
    (link / "expert.safetensors").write_text("x")  # written through the link: lands in the cache
    assert (a / "expert.safetensors").read_text() == "x"
    assert notebook.link_expert_cache(a) == link and link.resolve() == a.resolve()  # again: unchanged
    notebook.link_expert_cache(b)  # re-pointed
    assert link.resolve() == b.resolve() and (a / "expert.safetensors").exists()
    link.unlink()
    link.mkdir()
    notebook.link_expert_cache(a)  # an empty folder is replaced
    assert link.resolve() == a.resolve()
    link.unlink()
    link.mkdir()
    (link / "expert.safetensors").write_text("local")
    with pytest.raises(ValueError, match="already holds files; move them to"):
        notebook.link_expert_cache(b)
    assert not link.is_symlink() and (link / "expert.safetensors").read_text() == "local"  # left alone
    other = tmp_path / "file"
    other.write_text("")
    with pytest.raises(ValueError, match="is a file"):
        notebook.link_expert_cache(a, link=other)


@pytest.fixture
def colab(monkeypatch, tmp_path):
    """A stand-in google.colab (output, drive) and Drive mounted under tmp_path; records the calls."""
    import torch

    calls = []
    mount_point = tmp_path / "content" / "drive"

    def mount(path):
        calls.append(("mount", path))
        (Path(path) / "MyDrive").mkdir(parents=True)

    output = types.SimpleNamespace(enable_custom_widget_manager=lambda: calls.append(("widgets",)))
    module = types.ModuleType("google.colab")
    module.output, module.drive = output, types.SimpleNamespace(mount=mount)
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", module)
    monkeypatch.setattr(notebook, "on_colab", lambda: True)
    monkeypatch.setattr(notebook, "DRIVE_MOUNT", str(mount_point))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(notebook.EXPERT_CACHE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    return types.SimpleNamespace(calls=calls, drive=mount_point)


def test_setup_on_colab_mounts_drive_for_a_drive_cache(colab, capsys):
    cache = colab.drive / "MyDrive" / "mttlite" / "buffers"
    assert notebook.setup(expert_cache=cache) == "cpu"
    assert colab.calls == [("widgets",), ("mount", str(colab.drive))]
    assert Path(notebook.BUFFER_ROOT).resolve() == cache.resolve()
    out = capsys.readouterr().out
    assert f"expert cache: {notebook.BUFFER_ROOT} -> {cache}" in out and "Change runtime type" in out
    colab.calls.clear()
    notebook.setup(expert_cache=cache)  # Drive is mounted now: not again
    assert colab.calls == [("widgets",)]


def test_setup_takes_the_cache_from_the_environment(colab, monkeypatch, tmp_path):
    monkeypatch.setenv(notebook.EXPERT_CACHE_ENV, str(tmp_path / "local-cache"))  # not on Drive: no mount
    notebook.setup()
    assert colab.calls == [("widgets",)]
    assert Path(notebook.BUFFER_ROOT).resolve() == (tmp_path / "local-cache").resolve()


def test_setup_without_a_cache_links_nothing(colab, tmp_path):
    notebook.setup()
    assert colab.calls == [("widgets",)] and not (tmp_path / "runs").exists()


def test_import_touches_neither_colab_nor_drive(tmp_path):
    code = "import sys, mttlite.notebook; print(sorted(m for m in sys.modules if m.startswith('google')))"
    env = {"PATH": "", "MTTLITE_EXPERT_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]" and sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py")), ids=lambda p: p.stem)
def test_notebooks_keep_their_experts_where_the_cache_is_linked(path):
    roots = re.findall(r'^buffer_root = "([^"]*)"', path.read_text(), re.M)
    if not roots:
        pytest.skip(f"{path.stem} trains no shared experts")
    assert roots[0] == notebook.BUFFER_ROOT  # the parameters cell's default


def test_choose_profile_auto_follows_ci_then_the_device(monkeypatch, capsys):
    monkeypatch.delenv(notebook.CI_ENV, raising=False)
    assert notebook.choose_profile("auto", "cpu") == "cpu"
    assert "auto: no GPU" in capsys.readouterr().out
    assert notebook.choose_profile("auto", "cuda") == "teaching"
    assert notebook.choose_profile("auto", "cuda:1", quiet=True) == "teaching"
    monkeypatch.setenv(notebook.CI_ENV, "1")
    assert notebook.choose_profile("auto", "cuda") == "ci"  # the test sizes win, even on a GPU
    # an explicit profile is taken as given (papermill's -p profile teaching with its own sizes)
    for p in ("teaching", "cpu", "ci"):
        assert notebook.choose_profile(p, "cpu", quiet=True) == p
    with pytest.raises(ValueError, match="profile must be one of"):
        notebook.choose_profile("gpu")


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py")), ids=lambda p: p.stem)
def test_every_notebook_has_a_profile_parameter_and_a_cpu_profile(path):
    """The parameters cell offers ``profile`` ("auto"), the next cell resolves it, and a CPU profile exists."""
    text = path.read_text()
    params = text.split('# %% tags=["parameters"]', 1)[1].split("# %%", 1)[0]
    assert re.search(r'^profile = "auto"', params, re.M), "no `profile = \"auto\"` in the parameters cell"
    assert "profile = choose_profile(profile, device)" in text
    assert 'if profile == "cpu":' in text and 'profile == "ci"' in text
    assert 'os.environ.get("MTTLITE_CI")' not in text  # the profile, not the variable, decides


def test_live_redraws_with_every_control_value():
    """``live``: a change of any control calls draw with ALL the controls' current values, in its output area."""
    widgets = pytest.importorskip("ipywidgets")
    calls = []
    n = widgets.IntSlider(value=10, min=1, max=20)
    alpha = widgets.FloatSlider(value=0.01, min=0.0, max=1.0)
    panel = notebook.live(lambda n, alpha: calls.append((n, alpha)), n=n, alpha=alpha)
    controls, note, out = panel.children
    assert list(controls.children) == [n, alpha] and isinstance(out, widgets.Output)
    assert calls == []  # nothing drawn until a control moves (the static figure is the notebook's)
    n.value = 5
    alpha.value = 0.5
    n.value = 5  # no change, no redraw
    assert calls == [(5, 0.01), (5, 0.5)]


@pytest.mark.parametrize("offline", ["", "1"])
def test_setup_off_colab_chooses_where_plotly_js_comes_from(monkeypatch, tmp_path, offline):
    """Off Colab every figure carries plotly's MIME type (JupyterLab draws it with no network) plus HTML
    that loads plotly.js from the CDN, a few KB, or with MTTLITE_PLOTLY_OFFLINE=1 embeds it (MBs)."""
    pio = pytest.importorskip("plotly.io")
    import plotly.graph_objects as go

    monkeypatch.setattr(notebook, "on_colab", lambda: False)
    monkeypatch.setenv(notebook.PLOTLY_OFFLINE_ENV, offline)
    monkeypatch.delenv(notebook.EXPERT_CACHE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pio.renderers, "default", pio.renderers.default)  # restored after the test
    notebook.setup()
    bundle = go.Figure(go.Scatter(y=[1, 3, 2]))._repr_mimebundle_()
    assert "application/vnd.plotly.v1+json" in bundle
    html = bundle["text/html"]  # (the embedding renderer publishes plotly.js itself once, on activation)
    if offline:
        assert pio.renderers.default == "plotly_mimetype+notebook"
        assert "cdn.plot.ly" not in html
    else:
        assert pio.renderers.default == "plotly_mimetype+notebook_connected"
        assert len(html) < 50_000 and "cdn.plot.ly" in html
