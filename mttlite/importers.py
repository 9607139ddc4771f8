"""Distilled sets made elsewhere, read into a :class:`~mttlite.synset.SyntheticSet` without unpickling.

A set is only worth evaluating in the input space its images were made in. A mttlite set records
that space (mean, std, ZCA); a set from another code base does not, so the caller says which,

    space "normalised"   x = (p − mean) / std        the data set's published constants (DC/DSA/DM/MTT)
    space "zca"          x = ZCA(p)                  MTT's ``--zca`` runs: kornia ZCA, eps 0.1, fitted on
                                                     the training pixels p ∈ [0, 1] (``load_dataset(zca=True)``)
    space "pixels"       p ∈ [0, 1] (or uint8 0…255)  converted here: x = dataset.normalize(p)

and the import refuses when the space cannot be established: no space given, a normalised set for a
data set whose constants mttlite computes itself (``imagefolder``), a ZCA set for a data set loaded
without ZCA. Three formats (``FORMATS``; ``mttlite`` is ``SyntheticSet.load``):

    authors  the MTT authors' ``distill.py`` (and its forks): ``images_<tag>.pt``, ``labels_<tag>.pt``
             and, when saved, ``lr_<tag>.pt`` in one folder, tag = an iteration or ``best``. The images
             are (K·ipc, C, H, W) in the space of the run; labels (K·ipc,) int64 (or (n, K) soft,
             DATM); the lr a 0-d tensor or a float (``syn_lr.item()``). ``images_best.pt`` is the
             iteration whose *test* accuracy was highest during distillation: a checkpoint chosen on
             the test set, which the provenance records.
    folder   an ImageFolder tree ``<root>/<class>/<image>.png``: 8-bit images in pixel space; a class
             folder is named by a class name of the data set, its index, or ``<index>_<name>``
             (what ``SyntheticSet.export_imagefolder`` writes; its ``labels.json`` soft labels are read).
    tensor   ``.safetensors`` with tensors ``images``, ``labels`` and optional 0-d ``syn_lr``; or a
             ``.pt`` dict of the same names.

Every ``.pt`` file is read with ``torch.load(path, map_location="cpu", weights_only=True)``: plain
tensors, numbers and dicts only. A file that needs anything else (a pickled object) is refused with
:class:`SetImportError`, as is every other bad file (wrong shapes, labels outside the classes,
non-finite pixels, channels or size not the data set's). An import reads files and writes nothing.

Reading and converting are two steps: ``read_*`` checks a file on its own (fast, before a data set is
loaded) and returns a :class:`RawSet`; :func:`to_synset` checks it against the data set and converts
it. ``load_authors``, ``load_folder``, ``load_tensor_file`` and ``import_set`` do both.
"""
from __future__ import annotations

import hashlib
import json
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .data import IMAGE_EXTENSIONS, MEAN_STD
from .synset import FORMAT as SYNSET_FORMAT
from .synset import SyntheticSet

FORMATS: tuple[str, ...] = ("mttlite", "authors", "folder", "tensor")
SPACES: tuple[str, ...] = ("normalised", "zca", "pixels")
#: A "pixels" set may exceed [0, 1] by this much (float rounding of a saved image).
PIXEL_TOLERANCE = 1e-4
_AUTHORS_IMAGES = re.compile(r"^images_(.+)\.pt$")


class SetImportError(ValueError):
    """A file that cannot be imported as a distilled set; the message names the file and the problem."""


@dataclass
class RawSet:
    """A set as read from its files, before it is checked against a data set.

    images: (n, C, H, W) float32 as stored, or uint8 pixels (folder format)
    labels: (n,) int64 indices, or (n, K) float soft labels; with ``label_names`` the indices point
        into label_names (a folder's class folders) instead of the data set's classes
    syn_lr: the learned lr α, or None; grey: (n,) bool, image i was stored as one channel (folder)
    source: the file or folder named in errors; provenance: format, files and their sha256, notes
    """

    images: Tensor
    labels: Tensor
    syn_lr: float | None
    source: Path
    fmt: str
    provenance: dict = field(default_factory=dict)
    label_names: list[str] | None = None
    grey: Tensor | None = None


