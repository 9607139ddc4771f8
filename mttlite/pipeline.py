"""End to end: buffer + data → distilled :class:`SyntheticSet`, and the `make demo` job.

The stages live in their own modules; this file only wires them together with the checks a
user needs (the buffer must come from the same data set, image size, ZCA setting and
architecture as the distillation asks for).
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from . import __version__
from .buffers import ExpertBuffer
from .data import load_dataset
from .distill import DistillConfig, Distiller, preset, run
from .evaluate import EvalProtocol, evaluate_random_real
from .experts import train_experts
from .io import atomic_write
from .networks import get_network
from .report import clear_snapshots, snapshot_iterations, snapshot_path, write_run_report
from .synset import SyntheticSet


def network_for(buffer: ExpertBuffer, device="cpu") -> torch.nn.Module:
    """The student network: the experts' architecture, rebuilt from the buffer's metadata."""
    m = buffer.meta
    return get_network(m["arch"], m["channel"], m["num_classes"], tuple(m["im_size"]), **m.get("arch_kwargs", {})).to(device)


def make_distiller(config: DistillConfig, buffer: ExpertBuffer | str | Path, dataset=None, data_root="data",
                   device="cpu") -> Distiller:
    """Load what a distillation needs and check that the buffer fits it (clear errors otherwise)."""
    config.validate()
    if not isinstance(buffer, ExpertBuffer):
        buffer = ExpertBuffer.open(buffer)
    if dataset is None:
        dataset = load_dataset(config.dataset, root=data_root, device=device, zca=config.zca)
    if dataset.name != config.dataset:
        raise ValueError(f"the config distils {config.dataset!r} but the data set given is {dataset.name!r}")
    buffer.check_compatible(dataset=dataset.name, channel=dataset.channel, im_size=tuple(dataset.im_size),
                            num_classes=dataset.num_classes, zca=dataset.zca is not None, arch=buffer.meta["arch"],
                            needed_epochs=config.needed_epochs)
    return Distiller(config, dataset, network_for(buffer, device), buffer, device=device)


def to_synset(d: Distiller, buffer: ExpertBuffer) -> SyntheticSet:
    """The distiller's current state as a self-describing artefact: its images (their EMA with
    ``ema_decay``), its labels (soft, (n, K) = softmax of the learned logits, with ``soft_labels``) and α;
    with ``texture_canvas`` the canvases and their ``texture`` record."""
    ds = d.dataset
    return SyntheticSet(
        images=d.synset_images.cpu().clone(), labels=d.targets.cpu().clone(), syn_lr=float(d.syn_lr.item()),
        dataset=ds.name, class_names=list(ds.class_names), mean=tuple(ds.mean), std=tuple(ds.std),
        zca=ds.zca, arch=buffer.meta["arch"], arch_kwargs=dict(buffer.meta.get("arch_kwargs", {})), method="mtt",
        config=d.config.to_dict(), texture=d.texture,
        provenance={"mttlite": __version__, "torch": torch.__version__, "iterations": d.iteration,
                    "seconds": round(sum(d.history.seconds), 3), "buffer": str(buffer.path),
                    "experts": len(buffer), "final_loss": d.history.loss[-1] if d.history.loss else None,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    )


def snapshot_callback(d: Distiller, buffer: ExpertBuffer, out_dir, resume: bool = True):
    """A ``run`` callback writing the picture of the set (``to_synset``'s images, i.e. the EMA with
    ``ema_decay``) to ``out_dir/snapshots/`` at ``report.snapshot_iterations``, iteration 0 (the initial
    images, taken now) included. Nothing is written before the first iteration has run, so a run refused
    on bad input (a damaged buffer) leaves no folder behind; then a fresh start (no checkpoint to resume)
    first removes old snapshots."""
    keep = set(snapshot_iterations(d.config.iterations))
    fresh = not (resume and (Path(out_dir) / "checkpoint.safetensors").exists())
    pending = [to_synset(d, buffer)]  # the initial images (a function of the seed, so also right on resume)

    def snapshot(info) -> None:
        if pending:
            if fresh:
                clear_snapshots(out_dir)
            if fresh or not snapshot_path(out_dir, 0).exists():
                pending[0].save_png_grid(snapshot_path(out_dir, 0))
            pending.clear()
        if info.iteration in keep:
            to_synset(d, buffer).save_png_grid(snapshot_path(out_dir, info.iteration))

    return snapshot


def distill_set(config: DistillConfig, buffer, out_dir=None, dataset=None, data_root="data", device="cpu",
                callbacks=(), progress=True, resume=True) -> SyntheticSet:
    """Distil, checkpointing into ``out_dir`` (resumable), and save ``out_dir/synset.safetensors`` and
    pictures of the set at a few iterations (``out_dir/snapshots/``, for ``report.write_run_report``)."""
    buffer = buffer if isinstance(buffer, ExpertBuffer) else ExpertBuffer.open(buffer)
    d = make_distiller(config, buffer, dataset, data_root, device)
    if out_dir is not None and d.rank == 0:
        callbacks = (*callbacks, snapshot_callback(d, buffer, out_dir, resume))
    run(d, out_dir, resume=resume, callbacks=callbacks, progress=progress)
    s = to_synset(d, buffer)
    if out_dir is not None and d.rank == 0:  # under torch.distributed every rank holds the same set
        s.save(Path(out_dir) / "synset.safetensors")
    return s


# -- make demo ----------------------------------------------------------------------------------
DEMO = dict(num_experts=3, train_epochs=4, width=32, eval_epochs=300, num_nets=3)


def run_demo(out="runs/demo", device="cpu", progress=True) -> dict:
    """Experts → distil (IPC 1) → evaluate against random real images, on the embedded Fashion-MNIST."""
    out = Path(out)
    t0 = time.perf_counter()
    ds = load_dataset("fashion-mnist-mini", device=device)
    print(f"data: {ds.name}, {len(ds.train_labels)} train / {len(ds.test_labels)} test images, {ds.num_classes} classes")
    buffer = train_experts(ds, out / "buffer", num_experts=DEMO["num_experts"], train_epochs=DEMO["train_epochs"],
                           width=DEMO["width"], device=device, progress=progress)
    t1 = time.perf_counter()
    m = buffer.metrics(0)
    print(f"experts: {len(buffer)} ConvNet-3 (width {DEMO['width']}) trained {DEMO['train_epochs']} epochs "
          f"in {t1 - t0:.0f}s; expert 0 test accuracy {100 * m['test_acc'][-1]:.1f}%")
    config = preset("demo")
    synset = distill_set(config, buffer, out / "distill", dataset=ds, device=device, progress=progress)
    t2 = time.perf_counter()
    print(f"distilled: {len(synset.labels)} images (ipc {config.ipc}) in {t2 - t1:.0f}s, learned alpha {synset.syn_lr:.4g}")
    protocol = EvalProtocol(arch="convnet", width=DEMO["width"], epochs=DEMO["eval_epochs"], num_nets=DEMO["num_nets"])
    res_mtt = synset.evaluate(ds, protocol, progress=progress)
    res_rand = evaluate_random_real(ds, config.ipc, protocol, progress=progress)
    t3 = time.perf_counter()
    synset.save_png_grid(out / "synset.png")
    facts = [("MTT distilled, test accuracy", f"{100 * res_mtt.mean:.1f} ± {100 * res_mtt.std:.1f} %"),
             ("random real, test accuracy", f"{100 * res_rand.mean:.1f} ± {100 * res_rand.std:.1f} %"),
             ("evaluation", protocol.describe())]
    write_run_report(out / "distill", out / "report.html", facts, title="mttlite demo")
    summary = {
        "mtt": {"mean": res_mtt.mean, "std": res_mtt.std, "accs": res_mtt.accs, "lr": res_mtt.lr},
        "random_real": {"mean": res_rand.mean, "std": res_rand.std, "accs": res_rand.accs, "lr": res_rand.lr},
        "protocol": protocol.to_dict(), "config": config.to_dict(), "demo": DEMO,
        "seconds": {"experts": t1 - t0, "distill": t2 - t1, "evaluate": t3 - t2, "total": t3 - t0},
        "hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {device}",
    }
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    print(f"\nIPC {config.ipc}, final test accuracy over {protocol.num_nets} fresh ConvNets ({protocol.epochs} epochs):")
    print(f"  MTT distilled   {res_mtt.mean * 100:5.1f} ± {res_mtt.std * 100:.1f} %")
    print(f"  random real     {res_rand.mean * 100:5.1f} ± {res_rand.std * 100:.1f} %")
    print(f"wrote {out / 'distill' / 'synset.safetensors'}, {out / 'synset.png'}, {out / 'report.html'}, {out / 'results.json'} "
          f"({t3 - t0:.0f}s in all)")
    return summary
