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

from .model import norm_weights, quantizable_linears
from .quant import (GROUP_SIZE, check_bits, check_group_size, dual_binarize, fdb_bits_per_weight, fdb_init, fdb_round,
                    fdb_scale_grads, quantize_rtn, round_half_to_zero, rtn_bits_per_weight)


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
    """w_hat = a1 * b1 + a2 * b2 per group, (b1, b2) = ``quant.fdb_round`` of the latent weight; gradients:
    a1 <- sum_group(g * b1), a2 <- sum_group(g * b2), latent w <- g (STE). Works on the (out, groups, g) view:
    no repeated-scale temporaries."""

    @staticmethod
    def forward(ctx, w, a1, a2, group_size):
        out, n = w.shape
        b1, b2, w_hat = fdb_round(w.detach().reshape(out, n // group_size, group_size), a1.detach()[..., None],
                                  a2.detach()[..., None], dequantize=True)
        ctx.save_for_backward(b1, b2)
        return w_hat.reshape(out, n).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        b1, b2 = ctx.saved_tensors
        ga1 = ga2 = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            ga1, ga2 = fdb_scale_grads(grad.reshape(b1.shape), b1, b2)
        return (grad if ctx.needs_input_grad[0] else None), ga1, ga2, None


class LearnableQuantLinear(nn.Module):
    """Base of the quantized layers whose quantizer trains: a latent weight ``weight`` (frozen unless
    ``train_latent``), the quantizer's own parameters (``quant_parameters()``) and ``dequantized_weight()``,
    differentiable in both. Under no_grad the dequantized weight is computed once per change of its inputs."""

    def quant_parameters(self):
        raise NotImplementedError

    def dequantized_weight(self):
        raise NotImplementedError

    @property
    def train_latent(self):
        return self.weight.requires_grad

    def forward(self, x):
        if torch.is_grad_enabled():
            w = self.dequantized_weight()
        else:  # inference: quantize once per change of the weight or the quantizer, not on every call
            key = tuple((p._version, p.data_ptr()) for p in [self.weight, *self.quant_parameters()]) + (
                self.weight.device,)
            if getattr(self, "_w_cache", (None,))[0] != key:
                self._w_cache = (key, self.dequantized_weight().detach())
            w = self._w_cache[1]
        return nn.functional.linear(x, w.to(x.dtype), self.bias)

    def extra_repr(self):
        return (f"{self.in_features} -> {self.out_features}, group {self.group_size}, "
                f"latent {'trainable' if self.train_latent else 'frozen'}")


class DualBinaryLinear(LearnableQuantLinear):
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
    def from_linear(cls, linear, group_size=GROUP_SIZE, init="clip", orientation="per-group", train_latent=False):
        a1, a2 = fdb_init(linear.weight.detach(), group_size, init, orientation)
        return cls(linear.weight, a1, a2, group_size, linear.bias, train_latent)

    @property
    def bits_per_weight(self):
        """Two bit-planes + two fp16 scales per group (``quant.fdb_bits_per_weight``)."""
        return fdb_bits_per_weight(2, self.group_size)

    def bitplanes(self):
        return dual_binarize(self.weight.detach(), self.a1.detach(), self.a2.detach(), self.group_size)

    def dequantized_weight(self):
        return _DualBinaryWeight.apply(self.weight, self.a1, self.a2, self.group_size)

    def quant_parameters(self):
        return [self.a1, self.a2]


def round_ste(x):
    """round_half_to_zero(x) in the forward pass, identity gradient (straight-through estimator)."""
    return x + (round_half_to_zero(x) - x).detach()


class UniformQuantLinear(LearnableQuantLinear):
    """Learnable uniform k-bit grid (EfficientQAT's Block-AP / E2E-QP, LSQ-style): per (row, group) a step s
    and a zero point z, both trainable,

        w_hat = s * (clamp(round(w / s) + round(z), 0, 2^k - 1) - round(z))

    with every round a straight-through estimator, so d w_hat / d s and d w_hat / d z follow LSQ, and the
    latent weight trains through the STE when ``train_latent``. Initialised from RTN with clip search it
    reproduces ``quant.fake_quantize(w, k, g, clip_search=True)`` exactly. The counterpart FDB is compared
    with at equal training: its storage is k code bits + an fp16 step + a k-bit zero per group.
    """

    def __init__(self, weight, step, zero, group_size, bits=2, bias=None, train_latent=False):
        super().__init__()
        check_group_size(weight.shape[1], group_size)
        check_bits(bits)
        shape = (weight.shape[0], weight.shape[1] // group_size)
        if step.shape != shape or zero.shape != shape:
            raise ValueError(f"step and zero must have shape (out, in // group_size) = {shape}, got "
                             f"{tuple(step.shape)}, {tuple(zero.shape)}")
        self.out_features, self.in_features = weight.shape
        self.group_size, self.bits = group_size, bits
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=train_latent)
        self.step = nn.Parameter(step.detach().clone().to(weight.dtype))
        self.zero = nn.Parameter(zero.detach().clone().to(weight.dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear, group_size=GROUP_SIZE, bits=2, clip_search=True, train_latent=False):
        _, step, zero = quantize_rtn(linear.weight.detach(), bits, group_size, clip_search)
        return cls(linear.weight, step, zero, group_size, bits, linear.bias, train_latent)

    def quant_parameters(self):
        return [self.step, self.zero]

    @property
    def bits_per_weight(self):
        """k code bits + fp16 step + k-bit zero per group (``quant.rtn_bits_per_weight``)."""
        return rtn_bits_per_weight(self.bits, self.group_size)

    def dequantized_weight(self):
        out, n = self.weight.shape
        g = self.group_size
        wg = self.weight.reshape(out, n // g, g).float()
        s = self.step.float()[..., None]
        z = round_ste(self.zero.float())[..., None]
        q = torch.clamp(round_ste(wg / s) + z, 0, 2**self.bits - 1)
        return ((q - z) * s).reshape(out, n).to(self.weight.dtype)


def fdb_layers(model):
    """{name: DualBinaryLinear} of a quantized model."""
    return {n: m for n, m in quantizable_linears(model).items() if isinstance(m, DualBinaryLinear)}


def learnable_layers(model):
    """{name: layer} of the decoder linear layers whose quantizer trains (FDB, learnable uniform)."""
    return {n: m for n, m in quantizable_linears(model).items() if isinstance(m, LearnableQuantLinear)}


def trainable_parameters(model, train_latent=False, train_norms=False):
    """Freeze everything in ``model`` (a model or one decoder block), then enable the quantizer parameters (FDB
    a1, a2; uniform step, zero) of every learnable layer, its latent weight if ``train_latent`` and the RMSNorm
    weights if ``train_norms``. Returns ({name: param} of the quantizer parameters, of the latent weights, of
    the norms)."""
    layers = learnable_layers(model)
    if not layers:
        raise ValueError("the student has no learnable quantized layers (DualBinaryLinear or UniformQuantLinear): "
                         "quantize it with quantize_model(model, 'fdb' or 'uniform', ...) first")
    for p in model.parameters():
        p.requires_grad_(False)
    scales, latents, norms = {}, {}, {}
    for n, m in layers.items():
        quant = {id(p) for p in m.quant_parameters()}
        for k, p in m.named_parameters():
            if id(p) in quant:
                scales[f"{n}.{k}"] = p
        if train_latent:
            latents[f"{n}.weight"] = m.weight
    if train_norms:
        norms = norm_weights(model)
        if not norms:
            raise ValueError("train_norms=True but the model has no RMSNorm weights to train")
    for p in [*scales.values(), *latents.values(), *norms.values()]:
        p.requires_grad_(True)
    return scales, latents, norms


def param_groups(scales, latents, norms, lr, lr_latent, lr_norm, weight_decay=0.0):
    """AdamW parameter groups of ``trainable_parameters``' three dicts: the quantizer parameters at ``lr``, the
    latent weights at ``lr_latent`` (with ``weight_decay``), the norms at ``lr_norm``; empty groups left out."""
    groups = [{"params": list(scales.values()), "lr": lr, "weight_decay": 0.0}]
    if latents:
        groups.append({"params": list(latents.values()), "lr": lr_latent, "weight_decay": weight_decay})
    if norms:
        groups.append({"params": list(norms.values()), "lr": lr_norm, "weight_decay": 0.0})
    return groups


def learnable_state(model):
    """What training may change in ``model`` (a model or one decoder block): the learnable layers' parameters
    and the norm weights, as {name: copy}."""
    return {**{f"{n}.{k}": p.detach().clone() for n, m in learnable_layers(model).items()
               for k, p in m.named_parameters() if k != "bias"},
            **{n: p.detach().clone() for n, p in norm_weights(model).items()}}
