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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/mttlite/mttlite/blob/main/notebooks/04_learning_alpha_and_pixels.ipynb)
#
# # 04 · Learning the pixels and $\alpha$ (the outer loop)
#
# **In the paper:** Algorithm 1, the outer loop that learns the pixels and $\alpha$ together; the
# symbols are defined in [`docs/method.md`](../docs/method.md).
#
# Stage 4 of MTT (the paper's Algorithm 1). Each iteration:
#
# 1. sample an expert $\tau^*$ and a start epoch $t \sim \mathcal{U}\{0, \dots, T^+ - 1\}$ (`max_start_epoch`);
# 2. unroll the student $N$ steps from $\theta^*_t$ on the synthetic set with learning rate $\alpha$;
# 3. compute $\mathcal{L} = \lVert\hat\theta_{t+N} - \theta^*_{t+M}\rVert^2 / \lVert\theta^*_t - \theta^*_{t+M}\rVert^2$;
# 4. back-propagate through all $N$ steps and take one SGD step (momentum 0.5) on the pixels and on $\alpha$:
#
# $$x \leftarrow x - \eta_\text{img}\, \frac{\partial\mathcal{L}}{\partial x}, \qquad
#   \alpha \leftarrow \alpha - \eta_\alpha\, \frac{\partial\mathcal{L}}{\partial\alpha}
#   \qquad (\eta_\text{img} = \texttt{lr\_img},\ \eta_\alpha = \texttt{lr\_lr}).$$
#
# What you will learn:
#
# * the loop step by step (`Distiller.step()`), then the whole run with **live plots** of
#   $\mathcal{L}$, $\alpha$ and the images, driven by `distill.run(..., callbacks=...)`;
# * how the images change (an animation you can scrub);
# * what goes wrong when `lr_img`, `lr_lr` or $T^+$ are too large — a guarded demo that catches
#   `DistillationDiverged` and shows its message.
#
# **Run time.** Opened without a GPU, the notebook picks the classroom CPU profile
# (`profile = "auto"`, see `notebooks/README.md`): **2.7 min on 2 CPU cores from a cold
# start**, the experts included (160 s, measured on a 2-core AMD EPYC with
# `python benchmarks/notebook_times.py --notebooks 04`).
# The teaching parameters (what a GPU gets), once the experts exist: about 1 min on a Colab T4 GPU
# (estimate, not yet measured); forced on 2 CPU cores about 12 min (estimated: 300 iterations x
# 2.3 s). CI parameters: 11 s on 2 CPU cores (measured).

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
import json
from pathlib import Path

import plotly.express as px
import plotly.graph_objects as go
import torch
from IPython.display import clear_output
from plotly.subplots import make_subplots

from mttlite.data import load_dataset
from mttlite.distill import DistillationDiverged, preset, run
from mttlite.experts import train_experts
from mttlite.pipeline import make_distiller

# %% tags=["parameters"]
profile = "auto"  # "auto": "cpu" without a GPU, "teaching" with one; or "teaching", "cpu", "ci"
dataset = "fashion-mnist-mini"
buffer_root = "runs/notebooks/buffers"  # shared expert cache
width = 128
num_experts = 5
train_epochs = 10
ipc = 1
syn_steps = 20  # N
expert_epochs = 2  # M
max_start_epoch = 5  # T+
iterations = 300
lr_img = 100.0
lr_lr = 1e-5
lr_teacher = 0.01  # initial alpha
plot_every = 10  # refresh the live plots every this many iterations
snapshot_every = 10  # keep the images every this many iterations (for the animation)
bad_lr_img = 1e5  # the divergence demo: a pixel learning rate 1000x too large
bad_lr_lr = 10.0  # ... and a learning rate of alpha far too large
bad_iterations = 30  # give up the divergence demo after this many iterations
noise_iterations = 150  # section 5: a run from pure noise (pix_init: noise)
noise_lr_img = 1000.0  # ... with a larger pixel learning rate: noise is far from any image
seed = 0
results_path = None

# %%
profile = choose_profile(profile, device)  # mttlite.notebook.PROFILES
if profile == "cpu":  # the classroom CPU profile: <= 5 min on 2 cores from a cold start, experts included
    width, num_experts, train_epochs, max_start_epoch, iterations, noise_iterations = 32, 3, 6, 4, 100, 75
