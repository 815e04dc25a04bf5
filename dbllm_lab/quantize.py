"""The quantization methods, each declared once in ``METHODS``, and ``quantize_model``, the one driver.

A ``Method`` says:
- ``layer(linear, H, bits, group_size, **options) -> (new module, info)``: its per-layer step. ``H`` is the
  layer's input Hessian for calibrated methods, None otherwise. The step's keyword-only parameters are the
  method's options, with their defaults; any other option is refused.
- ``bits``: the code bits it accepts (the first is the default).
- ``group_size``: its default group size, or None when it has no group-size option (ARB's 128-column blocks).
  The group rule: a positive divisor of every layer's input width; for a ``packable`` method saved in the
  packed format (``checkpoint.save_quantized``, ``dbllm-lab quantize --out``) also a multiple of 32.
- ``needs_calib(options)``: whether it needs calibration windows.
- ``bits_per_weight(bits, group_size)``: its storage rule (``quant.*_bits_per_weight``), or None when the cost
  depends on the data and is counted per layer (ARB, ``arb.BITS_RULE``).

The embeddings and lm_head stay full precision; only the decoder's linear layers are swapped.
"""
import inspect
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from . import arb
from .calib import sequential_quantize
from .gptq import gptq_layer
from .layers import DualBinaryLinear, FakeQuantLinear, UniformQuantLinear
from .model import quantizable_linears, set_module
from .packing import WORD_BITS
from .quant import (GROUP_SIZE, FDB_INITS, FDB_ORIENTATIONS, SUPPORTED_BITS, check_group_size, fake_quantize, fdb_bits_per_weight,
                    fdb_from_rtn, rtn_bits_per_weight, sign_binarize, sign_bits_per_weight)

FIXED_FORMAT_RULE = ("code bits + per-group fp16 scales (+ k-bit zero point for rtn/gptq, fp16 mean for sign) over "
                     "the decoder linear layers; embeddings and lm_head stay full precision")


@dataclass(frozen=True)
class Method:
    name: str
    layer: Callable                           # (linear, H, *, [bits, group_size,] **options) -> (module, info)
    bits: tuple                               # accepted code bits, the first is the default
    group_size: Optional[int]                 # default group size; None: no group_size option
    needs_calib: Callable                     # options -> bool
    bits_per_weight: Optional[Callable]       # (bits, group_size) -> bits per weight; None: counted per layer
    bits_rule: str
    packable: bool = False                    # stored by the packed format (group_size % 32 == 0 then)
    drop: tuple = ()                          # keyword parameters of ``layer`` this method does not offer
    check: Optional[Callable] = None          # (options, names the caller gave) -> ValueError if invalid
    summarize: Optional[Callable] = None      # [info of every layer] -> extra report fields

    @property
    def options(self):
        """{option: default}: the per-layer step's keyword-only parameters (less bits, group_size)."""
        fixed = set(getattr(self.layer, "keywords", {})) | set(self.drop) | {"bits", "group_size"}
        return {p.name: p.default for p in inspect.signature(self.layer).parameters.values()
                if p.kind == p.KEYWORD_ONLY and p.name not in fixed}


# ---- per-layer steps --------------------------------------------------------------------------------------------

def rtn_layer(linear, H, *, bits, group_size, clip_search=False):
    """Round-to-nearest (``quant.quantize_rtn``), optionally with the MSE clip search."""
    w_hat = fake_quantize(linear.weight.detach(), bits, group_size, clip_search)
    return FakeQuantLinear(w_hat, linear.bias, rtn_bits_per_weight(bits, group_size), "rtn"), None


def sign_layer(linear, H, *, bits, group_size):
    """1-bit sign binarization per group (``quant.sign_binarize``)."""
    w_hat = sign_binarize(linear.weight.detach(), group_size)
    return FakeQuantLinear(w_hat, linear.bias, sign_bits_per_weight(bits, group_size), "sign"), None


def _gptq_grid(linear, H, bits, group_size, blocksize, percdamp, clip_search=False):
    """GPTQ's grid weight (``gptq.gptq_layer``), also written into ``linear.weight`` so that the later blocks
    calibrate on it. Returns (w_hat, scale, zero)."""
    w_hat, scale, zero = gptq_layer(linear.weight, H, bits, group_size, blocksize, percdamp, clip_search)
    linear.weight.data.copy_(w_hat.to(linear.weight.dtype))
    return w_hat, scale, zero


