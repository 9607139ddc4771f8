# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/mttlite/mttlite/blob/main/notebooks/10_extensions.ipynb)
#
# # 10 · Extensions: parameter pruning, model augmentation, texture distillation
#
# **In the paper:** Eq. 2, the matching loss, restricted by a mask (Li et al.; PAD); the start $\theta^*_t$ of
# Algorithm 1, perturbed (Zhang et al.); and §5, tileable textures. The symbols are defined in
# [`docs/method.md`](../docs/method.md).
#
# Three ideas from MTT's seed papers that mttlite implements, each a switch of `DistillConfig`, off
# by default (off, a run is plain MTT, bit for bit):
#
# | switch | paper | what changes |
# |---|---|---|
# | `prune_rule`, `prune_fraction` | Li et al., "Dataset Distillation Using Parameter Pruning" (IEICE Trans. 2024); PAD, Li et al., "Prioritize Alignment in Dataset Distillation" (2024) | *which parameters* are matched: a mask $m$ in both norms of $\mathcal{L}$ |
# | `expert_perturb` (and the baselines' `model_pool`, `rho`) | Zhang et al., "Accelerating Dataset Distillation via Model Augmentation" (CVPR 2023) | *which network* the student starts from: $\theta^*_t$ moved by a random, filter-normalised step |
# | `texture_canvas` | MTT (Cazenavette et al., CVPR 2022), §5 | *what an image is*: a canvas larger than the input, seen through wrap-around crops |
#
# What you will learn: what each paper changed and why it helps (a few lines each); the two pruning
# masks drawn over the layers, and the per-layer matching loss with and without them on a real
# student unroll; a short distillation with and without pruning; how a perturbation of size $\rho$
# moves every filter and turns the meta-gradient; a texture run, its canvases tiled 3 × 3. Each
# section re-derives one thing by hand and checks it against the library; two exercises at the end.
#
# **Run time.** Opened without a GPU, the notebook picks the classroom CPU profile
# (`profile = "auto"`, see `notebooks/README.md`): **2.4 min on 2 CPU cores from a cold
# start**, the experts included (142 s, measured on a 2-core AMD EPYC with
# `python benchmarks/notebook_times.py --notebooks 10`).
# The teaching parameters (what a GPU gets): about 1 min on a Colab T4 GPU (estimate, not yet
# measured). CI parameters: about 20 s on one CPU thread once the CI experts exist (measured).
# `benchmarks/family_table.py --variants mtt,prune,depth,texture,perturb` measures each switch's
# accuracy against plain MTT under one protocol.

# %%
# Set-up. On Colab this installs mttlite from its repository (without the `[notebooks]` extra:
# Colab has plotly and ipywidgets); where mttlite is importable already (a local clone, CI) it
# installs nothing. MTTLITE_REQUIREMENT is written from pyproject.toml by `make notebooks`.
import importlib.util
import subprocess
import sys

MTTLITE_REQUIREMENT = "mttlite[colab] @ git+https://github.com/mttlite/mttlite.git"
if importlib.util.find_spec("mttlite") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", MTTLITE_REQUIREMENT], check=True)
    importlib.invalidate_caches()

from mttlite.notebook import choose_profile, setup

# "cuda" if torch.cuda.is_available() else "cpu", printed with the GPU's name; on Colab setup() also
# turns on the widget manager that the sliders and progress bars need
device = setup()

# %%
import dataclasses
import itertools
import json
import math
import time
from pathlib import Path

import ipywidgets as widgets
import numpy as np
import plotly.express as px
import plotly.graph_objects as go
import torch
from IPython.display import display
from plotly.subplots import make_subplots

from mttlite.data import load_dataset
from mttlite.distill import DistillationDiverged, preset, run, start_window
from mttlite.experts import train_experts
from mttlite.matching import matching_breakdown, matching_loss
from mttlite.meta_gradient import meta_gradient
from mttlite.model_augment import EarlyPool, perturb
from mttlite.pipeline import make_distiller, to_synset
from mttlite.pruning import depth_mask, mask_counts, mismatch_mask
from mttlite.student import make_plan, unroll
from mttlite.texture import crop_at, tile, toroidal_crop

# %% tags=["parameters"]
profile = "auto"  # "auto": "cpu" without a GPU, "teaching" with one; or "teaching", "cpu", "ci"
dataset = "fashion-mnist-mini"
buffer_root = "runs/notebooks/buffers"  # shared expert cache (the experts of notebook 09)
width = 32
num_experts = 3
train_epochs = 6
ipc = 1
syn_steps = 20  # N
expert_epochs = 2  # M
max_start_epoch = 4  # T+
iterations = 40  # each distillation of section 1 (plain, and each pruning rule): the same budget
lr_img = 100.0
lr_lr = 1e-6
prune_fraction = 0.1  # β of Li et al.'s rule: the share of the parameters with the largest mismatch pruned
depth_ratio = 0.5  # r of PAD's rule: the share of θ pruned from the input side (PAD: 0 at IPC 1, 0.5 from IPC 10)
score_draws = 8  # fixed (expert, t, plan) draws on which every set of section 1 is scored with the plain L
rhos = [0.0, 0.01, 0.03, 0.1, 0.3]  # ρ of the perturbation (section 2); 0 first: the reference
noise_draws = 4  # perturbation draws per ρ (and other plans for the reference)
texture_scale = 2  # the texture canvas side, in input sides (28 → 56)
texture_iterations = 40
seed = 0
results_path = None

# %%
profile = choose_profile(profile, device)  # mttlite.notebook.PROFILES
if profile == "cpu":  # the classroom CPU profile: <= 5 min on 2 cores from a cold start, experts included
    iterations, texture_iterations = 30, 30  # the shipped sizes are CPU sizes already
