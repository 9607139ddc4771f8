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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/mttlite/mttlite/blob/main/notebooks/00_quickstart.ipynb)
#
# # 00 · Quickstart: distil Fashion-MNIST into 10 images
#
# **In the paper:** the whole of Algorithm 1 (experts → distillation), judged the way every accuracy
# of Table 1 is judged (fresh networks trained on the set alone, next to random real images); the
# symbols ($\tau^*$, $N$, $M$, $T^+$, $\alpha$) are defined in [`docs/method.md`](../docs/method.md).
#
# **Dataset distillation by Matching Training Trajectories** (MTT, Cazenavette et al., CVPR 2022)
# learns a tiny synthetic set $\mathcal{D}_\text{syn}$ — here **one image per class** — such that a
# network trained *only* on it does as well as possible on the real test set.
#
# In this notebook you run the whole method end to end, in minutes:
#
# 1. train a few **experts** on the real data and record their parameter trajectories
#    $\tau^* = (\theta^*_0, \theta^*_1, \dots, \theta^*_E)$;
# 2. **distil**: learn the pixels and a learning rate $\alpha$ so that a student trained on the
#    synthetic images for $N$ steps lands where an expert stood $M$ epochs later;
# 3. **evaluate**: train fresh networks on the 10 images and test them on the real test set;
# 4. compare with a **random real subset of the same size** — the baseline every table starts with;
# 5. **look at** the images before and after distillation.
#
# The next notebooks open each stage up: `01` experts, `02` the unrolled student, `03` the
# matching loss, `04` the outer loop, `05` evaluation, `06` long vs short range, `07` memory,
# `08` reproduction.
#
# **Run time.** Opened without a GPU, the notebook picks the classroom CPU profile
# (`profile = "auto"`, see `notebooks/README.md`): **2.0 min on 2 CPU cores from a cold
# start**, the experts included (119 s, measured on a 2-core AMD EPYC with
# `python benchmarks/notebook_times.py --notebooks 00`).
# The teaching parameters (`profile = "teaching"`, what a GPU gets): about 4 min on a Colab T4 GPU
# (estimate, not yet measured); forced on 2 CPU cores about 30 min, of which 22 min train the
# experts (estimated from measured unit costs: 26 s per expert epoch and 2.3 s per distillation
# iteration at width 128). CI parameters: 40 s on 2 CPU cores, expert training included (measured).

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
import time
from pathlib import Path

import plotly.express as px
import plotly.graph_objects as go
import torch

from mttlite.data import load_dataset
from mttlite.distill import preset, run
from mttlite.evaluate import EvalProtocol, evaluate_random_real, random_real_subset
from mttlite.experts import train_experts
from mttlite.augment import default_strategy
from mttlite.matching import matching_loss
from mttlite.params import ParamSpec
from mttlite.pipeline import make_distiller, network_for, to_synset
from mttlite.student import make_plan, unroll

# %% tags=["parameters"]
# Parameters (papermill can override every one of them).
profile = "auto"  # "auto": "cpu" without a GPU, "teaching" with one; or "teaching", "cpu", "ci"
dataset = "fashion-mnist-mini"  # the embedded 6000/1000-image Fashion-MNIST subset (no download)
buffer_root = "runs/notebooks/buffers"  # expert buffers are cached here and shared by all notebooks
width = 128  # ConvNet-3 width (the paper's 128)
num_experts = 5  # experts to train (the paper uses 100)
train_epochs = 10  # epochs per expert, E
ipc = 1  # images per class
syn_steps = 20  # N: student steps per iteration
expert_epochs = 2  # M: expert epochs the student must cover
max_start_epoch = 5  # T+: start epochs t are drawn from 0 .. T+-1
iterations = 200  # outer iterations (the paper: 5000)
lr_img = 100.0  # learning rate of the pixels
lr_lr = 1e-6  # learning rate of alpha
lr_teacher = 0.01  # initial alpha, the experts learning rate
eval_epochs = 300  # epochs of each evaluation network
num_nets = 3  # evaluation networks (mean +- std over them)
seed = 0
results_path = None  # where to write the key results as JSON (None: don't)

