"""Texture distillation (MTT §5): toroidal crops of a canvas, their gradient, and the texture mode end to end.

Each against an independent answer: the crop against ``torch.roll`` and a brute-force modular-index
loop, its wrap against the identities of a torus (rolling by the canvas size, or by (a, b) then
(Hc − a, Wc − b), changes nothing), its gradient against the 0/1 pattern of the pixels a crop reads,
the texture meta-gradient against float64 finite differences and the two gradient modes against each
other, the real initialisation against the plain one (same draws: the canvas's top-left cell is the
plain image), the export against a save/load round trip.
"""
from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from core_helpers import sgd_trajectories, tiny_convnet, toy_dataset
from device_guard import DeviceGuard
from mttlite.augment import DSAParams, dsa, rand_flip
from mttlite.distill import DistillConfig, Distiller, run
from mttlite.evaluate import EvalProtocol, train_epochs
from mttlite.kernels import StepKernels
from mttlite.matching import matching_loss
from mttlite.meta_gradient import meta_gradient
from mttlite.params import ParamSpec
from mttlite.pipeline import to_synset
from mttlite.student import make_plan, unroll
from mttlite.synset import SyntheticSet
from mttlite.texture import crop_at, tile, tile_canvas, toroidal_crop

DSA = "color_crop_cutout_flip_scale_rotate"