elif profile == "ci":  # CI size, see notebooks/README.md
    width, num_experts, train_epochs, syn_steps, max_start_epoch, iterations = 16, 2, 3, 10, 2, 8
    texture_iterations, score_draws, noise_draws = 8, 4, 2
    buffer_root = "runs/notebooks-ci/buffers"

torch.manual_seed(seed)
buffer_dir = Path(buffer_root) / f"{dataset}-convnet-w{width}-e{train_epochs}"
print(f"expert buffer: {buffer_dir}")

# %%
ds = load_dataset(dataset, device=device)
buffer = train_experts(ds, buffer_dir, num_experts=num_experts, train_epochs=train_epochs, width=width,
                       seed=seed, device=device, progress=False)


def config_for(**switches):
    """Plain MTT (the `demo` preset with this notebook's N, M, T+, rates and budget) plus ``switches``."""
    base = {"dataset": dataset, "ipc": ipc, "syn_steps": syn_steps, "expert_epochs": expert_epochs,
            "max_start_epoch": max_start_epoch, "iterations": iterations, "lr_img": lr_img, "lr_lr": lr_lr,
            "seed": seed}
    return preset("demo", **{**base, **switches})


def distil(d, label):
    """Run ``d`` to its budget; a diverged run keeps its last good state (notebook 04) and says so."""
    t0 = time.perf_counter()
    try:
        run(d, progress=False)
    except DistillationDiverged as e:
        print(f"{label}: stopped at iteration {e.iteration}: {e}")
    return time.perf_counter() - t0


RULES = {"mismatch": prune_fraction, "depth": depth_ratio}  # prune_rule → its prune_fraction
plain = make_distiller(config_for(), buffer, dataset=ds, device=device)
pruned = {rule: make_distiller(config_for(prune_rule=rule, prune_fraction=beta), buffer, dataset=ds, device=device)
          for rule, beta in RULES.items()}
spec, net = plain.spec, plain.model
P = spec.num_params
x0, labels, alpha0 = plain.images.detach().clone(), plain.labels, plain.syn_lr.detach().clone()  # x0, y, α0
print(buffer)
print(f"ConvNet: P = {P} parameters in {len(spec.names)} tensors; the synthetic set: {tuple(x0.shape)}")

# %% [markdown]
# ## 1. Parameter pruning (Li et al.; PAD)
#
# **What changed.** MTT matches every parameter: $\mathcal{L} = \lVert\hat\theta_N - \theta^*_{t+M}\rVert^2 /
# \lVert\theta^*_t - \theta^*_{t+M}\rVert^2$. Li et al. observe that a few parameters are hard for the
# student to match and that they harm the distilled set: they hold much of the numerator (measured
# below), so the images are pushed to explain them. They prune those parameters from the comparison. With a mask $m \in \{0,1\}^P$ (1 = matched), both norms run
# over the kept entries,
#
# $$\mathcal{L}_m = \frac{\lVert m \odot (\hat\theta_N - \theta^*_{t+M})\rVert^2}{\lVert m \odot (\theta^*_t - \theta^*_{t+M})\rVert^2},$$
#
# so a pruned entry counts neither as error nor as distance the expert travelled, and
# $\partial\mathcal{L}_m/\partial\hat\theta_N = 2\, m \odot (\hat\theta_N - \theta^*_{t+M}) / \lVert m \odot (\theta^*_t - \theta^*_{t+M})\rVert^2$ is 0 on it.
# The student still trains every parameter; only the comparison ignores some.
#
# Two rules build $m$ (`prune_rule`):
#
# * **`"mismatch"`** (Li et al.): prune the fraction $\beta$ = `prune_fraction` of the entries with the
#   largest $|\hat\theta_N - \theta^*_{t+M}|$ after the student's $N$ steps. In mttlite the mask is built
#   **once**, before the first iteration, from one probe unroll (the initial images, $\alpha_0$, one
#   $(\text{expert}, t)$ drawn from a generator seeded with `seed`), and stays fixed (`mttlite/pruning.py`
#   says why: the paper gives no schedule we could reproduce).
# * **`"depth"`** (PAD): prune the first $\lfloor rP\rfloor$ entries of $\theta$ in layer order, the shallow
#   layers. Shallow layers carry low-level information (edges, colours), deep layers the semantics; PAD
#   finds that matching only the deeper parameters makes the images carry more high-level information,
#   and more so the larger the set: its CIFAR-10 ratio $r$ is 0 at IPC 1 and 0.5 from IPC 10 on
#   (`pruning.PAD_DEPTH_RATIOS`; with `prune_fraction=None` the library picks it from `ipc`). This
#   notebook uses $r$ = `depth_ratio` at IPC 1 so that there is something to see.
#
# ### The masks, drawn over the layers
#
# We replay the library's probe by hand — draw the same $(\text{expert}, t)$ and student plan, unroll $N$
# steps from $\theta^*_t$ — build both masks from it, and check that they are the masks the two
# distillers hold. Per parameter tensor: how many of its entries each rule prunes.

# %%
probe_cfg = pruned["mismatch"].config
g = torch.Generator().manual_seed(probe_cfg.seed)  # the probe's own generator (the run's draws are untouched)
expert = int(torch.randint(len(buffer), (1,), generator=g))
t = int(torch.randint(*start_window(probe_cfg, 0), (1,), generator=g))
plan = make_plan(x0.shape[0], syn_steps, probe_cfg.batch_syn, g)
theta_t = buffer.flat(expert, t, device=device)  # θ*_t
theta_target = buffer.flat(expert, t + expert_epochs, device=device)  # θ*_{t+M}
student = unroll(net, spec, theta_t, x0, plain.targets, alpha0, plan, plain.dsa_strategy,
                 create_graph=False).theta.detach()  # θ̂_N
