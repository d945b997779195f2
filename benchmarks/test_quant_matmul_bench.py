"""A few quant_matmul cases for pytest-benchmark (`pytest benchmarks --benchmark-only`).

GPU: decode and prefill points of the TP8 shard and the full expert width; CPU: the --quick
toy shape through the Triton interpreter. Each timed call synchronizes CUDA.
`python benchmarks/quant_matmul.py` gives the full tables with baselines and the roofline.
Each case also checks the timed call's answer against the script's reference for its format.
"""

import pytest
import torch

import quant_matmul  # sets TRITON_INTERPRET on a machine without a GPU, before triton loads
from common import WRONG_REL_ERR, rel_err

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float16
SHAPES = ["5120x1024", "5120x8192"] if ON_GPU else list(quant_matmul.QUICK_SHAPES)
TOKENS = [1, 16, 4096] if ON_GPU else [1, 24]


@pytest.fixture(scope="module", params=SHAPES)
def methods(request):
    K, N = {**quant_matmul.SHAPES, **quant_matmul.QUICK_SHAPES}[request.param]
    gen = torch.Generator(device=DEV).manual_seed(quant_matmul.SEED)
    w = torch.randn(K, N, device=DEV, generator=gen) * K ** -0.5
    fns, refs = quant_matmul.make_methods(w, DTYPE, quant_matmul.scaled_mm_available(DEV))
    yield K, N, fns, lambda x, method: quant_matmul.reference(x, w, refs[method])
    if ON_GPU:
        torch.cuda.empty_cache()


@pytest.mark.parametrize("method", ["bf16", "ours_fp8", "ours_int4"])
@pytest.mark.parametrize("M", TOKENS)
def test_quant_matmul(benchmark, methods, method, M):
    K, N, fns, reference = methods
    x = torch.randn(M, K, device=DEV, dtype=DTYPE)

    def run():
        out = fns[method](x)
        if ON_GPU:
            torch.cuda.synchronize()
        return out

    benchmark.extra_info.update(K=K, N=N, M=M, method=method)
    out = benchmark(run)
    assert out.shape == (M, N)
    assert rel_err(out, reference(x, method)) <= WRONG_REL_ERR
