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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/mttlite/mttlite/blob/main/notebooks/09_the_family.ipynb)
#
# # 09 · The family: TESLA, DATM, ATT and FTD as switches
#
# MTT's successors keep its loop (notebook 04) — draw an expert and a start epoch $t$, unroll the
# student $N$ steps from $\theta^*_t$, match $\theta^*_{t+M}$ — and change one piece each. In mttlite each
# change is a switch of `DistillConfig`, off by default (off, a run is plain MTT, bit for bit):
#
# | switch | paper | what changes |
# |---|---|---|
# | `soft_labels`, `lr_y` | TESLA (Cui et al., ICML 2023), DATM (Guo et al., ICLR 2024) | the labels: an expert's soft labels, learned |
# | `min_start_epoch`, `current_max_start_epoch`, `expansion_end_iteration` | DATM | *which* part of the trajectory is matched, and when |
# | `auto_steps` | ATT (Liu et al., ECCV 2024) | *where* the student is compared: at its step closest to the target |
# | `ema_decay` | FTD (Du et al., CVPR 2023), DATM | *what* is exported: a moving average of the pixels |
#
# What you will learn: what each paper changed and why it helps (a few lines each, below); each
# switch turned on alone and all together, with a widget to compare loss curves, accuracy, images
# and the learned label matrix; the matching window as a plot; $n^*$ per iteration; and two
# derivations checked against the library (the EMA's closed form and $n^*$ by brute force).
#
# Soft labels lift accuracy on their own, whatever the images: every soft-label set is also
# evaluated with the **same images under hard labels**, so the images can be judged apart.
#
# **Run time.** Opened without a GPU, the notebook picks the classroom CPU profile
# (`profile = "auto"`, see `notebooks/README.md`): **3.2 min on 2 CPU cores from a cold
# start**, the experts included (191 s, measured on a 2-core AMD EPYC with
# `python benchmarks/notebook_times.py --notebooks 09`).
# The teaching parameters (what a GPU gets): about 1 min on a Colab T4 GPU (estimate, not yet
# measured). CI parameters: about 25 s on 2 CPU cores (measured). `benchmarks/family_table.py`
# runs the same comparison at IPC 1 and 10 with 5 networks per set.

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

import ipywidgets as widgets
import numpy as np
import plotly.express as px
import plotly.graph_objects as go
import torch
from IPython.display import display
from plotly.subplots import make_subplots

from mttlite.data import load_dataset
from mttlite.distill import DistillConfig, preset, run, start_window
from mttlite.evaluate import EvalProtocol, evaluate_set
from mttlite.experts import train_experts
from mttlite.meta_gradient import meta_gradient
from mttlite.pipeline import make_distiller, to_synset
from mttlite.student import make_plan, unroll

# %% tags=["parameters"]
profile = "auto"  # "auto": "cpu" without a GPU, "teaching" with one; or "teaching", "cpu", "ci"
dataset = "fashion-mnist-mini"
buffer_root = "runs/notebooks/buffers"  # shared expert cache
width = 32
num_experts = 3
train_epochs = 6
ipc = 1
syn_steps = 20  # N
expert_epochs = 2  # M
max_start_epoch = 4  # T+
iterations = 40  # the same for every variant
lr_img = 100.0
lr_lr = 1e-6
lr_y = 2.0  # DATM's learning rate of the label logits
current_max_start_epoch = None  # T_cur at the start; None: half of T+ (DATM: 20 of 40)
expansion_end_iteration = None  # the iteration T_cur reaches T+; None: 60 % of the run (DATM: 3000 of 5000)
ema_decay = None  # None: DATM's 0.999 over 5000 iterations scaled to this run, 0.999 ** (5000 / iterations)
variants = ["mtt", "soft", "window", "auto", "ema", "all"]
eval_epochs = 200
num_nets = 3
check_steps = 60  # student steps of the n* check in section 6 (more than N, so that the student overshoots)
seed = 0
results_path = None