masks = {"mismatch": mismatch_mask(student, theta_target, prune_fraction),
         "depth": depth_mask(spec, depth_ratio, device=device)}
for rule, m in masks.items():
    assert torch.equal(m, pruned[rule].prune_mask), rule  # the distiller's mask is this one
counts = {rule: mask_counts(spec, m) for rule, m in masks.items()}

# the counts by arithmetic: "depth" prunes the first k = ⌊rP⌋ entries, so tensor l (entries s_l … e_l − 1)
# loses min(max(k − s_l, 0), e_l − s_l); "mismatch" prunes ⌊βP⌋ entries in all
k_depth = math.floor(depth_ratio * P)
expected_depth = {name: min(max(k_depth - sl.start, 0), sl.stop - sl.start) for name, sl in spec.slices().items()}
assert {name: c["masked"] for name, c in counts["depth"].items()} == expected_depth
assert sum(c["masked"] for c in counts["mismatch"].values()) == math.floor(prune_fraction * P)

err2 = (student - theta_target).pow(2)  # per entry: (θ̂_N − θ*_{t+M})²
share_pruned = float(err2[~masks["mismatch"]].sum() / err2.sum())
print(f"probe: expert {expert}, t = {t}, N = {syn_steps}; P = {P}")
print(f"mismatch: {int((~masks['mismatch']).sum())} entries pruned (⌊{prune_fraction}·{P}⌋); they hold "
      f"{100 * share_pruned:.0f} % of ‖θ̂_N − θ*_(t+M)‖²")
print(f"depth:    {int((~masks['depth']).sum())} entries pruned (⌊{depth_ratio}·{P}⌋), the first in layer order")
most = sorted(spec.names, key=lambda n: -counts["mismatch"][n]["masked"] / counts["mismatch"][n]["total"])[:3]
print("mismatch prunes most of: " + ", ".join(
    f"{n} ({counts['mismatch'][n]['masked']}/{counts['mismatch'][n]['total']})" for n in most))

names = list(spec.names)
rows = [f"{rule} ({'β' if rule == 'mismatch' else 'r'} = {RULES[rule]})" for rule in RULES]
fig = go.Figure(go.Heatmap(
    z=[[counts[rule][n]["masked"] / counts[rule][n]["total"] for n in names] for rule in RULES], x=names, y=rows,
    text=[[f"{counts[rule][n]['masked']}/{counts[rule][n]['total']}" for n in names] for rule in RULES],
    texttemplate="%{text}", colorscale="Reds", zmin=0, zmax=1, colorbar={"title": "pruned"}))
fig.update_layout(title="pruned entries / size of each parameter tensor (input → output)", height=300,
                  xaxis_tickangle=-30)
fig.show()

# %% [markdown]
# (`features.0`, `.4`, `.8` are the three convolutions, `.1`, `.5`, `.9` their instance norms,
# `classifier` the linear layer.) The mismatch rule picks entries wherever the student ended far from
# the expert (printed above: the tensors it prunes most); the depth rule takes whole tensors from the
# input side, by count, and cuts into the one where the count ends.
#
# ### The matching loss per layer, with and without the mask
#
# `matching_breakdown(spec, θ̂_N, θ*_t, θ*_{t+M}, mask=m)` splits $\mathcal{L}_m$ into each tensor's
# contribution $\lVert m_\ell \odot (\hat\theta_N - \theta^*_{t+M})_\ell\rVert^2 / \lVert m \odot (\theta^*_t - \theta^*_{t+M})\rVert^2$
# (they sum to $\mathcal{L}_m$), on the probe unroll above.

# %%
breakdown = {"none": matching_breakdown(spec, student, theta_t, theta_target)}
breakdown.update({rule: matching_breakdown(spec, student, theta_t, theta_target, mask=m) for rule, m in masks.items()})
L = {"none": float(matching_loss(student, theta_t, theta_target))}
L.update({rule: float(matching_loss(student, theta_t, theta_target, mask=m)) for rule, m in masks.items()})
fig = go.Figure()
for rule, colour in (("none", "grey"), ("mismatch", "crimson"), ("depth", "royalblue")):
    fig.add_bar(x=names, y=[breakdown[rule][n]["contribution"] for n in names], marker_color=colour,
                name=f"{'no mask' if rule == 'none' else rule}: L = {L[rule]:.3f}")
fig.update_layout(title="each tensor's contribution to the matching loss (the bars of one colour sum to its L)",
                  yaxis_title="contribution", barmode="group", height=380)
fig.show()
for rule in L:
    total = sum(b["contribution"] for b in breakdown[rule].values())
    print(f"{rule:8s} L = {L[rule]:.4f}  (sum of the contributions {total:.4f})")

# %% [markdown]
# ### $\mathcal{L}_m$ by hand
#
# Boolean indexing keeps only the matched entries; that must be the library's loss (which zeroes the
# pruned ones with `torch.where`), and its gradient must vanish on the pruned entries and equal
# $2(\hat\theta_N - \theta^*_{t+M})/\lVert m \odot (\theta^*_t - \theta^*_{t+M})\rVert^2$ on the kept ones.

