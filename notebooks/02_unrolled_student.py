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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/mttlite/mttlite/blob/main/notebooks/02_unrolled_student.ipynb)
#
# # 02 · The unrolled student
#
# **In the paper:** Eq. 1, the student update $\hat\theta_{t+n+1} = \hat\theta_{t+n} - \alpha \nabla\ell(\mathcal{A}(\mathcal{D}_\text{syn}); \hat\theta_{t+n})$;
# the symbols are defined in [`docs/method.md`](../docs/method.md).
#
# Stage 2 of MTT. Pick an expert and a start epoch $t$. A **student** network starts *on* the
# expert's trajectory, $\hat\theta_0 = \theta^*_t$, and trains on the synthetic set for $N$ plain SGD
# steps with learning rate $\alpha$:
#
# $$\hat\theta_{n+1} = \hat\theta_n - \alpha\, \nabla_\theta\, \ell\big(\mathcal{A}_{\omega_n}(x_{b_n}); \hat\theta_n\big), \qquad n = 0, \dots, N-1,$$
#
# where $x_{b_n}$ is the $n$-th mini-batch of synthetic images (`batch_syn` of them; all of them by
# default) and $\mathcal{A}_{\omega_n}$ a DSA augmentation. MTT wants $\hat\theta_N$ close to
# $\theta^*_{t+M}$: $N$ student steps on a few synthetic images should do what $M$ epochs on the whole
# real set did.
#
# What you will learn:
#
# * one student step written out by hand, checked against the library and against `torch.optim.SGD`;
# * the `StepPlan`: all randomness of an unroll drawn up front, so it can be replayed exactly;
# * the student's path drawn in the same PCA projection as the expert's, before and after a short
#   distillation; widgets for $N$, $\alpha$ and $t$.
#
# **Run time.** Opened without a GPU, the notebook picks the classroom CPU profile
# (`profile = "auto"`, see `notebooks/README.md`): **1.4 min on 2 CPU cores from a cold
# start**, the experts included (85 s, measured on a 2-core AMD EPYC with
# `python benchmarks/notebook_times.py --notebooks 02`).
# The teaching parameters (what a GPU gets), once the experts exist: under 1 min on a Colab T4 GPU
# (estimate, not yet measured); forced on 2 CPU cores about 5 min, mostly the short distillation
# (estimated). CI parameters: 13 s on 2 CPU cores (measured).

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
import copy
import json
from pathlib import Path

import ipywidgets as widgets
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from IPython.display import display
from torch.func import functional_call

from mttlite.augment import default_strategy, dsa
from mttlite.data import load_dataset
from mttlite.distill import preset, run
from mttlite.evaluate import random_real_subset
from mttlite.experts import train_experts
from mttlite.matching import matching_loss
from mttlite.params import ParamSpec
from mttlite.pipeline import make_distiller, network_for
from mttlite.student import StepPlan, make_plan, unroll

# %% tags=["parameters"]
profile = "auto"  # "auto": "cpu" without a GPU, "teaching" with one; or "teaching", "cpu", "ci"
dataset = "fashion-mnist-mini"
buffer_root = "runs/notebooks/buffers"  # shared expert cache
width = 128
num_experts = 5
train_epochs = 10
ipc = 1  # images per class of the synthetic set
expert = 0  # which expert trajectory
start_epoch = 2  # t
expert_epochs = 2  # M
syn_steps = 20  # N
syn_lr = 0.01  # alpha
batch_syn = None  # images per student step (None: all)
distill_iterations = 100  # a short distillation, to compare the path before and after
seed = 0
results_path = None

# %%
profile = choose_profile(profile, device)  # mttlite.notebook.PROFILES
if profile == "cpu":  # the classroom CPU profile: <= 5 min on 2 cores from a cold start, experts included
    width, num_experts, train_epochs, distill_iterations = 32, 3, 6, 50
elif profile == "ci":  # CI size, see notebooks/README.md
    width, num_experts, train_epochs, start_epoch, syn_steps, distill_iterations = 16, 2, 3, 1, 10, 10
    buffer_root = "runs/notebooks-ci/buffers"

torch.manual_seed(seed)
buffer_dir = Path(buffer_root) / f"{dataset}-convnet-w{width}-e{train_epochs}"
print(f"expert buffer: {buffer_dir}")


# %% [markdown]
# ## 1. Experts, network and a synthetic set
#
# The experts come from the shared buffer (trained by notebook `00`/`01` or right here). The
# synthetic set is, for now, just `ipc` random real images per class — exactly how MTT
# initialises it.

