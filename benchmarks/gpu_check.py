"""The project's one GPU check: what a GPU session measures, in one command that fits in 8 minutes.

    python benchmarks/gpu_check.py --device cuda --out runs/gpu_check            # on a GPU machine
    python benchmarks/gpu_check.py --device cpu --tiny --out /tmp/gpu_check      # toy size (CI: never rots)

Sections, in this order, each in its own process with its own time limit (a section that fails or
runs out of time is reported as such, its whole process group is killed so nothing of it keeps the
GPU busy, and the next one still runs):

  env      the device, torch, CUDA and cuDNN versions, TF32 and cudnn.benchmark defaults
  speed    benchmarks/iteration_speed.py, in one process: reference / unroll / exact and the fused step
           (exact+fused: each student step one compiled graph, the N steps replayed as a CUDA graph),
           1x28x28, IPC 10, width 128, N = 10; exact and exact+fused in bf16 too; exact+fused with TF32 off
           (full fp32: a stand-in for a GPU without TF32 such as a T4) and with cudnn.benchmark on
  launches benchmarks/op_count.py: operations, GPU kernels, host launch calls and host / GPU milliseconds per
           student step, eager vs fused, IPC 1 at width 128, and seconds per iteration at N = 50
  fmnist   the full Fashion-MNIST (a 500-per-class validation split held out first): experts, MTT at
           IPC 1 and 10 with the library's defaults (exact gradient, step "auto": fused on CUDA; time-capped
           iterations, stated in the table), a profile of one iteration, evaluation of the distilled sets
           and of random real images of the same size (ConvNet-3 at the experts' width, final-epoch
           accuracy, mean ± std over fresh networks, full test set, validation column); it also trains
           the width-64 buffer that benchmarks/reproduce_fmnist.py --size cpu reads
  memory   benchmarks/memory_vs_steps.py: N = 10 … 80 at 3x32x32, IPC 10, width 128, both modes
  experts  benchmarks/experts_throughput.py: K = 1, 4, 16 experts, vmap vs one at a time
  suite    the device-agnostic tests on the device (MTTLITE_TEST_DEVICE=<device>; augmentation, baselines,
           device stages, evaluation, experts, layers, networks, ZCA; the slow ones left out), which fit
           its limit (281 of them took 31 s on an H200)

The whole check is sized to about 7 minutes on one GPU (the section limits below, plus start-up).
Everything lands in --out: gpu_check.md (every table, with the hardware), one <section>.log each,
and fmnist/ (buffers, distilled sets, results.json). The Fashion-MNIST files are read from
data/FashionMNIST/raw/ (or Debian's dataset-fashion-mnist); copy the four .gz files there to carry
them to a machine without network. ``--tiny`` shrinks every section to seconds on a CPU and uses the
embedded data set.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

# (name, seconds allowed at full size) in the order they run; fmnist keeps to its own clock as well.
SECTIONS = [("env", 15), ("speed", 95), ("launches", 55), ("fmnist", 150), ("memory", 30), ("experts", 20),
            ("suite", 55)]


# ---------------------------------------------------------------------------------------------
# The Fashion-MNIST run (a worker: `gpu_check.py --fmnist-worker OUT DEVICE TINY BUDGET`)
# ---------------------------------------------------------------------------------------------

def fmnist_sizes(tiny: bool) -> dict:
    """Everything the fmnist section does, by size. Full size is paper-size networks with reduced counts."""
    if tiny:
        return dict(dataset="fashion-mnist-mini", val_per_class=20, width=8, num_experts=2, train_epochs=4,
                    parallel=2, cpu_width=8, cpu_experts=2, cpu_epochs=2, iterations={1: 3, 10: 3},
                    syn_steps={1: 3, 10: 3}, max_start={1: 2, 10: 2}, eval_epochs=4, num_nets=2)
    return dict(dataset="fashion-mnist", val_per_class=500, width=128, num_experts=5, train_epochs=8,
                parallel=5, cpu_width=64, cpu_experts=5, cpu_epochs=8, iterations={1: 2000, 10: 2000},
                syn_steps={1: 50, 10: 30}, max_start={1: 2, 10: 6}, eval_epochs=300, num_nets=3)


def fmnist_worker(out: Path, device: str, tiny: bool, budget: float) -> dict:
    """Experts → MTT (IPC 1, 10) → evaluation, every stage capped by the clock so the whole fits ``budget``."""
    import torch

    sys.path.insert(0, str(ROOT))
    from mttlite.buffers import ExpertBuffer
    from mttlite.data import holdout_validation, load_dataset
    from mttlite.distill import preset
    from mttlite.evaluate import EvalProtocol
    from mttlite.experts import train_experts
    from mttlite.pipeline import make_distiller, to_synset

    t_start = time.perf_counter()
    deadline = t_start + budget
    left = lambda: deadline - time.perf_counter()  # noqa: E731
    z = fmnist_sizes(tiny)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"device": device, "tiny": tiny, "sizes": {k: str(v) for k, v in z.items()}, "stages": {}}

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def save():
        (out / "results.json").write_text(json.dumps(res, indent=2))

    t0 = time.perf_counter()
    ds = holdout_validation(load_dataset(z["dataset"], root=ROOT / "data", device=device), z["val_per_class"], seed=0)
    if tiny:  # every 5th training image: seconds per expert epoch on one CPU core
        ds = dataclasses.replace(ds, train_images=ds.train_images[::5].contiguous(), train_labels=ds.train_labels[::5])
    res["data"] = {"train": len(ds.train_labels), "val": len(ds.val_labels), "test": len(ds.test_labels),
                   "seconds": round(time.perf_counter() - t0, 2)}
    print("data:", res["data"], flush=True)

    class OutOfTime(Exception):
        pass

    def experts(name, width, num, epochs, parallel, share):
        """Train up to ``num`` experts, ``parallel`` at a time, while the stage's share of the clock lasts.
        A group still training at 1.5× the share is abandoned (complete experts are on disk already)."""
        t0 = time.perf_counter()
        stop, hard_stop = t0 + share, t0 + 1.5 * share

        def watch(i, epoch, metrics):
            if done and time.perf_counter() > hard_stop:  # never abandon the first group: it is all we have
                raise OutOfTime(f"{name}: expert {i} abandoned at epoch {epoch}")

        done, note = 0, ""
        while done < num and time.perf_counter() < stop:
            k = min(num, done + parallel)
            try:
                train_experts(ds, out / name, num_experts=k, train_epochs=epochs, width=width, dtype="float16",
                              parallel=k - done, device=device, progress=False, seed=0, callback=watch)
            except OutOfTime as e:
                note = str(e)
                break
            finally:
                sync()
            done = k
        buf = ExpertBuffer.open(out / name) if done else None
        acc = [buf.metrics(i)["test_acc"][-1] for i in range(len(buf))] if buf else []
        res["stages"][name] = {"experts": len(buf) if buf else 0, "epochs": epochs, "width": width,
                               "seconds": round(time.perf_counter() - t0, 1), "note": note,
                               "test_acc_last_epoch": [round(a, 4) for a in acc]}
        print(name, res["stages"][name], flush=True)
        save()
        return buf

    buf = experts("buffer_w128", z["width"], z["num_experts"], z["train_epochs"], z["parallel"], 0.25 * budget)
    experts("buffer_w64", z["cpu_width"], z["cpu_experts"], z["cpu_epochs"], z["cpu_experts"], 0.20 * budget)

    sets = {}
    if buf is None:
        res["error"] = "no complete expert in time: nothing to distil"
        save()
        return res
    for ipc, share in ((1, 0.11), (10, 0.12)):
        t0 = time.perf_counter()
        cfg = preset(f"fashion-mnist-ipc{ipc}", dataset=z["dataset"], iterations=z["iterations"][ipc], syn_steps=z["syn_steps"][ipc],
                     max_start_epoch=z["max_start"][ipc], checkpoint_every=100)  # the defaults: exact, step "auto"
        d = make_distiller(cfg, buf, dataset=ds, device=device)
        compile_s = d.warm_up()  # the fused step's compile (and CUDA-graph capture), timed apart
        stop = time.perf_counter() + share * budget
        while d.iteration < cfg.iterations and time.perf_counter() < stop:
            d.step()
        sync()
        secs = time.perf_counter() - t0
        s = to_synset(d, buf)
        s.save(out / f"mtt_ipc{ipc}.safetensors")
        sets[ipc] = s
        res["stages"][f"distill_ipc{ipc}"] = {
            "iterations": d.iteration, "seconds": round(secs, 1), "s_per_iter": round(secs / max(1, d.iteration), 4),
            "syn_steps": cfg.syn_steps, "expert_epochs": cfg.expert_epochs, "max_start_epoch": cfg.max_start_epoch,
            "lr_img": cfg.lr_img, "lr_lr": cfg.lr_lr, "alpha": float(d.syn_lr.detach()), "gradient": cfg.gradient,
            "step": d.step_kind, "compile_s": round(compile_s, 1), "loss_first_10": d.history.loss[:10],
            "loss_last_10": d.history.loss[-10:]}
        print(f"distill ipc{ipc}:", res["stages"][f"distill_ipc{ipc}"], flush=True)
        save()
        if ipc == 1:  # where one iteration's wall time goes (host vs device), with the defaults
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
            with profile(activities=acts) as prof:
                d.step()
                sync()
            key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
            print(f"profile of one IPC 1 iteration (step {d.step_kind}, N = {cfg.syn_steps}):", flush=True)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20), flush=True)
            print(prof.key_averages().table(sort_by=key, row_limit=12), flush=True)

    protocol = EvalProtocol(width=z["width"], epochs=z["eval_epochs"], num_nets=z["num_nets"])
    res["protocol"] = protocol.describe()
    rows = res["evaluation"] = []
    for ipc in (1, 10):
        for method in ("mtt", "random real"):
            if left() < 5:
                rows.append({"ipc": ipc, "method": method, "skipped": "out of time"})
                continue
            rows.append(evaluate_row(ds, sets[ipc], ipc, method, protocol, device))
            print("eval:", rows[-1], flush=True)
            save()
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    save()
    return res


def evaluate_row(ds, synset, ipc: int, method: str, protocol, device: str) -> dict:
    """One row of the evaluation table: the MTT set or random real images of the same size."""
    from mttlite.evaluate import evaluate_random_real

    t0 = time.perf_counter()
    r = (synset.evaluate(ds, protocol, progress=False, device=device) if method == "mtt"
         else evaluate_random_real(ds, ipc, protocol, progress=False))
    return {"ipc": ipc, "method": method, "mean": r.mean, "std": r.std, "accs": r.accs,
            "val_mean": None if not r.val_accs else sum(r.val_accs) / len(r.val_accs),
            "lr": r.lr, "seconds": round(time.perf_counter() - t0, 1), "device": device}


def finish_fmnist(out: Path, device: str) -> dict:
    """Evaluate the rows a time-limited fmnist run left out ("skipped: out of time"), on ``device``.

    ``python benchmarks/gpu_check.py --finish-fmnist runs/gpu_check/fmnist --device cpu``: the same
    data (validation split included), the same protocol, the distilled sets the run saved.
    """
    sys.path.insert(0, str(ROOT))
    from mttlite.data import holdout_validation, load_dataset
    from mttlite.evaluate import EvalProtocol
    from mttlite.synset import SyntheticSet

    res = json.loads((out / "results.json").read_text())
    z = fmnist_sizes(bool(res["tiny"]))
    ds = holdout_validation(load_dataset(z["dataset"], root=ROOT / "data", device=device), z["val_per_class"], seed=0)
    protocol = EvalProtocol(width=z["width"], epochs=z["eval_epochs"], num_nets=z["num_nets"])
    assert protocol.describe() == res["protocol"], "the saved run used another protocol"
    for i, row in enumerate(res["evaluation"]):
        if "skipped" in row:
            synset = SyntheticSet.load(out / f"mtt_ipc{row['ipc']}.safetensors")
            res["evaluation"][i] = evaluate_row(ds, synset, row["ipc"], row["method"], protocol, device)
            print("eval:", res["evaluation"][i], flush=True)
            (out / "results.json").write_text(json.dumps(res, indent=2))
    print(fmnist_table(res))
    return res


def fmnist_table(res: dict) -> str:
    st = res.get("stages", {})
    lines = [f"data: {res.get('data')}"]
    for name in ("buffer_w128", "buffer_w64"):
        if name in st:
            e = st[name]
            accs = e["test_acc_last_epoch"]
            mean = 100 * sum(accs) / max(1, len(accs))
            lines.append(f"{name}: {e['experts']} experts × {e['epochs']} epochs, width {e['width']}, "
                         f"{e['seconds']} s, mean expert test accuracy {mean:.2f} %")
    for ipc in (1, 10):
        e = st.get(f"distill_ipc{ipc}")
        if e:
            lines.append(f"MTT IPC {ipc}: {e['iterations']} iterations in {e['seconds']} s ({e['s_per_iter']} s/it), "
                         f"N={e['syn_steps']} M={e['expert_epochs']} T+={e['max_start_epoch']} lr_img={e['lr_img']} "
                         f"lr_lr={e['lr_lr']}, learned α = {e['alpha']:.4g}")
    lines += ["", f"protocol: {res.get('protocol')}", "",
              "| IPC | method | test acc % (mean ± std) | val acc % | lr | eval s |", "|---|---|---|---|---|---|"]
    for r in res.get("evaluation", []):
        if "skipped" in r:
            lines.append(f"| {r['ipc']} | {r['method']} | skipped: {r['skipped']} | | | |")
        else:
            val = "—" if r["val_mean"] is None else f"{100 * r['val_mean']:.2f}"
            lines.append(f"| {r['ipc']} | {r['method']} | {100 * r['mean']:.2f} ± {100 * r['std']:.2f} | {val} "
                         f"| {r['lr']:.4g} | {r['seconds']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------

def section_command(name: str, device: str, tiny: bool, out: Path, budget: float) -> list[str] | None:
    py = sys.executable
    if name == "env":
        code = ("import torch, platform, os; print('torch', torch.__version__, '| python', platform.python_version(), "
                "'| cpus', os.cpu_count()); c = torch.cuda.is_available(); print('cuda', torch.version.cuda, "
                "'| cudnn', torch.backends.cudnn.version() if c else None, '| gpu', torch.cuda.get_device_name() if c else None); "
                "print('tf32 conv', torch.backends.cudnn.allow_tf32, '| tf32 matmul', torch.backends.cuda.matmul.allow_tf32)")
        return [py, "-c", code]
    if name == "speed":
        if tiny:  # the test's shapes (tests/test_fused.py's operation budget): its compiled graphs are cached
            extra = ["--iters", "1", "--steps", "2", "--width", "4", "--ipc", "1",
                     "--modes", "reference", "unroll", "exact", "exact+fused"]
        else:
            extra = ["--iters", "3", "--steps", "10", "--precision", "fp32",
                     "--modes", "reference", "unroll", "exact", "exact+fused", "exact@bf16", "exact+fused@bf16",
                     "exact+fused+notf32", "exact+fused+cudnnbench"]
        return [py, str(BENCH / "iteration_speed.py"), "--device", device, *extra]
    if name == "launches":
        extra = ["--width", "4", "--steps", "1", "2", "--time-steps", "3"] if tiny \
            else ["--width", "128", "--steps", "2", "4", "--time-steps", "50"]
        return [py, str(BENCH / "op_count.py"), "--device", device, "--ipc", "1", "--modes", "exact", *extra]
    if name == "memory":
        extra = ["--steps", "2", "4", "--width", "8", "--ipc", "2", "--iters", "1"] if tiny \
            else ["--steps", "10", "40", "80", "--iters", "1"]
        return [py, str(BENCH / "memory_vs_steps.py"), "--device", device, "--channel", "3", "--im", "32", *extra]
    if name == "experts":
        extra = ["--ks", "1,2", "--width", "8", "--images", "256", "--test-images", "64"] if tiny \
            else ["--ks", "1,4,16", "--images", "2000", "--test-images", "1000"]
        return [py, str(BENCH / "experts_throughput.py"), "--device", device, "--out", str(out / "experts_throughput.json"),
                *extra]
    if name == "fmnist":
        return [py, __file__, "--fmnist-worker", str(out / "fmnist"), device, "1" if tiny else "0", str(budget)]
    if name == "suite":
        if tiny:
            return None  # the suite is what runs the tiny check; it does not run itself
        files = [f"tests/test_{t}.py" for t in ("augment", "baselines", "device_stages", "evaluate", "experts", "layers",
                                                  "networks", "zca", "fused")]
        return [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", *files]
    raise ValueError(name)


def run_section(name: str, cmd: list[str] | None, limit: float, out: Path, device: str) -> dict:
    """Run one section in its own process group; past ``limit`` the whole group is killed (a worker left
    running would hold the GPU during the next section). Returns its status and its whole log."""
    if cmd is None:
        return {"name": name, "status": "skipped at --tiny", "seconds": 0.0, "log": ""}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "MTTLITE_TEST_DEVICE": device}
    log = out / f"{name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
            status = "ok" if rc == 0 else f"exit {rc}"
        except subprocess.TimeoutExpired:
            status = f"stopped at its {limit:.0f} s limit"
        finally:
            kill_group(proc)
    secs = time.perf_counter() - t0
    return {"name": name, "status": status, "seconds": round(secs, 1), "log": log.read_text(errors="replace")}


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of ``proc`` (the section and every worker it started), then reap it."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def report_log(text: str) -> str:
    """A section's log for the report: whole (tables intact), minus progress-bar redraws (lines with \\r)."""
    return "\n".join(line for line in text.splitlines() if "\r" not in line).strip()