# %%
hand_err, grad_pruned_max = {}, {}
for rule, m in masks.items():
    den = (theta_t - theta_target)[m].pow(2).sum()
    hand = (student - theta_target)[m].pow(2).sum() / den  # L_m over the kept entries only
    library = matching_loss(student, theta_t, theta_target, mask=m)
    torch.testing.assert_close(library, hand)
    torch.testing.assert_close(torch.tensor(sum(b["contribution"] for b in breakdown[rule].values())), hand.cpu(),
                               rtol=1e-4, atol=1e-6)
    theta_hat = student.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(matching_loss(theta_hat, theta_t, theta_target, mask=m), theta_hat)
    assert torch.all(grad[~m] == 0)  # a pruned entry gets no gradient
    torch.testing.assert_close(grad[m], 2 * (student - theta_target)[m] / den)
    hand_err[rule], grad_pruned_max[rule] = float((library - hand).abs()), float(grad[~m].abs().max())
    print(f"{rule:8s} L_m by hand {hand.item():.6f} = library {library.item():.6f}; ∂L_m/∂θ̂ on the pruned entries: "
          f"max |·| = {grad_pruned_max[rule]}")

# %% [markdown]
# ### A short distillation with and without pruning
#
# The same seed, rates and budget (`iterations`) for plain MTT and each rule. Each run's own loss is
# not comparable across runs ($\mathcal{L}_m$ leaves out the hardest entries, so it is lower by
# construction), so every final set is also **scored with the plain $\mathcal{L}$** on the same
# `score_draws` fixed $(\text{expert}, t, \text{plan})$ draws, next to the initial set.

# %%
runs = {"MTT": plain, **{f"prune: {rule}": d for rule, d in pruned.items()}}
seconds = {name: distil(d, name) for name, d in runs.items()}

g = torch.Generator().manual_seed(seed + 1)  # the scoring draws: the same for every set
draws = [(int(torch.randint(len(buffer), (1,), generator=g)), int(torch.randint(0, max_start_epoch, (1,), generator=g)),
          make_plan(x0.shape[0], syn_steps, None, g)) for _ in range(score_draws)]


def plain_score(images, alpha):
    """The plain L (every parameter) of a set, averaged over the fixed draws."""
    losses = []
    for e, ts, pl in draws:
        th = unroll(net, spec, buffer.flat(e, ts, device=device), images, labels, alpha, pl, plain.dsa_strategy,
                    create_graph=False).theta
        losses.append(float(matching_loss(th, buffer.flat(e, ts, device=device),
                                          buffer.flat(e, ts + expert_epochs, device=device))))
    return float(np.mean(losses))


scores = {"initial": plain_score(x0, alpha0)}
scores.update({name: plain_score(d.images.detach(), d.syn_lr.detach()) for name, d in runs.items()})
for name, d in runs.items():
    h = d.history.loss
    print(f"{name:16s} own loss {np.mean(h[:3]):.3f} → {np.mean(h[-3:]):.3f} over {d.iteration} iterations, "
          f"plain L {scores[name]:.3f} (initial set {scores['initial']:.3f}), {seconds[name]:.0f} s")