# %%
ds = load_dataset(dataset, device=device)
buffer = train_experts(ds, buffer_dir, num_experts=num_experts, train_epochs=train_epochs, width=width,
                       seed=seed, device=device, progress=False)
E = buffer.epochs[-1]
if start_epoch + expert_epochs > E:
    raise ValueError(f"start_epoch + expert_epochs = {start_epoch + expert_epochs} > the buffer's last epoch {E}")
net = network_for(buffer, device)  # the student's architecture, from the buffer's metadata
spec = ParamSpec.from_module(net)
images, labels = random_real_subset(ds, ipc, seed=seed)  # (K·ipc, C, H, W), (K·ipc,)
strategy = default_strategy(ds.name)
theta_start = buffer.flat(expert, start_epoch, device=device)  # θ*_t, (P,)
theta_target = buffer.flat(expert, start_epoch + expert_epochs, device=device)  # θ*_{t+M}
print(f"P = {spec.num_params:,}; synthetic set {tuple(images.shape)}; DSA strategy {strategy!r}")

# %% [markdown]
# ## 2. The plan: all the randomness of an unroll, drawn first
#
# Which images form each step's batch and which augmentation each batch gets are drawn *before*
# the unroll from one `torch.Generator` into a `StepPlan`. Replaying a plan gives bit-identical
# steps — the exact meta-gradient (notebook `07`) relies on that.

# %%
plan = make_plan(len(images), syn_steps, batch_syn, torch.Generator().manual_seed(seed))
print(f"N = {plan.syn_steps} steps; step 0 uses images {plan.batches[0].tolist()} with augmentation seed {plan.aug_seeds[0]}")

# %% [markdown]
# ## 3. One student step, by hand
#
# The network is a pure function of a *flat* parameter vector: `spec.unflatten(θ)` gives a
# name-keyed dict of views, and `torch.func.functional_call` runs the network with it. So one step is
#
# $$g_0 = \nabla_\theta\, \ell\big(f(\mathcal{A}_{\omega_0}(x_{b_0}); \hat\theta_0),\, y_{b_0}\big), \qquad \hat\theta_1 = \hat\theta_0 - \alpha g_0 .$$

# %%
idx, aug_seed = plan.batches[0], plan.aug_seeds[0]
x = dsa(images[idx], strategy, seed=aug_seed)  # A_ω0(x_b0): (B, C, H, W)
theta0 = theta_start.clone().requires_grad_(True)  # θ̂_0 = θ*_t
logits = functional_call(net, spec.unflatten(theta0), (x,))  # f(A(x); θ̂_0): (B, K)
loss = F.cross_entropy(logits, labels[idx])  # ℓ
(g0,) = torch.autograd.grad(loss, theta0)  # g_0: (P,)
theta1_by_hand = theta0.detach() - syn_lr * g0  # θ̂_1 = θ̂_0 − α g_0

# the library, replaying the same first step of the plan
one_step = StepPlan(plan.batches[:1], plan.aug_seeds[:1])
theta1_library = unroll(net, spec, theta_start, images, labels, syn_lr, one_step, strategy, create_graph=False).theta
torch.testing.assert_close(theta1_by_hand, theta1_library.detach())

# an independent reference: a real module with its parameters set to θ*_t, and torch.optim.SGD
ref = copy.deepcopy(net)
with torch.no_grad():
    for name, p in ref.named_parameters():
        p.copy_(spec.unflatten(theta_start)[name])
opt = torch.optim.SGD(ref.parameters(), lr=syn_lr)
F.cross_entropy(ref(x), labels[idx]).backward()
opt.step()
theta1_sgd = spec.flatten(dict(ref.named_parameters())).detach()
torch.testing.assert_close(theta1_by_hand, theta1_sgd)
diff_library = float((theta1_by_hand - theta1_library.detach()).abs().max())
diff_sgd = float((theta1_by_hand - theta1_sgd).abs().max())
print(f"student loss ℓ = {loss.item():.4f}; ‖g_0‖ = {g0.norm():.4f}")
print(f"max |by hand − library| = {diff_library:.2e}; max |by hand − torch.optim.SGD| = {diff_sgd:.2e}")

# %% [markdown]
# ### Exercises
#
# Replace `None` in each answer cell with your code; as shipped it falls back to the hidden
# solution (the collapsed cell below), and the next cell checks the answer against `unroll` and
# prints "correct".
#
# **Exercise 1 · A student with $\alpha = 0$.** What is $\hat\theta_1$ after one step with $\alpha = 0$,
# from $\hat\theta_0 = \theta^*_t$ (`theta_start`)? Answer with a tensor built from the variables above,
# without computing any gradient.

