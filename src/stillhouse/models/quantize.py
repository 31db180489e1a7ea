"""Weight-only int8 for serving: every linear layer's weight stored as int8 with one scale per output row.

One request at a time is bound by reading every weight once a token (540 MB a token in fp32 for a 135M model), so
int8 weights read a quarter of fp32's bytes. The layer runs PyTorch's own fused kernel
(`aten._weight_int8pack_mm`: int8 weight, per-row scales, activations in bf16), which reads the int8 weight
directly. Written here rather than through torchao because torchao's eager weight-only int8 (0.18) converts the
whole weight to the activation dtype on every call, which was slower than fp32 end to end (BENCHMARKS.md
`decode_one`); the quantization itself is symmetric per-row rounding, a few lines.

What it costs: greedy answers change as bf16's do (the activations are bf16), and at large batches the int8 kernel
is slower than a bf16 matmul (it is built for few rows), so it is a choice for latency, not for throughput.
"""

from __future__ import annotations

import torch

from stillhouse.errors import StillhouseError

METHODS = ("none", "int8")


class Int8Linear(torch.nn.Module):
    """A linear layer with an int8 weight and one bf16 scale per output row: y = x @ (q * scale).T + bias."""

    def __init__(self, linear: torch.nn.Linear, act_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        w = linear.weight.detach().float()
        exact = w.abs().amax(1).clamp_min(1e-12) / 127
        # the kernel takes the scales in the activations' dtype: round them up to it before quantizing against them,
        # so each weight is off by at most half a step (rounding them afterwards put the largest off by 0.75)
        scale = exact.to(act_dtype)
        scale = torch.where(scale.float() < exact, torch.nextafter(scale, scale.new_tensor(float("inf"))), scale)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", (w / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().to(act_dtype),
                                                                        requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).to(self.scale.dtype), self.qweight,
                                               self.scale)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> torch.Tensor:
        """The weight this layer computes with, in float32."""
        return self.qweight.float() * self.scale.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight, per-row scale"


def check_kernel(device: str | torch.device, act_dtype: torch.dtype) -> None:
    """Raise a clear error where PyTorch has no int8-weight kernel for this device and dtype."""
    try:
        x = torch.ones(1, 32, dtype=act_dtype, device=device)
        q = torch.ones(8, 32, dtype=torch.int8, device=device)
        torch.ops.aten._weight_int8pack_mm(x, q, torch.ones(8, dtype=act_dtype, device=device))
    except (RuntimeError, NotImplementedError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StillhouseError(f"--quantize int8: PyTorch {torch.__version__} has no int8-weight kernel for "
                              f"{act_dtype} on {device} ({first}); serve without --quantize") from None


def quantize_int8(model: torch.nn.Module) -> int:
    """Replace every `nn.Linear` of `model` (the output layer too, tied or not) with an `Int8Linear`, in place;
    returns how many were replaced. Embeddings and norms keep their dtype."""
    dtype = next(model.parameters()).dtype
    check_kernel(next(model.parameters()).device, dtype)
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, Int8Linear(child, dtype).to(child.weight.device))
                n += 1
    if not n:
        raise StillhouseError("--quantize int8: the model has no torch.nn.Linear layers to quantize")
    return n
