"""The command line's device handling: a clear error for a device that does not exist, and
``cuda`` meaning ``cuda:LOCAL_RANK`` under torchrun (one GPU per rank)."""
from __future__ import annotations

import pytest
import torch

from mttlite import cli


def test_unknown_or_missing_devices_are_one_line_errors(monkeypatch, capsys):
    with pytest.raises(ValueError, match="not a device torch knows"):
        cli.resolve_device("nosuch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="sees no CUDA GPU"):
        cli.resolve_device("cuda")
    assert cli.main(["evaluate", "missing.safetensors", "--device", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "mttlite evaluate: error: --device 'nosuch'" in err and "Traceback" not in err


def test_cuda_under_torchrun_is_the_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert cli.resolve_device("cuda") == "cuda:3"
    assert cli.resolve_device("cuda:1") == "cuda:1"  # an explicit index is kept
    monkeypatch.setenv("LOCAL_RANK", "5")
    with pytest.raises(ValueError, match="only 4 CUDA device"):
        cli.resolve_device("cuda")
    monkeypatch.delenv("LOCAL_RANK")
    assert cli.resolve_device("cuda") == "cuda" and cli.resolve_device("cpu") == "cpu"