def _canvas(n=3, C=2, Hc=5, Wc=7, seed=0, dtype=torch.float64):
    return torch.randn(n, C, Hc, Wc, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _brute_crop(canvas, H, W, dy, dx):
    """out[b, c, i, j] = canvas[b, c, (i + dy_b) mod Hc, (j + dx_b) mod Wc], one element at a time."""
    n, C, Hc, Wc = canvas.shape
    out = torch.empty(n, C, H, W, dtype=canvas.dtype)
    for b, c, i, j in itertools.product(range(n), range(C), range(H), range(W)):
        out[b, c, i, j] = canvas[b, c, (i + int(dy[b])) % Hc, (j + int(dx[b])) % Wc]
    return out


# -- the crop and its wrap ------------------------------------------------------------------------------
def test_rolling_by_the_canvas_size_is_the_identity():
    x = _canvas()
    n, _, Hc, Wc = x.shape
    assert torch.equal(crop_at(x, (Hc, Wc), 0, 0), x)
    assert torch.equal(crop_at(x, (Hc, Wc), Hc, Wc), x)
    assert torch.equal(crop_at(x, (Hc, Wc), -3 * Hc, 2 * Wc), x)
    for a, b in itertools.product(range(Hc), range(Wc)):  # (a, b) then (Hc − a, Wc − b): back where it started
        rolled = crop_at(x, (Hc, Wc), a, b)
        assert torch.equal(rolled, torch.roll(x, (-a, -b), (2, 3)))
        assert torch.equal(crop_at(rolled, (Hc, Wc), Hc - a, Wc - b), x)
        assert (a, b) == (0, 0) or not torch.equal(rolled, x)  # a real roll moved something


def test_toroidal_crop_is_a_modular_gather_drawn_from_its_seed():
    x = _canvas()
    n, _, Hc, Wc = x.shape
    for (H, W), seed in itertools.product([(3, 4), (5, 7), (1, 1), (5, 2)], [0, 1, 12345]):
        gen = torch.Generator().manual_seed(seed)  # the contract: dy (n,) then dx (n,)
        dy, dx = torch.randint(0, Hc, (n,), generator=gen), torch.randint(0, Wc, (n,), generator=gen)
        got = toroidal_crop(x, (H, W), seed)
        assert torch.equal(got, _brute_crop(x, H, W, dy, dx))
        assert torch.equal(got, torch.stack([torch.roll(x[b], (-int(dy[b]), -int(dx[b])), (1, 2))[:, :H, :W]
                                             for b in range(n)]))  # the authors' roll, then top-left crop
        assert torch.equal(toroidal_crop(x, (H, W), torch.Generator().manual_seed(seed)), got)
    shared = toroidal_crop(x.new_zeros(4, 1, Hc, Wc) + x[:1, :1], (3, 3), 7, shared=True)  # one offset for all
    assert all(torch.equal(shared[0], shared[b]) for b in range(4))
    with pytest.raises(ValueError, match=r"needs 1 <= H <= Hc"):
        toroidal_crop(x, (6, 3), 0)


def test_the_gradient_of_a_crop_is_its_read_pattern_and_crops_reach_every_pixel():
    x = _canvas(n=2, C=1, Hc=5, Wc=6).requires_grad_(True)
    H, W = 3, 4
    (g,) = torch.autograd.grad(toroidal_crop(x, (H, W), 3).sum(), x)
    gen = torch.Generator().manual_seed(3)
    dy, dx = torch.randint(0, 5, (2,), generator=gen), torch.randint(0, 6, (2,), generator=gen)
    read = torch.zeros_like(x)
    for b, i, j in itertools.product(range(2), range(H), range(W)):
        read[b, 0, (i + int(dy[b])) % 5, (j + int(dx[b])) % 6] += 1
    assert torch.equal(g, read) and set(g.unique().tolist()) == {0.0, 1.0} and g.sum() == 2 * H * W
    # enough random crops: every canvas pixel, the wrapped-around corners included, gets gradient
    total = sum(toroidal_crop(x, (H, W), s) for s in range(40))
    (g,) = torch.autograd.grad(total.pow(2).sum(), x)
    assert (g != 0).all()
    w = torch.randn(2, 1, H, W, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda c: (toroidal_crop(c, (H, W), 11) * w).sum(), (x,))


def test_dsa_crops_the_canvas_first_from_the_same_seed():
    x = _canvas(n=4, C=1, Hc=9, Wc=10, dtype=torch.float32)
    p = DSAParams(texture_crop=(6, 6))
    assert torch.equal(dsa(x, "", 5, p), toroidal_crop(x, (6, 6), 5))  # no ops: the crop alone
    gen = torch.Generator().manual_seed(5)
    crop = toroidal_crop(x, (6, 6), gen)
    torch.randint(0, 1, (1,), generator=gen)  # mode S: the op index (one op)
    assert torch.equal(dsa(x, "flip", 5, p), rand_flip(crop, gen))
    assert dsa(x, DSA, 5, p).shape == (4, 1, 6, 6)
    assert torch.equal(dsa(x, DSA, 5, p), dsa(x, DSA, 5, p))  # replay by seed
    assert tile(x, 3).shape == (4, 1, 27, 30) and torch.equal(tile(x, 3)[..., 9:18, 20:30], x)


def test_tile_canvas_lays_images_out_row_major_and_cuts_at_the_canvas():
    tiles = torch.arange(2 * 4 * 1 * 3 * 3, dtype=torch.float32).view(2, 4, 1, 3, 3)
    c = tile_canvas(tiles, (5, 4))  # a 2 × 2 grid of 3 × 3 images, cut to 5 × 4
    assert c.shape == (2, 1, 5, 4)
    for b, t in itertools.product(range(2), range(4)):
        r, q = divmod(t, 2)
        cell = c[b, 0, 3 * r:3 * r + 3, 3 * q:3 * q + 3]
        assert torch.equal(cell, tiles[b, t, 0, :cell.shape[0], :cell.shape[1]])


# -- the meta-gradient through texture crops is exact ---------------------------------------------------
def _problem(Hc=6, im=4, n=4, N=3, batch_syn=3, seed=0):
    net = tiny_convnet(num_classes=3, width=2, im=im)
    spec = ParamSpec.from_module(net)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, Hc, Hc, generator=g, dtype=torch.float64)
    y = torch.arange(n) % 3
    ts = spec.flatten(dict(net.named_parameters())).detach()
    tt = ts + 0.05 * torch.randn(spec.num_params, generator=g, dtype=torch.float64)
    return net, spec, x, y, ts, tt, make_plan(n, N, batch_syn, g)


@pytest.mark.parametrize("strategy", ["", DSA])
def test_texture_meta_gradient_matches_finite_differences_in_both_modes(strategy):
    net, spec, x, y, ts, tt, plan = _problem()
    p = DSAParams(texture_crop=(4, 4))
    alpha = torch.tensor(0.1, dtype=torch.float64)

    def L(images, a):
        return matching_loss(unroll(net, spec, ts, images, y, a, plan, strategy, p).theta, ts, tt)

    assert torch.autograd.gradcheck(L, (x.clone().requires_grad_(True), alpha.clone().requires_grad_(True)),
                                    eps=1e-6, atol=1e-7, rtol=1e-4)
    ref = meta_gradient("unroll", net, spec, ts, tt, x, y, alpha, plan, strategy, p)
    eager = StepKernels(net, spec, compile=False)  # the kernel path: chained through the crop by autograd
    for mode, kernels in itertools.product(("exact", "unroll"), (None, eager)):
        got = meta_gradient(mode, net, spec, ts, tt, x, y, alpha, plan, strategy, p, kernels=kernels)
        assert got.loss.item() == pytest.approx(ref.loss.item(), rel=1e-12)
        assert ((got.images - ref.images).norm() / ref.images.norm()).item() <= 1e-6
        assert got.syn_lr.item() == pytest.approx(ref.syn_lr.item(), rel=1e-6)
    assert ref.images.shape == x.shape and ref.images.abs().sum() > 0