elif profile == "ci":  # CI size, see notebooks/README.md
    width, num_experts, train_epochs, syn_steps, max_start_epoch, iterations = 16, 2, 3, 10, 2, 20
    plot_every, snapshot_every, noise_iterations = 5, 5, 10
    buffer_root = "runs/notebooks-ci/buffers"

torch.manual_seed(seed)
buffer_dir = Path(buffer_root) / f"{dataset}-convnet-w{width}-e{train_epochs}"
print(f"expert buffer: {buffer_dir}")

# %%
ds = load_dataset(dataset, device=device)
buffer = train_experts(ds, buffer_dir, num_experts=num_experts, train_epochs=train_epochs, width=width,
                       seed=seed, device=device, progress=False)
config = preset("demo", dataset=dataset, ipc=ipc, syn_steps=syn_steps, expert_epochs=expert_epochs,
                max_start_epoch=max_start_epoch, iterations=iterations, lr_img=lr_img, lr_lr=lr_lr,
                lr_teacher=lr_teacher, seed=seed)
distiller = make_distiller(config, buffer, dataset=ds, device=device)
initial_images = distiller.images.detach().clone()
print(config)

# %% [markdown]
# ## 1. One iteration, by hand
#
# `Distiller.step()` is one iteration. It returns what happened: the sampled expert and $t$, the
# loss, $\partial\mathcal{L}/\partial\alpha$, $\lVert\partial\mathcal{L}/\partial x\rVert$, the student's training
# losses and the new $\alpha$.

# %%
info = distiller.step()
print(f"iteration {info.iteration}: expert {info.expert}, t = {info.start_epoch}, L = {info.loss:.4f}")
print(f"  ‖∂L/∂x‖ = {info.grad_norm_images:.4g}, ∂L/∂α = {info.grad_syn_lr:.4g} → α = {info.syn_lr:.6g}")
print(f"  student losses ℓ_0 … ℓ_N-1: {', '.join(f'{v:.3f}' for v in info.student_losses)}")
print(f"  {info.seconds:.2f} s")

# %% [markdown]
# ### Exercises: the first update, by hand
#
# Replace `None` in each answer cell with your code; as shipped it falls back to the hidden
# solution (the collapsed cell below), and the next cell checks the answer against what the
# distiller did and prints "correct". Both updates are SGD with momentum 0.5, and on the *first*
# step torch's momentum buffer is the gradient itself: the first update is plain SGD.
#
# **Exercise 1 · $\alpha$ after iteration 1.** $\alpha$ started at `lr_teacher`; iteration 1 found
# $\partial\mathcal{L}/\partial\alpha$ = `info.grad_syn_lr`. Predict $\alpha$ after the update (a float).

# %% cellView="form" jupyter={"source_hidden": true} tags=["solution"]
#@title Solutions (hidden: try the exercises first)
def _solution_1(first):
    # α ← α − lr_lr · ∂L/∂α (first step: momentum buffer = gradient)
    return lr_teacher - lr_lr * first.grad_syn_lr


def _solution_2(first):
    # x ← x − lr_img · ∂L/∂x, so ‖x_1 − x_0‖ = lr_img · ‖∂L/∂x‖
    return lr_img * first.grad_norm_images


# %%
answer_1 = None  # your code here: a float
if answer_1 is None:
    answer_1 = _solution_1(info)

# %%
# the check: the α the distiller holds after its first iteration (float32, hence the tolerance)
torch.testing.assert_close(answer_1, distiller.syn_lr.item(), rtol=1e-6, atol=1e-9)
print(f"correct: α {lr_teacher:g} → {answer_1:.6g}")

# %% [markdown]
# **Exercise 2 · How far the pixels moved.** Predict $\lVert x_1 - x_0\rVert$, the norm of the change of all
# pixels in iteration 1, from `info.grad_norm_images` ($\lVert\partial\mathcal{L}/\partial x\rVert$) and `lr_img`.

# %%
answer_2 = None  # your code here: a float
if answer_2 is None:
    answer_2 = _solution_2(info)

