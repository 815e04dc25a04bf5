"""Chapter 01 (weight distributions): which layers to look at, their weight statistics against a Gaussian, and
the level sets of sign binarization, 2-bit RTN and FDB drawn over them (method.md §7, first item).

Weights are (out, in) and groups are ``group_size`` consecutive input columns of one row, as in quant.py.
Everything here measures; the quantizers themselves live in ``dbllm_lab.quant`` and are reused.
"""
import math

import torch

from .model import LINEAR_NAMES, decoder_layers, quantizable_linears
from .quant import fdb_init, grouped, quantize_rtn

LAYER_TYPES = tuple(n.split(".")[-1] for n in LINEAR_NAMES)  # q_proj, k_proj, ..., down_proj


def layer_type(name):
    """'model.layers.3.mlp.up_proj' -> 'up_proj'; ValueError for a name that is no decoder linear layer."""
    t = name.rsplit(".", 1)[-1]
    if t not in LAYER_TYPES:
        raise ValueError(f"{name!r} is not a decoder linear layer; its last part must be one of {LAYER_TYPES}")
    return t


def layer_block(name):
    """'model.layers.3.mlp.up_proj' -> 3 (None when the name holds no block index)."""
    parts = name.split(".")
    return next((int(p) for p in parts if p.isdigit()), None)


def select_layers(model, blocks=None, types=None):
    """Ordered {name: module} of the decoder linear layers in ``blocks`` (indices, None = all) and ``types``
    (e.g. ("q_proj", "down_proj"), None = all)."""
    n_blocks = len(decoder_layers(model))
    if blocks is not None:
        bad = [b for b in blocks if not isinstance(b, int) or not -n_blocks <= b < n_blocks]
        if bad:
            raise ValueError(f"blocks {bad} do not exist: the model has blocks 0..{n_blocks - 1}")
        blocks = {b % n_blocks for b in blocks}
    if types is not None:
        bad = [t for t in types if t not in LAYER_TYPES]
        if bad:
            raise ValueError(f"layer types {bad} are unknown; use some of {LAYER_TYPES}")
    return {n: m for n, m in quantizable_linears(model).items()
            if (blocks is None or layer_block(n) in blocks) and (types is None or layer_type(n) in types)}


# ---------------------------------------------------------------------------------------------------------
# Weight distributions (method.md §7, first item)
# ---------------------------------------------------------------------------------------------------------
def weight_stats(w):
    """Moments of a weight tensor: mean, std, skew, excess kurtosis (0 for a Gaussian), max |w| in stds,
    and the fraction of weights beyond 3 std (0.0027 for a Gaussian)."""
    x = w.detach().double().flatten()
    if x.numel() < 2:
        raise ValueError(f"weight_stats needs at least 2 values, got {x.numel()}")
    mean, std = x.mean(), x.std(unbiased=False)
    z = (x - mean) / std
    return {"n": x.numel(), "mean": float(mean), "std": float(std), "skew": float(z.pow(3).mean()),
            "kurtosis": float(z.pow(4).mean() - 3.0), "absmax_std": float(z.abs().max()),
            "frac_beyond_3std": float((z.abs() > 3).double().mean())}


def weight_stats_table(layers):
    """One row per layer of ``layers`` ({name: nn.Linear}): name, block, type, shape and ``weight_stats``."""
    rows = []
    for name, m in layers.items():
        rows.append({"layer": name, "block": layer_block(name), "type": layer_type(name),
                     "out": m.out_features, "in": m.in_features, **weight_stats(m.weight)})
    return rows


def stats_by_type(rows):
    """Average of skew / kurtosis / std over the layers of each type, from ``weight_stats_table`` rows."""
    out = []
    for t in LAYER_TYPES:
        rs = [r for r in rows if r["type"] == t]
        if rs:
            out.append({"type": t, "layers": len(rs),
                        **{k: sum(r[k] for r in rs) / len(rs) for k in ("std", "skew", "kurtosis",
                                                                        "absmax_std", "frac_beyond_3std")}})
    return out


def histogram(w, bins=200, lim=None):
    """Density histogram of ``w`` and the Gaussian with the same mean and std on the same bin centres.
    Returns {centres, density, gaussian, mean, std} (lists); ``lim`` clips the range (default 6 std)."""
    x = w.detach().float().flatten()
    mean, std = float(x.mean()), float(x.std(unbiased=False))
    lim = lim if lim is not None else (mean - 6 * std, mean + 6 * std)
    counts = torch.histc(x, bins=bins, min=lim[0], max=lim[1])
    width = (lim[1] - lim[0]) / bins
    centres = torch.linspace(lim[0] + width / 2, lim[1] - width / 2, bins)
    density = counts / (x.numel() * width)
    gauss = torch.exp(-0.5 * ((centres - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
    return {"centres": centres.tolist(), "density": density.tolist(), "gaussian": gauss.tolist(),
            "mean": mean, "std": std}


def quantizer_levels(w, group_size, init="clip", orientation="per-group"):
    """The level sets of sign binarization, 2-bit uniform (RTN, MSE clip) and FDB, per group, in units of the
    group's standard deviation (so groups of different scale can be pooled), and the median over groups.

    Returns {"z": weights / group std (flat), "sign"|"rtn2"|"fdb": (groups, levels) sorted levels in stds,
    "median": {method: list of median levels}, "fdb_mirror_fraction": share of groups with a1 < 0}.
    """
    wg = grouped(w.detach(), group_size)
    mu = wg.mean(-1)
    sd = wg.std(-1, unbiased=False).clamp(min=1e-12)
    # sign: mu +- alpha
    alpha = (wg - mu[..., None]).abs().mean(-1)
    sign = torch.stack([mu - alpha, mu + alpha], -1)
    # 2-bit uniform: (q - z) * s, q = 0..3
    _, scale, zero = quantize_rtn(w, 2, group_size, clip_search=True)
    rtn2 = (torch.arange(4.0) - zero[..., None]) * scale[..., None]
    # FDB: {0, a2, a1, a1 + a2}
    a1, a2 = fdb_init(w.detach(), group_size, init, orientation)
    fdb = torch.stack([torch.zeros_like(a1), a2, a1, a1 + a2], -1).sort(-1).values
    out = {"z": (wg / sd[..., None]).flatten()}
    for k, lv in (("sign", sign), ("rtn2", rtn2), ("fdb", fdb)):
        out[k] = (lv / sd[..., None]).reshape(-1, lv.shape[-1])
    out["median"] = {k: out[k].median(0).values.tolist() for k in ("sign", "rtn2", "fdb")}
    out["fdb_mirror_fraction"] = float((a1 < 0).float().mean())
    return out


def thresholds(levels):
    """Decision points of nearest-level rounding: midpoints of consecutive sorted levels."""
    lv = sorted(levels)
    return [(a + b) / 2 for a, b in zip(lv[:-1], lv[1:])]
