"""The synthetic-set artefact: bit-exact save/load, clear errors for bad files, pixels() as the
exact inverse of the input transform, PNG grid and ImageFolder export, and one-call evaluation."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from mttlite.data import FASHION_MNIST_CLASSES, Dataset, load_dataset
from mttlite.evaluate import EvalProtocol, evaluate_set
from mttlite.io import save_tensors
from mttlite.synset import SyntheticSet
from mttlite.zca import ZCA

MEAN, STD = (0.2861,), (0.3530,)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def known_pixels(n=6, c=1, h=5, w=7, seed=0):
    """Pixels strictly inside (0, 1), so that clamping never hides an error."""
    return 0.05 + 0.9 * torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def make_set(labels="hard", zca=False, n_per_class=2, k=3, h=5, w=7, shuffle=True) -> tuple[SyntheticSet, torch.Tensor]:
    """A set built from known pixels p: x = ZCA((p - mean) / std). Returns (set, p)."""
    n = n_per_class * k
    p = known_pixels(n, 1, h, w)
    y = torch.arange(k).repeat_interleave(n_per_class)
    if shuffle:  # storage order need not be class order
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
        p, y = p[perm], y[perm]
    x = (p - MEAN[0]) / STD[0]
    whiten = None
    if zca:
        fit_on = (known_pixels(50, 1, h, w, seed=2) - MEAN[0]) / STD[0]
        whiten = ZCA.fit(fit_on, eps=0.1)
        x = whiten(x)
    if labels == "soft":
        y = 0.7 * F.one_hot(y, k).float() + torch.rand(n, k, generator=torch.Generator().manual_seed(3)) * 0.1
    s = SyntheticSet(
        images=x, labels=y, syn_lr=0.0123456789012345, dataset="toy", class_names=FASHION_MNIST_CLASSES[:k],
        mean=MEAN, std=STD, zca=whiten, arch="convnet", arch_kwargs={"width": 16, "depth": 3},
        method="mtt", config={"ipc": n_per_class, "syn_steps": 20, "nested": {"a": [1, 2.5, None]}},
        provenance={"iterations": 7, "seconds": 1.5},
    )
    return s, p


# --- the file ---------------------------------------------------------------------------------


@pytest.mark.parametrize("labels", ["hard", "soft"])
@pytest.mark.parametrize("zca", [False, True])
def test_save_load_round_trip_is_bit_exact(tmp_path, labels, zca):
    s, _ = make_set(labels, zca)
    path = s.save(tmp_path / "sub" / "set.safetensors")
    assert path.is_file() and [f.name for f in path.parent.iterdir()] == ["set.safetensors"]  # no temp files left
    back = SyntheticSet.load(path)
    assert torch.equal(back.images, s.images) and back.images.dtype == torch.float32
    assert torch.equal(back.labels, s.labels) and back.labels.dtype == s.labels.dtype
    for f in dataclasses.fields(SyntheticSet):
        if f.name not in ("images", "labels", "zca"):
            assert getattr(back, f.name) == getattr(s, f.name), f.name
    assert back.syn_lr == 0.0123456789012345  # the float itself, not a rounding of it
    if zca:
        assert back.zca.eps == s.zca.eps
        for key, t in s.zca.to_tensors().items():
            assert torch.equal(back.zca.to_tensors()[key], t), key
    else:
        assert back.zca is None
    assert {"mttlite", "torch", "created", "iterations"} <= set(back.provenance)
    # and the file itself is plain safetensors: tensors by name, JSON metadata with the format tag
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["mttlite"])
        keys = set(f.keys())
    assert meta["format"] == "mttlite-synset/1"
    assert keys == {"images", "labels"} | ({"zca.mean", "zca.transform", "zca.inverse_transform"} if zca else set())


def test_syn_lr_none_round_trips(tmp_path):
    s, _ = make_set()
    s = dataclasses.replace(s, syn_lr=None, method="random_real")
    back = SyntheticSet.load(s.save(tmp_path / "s.safetensors"))
    assert back.syn_lr is None and back.method == "random_real"


def test_bad_files_give_clear_errors(tmp_path):
    s, _ = make_set()
    good = s.save(tmp_path / "good.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        SyntheticSet.load(tmp_path / "missing.safetensors")
    data = good.read_bytes()
    for cut in (len(data) // 2, len(data) - 1, 20, 3):  # truncated inside the data, inside the header, ...
        (tmp_path / "cut.safetensors").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated or not a safetensors"):
            SyntheticSet.load(tmp_path / "cut.safetensors")
    (tmp_path / "text.safetensors").write_text("these are not the tensors you are looking for\n" * 10)
    with pytest.raises(ValueError, match="not a safetensors"):
        SyntheticSet.load(tmp_path / "text.safetensors")
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "foreign.safetensors"))  # someone else's file
    with pytest.raises(ValueError, match="not a mttlite"):
        SyntheticSet.load(tmp_path / "foreign.safetensors")
    save_tensors(tmp_path / "buffer.safetensors", {"x": torch.zeros(2)}, "mttlite-buffer/1", {})  # other artefact
    with pytest.raises(ValueError, match="mttlite-buffer/1"):
        SyntheticSet.load(tmp_path / "buffer.safetensors")


def test_inconsistent_sets_are_rejected():
    s, _ = make_set()
    with pytest.raises(ValueError, match="hard labels"):
        dataclasses.replace(s, labels=s.labels[:-1])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        dataclasses.replace(s, labels=s.labels + 3)
    with pytest.raises(ValueError, match="soft labels"):
        dataclasses.replace(s, labels=torch.rand(len(s.labels), 5))
    with pytest.raises(ValueError, match="one value per channel"):
        dataclasses.replace(s, mean=(0.1, 0.2, 0.3))


# --- looking at it ----------------------------------------------------------------------------


def test_pixels_inverts_normalisation_exactly():
    s, p = make_set()
    assert torch.allclose(s.pixels(), p, atol=1e-6, rtol=0)
    # outside [0, 1] is clamped for display
    s2 = dataclasses.replace(s, images=torch.full_like(s.images, 100.0))
    assert torch.equal(s2.pixels(), torch.ones_like(p))


def test_pixels_undoes_zca_then_normalisation():
    s, p = make_set(zca=True)
    assert not torch.allclose(s.images, (p - MEAN[0]) / STD[0], atol=1e-2)  # the whitening did something
    assert torch.allclose(s.pixels(), p, atol=1e-4, rtol=0)


def test_png_grid_has_one_row_per_class(tmp_path):
    s, p = make_set(n_per_class=2, k=3, h=5, w=7)  # shuffled storage order
    path = s.save_png_grid(tmp_path / "grid.png", scale=1, names=False)
    img = Image.open(path)
    # mttlite.grid at scale 1 without names, 2 px apart: width = ipc (7 + 2) + 2, height = K (5 + 2) + 2
    # (tests/test_report.py checks other scales, the names and colour images)
    assert img.size == (2 * 9 + 2, 3 * 7 + 2)
    arr = torch.tensor(np.array(img.convert("L"))).long()  # (H, W) uint8 grey
    y = s.labels
    quantised = (p * 255 + 0.5).floor().long()  # the byte of p: ⌊255 p + 0.5⌋
    for c in range(3):
        members = quantised[y == c]  # class c's images in storage order = left to right in row c
        for j in range(2):
            tile = arr[2 + c * 7: 2 + c * 7 + 5, 2 + j * 9: 2 + j * 9 + 7]
            assert torch.equal(tile, members[j, 0]), (c, j)
    assert list(tmp_path.iterdir()) == [path]


def test_imagefolder_export_reloads_with_the_same_labels(tmp_path):
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import pil_to_tensor

    s, p = make_set(n_per_class=3, k=4)
    out = s.export_imagefolder(tmp_path / "images")
    folder = ImageFolder(str(out))
    assert len(folder) == len(s.labels)
    assert folder.classes == ["0_T-shirt_top", "1_Trouser", "2_Pullover", "3_Dress"]  # "/" replaced, index order
    quantised = (p * 255 + 0.5).floor().long()
    for path, target in folder.samples:
        i = int(path.rsplit("/", 1)[1].split(".")[0])  # <i>.png: index in the set
        assert target == int(s.labels[i])
        img = pil_to_tensor(Image.open(path).convert("L")).long()
        assert torch.equal(img[0], quantised[i, 0])
    assert not (out / "labels.json").exists()
    with pytest.raises(FileExistsError, match="images"):
        s.export_imagefolder(out)


def test_imagefolder_export_of_soft_labels(tmp_path):
    from torchvision.datasets import ImageFolder

    s, _ = make_set(labels="soft", n_per_class=2, k=3)
    out = s.export_imagefolder(tmp_path / "soft")
    folder = ImageFolder(str(out))
    doc = json.loads((out / "labels.json").read_text())
    assert doc["classes"] == folder.classes
    for path, target in folder.samples:
        i = int(path.rsplit("/", 1)[1].split(".")[0])
        assert target == int(s.labels[i].argmax())
        rel = path[len(str(out)) + 1:]
        assert torch.equal(torch.tensor(doc["soft_labels"][rel]), s.labels[i])


def test_ipc_and_classes():
    s, _ = make_set(n_per_class=4, k=3)
    assert (s.ipc, s.num_classes) == (4, 3)
    assert make_set("soft", n_per_class=2, k=3)[0].ipc == 2


# --- judging it -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ds():
    return load_dataset("fashion-mnist-mini")


def test_evaluate_is_evaluate_set_with_the_learned_lr(ds):
    s = SyntheticSet.from_random_real(ds, 1, seed=4)
    assert s.syn_lr is None and s.ipc == 1 and s.method == "random_real"
    s = dataclasses.replace(s, syn_lr=0.02)
    protocol = EvalProtocol(width=8, epochs=3, num_nets=1, dsa_strategy="")
    res = s.evaluate(ds, protocol, progress=False)
    ref = evaluate_set(s.images, s.labels, ds, protocol, lr=0.02, progress=False)
    assert res.lr == 0.02 and res.accs == ref.accs
    assert s.evaluate(ds, dataclasses.replace(protocol, lr=0.5), progress=False).lr == 0.5  # explicit protocol lr wins
    assert dataclasses.replace(s, syn_lr=None).evaluate(ds, protocol, progress=False).lr == 0.01


def test_evaluate_refuses_a_different_dataset(ds):
    s = SyntheticSet.from_random_real(ds, 1)
    other = dataclasses.replace(ds, name="mnist")
    with pytest.raises(ValueError, match="distilled from 'fashion-mnist-mini', not 'mnist'"):
        s.evaluate(other, EvalProtocol(num_nets=1, epochs=1))
    fitted = ZCA.fit(ds.train_images[:40], eps=0.1)
    with pytest.raises(ValueError, match="zca=False"):
        s.evaluate(dataclasses.replace(ds, zca=fitted), EvalProtocol(num_nets=1, epochs=1))
    with pytest.raises(ValueError, match="zca=True"):
        dataclasses.replace(s, zca=fitted).evaluate(ds, EvalProtocol(num_nets=1, epochs=1))
    small = Dataset("fashion-mnist-mini", ds.train_images[:, :, :14, :14], ds.train_labels, ds.test_images[:, :, :14, :14],
                    ds.test_labels, ds.class_names, ds.mean, ds.std)
    with pytest.raises(ValueError, match=r"\(1, 28, 28\)"):
        s.evaluate(small, EvalProtocol(num_nets=1, epochs=1))
