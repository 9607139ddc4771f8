"""Expert buffers: trajectories of parameters θ*_0, θ*_1, ..., θ*_E on disk.

MTT (stage 1) trains many "experts" on the real data once and keeps their parameters after every
epoch. Every distillation run then samples an expert and a start epoch t < T+ (max_start_epoch)
and matches the student against the expert M (expert_epochs) epochs later:

    L = ‖θ_N − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖²

so a distillation only ever needs *two* snapshots of *one* expert at a time. This module stores the
trajectories so that exactly those two snapshots are read, and nothing else:

    buffer_dir/
        meta.json                    how the experts were trained (one file for the whole buffer)
        expert_00000.safetensors     one file per expert, written only once the expert is complete
        expert_00001.safetensors
        ...

Inside an expert file, tensor ``"{epoch:03d}/{param_name}"`` is θ*_epoch[param_name] in the stored
dtype (float32, float16 or bfloat16), and the safetensors header's string metadata holds the
expert's metrics as JSON strings (train/test accuracy per epoch, wall time, seed). Loading goes
through ``safetensors.safe_open`` (memory-mapped) and asks only for the requested epoch's keys, so a
buffer of 100 experts × 51 epochs never has to fit in RAM.

Every write is atomic: a temporary file in the same directory, then ``os.replace``. A crash leaves
either the old file or the new one, never half a file; a truncated file (copied badly, disk full)
is caught when the buffer is opened.

    buf = ExpertBuffer.open("runs/buffers/fashion-mnist")
    theta_t = buf.flat(expert=3, epoch=t)              # (P,)
    theta_tM = buf.flat(expert=3, epoch=t + M)         # (P,)
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from math import prod
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .io import atomic_write, tensors_digest

FORMAT = "mttlite-buffer"
VERSION = 1
FORMAT_VERSION = f"{FORMAT}/{VERSION}"  # "mttlite-buffer/1"
META_FILE = "meta.json"
EXPERT_RE = re.compile(r"^expert_(\d{5,})\.safetensors$")

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

REGENERATE_HINT = "delete it and rerun `mttlite experts` with the same arguments to regenerate it"
CHECKSUM_KEY = "sha256"  # header key of an expert file: {epoch: sha256 of that epoch's tensors}
#: safetensors' dtype names → ours (what the header says each tensor is stored as).
_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


# ---------------------------------------------------------------------------------------------
# Names and atomic writes
# ---------------------------------------------------------------------------------------------


def expert_filename(i: int) -> str:
    """Expert i's file name: ``expert_00007.safetensors``."""
    return f"expert_{i:05d}.safetensors"


def tensor_key(epoch: int, name: str) -> str:
    """Key of θ*_epoch[name] inside an expert file: ``"003/features.0.weight"``."""
    return f"{epoch:03d}/{name}"


def dtype_from_name(name: str) -> torch.dtype:
    """"float16" → torch.float16, with the valid choices listed on a typo."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def write_json_atomic(path: str | os.PathLike, obj: Any, exclusive: bool = False) -> bool:
    """Atomically write ``obj`` as indented JSON (see ``io.atomic_write`` for ``exclusive``); False if not written."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write, exclusive=exclusive) is not None


# ---------------------------------------------------------------------------------------------
# meta.json
# ---------------------------------------------------------------------------------------------

#: Fields that are provenance only: a buffer written by another version is still usable.
PROVENANCE_FIELDS = ("mttlite_version", "torch_version")


def _jsonable(v: Any) -> Any:
    """Tuples → lists so that a value compares equal to its JSON round trip."""
    return json.loads(json.dumps(v))


def meta_differences(stored: Mapping[str, Any], requested: Mapping[str, Any]) -> list[str]:
    """Fields whose stored and requested values differ (provenance fields ignored), as
    ``"field: stored X, requested Y"`` lines."""
    out = []
    for k in sorted(set(stored) | set(requested)):
        if k in PROVENANCE_FIELDS:
            continue
        a, b = _jsonable(stored.get(k, "<absent>")), _jsonable(requested.get(k, "<absent>"))
        if a != b:
            out.append(f"{k}: stored {a!r}, requested {b!r}")
    return out


