"""The pictures a person looks at: the class × IPC PNG of a set (``mttlite.grid``) and the run report
``report.html`` (``mttlite.report``), checked against answers computed here: the grid's size from its
formula, each cell from ⌊255 p + 0.5⌋ upscaled with ``np.kron``, the class names by drawing them
alone, and the report by parsing it (html.parser) and decoding what it embeds."""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mttlite import grid, report
from mttlite.data import FASHION_MNIST_CLASSES, load_dataset
from mttlite.experts import train_experts
from mttlite.io import read_meta_only
from mttlite.synset import SyntheticSet

PAD = 2  # the gap the module docstring promises


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pixels(n, c, h, w, seed=0):
    """Pixels strictly inside (0, 1), so that clamping never hides an error."""
    return 0.05 + 0.9 * torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def decode(png: bytes) -> Image.Image:
    return Image.open(io.BytesIO(png))


def expected_size(rows, cols, h, w, s, label_width=0):
    return label_width + cols * s * w + (cols + 1) * PAD, rows * s * h + (rows + 1) * PAD


def cell(img: np.ndarray, r, c, h, w, s, label_width=0) -> np.ndarray:
    x, y = label_width + PAD + c * (s * w + PAD), PAD + r * (s * h + PAD)
    return img[y:y + s * h, x:x + s * w]


# -- the picture of a set ---------------------------------------------------------------------------


@pytest.mark.parametrize("channels, scale", [(1, 3), (3, 2), (1, None)])
def test_cells_are_the_upscaled_images_and_the_size_follows_the_formula(channels, scale):
    k, h, w = 3, 5, 7
    labels = torch.tensor([2, 0, 1, 0, 2, 0, 2])  # storage order is not class order; class 1 has 1 image
    p = pixels(len(labels), channels, h, w)
    names = ["a", "b", "c"]
    img = decode(grid.png_bytes(p, labels, names, scale=scale, names=False))
    s = scale or 112 // 7  # auto: ⌈112 / max(H, W)⌉ = 16 for 5 × 7 images
    assert img.size == expected_size(k, 3, h, w, s)  # 3 columns: the largest class has 3 images
    assert img.mode == ("L" if channels == 1 else "RGB")
    arr = np.array(img).reshape(img.size[1], img.size[0], channels)
    b = (p * 255 + 0.5).floor().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (n, H, W, C) bytes
    for r in range(k):
        members = [i for i in range(len(labels)) if labels[i] == r]  # left to right in storage order
        for c in range(3):
            got = cell(arr, r, c, h, w, s)
            if c < len(members):
                want = np.stack([np.kron(b[members[c], :, :, ch], np.ones((s, s), np.uint8)) for ch in range(channels)], -1)
                assert np.array_equal(got, want), (r, c)
            else:
                assert (got == 255).all(), (r, c)  # a missing image leaves the cell empty
    assert json.loads(img.text["class_names"]) == names


def test_auto_scale_is_112_px_a_side_within_the_size_cap():
    assert grid.auto_scale(10, 10, 28, 28) == 4  # 28 × 28 → 112 px tiles
    assert grid.auto_scale(10, 1, 32, 32) == 4 and grid.auto_scale(200, 1, 64, 64) == 1
    s = grid.auto_scale(100, 50, 32, 32)  # CIFAR-100 at IPC 50 would be 6 400 px tall at ×4
    assert s >= 1 and max(expected_size(100, 50, 32, 32, s)) <= 4096 < max(expected_size(100, 50, 32, 32, s + 1))


def test_class_names_are_drawn_in_their_rows():
    font = grid.default_font(16)
    if font is None:
        pytest.skip("Pillow gives no font here: the names are only in the PNG's text chunk")
    names = FASHION_MNIST_CLASSES[:4]
    labels = torch.arange(4).repeat(2)
    p = pixels(8, 1, 28, 28)
    img = decode(grid.png_bytes(p, labels, names, scale=4))
    without = decode(grid.png_bytes(p, labels, names, scale=4, names=False))
    label_width = img.size[0] - without.size[0]
    widest = max(font.getbbox(n)[2] for n in names)
    assert label_width >= widest and img.size[1] == without.size[1]
    arr, plain = np.array(img), np.array(without)
    assert np.array_equal(arr[:, label_width:], plain)  # the names only add a column at the left
    for r, name in enumerate(names):
        band = arr[PAD + r * (112 + PAD): PAD + r * (112 + PAD) + 112, :label_width]
        # the name drawn alone, black on white: the ink of row r's band is exactly that text
        alone = Image.new("L", (widest + 40, 80), 255)
        ImageDraw.Draw(alone).text((20, 20), name, fill=0, font=font)
        want = np.array(alone)
        assert np.array_equal(_ink(band), _ink(want)), name
    assert (arr[:, :label_width] == 255).any() and json.loads(img.text["class_names"]) == names