# %%
# the check: the distiller's pixels now (after iteration 1) against the ones it started from
moved = float((distiller.images.detach() - initial_images).norm())
torch.testing.assert_close(answer_2, moved, rtol=1e-3, atol=1e-9)
print(f"correct: ‖x_1 − x_0‖ = {moved:.4g}")

# %% [markdown]
# A negative $\partial\mathcal{L}/\partial\alpha$ means "a larger $\alpha$ would bring the student closer to the
# target" — so $\alpha$ grows. The learned $\alpha$ becomes the learning rate every evaluation network
# uses on the distilled set (notebook `05`).
#
# ## 2. The whole run, with live plots
#
# `run(distiller, callbacks=[f])` calls `f(info)` after every iteration. Our callback keeps the
# numbers, keeps a copy of the images every `snapshot_every` iterations, and every `plot_every`
# iterations redraws ONE figure in place: it clears the cell's output and shows the new figure.
# `clear_output(wait=True)` holds the clearing back until the new figure arrives, so nothing
# flickers, and at every moment the cell shows one figure, in JupyterLab, Colab and headless
# (papermill records the final figure as the cell's one figure). Why not a *display id*
# (`handle = display(..., display_id=True)`, then `handle.update(...)`)? JupyterLab's plotly renderer
# draws a figure once and ignores later updates of the same output: the page would keep showing
# iteration 0 (found by `benchmarks/browser_pass.py`, which reads the figure in a real browser).

# %%
hist = {"iteration": [], "loss": [], "syn_lr": [], "grad_syn_lr": [], "grad_norm_images": [], "t": []}
snapshots = {info.iteration: info.images.detach().cpu().clone()}
hist_first = info


def figure_now():
    fig = make_subplots(rows=1, cols=3, subplot_titles=("matching loss L", "α (syn_lr)", "‖∂L/∂x‖"))
    fig.add_scatter(x=hist["iteration"], y=hist["loss"], mode="lines", row=1, col=1)
    fig.add_scatter(x=hist["iteration"], y=hist["syn_lr"], mode="lines", row=1, col=2)
    fig.add_scatter(x=hist["iteration"], y=hist["grad_norm_images"], mode="lines", row=1, col=3)
    fig.update_xaxes(title_text="iteration")
    fig.update_layout(height=320, showlegend=False,
                      title=f"iteration {hist['iteration'][-1] if hist['iteration'] else 0} / {iterations}")
    return fig


def redraw():
    """Show the figure of the numbers so far as the cell's one output (replacing the previous one)."""
    clear_output(wait=True)  # cleared when the next output arrives: no blank moment
    figure_now().show()


redraw()  # iteration 0: the empty axes


def on_iteration(info):
    hist["iteration"].append(info.iteration)
    hist["loss"].append(info.loss)
    hist["syn_lr"].append(info.syn_lr)
    hist["grad_syn_lr"].append(info.grad_syn_lr)
    hist["grad_norm_images"].append(info.grad_norm_images)
    hist["t"].append(info.start_epoch)
    if info.iteration % snapshot_every == 0 or info.iteration == iterations:
        snapshots[info.iteration] = info.images.detach().cpu().clone()  # info.images is live: clone it
    if info.iteration % plot_every == 0 or info.iteration == iterations:
        redraw()


run(distiller, callbacks=[on_iteration], progress=False)
print(f"done: {distiller.iteration} iterations, α = {distiller.syn_lr.item():.5g}")

# %% [markdown]
# The loss is noisy because every iteration draws a different expert and start epoch $t$ (later
# $t$ are easier or harder depending on the data). Averaged, it goes down:

