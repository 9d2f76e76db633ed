"""GPU rows of the export layers, all in one go (a few minutes on one GPU; nothing is measured without CUDA).

1. 2:4 sparse against dense at 3072 x 10240 and 4096 x 4096 (weight out x in), 4096 tokens: fp16
   (``SemiStructuredSparseLinear`` kernel "sparse" against fp16 ``nn.Linear``) and int8 (the 2:4 int8 kernel
   against ``Int8Linear``'s dense ``torch._int_mm``). Target ≥ 1.3× (PyTorch's 2:4 tutorial: 1.38× on A100).
2. Int8Linear against bf16 ``nn.Linear`` at large batch (16384 tokens, 4096 x 4096 and 3072 x 10240).
   Target ≥ 1.5×.

Each row checks the fast kernel's output against the layer's reference path (SQNR in dB). Run with
``python -m benchmarks gpu_export``; the ``gpu``-marked tests run with ``pytest -m gpu``. ``benchmarks/gpu.sh``
does both.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from benchmarks import Table, quiet
from lightning_compress.export.int8_linear import Int8Linear
from lightning_compress.export.sparse_linear import SemiStructuredSparseLinear
from lightning_compress.functional.masks import nm_mask
from lightning_compress.functional.quant import sqnr_db

SPARSE_SHAPES = [(3072, 10240), (4096, 4096)]  # (out, in)
TOKENS, LARGE_TOKENS = 4096, 16384
TARGET_SPARSE, TARGET_INT8 = 1.3, 1.5


def cuda_ms(fn, repeats: int = 50, warmup: int = 10) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA stream (events around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _pruned(out_f: int, in_f: int) -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f, device="cuda")
    with torch.no_grad():
        lin.weight.mul_(nm_mask(lin.weight, 2, 4))
    return lin


def sparse_table() -> Table:
    table = Table(
        f"2:4 sparse against dense on GPU ({TOKENS} tokens)",
        ["weight out × in", "dtype", "dense ms", "2:4 ms", "speed-up", "SQNR vs reference (dB)"],
    )
    for out_f, in_f in SPARSE_SHAPES:
        lin = _pruned(out_f, in_f)
        x = torch.randn(TOKENS, in_f, device="cuda", dtype=torch.float16)
        # fp16: dense nn.Linear in fp16 against the 2:4 kernel
        dense = nn.Linear(in_f, out_f, device="cuda", dtype=torch.float16)
        dense.load_state_dict(lin.state_dict())
        sparse = SemiStructuredSparseLinear.from_module(lin).cuda()
        row = _row(sparse, functools.partial(dense, x), x)
        table.rows.append([f"{out_f} × {in_f}", "fp16", *row])
        # int8: dense Int8Linear (torch._int_mm) against the 2:4 int8 kernel, the same codes
        int8 = Int8Linear.from_module(lin).cuda()
        int8.set_kernel("int8")
        codes = int8.weight_t.t().contiguous()
        sparse8 = SemiStructuredSparseLinear(codes, lin.bias, weight_scale=int8.weight_scale).cuda()
        row = _row(sparse8, functools.partial(int8, x), x)
        table.rows.append([f"{out_f} × {in_f}", "int8 (W8A8)", *row])
    table.notes.append(f"Target: 2:4 ≥ {TARGET_SPARSE}× dense. A dash: the 2:4 kernel is unavailable on this GPU.")
    return table


def _row(sparse: SemiStructuredSparseLinear, dense_fn, x: Tensor) -> list[str]:
    with torch.inference_mode():
        t_dense = cuda_ms(dense_fn)
        if "sparse" not in sparse.available_kernels():
            return [f"{t_dense:.3f}", "–", "–", sparse.sparse_unsupported_reason() or ""]
        sparse.set_kernel("sparse")
        t_sparse = cuda_ms(functools.partial(sparse, x))
        db = sqnr_db(sparse.reference(x), sparse(x))
    return [f"{t_dense:.3f}", f"{t_sparse:.3f}", f"{t_dense / t_sparse:.2f}×", f"{db:.1f}"]


def int8_table() -> Table:
    table = Table(
        f"Int8Linear (W8A8, torch._int_mm) against bf16 nn.Linear on GPU ({LARGE_TOKENS} tokens)",
        ["weight out × in", "bf16 ms", "Int8Linear ms", "speed-up", "SQNR vs reference (dB)"],
    )
    for out_f, in_f in [(4096, 4096), (3072, 10240)]:
        torch.manual_seed(0)
        lin = nn.Linear(in_f, out_f, device="cuda")
        bf16 = nn.Linear(in_f, out_f, device="cuda", dtype=torch.bfloat16)
        bf16.load_state_dict(lin.state_dict())
        int8 = Int8Linear.from_module(lin).cuda()
        int8.set_kernel("int8")
        x = torch.randn(LARGE_TOKENS, in_f, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            t_bf16, t_int8 = cuda_ms(functools.partial(bf16, x)), cuda_ms(functools.partial(int8, x))
            db = sqnr_db(int8.reference(x), int8(x))
        speed = f"{t_bf16 / t_int8:.2f}×"
        table.rows.append([f"{out_f} × {in_f}", f"{t_bf16:.3f}", f"{t_int8:.3f}", speed, f"{db:.1f}"])
    table.notes.append(f"Target: Int8Linear ≥ {TARGET_INT8}× bf16 at large batch.")
    return table


def run() -> list[Table]:
    if not torch.cuda.is_available():
        return []
    quiet()
    return [sparse_table(), int8_table()]