def _ink(a: np.ndarray) -> np.ndarray:
    """The smallest box holding every non-white pixel."""
    ys, xs = np.nonzero(a < 255)
    assert len(ys), "no text drawn"
    return a[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def test_the_set_s_png_is_its_pixels(tmp_path):
    ds = load_dataset("fashion-mnist-mini")
    s = SyntheticSet.from_random_real(ds, 2, seed=1)
    path = s.save_png_grid(tmp_path / "synset.png", names=False)
    img = Image.open(path)
    assert img.size == expected_size(10, 2, 28, 28, 4) and list(tmp_path.iterdir()) == [path]
    b = (s.pixels() * 255 + 0.5).floor().to(torch.uint8).numpy()
    arr = np.array(img)
    for r in (0, 9):
        members = (s.labels == r).nonzero().flatten().tolist()
        assert np.array_equal(cell(arr, r, 1, 28, 28, 4), np.kron(b[members[1], 0], np.ones((4, 4), np.uint8)))


# -- the report ---------------------------------------------------------------------------------------


class Page(HTMLParser):
    """What the report holds: its <img> sources and its <polyline> points, by parsing it."""

    def __init__(self):
        super().__init__()
        self.images, self.curves, self.open = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a["src"])
        elif tag == "polyline":
            self.curves.append([tuple(float(v) for v in pt.split(",")) for pt in a["points"].split()])
        if tag not in ("img", "meta", "rect", "polyline"):
            self.open.append(tag)

    def handle_endtag(self, tag):
        if tag not in ("img", "meta", "rect", "polyline"):
            assert self.open and self.open.pop() == tag, f"</{tag}> closes nothing"


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    page.close()
    assert page.open == [], page.open
    return page


def png_of(src: str) -> bytes:
    head, _, data = src.partition(",")
    assert head == "data:image/png;base64"  # embedded: nothing is fetched
    return base64.b64decode(data)


def test_report_embeds_every_snapshot_and_draws_the_history_exactly():
    history = {"loss": [1.0, 0.8125, 0.70001, float("nan"), 0.5], "syn_lr": [0.01, 0.0101, 0.0102, 0.0103, 0.0104]}
    labels = torch.arange(3)
    snaps = {i: grid.png_bytes(pixels(3, 1, 4, 4, seed=i), labels, ["a", "b", "c"], scale=2) for i in (0, 2, 5)}
    page = parse(report.render(history, snaps, [("dataset", "toy")]))
    assert [png_of(src) for src in page.images] == [snaps[0], snaps[2], snaps[5]]
    loss, alpha = page.curves
    assert loss == [(1, 1.0), (2, 0.8125), (3, 0.70001), (5, 0.5)]  # the non-finite L is left out
    assert alpha == [(i, v) for i, v in enumerate(history["syn_lr"], start=1)]


def test_snapshot_iterations():
    assert report.snapshot_iterations(50) == [0, 13, 25, 38, 50]
    assert report.snapshot_iterations(3) == [0, 1, 2, 3] and report.snapshot_iterations(1) == [0, 1]


def test_distill_writes_the_report_of_its_run(tmp_path):
    """`mttlite distill` (a subprocess, as a user runs it): report.html holds the picture of every
    snapshot iteration and the curves of the checkpoint's history; a fresh start drops old snapshots."""
    ds = load_dataset("fashion-mnist-mini")
    buf = train_experts(ds, tmp_path / "buf", num_experts=1, train_epochs=2, width=4, progress=False)
    out = tmp_path / "run"
    (out / "snapshots").mkdir(parents=True)
    (out / "snapshots" / "iteration_000099.png").write_bytes(b"from an earlier run")
    r = subprocess.run([sys.executable, "-m", "mttlite", "distill", "--buffer", str(buf.path), "--out", str(out),
                        "--iterations", "4", "--syn-steps", "2", "--max-start-epoch", "1", "--expert-epochs", "1"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{out}/report.html" in r.stdout
    page = parse((out / "report.html").read_text(encoding="utf-8"))
    snaps = sorted((out / "snapshots").iterdir())
    assert [f.name for f in snaps] == [f"iteration_{i:06d}.png" for i in (0, 1, 2, 3, 4)]
    assert [png_of(src) for src in page.images] == [f.read_bytes() for f in snaps]
    history = read_meta_only(out / "checkpoint.safetensors")["history"]
    assert len(history["loss"]) == 4
    assert page.curves == [[(i, v) for i, v in enumerate(history[k], start=1)] for k in ("loss", "syn_lr")]
    final = Image.open(snaps[-1])
    assert final.tobytes() == Image.open(out / "synset.png").tobytes()  # the last snapshot is the saved set
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
