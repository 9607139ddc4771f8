"""Shared fixtures. ``device``: the one switch for the device the device-agnostic tests run on.

    pytest tests                                   # CPU (the default)
    MTTLITE_TEST_DEVICE=cuda pytest tests          # the same tests on the GPU
    MTTLITE_TEST_DEVICE=cuda:1 pytest tests        # a particular GPU

Tests that are inherently CPU (file formats, bitwise determinism across processes, page-fault
counting) do not take the fixture. Tolerances that are exact on the CPU are loosened through
``close_kw`` only when the device is not the CPU (cuDNN is not bit-exact, and TF32 may be on);
``no_tf32`` turns TF32 off for a test that compares two float32 computations with each other.
tests/test_device_stages.py also reads the variable: with a GPU named, every stage it checks on
``meta`` runs on the GPU as well, with CUDA synchronisations turned into errors.
"""
from __future__ import annotations

import os

import pytest
import torch

#: The environment variable naming the test device ("cpu", "cuda", "cuda:1", "mps", ...).
DEVICE_ENV = "MTTLITE_TEST_DEVICE"


def test_device() -> torch.device:
    """``torch.device($MTTLITE_TEST_DEVICE)``, default CPU; a ValueError names the variable if it does not parse."""
    name = os.environ.get(DEVICE_ENV, "cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"{DEVICE_ENV}={name!r} is not a torch device ({err})") from None


test_device.__test__ = False  # a helper, not a test


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device the device-agnostic tests run on; skips (with the reason) if it is not available."""
    dev = test_device()
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            pytest.skip(f"{DEVICE_ENV}={dev} but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            pytest.skip(f"{DEVICE_ENV}={dev} but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        pytest.skip(f"{DEVICE_ENV}={dev} but MPS is not available on this machine")
    return dev


@pytest.fixture(scope="session")
def close_kw(device) -> dict:
    """Extra ``torch.testing.assert_close`` tolerances for float32 results off the CPU (else none).

    Off the CPU, convolutions may run in TF32 (10-bit mantissa) and cuDNN picks algorithms that sum
    in a different order, so float32 results agree to about 1e-3 relative, not 1e-6."""
    return {} if device.type == "cpu" else {"rtol": 2e-3, "atol": 2e-3}


@pytest.fixture
def no_tf32(device):
    """Full float32 matrix products and convolutions on CUDA for the test (TF32 keeps 10 mantissa bits).

    For tests whose subject is an equivalence of two float32 computations (vmap vs a loop), not the
    rounding of the kernels: with TF32 the two differ by ~1e-3 relative, which would hide a real bug."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module: tiny convolutions run fastest so on a shared 2-core machine,
    and kernels compiled by torch.compile (which bakes the thread count in) match the suite's other
    one-thread runs, so its on-disk graph cache serves them. Use with ``pytest.mark.usefixtures``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