# %% cellView="form" jupyter={"source_hidden": true} tags=["solution"]
#@title Solutions (hidden: try the exercises first)
def _solution_1():
    # θ̂_1 = θ̂_0 − 0 · g_0 = θ*_t, whatever the gradient
    return theta_start.clone()


def _solution_2(theta, step_plan, alpha):
    """θ̂_N by hand: one gradient step per (batch, augmentation seed) of the plan."""
    for idx_n, seed_n in zip(step_plan.batches, step_plan.aug_seeds):
        th = theta.detach().requires_grad_(True)
        x_n = dsa(images[idx_n], strategy, seed=seed_n)  # A_ωn(x_bn)
        loss_n = F.cross_entropy(functional_call(net, spec.unflatten(th), (x_n,)), labels[idx_n])  # ℓ
        (g_n,) = torch.autograd.grad(loss_n, th)
        theta = th.detach() - alpha * g_n  # θ̂_{n+1} = θ̂_n − α g_n
    return theta


# %%
answer_1 = None  # your answer: a (P,) tensor
if answer_1 is None:
    answer_1 = _solution_1()

# %%
# the check: the library's student, one step with α = 0
theta1_alpha0 = unroll(net, spec, theta_start, images, labels, 0.0, one_step, strategy, create_graph=False).theta
torch.testing.assert_close(answer_1, theta1_alpha0.detach())
print("correct")

# %% [markdown]
# **Exercise 2 · Two steps by hand.** `plan2` below is a new two-step plan. Starting from
# `theta_start`, take its two steps yourself, as in the cell above: for each step $n$, augment the
# batch `images[plan2.batches[n]]` with seed `plan2.aug_seeds[n]`, take the gradient of the
# cross-entropy at the current $\hat\theta_n$, and step with $\alpha$ = `syn_lr`. The answer is $\hat\theta_2$.

# %%
plan2 = make_plan(len(images), 2, batch_syn, torch.Generator().manual_seed(seed + 1))
answer_2 = None  # your code here: θ̂_2, a (P,) tensor
if answer_2 is None:
    answer_2 = _solution_2(theta_start, plan2, syn_lr)

# %%
# the check: the library's unroll of the same plan
theta2_library = unroll(net, spec, theta_start, images, labels, syn_lr, plan2, strategy, create_graph=False).theta
torch.testing.assert_close(answer_2, theta2_library.detach())
print("correct")

# %% [markdown]
# ## 4. N steps, and where they lead
#
# `unroll(..., return_path=True)` returns every $\hat\theta_n$. For drawing we project them with the
# PCA of *this expert's* trajectory $\theta^*_0, \dots, \theta^*_E$ (see notebook `01`), so the
# student's path and the expert's share one picture. Next to it, the quantity MTT cares about: the
# normalised distance to the target after $n$ steps,
#
# $$L(n) = \frac{\lVert\hat\theta_n - \theta^*_{t+M}\rVert^2}{\lVert\theta^*_t - \theta^*_{t+M}\rVert^2}, \qquad L(0) = 1 .$$

# %%
traj = torch.stack([buffer.flat(expert, e, device=device) for e in buffer.epochs]).double()  # (E+1, P)
mu = traj.mean(0, keepdim=True)
_, _, Vh = torch.linalg.svd(traj - mu, full_matrices=False)
V = Vh[: min(3, E)].T  # (P, q)


def project(thetas):
    """(n, P) → (n, q) coordinates in the expert's PCA basis."""
    return ((torch.stack(list(thetas)).double() - mu) @ V).float().cpu()


def student_path(images, N, alpha, t, seed_=seed):
    """θ̂_0 … θ̂_N from θ*_t (no graph: we only look) and L(n) for n = 0 … N."""
    th0 = buffer.flat(expert, t, device=device)
    target = buffer.flat(expert, t + expert_epochs, device=device)
    p = make_plan(len(images), N, batch_syn, torch.Generator().manual_seed(seed_))
    res = unroll(net, spec, th0, images.detach(), labels, alpha, p, strategy, create_graph=False, return_path=True)
    L = [float(matching_loss(th, th0, target)) for th in res.path]
    return res, L


# %% [markdown]
# A short distillation (notebook `04` explains it) gives a second synthetic set to compare with.

# %%
config = preset("demo", dataset=dataset, ipc=ipc, syn_steps=syn_steps, expert_epochs=expert_epochs,
                max_start_epoch=E - expert_epochs + 1, iterations=distill_iterations, seed=seed)
