"""Atomic, pickle-free file I/O shared by buffers, synthetic sets and checkpoints.

Every artefact is one safetensors file: tensors, plus a JSON document under the metadata key
``"mttlite"`` that carries a format tag (``"mttlite-synset/1"`` …). Files are written to a
temporary name in the same directory and moved into place with ``os.replace``, so a crash never
leaves a half-written file under the real name.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

META_KEY = "mttlite"


def atomic_write(path: str | os.PathLike, write, exclusive: bool = False) -> Path | None:
    """Call ``write(tmp_path)`` then atomically rename the temporary file to ``path``.

    With ``exclusive=True`` the file is only created if absent (``os.link`` fails atomically when
    it exists, so concurrent writers, e.g. torchrun ranks, never clobber each other); returns
    None when somebody else was first, else ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        if not exclusive:
            os.replace(tmp, path)
            return path
        try:
            os.link(tmp, path)  # atomic create-if-absent
        except FileExistsError:
            return None
        except OSError:  # file systems without hard links: fall back to replace (same content anyway)
            if path.exists():
                return None
            os.replace(tmp, path)
        return path
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_tensors(path: str | os.PathLike, tensors: dict[str, Tensor], fmt: str, meta: dict) -> Path:
    """Write ``tensors`` and the JSON ``meta`` (tagged with ``fmt``) to one safetensors file, atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    header = {META_KEY: json.dumps({"format": fmt, **meta})}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def load_tensors(path: str | os.PathLike, fmt: str, what: str, device="cpu") -> tuple[dict[str, Tensor], dict]:
    """Read a file written by :func:`save_tensors`; clear errors for missing, truncated or foreign files.

    ``fmt`` is the expected format tag without version (``"mttlite-synset"``); ``what`` names the
    artefact in error messages.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable {what} (truncated or not a safetensors file): {e}") from e
    meta = _parse_meta(header, path, fmt, what)
    return tensors, meta


def _parse_meta(header: dict, path: Path, fmt: str, what: str) -> dict:
    if META_KEY not in header:
        raise ValueError(f"{path} is a safetensors file but not a mttlite {what} (no '{META_KEY}' metadata)")
    meta = json.loads(header[META_KEY])
    tag = str(meta.get("format", ""))
    if not tag.startswith(fmt + "/"):
        raise ValueError(f"{path} holds a {tag or 'unknown'} file, expected a {what} ({fmt}/…)")
    if tag != f"{fmt}/1":
        raise ValueError(f"{path} is {tag}, which this mttlite version cannot read (it reads {fmt}/1)")
    return meta


def generator_state(g: torch.Generator) -> Tensor:
    """A generator's state as a uint8 tensor (safetensors-ready)."""
    return g.get_state().clone()