def write_or_check_meta(path: str | os.PathLike, meta: Mapping[str, Any]) -> None:
    """Create ``path/meta.json`` atomically, or, if it already exists (an earlier run, or another
    torchrun rank), check that it describes the same training recipe. Never clobbers it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if write_json_atomic(path / META_FILE, dict(meta), exclusive=True):
        return
    stored = read_meta(path)
    diffs = meta_differences(stored, meta)
    if diffs:
        raise ValueError(
            f"{path} already holds a buffer trained with different settings:\n  "
            + "\n  ".join(diffs)
            + "\nuse another output directory, or rerun with the stored settings to resume/extend it"
        )


def read_meta(path: str | os.PathLike) -> dict:
    """Read and validate ``path/meta.json`` (format name and version)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"buffer directory {path} does not exist; create it with `mttlite experts --out {path}`")
    if not path.is_dir():
        raise ValueError(f"{path} is a file, not a buffer directory (expected a directory holding {META_FILE})")
    meta_path = path / META_FILE
    if not meta_path.exists():
        raise FileNotFoundError(
            f"{meta_path} not found: {path} is not an expert buffer (or its training never started); "
            f"create one with `mttlite experts --out {path}`"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path} is not valid JSON ({e}); {REGENERATE_HINT}") from e
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if not isinstance(fmt, str) or not fmt.startswith(FORMAT + "/"):
        raise ValueError(
            f"{meta_path} is not a mttlite buffer (its 'format' is {fmt!r}, expected {FORMAT_VERSION!r}); "
            "MTT's original .pt buffers are pickles and are not read, by design"
        )
    if fmt != FORMAT_VERSION:
        raise ValueError(
            f"{meta_path} has unsupported buffer version {fmt!r}; this mttlite reads {FORMAT_VERSION!r}. "
            "Regenerate the buffer with this version's `mttlite experts`"
        )
    _check_meta_fields(meta, meta_path)
    return meta


#: The fields of meta.json a buffer cannot be read without.
REQUIRED_FIELDS = ("dataset", "channel", "im_size", "num_classes", "zca", "arch", "param_names", "param_shapes",
                   "epochs", "train_epochs", "dtype")


def _check_meta_fields(meta: dict, meta_path: Path) -> None:
    """Every required field present and of the right kind (a clear error, not a KeyError later)."""
    missing = [k for k in REQUIRED_FIELDS if k not in meta]
    if missing:
        raise ValueError(f"{meta_path} lacks the field(s) {missing}: it was edited or damaged; {REGENERATE_HINT}")
    names, shapes, epochs = meta["param_names"], meta["param_shapes"], meta["epochs"]
    bad = []
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        bad.append("param_names must be a non-empty list of names")
    if not (isinstance(shapes, list) and all(isinstance(sh, list) and all(isinstance(d, int) and d >= 0 for d in sh)
                                             for sh in shapes)):
        bad.append("param_shapes must be a list of shapes (lists of sizes)")
    elif isinstance(names, list) and len(shapes) != len(names):
        bad.append(f"param_shapes has {len(shapes)} entries for {len(names)} param_names")
    if not (isinstance(epochs, list) and epochs and all(isinstance(e, int) and e >= 0 for e in epochs)):
        bad.append("epochs must be a non-empty list of epoch numbers")
    if meta["dtype"] not in DTYPES:
        bad.append(f"dtype must be one of {sorted(DTYPES)}, not {meta['dtype']!r}")
    if bad:
        raise ValueError(f"{meta_path} is damaged: {'; '.join(bad)}; {REGENERATE_HINT}")


# ---------------------------------------------------------------------------------------------
# Expert files
# ---------------------------------------------------------------------------------------------


