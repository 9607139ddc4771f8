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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/mttlite/mttlite/blob/main/notebooks/01_expert_trajectories.ipynb)
#
# # 01 · Expert trajectories
#
# **In the paper:** the expert trajectories $\tau^*$ of the method section, the input of Algorithm 1
# (the real-data path that the student is matched against); the symbols are defined in [`docs/method.md`](../docs/method.md).
#
# MTT's targets are the parameter trajectories of networks trained on the real data — the
# **experts**. An expert is an ordinary ConvNet trained with SGD; its trajectory is the list of
# its parameters after every epoch,
#
# $$\tau^* = (\theta^*_0, \theta^*_1, \dots, \theta^*_E), \qquad \theta^*_0 = \text{random initialisation}.$$
#
# What you will learn:
#
# * how the experts are trained and stored (a resumable buffer of safetensors files);
# * their test accuracy per epoch;
# * what a trajectory looks like: the flattened parameters $\theta \in \mathbb{R}^P$ projected to
#   2-D and 3-D with PCA, as interactive figures;
# * how far each epoch moves the parameters — the scale the matching loss (notebook `03`) divides by.
#
# **Run time.** Opened without a GPU, the notebook picks the classroom CPU profile
# (`profile = "auto"`, see `notebooks/README.md`): **1.0 min on 2 CPU cores from a cold
# start**, the experts included (62 s, measured on a 2-core AMD EPYC with
# `python benchmarks/notebook_times.py --notebooks 01`).
# The teaching parameters (what a GPU gets): about 2 min on a Colab T4 GPU (estimate, not yet
# measured); forced on 2 CPU cores about 22 min for the experts (estimated: 5 experts x 10 epochs x
# 26 s), nothing if notebook `00` already trained them (the buffer is shared). CI parameters: 10 s
# on 2 CPU cores once the CI buffer exists (measured).

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

from mttlite.notebook import choose_profile, live, setup

# "cuda" if torch.cuda.is_available() else "cpu", printed with the GPU's name; on Colab setup() also
# turns on the widget manager that the sliders and progress bars need
device = setup()

# %%
import json
import time
from pathlib import Path

import ipywidgets as widgets
import plotly.graph_objects as go
import torch
from IPython.display import display
from plotly.subplots import make_subplots

from mttlite.data import load_dataset
from mttlite.experts import train_experts
from mttlite.params import ParamSpec
from mttlite.pipeline import network_for

# %% tags=["parameters"]
profile = "auto"  # "auto": "cpu" without a GPU, "teaching" with one; or "teaching", "cpu", "ci"
dataset = "fashion-mnist-mini"
buffer_root = "runs/notebooks/buffers"  # shared expert cache (same settings in every notebook)
width = 128  # ConvNet-3 width
num_experts = 5
train_epochs = 10  # E
seed = 0
results_path = None

# %%
profile = choose_profile(profile, device)  # mttlite.notebook.PROFILES
if profile == "cpu":  # the classroom CPU profile: <= 5 min on 2 cores from a cold start, experts included
    width, num_experts, train_epochs = 32, 3, 6
elif profile == "ci":  # CI size, see notebooks/README.md
    width, num_experts, train_epochs = 16, 2, 3
    buffer_root = "runs/notebooks-ci/buffers"

torch.manual_seed(seed)
buffer_dir = Path(buffer_root) / f"{dataset}-convnet-w{width}-e{train_epochs}"
print(f"expert buffer: {buffer_dir}")


# %% [markdown]
# ## 1. Train (or load) the experts
#
# One epoch is mini-batch SGD over a fresh shuffle of the training set, with a new DSA augmentation
# $\mathcal{A}_\omega$ per batch:
#
# $$\theta \leftarrow \theta - \eta\, \nabla_\theta\, \ell\big(f(\mathcal{A}_\omega(x_B); \theta), y_B\big), \qquad \eta = 0.01.$$
#
# Expert $i$ draws *all* its randomness (initialisation, batch order, augmentations) from its own
# generator, seeded by $(\text{seed}, i)$: the buffer is the same whether it was trained in one go,
# resumed, or extended. Only complete experts are written, so re-running this cell is free.

# %%
ds = load_dataset(dataset, device=device)
t0 = time.perf_counter()
log = []
buffer = train_experts(ds, buffer_dir, num_experts=num_experts, train_epochs=train_epochs, width=width,
                       seed=seed, device=device, callback=lambda i, e, m: log.append((i, e, m["test_acc"][-1])))
print(buffer, f"({time.perf_counter() - t0:.0f} s, {len(log)} epochs trained now)")
print("on disk:", sorted(p.name for p in Path(buffer_dir).iterdir()))