@pytest.mark.parametrize("mode", ["unroll", "exact"])
def test_texture_meta_gradient_runs_on_a_device_without_host_syncs(mode):
    meta = torch.device("meta")
    net = tiny_convnet(num_classes=3, dtype=torch.float32).to(meta)
    spec = ParamSpec.from_module(net)
    ts, tt = torch.empty(spec.num_params, device=meta), torch.empty(spec.num_params, device=meta)
    x, y = torch.empty(6, 1, 12, 12, device=meta), torch.empty(6, dtype=torch.int64, device=meta)
    plan = make_plan(6, 3, 4, torch.Generator().manual_seed(0))
    with DeviceGuard(meta) as guard:
        mg = meta_gradient(mode, net, spec, ts, tt, x, y, torch.empty((), device=meta), plan, DSA,
                           DSAParams(texture_crop=(8, 8)))
    assert guard.ops > 100 and mg.images.shape == (6, 1, 12, 12) and mg.images.device.type == "meta"


# -- settings ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup():
    ds = toy_dataset()
    net = tiny_convnet(num_classes=3, width=4, im=8, dtype=torch.float32)
    return ds, net, sgd_trajectories(net, ds.train_images, ds.train_labels, num_experts=2, epochs=3, lr=0.1)


def _config(**kw):
    base = dict(dataset="toy", ipc=2, syn_steps=3, expert_epochs=1, max_start_epoch=2, iterations=3, lr_img=10.0,
                lr_lr=1e-4, lr_teacher=0.05, dsa_strategy=DSA, seed=3, texture_canvas=12)
    base.update(kw)
    return DistillConfig(**base)


def test_texture_is_off_by_default_and_old_configs_load():
    c = DistillConfig()
    assert c.texture_canvas is None
    old = {k: v for k, v in c.to_dict().items() if k != "texture_canvas"}
    assert DistillConfig.from_dict(old) == c
    assert DistillConfig.from_dict(_config().to_dict()) == _config()


@pytest.mark.parametrize("kw, valid", [
    (dict(zca=True), "zca"),
    (dict(texture_canvas=0), "positive integer"),
    (dict(texture_canvas=True), "positive integer"),
    (dict(texture_canvas=12.0), "positive integer"),
])
def test_bad_texture_settings_name_the_field(kw, valid):
    with pytest.raises(ValueError) as e:
        _config(**kw).validate()
    lines = str(e.value).splitlines()[1:]
    assert len(lines) == 1 and "texture_canvas" in lines[0] and valid in lines[0], str(e.value)


def test_the_command_line_flag():
    from mttlite.cli import _config_from, build_parser

    def config(flags):
        return _config_from(build_parser().parse_args(f"distill --buffer b --out o {flags}".split()))

    assert config("--texture-canvas 56").texture_canvas == 56
    assert config("").texture_canvas is None and config("--texture-canvas none") == DistillConfig()
    with pytest.raises(ValueError, match=r"texture_canvas cannot be used with zca=True"):
        config("--texture-canvas 56 --zca")


def test_a_canvas_smaller_than_the_input_or_zca_data_is_refused(setup):
    ds, net, experts = setup
    with pytest.raises(ValueError, match=r"texture_canvas must be at least the images' side \(8 for 8x8 images.*7x7"):
        Distiller(_config(texture_canvas=7), ds, net, experts)
    whitened = SimpleNamespace(**{**vars(ds), "zca": object()})
    with pytest.raises(ValueError, match=r"texture_canvas cannot be used with ZCA-whitened data"):
        Distiller(_config(), whitened, net, experts)
    Distiller(_config(texture_canvas=8), ds, net, experts)  # a canvas of the input's size: a toroidal image


