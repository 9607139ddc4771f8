"""What the notebooks share: the device, Colab, the expert cache, the profile (sizes), the live widget panel, and the "Open in Colab" badges.

The repository's URL is set in ONE place, ``[project.urls] Repository`` in ``pyproject.toml``.
Two lines of every notebook are written from it, because they must work before mttlite is
installed: the badge at the top of the first cell and ``MTTLITE_REQUIREMENT`` in the set-up cell
(what Colab ``pip install``-s). ``make notebooks`` rewrites them (``python -m mttlite.notebook``,
which also rewrites the badge in ``README.md``), and ``tests/test_notebooks.py`` fails when one of
them no longer matches the setting. So moving the repository is: edit ``pyproject.toml``, run
``make notebooks``.

Colab installs ``mttlite[colab]``: the package and the light ``colab`` extra (plotly, ipywidgets,
tqdm), not the ``notebooks`` extra (JupyterLab, papermill, jupytext are of no use there).

The expert cache. Every notebook keeps its expert buffers under ``buffer_root``, by default
``runs/notebooks/buffers`` (``BUFFER_ROOT``) in its working directory, which a Colab session
forgets. ``setup(expert_cache=PATH)``, or the environment variable ``MTTLITE_EXPERT_CACHE=PATH``,
makes that folder a link to PATH, e.g. a folder on Google Drive; on Colab, a PATH under
``/content/drive`` mounts Drive first (Colab asks for permission). Nothing touches Drive at import.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

BRANCH = "main"  # the branch Colab opens the notebooks from
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
_ROOT = Path(__file__).resolve().parents[1]  # the checkout (pyproject.toml, notebooks/, README.md)
_BADGE_LINE = re.compile(r"^(# )?\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)$", re.M)
_REQUIREMENT_LINE = re.compile(r'^MTTLITE_REQUIREMENT = ".*"$', re.M)
#: The extra Colab installs (pyproject.toml's [project.optional-dependencies] colab).
COLAB_EXTRA = "colab"
#: The notebooks' default ``buffer_root`` (relative to their working directory): the expert cache.
BUFFER_ROOT = "runs/notebooks/buffers"
#: The environment variable naming a folder to keep the expert cache in (e.g. on Google Drive).
EXPERT_CACHE_ENV = "MTTLITE_EXPERT_CACHE"
#: The environment variable that makes figures embed plotly.js (``plotly_renderer``).
PLOTLY_OFFLINE_ENV = "MTTLITE_PLOTLY_OFFLINE"
#: Where Colab mounts Google Drive.
DRIVE_MOUNT = "/content/drive"


# -- the setting ----------------------------------------------------------------------------------


def repository_url(pyproject: str | Path | None = None) -> str:
    """``[project.urls] Repository`` from pyproject.toml (a checkout), else from the installed metadata."""
    path = Path(pyproject) if pyproject is not None else _ROOT / "pyproject.toml"
    if path.is_file():
        section = re.search(r"^\[project\.urls\]\n(.*?)(?=^\[|\Z)", path.read_text(), re.M | re.S)
        url = section and re.search(r'^Repository\s*=\s*"([^"]+)"', section.group(1), re.M)
        if not url:
            raise ValueError(f'{path} has no `Repository = "..."` under [project.urls]')
        return url.group(1).rstrip("/")
    from importlib.metadata import metadata

    for entry in metadata("mttlite").get_all("Project-URL") or []:
        label, _, url = entry.partition(",")
        if label.strip().lower() == "repository":
            return url.strip().rstrip("/")
    raise LookupError("mttlite's metadata has no Repository URL")


def _github(url: str) -> str:
    """``https://github.com/OWNER/NAME`` -> ``OWNER/NAME`` (Colab opens notebooks from GitHub only)."""
    m = re.fullmatch(r"https://github\.com/([^/]+/[^/]+?)(\.git)?", url)
    if not m:
        raise ValueError(f"the repository URL must be https://github.com/OWNER/NAME for Colab, got {url!r}")
    return m.group(1)


def colab_url(path: str, url: str | None = None, branch: str = BRANCH) -> str:
    """Colab's address of the notebook at ``path`` (relative to the repository's root)."""
    return f"https://colab.research.google.com/github/{_github(url or repository_url())}/blob/{branch}/{path}"


def colab_badge(path: str, url: str | None = None) -> str:
    """The markdown "Open in Colab" badge for the notebook at ``path`` (relative to the repository's root)."""
    return f"[![Open In Colab]({BADGE_IMAGE})]({colab_url(path, url)})"


def pip_requirement(url: str | None = None) -> str:
    """What Colab installs: the package with the light ``[colab]`` extra (plotly, ipywidgets, tqdm), not
    ``[notebooks]`` (JupyterLab, papermill and jupytext are not needed on Colab)."""
    return f"mttlite[{COLAB_EXTRA}] @ git+https://github.com/{_github(url or repository_url())}.git"