def moving_average(values, k=None):
    k = k or max(1, len(values) // 8)
    return np.convolve(values, np.ones(k) / k, mode="valid").tolist(), k


fig = make_subplots(rows=1, cols=2, subplot_titles=("each run's own loss (L or L_m, moving average)",
                                                    f"plain L on {score_draws} fixed draws"))
colours = {"MTT": "grey", "prune: mismatch": "crimson", "prune: depth": "royalblue"}
for name, d in runs.items():
    ma, k = moving_average(d.history.loss)
    fig.add_scatter(x=list(range(k, k + len(ma))), y=ma, mode="lines", name=name, line={"color": colours[name]},
                    row=1, col=1)
fig.add_bar(x=list(scores), y=list(scores.values()), marker_color=["lightslategrey"] + list(colours.values()),
            showlegend=False, row=1, col=2)
fig.update_xaxes(title_text="iteration", row=1, col=1)
fig.update_layout(height=340)
fig.show()

# %% [markdown]
# **Takeaway.** Pruning changes what the images are asked to explain, not how the student trains: a
# small share of the entries holds a large share of the mismatch, and dropping it (or the shallow
# layers) from both norms lets the gradient work on the rest. Whether the images are *better* is a
# question for evaluation, not for the loss (a pruned run's own loss is lower by construction; its
# plain $\mathcal{L}$ may be higher); at this size (one probe, tens of iterations) the difference is
# noise. `benchmarks/family_table.py --variants mtt,prune,depth` measures accuracy.
#
# ## 2. Model augmentation (Zhang et al.)
#
# **What changed.** Gradient matching (DC, DSA) and distribution matching (DM) learn the set against
# *many* networks, each fresh from the initialisation and — in DC — trained on the set for a while:
# most of their cost. Zhang et al. assume that diverse networks are what generalises, and get
# diversity more cheaply with two "model augmentations": **early-stage models** (start from a pool of
# checkpoints trained a few epochs on real data: `EarlyPool`, built from an expert buffer's first
# epochs) and **parameter perturbation** (move the drawn network in a random direction, scaled filter
# by filter to the network's own size — the filter normalisation of Li et al., NeurIPS 2018),
#
# $$\theta'_{l,j} = \theta_{l,j} + \rho\, d_{l,j}, \qquad d_{l,j} = \varepsilon_{l,j}\,\frac{\lVert\theta_{l,j}\rVert}{\lVert\varepsilon_{l,j}\rVert}, \qquad \varepsilon \sim \mathcal{N}(0, I),$$
#
# with $\theta_{l,j}$ the $j$-th filter (output channel, or a linear layer's row) of tensor $l$; 1-D
# tensors (biases, norm layers) are left alone. So every filter moves by exactly $\rho\lVert\theta_{l,j}\rVert$.
# They report up to 20× speed-ups at comparable accuracy. In mttlite both are options of the DC family and
# DM (`model_pool=<buffer>`, `pool_epochs`, `rho`), and `DistillConfig.expert_perturb` = $\rho$ carries the
# perturbation to MTT: the student starts from $\tilde\theta^*_t$ instead of $\theta^*_t$ (the target is not
# perturbed; the denominator uses $\tilde\theta^*_t$, so $\mathcal{L} = 1$ still means "no closer than it started").
#
# The pool first (cheap: it reads checkpoints):

# %%
pool = EarlyPool(buffer, epochs=min(2, train_epochs))
member = pool.sample_index(torch.Generator().manual_seed(seed))
theta0 = pool.sample(torch.Generator().manual_seed(seed))  # the same draw: expert `member[0]` at epoch `member[1]`
assert torch.equal(theta0, buffer.flat(*member).float())
print(pool, "→ one draw:", {"expert": member[0], "epoch": member[1]})

# %% [markdown]
# ### Every filter moves by $\rho\lVert\theta_{l,j}\rVert$
#
# Perturb the probe's $\theta^*_t$ with each $\rho$, measure $\lVert\tilde\theta_{l,j} - \theta_{l,j}\rVert / \lVert\theta_{l,j}\rVert$ for
# every filter, and rebuild $\tilde\theta$ by hand from the same Gaussian draw (the library draws $\varepsilon$,
# $P$ normals, from the generator it is given).

# %%
conv_like = {name: (shape, sl) for (name, sl), shape in zip(spec.slices().items(), spec.shapes) if len(shape) >= 2}


def filter_norms(v):
    """{tensor name: ‖v_{l,j}‖ per filter j} over the tensors with at least 2 dimensions."""
    return {name: v[sl].view(shape[0], -1).norm(dim=1) for name, (shape, sl) in conv_like.items()}


theta_norms = filter_norms(theta_t)
ratios, hand_vs_library = {}, {}
for i, rho in enumerate(rhos):
    s = seed + 100 + i
    tilde = perturb(theta_t, spec, rho, torch.Generator().manual_seed(s))
    step = filter_norms(tilde - theta_t)
    ratios[rho] = torch.cat([step[n] / theta_norms[n] for n in conv_like])  # one per filter
    torch.testing.assert_close(ratios[rho], torch.full_like(ratios[rho], rho), rtol=1e-5, atol=1e-6)
    for name, sl in spec.slices().items():
        if name not in conv_like:
            assert torch.equal(tilde[sl], theta_t[sl]), name  # 1-D tensors are not perturbed
    eps = torch.randn(P, generator=torch.Generator().manual_seed(s)).to(theta_t)  # by hand: the same ε
    hand = theta_t.clone()
    for shape, sl in conv_like.values():
        w, e = theta_t[sl].view(shape[0], -1), eps[sl].view(shape[0], -1)
        hand[sl] = (w + rho * e * w.norm(dim=1, keepdim=True) / e.norm(dim=1, keepdim=True)).reshape(-1)
    torch.testing.assert_close(tilde, hand)
    hand_vs_library[rho] = float((tilde - hand).abs().max())
    print(f"ρ = {rho:<5g} ‖θ̃_j − θ_j‖/‖θ_j‖ over {len(ratios[rho])} filters: {ratios[rho].min().item():.6f} … "
          f"{ratios[rho].max().item():.6f}; by hand vs library: max |difference| = {hand_vs_library[rho]:.1e}")

fig = go.Figure()
x_all = torch.cat(list(theta_norms.values())).cpu()
for i, rho in enumerate(r for r in rhos if r > 0):
    fig.add_scatter(x=x_all.tolist(), y=(ratios[rho].cpu() * x_all).tolist(), mode="markers", name=f"ρ = {rho:g}",
                    marker={"size": 5, "color": px.colors.qualitative.Plotly[i]})
    fig.add_scatter(x=[float(x_all.min()), float(x_all.max())], y=[rho * float(x_all.min()), rho * float(x_all.max())],
                    mode="lines", line={"dash": "dot", "color": px.colors.qualitative.Plotly[i]}, showlegend=False)
fig.update_layout(title="every filter: how far it moved against its own norm (dotted: slope ρ)",
                  xaxis_title="‖θ_j‖", yaxis_title="‖θ̃_j − θ_j‖", xaxis_type="log", yaxis_type="log", height=380)
fig.show()

# %% [markdown]
# ### What the perturbation does to the meta-gradient
#
# The images learn from $\partial\mathcal{L}/\partial x$. Starting the student from $\tilde\theta^*_t$ instead of
# $\theta^*_t$ turns that gradient; the cosine between the two says by how much. For a scale, the gray line
# is the cosine between two *unperturbed* gradients that differ only in the student's plan (its batches and
# DSA augmentations), the noise MTT lives with anyway. The same initial set, the probe's $(\text{expert}, t)$
# and $\alpha_0$ throughout; `noise_draws` perturbations per $\rho$.

# %%
def image_gradient(theta_start, pl=plan):
    mg = meta_gradient("exact", net, spec, theta_start, theta_target, x0, labels, alpha0, pl, plain.dsa_strategy)
    return mg.images, float(mg.loss)


def cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


g0, loss0 = image_gradient(theta_t)
cosines, grads, rho_loss = {0.0: [1.0]}, {0.0: g0}, {0.0: [loss0]}
for i, rho in enumerate(r for r in rhos if r > 0):
    cosines[rho], rho_loss[rho] = [], []
    for j in range(noise_draws):
        gr, lo = image_gradient(perturb(theta_t, spec, rho, torch.Generator().manual_seed(seed + 200 + 10 * i + j)))
        cosines[rho].append(cosine(g0, gr))
        rho_loss[rho].append(lo)
        grads.setdefault(rho, gr)  # the first draw, for the pictures below
cos_self = cosine(g0, image_gradient(theta_t)[0])  # the same computation twice: 1
other_plans = [cosine(g0, image_gradient(theta_t, make_plan(x0.shape[0], syn_steps, None,
                                                            torch.Generator().manual_seed(seed + 300 + j)))[0])
               for j in range(noise_draws)]
for rho in cosines:
    print(f"ρ = {rho:<5g} cos(∂L/∂x at ρ, at 0) = {np.mean(cosines[rho]):+.3f} ± {np.std(cosines[rho]):.3f}, "
          f"L = {np.mean(rho_loss[rho]):.3f}")
print(f"another plan, ρ = 0: cos = {np.mean(other_plans):+.3f} ± {np.std(other_plans):.3f}")

fig = go.Figure()
labels_rho = [f"{r:g}" for r in cosines]
for j in range(noise_draws):
    fig.add_scatter(x=labels_rho, y=[c[min(j, len(c) - 1)] for c in cosines.values()], mode="markers",
                    marker={"color": "lightslategrey", "size": 6}, showlegend=j == 0, name="one perturbation")
fig.add_scatter(x=labels_rho, y=[float(np.mean(c)) for c in cosines.values()], mode="lines+markers",
                line={"color": "crimson"}, name="mean")
fig.add_hline(y=float(np.mean(other_plans)), line_dash="dot", line_color="grey",
              annotation_text="another plan, ρ = 0", annotation_position="bottom left")
fig.update_layout(title="cosine between ∂L/∂x from θ̃*_t and from θ*_t", xaxis_title="ρ", yaxis_title="cosine",
                  yaxis_range=[min(-0.05, min(min(c) for c in cosines.values()) - 0.05), 1.05], height=340)
fig.show()

# %% [markdown]
# Pick a $\rho$ to see the image gradients themselves (one perturbation; red and blue: the sign). Drawn
# statically for the largest $\rho$; the slider redraws below it.

# %%
def show_gradients(rho):
    rows = [grads[r].detach().cpu()[:, 0] for r in (0.0, rho)]  # (n, H, W) each: ρ = 0, then ρ
    both = torch.cat([r / (r.abs().max() or 1.0) for r in rows])  # each row scaled to its largest |value|
    n = rows[0].shape[0]
    fig = px.imshow(both.numpy(), facet_col=0, facet_col_wrap=n, color_continuous_scale="RdBu", zmin=-1, zmax=1,
                    facet_col_spacing=0.005, facet_row_spacing=0.03, height=300,
                    title=f"∂L/∂x, each row scaled to its largest |value|: top ρ = 0, bottom ρ = {rho:g} "
                          f"(cosine {cosines[rho][0]:+.3f})")
    fig.for_each_annotation(lambda a: a.update(text=""))
    fig.update_xaxes(showticklabels=False).update_yaxes(showticklabels=False)
    fig.update_layout(coloraxis_showscale=False, margin={"t": 60, "b": 10})
    fig.show()


first_rho = max(rhos)
show_gradients(first_rho)  # drawn statically: what papermill, nbval and HTML exports show
# The slider starts on the ρ drawn above; moving it draws below it, in an Output that only a change writes
# into (headless, writing into an Output while the cell runs can leave papermill waiting: notebook 09).
gradient_view = widgets.Output()
rho_slider = widgets.SelectionSlider(options=[r for r in rhos if r > 0], value=first_rho, description="ρ")


def _redraw(change):
    with gradient_view:
        gradient_view.clear_output(wait=True)
        show_gradients(change["new"])


rho_slider.observe(_redraw, names="value")
display(widgets.VBox([rho_slider, gradient_view]))

# %% [markdown]
# **Takeaway.** The perturbation is *relative*: every filter moves by the same fraction $\rho$ of its own
# norm, whatever the layer's scale, so one number fits every network. Read the cosine against the dotted
# line: a small $\rho$ (Zhang et al. use about 0.01–0.1) turns the meta-gradient less than drawing another
# plan does — variety at a cost smaller than the noise MTT already lives with — while a large $\rho$
# starts the student somewhere the expert never was ($\mathcal{L}$ near 1), and the gradient points elsewhere.
#
# ## 3. Texture distillation (MTT §5)
#
# **What changed.** In its §5, MTT distils a class into a *texture*: the synthetic "image" is a
# canvas larger than the input, $x \in \mathbb{R}^{C\times H_c\times W_c}$, and each student step sees a random
# crop of it **with wrap-around** (a torus):
#
# $$\operatorname{crop}(x; d_y, d_x)[c, i, j] = x[c,\ (i + d_y) \bmod H_c,\ (j + d_x) \bmod W_c], \qquad i < H,\ j < W,$$
#
# with $(d_y, d_x)$ uniform — the authors' `torch.roll` by a random shift, then the top-left crop. Every
# pixel then has neighbours on all four sides, so the learned canvas tiles seamlessly: a picture of
# what the class "is made of" rather than one object. In mttlite: `texture_canvas` = the canvas side;
# the crop is the first augmentation of every student step (`mttlite.texture`), and the exported set
# records `texture = {"canvas": [Hc, Wc], "input": [H, W]}`. The canvas starts as a grid of real images
# of its class.

# %%
side = texture_scale * ds.im_size[0]
tex_distiller = make_distiller(config_for(texture_canvas=side, iterations=texture_iterations), buffer, dataset=ds,
                               device=device)
canvas0 = tex_distiller.images.detach().cpu().clone()
tex_seconds = distil(tex_distiller, "texture")
tex = to_synset(tex_distiller, buffer)
assert tex.texture == {"canvas": [side, side], "input": list(ds.im_size)}, tex.texture
assert tuple(tex.images.shape) == (ds.num_classes * ipc, ds.channel, side, side)
h = tex_distiller.history.loss
print(f"texture: canvases {tuple(tex.images.shape)}, crops {tuple(ds.im_size)}; loss {np.mean(h[:3]):.3f} → "
      f"{np.mean(h[-3:]):.3f} over {tex_distiller.iteration} iterations, α {float(alpha0):.2e} → {tex.syn_lr:.2e}, "
      f"{tex_seconds:.0f} s")

shown = list(range(0, ds.num_classes * ipc, ipc))[:4]  # the first canvas of the first classes
before = dataclasses.replace(tex, images=canvas0).pixels()[shown]  # the initial canvases, as pixels
after = tex.pixels()[shown]
change = (after - before).abs()
change = change / (change.max() or 1.0)  # |after − before|, scaled to [0, 1]
tiles = torch.cat([tile(before, 3), tile(after, 3), tile(change, 3)])[:, 0]  # (3·4, 3 Hc, 3 Wc)
fig = px.imshow(tiles.numpy(), facet_col=0, facet_col_wrap=len(shown), binary_string=True, facet_col_spacing=0.01,
                facet_row_spacing=0.06, height=720,
                title=f"canvases tiled 3 × 3 (texture.tile): at the start, after {tex_distiller.iteration} iterations, "
                      "and |change| (white: the largest)")
names_shown = [ds.class_names[int(tex_distiller.labels[i])] for i in shown] * 3
fig.for_each_annotation(lambda a: a.update(text=names_shown[int(a.text.split("=")[1])]))
fig.update_xaxes(showticklabels=False).update_yaxes(showticklabels=False)
fig.show()

# %% [markdown]
# At the start the seams of the real-image grid are plain to see, and most crops are mosaics of parts
# of four images, unlike anything the expert trained on: a student trained on them ends no closer to
# the expert's target than it started ($\mathcal{L} \approx 1$ or above, printed above). Every crop position is
# equally likely, seams included, so the gradient works on the whole torus (the bottom row: where the
# pixels changed). The authors distil textures for thousands of iterations; a few dozen only begin it.
# With $\alpha$ learned, a run that cannot yet match also shrinks $\alpha$ (a student that barely moves has
# $\mathcal{L} \to 1$): watch `syn_lr` in a longer run, and lower `lr_lr` if it collapses.
#
# ### The torus, checked
#
# Three facts behind the crop: rolling by the canvas size is the identity (so offsets live modulo
# $H_c, W_c$); `toroidal_crop` is exactly the modular gather above, with the offsets it draws from its seed
# ($d_y$ then $d_x$, `torch.randint` on a CPU generator); and a crop of the canvas is the plain rectangle at
# $(d_y, d_x)$ of the canvas tiled 2 × 2, drawn below for a crop that wraps.

# %%
x = tex.images  # (n, C, Hc, Wc)
n, Hc, Wc = x.shape[0], x.shape[-2], x.shape[-1]
H, W = ds.im_size
assert torch.equal(torch.roll(x, shifts=(Hc, Wc), dims=(-2, -1)), x)  # a full turn of the torus
roll_identity = all(torch.equal(crop_at(x, (H, W), dy + a * Hc, dx + b * Wc), crop_at(x, (H, W), dy, dx))
                    for dy, dx, a, b in ((0, 0, 1, 1), (Hc - 3, 5, 2, -1), (7, Wc - 1, -1, 3)))
assert roll_identity

crop = toroidal_crop(x, (H, W), seed)
g = torch.Generator().manual_seed(seed)
dys, dxs = torch.randint(0, Hc, (n,), generator=g), torch.randint(0, Wc, (n,), generator=g)
hand = torch.stack([x[b][:, (torch.arange(H) + dys[b]) % Hc][:, :, (torch.arange(W) + dxs[b]) % Wc] for b in range(n)])
torch.testing.assert_close(crop, hand, rtol=0, atol=0)  # bit for bit
authors = torch.stack([torch.roll(x[b], (-int(dys[b]), -int(dxs[b])), (-2, -1))[:, :H, :W] for b in range(n)])
torch.testing.assert_close(crop, authors, rtol=0, atol=0)  # the authors' roll-then-crop
crop_hand_err = float((crop - hand).abs().max())

dy, dx = Hc - H // 2, Wc - W // 3  # a crop that wraps around both edges
wrapped = crop_at(x[:1], (H, W), dy, dx)
torch.testing.assert_close(wrapped, tile(x[:1], 2)[..., dy:dy + H, dx:dx + W], rtol=0, atol=0)
p2 = tile(tex.pixels()[:1], 2)[0, 0]
fig = make_subplots(rows=1, cols=2, column_widths=[0.7, 0.3],
                    subplot_titles=(f"the canvas tiled 2 × 2, the crop at (d_y, d_x) = ({dy}, {dx})", "the crop"))
fig.add_trace(go.Heatmap(z=p2.numpy(), colorscale="gray", showscale=False), row=1, col=1)
fig.add_trace(go.Heatmap(z=crop_at(tex.pixels()[:1], (H, W), dy, dx)[0, 0].numpy(), colorscale="gray",
                         showscale=False), row=1, col=2)  # the pixels of the crop (the map is per pixel)
fig.add_shape(type="rect", x0=dx - 0.5, x1=dx + W - 0.5, y0=dy - 0.5, y1=dy + H - 0.5, line={"color": "crimson"},
              row=1, col=1)
fig.add_hline(y=Hc - 0.5, line_dash="dot", line_color="gold", row=1, col=1)
fig.add_vline(x=Wc - 0.5, line_dash="dot", line_color="gold", row=1, col=1)
fig.update_yaxes(autorange="reversed", scaleanchor="x", showticklabels=False, row=1, col=1)
fig.update_yaxes(autorange="reversed", scaleanchor="x2", showticklabels=False, row=1, col=2)
fig.update_xaxes(showticklabels=False, constrain="domain").update_yaxes(constrain="domain")
fig.update_layout(height=380, title="dotted: where one copy of the canvas ends")
fig.show()
print(f"roll by ({Hc}, {Wc}) = identity: {roll_identity}; toroidal_crop vs the modular gather by hand: "
      f"max |difference| = {crop_hand_err}")

# %% [markdown]
# **Takeaway.** A texture is MTT with one more augmentation in front of DSA: a random crop of a torus.
# Because the crop is a fixed gather (its backward is a scatter-add), gradients reach the canvas exactly,
# and because the offsets are a function of the step's seed, both gradient modes replay the same crop.
#
# ## What to take away
#
# * **Pruning** (`prune_rule`) changes the comparison, not the student: $\mathcal{L}_m$ drops the entries
#   hardest to match (Li et al.) or the shallow layers (PAD) from both norms. A pruned loss is not
#   comparable with a plain one; judge by accuracy.
# * **Model augmentation** (`expert_perturb`, the baselines' `model_pool` / `rho`) adds diverse starting
#   networks at no extra training cost; $\rho$ is relative to each filter's norm, and small values turn the
#   meta-gradient less than the plan's noise does.
# * **Textures** (`texture_canvas`) change what an image is: a canvas on a torus, seen through random
#   wrap-around crops, which tiles without seams once distilled long enough.
#
# ## Exercises
#
# **Exercise 1 (model augmentation).** Without calling `perturb`: by how much does the *whole* vector
# $\theta^*_t$ move, $\lVert\tilde\theta - \theta\rVert$, for $\rho = 0.05$? *Hint:* the filters are disjoint
# pieces of $\theta$, and 1-D tensors do not move; `filter_norms(theta_t)` gives every $\lVert\theta_{l,j}\rVert$.
#
# **Exercise 2 (textures).** A $56 \times 56$ canvas (this notebook's at the shipped size: `side`) is seen
# through $28 \times 28$ crops at uniform offsets $(d_y, d_x)$. What share of the offsets give a crop that
# wraps around an edge (that reads a pixel of row $(i + d_y) \bmod H_c \ne i + d_y$, or likewise a column)?
#
# Put your answers below (a number or an expression) and run the next cell; it checks them.

# %%
answer_1 = None  # Exercise 1: ‖θ̃ − θ‖ for ρ = 0.05
answer_2 = None  # Exercise 2: the share of the offsets whose crop wraps around

# %%
rho_ex = 0.05
expected_1 = float((perturb(theta_t, spec, rho_ex, torch.Generator().manual_seed(seed)) - theta_t).norm())  # library
offsets = itertools.product(range(Hc), range(Wc))
expected_2 = sum(dy + H > Hc or dx + W > Wc for dy, dx in offsets) / (Hc * Wc)  # brute force over every offset
for k, (answer, expected) in enumerate(((answer_1, expected_1), (answer_2, expected_2)), start=1):
    if answer is None:
        print(f"Exercise {k}: not answered yet (set answer_{k} above and run both cells again)")
    elif math.isclose(float(answer), expected, rel_tol=1e-4):
        print(f"Exercise {k}: correct ({float(answer):.6g})")
    else:
        print(f"Exercise {k}: {float(answer):.6g} is not it; look at the hint and try again")

# %%
results = {
    "num_params": P, "tensor_names": names, "tensor_sizes": [sl.stop - sl.start for sl in spec.slices().values()],
    "tensor_shapes": [list(s) for s in spec.shapes],
    "prune_fraction": prune_fraction, "depth_ratio": depth_ratio, "probe": {"expert": expert, "t": t},
    "mask_counts": counts, "share_pruned": share_pruned,
    "L": L, "contribution_sums": {r: sum(b["contribution"] for b in breakdown[r].values()) for r in breakdown},
    "hand_err": hand_err, "grad_pruned_max": grad_pruned_max,
    "runs": {name: {"loss": d.history.loss, "iterations": d.iteration, "syn_lr": float(d.syn_lr),
                    "prune_rule": d.config.prune_rule, "seconds": seconds[name]} for name, d in runs.items()},
    "plain_scores": scores, "score_draws": score_draws,
    "rhos": rhos, "filters": len(ratios[rhos[0]]),
    "ratio_min": {str(r): float(v.min()) for r, v in ratios.items()},
    "ratio_max": {str(r): float(v.max()) for r, v in ratios.items()},
    "perturb_hand_vs_library": {str(r): v for r, v in hand_vs_library.items()},
    "cosines": {str(r): v for r, v in cosines.items()}, "cos_self": cos_self, "cos_other_plans": other_plans,
    "rho_loss": {str(r): v for r, v in rho_loss.items()},
    "slider_value": rho_slider.value, "slider_start": first_rho,
    "texture": {"asked": side, "record": tex.texture, "images_shape": list(tex.images.shape),
                "loss": tex_distiller.history.loss, "iterations": tex_distiller.iteration,
                "roll_identity": roll_identity, "crop_hand_err": crop_hand_err},
    "exercise_1": {"expected": expected_1,
                   "by_filter_norms": rho_ex * float(torch.cat(list(theta_norms.values())).norm())},
    "exercise_2": {"expected": expected_2, "canvas": [Hc, Wc], "input": [H, W]},
}
print(json.dumps({k: v for k, v in results.items() if not isinstance(v, (dict, list))}, indent=1))
if results_path:
    Path(results_path).write_text(json.dumps(results, indent=1))
