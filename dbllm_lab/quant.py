"""Pure reference quantizers (tensors in, tensors out): the ground truth every fast path is tested against.

Weights are (out, in); groups are ``group_size`` consecutive input columns of one output row, and every
scale is per (row, group) with shape (out, in // group_size).

- ``quantize_rtn`` / ``dequantize_rtn``: asymmetric k-bit round-to-nearest, optional MSE clip search.
- ``sign_binarize``: 1-bit sign binarization, w_hat = alpha * sign(w - mu) + mu per group.
- FDB (method.md §1): ``fdb_init`` -> (a1, a2), ``dual_binarize`` -> (b1, b2), ``dual_binary_dequantize``.
"""
import torch

SUPPORTED_BITS = (2, 3, 4, 8)
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))  # 1.00, 0.95, ..., 0.50
FDB_INITS = ("minmax", "clip")
FDB_ORIENTATIONS = ("per-group", "fixed")
# the four FDB levels in code order (b1, b2) = (0,0), (0,1), (1,0), (1,1)
_B1 = torch.tensor([0, 0, 1, 1], dtype=torch.uint8)
_B2 = torch.tensor([0, 1, 0, 1], dtype=torch.uint8)


def check_bits(bits):
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; use one of {SUPPORTED_BITS}")


def check_group_size(in_features, group_size):
    """Raise ValueError unless ``group_size`` is a positive integer that divides ``in_features``."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size={group_size!r} must be a positive integer (e.g. 32, 64, 128)")
    if in_features % group_size:
        raise ValueError(f"group_size={group_size} does not divide the input width {in_features}; use a divisor "
                         f"of {in_features} (padding is not supported)")


# ---------------------------------------------------------------------------------------------------------
# storage cost per weight (the registry in quantize.py points each method to one of these)
# ---------------------------------------------------------------------------------------------------------
def rtn_bits_per_weight(bits, group_size):
    """k code bits + an fp16 scale and a k-bit zero point per group: k + (16 + k) / g (RTN, GPTQ)."""
    return bits + (16 + bits) / group_size


def sign_bits_per_weight(bits, group_size):
    """1 sign bit + fp16 alpha and fp16 mean per group: 1 + 32 / g (``bits`` is always 1)."""
    return 1 + 2 * 16 / group_size


def fdb_bits_per_weight(bits, group_size):
    """Two bit-planes + fp16 a1 and a2 per group: 2 + 32 / g (``bits`` is always 2; method.md §1)."""
    return 2 + 2 * 16 / group_size


def _grouped(w, group_size):
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D (out, in) weight, got shape {tuple(w.shape)}")
    check_group_size(w.shape[1], group_size)
    return w.float().reshape(w.shape[0], w.shape[1] // group_size, group_size)


def _expand(scale, group_size):
    """(out, in // g) -> (out, in) by repeating each group's value g times."""
    return scale.repeat_interleave(group_size, dim=1)


# ---------------------------------------------------------------------------------------------------------
# asymmetric k-bit round-to-nearest
# ---------------------------------------------------------------------------------------------------------
def _rtn_grid(wg, bits, ratio):
    """Scale and integer zero point per group for range [ratio*min, ratio*max] (0 always inside)."""
    qmax = 2**bits - 1
    lo = (wg.amin(-1) * ratio).clamp(max=0)
    hi = (wg.amax(-1) * ratio).clamp(min=0)
    scale = ((hi - lo) / qmax).clamp(min=1e-8)
    zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale, zero


def round_half_to_zero(x):
    """Round to nearest integer, ties toward zero (1.5 -> 1, -1.5 -> -1): the tie rule every quantizer here
    shares, so that FDB initialised from a grid reproduces it even on grid-aligned (e.g. GGUF) weights."""
    return torch.sign(x) * torch.ceil(x.abs() - 0.5)


def _rtn_codes(wg, scale, zero, bits):
    return torch.clamp(round_half_to_zero(wg / scale[..., None]) + zero[..., None], 0, 2**bits - 1)


def quantize_rtn(w, bits, group_size, clip_search=False):
    """Asymmetric round-to-nearest: q = clamp(round(w / s) + z, 0, 2^bits - 1) per group (ties toward zero).

    Min-max range by default; with ``clip_search`` each group's range is shrunk by the ratio in
    ``CLIP_RATIOS`` that minimises its squared reconstruction error. Returns (q uint8 (out, in),
    scale (out, in // g), zero (out, in // g)); ``dequantize_rtn`` inverts it: w_hat = (q - z) * s.
    """
    check_bits(bits)
    wg = _grouped(w, group_size)
    best = None
    for ratio in (CLIP_RATIOS if clip_search else (1.0,)):
        scale, zero = _rtn_grid(wg, bits, ratio)
        q = _rtn_codes(wg, scale, zero, bits)
        err = ((q - zero[..., None]) * scale[..., None] - wg).pow(2).sum(-1)
        if best is None:
            best = [q, scale, zero, err]
        else:
            better = err < best[3]
            best[0] = torch.where(better[..., None], q, best[0])
            best[1] = torch.where(better, scale, best[1])
            best[2] = torch.where(better, zero, best[2])
            best[3] = torch.where(better, err, best[3])
    q, scale, zero, _ = best
    return q.reshape(w.shape).to(torch.uint8), scale, zero


def dequantize_rtn(q, scale, zero, group_size):
    """w_hat = (q - z) * s with (s, z) per group."""
    return (q.float() - _expand(zero, group_size)) * _expand(scale, group_size)


def fake_quantize(w, bits, group_size, clip_search=False):
    """Quantize and dequantize: the simulated k-bit weight, same dtype as ``w``."""
    q, scale, zero = quantize_rtn(w, bits, group_size, clip_search)
    return dequantize_rtn(q, scale, zero, group_size).to(w.dtype)


# ---------------------------------------------------------------------------------------------------------
# sign binarization
# ---------------------------------------------------------------------------------------------------------
def sign_binarize(w, group_size):
    """1-bit binarization per group: w_hat = alpha * sign(w - mu) + mu, mu = mean(w), alpha = mean|w - mu|
    (the closed-form L2-optimal alpha for fixed signs; sign(0) taken as +1)."""
    wg = _grouped(w, group_size)
    mu = wg.mean(-1, keepdim=True)
    r = wg - mu
    alpha = r.abs().mean(-1, keepdim=True)
    b = torch.where(r >= 0, 1.0, -1.0)
    return (alpha * b + mu).reshape(w.shape).to(w.dtype)


# ---------------------------------------------------------------------------------------------------------
# Flexible Dual Binarization (method.md §1)
# ---------------------------------------------------------------------------------------------------------
def fdb_from_rtn(scale, zero):
    """(a1, a2) whose levels {0, a2, a1, a1 + a2} equal the 2-bit grid {(q - z) * s : q = 0..3}.

    z = 1: {-s, 0, s, 2s} -> a1 = 2s, a2 = -s (method.md §1); z = 2 (mirror): a1 = -2s, a2 = s;
    z = 0: {0, s, 2s, 3s} -> a1 = 2s, a2 = s; z = 3: a1 = -2s, a2 = -s. Exact in floating point.
    """
    zero = zero.round()
    if ((zero < 0) | (zero > 3)).any():
        raise ValueError("fdb_from_rtn needs a 2-bit grid: zero points must lie in 0..3")
    a1 = torch.where(zero <= 1, 2 * scale, -2 * scale)
    a2 = torch.where((zero == 0) | (zero == 2), scale, -scale)
    return a1, a2


def _fdb_step(wg, orientation, ratio):
    """Grid step s per group so that {-s, 0, s, 2s} (orientation +1) or {-2s, -s, 0, s} (-1) spans the
    clipped range: s = ratio * max(max/2, -min) or ratio * max(-min/2, max)."""
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    s = torch.maximum(hi / 2, -lo) if orientation > 0 else torch.maximum(-lo / 2, hi)
    return (s * ratio).clamp(min=1e-8)


def fdb_init(w, group_size, init="clip", orientation="per-group"):
    """Initial FDB scales (a1, a2), each (out, in // g), from a 2-bit grid of step s (method.md §1).

    init="minmax": s spans the group's range; init="clip": s minimises the squared error over
    ``CLIP_RATIOS``. orientation="fixed": every group uses {-s, 0, s, 2s} (a1 = 2s, a2 = -s);
    "per-group": each group also tries the mirror {-2s, -s, 0, s} (a1 = -2s, a2 = s) and keeps the
    one with the lower squared error.
    """
    if init not in FDB_INITS:
        raise ValueError(f"init={init!r} is not supported; use one of {FDB_INITS} (or method 'fdb' with init='gptq')")
    if orientation not in FDB_ORIENTATIONS:
        raise ValueError(f"orientation={orientation!r} is not supported; use one of {FDB_ORIENTATIONS}")
    wg = _grouped(w, group_size)
    best = None
    for sign in ((1, -1) if orientation == "per-group" else (1,)):
        for ratio in (CLIP_RATIOS if init == "clip" else (1.0,)):
            s = _fdb_step(wg, sign, ratio)
            a1, a2 = 2 * s * sign, -s * sign
            err = (_nearest_level(wg, a1[..., None], a2[..., None])[2] - wg).pow(2).sum(-1)
            if best is None:
                best = [a1, a2, err]
            else:
                better = err < best[2]
                best = [torch.where(better, a1, best[0]), torch.where(better, a2, best[1]),
                        torch.where(better, err, best[2])]
    return best[0], best[1]


def _nearest_level(w, a1, a2):
    """Nearest of the levels {0, a2, a1, a1 + a2} (ties: the level nearer zero) -> (b1, b2, w_hat)."""
    levels = torch.stack(torch.broadcast_tensors(torch.zeros_like(a1), a2, a1, a1 + a2), -1)
    dist = (w[..., None] - levels).abs()
    # |a1| = 2|a2|: the levels are a 2-bit grid of step s = |a2|. Round with RTN's own arithmetic
    # (round_half_to_zero(w / s)), so that FDB built from a grid reproduces it bit for bit, ties included.
    on_grid = (a1.abs() == 2 * a2.abs()) & (a2 != 0)
    if on_grid.any():
        s = torch.where(on_grid, a2.abs(), torch.ones_like(a2))
        k = round_half_to_zero(w / s).clamp(levels.amin(-1) / s, levels.amax(-1) / s)
        dist = torch.where(on_grid[..., None], (levels - (k * s)[..., None]).abs(), dist)
    tied = dist == dist.amin(-1, keepdim=True)
    idx = torch.where(tied, levels.abs().expand_as(dist), torch.inf).argmin(-1)
    w_hat = levels.expand(*w.shape, 4).gather(-1, idx[..., None])[..., 0]
    return _B1.to(w.device)[idx], _B2.to(w.device)[idx], w_hat


def dual_binarize(w, a1, a2, group_size):
    """Binaries (b1, b2), uint8 (out, in), of w for scales (a1, a2) per group: the nearest-level assignment
    onto {0, a2, a1, a1 + a2}. When a1 > -a2 > 0 this equals method.md §1's Heaviside formulas
    b1 = H(w - (a1 + a2)/2), b2 = H(-(w - a1 b1 - a2/2)) (see ``dual_binarize_heaviside``)."""
    wg = _grouped(w, group_size)
    b1, b2, _ = _nearest_level(wg, a1.float()[..., None], a2.float()[..., None])
    return b1.reshape(w.shape), b2.reshape(w.shape)


def dual_binarize_heaviside(w, a1, a2, group_size):
    """method.md §1 literally: b1 = H(w - (a1 + a2)/2), b2 = H(-(w - a1 b1 - a2/2)), H(x) = [x >= 0].
    Valid (equal to the nearest level) only when the level order is a2 < 0 < a1 + a2 < a1."""
    check_group_size(w.shape[1], group_size)
    A1, A2, w = _expand(a1.float(), group_size), _expand(a2.float(), group_size), w.float()
    b1 = (w - (A1 + A2) / 2 >= 0).to(torch.uint8)
    b2 = (-(w - A1 * b1 - A2 / 2) >= 0).to(torch.uint8)
    return b1, b2


def dual_binary_dequantize(b1, b2, a1, a2, group_size):
    """w_hat = a1 * b1 + a2 * b2 with (a1, a2) per group (method.md §1)."""
    check_group_size(b1.shape[1], group_size)
    return _expand(a1.float(), group_size) * b1.float() + _expand(a2.float(), group_size) * b2.float()
