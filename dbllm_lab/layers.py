"""Quantized linear layers: what a decoder linear layer becomes after quantization.

- ``FakeQuantLinear``: a fixed, already dequantized weight (RTN / GPTQ / sign / ARB results, frozen FDB).
- ``DualBinaryLinear``: FDB (method.md §1). Learnable a1, a2 per (row, group); the latent full-precision
  weight is frozen by default; b1, b2 are recomputed from it and the current scales on every forward, so
  d w_hat / d a1 = b1 and d w_hat / d a2 = b2 (binaries are constants). With ``train_latent=True`` the
  latent weight also trains through the straight-through estimator (identity gradient).

Which layer each quantization method installs is declared in ``quantize.py``.
"""
import torch
from torch import nn

from .model import quantizable_linears
from .quant import check_group_size, dual_binarize, fdb_bits_per_weight, fdb_init


class FakeQuantLinear(nn.Module):
    """A linear layer holding an already (de)quantized weight; ``bits_per_weight`` is its storage cost."""

    def __init__(self, weight_hat, bias=None, bits_per_weight=16.0, method="rtn"):
        super().__init__()
        self.out_features, self.in_features = weight_hat.shape
        self.weight = nn.Parameter(weight_hat.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.bits_per_weight = float(bits_per_weight)
        self.method = method

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"{self.in_features} -> {self.out_features}, {self.method}, {self.bits_per_weight:.3f} bits/weight"


class _DualBinaryWeight(torch.autograd.Function):
    """w_hat = a1 * b1 + a2 * b2 (per group); gradients: a1 <- sum_group(g * b1), a2 <- sum_group(g * b2),
    latent w <- g (STE)."""

    @staticmethod
    def forward(ctx, w, a1, a2, group_size):
        b1, b2 = dual_binarize(w.detach(), a1.detach(), a2.detach(), group_size)
        ctx.save_for_backward(b1, b2)
        ctx.group_size = group_size
        A1 = a1.repeat_interleave(group_size, 1)
        A2 = a2.repeat_interleave(group_size, 1)
        return (A1 * b1.to(A1.dtype) + A2 * b2.to(A2.dtype)).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        b1, b2 = ctx.saved_tensors
        g = ctx.group_size
        out, n = grad.shape
        ga1 = (grad * b1.to(grad.dtype)).reshape(out, n // g, g).sum(-1) if ctx.needs_input_grad[1] else None
        ga2 = (grad * b2.to(grad.dtype)).reshape(out, n // g, g).sum(-1) if ctx.needs_input_grad[2] else None
        return (grad if ctx.needs_input_grad[0] else None), ga1, ga2, None


class DualBinaryLinear(nn.Module):
    """FDB linear layer: y = x @ (a1 * B1 + a2 * B2)^T (+ bias), binaries recomputed every forward."""

    def __init__(self, weight, a1, a2, group_size, bias=None, train_latent=False):
        super().__init__()
        check_group_size(weight.shape[1], group_size)
        if a1.shape != (weight.shape[0], weight.shape[1] // group_size) or a2.shape != a1.shape:
            raise ValueError(f"scales must have shape (out, in // group_size) = "
                             f"{(weight.shape[0], weight.shape[1] // group_size)}, got {tuple(a1.shape)}, "
                             f"{tuple(a2.shape)}")
        self.out_features, self.in_features = weight.shape
        self.group_size = group_size
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=train_latent)
        # scales start on fp16 values, so the packed format (fp16 scales) stores the initial model exactly
        self.a1 = nn.Parameter(a1.detach().to(torch.float16).to(weight.dtype))
        self.a2 = nn.Parameter(a2.detach().to(torch.float16).to(weight.dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear, group_size=64, init="clip", orientation="per-group", train_latent=False):
        a1, a2 = fdb_init(linear.weight.detach(), group_size, init, orientation)
        return cls(linear.weight, a1, a2, group_size, linear.bias, train_latent)

    @property
    def train_latent(self):
        return self.weight.requires_grad

    @property
    def bits_per_weight(self):
        """Two bit-planes + two fp16 scales per group (``quant.fdb_bits_per_weight``)."""
        return fdb_bits_per_weight(2, self.group_size)

    def bitplanes(self):
        return dual_binarize(self.weight.detach(), self.a1.detach(), self.a2.detach(), self.group_size)

    def dequantized_weight(self):
        return _DualBinaryWeight.apply(self.weight, self.a1, self.a2, self.group_size)

    def forward(self, x):
        if torch.is_grad_enabled():
            w = self.dequantized_weight()
        else:  # inference: binarize once per change of the weight or scales, not on every call
            key = (self.weight._version, self.a1._version, self.a2._version, self.weight.data_ptr(),
                   self.a1.data_ptr(), self.a2.data_ptr(), self.weight.device)
            if getattr(self, "_w_cache", (None,))[0] != key:
                self._w_cache = (key, self.dequantized_weight().detach())
            w = self._w_cache[1]
        return nn.functional.linear(x, w.to(x.dtype), self.bias)

    def extra_repr(self):
        return (f"{self.in_features} -> {self.out_features}, group {self.group_size}, "
                f"latent {'trainable' if self.train_latent else 'frozen'}")


def fdb_layers(model):
    """{name: DualBinaryLinear} of a quantized model."""
    return {n: m for n, m in quantizable_linears(model).items() if isinstance(m, DualBinaryLinear)}
