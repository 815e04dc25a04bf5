"""``PackedDualBinaryLinear``: the inference-time DB-LLM linear layer, stored as packed bit-planes.

    y = x @ w_hat.T + bias,   w_hat = a1 * b1 + a2 * b2 per (row, group of g input columns)   (method.md §1)

Buffers: ``p1``, ``p2`` (out, in // 32) int32 words (``dbllm_lab.packing`` layout), ``a1``, ``a2``
(out, in // g) scales (fp16 by default: the packed format; fp32 keeps the simulated model's scales exactly),
optional ``bias``. Storage is 2 + 2 * 16 / g bits per weight (2.5 at g = 64).

Forward runs one of these paths, chosen by the ``backend`` switch (constructor argument or attribute; the
packed model keeps no dense weight on any path):
  * ``'triton'``: the Triton kernels of ``dbllm_lab.kernel`` (GEMV for <= 8 rows, GEMM above), on CUDA (on CPU
    tensors only under TRITON_INTERPRET=1, for tests);
  * ``'cpu'``: the C++ kernel of ``dbllm_lab.cpu_kernel``, compiled on first use: its integer path for 1 to
    ``INT8_MAX_ROWS`` activation rows (decoding; int8 activations per group, integer bit-plane sums, fp32
    scaling), its exact fp32 path for more rows and for groups over ``cpu_kernel.INT8_MAX_GROUP``, and from
    ``DENSE_MIN_ROWS`` rows on (prefill, perplexity) the prefill path: ``w_hat`` dequantized in C++ into the
    activations' dtype for that call only (``cpu_kernel.dequantize_cpu``, one layer's dense weight at a time), then
    torch's GEMM (``F.linear``), faster at that batch than the kernel that reads the planes (``bench/prefill_cpu.py``);
  * ``'cpu-exact'``: the C++ kernel's exact fp32 path at every batch size (the reference of the integer path);
  * ``'cpu-int8'``: the integer path at every batch size (to measure its accuracy, e.g. perplexity);
  * ``'torch'``: dequantize into a temporary dense ``w_hat`` on every call, then ``F.linear`` (slow; the fallback
    when neither kernel can run, and a reference);
  * ``'auto'`` (default): 'triton' for CUDA inputs, 'cpu' for CPU inputs when the C++ kernel builds here,
    else 'torch' (with a warning naming the reason).
Dtype casts (``model.to(torch.bfloat16)``, ``.half()``) reach the bias only: the planes and scales keep the packed
format bit for bit (``_apply``), and a bf16 model's prefill path multiplies a bf16 ``w_hat``.
The integer path reads the planes in its own layout (``cpu_kernel.repack_int8``), made on its first call and
kept beside the buffers (same bytes again, 2.5 bits per weight; remade when a buffer changes).
"""
import warnings

import torch
from torch import nn
from torch.nn import functional as F

from . import cpu_kernel
from .kernel import BACKENDS as KERNEL_BACKENDS
from .kernel import HAS_TRITON, SCALE_DTYPES, bits_per_weight, dequantize, dual_binary_matmul, interpreting
from .packing import WORD_BITS, pack_bits

BACKENDS = KERNEL_BACKENDS + ("cpu-exact", "cpu-int8")  # the layer's backends (module docstring)
CPU_PATHS = ("cpu", "cpu-exact", "cpu-int8")
INT8_MAX_ROWS = 4  # 'cpu' runs the integer path up to this many activation rows
DENSE_MIN_ROWS = 128  # and dequantize + F.linear from this many on (bench/prefill_cpu.py)