# %%
# The profile: the sizes below (teaching), the classroom CPU sizes or the CI sizes (`make test`'s nbval
# run sets MTTLITE_CI=1, see notebooks/README.md).
profile = choose_profile(profile, device)  # mttlite.notebook.PROFILES
if profile == "cpu":  # the classroom CPU profile: <= 5 min on 2 cores from a cold start, experts included
    width, num_experts, train_epochs, iterations, max_start_epoch = 32, 3, 6, 100, 4
elif profile == "ci":  # CI size, see notebooks/README.md
    width, num_experts, train_epochs, iterations, syn_steps = 16, 2, 3, 20, 10
    max_start_epoch, expert_epochs, eval_epochs, num_nets = 2, 2, 50, 2
    buffer_root = "runs/notebooks-ci/buffers"

torch.manual_seed(seed)  # the library itself only uses explicit torch.Generator objects
buffer_dir = Path(buffer_root) / f"{dataset}-convnet-w{width}-e{train_epochs}"
print(f"expert buffer: {buffer_dir}")

# %% [markdown]
# ## 1. The real data
#
# The data set lives on the device as normalised tensors $x = (p - \mu)/\sigma$ of shape
# $(N, C, H, W)$.

# %%
ds = load_dataset(dataset, device=device)
print(ds)
print("classes:", ", ".join(ds.class_names))

# %% [markdown]
# ## 2. Experts
#
# Each expert is a ConvNet-3 trained with plain SGD (lr 0.01, DSA augmentation) on the real data;
# its parameters are saved after every epoch. The buffer is **resumable**: complete experts are
# skipped, so re-running this cell (or another notebook with the same settings) costs nothing.

# %%
t0 = time.perf_counter()
buffer = train_experts(ds, buffer_dir, num_experts=num_experts, train_epochs=train_epochs, width=width,
                       seed=seed, device=device)
print(buffer, f"({time.perf_counter() - t0:.0f} s)")
expert_acc = [buffer.metrics(i)["test_acc"][-1] for i in range(len(buffer))]
print("experts' final test accuracy:", ", ".join(f"{100 * a:.1f}%" for a in expert_acc))

# %% [markdown]
# ## 3. Distil
#
# Every iteration samples an expert and a start epoch $t < T^+$, trains a student for $N$ steps
# from $\theta^*_t$ on the synthetic images with learning rate $\alpha$, and measures
#
# $$\mathcal{L} = \frac{\lVert \hat\theta_{t+N} - \theta^*_{t+M} \rVert^2}{\lVert \theta^*_t - \theta^*_{t+M} \rVert^2}.$$
#
# The gradient of $\mathcal{L}$ flows back through all $N$ student steps into the pixels and into
# $\alpha$. The synthetic images start as random real images of each class.

# %%
config = preset("demo", dataset=dataset, ipc=ipc, syn_steps=syn_steps, expert_epochs=expert_epochs,
                max_start_epoch=max_start_epoch, iterations=iterations, lr_img=lr_img, lr_lr=lr_lr,
                lr_teacher=lr_teacher, seed=seed)
distiller = make_distiller(config, buffer, dataset=ds, device=device)
initial_images = distiller.images.detach().clone()
t0 = time.perf_counter()
run(distiller, progress=True)
distill_seconds = time.perf_counter() - t0
synset = to_synset(distiller, buffer)
losses = distiller.history.loss
print(f"{iterations} iterations in {distill_seconds:.0f} s; learned alpha = {synset.syn_lr:.4g}")