# -- in the notebook ------------------------------------------------------------------------------


def on_colab() -> bool:
    return "google.colab" in sys.modules


def expert_cache_dir(expert_cache: str | os.PathLike | None = None) -> Path | None:
    """The folder to keep expert buffers in: ``expert_cache``, else ``$MTTLITE_EXPERT_CACHE``, else None
    (the notebooks' own ``runs/notebooks/buffers``). ``~`` is expanded."""
    value = expert_cache if expert_cache is not None else os.environ.get(EXPERT_CACHE_ENV) or None
    return None if value is None else Path(value).expanduser()


def needs_drive(path: str | os.PathLike) -> bool:
    """Whether ``path`` lies on Google Drive as Colab mounts it (under ``/content/drive``)."""
    parts, mount = Path(path).absolute().parts, Path(DRIVE_MOUNT).parts
    return parts[: len(mount)] == mount


def mount_drive() -> None:
    """Mount Google Drive at ``/content/drive`` (Colab asks the user for permission), unless it is mounted."""
    if not (Path(DRIVE_MOUNT) / "MyDrive").is_dir():
        from google.colab import drive

        drive.mount(DRIVE_MOUNT)


def link_expert_cache(target: str | os.PathLike, link: str | os.PathLike = BUFFER_ROOT) -> Path:
    """Make ``link`` (the notebooks' ``buffer_root``, relative to the working directory) a symbolic link
    to the folder ``target`` (created if missing), so experts trained there outlive the session.

    An existing link is re-pointed and an empty folder replaced; a folder that already holds files is
    left alone (ValueError: move its contents to ``target`` first, or remove it). Returns ``link``."""
    target, link = Path(target).expanduser().absolute(), Path(link)
    target.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        if link.resolve() == target.resolve():
            return link
        link.unlink()
    elif link.is_dir():
        if any(link.iterdir()):
            raise ValueError(f"expert cache: {link} already holds files; move them to {target} (or remove them) "
                             f"to keep the experts there")
        link.rmdir()
    elif link.exists():
        raise ValueError(f"expert cache: {link} is a file, not a folder; remove it")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target, target_is_directory=True)
    return link


