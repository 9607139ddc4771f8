"""The distilled set as an artefact: one file that holds everything needed to use and judge it.

What MTT learns is D_syn = {(x_i, y_i)} plus the learning rate α it was matched with. A network
trained on D_syn only makes sense in the exact input space the experts saw,

    x = ZCA((p − mean) / std)          p ∈ [0, 1]^(C×H×W) pixels,  ZCA optional (MTT's CIFAR setting)

so the artefact carries that space too: mean, std and the fitted ZCA (μ, W, W⁻¹). Then

    evaluation   trains fresh networks on (x_i, y_i) with lr α         (``evaluate``)
    display      p_i = clamp(ZCA⁻¹(x_i) · std + mean, 0, 1)             (``pixels``, PNG grid, ImageFolder)

need nothing but the file. The file is one ``.safetensors``: tensors ``images``, ``labels`` and
``zca.*``; every other field is JSON in the header's metadata under ``"mttlite"``, tagged
``"mttlite-synset/1"`` (see ``io.py``). No pickle anywhere; writes are atomic.

A texture set (MTT §5, ``mttlite.texture``) holds canvases (n, C, Hc, Wc) larger than the networks'
input (H, W), and records ``texture = {"canvas": [Hc, Wc], "input": [H, W]}`` (absent in files written
before it: None). Its evaluation trains on random toroidal crops of the canvases; its PNG grid shows
every canvas tiled 3 × 3, so a seam would show.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor

from .evaluate import (
    EvalProtocol,
    EvalResult,
    evaluate_set,
    hard_labels,
    random_real_subset,
)
from .io import load_tensors, make_tmp_dir, save_tensors
from .texture import tile
from .zca import ZCA

FORMAT = "mttlite-synset"  # file tag: FORMAT + "/1"
_META_FIELDS = ("syn_lr", "dataset", "class_names", "mean", "std", "arch", "arch_kwargs", "method", "config", "provenance")


def _library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mttlite")
    except PackageNotFoundError:  # not installed (running from a source tree)
        return "unknown"


def _jsonable(value):
    """Config values -> JSON (tuples become lists, paths and other objects their str)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.item()
    return str(value)


