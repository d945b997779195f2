"""pytest-benchmark setup shared by the benchmark test files (`pytest benchmarks --benchmark-only`)."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture
def timed(benchmark):
    """timed(fn): benchmark fn() with each call synchronised on the GPU, after one call outside
    the measurement (kernel compilation); under the CPU interpreter, whose calls take ~0.1 s,
    three rounds. Skips when there is no GPU and triton was imported before the benchmark script
    could set TRITON_INTERPRET."""
    if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU, and triton was imported before TRITON_INTERPRET could be set")

    def run(fn):
        def call():
            out = fn()
            if HAS_CUDA:
                torch.cuda.synchronize()
            return out

        call()
        if HAS_CUDA:
            return benchmark(call)
        return benchmark.pedantic(call, rounds=3, iterations=1)

    return run