# ---------------------------------------------------------------------------------------------
# Small readers
# ---------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def torch_load_plain(path) -> object:
    """``torch.load(path, map_location="cpu", weights_only=True)``: tensors, numbers, lists and dicts
    only. Anything that would need unpickling an object is a :class:`SetImportError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise SetImportError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SetImportError(
            f"{path} holds a pickled object, not plain tensors: torch.load(weights_only=True) refused it "
            f"({first}). mttlite never unpickles files; re-save the tensors alone, e.g. "
            "torch.save(images.detach().cpu(), ...), or as safetensors") from None
    except Exception as e:  # truncated, not a torch file, …
        raise SetImportError(f"{path} is not a tensor file torch.load can read ({type(e).__name__}: {e}); "
                             "the file is damaged or in another format") from None


def _as_lr(value, path: Path) -> float:
    """A learned lr saved as a 0-d / 1-element tensor or a number -> a positive finite float."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise SetImportError(f"{path}: the learning rate must be one number; got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SetImportError(f"{path}: the learning rate must be a number or a 0-d tensor; got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise SetImportError(f"{path}: the learned learning rate is {value}, not a positive number; pass --lr to "
                             "evaluate with a fixed one instead")
    return value


def _tensor(value, path: Path, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise SetImportError(f"{path}: expected the {what} as a tensor; the file holds a {type(value).__name__}")
    return value.detach().cpu()


def _check_images(images: Tensor, path: Path) -> Tensor:
    """(n, C, H, W) float (any float dtype -> float32) or uint8; finite; n >= 1."""
    if images.dim() != 4:
        raise SetImportError(f"{path}: images must be a 4-d tensor (n, C, H, W); got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise SetImportError(f"{path}: the set holds no images (shape {tuple(images.shape)})")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise SetImportError(f"{path}: images must be floating point (or uint8 pixels); got {images.dtype}")
    images = images.float()
    bad = ~torch.isfinite(images)
    if bad.any():
        count = int(bad.sum())
        first = int(bad.flatten(1).any(1).nonzero()[0])
        kind = "NaN" if torch.isnan(images).any() else "infinite"
        raise SetImportError(f"{path}: {count} {kind} pixel value(s), first in image {first}; the set is damaged "
                             "(a diverged distillation?)")
    return images


def _check_labels(labels: Tensor, n: int, path: Path) -> Tensor:
    """(n,) integer class indices -> int64, or (n, K) finite float soft labels. Range checked later."""
    if labels.is_floating_point():
        if labels.dim() == 1 and tuple(labels.shape) == (n,) and torch.equal(labels, labels.round()):
            labels = labels.long()  # class indices saved as floats
        elif labels.dim() == 2 and labels.shape[0] == n:
            if not torch.isfinite(labels).all():
                raise SetImportError(f"{path}: the soft labels hold NaN or infinite values")
            return labels.float()
        else:
            raise SetImportError(f"{path}: labels must be (n,) = ({n},) class indices or (n, K) soft labels for the "
                                 f"{n} images; got {labels.dtype} {tuple(labels.shape)}")
    if labels.dtype == torch.bool or labels.is_complex():
        raise SetImportError(f"{path}: labels must be integer class indices or float soft labels; got {labels.dtype}")
    if tuple(labels.shape) != (n,):
        raise SetImportError(f"{path}: {n} images but labels of shape {tuple(labels.shape)}; expected ({n},)")
    return labels.long()


# ---------------------------------------------------------------------------------------------
# The three formats: file(s) -> RawSet
# ---------------------------------------------------------------------------------------------


def authors_files(path) -> tuple[Path, Path, Path | None, str]:
    """(images, labels, lr or None, tag) of an authors' run: ``path`` is an ``images_<tag>.pt`` file or
    the folder holding exactly one (forks write them to ``<run>/Normal/``)."""
    path = Path(path)
    if not path.exists():
        raise SetImportError(f"{path}: no such file or folder")
    if path.is_dir():
        folder = path
        found = sorted(p for p in folder.iterdir() if _AUTHORS_IMAGES.match(p.name))
        if not found and (folder / "Normal").is_dir():
            folder = folder / "Normal"
            found = sorted(p for p in folder.iterdir() if _AUTHORS_IMAGES.match(p.name))
        if not found:
            raise SetImportError(f"{path}: no images_<iteration>.pt or images_best.pt here; the MTT authors' distill.py "
                                 "writes them to logged_files/<dataset>/<run>/")
        if len(found) > 1:
            names = ", ".join(p.name for p in found[:6]) + (", …" if len(found) > 6 else "")
            raise SetImportError(f"{path} holds {len(found)} saved sets ({names}); pass one file, e.g. "
                                 f"{found[-1]} (images_best.pt is the iteration chosen on the TEST set)")
        images = found[0]
    else:
        images = path
        folder = path.parent
        if not _AUTHORS_IMAGES.match(images.name):
            raise SetImportError(f"{path}: the authors' format names its files images_<tag>.pt, labels_<tag>.pt, "
                                 "lr_<tag>.pt; give the images_<tag>.pt file or its folder (or use --format tensor)")
    tag = _AUTHORS_IMAGES.match(images.name).group(1)
    labels = folder / f"labels_{tag}.pt"
    if not labels.is_file():
        raise SetImportError(f"{images}: its labels file {labels.name} is missing from {folder}")
    lr = folder / f"lr_{tag}.pt"
    return images, labels, (lr if lr.is_file() else None), tag


def read_authors(path) -> RawSet:
    """Read an authors' run (see :func:`authors_files`) with ``torch.load(weights_only=True)``."""
    images_file, labels_file, lr_file, tag = authors_files(path)
    images = _check_images(_tensor(torch_load_plain(images_file), images_file, "images"), images_file)
    if images.dtype == torch.uint8:
        raise SetImportError(f"{images_file}: the authors' images are float tensors; this one is uint8")
    labels = _check_labels(_tensor(torch_load_plain(labels_file), labels_file, "labels"), len(images), labels_file)
    syn_lr = None if lr_file is None else _as_lr(torch_load_plain(lr_file), lr_file)
    files = [f for f in (images_file, labels_file, lr_file) if f is not None]
    notes = []
    if tag == "best":
        notes.append("images_best.pt is the distillation iteration with the highest TEST accuracy during distillation "
                     "(the authors' distill.py): a checkpoint chosen on the test set")
    if syn_lr is None:
        notes.append(f"no lr_{tag}.pt: the set carries no learned lr α; evaluation uses η = 0.01 unless --lr is given "
                     "(the authors' evaluation trains with the learned α)")
    prov = {"format": "authors", "tag": tag, "files": {str(f): _sha256(f) for f in files}, "notes": notes}
    return RawSet(images, labels, syn_lr, images_file, "authors", prov)


def read_tensor_file(path) -> RawSet:
    """A ``.safetensors`` file (tensors images, labels, optional syn_lr) or a ``.pt`` dict of them."""
    path = Path(path)
    if not path.is_file():
        raise SetImportError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise SetImportError(f"{path} is not a readable safetensors file (truncated or another format): {e}") from None
        if SYNSET_FORMAT in header.get("mttlite", ""):
            raise SetImportError(f"{path} is a mttlite synthetic set, which records its own space: use --format mttlite")
    else:
        tensors = torch_load_plain(path)
        if not isinstance(tensors, dict):
            raise SetImportError(f"{path} holds a {type(tensors).__name__}; a tensor file must hold a dict "
                                 "{'images': (n, C, H, W), 'labels': (n,) or (n, K), optional 'syn_lr'}")
    missing = [k for k in ("images", "labels") if k not in tensors]
    if missing:
        raise SetImportError(f"{path} lacks {missing}; it holds {sorted(map(str, tensors))} (expected 'images', "
                             "'labels' and optionally 'syn_lr')")
    images = _check_images(_tensor(tensors["images"], path, "images"), path)
    labels = _check_labels(_tensor(tensors["labels"], path, "labels"), len(images), path)
    syn_lr = _as_lr(tensors["syn_lr"], path) if tensors.get("syn_lr") is not None else None
    ignored = sorted(str(k) for k in tensors if k not in ("images", "labels", "syn_lr"))
    prov = {"format": "tensor", "files": {str(path): _sha256(path)}, "notes": []}
    if ignored:
        prov["notes"].append(f"ignored entries {ignored}")
    return RawSet(images, labels, syn_lr, path, "tensor", prov)


def _decode(path: Path) -> tuple[np.ndarray, bool]:
    """One 8-bit image -> (H, W, 3) uint8 and whether it is grey (one channel, or R = G = B)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                raise SetImportError(f"{path}: a {mode} (16-bit or float) image; the folder format reads 8-bit images")
            if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
                alpha = np.asarray(im.convert("RGBA"))[..., 3]
                if (alpha != 255).any():
                    raise SetImportError(f"{path}: the image has transparent pixels; save it without an alpha channel")
            grey_mode = mode in ("L", "1", "LA")
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise SetImportError(f"{path}: not a readable image ({e})") from None
    grey = grey_mode or bool((arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all())
    return arr, grey


def read_folder(path) -> RawSet:
    """An ImageFolder tree: ``path/<class>/<image>`` (extensions ``data.IMAGE_EXTENSIONS``), in pixel space.

    Hidden entries and files at the top level are skipped; ``labels.json`` (written by
    ``SyntheticSet.export_imagefolder`` for soft labels) supplies soft labels by relative path."""
    root = Path(path)
    if not root.is_dir():
        raise SetImportError(f"{root}: the folder format needs a folder of class subfolders (<class>/<image>.png)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise SetImportError(f"{root}: no class subfolders; the folder format is <root>/<class>/<image>.png")
    files, index = [], []
    for i, c in enumerate(classes):
        for f in sorted((root / c).iterdir()):
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(f)
                index.append(i)
    if not files:
        raise SetImportError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders {classes[:5]}")
    decoded = [_decode(f) for f in files]
    sizes = {}
    for f, (a, _) in zip(files, decoded):
        sizes.setdefault(a.shape[:2], f)
    if len(sizes) > 1:
        (s1, f1), (s2, f2) = list(sizes.items())[:2]
        raise SetImportError(f"{root}: images of different sizes ({f1} is {s1[0]}x{s1[1]}, {f2} is {s2[0]}x{s2[1]}); "
                             "a distilled set has one image size (they are not resized)")
    images = torch.from_numpy(np.stack([a for a, _ in decoded]).transpose(0, 3, 1, 2).copy())  # (n, 3, H, W) uint8
    grey = torch.tensor([g for _, g in decoded])
    labels = torch.tensor(index, dtype=torch.int64)
    prov = {"format": "folder", "folder": str(root), "classes": classes, "images": len(files),
            "files_sha256": hashlib.sha256("".join(_sha256(f) for f in files).encode()).hexdigest(), "notes": []}
    raw = RawSet(images, labels, None, root, "folder", prov, label_names=classes, grey=grey)
    doc_path = root / "labels.json"
    if doc_path.is_file():
        raw.labels = _soft_labels_from(doc_path, files, root)
        prov["notes"].append("soft labels read from labels.json")
    return raw


def _soft_labels_from(doc_path: Path, files: list[Path], root: Path) -> Tensor:
    try:
        soft = json.loads(doc_path.read_text())["soft_labels"]
        rows = [soft[f.relative_to(root).as_posix()] for f in files]
        labels = torch.tensor(rows, dtype=torch.float32)
    except (ValueError, KeyError, TypeError) as e:
        raise SetImportError(f"{doc_path}: not the soft labels of this folder's images ({type(e).__name__}: {e}); "
                             "remove it to use the class folders as hard labels") from None
    if labels.dim() != 2 or not torch.isfinite(labels).all():
        raise SetImportError(f"{doc_path}: soft labels must be finite rows of one length; got shape {tuple(labels.shape)}")
    return labels


# ---------------------------------------------------------------------------------------------
# RawSet + data set -> SyntheticSet
# ---------------------------------------------------------------------------------------------


def _class_index(name: str, dataset) -> int | None:
    """The data set's class index of a folder name: a class name, an index, or ``<index>_<name>``."""
    def norm(s: str) -> str:
        return re.sub(r"[^a-z0-9]+", "_", s.lower()).strip("_")

    names = {norm(c): i for i, c in enumerate(dataset.class_names)}
    if norm(name) in names:
        return names[norm(name)]
    m = re.fullmatch(r"(\d+)(?:_(.*))?", name)
    if m:
        i = int(m.group(1))
        if i < dataset.num_classes and (m.group(2) is None or norm(m.group(2)) == norm(dataset.class_names[i])):
            return i
    return None


def resolve_space(raw: RawSet, space: str | None, dataset_name: str) -> str:
    """The space of ``raw``'s images: "pixels" for image files, else the caller's ``space``, which
    must be given (the file does not record it: refusing is the only honest answer)."""
    if raw.fmt == "folder":
        if space not in (None, "pixels"):
            raise SetImportError(f"{raw.source}: image files are pixels; --space {space} does not apply to the folder format")
        return "pixels"
    if space is None:
        raise SetImportError(
            f"{raw.source}: the {raw.fmt} format does not record the space its images are in, so the evaluation cannot "
            f"be set up honestly; pass --space normalised (x = (p - mean) / std with the constants of {dataset_name}, "
            "the papers' default), --space zca (MTT's --zca runs: ZCA fitted on the training pixels, eps 0.1) or "
            "--space pixels (p in [0, 1])")
    if space not in SPACES:
        raise SetImportError(f"unknown space {space!r}; choose one of: {', '.join(SPACES)}")
    return space


def _space_check(space: str, raw: RawSet, dataset) -> None:
    """Refuse unless the data set is loaded in a way that establishes ``space`` (module docstring)."""
    if space == "normalised":
        if dataset.zca is not None:
            raise SetImportError(f"{raw.source}: --space normalised, but {dataset.name} was loaded with ZCA; load it "
                                 "without (zca=False), or pass --space zca if the set is ZCA-whitened")
        if dataset.name not in MEAN_STD:
            raise SetImportError(f"{raw.source}: the normalisation of {dataset.name!r} is computed by mttlite from its own "
                                 "pixels, so a normalised set made elsewhere cannot be matched to it; save the set as "
                                 "pixels (e.g. PNGs) and pass --space pixels")
    if space == "zca" and dataset.zca is None:
        raise SetImportError(f"{raw.source}: --space zca, but {dataset.name} was loaded without ZCA; load it with "
                             "zca=True (the command line does this for --space zca)")


def to_synset(raw: RawSet, dataset, space: str | None, method: str = "imported") -> SyntheticSet:
    """Check ``raw`` against ``dataset`` and convert it to a :class:`SyntheticSet` in the data set's space.

    space: the images' space (``SPACES``); the folder format is always "pixels". The set takes the
    data set's name, class names, mean, std and ZCA; its provenance records the source, format and
    space (and ``import_warnings`` when the values look unlike the claimed space).
    """
    space = resolve_space(raw, space, dataset.name)
    _space_check(space, raw, dataset)
    x = raw.images
    k = dataset.num_classes
    want = (dataset.channel, *dataset.im_size)
    if raw.fmt == "folder":
        if dataset.channel == 1:
            if not bool(raw.grey.all()):
                i = int((~raw.grey).nonzero()[0])
                raise SetImportError(f"{raw.source}: image {i} is in colour but {dataset.name} has 1 channel")
            x = x[:, :1]
        elif dataset.channel == 3 and bool(raw.grey.any()) and bool(raw.grey.all()):
            raise SetImportError(f"{raw.source}: the images are grey (1 channel) but {dataset.name} has 3 channels")
    if tuple(x.shape[1:]) != want:
        raise SetImportError(f"{raw.source}: images are {'x'.join(map(str, x.shape[1:]))} (C x H x W) but {dataset.name} "
                             f"has {'x'.join(map(str, want))}; the set was made for another data set or image size")

    warnings = []
    if space == "pixels":
        p = x.float() / 255.0 if x.dtype == torch.uint8 else x
        low, high = float(p.min()), float(p.max())
        if low < -PIXEL_TOLERANCE or high > 1 + PIXEL_TOLERANCE:
            raise SetImportError(f"{raw.source}: --space pixels needs values in [0, 1], these span [{low:.3g}, {high:.3g}]; "
                                 "they look normalised: pass --space normalised (or zca)")
        x = dataset.normalize(p.clamp(0.0, 1.0).to(dataset.device)).cpu()
    else:
        if x.dtype == torch.uint8:
            raise SetImportError(f"{raw.source}: uint8 images are pixels 0..255; pass --space pixels")
        if float(x.min()) >= 0.0 and float(x.max()) <= 1.0:
            warnings.append("every value lies in [0, 1], as pixels do; if these are pixels, pass --space pixels")

    y = raw.labels
    if raw.label_names is not None and not y.is_floating_point():
        mapping = [_class_index(name, dataset) for name in raw.label_names]
        unknown = [name for name, i in zip(raw.label_names, mapping) if i is None]
        if unknown:
            raise SetImportError(f"{raw.source}: class folder(s) {unknown[:5]} match no class of {dataset.name} "
                                 f"(name the folders by class name, index or <index>_<name>: {dataset.class_names[:4]} …)")
        if len(set(mapping)) != len(mapping):
            raise SetImportError(f"{raw.source}: two class folders name the same class of {dataset.name}: {raw.label_names}")
        y = torch.tensor(mapping, dtype=torch.int64)[y]
    if y.is_floating_point():
        if y.shape[1] != k:
            raise SetImportError(f"{raw.source}: soft labels have {y.shape[1]} classes, {dataset.name} has {k}")
    else:
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= k:
            raise SetImportError(f"{raw.source}: labels span [{low}, {high}] but {dataset.name} has {k} classes (0..{k - 1})")

    prov = {**raw.provenance, "source": str(raw.source), "space": space, "imported_into": dataset.name}
    if warnings:
        prov["import_warnings"] = warnings
    return SyntheticSet(images=x.contiguous(), labels=y, syn_lr=raw.syn_lr, dataset=dataset.name,
                        class_names=list(dataset.class_names), mean=dataset.mean, std=dataset.std,
                        zca=dataset.zca, method=method, config={}, provenance=prov)


# ---------------------------------------------------------------------------------------------
# One call per format, and a dispatcher
# ---------------------------------------------------------------------------------------------


def load_authors(path, dataset, space: str | None, method: str = "mtt") -> SyntheticSet:
    """The MTT authors' ``images_<tag>.pt`` / ``labels_<tag>.pt`` / ``lr_<tag>.pt`` as a SyntheticSet."""
    return to_synset(read_authors(path), dataset, space, method)


def load_folder(path, dataset, method: str = "imported") -> SyntheticSet:
    """An ImageFolder / PNG tree (pixel space) as a SyntheticSet in the data set's space."""
    return to_synset(read_folder(path), dataset, "pixels", method)


def load_tensor_file(path, dataset, space: str | None, method: str = "imported") -> SyntheticSet:
    """A ``.safetensors`` / ``.pt`` file with ``images``, ``labels``, optional ``syn_lr`` as a SyntheticSet."""
    return to_synset(read_tensor_file(path), dataset, space, method)


def detect_format(path) -> str:
    """The format of ``path`` (``FORMATS``): a mttlite-tagged .safetensors is "mttlite", another
    .safetensors or .pt "tensor" (``images_<tag>.pt``: "authors"), a folder with ``images_*.pt``
    "authors", any other folder "folder"."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no set at {path}")
    if path.is_dir():
        has_authors = any(_AUTHORS_IMAGES.match(p.name) for p in path.iterdir()) or (
            (path / "Normal").is_dir() and any(_AUTHORS_IMAGES.match(p.name) for p in (path / "Normal").iterdir()))
        return "authors" if has_authors else "folder"
    if _AUTHORS_IMAGES.match(path.name):
        return "authors"
    if path.suffix == ".safetensors":
        from .io import read_meta_only

        return "mttlite" if str(read_meta_only(path).get("format", "")).startswith(SYNSET_FORMAT) else "tensor"
    if path.suffix in (".pt", ".pth"):
        return "tensor"
    raise SetImportError(f"{path}: cannot tell its format from the name; pass --format ({', '.join(FORMATS)})")


def read_set(path, fmt: str) -> RawSet:
    """Read (and check on its own) a set in ``fmt`` other than "mttlite"."""
    readers = {"authors": read_authors, "folder": read_folder, "tensor": read_tensor_file}
    if fmt not in readers:
        raise SetImportError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    return readers[fmt](path)


def import_set(path, dataset=None, fmt: str = "auto", space: str | None = None,
               method: str | None = None) -> SyntheticSet:
    """Any set as a SyntheticSet: ``fmt`` "auto" (``detect_format``) or one of ``FORMATS``.

    dataset: the ``Dataset`` the set belongs to (needed for every format but "mttlite"; for "mttlite"
    it is checked with ``SyntheticSet.check_dataset`` when given). method: the name the set gets
    (default "mtt" for the authors' format, "imported" otherwise)."""
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "mttlite":
        if space is not None:
            raise SetImportError(f"{path}: a mttlite set records its own space; do not pass a space")
        s = SyntheticSet.load(path)
        if dataset is not None:
            s.check_dataset(dataset)
        return s
    if dataset is None:
        raise SetImportError(f"{path}: a {fmt} set does not say which data set it belongs to; pass the data set (--dataset)")
    method = method or ("mtt" if fmt == "authors" else "imported")
    return to_synset(read_set(path, fmt), dataset, space, method)
