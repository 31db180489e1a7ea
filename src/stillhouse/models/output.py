"""A faster float32 output layer on CPU for a large vocabulary and a few to a few hundred rows.

PyTorch's `F.linear(x, W)` with x [rows, hidden] and W [vocab, hidden] hands MKL one GEMM whose long dimension is the
vocabulary; for SmolLM2's 49,152 x 576 output layer on a 2-core CPU it ran at 5-25 GFLOP/s for 2 to 8 rows and ~80 at
48-64 (the same library's square matmuls: ~190). Computing W_chunk @ x.T instead, 2,048 vocabulary rows at a time,
puts the long dimension where MKL blocks well and keeps each chunk's output in cache while it is written back into
[rows, vocab] order: a whole decode step 1.26x faster at 2 rows, 1.12x at 8, 1.06x at 48 (BENCHMARKS.md
`engine_parts`; the same sums, so fp32 results agree to rounding). Hand-written because no library offers the
reordering as a layer; one row (a GEMV) and 16-bit dtypes are left to `F.linear`, which is as fast or faster there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ChunkedOutputLinear(torch.nn.Module):
    """`linear`'s function, weight and bias shared (a tied embedding stays tied), computed vocabulary chunk by chunk."""

    CHUNK = 2048

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        if rows < 2 or x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled() and w.requires_grad:
            return F.linear(x, w, self.bias)
        flat = x.reshape(rows, x.shape[-1]).t()
        out = x.new_empty(rows, w.shape[0])
        part = x.new_empty(self.CHUNK, rows)
        for a in range(0, w.shape[0], self.CHUNK):
            b = min(w.shape[0], a + self.CHUNK)
            out[:, a:b].copy_(torch.mm(w[a:b], flat, out=part[:b - a]).t())
        if self.bias is not None:
            out += self.bias
        return out.reshape(*x.shape[:-1], w.shape[0])


def speed_up_output(model: torch.nn.Module) -> bool:
    """Swap `model`'s output layer for `ChunkedOutputLinear` where it helps (a plain float32 linear layer on CPU with
    a vocabulary of at least 8,192); returns whether it did."""
    head = model.get_output_embeddings()
    if (type(head) is not torch.nn.Linear or head.weight.dtype != torch.float32 or head.weight.device.type != "cpu"
            or head.out_features < 4 * ChunkedOutputLinear.CHUNK):
        return False
    model.set_output_embeddings(ChunkedOutputLinear(head))
    return True
