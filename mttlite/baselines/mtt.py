"""MTT behind the baselines' interface: ``make_set("mtt", dataset, ipc, buffer=...)``.

Nothing new here: a thin adapter over ``mttlite.pipeline.distill_set`` (trajectory matching, the
library's core) so that a table builds every row with one call. The configuration is a preset
(``distill.PRESETS``, "demo" by default: CPU-sized) with ``dataset``, ``ipc`` and any overrides
applied; the expert buffer must exist (``experts.train_experts``). The returned set carries its
learned α as ``syn_lr`` (the evaluation trains with it) and the same cost record as the baselines.
"""
from __future__ import annotations

from pathlib import Path

from ..distill import preset as make_preset
from .common import check_ipc, measure_cost


def mtt_set(dataset, ipc: int, buffer=None, preset: str = "demo", out_dir=None, device="cpu",
            progress: bool = False, **overrides):
    """Distil with MTT from ``buffer`` (an ExpertBuffer or its directory); overrides go to the preset."""
    from ..pipeline import distill_set

    ipc = check_ipc(dataset, ipc)
    if buffer is None:
        raise ValueError("method 'mtt' needs buffer= (an expert buffer directory); train one with "
                         "mttlite.experts.train_experts(dataset, out_dir, num_experts, train_epochs, width=...)")
    from dataclasses import fields

    from ..distill import DistillConfig

    unknown = sorted(set(overrides) - {f.name for f in fields(DistillConfig)})
    if unknown:
        raise ValueError(f"method 'mtt' has no option(s) {unknown}; besides buffer, preset, out_dir, device and "
                         f"progress it takes DistillConfig fields: {', '.join(f.name for f in fields(DistillConfig))}")
    config = make_preset(preset, dataset=dataset.name, ipc=ipc, **overrides)
    with measure_cost(device) as cost:
        synset = distill_set(config, buffer, out_dir=out_dir, dataset=dataset, device=device, progress=progress)
    synset.provenance["cost"] = cost
    synset.provenance["preset"] = preset
    if out_dir is not None:  # again, now with the cost recorded
        synset.save(Path(out_dir) / "synset.safetensors")
    return synset