@dataclass
class SyntheticSet:
    """A distilled (or selected) image set, its labels, its learned lr α and the space it lives in.

    images: (n, C, H, W) float, in the (normalised, possibly ZCA-whitened) space the networks see
    labels: (n,) int64 class indices, or (n, K) float soft labels
    syn_lr: learned α; None for coresets / baselines (evaluation then uses 0.01)
    mean, std: per-channel affine map p -> (p − mean) / std (length C); zca: applied after it
    arch, arch_kwargs: the network it was distilled with; method, config: how; provenance: when/where
    texture: None, or for a texture set {"canvas": [Hc, Wc], "input": [H, W]}: images are (n, C, Hc, Wc)
        toroidal canvases, seen by the networks through (H, W) wrap-around crops
    """

    images: Tensor
    labels: Tensor
    syn_lr: float | None
    dataset: str
    class_names: list[str]
    mean: tuple
    std: tuple
    zca: ZCA | None = None
    arch: str = "convnet"
    arch_kwargs: dict = field(default_factory=dict)
    method: str = "mtt"
    config: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    texture: dict | None = None

    def __post_init__(self) -> None:
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        self.class_names = [str(c) for c in self.class_names]
        if self.syn_lr is not None:
            self.syn_lr = float(self.syn_lr.item() if isinstance(self.syn_lr, Tensor) else self.syn_lr)
        x, y, k = self.images, self.labels, len(self.class_names)
        if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"images must be a float tensor (n, C, H, W); got {getattr(x, 'shape', type(x))}")
        n, c = x.shape[0], x.shape[1]
        if y.is_floating_point():
            if tuple(y.shape) != (n, k):
                raise ValueError(f"soft labels must have shape (n, K) = ({n}, {k}); got {tuple(y.shape)}")
        elif y.dtype != torch.int64 or tuple(y.shape) != (n,):
            raise ValueError(f"hard labels must be int64 of shape (n,) = ({n},); got {y.dtype} {tuple(y.shape)}")
        elif n and (y.min() < 0 or y.max() >= k):
            raise ValueError(f"labels must lie in [0, {k}) for {k} class names; got [{int(y.min())}, {int(y.max())}]")
        if len(self.mean) != c or len(self.std) != c:
            raise ValueError(f"mean and std need one value per channel (C = {c}); got {self.mean}, {self.std}")
        if self.texture is not None:
            self.texture = _check_texture(self.texture, tuple(x.shape[-2:]), self.zca)
        if self.zca is not None and self.zca.dim != x[0].numel():
            raise ValueError(f"the ZCA was fitted on D = {self.zca.dim} values per image, the images have {x[0].numel()}")
        # Who made this, when: filled once at creation, kept unchanged by save/load.
        self.provenance = dict(self.provenance)
        self.provenance.setdefault("mttlite", _library_version())
        self.provenance.setdefault("torch", torch.__version__)
        self.provenance.setdefault("python", platform.python_version())
        self.provenance.setdefault("created", datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))

    # -- shape -------------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def ipc(self) -> int:
        """Images per class (the largest class count, if the set is not balanced)."""
        return int(torch.bincount(hard_labels(self.labels).cpu(), minlength=self.num_classes).max())

    def __repr__(self) -> str:
        labels = "soft" if self.labels.is_floating_point() else "hard"
        lr = "None" if self.syn_lr is None else f"{self.syn_lr:.4g}"
        return (
            f"SyntheticSet({self.method}, {self.dataset}, ipc={self.ipc}, images={tuple(self.images.shape)}, "
            f"{labels} labels, syn_lr={lr}, zca={self.zca is not None}, arch={self.arch})"
        )

    # -- constructors --------------------------------------------------------------------------

    @classmethod
    def from_random_real(cls, dataset, ipc: int, seed: int = 0) -> SyntheticSet:
        """The random-real baseline as a set: ipc real training images per class (no α)."""
        images, labels = random_real_subset(dataset, ipc, seed=seed)
        return cls(
            images=images, labels=labels, syn_lr=None, dataset=dataset.name, class_names=list(dataset.class_names),
            mean=dataset.mean, std=dataset.std, zca=dataset.zca, method="random_real",
            config={"ipc": int(ipc), "seed": int(seed)},
        )

    # -- the file ------------------------------------------------------------------------------

    def save(self, path) -> Path:
        """Write one .safetensors file (atomically): tensors images, labels, zca.*; the rest as JSON."""
        tensors = {"images": self.images, "labels": self.labels}
        if self.zca is not None:
            tensors.update(self.zca.to_tensors())
        meta = {name: _jsonable(getattr(self, name)) for name in _META_FIELDS}
        meta["zca_eps"] = None if self.zca is None else self.zca.eps
        meta["texture"] = self.texture
        return save_tensors(path, tensors, f"{FORMAT}/1", meta)

    @classmethod
    def load(cls, path, device="cpu") -> SyntheticSet:
        """Read a file written by :meth:`save`.

        Raises FileNotFoundError for a missing file and ValueError for a truncated file, a file that
        is not safetensors, or a safetensors file that is not a mttlite synthetic set.
        """
        tensors, meta = load_tensors(path, FORMAT, "synthetic set (.safetensors from SyntheticSet.save)", device=device)
        missing = [k for k in ("images", "labels") if k not in tensors]
        missing += [k for k in _META_FIELDS if k not in meta]
        if missing:
            raise ValueError(f"{path} is tagged {FORMAT}/1 but lacks {missing}; the file is damaged")
        zca = None
        if meta.get("zca_eps") is not None:
            zca = ZCA.from_tensors({k: v for k, v in tensors.items() if k.startswith("zca.")}, meta["zca_eps"])
        return cls(images=tensors["images"], labels=tensors["labels"], zca=zca, texture=meta.get("texture"),
                   **{k: meta[k] for k in _META_FIELDS})

    # -- looking at it -------------------------------------------------------------------------

    def pixels(self) -> Tensor:
        """(n, C, H, W) pixels in [0, 1]: p = clamp(ZCA⁻¹(x) · std + mean, 0, 1)."""
        x = self.images.detach()
        if self.zca is not None:
            x = self.zca.to(x.device).inverse(x)  # undo the whitening: x W⁻¹ + μ
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return (x * std + mean).clamp(0.0, 1.0)  # p = x · std + mean

    def save_png_grid(self, path, scale: int | None = None, names: bool = True) -> Path:
        """A PNG picture of the set, atomically: row r holds class r's images (arg-max class for soft
        labels), in storage order, one column per image, each upscaled ``scale``× (nearest; None: at
        least 112 px a side), the class names at the left (``names``). Layout: ``mttlite.grid``.
        A texture set shows each canvas tiled 3 × 3 (``texture.tile``): a seamless texture shows no seam."""
        from .grid import save_png

        p = self.pixels().cpu()
        if self.texture is not None:
            p = tile(p, 3)  # (n, C, 3 Hc, 3 Wc)
        return save_png(path, p, hard_labels(self.labels).cpu(), self.class_names, scale, names)

    def export_imagefolder(self, out_dir) -> Path:
        """Write out_dir/<class>/<i>.png for every image, loadable by ``torchvision.datasets.ImageFolder``.

        Class folders are named ``<index>_<class name>`` (index zero-padded, "/" replaced) so
        ImageFolder's alphabetical order gives back the original class indices; i is the image's
        index in the set. Soft labels: each image goes to its arg-max class and ``labels.json``
        keeps the full soft label of every file. The folder is built next to ``out_dir`` and moved
        into place at the end; an existing non-empty ``out_dir`` is an error.
        """
        from torchvision.utils import save_image

        out_dir = Path(out_dir)
        if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
            raise FileExistsError(f"{out_dir} already exists and is not an empty folder; choose a new folder or remove it")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_tmp_dir(out_dir)
        try:
            k_digits, i_digits = len(str(self.num_classes - 1)), len(str(max(len(self.images) - 1, 0)))
            folders = [f"{c:0{k_digits}d}_{re.sub(r'[^A-Za-z0-9._ -]', '_', name)}" for c, name in enumerate(self.class_names)]
            for f in folders:
                (tmp / f).mkdir()
            p = self.pixels().cpu()
            y = hard_labels(self.labels).cpu()
            files = []
            for i in range(len(p)):
                rel = f"{folders[int(y[i])]}/{i:0{i_digits}d}.png"
                save_image(p[i], tmp / rel, format="png")
                files.append(rel)
            if self.labels.is_floating_point():
                soft = {rel: row for rel, row in zip(files, self.labels.detach().cpu().tolist())}
                doc = {"classes": folders, "class_names": self.class_names, "soft_labels": soft}
                (tmp / "labels.json").write_text(json.dumps(doc, indent=1))
            if out_dir.exists():
                out_dir.rmdir()  # empty (checked above)
            os.replace(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out_dir

    # -- judging it ----------------------------------------------------------------------------

    def check_dataset(self, dataset) -> None:
        """Raise a ValueError unless ``dataset`` is the one this set was distilled from (same input space)."""
        problems = []
        if dataset.name != self.dataset:
            problems.append(f"it was distilled from {self.dataset!r}, not {dataset.name!r}")
        shape = (self.images.shape[1], *(self.texture["input"] if self.texture else self.images.shape[2:]))
        if (dataset.channel, *dataset.im_size) != tuple(shape):
            problems.append(f"its images are {tuple(shape)}, the dataset's {(dataset.channel, *dataset.im_size)}")
        if dataset.num_classes != self.num_classes:
            problems.append(f"it has {self.num_classes} classes, the dataset {dataset.num_classes}")
        if not (_close(dataset.mean, self.mean) and _close(dataset.std, self.std)):
            problems.append(f"its normalisation is mean {self.mean} std {self.std}, the dataset's {dataset.mean} {dataset.std}")
        if (self.zca is None) != (dataset.zca is None):
            want = "zca=True" if self.zca is not None else "zca=False"
            problems.append(f"the set {'is' if self.zca is not None else 'is not'} ZCA-whitened: load the dataset with {want}")
        elif self.zca is not None:
            ours, theirs = self.zca.to("cpu"), dataset.zca.to("cpu")
            same = (
                ours.dim == theirs.dim
                and torch.allclose(ours.mean, theirs.mean, atol=1e-5)
                and torch.allclose(ours.transform, theirs.transform, rtol=1e-4, atol=1e-4)
            )
            if not same:
                problems.append(f"its ZCA (eps {ours.eps}) differs from the dataset's (eps {theirs.eps})")
        if problems:
            raise ValueError(f"this synthetic set does not match dataset {dataset.name!r}: " + "; ".join(problems))

    def evaluate(self, dataset, protocol: EvalProtocol | None = None, **kw) -> EvalResult:
        """Train ``protocol.num_nets`` fresh networks on this set (lr α, or 0.01 if none) and score them.

        protocol: None -> ``EvalProtocol()``; kw: ``device``, ``progress`` (see ``evaluate.evaluate_set``).
        A texture set trains on random toroidal crops of its canvases (``evaluate_set(texture=True)``).
        """
        self.check_dataset(dataset)
        result = evaluate_set(self.images, self.labels, dataset, protocol, lr=self.syn_lr,
                              texture=self.texture is not None, **kw)
        result.set_info.update(method=self.method, ipc=self.ipc, distill_arch=self.arch)
        return result


def _check_texture(texture, canvas_hw: tuple[int, int], zca) -> dict:
    """``texture`` as {"canvas": [Hc, Wc], "input": [H, W]} of ints, checked against the images' (Hc, Wc)."""
    try:
        out = {key: [int(v) for v in texture[key]] for key in ("canvas", "input")}
        if not all(len(v) == 2 for v in out.values()):
            raise ValueError
    except (TypeError, KeyError, ValueError):
        raise ValueError(f"texture must be None or {{'canvas': [Hc, Wc], 'input': [H, W]}}, got {texture!r}") from None
    (Hc, Wc), (H, W) = out["canvas"], out["input"]
    if (Hc, Wc) != tuple(canvas_hw):
        raise ValueError(f"texture canvas {Hc}x{Wc} does not match the images' {canvas_hw[0]}x{canvas_hw[1]}")
    if not (1 <= H <= Hc and 1 <= W <= Wc):
        raise ValueError(f"a texture's input {H}x{W} must fit its canvas {Hc}x{Wc}")
    if zca is not None:
        raise ValueError("a texture set cannot carry a ZCA whitening (it acts on whole HxW images, not on canvases)")
    return out


def _close(a, b) -> bool:
    return len(a) == len(b) and all(math.isclose(float(u), float(v), rel_tol=1e-6, abs_tol=1e-7) for u, v in zip(a, b))

