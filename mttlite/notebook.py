"""What the notebooks share: the device, Colab, and the "Open in Colab" badges.

The repository's URL is set in ONE place, ``[project.urls] Repository`` in ``pyproject.toml``.
Two lines of every notebook are written from it, because they must work before mttlite is
installed: the badge at the top of the first cell and ``MTTLITE_REQUIREMENT`` in the set-up cell
(what Colab ``pip install``-s). ``make notebooks`` rewrites them (``python -m mttlite.notebook``,
which also rewrites the badge in ``README.md``), and ``tests/test_notebooks.py`` fails when one of
them no longer matches the setting. So moving the repository is: edit ``pyproject.toml``, run
``make notebooks``.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

BRANCH = "main"  # the branch Colab opens the notebooks from
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
_ROOT = Path(__file__).resolve().parents[1]  # the checkout (pyproject.toml, notebooks/, README.md)
_BADGE_LINE = re.compile(r"^(# )?\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)$", re.M)
_REQUIREMENT_LINE = re.compile(r'^MTTLITE_REQUIREMENT = ".*"$', re.M)


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
    """What Colab installs: the package alone, no ``[notebooks]`` extra (Colab has plotly and ipywidgets)."""
    return f"mttlite @ git+https://github.com/{_github(url or repository_url())}.git"


# -- in the notebook ------------------------------------------------------------------------------


def on_colab() -> bool:
    return "google.colab" in sys.modules


def setup() -> str:
    """Pick the device, say which, and prepare the front end; returns ``"cuda"`` or ``"cpu"``.

    The device is ``"cuda" if torch.cuda.is_available() else "cpu"``. On Colab this turns on its
    custom widget manager (ipywidgets, tqdm's progress bars); elsewhere plotly figures embed
    plotly.js, so they render in JupyterLab, in nbconvert's HTML and offline.
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

            pio.renderers.default = "plotly_mimetype+notebook"
        except ImportError:
            pass
    if device == "cuda":
        print(f"device: cuda ({torch.cuda.get_device_name()}), torch {torch.__version__}")
    else:
        hint = " (no GPU: Runtime > Change runtime type > T4 GPU)" if on_colab() else ""
        print(f"device: cpu{hint}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    return device


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