def gptq_linear(linear, H, *, bits, group_size, clip_search=False, blocksize=128, percdamp=0.01):
    """GPTQ: k-bit grid with Hessian error compensation."""
    w_hat, _, _ = _gptq_grid(linear, H, bits, group_size, blocksize, percdamp, clip_search)
    return FakeQuantLinear(w_hat, linear.bias, rtn_bits_per_weight(bits, group_size), "gptq"), None


def fdb_layer(linear, H, *, bits, group_size, init="clip", orientation="per-group", train_latent=False,
              blocksize=128, percdamp=0.01):
    """FDB (method.md §1): scales from ``quant.fdb_init`` (init "minmax" | "clip"), or from the 2-bit GPTQ grid
    (init "gptq": the latent weight is GPTQ's compensated grid weight, so the layer starts on that grid)."""
    if init == "gptq":
        _, scale, zero = _gptq_grid(linear, H, 2, group_size, blocksize, percdamp)
        a1, a2 = fdb_from_rtn(scale, zero)
        return DualBinaryLinear(linear.weight, a1, a2, group_size, linear.bias, train_latent), None
    return DualBinaryLinear.from_linear(linear, group_size, init, orientation, train_latent), None


def uniform_layer(linear, H, *, bits, group_size, clip_search=True, train_latent=False):
    """Learnable uniform k-bit grid (step and zero per group trainable, EfficientQAT-style), initialised from
    RTN with the clip search: the counterpart FDB is compared with at equal training."""
    return UniformQuantLinear.from_linear(linear, group_size, bits, clip_search, train_latent), None


def _check_fdb(options, given):
    init, orientation = options["init"], options["orientation"]
    if init not in FDB_INITS + ("gptq",):
        raise ValueError(f"init={init!r} is not supported for fdb; use one of {FDB_INITS + ('gptq',)}")
    if orientation not in FDB_ORIENTATIONS:
        raise ValueError(f"orientation={orientation!r} is not supported; use one of {FDB_ORIENTATIONS}")
    unused = sorted(set(given) & ({"orientation"} if init == "gptq" else {"blocksize", "percdamp"}))
    if unused:
        raise ValueError(f"fdb with init={init!r} does not use {unused} (orientation is for minmax/clip, "
                         f"blocksize/percdamp for gptq)")


METHODS = {m.name: m for m in [
    Method("rtn", rtn_layer, SUPPORTED_BITS, GROUP_SIZE, lambda o: False, rtn_bits_per_weight, FIXED_FORMAT_RULE),
    Method("gptq", gptq_linear, SUPPORTED_BITS, GROUP_SIZE, lambda o: True, rtn_bits_per_weight, FIXED_FORMAT_RULE),
    Method("sign", sign_layer, (1,), GROUP_SIZE, lambda o: False, sign_bits_per_weight, FIXED_FORMAT_RULE),
    Method("fdb", fdb_layer, (2,), GROUP_SIZE, lambda o: o["init"] == "gptq", fdb_bits_per_weight, FIXED_FORMAT_RULE,
           packable=True, check=_check_fdb),
    Method("uniform", uniform_layer, (2, 3, 4), GROUP_SIZE, lambda o: False, rtn_bits_per_weight, FIXED_FORMAT_RULE),
    # ARB-LLM family (arb.py): 1 sign bit per weight plus data-dependent extras; fixed 128-column blocks
    *[Method(name, partial(arb.quantize_linear, method=name), (1,), None, lambda o: True, None, arb.BITS_RULE,
             drop=("iters",) if name == "billm" else (), summarize=arb.summarize) for name in arb.VARIANTS],
]}


def get_method(name):
    if name not in METHODS:
        raise ValueError(f"method={name!r} is not supported; use one of {tuple(METHODS)}")
    return METHODS[name]


