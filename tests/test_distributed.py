"""Distillation on several ranks (``torch.distributed``, gloo on 2 CPU processes) is the same
computation as one process that averages the same samples.

Each iteration draws S samples (expert, t, plan) from the shared generator on every rank; rank r
computes samples r, r + W, …, and the meta-gradients are summed with one all-reduce, then divided
by S. One process with ``samples_per_iteration=S`` computes the same samples in a loop. So the
two must end with the same pixels, α and history (to float rounding: the sum of two gradients is
the same in either order, so in practice bit for bit).
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from core_helpers import sgd_trajectories, tiny_convnet
from mttlite.distill import DistillConfig, Distiller, run


class Data:
    name, num_classes, channel, im_size = "fashion-mnist-mini", 3, 1, (8, 8)
    train_images = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    train_labels = torch.arange(3).repeat(4)


#: The trajectory-matching family's switches: soft labels add ∂L/∂y to the all-reduce, auto_steps n*.
FAMILY = dict(soft_labels=True, auto_steps=True, ema_decay=0.5)


def _setup(samples, family=False):
    net = tiny_convnet(num_classes=3, dtype=torch.float32)
    traj = sgd_trajectories(net, Data.train_images, Data.train_labels, num_experts=3, epochs=4)
    cfg = DistillConfig(ipc=2, syn_steps=4, expert_epochs=2, max_start_epoch=2, iterations=3, dsa_strategy="",
                        lr_img=10.0, lr_lr=1e-3, samples_per_iteration=samples, checkpoint_every=1,
                        **(FAMILY if family else {}))
    return Distiller(cfg, Data, net, traj)


def _state(d) -> dict:
    out = {"images": d.images.detach(), "alpha": d.syn_lr.detach(), "loss": torch.tensor(d.history.loss),
           "steps": torch.tensor(d.history.student_steps)}
    if d.label_logits is not None:
        out.update(labels=d.label_logits.detach(), ema=d.images_ema)
    return out


def _worker(rank: int, world: int, port: int, out: str, run_dir: str, family: bool = False) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        d = _setup(None, family)  # None = one sample per rank
        assert (d.rank, d.world_size, d.samples_per_iteration) == (rank, world, world)
        run(d, run_dir, progress=False)
        torch.save(_state(d), f"{out}/rank{rank}.pt")
    finally:
        dist.barrier()  # neither rank tears gloo down while the other still uses it (an abort otherwise, seen once in CI)
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
@pytest.mark.parametrize("family", [False, True], ids=["mtt", "soft-labels+auto-steps+ema"])
def test_two_gloo_ranks_equal_one_process_averaging_two_samples(tmp_path, family):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), str(tmp_path / "run"), family), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in r0:  # every rank holds the same state
        assert torch.equal(r0[k], r1[k]), k

    torch.set_num_threads(1)
    one = _setup(2, family)
    run(one, None, progress=False)
    mine = _state(one)
    assert r0.keys() == mine.keys()
    torch.testing.assert_close(r0["images"], one.images.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(r0["alpha"], one.syn_lr.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(r0["loss"], torch.tensor(one.history.loss), rtol=1e-6, atol=0)
    assert r0["steps"].tolist() == mine["steps"].tolist()  # n*, averaged over the two samples
    if family:
        torch.testing.assert_close(r0["labels"], mine["labels"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r0["ema"], mine["ema"], rtol=1e-6, atol=1e-6)
    # ... and it is not today's single-sample algorithm (the test would pass vacuously otherwise)
    single = _setup(1, family)
    run(single, None, progress=False)
    assert not torch.allclose(single.images.detach(), one.images.detach())
    # only rank 0 wrote the checkpoint, and it resumes in one process with the same config
    assert (tmp_path / "run" / "checkpoint.safetensors").exists()


def test_samples_per_iteration_must_split_evenly_over_ranks():
    with pytest.raises(ValueError, match="samples_per_iteration must be None"):
        DistillConfig(samples_per_iteration=0).validate()
    one = _setup(3)
    assert one.samples_per_iteration == 3 and one.world_size == 1


def _eval_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        res = _evaluate_tiny()
        torch.save({"accs": torch.tensor(res.accs, dtype=torch.float64), "train": torch.tensor(res.train_accs, dtype=torch.float64)},
                   f"{out}/eval{rank}.pt")
    finally:
        dist.barrier()  # neither rank tears gloo down while the other still uses it (an abort otherwise, seen once in CI)
        dist.destroy_process_group()


def _evaluate_tiny():
    from mttlite.data import load_dataset
    from mttlite.evaluate import EvalProtocol, evaluate_set, random_real_subset

    ds = load_dataset("fashion-mnist-mini")
    ds.test_images, ds.test_labels = ds.test_images[:200], ds.test_labels[:200]
    x, y = random_real_subset(ds, 2, seed=0)
    return evaluate_set(x, y, ds, EvalProtocol(width=4, epochs=2, num_nets=3), progress=False)


def test_evaluation_splits_its_networks_over_ranks_and_gathers_the_same_table(tmp_path):
    """3 networks on 2 ranks (networks 0, 2 on rank 0; 1 on rank 1) = the same 3 in one process."""
    mp.spawn(_eval_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "eval0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "eval1.pt", weights_only=True)
    torch.set_num_threads(1)
    one = _evaluate_tiny()
    for r in (r0, r1):
        assert r["accs"].tolist() == one.accs and r["train"].tolist() == one.train_accs
    assert len(set(one.accs)) > 1  # three different networks, in their order