# %%
profile = choose_profile(profile, device)  # mttlite.notebook.PROFILES
if profile == "cpu":  # the classroom CPU profile: <= 5 min on 2 cores from a cold start, experts included
    iterations, num_nets = 30, 2  # the shipped sizes are CPU sizes already
elif profile == "ci":  # CI size, see notebooks/README.md
    width, num_experts, train_epochs, syn_steps, max_start_epoch, iterations = 16, 2, 3, 10, 2, 8
    eval_epochs, num_nets, check_steps = 20, 2, 30
    buffer_root = "runs/notebooks-ci/buffers"

torch.manual_seed(seed)
buffer_dir = Path(buffer_root) / f"{dataset}-convnet-w{width}-e{train_epochs}"
print(f"expert buffer: {buffer_dir}")

# %%
ds = load_dataset(dataset, device=device)
buffer = train_experts(ds, buffer_dir, num_experts=num_experts, train_epochs=train_epochs, width=width,
                       seed=seed, device=device, progress=False)
T_cur0 = max(1, max_start_epoch // 2) if current_max_start_epoch is None else current_max_start_epoch
E = max(1, round(0.6 * iterations)) if expansion_end_iteration is None else expansion_end_iteration
decay = round(0.999 ** (5000 / iterations), 3) if ema_decay is None else ema_decay
SWITCHES = {
    "soft": {"soft_labels": True, "lr_y": lr_y},
    "window": {"min_start_epoch": 0, "current_max_start_epoch": T_cur0, "expansion_end_iteration": E},
    "auto": {"auto_steps": True},
    "ema": {"ema_decay": decay},
}
SWITCHES["mtt"] = {}
SWITCHES["all"] = {k: v for name in ("soft", "window", "auto", "ema") for k, v in SWITCHES[name].items()}
NAMES = {"mtt": "MTT", "soft": "soft labels", "window": "window", "auto": "auto N", "ema": "EMA", "all": "all"}


def config_for(variant):
    """Plain MTT (the `demo` preset with this notebook's N, M, T+, rates and budget) plus the variant's switches."""
    return preset("demo", dataset=dataset, ipc=ipc, syn_steps=syn_steps, expert_epochs=expert_epochs,
                  max_start_epoch=max_start_epoch, iterations=iterations, lr_img=lr_img, lr_lr=lr_lr, seed=seed,
                  **SWITCHES[variant])


for v in variants:
    print(f"{v:7s} {SWITCHES[v] or '(every switch off)'}")

# %% [markdown]
# ## 1. What each paper changed, and why it helps
#
# **Soft labels — TESLA, then DATM.** MTT labels each synthetic image with its class (one-hot).
# TESLA labels it with an expert's softmax output instead: a soft label says how much a T-shirt
# also looks like a shirt, so one image teaches the relations between classes too — most useful
# when a class has one or ten images. DATM makes the labels *learned*: logits $z$ (one row per
# image) start as the expert's logits, the student trains on $y = \mathrm{softmax}(z)$ with the soft
# cross-entropy $\ell = -\frac1B\sum_b\sum_k y_{bk}\log\mathrm{softmax}(f(x_b))_k$, and $z$ takes SGD steps
# on $\partial\mathcal{L}/\partial z = y \odot (\partial\mathcal{L}/\partial y - \sum_k y_k\, \partial\mathcal{L}/\partial y_k)$ with rate `lr_y`,
# so the labels follow the images as they change. The initial real images are ones the labelling
# expert (expert 0, last epoch) classifies correctly, so that no label starts on the wrong class.
#
# **The matching window — DATM.** Early expert epochs hold easy, general patterns; late epochs hold
# hard, specific ones. DATM observes that a small set can only hold the easy ones (matching late
# epochs makes IPC 1 *worse*) while a large set benefits from the hard ones. So the start epoch is drawn from a window
# $t \in [T^-, T_\text{cur})$ fitted to the size of the set, and its upper bound grows during the run
# ("sequential generation": easy patterns first, harder ones added later):
#
# $$T_\text{cur}(i) = \min\!\Big(T^+,\; T_0 + \Big\lfloor \frac{(T^+ - T_0)\, i}{E} \Big\rfloor\Big)$$
#
# at iteration $i$, with $T_0$ = `current_max_start_epoch` and $E$ = `expansion_end_iteration`
# (DATM on CIFAR-10: $T^- = 0$, $T_0 = 20$, $T^+ = 40$, $E = 3000$).
#
# Here $T^- = 0$, $T_0 = \lfloor T^+/2 \rfloor$ and $E$ = 60 % of the run, DATM's proportions.
#
# **Automatic N — ATT.** MTT compares the student with $\theta^*_{t+M}$ after exactly $N$ steps. But how
# fast the student moves depends on $t$, on the images and on $\alpha$: from a late $t$ it may pass
# closest to the target after a few steps and then overshoot, and the loss then measures the
# overshoot (ATT calls the resulting error the *accumulated mismatching problem*). ATT compares the
# student at its step closest to the target,
#
# $$n^* = \arg\min_{1\le n\le N} \lVert\hat\theta_n - \theta^*_{t+M}\rVert^2, \qquad
#   \mathcal{L} = \frac{\lVert\hat\theta_{n^*} - \theta^*_{t+M}\rVert^2}{\lVert\theta^*_t - \theta^*_{t+M}\rVert^2},$$
#
# and the gradient is the exact gradient of that $n^*$-step unroll.
#
# **EMA of the pixels — FTD, DATM.** FTD studies the *accumulated trajectory error*: a network
# trained on the synthetic set drifts away from the expert a little more with every segment, and
# those errors add up. Its main remedy is experts with flat trajectories (sharpness-aware training;
# not in mttlite); it also keeps an exponential moving average of the synthetic images, which
# DATM adopts: each update of the pixels follows one random $(\text{expert}, t)$ draw, and the average
# $\bar x \leftarrow d\,\bar x + (1-d)\,x$ smooths out that noise. The exported set is $\bar x$. DATM
# uses $d = 0.999$ over 5000+ iterations; this notebook scales it to its run,
# $d = 0.999^{5000/\text{iterations}}$, so the initial images keep the same small weight
# $d^\text{iterations} \approx e^{-5}$ in the end.

# %% [markdown]
# ## 2. The window, as a plot
#
# `start_window(config, iteration)` returns $(T^-, T_\text{cur})$: $t$ is drawn from $T^-, \dots, T_\text{cur}-1$.
# Left: this notebook's run (plain MTT draws from the whole band at every iteration). Right: DATM's
# CIFAR-10 schedule over 5000 iterations.

# %%
def band(config, n):
    lows, highs = zip(*(start_window(config, i) for i in range(n)))
    return list(lows), [h - 1 for h in highs]  # the smallest and the largest t that can be drawn


window_config = config_for("window")
w_low, w_high = band(window_config, iterations)
p_low, p_high = band(config_for("mtt"), iterations)
datm = DistillConfig(max_start_epoch=40, current_max_start_epoch=20, expansion_end_iteration=3000, iterations=5000)
d_low, d_high = band(datm, 5000)
fig = make_subplots(rows=1, cols=2, subplot_titles=(f"this run: T+ = {max_start_epoch}, T_cur from {T_cur0}, E = {E}",
                                                    "DATM, CIFAR-10: T+ = 40, T_cur from 20, E = 3000"))
its = list(range(iterations))
fig.add_scatter(x=its, y=p_high, mode="lines", line={"color": "grey", "dash": "dot"}, name="MTT: largest t", row=1, col=1)
fig.add_scatter(x=its, y=w_low, mode="lines", line={"color": "royalblue"}, name="window: smallest t", row=1, col=1)
fig.add_scatter(x=its, y=w_high, mode="lines", line={"color": "royalblue"}, fill="tonexty", name="window: largest t",
                row=1, col=1)
fig.add_scatter(x=list(range(5000)), y=d_high, mode="lines", line={"color": "firebrick"}, name="DATM: largest t",
                row=1, col=2)
fig.update_xaxes(title_text="iteration").update_yaxes(title_text="start epoch t")
fig.update_layout(height=340)
fig.show()

# %% [markdown]
# ## 3. Every variant, the same budget
#
# Each variant distils from the same seed with the same rates for the same number of iterations,
# then `num_nets` fresh ConvNets are trained on the exported set (final-epoch test accuracy, the
# protocol of notebook 05). Soft-label sets are evaluated twice: as exported, and with the same
# images, the same $\alpha$ and the same networks under each image's class (hard labels).

# %%
protocol = EvalProtocol(arch="convnet", width=width, epochs=eval_epochs, num_nets=num_nets, seed=seed)
print("protocol:", protocol.describe())
runs = {}
for v in variants:
    cfg = config_for(v)
    d = make_distiller(cfg, buffer, dataset=ds, device=device)
    keep = cfg.ema_decay is not None  # keep x_0, x_1, … for the EMA check of section 6
    rec = {"t": [], "images": [d.images.detach().cpu().double().clone()] if keep else [], "y0": d.targets.cpu().clone()}

    def on_iteration(info, rec=rec, keep=keep):
        rec["t"].append(info.start_epoch)
        if keep:
            rec["images"].append(info.images.detach().cpu().double().clone())  # x after each update (live: clone)

    t0 = time.perf_counter()
    run(d, callbacks=[on_iteration], progress=False)
    seconds = time.perf_counter() - t0
    s = to_synset(d, buffer)
    res = s.evaluate(ds, protocol, device=device, progress=False)
    hard = (evaluate_set(s.images, d.labels, ds, protocol, lr=s.syn_lr, device=device, progress=False)
            if cfg.soft_labels else None)
    runs[v] = {"config": cfg, "distiller": d, "synset": s, "acc": res, "hard": hard, "seconds": seconds, **rec}
    extra = f", same images with hard labels {100 * hard.mean:.1f} ± {100 * hard.std:.1f} %" if hard else ""
    print(f"{NAMES[v]:12s} {100 * res.mean:5.1f} ± {100 * res.std:.1f} %{extra}  "
          f"(L {np.mean(d.history.loss[:5]):.3f} → {np.mean(d.history.loss[-5:]):.3f}, α = {s.syn_lr:.4g}, "
          f"{seconds:.0f} s)")

# %% [markdown]
# ## 4. Compare
#
# Its matching loss against MTT's (moving averages), every variant's accuracy (soft-label sets: as
# exported and under hard labels), its exported images and — with soft labels — the learned label
# matrix $y$ next to its change from the expert's initial labels (the first image of each class).
# Drawn below for the last variant ("all"); choose another one with the buttons under the figures.

# %%
def moving_average(values, k=None):
    k = k or max(1, len(values) // 8)
    return np.convolve(values, np.ones(k) / k, mode="valid").tolist(), k


def show_variant(v):
    r, base = runs[v], runs[variants[0]]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("matching loss L (moving average)", "test accuracy (%)"))
    for name, rr, colour in ((NAMES[variants[0]], base, "grey"), (NAMES[v], r, "crimson")):
        ma, k = moving_average(rr["distiller"].history.loss)
        fig.add_scatter(x=list(range(k, k + len(ma))), y=ma, mode="lines", name=name, line={"color": colour},
                        row=1, col=1)
    names = [NAMES[u] for u in variants]
    fig.add_bar(x=names, y=[100 * runs[u]["acc"].mean for u in variants],
                error_y={"array": [100 * runs[u]["acc"].std for u in variants]}, name="as exported",
                marker_color=["crimson" if u == v else "lightslategrey" for u in variants], row=1, col=2)
    fig.add_bar(x=names, y=[100 * runs[u]["hard"].mean if runs[u]["hard"] else None for u in variants],
                error_y={"array": [100 * runs[u]["hard"].std if runs[u]["hard"] else 0 for u in variants]},
                name="same images, hard labels", marker_color="orange", row=1, col=2)
    fig.update_xaxes(title_text="iteration", row=1, col=1)
    fig.update_layout(height=340, barmode="group", title=f"{NAMES[v]}: {SWITCHES[v] or 'every switch off'}")
    fig.show()

    s = r["synset"]
    arr = s.pixels().permute(0, 2, 3, 1).numpy()
    arr = arr[..., 0] if arr.shape[-1] == 1 else arr
    shown = list(range(0, len(arr), ipc))[:10]  # the first image of each class
    fig = px.imshow(arr[shown], facet_col=0, facet_col_wrap=10, binary_string=True, facet_col_spacing=0.01, height=190,
                    title="exported images" + (" (the EMA x̄)" if r["config"].ema_decay is not None else ""))
    labels = [ds.class_names[int(r["distiller"].labels[i])] for i in shown]
    fig.for_each_annotation(lambda a: a.update(text=labels[int(a.text.split("=")[1])]))
    fig.update_xaxes(showticklabels=False).update_yaxes(showticklabels=False)
    fig.show()

    if s.labels.is_floating_point():  # the learned label matrix (n, K)
        y, y0 = s.labels[shown].numpy(), r["y0"][shown].numpy()
        rows = [f"{i}: {ds.class_names[int(r['distiller'].labels[i])]}" for i in shown]
        fig = make_subplots(rows=1, cols=2, subplot_titles=("learned soft labels y = softmax(z)",
                                                            "y − y at the start (the expert's)"),
                            horizontal_spacing=0.15)
        fig.add_heatmap(z=y, x=ds.class_names, y=rows, colorscale="Viridis", zmin=0, zmax=1, row=1, col=1,
                        colorbar={"x": 0.43})
        lim = float(np.abs(y - y0).max()) or 1.0
        fig.add_heatmap(z=y - y0, x=ds.class_names, y=rows, colorscale="RdBu", zmid=0, zmin=-lim, zmax=lim,
                        row=1, col=2)
        fig.update_yaxes(autorange="reversed")
        fig.update_layout(height=120 + 22 * len(rows))
        fig.show()


first_variant = variants[-1]
show_variant(first_variant)  # drawn statically: what papermill, nbval and HTML exports show
# The chooser starts on the variant drawn above; choosing another one draws it below the chooser, in an
# Output that is cleared and redrawn on every change. (Nothing is written into the Output while the cell
# runs: headless, nbclient echoes every output written into an Output widget back to the kernel as a
# comm message, and one of those crossing the cell's execute_reply can leave papermill waiting forever.)
comparison = widgets.Output()
chooser = widgets.ToggleButtons(options=[(NAMES[v], v) for v in variants], value=first_variant, description="variant")


def _redraw(change):
    with comparison:
        comparison.clear_output(wait=True)
        show_variant(change["new"])


chooser.observe(_redraw, names="value")
display(widgets.VBox([chooser, comparison]))

# %% [markdown]
# Read the hard-label bars before the soft ones: the "as exported" bar of a soft-label set mixes
# what its images and what its labels teach. Soft-label runs also *start* from other real images
# (ones the expert gets right), so part of their hard-label difference is that choice. At this size
# (a few networks, tens of iterations) differences of a point or two are noise;
# `benchmarks/family_table.py` measures them with more iterations and networks.
#
# ## 5. $n^*$ per iteration (auto N)
#
# With `auto_steps` the student still takes $N$ steps; `History.student_steps` records the step
# $n^*$ it was matched at (always $N$ without the switch). $n^* < N$ means the student had passed its
# closest point to the target before step $N$. Look for it early in the run and from late start
# epochs $t$ (where the expert moves least per epoch): as the images learn, the student's path is
# bent towards the target and $n^*$ moves up to $N$ (at the shipped size: $n^* < N$ in 7 of 40
# iterations, all in the first 30, all from $t \ge 2$). Where $n^* = N$ throughout, the run is plain MTT.

# %%
fig = go.Figure()
for v in variants:
    if runs[v]["config"].auto_steps:
        steps = runs[v]["distiller"].history.student_steps
        fig.add_scatter(x=list(range(1, len(steps) + 1)), y=steps, mode="lines+markers", name=NAMES[v],
                        text=[f"t = {t}" for t in runs[v]["t"]])
fig.add_hline(y=syn_steps, line_dash="dot", annotation_text=f"N = {syn_steps}")
fig.update_layout(title="n*: the student step the loss was measured at", xaxis_title="iteration", yaxis_title="n*",
                  yaxis_range=[0, syn_steps + 1], height=320)
fig.show()
auto_runs = [v for v in variants if runs[v]["config"].auto_steps]
for v in auto_runs:
    steps = np.array(runs[v]["distiller"].history.student_steps)
    ts = np.array(runs[v]["t"])
    print(f"{NAMES[v]}: n* < N at {int((steps < syn_steps).sum())} of {len(steps)} iterations; mean n* by start "
          f"epoch t: " + ", ".join(f"t={t}: {steps[ts == t].mean():.1f}" for t in sorted(set(ts.tolist()))))

# %% [markdown]
# ## 6. Two derivations, checked against the library
#
# **The EMA in closed form.** Unrolling $\bar x_i = d\,\bar x_{i-1} + (1-d)\,x_i$ from $\bar x_0 = x_0$ gives
#
# $$\bar x_k = d^k x_0 + (1-d)\sum_{j=1}^{k} d^{\,k-j} x_j ,$$
#
# a weighted average (the weights sum to 1) in which $x_0$, the initial real images, keeps the weight
# $d^k$. We recorded $x_0, \dots, x_k$ (the callback above), so we can compute it ourselves:

# %%
ema_run = next((v for v in ("ema", "all") if v in runs), None)
if ema_run is None:
    raise ValueError("the checks below need the 'ema' or 'all' variant in `variants`")
r = runs[ema_run]
xs, dk, k = r["images"], r["config"].ema_decay, len(r["images"]) - 1
closed = dk**k * xs[0] + (1 - dk) * sum(dk ** (k - j) * xs[j] for j in range(1, k + 1))
library = r["distiller"].images_ema.detach().cpu().double()
torch.testing.assert_close(library, closed, rtol=1e-5, atol=1e-6)
torch.testing.assert_close(r["synset"].images.double(), closed, rtol=1e-5, atol=1e-6)  # what was exported
ema_err = float((library - closed).abs().max())
print(f"EMA (d = {dk}, k = {k}): library vs closed form, max |difference| = {ema_err:.2e}; "
      f"weight left on the initial images d^k = {dk**k:.3g}")

# %% [markdown]
# **$n^*$ by brute force.** Take the auto-N run's final images, labels and $\alpha$, draw one student
# plan (batches and augmentations), unroll it *without* gradients keeping every $\hat\theta_n$, and
# take the argmin of $\lVert\hat\theta_n - \theta^*_{t+M}\rVert^2$ ourselves; `meta_gradient(...,
# auto_steps=True)` on the same plan must pick the same $n$ and report the same loss. The path is
# `check_steps` long (more than $N$) and starts at the latest epoch the run may draw, $t = T^+ - 1$,
# so that the student passes the target and comes back: $n^*$ lies inside the path.

# %%
auto_run = next((v for v in ("auto", "all") if v in runs), None)
if auto_run is None:
    raise ValueError("the checks below need the 'auto' or 'all' variant in `variants`")
d = runs[auto_run]["distiller"]
t_check, expert = max_start_epoch - 1, 0
theta_t = buffer.flat(expert, t_check, device=device)
theta_target = buffer.flat(expert, t_check + expert_epochs, device=device)
plan = make_plan(d.images.shape[0], check_steps, None, torch.Generator().manual_seed(seed))
x, y, alpha = d.images.detach(), d.targets, d.syn_lr.detach()
path = unroll(d.model, d.spec, theta_t, x, y, alpha, plan, d.dsa_strategy, create_graph=False, return_path=True).path
den = (theta_t - theta_target).pow(2).sum()
curve = torch.stack([(th - theta_target).pow(2).sum() / den for th in path[1:]])  # L(n), n = 1 … check_steps
n_brute = int(curve.argmin()) + 1
mg = meta_gradient("exact", d.model, d.spec, theta_t, theta_target, x, y, alpha, plan, d.dsa_strategy, auto_steps=True)
n_library = int(mg.steps)
assert n_library == n_brute, (n_library, n_brute)
torch.testing.assert_close(mg.loss, curve[n_brute - 1], rtol=1e-5, atol=1e-7)
print(f"t = {t_check}, {check_steps} steps: n* = {n_brute} (brute force) = {n_library} (library); "
      f"L(n*) = {curve[n_brute - 1].item():.4f}, L({check_steps}) = {curve[-1].item():.4f}")
fig = go.Figure(go.Scatter(x=list(range(1, check_steps + 1)), y=curve.tolist(), mode="lines+markers", name="L(n)"))
fig.add_vline(x=n_brute, line_dash="dot", annotation_text=f"n* = {n_brute}")
fig.add_vline(x=syn_steps, line_dash="dash", line_color="grey", annotation_text=f"N = {syn_steps}",
              annotation_position="bottom right")
fig.update_layout(title=f"‖θ̂_n − θ*_(t+M)‖² / ‖θ*_t − θ*_(t+M)‖² along one student path (t = {t_check})",
                  xaxis_title="student step n", yaxis_title="L(n)", height=320)
fig.show()

# %%
results = {
    "variants": {v: {
        "acc": runs[v]["acc"].mean, "std": runs[v]["acc"].std, "accs": runs[v]["acc"].accs,
        "acc_hard": runs[v]["hard"].mean if runs[v]["hard"] else None,
        "std_hard": runs[v]["hard"].std if runs[v]["hard"] else None,
        "accs_hard": runs[v]["hard"].accs if runs[v]["hard"] else None,
        "labels": "soft" if runs[v]["synset"].labels.is_floating_point() else "hard",
        "label_rows_sum": (runs[v]["synset"].labels.sum(1).tolist() if runs[v]["synset"].labels.is_floating_point()
                           else None),
        "iterations": runs[v]["distiller"].iteration, "syn_lr": runs[v]["synset"].syn_lr,
        "loss": runs[v]["distiller"].history.loss, "t": runs[v]["t"],
        "student_steps": runs[v]["distiller"].history.student_steps, "switches": SWITCHES[v],
        "seconds": runs[v]["seconds"],
    } for v in variants},
    "window": {"low": w_low, "high": w_high, "T_cur0": T_cur0, "max_start_epoch": max_start_epoch},
    "datm_window_high": [d_high[i] for i in (0, 1500, 2999, 3000, 4999)],
    "ema_decay": decay, "ema_closed_form_err": ema_err,
    "n_star_brute": n_brute, "n_star_library": n_library, "n_star_curve": curve.tolist(),
    "syn_steps": syn_steps, "check_steps": check_steps,
    "chooser_value": chooser.value, "chooser_start": first_variant,
}
print(json.dumps({k: v for k, v in results.items() if not isinstance(v, (dict, list))}, indent=1))
if results_path:
    Path(results_path).write_text(json.dumps(results, indent=1))