def check_args(method, bits=None, group_size=None, packed=False, **options):
    """Validate a method and its settings before any work is done; raise ValueError naming the bad value.

    ``bits`` / ``group_size`` None mean the method's default; a method without a group size (ARB) refuses one,
    and every method refuses options it does not use. ``packed=True``: the result will be saved in the packed
    format, so the method must be packable and ``group_size`` a multiple of 32.
    Returns (Method, bits, group_size, options with defaults filled in)."""
    m = get_method(method)
    if bits is None:
        bits = m.bits[0]
    if bits not in m.bits:
        raise ValueError(f"bits={bits!r} is not supported by method {method!r}; use one of {m.bits}")
    if m.group_size is None:
        if group_size is not None:
            raise ValueError(f"method {method!r} has no group size (it works on fixed 128-column blocks); "
                             f"do not pass group_size={group_size!r}")
    else:
        group_size = m.group_size if group_size is None else group_size
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"group_size={group_size!r} must be a positive integer (e.g. 32, 64, 128)")
    if packed:
        if not m.packable:
            packable = tuple(n for n, x in METHODS.items() if x.packable)
            raise ValueError(f"method {method!r} has no packed format; only {packable} can be saved packed")
        if group_size % WORD_BITS:
            raise ValueError(f"group_size={group_size} cannot be packed: the packed format and kernel need a "
                             f"multiple of {WORD_BITS} (e.g. 32, 64, 128)")
    allowed = m.options
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"method {method!r} does not take {unknown}; its options are {sorted(allowed)}")
    opts = {**allowed, **options}
    if m.check is not None:
        m.check(opts, set(options))
    return m, bits, group_size, opts


def quantize_model(model, method="fdb", bits=None, group_size=None, calib_windows=None, progress=True,
                   packed=False, **options):
    """Quantize the decoder's linear layers of ``model`` in place with a method of ``METHODS``; return a report.

    Everything is checked before any layer is touched (``check_args``; the group size against every layer's
    width). Calibrated methods (gptq, fdb init="gptq", the ARB family) need ``calib_windows``, an (n, seqlen)
    LongTensor of calibration text (never the evaluation split), and run block by block
    (``calib.sequential_quantize``): each step writes its result into the layer in place, so later blocks
    calibrate on the quantized earlier ones, and the new modules are installed after the pass. The report's
    ``bits_per_weight`` follows the method's rule over the quantized layers.
    """
    m, bits, group_size, opts = check_args(method, bits, group_size, packed, **options)
    layers = quantizable_linears(model)
    if group_size is not None:
        for name, lin in layers.items():
            check_group_size(lin.in_features, group_size)
    needs_calib = m.needs_calib(opts)
    if needs_calib:
        if not torch.is_tensor(calib_windows) or calib_windows.dim() != 2 or len(calib_windows) == 0:
            got = None if calib_windows is None else tuple(getattr(calib_windows, "shape", ()))
            raise ValueError(f"method={method!r} ({opts}) needs calib_windows, a non-empty (n, seqlen) LongTensor; "
                             f"got {got}")
    elif calib_windows is not None:
        raise ValueError(f"method={method!r} ({opts}) does not use calibration data; pass calib_windows=None")
    kw = {k: v for k, v in (("bits", bits), ("group_size", group_size))
          if k in inspect.signature(m.layer).parameters}
    t0 = time.time()
    desc = f"quantize {method}"
    infos, new = [], {}
    if needs_calib:
        def step(name, linear, H):
            new[name], info = m.layer(linear, H, **kw, **opts)
            infos.append(info)
            return info  # not a module: installed after the pass
        sequential_quantize(model, calib_windows, step, progress=progress, desc=desc)
    else:
        for name, linear in tqdm(layers.items(), desc=desc, disable=not progress):
            module, info = m.layer(linear, None, **kw, **opts)
            set_module(model, name, module)
            infos.append(info)
    for name, module in new.items():
        set_module(model, name, module)
    layers = quantizable_linears(model)
    n_weights = sum(x.in_features * x.out_features for x in layers.values())
    bpw = sum(x.bits_per_weight * x.in_features * x.out_features for x in layers.values()) / n_weights
    report = {"method": method, "bits": bits, "group_size": group_size, **opts, "bits_per_weight": bpw,
              "bits_rule": m.bits_rule, "n_layers": len(layers), "n_weights": n_weights}
    if m.summarize is not None:
        report.update(m.summarize(infos))
    if needs_calib:
        report["calib_windows"] = tuple(calib_windows.shape)
    report["seconds"] = time.time() - t0
    return report
