"""Atomic, pickle-free file I/O shared by buffers, synthetic sets and checkpoints.

Every artefact is one safetensors file: tensors, plus a JSON document under the metadata key
``"mttlite"`` that carries a format tag (``"mttlite-synset/1"`` …) and the sha256 of the tensor data
(``tensors_digest``, checked at load: a flipped byte is an error naming the file, not a silently
different run). Files are written to a temporary name in the same directory and moved into place
with ``os.replace``, so a crash never leaves a half-written file under the real name; a temporary
file left by a process that was killed is removed by the next write to that directory. Files get
the permissions ``open()`` would give them (0666 minus the umask), not ``mkstemp``'s 0600.

``check_writable_dir`` / ``check_writable_file`` check an output path before any work, and
``RunLock`` keeps a second process from writing into the same run directory or buffer.
"""
from __future__ import annotations

import errno
import shutil
import hashlib
import json
import os
import socket
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

META_KEY = "mttlite"
_TMP_SUFFIX = ".tmp"


# -- output paths, checked before any work ---------------------------------------------------------
def _check_creatable(path: str | os.PathLike, what: str, under: str, cannot: str) -> None:
    """Raise ValueError unless something can be created at ``path``: its nearest existing ancestor
    must be a writable directory. ``under`` / ``cannot`` finish the two messages."""
    p = Path(path)
    anc = p.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if anc.exists() and not anc.is_dir():
        raise ValueError(f"{what} {path}: {anc} is a file, so {under}")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: {cannot.format(anc=anc)} is not writable (read-only or no permission)")


def check_writable_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """Raise ValueError unless ``path`` is a writable directory or can be created as one.

    ``what`` names the setting in the message (``--out``, ``--imagefolder``)."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise ValueError(f"{what} {path}: this is a file, not a directory; choose a directory")
        if not os.access(p, os.W_OK | os.X_OK):
            raise ValueError(f"{what} {path}: the directory is not writable (read-only or no permission)")
        return p
    _check_creatable(p, what, "no directory can be created under it", "cannot create it, {anc}")
    return p


def check_writable_file(path: str | os.PathLike, what: str) -> Path:
    """Raise ValueError unless a file can be written (atomically, so next to it) at ``path``."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{what} {path}: this is a directory; give a file name")
    _check_creatable(p, what, "nothing can be written under it", "{anc}")
    return p


# -- atomic writes -------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tmp_prefix(name: str) -> str:
    """``.<name>.<host>.<pid>.``: whose temporary file it is, so a dead writer's can be recognised."""
    host = socket.gethostname().replace(".", "_") or "host"
    return f".{name}.{host}.{os.getpid()}."


def remove_stale_tmp(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that writers on this host left behind when they were killed
    (``.<name>.<host>.<pid>.<random>.tmp`` whose process no longer exists). Returns what was removed."""
    directory, host, removed = Path(directory), socket.gethostname().replace(".", "_") or "host", []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        n = entry.name
        if not (n.startswith(".") and n.endswith(_TMP_SUFFIX)):
            continue
        parts = n[: -len(_TMP_SUFFIX)].split(".")
        # ["", name parts..., host, pid, random]
        if len(parts) < 5 or parts[-3] != host or not parts[-2].isdigit():
            continue
        pid = int(parts[-2])
        if pid == os.getpid() or _alive(pid):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's process
        return True
    return True


def atomic_write(path: str | os.PathLike, write, exclusive: bool = False) -> Path | None:
    """Call ``write(tmp_path)`` then atomically rename the temporary file to ``path``.

    With ``exclusive=True`` the file is only created if absent (``os.link`` fails atomically when
    it exists, so concurrent writers, e.g. torchrun ranks, never clobber each other); returns
    None when somebody else was first, else ``path``. The file gets 0666 minus the umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path.name), suffix=_TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
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


def make_tmp_dir(target: str | os.PathLike) -> Path:
    """A temporary directory next to ``target`` (to be renamed onto it), with 0777 minus the umask."""
    target = Path(target)
    remove_stale_tmp(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target.name), suffix=_TMP_SUFFIX, dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