class PackedDualBinaryLinear(nn.Module):
    """Dual-binarized linear layer from packed bit-planes; see the module docstring for the formula and paths."""

    def __init__(self, in_features, out_features, group_size=64, bias=False, scale_dtype=torch.float16,
                 backend="auto", device=None):
        super().__init__()
        if group_size <= 0 or group_size % WORD_BITS:
            raise ValueError(f"group_size={group_size} is not supported: it must be a positive multiple of "
                             f"{WORD_BITS} (e.g. 32, 64, 128)")
        if in_features % group_size:
            raise ValueError(f"in_features={in_features} is not a multiple of group_size={group_size}")
        if scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype={scale_dtype} is not one of {SCALE_DTYPES}")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.backend = backend
        self._int8 = None  # (buffer versions, cpu_kernel.Int8Weights): the integer path's layout
        words, groups = in_features // WORD_BITS, in_features // group_size
        self.register_buffer("p1", torch.zeros(out_features, words, dtype=torch.int32, device=device))
        self.register_buffer("p2", torch.zeros(out_features, words, dtype=torch.int32, device=device))
        self.register_buffer("a1", torch.zeros(out_features, groups, dtype=scale_dtype, device=device))
        self.register_buffer("a2", torch.zeros(out_features, groups, dtype=scale_dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    # ---------------------------------------------------------------------------------------------------
    @classmethod
    def from_bitplanes(cls, b1, b2, a1, a2, group_size, bias=None, scale_dtype=torch.float16, **kwargs):
        """Build from {0,1} bit-planes b1, b2 (out, in) and scales a1, a2 (out, in // group_size)."""
        if b1.shape != b2.shape or b1.dim() != 2:
            raise ValueError(f"b1 and b2 must be 2-D (out, in) of one shape, got {tuple(b1.shape)} and {tuple(b2.shape)}")
        out_f, in_f = b1.shape
        if in_f % WORD_BITS:
            raise ValueError(f"in_features={in_f} is not a multiple of {WORD_BITS}; packed bit-planes need in % 32 == 0")
        if tuple(a1.shape) != tuple(a2.shape):
            raise ValueError(f"a1 and a2 shapes differ: {tuple(a1.shape)} vs {tuple(a2.shape)}")
        layer = cls(in_f, out_f, group_size=group_size, bias=bias is not None, scale_dtype=scale_dtype,
                    device=b1.device, **kwargs)
        if tuple(a1.shape) != (out_f, in_f // group_size):
            raise ValueError(f"scales have shape {tuple(a1.shape)}, expected (out, in // group_size) = "
                             f"({out_f}, {in_f // group_size}) for group_size={group_size}")
        with torch.no_grad():
            layer.p1.copy_(pack_bits(b1))
            layer.p2.copy_(pack_bits(b2))
            layer.a1.copy_(a1.detach().to(scale_dtype))
            layer.a2.copy_(a2.detach().to(scale_dtype))
            if bias is not None:
                layer.bias.copy_(bias.detach().float())
        return layer

    @classmethod
    def from_dual_binary(cls, layer, scale_dtype=torch.float16, **kwargs):
        """Freeze a trained/initialised ``DualBinaryLinear`` (layers.py): its current bit-planes
        ``layer.bitplanes()`` and scales ``layer.a1``, ``layer.a2``."""
        for attr in ("bitplanes", "a1", "a2", "group_size"):
            if not hasattr(layer, attr):
                raise TypeError(f"{type(layer).__name__} has no {attr!r}; from_dual_binary expects a DualBinaryLinear")
        with torch.no_grad():
            b1, b2 = layer.bitplanes()
            bias = getattr(layer, "bias", None)
            return cls.from_bitplanes(b1, b2, layer.a1, layer.a2, int(layer.group_size), bias=bias,
                                      scale_dtype=scale_dtype, **kwargs)

    def _apply(self, fn, recurse=True):
        """As ``nn.Module._apply``, except that the scales keep the packed format's dtype: ``model.to(torch.bfloat16)``
        or ``.half()`` moves a1 / a2 (as integer bit views, which no dtype cast touches) but never rounds them."""
        scales = {k: self._buffers[k] for k in ("a1", "a2")}
        super()._apply(fn, recurse)
        for k, t in scales.items():
            self._buffers[k] = fn(t.view(torch.int16 if t.element_size() == 2 else torch.int32)).view(t.dtype)
        return self

    # ---------------------------------------------------------------------------------------------------
    def dequantize(self, dtype=torch.float32):
        """Dense (out, in) ``w_hat = a1 * b1 + a2 * b2``."""
        return dequantize(self.p1, self.p2, self.a1, self.a2, self.group_size, dtype=dtype)

    @property
    def bits_per_weight(self):
        return bits_per_weight(self.group_size, scale_bits=torch.finfo(self.a1.dtype).bits)

    def packed_bytes(self):
        return sum(t.numel() * t.element_size() for t in (self.p1, self.p2, self.a1, self.a2))

    def path(self, x):
        """The backend forward(x) runs: 'auto' resolved to 'triton', 'cpu' or 'torch' (module docstring)."""
        if self.backend != "auto":
            return self.backend
        if x.is_cuda:
            return "triton" if HAS_TRITON and not interpreting() else "torch"
        reason = cpu_kernel.why_unavailable()
        if reason is None:
            return "cpu"
        _warn_once(f"dbllm_lab CPU kernel unavailable, PackedDualBinaryLinear falls back to dequantizing on every "
                   f"call (slow): {reason}")
        return "torch"

    def forward(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, {type(self).__name__} expects {self.in_features}")
        if x.device != self.p1.device:
            raise ValueError(f"input is on {x.device} but the packed weights are on {self.p1.device}")
        path = self.path(x)
        if path == "triton":
            y = dual_binary_matmul(x, self.p1, self.p2, self.a1, self.a2, self.group_size, backend="triton")
        elif path in CPU_PATHS:
            y = self.matmul_cpu(x, path)
        else:  # dense w_hat lives only for this call
            y = F.linear(x, self.dequantize(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def matmul_cpu(self, x, path):
        """``x @ w_hat.T`` (no bias) on a C++ path: for ``path`` 'cpu', the integer path up to ``INT8_MAX_ROWS``
        rows, the exact fp32 kernel below ``DENSE_MIN_ROWS`` and the prefill path from there (``w_hat`` from
        ``cpu_kernel.dequantize_cpu`` in x's dtype, then ``F.linear``); 'cpu-exact' / 'cpu-int8': that path always."""
        if x.dtype not in cpu_kernel.ACT_DTYPES:
            raise TypeError(f"input has dtype {x.dtype}; the CPU kernel takes float32, float16 or bfloat16")
        x2 = x.reshape(-1, self.in_features).contiguous()
        M, lib = x2.shape[0], cpu_kernel.load()
        if path == "cpu-int8" or (path == "cpu" and M <= INT8_MAX_ROWS
                                  and self.group_size <= cpu_kernel.INT8_MAX_GROUP):
            y = cpu_kernel._run_int8(lib, x2, M, self.int8_weights())
        elif path == "cpu" and M >= DENSE_MIN_ROWS:  # prefill: w_hat for this call, then torch's GEMM
            y = F.linear(x2, cpu_kernel.dequantize_cpu(self.p1, self.p2, self.a1, self.a2, self.group_size, x2.dtype))
        else:
            y = cpu_kernel._run(lib, x2, M, self.out_features, self.in_features, self.p1.contiguous(),
                                self.p2.contiguous(), self.a1.contiguous(), self.a2.contiguous(), self.group_size)
        return y.view(*x.shape[:-1], self.out_features)

    def int8_weights(self):
        """The planes and scales in the integer path's layout (``cpu_kernel.repack_int8``), made once and remade
        when a buffer was changed or replaced."""
        cpu_kernel.check_int8_group(self.group_size)
        key = tuple((t.data_ptr(), _version(t)) for t in (self.p1, self.p2, self.a1, self.a2))
        if self._int8 is None or self._int8[0] != key:
            self._int8 = (key, cpu_kernel.repack_int8(self.p1, self.p2, self.a1, self.a2, self.group_size))
        return self._int8[1]

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"bias={self.bias is not None}, scales={str(self.a1.dtype).replace('torch.', '')}, "
                f"bits_per_weight={self.bits_per_weight:g}, backend={self.backend}")


_WARNED = set()


def _version(t):
    """The tensor's in-place write counter; None for an inference tensor (made under torch.inference_mode, which
    cannot be written in place outside it)."""
    return None if t.is_inference() else t._version


def _warn_once(msg):
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def pack_model(model, scale_dtype=torch.float16, **kwargs):
    """Replace every ``DualBinaryLinear`` among ``quantizable_linears(model)`` by a ``PackedDualBinaryLinear``
    (in place). Returns the list of replaced names."""
    from .model import quantizable_linears, set_module
    names = []
    for name, module in quantizable_linears(model).items():
        if hasattr(module, "bitplanes") and hasattr(module, "a1"):
            set_module(model, name, PackedDualBinaryLinear.from_dual_binary(module, scale_dtype=scale_dtype, **kwargs))
            names.append(name)
    return names
