"""Linear layers whose weights are laid out once for oneDNN's CPU matmul ("packed"), for serving a model on CPU.

`F.linear` on CPU hands MKL (float32) or oneDNN (bfloat16) the weight as it is stored, [out, in] row-major, and the
library re-blocks it for its micro-kernel on every call. A served model's weights do not fit any cache (SmolLM2-135M:
540 MB in float32), so every decoding step streams all of them from memory in that unhelpful order: on a 2-core CPU
SmolLM2's float32 linear layers ran at 78-104 GFLOP/s with 48 rows (the same machine's square matmuls: ~195), and
they were ~80% of a decoding step. oneDNN can lay the weight out in its own blocked format once
(`mkldnn._reorder_linear_weight`) and multiply against that layout (`mkldnn._linear_pointwise`): with weights coming
cold from memory, 1.1-3.3x a layer but the smallest (the 49,152-row output layer 1.8-3.3x) for 1 to 64 rows, and
SmolLM2's decoding steps 1.25-1.75x faster in float32, 1.10-1.36x in bfloat16, choosing the same tokens
(BENCHMARKS.md `engine_packed`).

These are PyTorch's own operators, the ones its compiler (inductor) puts in when it freezes a model for CPU inference
in bfloat16, or in float32 with a batch size that varies; no maintained library exposes them as a layer for an eager
model, hence this module. Only models whose linear weights are too large to stay in cache are packed (`MIN_PARAMS`):
for small ones (the demo world's Atlas, 4.8M parameters) oneDNN's fixed cost per call (~10 us) made its 256 x 256
layers 1.0-2.4x slower than `F.linear`. The sums are float32's (or bfloat16's, accumulated in float32) either way, in
another order: results agree to rounding.
"""

from __future__ import annotations

import ctypes
import sys

import torch
import torch.nn.functional as F

MIN_PARAMS = 32_000_000  # linear weights in all (128 MB in float32), past most CPUs' last-level cache


def _ops_available(dtype: torch.dtype) -> bool:
    ops = torch.ops.mkldnn
    try:
        if not (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
                and hasattr(ops, "_linear_pointwise")):
            return False
        if dtype == torch.bfloat16:
            return bool(ops._is_mkldnn_bf16_supported())
        return dtype == torch.float32
    except (AttributeError, RuntimeError):
        return False


class PackedLinear(torch.nn.Module):
    """`linear`'s function with its weight in oneDNN's layout (and its dense weight released, unless something else,
    such as a tied input embedding, holds it). Inference only: with gradients wanted it computes through `F.linear`."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # a plain attribute, not a parameter: `.to()`, `state_dict` and parameter counts do not know oneDNN's layout
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.dtype = linear.weight.dtype

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, rebuilt (a copy of the whole weight on every read) for code that reads it; the engine
        never does (it reads `out_features`)."""
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype or x.device.type != "cpu" or torch.is_grad_enabled() and x.requires_grad:
            return F.linear(x.to(self.dtype), self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(model: torch.nn.Module, min_params: int | None = None) -> int:
    """Swap every plain `nn.Linear` of `model` for a `PackedLinear` where that helps: on CPU, in float32 (or bfloat16
    where oneDNN supports it), when the linear weights hold at least `min_params` (default `MIN_PARAMS`) parameters in
    all. Checks one packed layer against `F.linear` first and packs nothing if they disagree. Returns how many layers
    it swapped."""
    linears = [(name, m) for name, m in model.named_modules() if type(m) is torch.nn.Linear]
    if not linears or sum(m.weight.numel() for _, m in linears) < (MIN_PARAMS if min_params is None else min_params):
        return 0
    w = linears[0][1].weight
    if w.device.type != "cpu" or any(m.weight.dtype != w.dtype for _, m in linears) or not _ops_available(w.dtype):
        return 0
    try:
        first = linears[0][1]
        x = torch.randn(3, first.in_features, generator=torch.Generator().manual_seed(0)).to(w.dtype)
        with torch.inference_mode():
            got, want = PackedLinear(first)(x).float(), F.linear(x, first.weight, first.bias).float()
        tol = 1e-3 if w.dtype == torch.float32 else 5e-2
        if not torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max())):
            return 0
    except RuntimeError:  # a build whose oneDNN refuses the layout: keep F.linear
        return 0
    names = [name for name, _ in linears]
    del linears, first, w  # one dense weight alive at a time below, not all of them beside their packed copies
    count = 0
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        try:
            setattr(parent, attr, PackedLinear(getattr(parent, attr)))
        except RuntimeError:  # out of memory midway: the layers packed so far stay packed, the rest as they were
            break
        count += 1
    _give_back_freed_memory()
    return count


def _give_back_freed_memory() -> None:
    """Return the released dense weights' memory to the system. glibc keeps freed heap memory for later allocations,
    so without this the process stayed as large as dense and packed weights together (SmolLM2 in float32: 1,430 MB
    resident against 923 as loaded; with it 1,024, the tied output layer's copy above; `engine_packed`)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl, ...): nothing to ask
            pass