def mirror(out: Path, dest: Path, section: str) -> None:
    """Copy what a session must take home to ``dest`` (few files: a device tool returns at most 8)."""
    import shutil
    import tarfile

    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "gpu_check.md", dest / "gpu_check.md")
    if section != "fmnist":
        return
    fm = out / "fmnist"
    with tarfile.open(dest / "fmnist_sets.tar", "w") as t:
        for f in sorted(fm.glob("*.json")) + sorted(fm.glob("*.safetensors")) + sorted(fm.glob("*/meta.json")):
            t.add(f, arcname=str(f.relative_to(fm)))
    files = sorted((fm / "buffer_w64").glob("expert_*.safetensors"))
    part, size, chunks = [], 0, []
    for f in files:  # tar files under 15 MB each
        if part and size + f.stat().st_size > 15e6:
            chunks.append(part)
            part, size = [], 0
        part.append(f)
        size += f.stat().st_size
    if part:
        chunks.append(part)
    for k, chunk in enumerate(chunks[:4]):
        with tarfile.open(dest / f"buffer_w64_{k}.tar", "w") as t:
            for f in chunk:
                t.add(f, arcname=str(f.relative_to(fm)))


def main(argv=None) -> int:
    if argv is None and "--fmnist-worker" in sys.argv:
        i = sys.argv.index("--fmnist-worker")
        out, device, tiny, budget = sys.argv[i + 1:i + 5]
        fmnist_worker(Path(out), device, tiny == "1", float(budget))
        return 0
    if argv is None and "--finish-fmnist" in sys.argv:
        i = sys.argv.index("--finish-fmnist")
        dev = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cpu"
        finish_fmnist(Path(sys.argv[i + 1]), dev)
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="runs/gpu_check")
    p.add_argument("--tiny", action="store_true", help="toy sizes, seconds on a CPU (what CI runs)")
    p.add_argument("--sections", nargs="+", default=[n for n, _ in SECTIONS], choices=[n for n, _ in SECTIONS])
    p.add_argument("--scale", type=float, default=1.0, help="multiply every section's time limit")
    p.add_argument("--mirror", default=None, help="also copy the report (and, after fmnist, the width-64 buffer and "
                   "the distilled sets as tar files under 15 MB) here after every section")
    a = p.parse_args(argv)
    out = Path(a.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    report = [f"# GPU check — {platform.node()}, device {a.device}{' (tiny)' if a.tiny else ''}, "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
              f"command: `python benchmarks/gpu_check.py --device {a.device}{' --tiny' if a.tiny else ''} "
              f"--out {a.out}`", ""]
    summary = []
    for name, limit in SECTIONS:
        if name not in a.sections:
            continue
        limit = (120 if a.tiny else limit) * a.scale
        budget = limit - (5 if a.tiny else 25)  # the worker's own clock leaves time to write its results
        r = run_section(name, section_command(name, a.device, a.tiny, out, budget), limit, out, a.device)
        summary.append(r)
        print(f"[{time.perf_counter() - t_all:6.1f} s] {name}: {r['status']} ({r['seconds']} s)", flush=True)
        report += [f"## {name}: {r['status']}, {r['seconds']} s", ""]
        if name == "fmnist" and (out / "fmnist" / "results.json").exists():
            report += [fmnist_table(json.loads((out / "fmnist" / "results.json").read_text())), ""]
        report += ["```", report_log(r["log"]), "```", ""]
        (out / "gpu_check.md").write_text("\n".join(report))
        if a.mirror:
            mirror(out, Path(a.mirror), name)
    bad = [r["name"] for r in summary if r["status"] not in ("ok", "skipped at --tiny")]
    print(f"\n{len(summary) - len(bad)} ok, {len(bad)} not ok{': ' + ', '.join(bad) if bad else ''}; "
          f"{time.perf_counter() - t_all:.0f} s in all; wrote {out / 'gpu_check.md'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