def plotly_renderer(offline: bool | None = None) -> str:
    """The plotly renderer the notebooks use outside Colab (``setup`` sets it as the default).

    Every figure is published twice: as plotly's own MIME type, which JupyterLab and Jupyter
    Notebook draw with the plotly extension (shipped in the ``plotly`` package, no network), and as
    HTML for everything else (nbconvert's HTML, VS Code, GitHub-like viewers that run scripts).
    That HTML loads plotly.js from its CDN (``notebook_connected``: an executed notebook stays a few
    hundred KB) unless ``offline`` -- default: the environment variable ``MTTLITE_PLOTLY_OFFLINE=1``
    -- embeds plotly.js once per notebook (``notebook``: about 4.6 MiB more, renders with no network).
    """
    if offline is None:
        offline = os.environ.get(PLOTLY_OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes")
    return "plotly_mimetype+notebook" if offline else "plotly_mimetype+notebook_connected"


def setup(expert_cache: str | os.PathLike | None = None) -> str:
    """Pick the device, say which, and prepare the front end; returns ``"cuda"`` or ``"cpu"``.

    The device is ``"cuda" if torch.cuda.is_available() else "cpu"``. On Colab this turns on its
    custom widget manager (ipywidgets, tqdm's progress bars); elsewhere plotly's default renderer
    becomes ``plotly_renderer()``: figures render in JupyterLab offline, and exported HTML loads
    plotly.js from its CDN (``MTTLITE_PLOTLY_OFFLINE=1`` embeds it instead).

    expert_cache: a folder to keep the expert buffers in (default ``$MTTLITE_EXPERT_CACHE``; none: the
    notebooks' ``runs/notebooks/buffers``), e.g. ``"/content/drive/MyDrive/mttlite/buffers"``: on Colab
    Drive is mounted first, then ``runs/notebooks/buffers`` becomes a link to it (``link_expert_cache``).
    """
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if on_colab():
        try:
            from google.colab import output

            output.enable_custom_widget_manager()
        except ImportError:
            pass
    else:
        try:
            import plotly.io as pio

            pio.renderers.default = plotly_renderer()
        except ImportError:
            pass
    cache = expert_cache_dir(expert_cache)
    if cache is not None:
        if on_colab() and needs_drive(cache):
            mount_drive()
        print(f"expert cache: {link_expert_cache(cache)} -> {cache}")
    if device == "cuda":
        print(f"device: cuda ({torch.cuda.get_device_name()}), torch {torch.__version__}")
    else:
        hint = " (no GPU: Runtime > Change runtime type > T4 GPU)" if on_colab() else ""
        print(f"device: cpu{hint}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    return device


#: The sizes a notebook can run at (its ``profile`` parameter):
#:   "teaching": the parameters cell as written (GPU-sized: width 128, 5 experts × 10 epochs), papermill's
#:               ``-p`` values included: pass ``-p profile teaching`` with sizes of your own;
#:   "cpu":      the classroom CPU profile, each notebook's own smaller sizes (width 32, 3 experts × 6 epochs,
#:               fewer iterations), meant to finish in ≤ 5 min on 2 CPU cores from a cold start;
#:   "ci":       the test sizes (width 16, 2 experts × 3 epochs), as ``make test`` runs them;
#:   "auto":     "ci" under ``MTTLITE_CI=1``, else "teaching" on a GPU and "cpu" without one.
PROFILES = ("auto", "teaching", "cpu", "ci")
#: The environment variable that puts every notebook at CI size (``make test``, nbval).
CI_ENV = "MTTLITE_CI"


def choose_profile(profile: str = "auto", device: str = "cpu", quiet: bool = False) -> str:
    """The profile a notebook runs at (``PROFILES``): ``profile`` itself unless it is "auto"; says which, and why."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {', '.join(map(repr, PROFILES))}, got {profile!r}")
    why = "chosen"
    if profile == "auto":
        if os.environ.get(CI_ENV) == "1":
            profile, why = "ci", f"auto: {CI_ENV}=1"
        else:
            profile, why = ("teaching", "auto: a GPU") if str(device).startswith("cuda") else ("cpu", "auto: no GPU")
    if not quiet:
        sizes = {"teaching": "the sizes of the parameters cell", "cpu": "the classroom CPU sizes (≤ 5 min on 2 cores)",
                 "ci": "the CI sizes"}[profile]
        print(f"profile: {profile} ({why}): {sizes}; set `profile` in the parameters cell to change it")
    return profile


def live(draw, **controls):
    """A widget panel: ``draw(**values)`` re-runs whenever one of the ``controls`` (ipywidgets) changes.

    Returns ``VBox([HBox(controls), note, Output])``: the controls in the order given, a one-line note,
    and the output area the figure is redrawn in (cleared first). The notebooks draw each figure once
    statically above the panel (what papermill, nbval and HTML exports show); the panel redraws it live.
    """
    import ipywidgets as widgets

    out = widgets.Output()

    def redraw(_change=None):
        with out:
            out.clear_output(wait=True)
            draw(**{name: c.value for name, c in controls.items()})

    for c in controls.values():
        c.observe(redraw, names="value")
    note = widgets.HTML("<i>Move a control to redraw; the static figure above uses the notebook's parameters.</i>")
    return widgets.VBox([widgets.HBox(list(controls.values())), note, out])


# -- make notebooks -------------------------------------------------------------------------------


def notebook_sources(root: Path = _ROOT) -> list[Path]:
    return sorted((root / "notebooks").glob("[0-9][0-9]_*.py"))


def _with_badge(text: str, badge: str, where: Path) -> str:
    """text with its badge line (markdown, or a markdown cell's ``# ...`` line) replaced by ``badge``."""
    if not _BADGE_LINE.search(text):
        raise ValueError(f"{where}: no badge line `[![Open In Colab](...)](...)` to update; add one")
    return _BADGE_LINE.sub(lambda m: (m.group(1) or "") + badge, text, count=1)


def synced(path: Path, root: Path = _ROOT, url: str | None = None) -> str:
    """The text ``path`` (a notebook source or README.md) should have: badge and requirement from the setting."""
    url = url or repository_url(root / "pyproject.toml")
    text = path.read_text()
    if path.name == "README.md":
        return _with_badge(text, colab_badge("notebooks/00_quickstart.ipynb", url), path)
    rel = path.with_suffix(".ipynb").relative_to(root).as_posix()
    text = _with_badge(text, colab_badge(rel, url), path)
    if not _REQUIREMENT_LINE.search(text):
        raise ValueError(f"{path}: no line `MTTLITE_REQUIREMENT = \"...\"` (the set-up cell)")
    return _REQUIREMENT_LINE.sub(lambda _: f'MTTLITE_REQUIREMENT = "{pip_requirement(url)}"', text, count=1)


def sync(root: Path = _ROOT, check: bool = False) -> list[Path]:
    """Rewrite (or with ``check``, only list) the notebook sources and README.md that differ from the setting."""
    changed = []
    for path in [*notebook_sources(root), root / "README.md"]:
        text = synced(path, root)
        if text != path.read_text():
            changed.append(path)
            if not check:
                path.write_text(text)
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mttlite.notebook", description=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=_ROOT, help="the repository's checkout (default: %(default)s)")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file is out of date")
    args = ap.parse_args(argv)
    changed = sync(args.root, check=args.check)
    for path in changed:
        print(f"{'out of date' if args.check else 'updated'}: {path.relative_to(args.root)}")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