# -- the texture mode end to end ---------------------------------------------------------------------------
def _find_class(ds, patch):
    """The classes of the training images whose top-left corner equals ``patch`` (C, h, w)."""
    h, w = patch.shape[-2:]
    hit = (ds.train_images[:, :, :h, :w] == patch).flatten(1).all(1)
    return set(ds.train_labels[hit].tolist())


def test_real_initialisation_tiles_real_images_of_the_class(setup):
    ds, net, experts = setup
    plain = Distiller(_config(texture_canvas=None), ds, net, experts)
    tex = Distiller(_config(), ds, net, experts)
    x = tex.images.detach()
    assert x.shape == (6, 1, 12, 12) and torch.equal(tex.labels, plain.labels)
    assert torch.equal(x[..., :8, :8], plain.images.detach())  # same draws: cell 0 is the plain image
    for i, k in enumerate(tex.labels.tolist()):  # the cut cells (0, 1), (1, 0), (1, 1): real images of class k
        for r, q in ((0, 8), (8, 0), (8, 8)):
            assert _find_class(ds, x[i, :, r:r + 8, q:q + 8]) == {k}
    noise = Distiller(_config(pix_init="noise"), ds, net, experts).images
    assert noise.shape == (6, 1, 12, 12) and abs(noise.std().item() - 1) < 0.2
    soft = Distiller(_config(soft_labels=True), ds, net, experts)  # logits of the top-left crop
    assert soft.label_logits.shape == (6, 3)


def test_a_texture_distillation_exports_a_set_that_round_trips_and_evaluates(setup, tmp_path, monkeypatch):
    ds, net, experts = setup
    d = run(Distiller(_config(iterations=2), ds, net, experts), tmp_path / "run", progress=False)
    assert d.iteration == 2 and all(math.isfinite(v) for v in d.history.loss)
    assert d.texture == {"canvas": [12, 12], "input": [8, 8]}
    resumed = run(Distiller(_config(iterations=3), ds, net, experts), tmp_path / "run", progress=False)
    assert resumed.iteration == 3  # the checkpoint of a texture run resumes

    buffer = type("Buf", (), {"meta": {"arch": "convnet"}, "path": "memory", "__len__": lambda self: 2})()
    s = to_synset(resumed, buffer)
    assert s.texture == {"canvas": [12, 12], "input": [8, 8]} and s.images.shape == (6, 1, 12, 12)
    back = SyntheticSet.load(s.save(tmp_path / "set.safetensors"))
    assert back.texture == s.texture and torch.equal(back.images, s.images) and torch.equal(back.labels, s.labels)
    back.check_dataset(ds)  # the input size, not the canvas, is what must match the data

    shown = {}
    monkeypatch.setattr("mttlite.grid.save_png", lambda path, pixels, *a, **k: shown.setdefault("p", pixels))
    back.save_png_grid(tmp_path / "set.png")
    assert torch.equal(shown["p"], tile(back.pixels(), 3))  # each canvas tiled 3 × 3

    res = back.evaluate(ds, EvalProtocol(width=8, epochs=2, num_nets=1, batch_size=4), progress=False)
    assert 0.0 <= res.mean <= 1.0 and res.set_info["texture"] == {"canvas": [12, 12], "input": [8, 8]}
    with pytest.raises(ValueError, match="does not match the images"):
        SyntheticSet(**{**vars(back), "texture": {"canvas": [8, 8], "input": [8, 8]}})


class _Recorder(nn.Module):
    """A linear classifier that keeps every batch it is trained on."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 2)
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.fc(x.flatten(1))


def test_evaluation_trains_on_fresh_toroidal_crops_of_the_canvases():
    canvas = torch.randn(1, 1, 5, 6, generator=torch.Generator().manual_seed(0))
    model = _Recorder()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    protocol = EvalProtocol(epochs=30, batch_size=1, num_nets=1)
    train_epochs(model, opt, canvas, torch.tensor([1]), protocol, 0.1, torch.Generator().manual_seed(1), "",
                 crop=(4, 4))
    crops = {(a, b): crop_at(canvas, (4, 4), a, b)[0] for a in range(5) for b in range(6)}
    offsets = [next(o for o, c in crops.items() if torch.equal(c, x[0])) for x in model.seen]  # each is a crop
    assert len(offsets) == 30 and len(set(offsets)) > 10  # a fresh offset per batch