# %%
losses = torch.tensor(distiller.history.loss)
k = max(1, len(losses) // 10)
fig = go.Figure()
fig.add_scatter(y=losses.tolist(), mode="markers", marker={"size": 4, "color": [hist_first.start_epoch] + hist["t"],
                                                                 "colorscale": "Viridis", "showscale": True,
                                                                 "colorbar": {"title": "t"}}, name="L")
fig.add_scatter(x=list(range(k - 1, len(losses))), y=losses.unfold(0, k, 1).mean(1).tolist(), mode="lines",
                name=f"moving average ({k})")
fig.update_layout(title="Matching loss per iteration (colour: start epoch t)", xaxis_title="iteration",
                  yaxis_title="L", height=380)
fig.show()

# %% [markdown]
# ## 3. How the images change
#
# Drag the slider under the figure (a plotly animation: no kernel needed) to watch the pixels move
# from the real images they started as. The last row shows the total change $x_\text{end} - x_\text{start}$.

# %%
its = sorted(snapshots)
frames = torch.stack([ds.denormalize(snapshots[i].to(ds.device)).cpu() for i in its])  # (F, n, C, H, W)
n_show = min(10, frames.shape[1])
grid = frames[:, :n_show].permute(0, 1, 3, 4, 2)  # (F, n, H, W, C)
grid = torch.cat(list(grid.unbind(1)), dim=2)  # (F, H, n·W, C): images side by side
grid = grid[..., 0] if grid.shape[-1] == 1 else grid
fig = px.imshow(grid.numpy(), animation_frame=0, binary_string=True, height=260,
                labels={"animation_frame": "snapshot"},
                title="Synthetic images during distillation: " + ", ".join(ds.class_names[int(y)] for y in distiller.labels[:n_show]))
fig.update_xaxes(showticklabels=False).update_yaxes(showticklabels=False)
for step_, it in zip(fig.layout.sliders[0].steps, its):
    step_.label = f"it {it}"
fig.show()
delta = (distiller.images.detach().cpu() - initial_images.cpu())[:n_show, 0]  # (n, H, W) channel 0
fig = px.imshow(torch.cat(list(delta), dim=1).numpy(), color_continuous_scale="RdBu", zmin=-float(delta.abs().max()),
                zmax=float(delta.abs().max()), height=220, title="x_end − x_start (channel 0, normalised units)")
fig.update_xaxes(showticklabels=False).update_yaxes(showticklabels=False)
fig.show()

# %% [markdown]
# ## 4. When it goes wrong
#
# The three knobs the authors tune by hand are `lr_img`, `lr_lr` and $T^+$ (`max_start_epoch`;
# "raise $T^+$ from 1 until unstable"). Too large a `lr_img` throws the pixels far out of the data's
# range, and the student's steps on them blow up; too large a `lr_lr` can push $\alpha$ below zero (a
# student that climbs its loss) or so high that the student diverges. The library checks every
# iteration and raises `DistillationDiverged` with a message naming the knob to turn, keeping the
# last good state. We provoke it on purpose:

# %%
bad = preset("demo", dataset=dataset, ipc=ipc, syn_steps=syn_steps, expert_epochs=expert_epochs,
             max_start_epoch=max_start_epoch, iterations=bad_iterations, lr_img=bad_lr_img, lr_lr=bad_lr_lr,
             lr_teacher=lr_teacher, seed=seed)
bad_distiller = make_distiller(bad, buffer, dataset=ds, device=device)
bad_alpha = []
diverged, message = False, ""
try:
    run(bad_distiller, callbacks=[lambda i: bad_alpha.append(i.syn_lr)], progress=False)
except DistillationDiverged as e:
    diverged, message = True, str(e)
    print("DistillationDiverged:\n ", message)
    print(f"\nthe distiller kept its last good state: iteration {bad_distiller.iteration}, "
          f"α = {bad_distiller.syn_lr.item():.4g}, all pixels finite: {bool(torch.isfinite(bad_distiller.images).all())}")
if not diverged:
    print(f"no divergence within {bad_iterations} iterations with lr_img = {bad_lr_img:g}, lr_lr = {bad_lr_lr:g}")

# %% [markdown]
# Two safer choices: lower the learning rates the message names, or learn $\log\alpha$ instead of
# $\alpha$ (`alpha_param="log"`), which keeps $\alpha > 0$ by construction (then `lr_lr` acts on
# $\log\alpha$, a relative step, so the paper's values do not carry over).

# %% [markdown]
# ## 5. From noise: the images become class prototypes
#
# Everything above started from real images, so the result still looks like them. Start instead from
# pure noise, $x \sim \mathcal{N}(0, 1)$ per pixel (`pix_init="noise"`; with a larger `lr_img`, as noise is far
# from any image), and the same loss draws an image per class that looks like no single training image
# but like the class as a whole — the look of the paper's figures of distilled sets. The number under
# the figure is the mean cosine similarity between each image and the average real image of its class
# (in the normalised space the networks see): about 0 for noise.


# %%
def class_mean_cosine(images, labels):
    """Mean over the set of cos(x_i, mean of the real training images of x_i's class); images (n, C, H, W)."""
    means = torch.stack([ds.train_images[ds.train_labels == c].mean(0) for c in range(ds.num_classes)])  # (K, C, H, W)
    return float(torch.nn.functional.cosine_similarity(images.flatten(1), means[labels].flatten(1)).mean())


noise = preset("demo", dataset=dataset, ipc=ipc, syn_steps=syn_steps, expert_epochs=expert_epochs,
               max_start_epoch=max_start_epoch, iterations=noise_iterations, lr_img=noise_lr_img, lr_lr=lr_lr,
               lr_teacher=lr_teacher, pix_init="noise", seed=seed)
noise_distiller = make_distiller(noise, buffer, dataset=ds, device=device)
noise_start = noise_distiller.images.detach().clone()
run(noise_distiller, progress=False)
noise_end = noise_distiller.images.detach()
cos_start = class_mean_cosine(noise_start, noise_distiller.labels)
cos_end = class_mean_cosine(noise_end, noise_distiller.labels)


def side_by_side(images):
    """(n, C, H, W) normalised -> (H, n·W) (or (H, n·W, C)) pixels in [0, 1], the first 10 images."""
    pix = ds.denormalize(images[:10].to(ds.device)).cpu().permute(0, 2, 3, 1)  # (n, H, W, C)
    row = torch.cat(list(pix.unbind(0)), dim=1)
    return row[..., 0] if row.shape[-1] == 1 else row


fig = px.imshow(torch.cat([side_by_side(noise_start), side_by_side(noise_end)], dim=0).numpy(), binary_string=True,
                height=300, title=f"From noise (top) after {noise_distiller.iteration} iterations (bottom): "
                + ", ".join(ds.class_names[int(y)] for y in noise_distiller.labels[:10]))
fig.update_xaxes(showticklabels=False).update_yaxes(showticklabels=False)
fig.show()
print(f"cosine with the class's mean real image: {cos_start:.3f} (noise) -> {cos_end:.3f} "
      f"after {noise_distiller.iteration} iterations")

# %% [markdown]
# ## Takeaway
#
# * One iteration = sample (expert, $t$) → unroll $N$ steps → $\mathcal{L}$ → one SGD step (momentum 0.5) on the
#   pixels with `lr_img` and on $\alpha$ with `lr_lr`.
# * $\mathcal{L}$ is noisy from one iteration to the next (each draws another expert and $t$); its average
#   goes down, and $\alpha$ moves with the sign of $-\partial\mathcal{L}/\partial\alpha$.
# * `lr_img`, `lr_lr` and $T^+$ are the knobs that make a run diverge; the library stops with the one
#   to turn and keeps the last good state.
# * From noise, the same loss paints one prototype per class: what the images learn is what the
#   experts' trajectories need, not a copy of a training image.

# %%
results = {
    "loss_first": float(losses[: max(1, len(losses) // 4)].mean()),
    "loss_last": float(losses[-max(1, len(losses) // 4):].mean()),
    "iterations": distiller.iteration,
    "syn_lr_first": lr_teacher,
    "syn_lr_last": distiller.syn_lr.item(),
    "callback_calls": len(hist["iteration"]),
    "snapshots": its,
    "pixels_changed": float((distiller.images.detach().cpu() - initial_images.cpu()).abs().max()),
    "diverged": diverged,
    "message": message,
    "bad_last_good_iteration": bad_distiller.iteration,
    "bad_state_finite": bool(torch.isfinite(bad_distiller.images).all()),
    "noise_iterations": noise_distiller.iteration,
    "noise_cos_start": cos_start,
    "noise_cos_end": cos_end,
}
print(json.dumps(results, indent=1))
if results_path:
    Path(results_path).write_text(json.dumps(results, indent=1))