def save_expert(
    path: str | os.PathLike,
    index: int,
    trajectory: Mapping[int, Mapping[str, Tensor]],
    metrics: Mapping[str, Any],
    dtype: str = "float32",
) -> Path:
    """Atomically write expert ``index``: ``trajectory[epoch][name]`` = θ*_epoch[name].

    Tensors are cast to ``dtype`` on the CPU; ``metrics`` values are stored as JSON strings in
    the safetensors header (it only holds str → str), and so is the sha256 of each epoch's tensors
    (``io.tensors_digest``, under ``"sha256"``), checked when the epoch is read."""
    dt = dtype_from_name(dtype)
    tensors = {
        tensor_key(e, n): t.detach().to("cpu", dt).contiguous()
        for e, params in trajectory.items()
        for n, t in params.items()
    }
    digests = {str(e): tensors_digest({n: tensors[tensor_key(e, n)] for n in params}) for e, params in trajectory.items()}
    header = {"format": FORMAT_VERSION, **{k: json.dumps(v) for k, v in metrics.items()},
              CHECKSUM_KEY: json.dumps(digests)}
    out = Path(path) / expert_filename(index)
    atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=header))
    return out


def list_experts(path: str | os.PathLike) -> list[int]:
    """Indices of the complete expert files in ``path`` (temporary files are ignored), sorted."""
    ids = []
    for entry in os.listdir(path):
        m = EXPERT_RE.match(entry)
        if m:
            ids.append(int(m.group(1)))
    return sorted(ids)


def bytes_for(param_shapes: Iterable[Sequence[int]], num_epochs: int, dtype: str = "float32") -> int:
    """Tensor payload of one expert file: P · (#stored epochs) · itemsize bytes."""
    P = sum(prod(s) for s in param_shapes)
    return P * num_epochs * dtype_from_name(dtype).itemsize