# %%
k = max(1, len(losses) // 10)  # moving average over a tenth of the run
smooth = torch.tensor(losses).unfold(0, k, 1).mean(1).tolist() if len(losses) >= k else losses
fig = go.Figure()
fig.add_scatter(y=losses, mode="lines", name="L (one iteration)", opacity=0.4)
fig.add_scatter(x=list(range(k - 1, len(losses))), y=smooth, mode="lines", name=f"moving average ({k})")
fig.update_layout(title="Matching loss during distillation", xaxis_title="iteration", yaxis_title="L", height=350)
fig.show()

# %% [markdown]
# ### The picture behind $\mathcal{L}$ (the paper's Fig. 1), from real trajectories
#
# An expert's trajectory $\theta^*_0, \theta^*_1, \dots$ lives in a space of $P$ parameters; the student
# starts on it at $\theta^*_t$ and takes $N$ steps of size $\alpha$ on the synthetic images, aiming at
# $\theta^*_{t+M}$. The figure below is a 2-D shadow of that picture: the horizontal axis is the direction
# from $\theta^*_t$ to the target (the target sits at 1), the vertical axis the direction in which the
# distilled student strays from it; both in units of $\lVert\theta^*_{t+M} - \theta^*_t\rVert$. The student
# is drawn twice, on the initial images with the initial $\alpha$ and on the distilled images with the
# learned $\alpha$ (same expert, $t$, batches and augmentation). The plane hides the rest of the $P$
# dimensions, so the legend gives each student's true $\mathcal{L}$.


# %%
def trajectory_plane(expert=0, t=0):
    """Expert and student paths projected on (target direction, the distilled student's deviation)."""
    traj = torch.stack([buffer.flat(expert, e, device=device) for e in buffer.epochs])  # (E + 1, P)
    start, target = traj[t], traj[t + expert_epochs]
    net = network_for(buffer, device)
    spec = ParamSpec.from_module(net)
    plan = make_plan(len(distiller.labels), syn_steps, None, torch.Generator().manual_seed(seed))
    strategy = default_strategy(ds.name)
    paths = {}
    for name, imgs, alpha in (("before: initial images, α0", initial_images, lr_teacher),
                              ("after: distilled images, learned α", synset.images.to(device), synset.syn_lr)):
        paths[name] = unroll(net, spec, start, imgs, distiller.labels, alpha, plan, strategy, create_graph=False,
                             return_path=True).path
    scale = (target - start).norm()
    u = (target - start) / scale  # x axis: towards the target
    off = paths["after: distilled images, learned α"][-1] - start
    v = off - (off @ u) * u  # y axis: the distilled student's deviation, orthogonal to u
    v = v / v.norm().clamp_min(1e-12)

    def xy(points):
        d = torch.stack(list(points)) - start
        return (d @ u / scale).tolist(), (d @ v / scale).tolist()

    fig = go.Figure()
    ex, ey = xy(traj)
    fig.add_scatter(x=ex, y=ey, mode="lines+markers+text", text=[f"θ*<sub>{e}</sub>" for e in buffer.epochs],
                    textposition="top center", name=f"expert {expert}", line={"color": "#444"})
    for (name, path), color in zip(paths.items(), ("#bbbbbb", "#1f77b4")):
        L = float(matching_loss(path[-1], start, target))
        px_, py_ = xy(path)
        fig.add_scatter(x=px_, y=py_, mode="lines+markers", name=f"student {name}: L = {L:.3f}",
                        marker={"size": 4}, line={"color": color})
    fig.add_scatter(x=[1.0], y=[0.0], mode="markers", marker={"symbol": "star", "size": 16, "color": "#d62728"},
                    name=f"target θ*<sub>{t + expert_epochs}</sub> (t + M)")
    fig.update_layout(title=f"Expert and student trajectories (t = {t}, M = {expert_epochs}, N = {syn_steps})",
                      xaxis_title="towards the target, in units of ‖θ*<sub>t+M</sub> − θ*<sub>t</sub>‖",
                      yaxis_title="deviation", height=450, legend={"orientation": "h", "y": -0.25})
    fig.show()
    return {name: float(matching_loss(path[-1], start, target)) for name, path in paths.items()}


plane_L = trajectory_plane()

# %% [markdown]
# Read it as the paper's Fig. 1: the expert's long path (one marker per epoch, steps shrinking as it
# converges), and a student that needs only $N$ cheap steps on the synthetic images to cover $M$ expert
# epochs. Distillation moved the pixels and $\alpha$ so that the student's end lands nearer the star.
# Each iteration of section 3 drew a fresh expert and $t$; this is one draw.

# %% [markdown]
# ## 4. Evaluate, next to a random real subset of the same size
#
# Fresh, randomly initialised ConvNets are trained on the 10 synthetic images only (with the learned
# $\alpha$ as learning rate) and tested on the real test set. The baseline trains the same networks,
# the same way, on 10 random real images (one per class, learning rate 0.01).

# %%
protocol = EvalProtocol(arch="convnet", width=width, epochs=eval_epochs, num_nets=num_nets, seed=seed)
print(protocol.describe())
res_mtt = synset.evaluate(ds, protocol, device=device, progress=False)
res_random = evaluate_random_real(ds, ipc, protocol, seed=seed, progress=False)
print(f"MTT distilled : {res_mtt}")
print(f"random real   : {res_random}")
print(f"chance        : {100 / ds.num_classes:.1f} %")

# %%
fig = go.Figure(go.Bar(
    x=["random real", "MTT distilled"], y=[100 * res_random.mean, 100 * res_mtt.mean],
    error_y={"type": "data", "array": [100 * res_random.std, 100 * res_mtt.std]},
    marker_color=["#999999", "#1f77b4"]))
fig.add_hline(y=100 / ds.num_classes, line_dash="dot", annotation_text="chance")
fig.update_layout(title=f"Test accuracy, {ipc} image(s) per class, {num_nets} fresh ConvNets",
                  yaxis_title="test accuracy (%)", height=350)
fig.show()

# %% [markdown]
# ## 5. Look at the images
#
# Top: the random real images the synthetic set started from. Bottom: the same images after
# distillation. (Shown in pixel space, $p = x\sigma + \mu$, clamped to $[0, 1]$.)


# %%
def show_images(images, labels, title):
    """A row of images titled with their class names; images: (n, C, H, W) in the model's input space."""
    pix = ds.denormalize(images.detach().to(ds.device)).cpu()  # (n, C, H, W) in [0, 1]
    arr = pix.permute(0, 2, 3, 1).numpy()
    arr = arr[..., 0] if arr.shape[-1] == 1 else arr
    fig = px.imshow(arr, facet_col=0, facet_col_wrap=min(10, len(arr)), binary_string=True,
                    facet_col_spacing=0.01, title=title)
    names = [ds.class_names[int(y)] for y in labels]
    fig.for_each_annotation(lambda a: a.update(text=names[int(a.text.split("=")[1])]))
    fig.update_xaxes(showticklabels=False).update_yaxes(showticklabels=False)
    fig.update_layout(height=200 + 120 * ((len(arr) - 1) // 10), margin={"t": 60, "b": 10, "l": 10, "r": 10})
    fig.show()


show_images(initial_images, distiller.labels, "before: random real images (the initialisation)")
show_images(synset.images, synset.labels, f"after {iterations} iterations of MTT")
real_images, real_labels = random_real_subset(ds, ipc, seed=seed)
show_images(real_images, real_labels, "the random real baseline")

# %% [markdown]
# ## Exercises
#
# Each exercise has a cell for your answer: replace `None` with your code. As shipped, the cell
# falls back to the hidden solution (the collapsed cell below; open it after trying), so the
# notebook runs end to end. The cell after it checks the answer against the library and prints
# "correct".
#
# **Exercise 1 · Two losses you can predict.** A student that never moves stays at $\theta^*_t$;
# another lands exactly on $\theta^*_{t+M}$. What is $\mathcal{L}$ for each? Write
# `answer_1 = (L_still, L_on_target)`, two numbers, without running anything.

# %% cellView="form" jupyter={"source_hidden": true} tags=["solution"]
#@title Solutions (hidden: try the exercises first)
def _solution_1():
    # L = ‖θ̂ − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖²: the numerator equals the denominator when θ̂ = θ*_t,
    # and is 0 when θ̂ = θ*_{t+M}
    return (1.0, 0.0)


def _solution_2(images):
    """p = clamp(x σ + μ, 0, 1), per channel; images: (n, C, H, W) normalised -> (n, C, H, W) in [0, 1]."""
    mean = torch.tensor(ds.mean).view(1, -1, 1, 1)
    std = torch.tensor(ds.std).view(1, -1, 1, 1)
    return (images.detach().cpu() * std + mean).clamp(0.0, 1.0)


# %%
answer_1 = None  # your answer: (L_still, L_on_target)
if answer_1 is None:
    answer_1 = _solution_1()

# %%
# the check: the library's matching loss for both students, on expert 0 from t = 0
theta_t, theta_tM = buffer.flat(0, 0, device=device), buffer.flat(0, expert_epochs, device=device)
expected = torch.stack([matching_loss(theta_t, theta_t, theta_tM), matching_loss(theta_tM, theta_t, theta_tM)])
torch.testing.assert_close(torch.tensor(answer_1, dtype=torch.float32), expected.cpu())
print("correct")

# %% [markdown]
# **Exercise 2 · Back to pixels.** The networks see normalised images $x = (p - \mu)/\sigma$, with the
# per-channel `ds.mean` ($\mu$) and `ds.std` ($\sigma$). Turn the distilled `synset.images` back into
# pixels $p = x\sigma + \mu$, clamped to $[0, 1]$, as a CPU tensor of shape $(n, C, H, W)$.

# %%
answer_2 = None  # your code here, e.g. answer_2 = (synset.images.cpu() * ... + ...).clamp(0, 1)
if answer_2 is None:
    answer_2 = _solution_2(synset.images)

# %%
# the check: the synthetic set's own conversion (SyntheticSet.pixels, what synset.png shows)
torch.testing.assert_close(answer_2, synset.pixels().cpu())
print("correct")

# %% [markdown]
# ## Takeaway
#
# * MTT has two stages with different costs: experts are trained once on the real data and stored;
#   distillation then only replays short pieces of their trajectories.
# * What is learned is the pixels **and** a learning rate $\alpha$; evaluation trains with that $\alpha$.
# * $\mathcal{L}$ is a ratio: 1 means the student got no closer than where it started, 0 means on target.
# * A distilled set is only judged by training fresh networks on it, next to random real images of
#   the same size.
#
# ## What to read next
#
# * The images change slowly and stay recognisable: the pixel learning rate is large
#   (`lr_img = 100`) but the matching loss is a ratio of small squared distances.
# * The learned $\alpha$ is part of the result: evaluation trains with it.
# * More iterations, more experts and larger `ipc` help; `08_reproduction` runs the full settings.

# %%
results = {
    "loss_first": sum(losses[: max(1, len(losses) // 4)]) / max(1, len(losses) // 4),
    "loss_last": sum(losses[-max(1, len(losses) // 4):]) / max(1, len(losses) // 4),
    "iterations": len(losses),
    "syn_lr": synset.syn_lr,
    "images_shape": list(synset.images.shape),
    "pixels_changed": float((synset.images.cpu() - initial_images.cpu()).abs().max()),
    "mtt_acc": res_mtt.mean,
    "random_acc": res_random.mean,
    "num_classes": ds.num_classes,
    "expert_acc": expert_acc,
    "distill_seconds": distill_seconds,
    "plane_L": plane_L,
}
print(json.dumps(results, indent=1))
if results_path:
    Path(results_path).write_text(json.dumps(results, indent=1))