# %%
metrics = [buffer.metrics(i) for i in range(len(buffer))]
fig = go.Figure()
for i, m in enumerate(metrics):
    epochs = list(range(1, len(m["test_acc"]) + 1))
    fig.add_scatter(x=epochs, y=[100 * a for a in m["test_acc"]], mode="lines+markers", name=f"expert {i} test",
                    legendgroup=str(i))
    fig.add_scatter(x=epochs, y=[100 * a for a in m["train_acc"]], mode="lines", name=f"expert {i} train",
                    line={"dash": "dot"}, legendgroup=str(i))
fig.update_layout(title="Experts: accuracy per epoch (train accuracy is on augmented batches)",
                  xaxis_title="epoch", yaxis_title="accuracy (%)", height=400)
fig.show()

# %% [markdown]
# ## 2. A trajectory is a path in $\mathbb{R}^P$
#
# The buffer stores $\theta^*_e$ as named tensors; `ParamSpec` flattens them into one vector
# $\theta \in \mathbb{R}^P$ (and back), which is all MTT needs: distances $\lVert\theta - \theta'\rVert^2$
# and SGD steps $\theta - \alpha g$ are one line on a flat vector.

# %%
net = network_for(buffer)
spec = ParamSpec.from_module(net)
print(f"P = {spec.num_params:,} parameters in {len(spec.names)} tensors:")
for name, shape in zip(spec.names, spec.shapes):
    print(f"  {name:28s} {tuple(shape)!s:18s}")
E = buffer.epochs[-1]
# traj[i, e] = θ*_e of expert i, flat:  (num_experts, E+1, P)
traj = torch.stack([torch.stack([buffer.flat(i, e) for e in buffer.epochs]) for i in range(len(buffer))])
print("trajectories:", tuple(traj.shape))
# the flat vector and the named dict agree
torch.testing.assert_close(spec.unflatten(traj[0, 0])[spec.names[0]], buffer.params(0, 0)[spec.names[0]])

# %% [markdown]
# ## 3. PCA of the trajectories
#
# Stack all $K(E+1)$ snapshots as rows of $X \in \mathbb{R}^{K(E+1) \times P}$, centre them,
# $\bar X = X - \mathbf{1}\mu^\top$, and take the thin SVD $\bar X = U S V^\top$. The first columns of $V$
# are the directions along which the snapshots vary most; the coordinates of snapshot $j$ are
# $\bar X_j V_{:, :3}$ and the share of variance of component $k$ is $S_k^2 / \sum_l S_l^2$.
#
# `torch.pca_lowrank` computes the same thing with a randomised algorithm (cheap when $P$ is large);
# we check it against the exact SVD. Like every randomised SVD it needs a few more directions than it
# is asked to get right (oversampling): asked for exactly 3, its third value can be off by several %.

# %%
def pca(X, q=3):
    """Exact PCA of the rows of X (n, P): mean (1, P), directions V (P, q), explained variance shares."""
    X = X.double()
    mu = X.mean(0, keepdim=True)
    _U, S, Vh = torch.linalg.svd(X - mu, full_matrices=False)  # thin SVD of the centred snapshots
    q = min(q, X.shape[0] - 1)
    return mu, Vh[:q].T, (S[:q] ** 2 / (S**2).sum()).tolist()


X = traj.reshape(-1, traj.shape[-1])  # (K·(E+1), P)
mu, V, explained = pca(X)
q = V.shape[1]
# torch.pca_lowrank (randomised, q + 10 directions: oversampled) finds the same first q singular values
_, S_low, _ = torch.pca_lowrank(X.double(), q=min(q + 10, *X.shape), center=True, niter=6)
S_exact = torch.linalg.svdvals(X.double() - mu)[:q]
torch.testing.assert_close(S_low[:q], S_exact, rtol=1e-3, atol=1e-6)
coords = {"all experts": ((X.double() - mu) @ V).float().reshape(traj.shape[0], traj.shape[1], q)}  # (K, E+1, q)
# each expert in the basis of its own trajectory: shows the shape of one path
own = [pca(traj[i]) for i in range(len(buffer))]
coords["own trajectory"] = torch.stack([((traj[i].double() - m) @ v).float() for i, (m, v, _) in enumerate(own)])
print(f"joint PCA, explained variance of PC1..PC{q}:", ", ".join(f"{100 * v:.1f}%" for v in explained))
print("expert 0's own PCA:", ", ".join(f"{100 * v:.1f}%" for v in own[0][2]))