class ExpertBuffer:
    """A directory of expert trajectories, opened lazily (see module docstring).

    ``expert`` arguments are positions ``0 .. len(buf)-1`` in the sorted list of complete expert
    files, ``buf.expert_ids``; for a finished buffer that list is ``[0, 1, ..., n-1]``."""

    def __init__(self, path: Path, meta: dict, expert_ids: list[int]):
        self.path = Path(path)
        self.meta = meta
        self.expert_ids = expert_ids
        self._verified: set[tuple[int, int]] = set()  # (expert, epoch) snapshots whose checksum and values were checked

    # -- opening --------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike) -> ExpertBuffer:
        """Open ``path``, validate ``meta.json`` and every expert file's header (cheap: the
        header only; the tensors stay on disk)."""
        path = Path(path)
        meta = read_meta(path)
        ids = list_experts(path)
        buf = cls(path, meta, ids)
        expected = {tensor_key(e, n): (list(sh), meta["dtype"])
                    for e in buf.epochs for n, sh in zip(buf.param_names, meta["param_shapes"])}
        for i in ids:
            f = path / expert_filename(i)
            layout, header = buf._read_layout(f)
            keys = set(layout)
            if header.get("format") != FORMAT_VERSION or keys != set(expected):
                missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
                raise ValueError(
                    f"{f} does not match {path / META_FILE} (format {header.get('format')!r}, "
                    f"{len(missing)} missing tensors e.g. {missing[:3]}, {len(extra)} unexpected e.g. {extra[:3]}); "
                    f"{REGENERATE_HINT}"
                )
            wrong = [f"{k}: {layout[k][1]} {layout[k][0]} instead of {want[1]} {want[0]}"
                     for k, want in expected.items() if layout[k] != want]
            if wrong:
                raise ValueError(
                    f"{f} does not match {path / META_FILE}: {len(wrong)} tensor(s) have another shape or dtype than "
                    f"the buffer's (e.g. {'; '.join(wrong[:2])}): it comes from another buffer; {REGENERATE_HINT}"
                )
        return buf

    @staticmethod
    def _read_layout(f: Path) -> tuple[dict[str, tuple[list[int], str]], dict[str, str]]:
        """{key: (shape, dtype name)} of every tensor in ``f`` and its header, from the header alone."""
        try:
            with safe_open(str(f), framework="pt") as sf:
                layout = {}
                for k in sf.keys():
                    sl = sf.get_slice(k)
                    layout[k] = (list(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype()))
                return layout, dict(sf.metadata() or {})
        except Exception as e:  # safetensors raises SafetensorError on truncated/corrupt files
            raise ValueError(f"expert file {f} is truncated or corrupt ({e}); {REGENERATE_HINT}") from e

    @staticmethod
    def _read_header(f: Path) -> tuple[set[str], dict[str, str]]:
        try:
            with safe_open(str(f), framework="pt") as sf:
                return set(sf.keys()), dict(sf.metadata() or {})
        except Exception as e:  # safetensors raises SafetensorError on truncated/corrupt files
            raise ValueError(f"expert file {f} is truncated or corrupt ({e}); {REGENERATE_HINT}") from e

    # -- what is stored -------------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of complete experts."""
        return len(self.expert_ids)

    def __repr__(self) -> str:
        m = self.meta
        return (
            f"ExpertBuffer({str(self.path)!r}, experts={len(self)}, dataset={m['dataset']!r}, arch={m['arch']!r}, "
            f"epochs=0..{self.epochs[-1] if self.epochs else None}, P={self.num_params}, dtype={m['dtype']!r})"
        )

    @property
    def epochs(self) -> list[int]:
        """Stored epochs, e.g. [0, 1, ..., 50] (0 = initialisation θ*_0)."""
        return list(self.meta["epochs"])

    @property
    def param_names(self) -> list[str]:
        return list(self.meta["param_names"])

    @property
    def param_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(s) for s in self.meta["param_shapes"]]

    @property
    def num_params(self) -> int:
        """P, the length of ``flat(...)``."""
        return sum(prod(s) for s in self.param_shapes)

    @property
    def dtype(self) -> torch.dtype:
        """The on-disk dtype."""
        return dtype_from_name(self.meta["dtype"])

    def bytes_per_expert(self) -> int:
        """Tensor payload of one expert file: P · len(epochs) · itemsize. The file adds its JSON
        header, about 1.3 KB per stored epoch for a ConvNet-3 (14 tensor entries), i.e. ~0.1 %."""
        return bytes_for(self.param_shapes, len(self.epochs), self.meta["dtype"])

    # -- reading one snapshot -------------------------------------------------------------------

    def _file(self, expert: int) -> Path:
        if not isinstance(expert, int) or not 0 <= expert < len(self):
            raise ValueError(f"expert {expert!r} out of range: the buffer at {self.path} holds {len(self)} experts")
        return self.path / expert_filename(self.expert_ids[expert])

    def params(self, expert: int, epoch: int, device="cpu", dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """θ*_epoch of one expert as ``{name: tensor}`` (shapes = ``param_shapes``), reading only
        that epoch's tensors from the memory-mapped file."""
        if epoch not in self.meta["epochs"]:
            e = self.epochs
            raise ValueError(
                f"epoch {epoch} is not stored in {self.path} (stored: {e[0]}..{e[-1]}); "
                "a distillation reads epochs up to max_start_epoch - 1 + expert_epochs, which must be stored"
            )
        f = self._file(expert)
        try:
            with safe_open(str(f), framework="pt") as sf:
                stored = {n: sf.get_tensor(tensor_key(epoch, n)) for n in self.param_names}  # on the CPU
                header = sf.metadata() or {}
        except Exception as e:
            raise ValueError(f"could not read epoch {epoch} from expert file {f} ({e}); {REGENERATE_HINT}") from e
        if (expert, epoch) not in self._verified:  # once per snapshot and process: host-side, before any device
            self._verify(f, epoch, stored, header)
            self._verified.add((expert, epoch))
        return {n: t.to(device=device, dtype=dtype) for n, t in stored.items()}

    @staticmethod
    def _verify(f: Path, epoch: int, stored: dict[str, Tensor], header: dict[str, str]) -> None:
        """The snapshot's sha256 (when the file records one) and finite values, or a ValueError naming the file."""
        if CHECKSUM_KEY in header:
            try:
                want = json.loads(header[CHECKSUM_KEY]).get(str(epoch))
            except (json.JSONDecodeError, AttributeError):
                want = "unreadable"
            if want is not None and tensors_digest(stored) != want:
                raise ValueError(f"expert file {f} is corrupt: epoch {epoch}'s tensors do not match the sha256 recorded "
                                 f"when it was written (a changed or damaged byte); {REGENERATE_HINT}")
        bad = [n for n, t in stored.items() if not bool(torch.isfinite(t).all())]
        if bad:
            raise ValueError(f"expert file {f} holds non-finite values (NaN/inf) at epoch {epoch} in {bad[:3]}: that "
                             f"expert's training diverged (lr_teacher too large?); {REGENERATE_HINT}")

    def flat(self, expert: int, epoch: int, device="cpu", dtype: torch.dtype = torch.float32) -> Tensor:
        """θ*_epoch as one vector of shape (P,), concatenated in ``param_names`` order.

        Concatenated on the host, then moved in ONE copy; to a GPU from page-locked memory, without
        waiting for the device (not one blocking copy per parameter tensor)."""
        p = self.params(expert, epoch)  # on the CPU
        flat = torch.cat([p[n].reshape(-1) for n in self.param_names]).to(dtype)
        dev = torch.device(device)
        if dev.type == "cuda":
            return flat.pin_memory().to(dev, non_blocking=True)
        return flat.to(dev)

    def metrics(self, expert: int) -> dict:
        """The expert's recorded metrics (JSON-decoded header values): ``train_acc``,
        ``test_acc``, ``train_loss`` (one per epoch 1..E), ``wall_time_s``, ``seed`` ..."""
        _, header = self._read_header(self._file(expert))
        return {k: json.loads(v) for k, v in header.items() if k not in ("format", CHECKSUM_KEY)}

    # -- can a distillation use it? -------------------------------------------------------------

    def check_compatible(
        self,
        *,
        dataset: str,
        channel: int,
        im_size: Sequence[int],
        num_classes: int,
        zca: bool,
        arch: str,
        needed_epochs: int,
        width: int | None = None,
        depth: int | None = None,
    ) -> None:
        """Raise one ValueError listing every field where this buffer cannot serve a distillation.

        ``needed_epochs`` = the latest epoch a distillation reads, T+ − 1 + M (t is drawn from
        0 … T+−1 as in MTT, and the target is θ*_{t+M}): it must be stored."""
        m, kw = self.meta, self.meta.get("arch_kwargs", {})
        problems = []

        def differ(field: str, stored: Any, wanted: Any, what: str) -> None:
            if _jsonable(stored) != _jsonable(wanted):
                problems.append(f"{field}: the buffer was {what} {stored!r} but the distillation asks for {wanted!r}")

        differ("dataset", m["dataset"], dataset, "trained on")
        differ("channel", m["channel"], channel, "trained with channel =")
        differ("im_size", list(m["im_size"]), list(im_size), "trained at im_size")
        differ("num_classes", m["num_classes"], num_classes, "trained with num_classes =")
        differ("zca", bool(m["zca"]), bool(zca), "trained with zca =")
        differ("arch", m["arch"], arch, "trained with arch")
        if width is not None:
            differ("width", kw.get("width"), width, "trained with width")
        if depth is not None:
            differ("depth", kw.get("depth"), depth, "trained with depth")
        last = max(self.epochs)
        if needed_epochs > last:
            problems.append(
                f"epochs: the distillation needs expert epochs up to max_start_epoch - 1 + expert_epochs = {needed_epochs} "
                f"but the buffer stores epochs 0..{last} (train_epochs={m['train_epochs']}); lower max_start_epoch "
                f"or expert_epochs, or regenerate the buffer with a larger --train-epochs/--keep-epochs"
            )
        if len(self) == 0:
            problems.append(f"experts: {self.path} holds no complete expert yet; run `mttlite experts --out {self.path}`")
        if problems:
            raise ValueError(f"expert buffer {self.path} cannot be used for this distillation:\n  " + "\n  ".join(problems))
