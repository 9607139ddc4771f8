"""The embedding space coreset rules measure distances in: e(x) = ConvNet.embed(x).

Herding and k-center greedy (DeepCore) select real images by their position in a feature space,

    e(x) = flatten(features(x; θ))          (N, C, H, W) → (N, D),  D = width · 4 · 4 for ConvNet-3

with θ either

* a **randomly initialised** ConvNet (the default here: no training needed; DM shows that random
  ConvNet features already carry class structure), drawn from the method's seed; or
* a **trained expert**: θ*_E of an MTT expert buffer (``buffer=``; ``expert``, ``epoch`` choose the
  snapshot, default expert 0 at its last stored epoch) — DeepCore's setting of a model trained on the
  full data.

The provenance of every set records which, as ``provenance["embedding"]``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch.func import functional_call

from .common import (
    DEFAULT_WIDTH,
    EmbedOf,
    detached_params,
    embed_params,
    random_network,
)


def embedding_model(dataset, gen: torch.Generator, buffer=None, expert: int = 0, epoch: int | None = None,
                    arch: str = "convnet", width: int = DEFAULT_WIDTH, depth: int | None = None,
                    norm: str | None = None, device="cpu") -> tuple[EmbedOf, dict, dict]:
    """(wrapper module, its parameters θ', description) of the embedding network.

    buffer: None → random init from ``gen`` (arch/width/depth/norm); an ``ExpertBuffer`` or its
    directory → the buffer's architecture at θ*_epoch of ``expert``.
    """
    if buffer is None:
        net = random_network(dataset, gen, arch, width, depth, norm, device)
        params = detached_params(net)
        info = {"source": "random init", "arch": arch, "width": width, "depth": depth, "norm": norm}
        return EmbedOf(net), embed_params(params), info

    from ..buffers import ExpertBuffer
    from ..pipeline import network_for

    buf = buffer if isinstance(buffer, ExpertBuffer) else ExpertBuffer.open(Path(buffer))
    m = buf.meta
    mine = (dataset.name, dataset.channel, list(dataset.im_size), dataset.num_classes, dataset.zca is not None)
    theirs = (m["dataset"], m["channel"], list(m["im_size"]), m["num_classes"], bool(m["zca"]))
    if mine != theirs:
        raise ValueError(
            f"the expert buffer {buf.path} was trained on (dataset, channel, im_size, classes, zca) = {theirs}, "
            f"but the data set given is {mine}; train experts on this data set or pass buffer=None (random init)"
        )
    epoch = max(buf.epochs) if epoch is None else int(epoch)
    net = network_for(buf, device)
    params = buf.params(expert, epoch, device=device)  # θ*_epoch, ValueError if not stored
    info = {"source": "trained expert", "buffer": str(buf.path), "expert": int(expert), "epoch": epoch,
            "arch": m["arch"], **m.get("arch_kwargs", {})}
    return EmbedOf(net), embed_params(params), info


@torch.no_grad()
def embed_images(model: EmbedOf, params: dict, images: Tensor, batch_size: int = 500) -> Tensor:
    """e(x) for every image, in chunks: (N, C, H, W) → (N, D) float32 on the images' device."""
    model.eval()
    out = [functional_call(model, params, (x,)) for x in images.split(batch_size)]
    return torch.cat(out)


def embedding_config(ipc, seed, buffer, expert, epoch, arch, width, depth, norm) -> dict:
    """The config a selection in embedding space records (herding, k-center)."""
    return {"ipc": ipc, "seed": int(seed), "buffer": None if buffer is None else str(getattr(buffer, "path", buffer)),
            "expert": expert, "epoch": epoch, "arch": arch, "width": width, "depth": depth, "norm": norm}


def embed_train_set(dataset, seed, buffer, expert, epoch, arch, width, depth, norm, device):
    """Features (N, D) of every training image, the embedding's description and the seeded generator."""
    gen = torch.Generator().manual_seed(int(seed))
    model, params, info = embedding_model(dataset, gen, buffer, expert, epoch, arch, width, depth, norm, device)
    return embed_images(model, params, dataset.train_images.to(device)), info, gen
