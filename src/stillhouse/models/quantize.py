"""Weight-only int8 (and int4) for serving: every linear layer's weight stored as int8 with one scale per output row.

One request at a time is bound by reading every weight once a token (540 MB a token in fp32 for a 135M model), so
int8 weights read a quarter of fp32's bytes. The layer runs PyTorch's own fused kernel
(`aten._weight_int8pack_mm`: int8 weight, per-row scales, activations in bf16), which reads the int8 weight
directly. Written here rather than through torchao because torchao's eager weight-only int8 (0.18) converts the
whole weight to the activation dtype on every call, which was slower than fp32 end to end (BENCHMARKS.md
`decode_one`); the quantization itself is symmetric per-row rounding, a few lines.

What it costs: greedy answers change more often than bf16's (BENCHMARKS.md `engine_equal`), and at large batches the
int8 kernel is slower than a bf16 matmul (it is built for few rows), so it is a choice for latency, not for throughput.
int4 (groups of 32 with a scale and an offset each, llama.cpp's Q4_1 precision; CPU only) halves the bytes again: a
sixth to a quarter faster than int8 for one client on SmolLM2, and it changes more answers still.
"""

from __future__ import annotations

import torch

from stillhouse.errors import StillhouseError

METHODS = ("none", "int8", "int4")


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


class Int4Linear(torch.nn.Module):
    """A linear layer with 4-bit weights in groups of `GROUP` inputs, each group with a bf16 scale and offset (the
    precision of llama.cpp's Q4_1), on PyTorch's CPU int4 kernel (`aten._weight_int4pack_mm_for_cpu`, bf16
    activations). Each group is rounded asymmetrically to 0..15; the kernel computes (q - 8) * scale + zero, so the
    offset stored is min + 8 * scale."""

    GROUP = 32

    @classmethod
    def fits(cls, linear: torch.nn.Linear) -> bool:
        """Whether the kernel takes this layer's shape (inputs a multiple of the group, outputs of 16)."""
        return linear.in_features % cls.GROUP == 0 and linear.out_features % 16 == 0

    def __init__(self, linear: torch.nn.Linear, act_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        w = linear.weight.detach().float()
        n, k = w.shape
        g = w.reshape(n, k // self.GROUP, self.GROUP)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp_min(1e-8)
        q = ((g - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
        self.in_features, self.out_features = k, n
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        self.register_buffer("scale_zero", torch.stack([scale.reshape(n, -1).T, (lo + 8 * scale).reshape(n, -1).T], -1)
                             .to(act_dtype).contiguous())
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().to(act_dtype),
                                                                        requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the kernel reads its input as dense rows (a prefill's last positions, [rows, 1, width] out of [rows, len,
        # width], are not)
        a = x.reshape(-1, x.shape[-1]).to(self.scale_zero.dtype).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(a, self.packed, self.GROUP, self.scale_zero)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 weight, groups of {self.GROUP}"


def check_kernel(method: str, device: str | torch.device, act_dtype: torch.dtype) -> None:
    """Raise a clear error where PyTorch has no kernel for `method`'s layers on this device and dtype: one tiny layer
    of the kind is built and run."""
    layer = {"int8": Int8Linear, "int4": Int4Linear}[method]
    if method == "int4" and torch.device(device).type != "cpu":
        raise StillhouseError(f"--quantize int4 runs PyTorch's CPU int4 kernel; the model is on {device}")
    try:
        layer(torch.nn.Linear(Int4Linear.GROUP, 16, bias=False, device=device), act_dtype)(
            torch.ones(1, Int4Linear.GROUP, dtype=act_dtype, device=device))
    except (AttributeError, RuntimeError, NotImplementedError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StillhouseError(f"--quantize {method}: PyTorch {torch.__version__} has no {method} weight kernel for "
                              f"{act_dtype} on {device} ({first}); "
                              f"{'use --quantize int8' if method == 'int4' else 'serve without --quantize'}") from None


def quantize(model: torch.nn.Module, method: str = "int8") -> dict[str, int]:
    """Replace every `nn.Linear` of `model` (the output layer too, tied or not) in place: with an `Int8Linear`, or for
    "int4" with an `Int4Linear` where the kernel takes its shape (`Int4Linear.fits`; else int8). Returns how many layers
    got each. Embeddings and norms keep their dtype."""
    if method not in METHODS[1:]:
        raise StillhouseError(f"--quantize must be one of {', '.join(METHODS)}, not {method!r}")
    first = next(model.parameters())
    check_kernel("int8", first.device, first.dtype)  # int4 falls back to int8 for shapes its kernel does not take
    if method == "int4":
        check_kernel("int4", first.device, first.dtype)
    counts = {"int8": 0, "int4": 0}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                four = method == "int4" and Int4Linear.fits(child)
                # built from the layer's own weight, on its device
                setattr(parent, name, (Int4Linear if four else Int8Linear)(child, first.dtype))
                counts["int4" if four else "int8"] += 1
    if not sum(counts.values()):
        raise StillhouseError(f"--quantize {method}: the model has no torch.nn.Linear layers to quantize")
    return counts