# -- integrity -----------------------------------------------------------------------------------
def tensors_digest(tensors: dict[str, Tensor]) -> str:
    """sha256 over the tensors in key order: each key, dtype, shape and raw bytes (as stored)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach()
        if t.device.type != "cpu":
            t = t.cpu()
        h.update(f"{k}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# -- safetensors files -------------------------------------------------------------------------------
def save_tensors(path: str | os.PathLike, tensors: dict[str, Tensor], fmt: str, meta: dict) -> Path:
    """Write ``tensors`` and the JSON ``meta`` (tagged with ``fmt``, with the data's sha256) to one
    safetensors file, atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    header = {META_KEY: json.dumps({"format": fmt, **meta, "sha256": tensors_digest(tensors)})}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def load_tensors(path: str | os.PathLike, fmt: str, what: str, device="cpu",
                 hint: str = "restore it from a copy or regenerate it") -> tuple[dict[str, Tensor], dict]:
    """Read a file written by :func:`save_tensors`; clear errors for missing, truncated, corrupt
    (checksum) or foreign files.

    ``fmt`` is the expected format tag without version (``"mttlite-synset"``); ``what`` names the
    artefact in error messages, ``hint`` what to do about a damaged one. Files written before
    checksums were recorded load without the check.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no {what} at {path}")
    if not path.is_file():
        raise ValueError(f"{path} is a directory, not a {what}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable {what} (truncated or not a safetensors file): {e}") from e
    meta = _parse_meta(header, path, fmt, what)
    want = meta.pop("sha256", None)
    if want is not None and tensors_digest(tensors) != want:
        raise ValueError(f"{path} is corrupt: its tensor data does not match the sha256 recorded when it was "
                         f"written (a changed or damaged byte); {hint}")
    if str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, meta


def _parse_meta(header: dict, path: Path, fmt: str, what: str) -> dict:
    if META_KEY not in header:
        raise ValueError(f"{path} is a safetensors file but not a mttlite {what} (no '{META_KEY}' metadata)")
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: its '{META_KEY}' metadata is not valid JSON ({e}); the file is damaged") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: its '{META_KEY}' metadata is not a JSON object; the file is damaged")
    tag = str(meta.get("format", ""))
    if not tag.startswith(fmt + "/"):
        raise ValueError(f"{path} holds a {tag or 'unknown'} file, expected a {what} ({fmt}/…)")
    if tag != f"{fmt}/1":
        raise ValueError(f"{path} is {tag}, which this mttlite version cannot read (it reads {fmt}/1)")
    return meta


def read_meta_only(path: str | os.PathLike) -> dict:
    """The JSON metadata of a file written by :func:`save_tensors`, without reading its tensors ({} if none)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get(META_KEY, "{}"))
    except Exception:
        return {}


def generator_state(g: torch.Generator) -> Tensor:
    """A generator's state as a uint8 tensor (safetensors-ready)."""
    return g.get_state().clone()


# -- one writer at a time ------------------------------------------------------------------------
class RunLock:
    """An exclusive lock on a directory being written (a distillation's run directory, a buffer being
    trained): ``with RunLock(dir, "distill"):``. A second process asking for it gets a clear
    ValueError at once instead of silently writing over the first one's files. The lock is
    ``fcntl.flock`` on ``dir/.mttlite.lock`` (``name`` distinguishes locks that may be held together,
    e.g. one per torchrun rank), so the kernel releases it when the process dies: a killed run never
    leaves a stale lock. The file is removed on a normal exit, and so is the directory if the lock
    created it and nothing was written. Where ``fcntl`` is missing (Windows) it does nothing."""

    def __init__(self, directory: str | os.PathLike, what: str, name: str = ".mttlite.lock"):
        self.path, self.what, self.fd = Path(directory) / name, what, None

    def __enter__(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        self.created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = ""
                try:
                    holder = os.read(fd, 200).decode(errors="replace").strip()
                except OSError:
                    pass
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise ValueError(f"{self.path.parent} is in use by another {self.what} ({holder or 'another process'}); "
                                     "wait for it to finish or use another directory") from None
                raise
            try:  # the holder before us may have removed the file between our open and our flock: retry
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)  # while still held: nobody can have locked this file meanwhile
            except OSError:
                pass
            os.close(self.fd)  # releases the flock (so does the kernel if the process dies)
            self.fd = None
            if self.created:  # a run that failed before writing anything leaves no empty directory behind
                try:
                    self.path.parent.rmdir()
                except OSError:
                    pass