distiller = make_distiller(config, buffer, dataset=ds, device=device)
run(distiller, progress=False)
distilled_images = distiller.images.detach()
print(f"distilled {distill_iterations} iterations; loss {distiller.history.loss[0]:.3f} → {distiller.history.loss[-1]:.3f}")


# %%
def draw(N=syn_steps, alpha=syn_lr, t=start_epoch):
    sets = {"random real images": images, f"after {distill_iterations} distillation iterations": distilled_images}
    expert_xy = project(traj)
    fig = go.Figure()
    fig.add_scatter(x=expert_xy[:, 0], y=expert_xy[:, 1], mode="lines+markers+text", name=f"expert {expert}",
                    text=[f"θ*<sub>{e}</sub>" for e in buffer.epochs], textposition="top center", line={"color": "black"})
    fig.add_scatter(x=[expert_xy[t + expert_epochs, 0]], y=[expert_xy[t + expert_epochs, 1]], mode="markers",
                    marker={"size": 16, "symbol": "star", "color": "gold"}, name="target θ*<sub>t+M</sub>")
    curves = go.Figure()
    out = {}
    for (name, imgs), color in zip(sets.items(), ["#d62728", "#1f77b4"]):
        res, L = student_path(imgs, N, alpha, t)
        xy = project(res.path)
        fig.add_scatter(x=xy[:, 0], y=xy[:, 1], mode="lines+markers", marker={"size": 4, "color": color},
                        name=f"student on {name}")
        curves.add_scatter(y=L, mode="lines+markers", name=name, marker={"color": color})
        out[name] = (res, L)
    fig.update_layout(title=f"Student path: N = {N} steps from θ*<sub>{t}</sub>, α = {alpha:.3g}, target θ*<sub>{t + expert_epochs}</sub>",
                      xaxis_title="PC1 of the expert's trajectory", yaxis_title="PC2", height=480)
    curves.add_hline(y=1.0, line_dash="dot", annotation_text="where it started")
    curves.update_layout(title="Normalised distance to the target, L(n)", xaxis_title="student step n",
                         yaxis_title="L(n)", height=350)
    fig.show()
    curves.show()
    return out


paths = draw()

# %% [markdown]
# The student takes $N$ steps on a handful of images while the expert took $M$ epochs of mini-batches
# on thousands. With random real images the student does not head for $\theta^*_{t+M}$ well; the
# distilled images are *optimised* to bring $L(N)$ down. A larger $\alpha$ moves further per step, and
# too large overshoots; later start epochs $t$ have smaller expert steps to match.
#
# Change $N$, $\alpha$ and $t$:

# %%
panel = live(  # the controls, a note and the redrawn figure (tests/test_notebooks.py drives them)
    draw,
    N=widgets.IntSlider(value=syn_steps, min=1, max=max(60, syn_steps), description="N (syn_steps)", style={"description_width": "initial"},
                        continuous_update=False),
    alpha=widgets.FloatLogSlider(value=syn_lr, base=10, min=-4, max=0, description="α (syn_lr)", style={"description_width": "initial"},
                                 continuous_update=False),
    t=widgets.IntSlider(value=start_epoch, min=0, max=E - expert_epochs, description="t (start epoch)", style={"description_width": "initial"},
                        continuous_update=False),
)
display(panel)

# %% [markdown]
# ## Takeaway
#
# * A student step is one line on a flat parameter vector, $\hat\theta_{n+1} = \hat\theta_n - \alpha g_n$ — plain
#   SGD, the same as `torch.optim.SGD` on a real module.
# * All randomness of an unroll (batches, augmentations) is drawn first into a `StepPlan`, so the
#   same $N$ steps can be replayed exactly.
# * The student starts *on* the expert's path at $\theta^*_t$; random real images do not lead it to
#   $\theta^*_{t+M}$, distilled ones are optimised to.

# %%
(res_real, L_real), (res_dist, L_dist) = paths.values()
results = {
    "one_step_diff_library": diff_library,
    "one_step_diff_sgd": diff_sgd,
    "path_len": len(res_real.path),
    "num_params": spec.num_params,
    "student_losses": [float(v) for v in res_real.losses],  # ℓ at each student step
    "L_real": L_real,
    "L_distilled": L_dist,
    "distill_loss_first": distiller.history.loss[0],
    "distill_loss_last": distiller.history.loss[-1],
}
print(json.dumps({k: v for k, v in results.items() if not isinstance(v, list)}, indent=1))
if results_path:
    Path(results_path).write_text(json.dumps(results, indent=1))