# %%
def draw_projection(experts=None, dims=2, last_epoch=None, basis="all experts"):
    experts = range(len(buffer)) if experts is None else experts
    last = E if last_epoch is None else last_epoch
    C = coords[basis]
    three = dims == 3 and C.shape[-1] >= 3
    fig = go.Figure()
    for i in experts:
        c = C[i, : last + 1]
        text = [f"expert {i}, epoch {e}" for e in range(last + 1)]
        if three:
            fig.add_scatter3d(x=c[:, 0], y=c[:, 1], z=c[:, 2], mode="lines+markers", name=f"expert {i}", text=text,
                              marker={"size": 3})
        else:
            fig.add_scatter(x=c[:, 0], y=c[:, 1], mode="lines+markers", name=f"expert {i}", text=text)
            fig.add_annotation(x=float(c[0, 0]), y=float(c[0, 1]), text="θ*₀", showarrow=False, yshift=10)
    var = explained if basis == "all experts" else own[0][2]
    title = f"Expert trajectories, PCA basis: {basis}" + (f" ({100 * sum(var[:dims]):.0f}% of the variance)"
                                                          if basis == "all experts" else " (one basis per expert)")
    if three:
        fig.update_layout(scene={"xaxis_title": "PC1", "yaxis_title": "PC2", "zaxis_title": "PC3"})
    else:
        fig.update_layout(xaxis_title="PC1", yaxis_title="PC2")
    fig.update_layout(title=title, height=500)
    fig.show()


draw_projection(dims=2, basis="all experts")
draw_projection(dims=3, basis="own trajectory")

# %% [markdown]
# In the joint basis, PC1 mostly separates the experts: each starts at its own random
# $\theta^*_0$, and experts from different initialisations stay far apart. MTT samples a whole
# trajectory and a start epoch $t$ each iteration, so the synthetic set must work from *many*
# starting points. In each expert's own basis you see the shape of one path: fast at first, then
# slower and slower, and bending — an epoch is not a straight line.
#
# Pick the experts, 2-D or 3-D, and how many epochs to show:

# %%
panel = live(  # the controls, a note and the redrawn figure (tests/test_notebooks.py drives them)
    lambda experts, dims, last_epoch, basis: draw_projection(list(experts), dims, last_epoch, basis),
    experts=widgets.SelectMultiple(options=list(range(len(buffer))), value=tuple(range(len(buffer))),
                                   description="experts", rows=min(5, len(buffer))),
    dims=widgets.ToggleButtons(options=[2, 3], value=2, description="dims"),
    last_epoch=widgets.IntSlider(value=E, min=1, max=E, description="up to epoch", style={"description_width": "initial"}, continuous_update=False),
    basis=widgets.Dropdown(options=list(coords), value="all experts", description="PCA basis"),
)
display(panel)

# %% [markdown]
# ## 4. How far does an epoch move the parameters?
#
# Two distances per epoch $e$: the step $\lVert\theta^*_{e+1} - \theta^*_e\rVert$ and the distance
# travelled from the start, $\lVert\theta^*_e - \theta^*_0\rVert$. The squared distance the expert covers in $M$
# epochs, $\lVert\theta^*_t - \theta^*_{t+M}\rVert^2$, is the **denominator** of MTT's matching loss.

# %%
step = (traj[:, 1:] - traj[:, :-1]).norm(dim=-1)  # (K, E): ‖θ*_{e+1} − θ*_e‖
from_start = (traj - traj[:, :1]).norm(dim=-1)  # (K, E+1): ‖θ*_e − θ*_0‖
between = (traj[0] - traj[1]).norm(dim=-1) if len(buffer) > 1 else None  # (E+1,): ‖θ*_e(0) − θ*_e(1)‖
fig = go.Figure()
for i in range(len(buffer)):
    fig.add_scatter(x=list(range(1, E + 1)), y=step[i].tolist(), mode="lines+markers", name=f"step, expert {i}")
    fig.add_scatter(x=list(range(E + 1)), y=from_start[i].tolist(), mode="lines", line={"dash": "dot"},
                    name=f"from θ*₀, expert {i}")
if between is not None:
    fig.add_scatter(x=list(range(E + 1)), y=between.tolist(), mode="lines", line={"dash": "dash", "color": "black"},
                    name="expert 0 to expert 1")
fig.update_layout(title="Distances in parameter space", xaxis_title="epoch", yaxis_title="‖Δθ‖", height=420)
fig.show()

# %%
# per layer: the share of each parameter tensor in the first epoch's squared step
first = (traj[:, 1] - traj[:, 0]).pow(2)
share = {n: float(first[:, sl].sum() / first.sum()) for n, sl in spec.slices().items()}
norm0 = {n: float(traj[:, 0, sl].norm()) for n, sl in spec.slices().items()}
rel = {n: float((traj[:, 1, sl] - traj[:, 0, sl]).norm()) / norm0[n] if norm0[n] > 0 else None  # biases/β start at 0
       for n, sl in spec.slices().items()}
fig = make_subplots(rows=1, cols=2, subplot_titles=("share of ‖θ*₁ − θ*₀‖² (%)",
                                                    "relative change ‖Δθ‖ / ‖θ*₀‖ (%, none where θ*₀ = 0)"))
fig.add_bar(x=list(share), y=[100 * v for v in share.values()], row=1, col=1)
fig.add_bar(x=list(rel), y=[None if v is None else 100 * v for v in rel.values()], row=1, col=2)
fig.update_yaxes(type="log", row=1, col=2)
fig.update_layout(title="Epoch 1, per parameter tensor", height=450, showlegend=False)
fig.show()

# %% [markdown]
# ## Exercises
#
# Replace `None` in each answer cell with your code; as shipped it falls back to the hidden
# solution (the collapsed cell below), and the next cell checks the answer against what the buffer
# itself stores and prints "correct".
#
# **Exercise 1 · Unflatten by hand.** `traj[0, -1]` is expert 0's last $\theta^*_E$ as one flat
# vector: the parameter tensors, each flattened, concatenated in `spec.names` order (shapes in
# `spec.shapes`). Cut the classifier's weight, `spec.names[-2]`, out of it, with its shape, using
# only slicing and `reshape` (not `spec.unflatten`).

# %% cellView="form" jupyter={"source_hidden": true} tags=["solution"]
#@title Solutions (hidden: try the exercises first)
import math


def _solution_1(flat, k):
    """Tensor k of a flat (P,) vector: skip the sizes of tensors 0 … k−1, take the next prod(shape) entries."""
    offset = sum(math.prod(s) for s in spec.shapes[:k])
    shape = tuple(spec.shapes[k])
    return flat[offset:offset + math.prod(shape)].reshape(shape)


def _solution_2(expert, epoch):
    """Test accuracy of θ*_epoch: arg-max of the network's logits on the test set, in chunks."""
    model = network_for(buffer, ds.device)
    theta = spec.unflatten(buffer.flat(expert, epoch, device=ds.device))
    correct = 0
    with torch.no_grad():
        for x, y in zip(ds.test_images.split(256), ds.test_labels.split(256)):
            logits = torch.func.functional_call(model, theta, (x,))  # (b, K)
            correct += int((logits.argmax(1) == y).sum())
    return correct / len(ds.test_labels)


# %%
name = spec.names[-2]
answer_1 = None  # your code here: the tensor `name` of traj[0, -1], shape spec.shapes[-2]
if answer_1 is None:
    answer_1 = _solution_1(traj[0, -1], len(spec.names) - 2)

# %%
# the check: the named tensor as the buffer stores it
torch.testing.assert_close(answer_1, buffer.params(0, E)[name])
print("correct")

# %% [markdown]
# **Exercise 2 · An expert's accuracy by hand.** Compute expert 0's test accuracy at its last epoch
# $E$: run the network (`network_for(buffer, ds.device)`) with $\theta^*_E$ (`torch.func.functional_call`
# with `spec.unflatten(...)`) on `ds.test_images`, take the arg-max class and compare with
# `ds.test_labels`. (At width 128, split the 1000 test images into chunks.)

# %%
answer_2 = None  # your code here: a float in [0, 1]
if answer_2 is None:
    answer_2 = _solution_2(0, E)

# %%
# the check: the accuracy recorded while the expert was trained (metrics stored in the buffer); a
# different summation order may flip a near-tie, hence the tolerance of two test images
recorded = buffer.metrics(0)["test_acc"][-1]
assert abs(answer_2 - recorded) <= 2 / len(ds.test_labels), (answer_2, recorded)
print(f"correct: {100 * answer_2:.1f}% (recorded: {100 * recorded:.1f}%)")

# %% [markdown]
# ## Takeaway
#
# * An expert trajectory is a handful of snapshots $\theta^*_0, \dots, \theta^*_E$, each one flat vector
#   in $\mathbb{R}^P$; that is all MTT reads from the real data while distilling.
# * Experts started from different initialisations stay far apart: the synthetic set must work from
#   many starting points.
# * Epochs move the parameters less and less, and unequally across layers — the scale the
#   matching loss divides by (notebook `03`).

# %%
results = {
    "num_experts": len(buffer),
    "epochs": buffer.epochs,
    "num_params": spec.num_params,
    "traj_shape": list(traj.shape),
    "test_acc": [m["test_acc"] for m in metrics],
    "explained_variance": explained,
    "own_explained_variance": own[0][2],
    "step_norms": step.mean(0).tolist(),
    "from_start_last": from_start[:, -1].tolist(),
    "share_sum": sum(share.values()),
}
print(json.dumps(results, indent=1))
if results_path:
    Path(results_path).write_text(json.dumps(results, indent=1))
