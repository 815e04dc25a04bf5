"""Pure reference quantizers (tensors in, tensors out): the ground truth every fast path is tested against.

Weights are (out, in); groups are ``group_size`` consecutive input columns of one output row, and every
scale is per (row, group) with shape (out, in // group_size).

- ``quantize_rtn`` / ``dequantize_rtn``: asymmetric k-bit round-to-nearest, optional MSE clip search.
- ``sign_binarize``: 1-bit sign binarization, w_hat = alpha * sign(w - mu) + mu per group.
- FDB (method.md §1): ``fdb_init`` -> (a1, a2), ``fdb_round`` (the one FDB rounding) / ``dual_binarize`` ->
  (b1, b2), ``dual_binary_dequantize``.
- Storage per weight of each format (``*_bits_per_weight``); ``quantize.METHODS`` points each method to one.
"""
import torch

GROUP_SIZE = 64  # weights per scale group: the one default of every grouped method (quantize.METHODS)
SUPPORTED_BITS = (2, 3, 4, 8)
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))  # 1.00, 0.95, ..., 0.50
FDB_INITS = ("minmax", "clip")
FDB_ORIENTATIONS = ("per-group", "fixed")


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


def fdb_bits_per_weight(bits, group_size, scale_bits=16):
    """Two bit-planes + a1 and a2 per group: 2 + 2 * 16 / g with fp16 scales (``bits`` is always 2; method.md §1)."""
    return 2 + 2 * scale_bits / group_size


def grouped(w, group_size):
    """(out, in) -> (out, in // g, g): the groups, in fp32; ValueError unless 2-D with g dividing ``in``."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D (out, in) weight, got shape {tuple(w.shape)}")
    check_group_size(w.shape[1], group_size)
    return w.float().reshape(w.shape[0], w.shape[1] // group_size, group_size)


def expand_groups(scale, group_size):
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


def rtn_codes(wg, scale, zero, bits):
    """Integer codes q = clamp(round_half_to_zero(w / s) + z, 0, 2^bits - 1) of grouped weights (..., g)."""
    return torch.clamp(round_half_to_zero(wg / scale[..., None]) + zero[..., None], 0, 2**bits - 1)


def quantize_rtn(w, bits, group_size, clip_search=False):
    """Asymmetric round-to-nearest: q = clamp(round(w / s) + z, 0, 2^bits - 1) per group (ties toward zero).

    Min-max range by default; with ``clip_search`` each group's range is shrunk by the ratio in
    ``CLIP_RATIOS`` that minimises its squared reconstruction error. Returns (q uint8 (out, in),
    scale (out, in // g), zero (out, in // g)); ``dequantize_rtn`` inverts it: w_hat = (q - z) * s.
    """
    check_bits(bits)
    wg = grouped(w, group_size)
    best = None
    for ratio in (CLIP_RATIOS if clip_search else (1.0,)):
        scale, zero = _rtn_grid(wg, bits, ratio)
        q = rtn_codes(wg, scale, zero, bits)
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
    return (q.float() - expand_groups(zero, group_size)) * expand_groups(scale, group_size)


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
    wg = grouped(w, group_size)
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
    wg = grouped(w, group_size)
    best = None
    for sign in ((1, -1) if orientation == "per-group" else (1,)):
        for ratio in (CLIP_RATIOS if init == "clip" else (1.0,)):
            s = _fdb_step(wg, sign, ratio)
            a1, a2 = 2 * s * sign, -s * sign
            b1, b2 = fdb_round(wg, a1[..., None], a2[..., None])
            err = (a1[..., None] * b1 + a2[..., None] * b2 - wg).pow(2).sum(-1)
            if best is None:
                best = [a1, a2, err]
            else:
                better = err < best[2]
                best = [torch.where(better, a1, best[0]), torch.where(better, a2, best[1]),
                        torch.where(better, err, best[2])]
    return best[0], best[1]


FDB_ROUND_CPP = True  # fdb_round, fdb_scale_grads: use the C++ form on fp32 CPU tensors when it can be built


def fdb_round(w, a1, a2, dequantize=False):
    """The FDB rounding (method.md §1), the one function every path calls: (b1, b2), uint8 of w's shape, such
    that a1 * b1 + a2 * b2 is the level of {0, a2, a1, a1 + a2} nearest to w. ``w``: grouped weights (..., g);
    ``a1``, ``a2``: the group's scales, broadcastable (..., 1). ``dequantize``: also return that level,
    w_hat = a1 * b1 + a2 * b2, in the scales' dtype.

    The rule is ``fdb_round_torch``. fp32 CPU weights (out, groups, g) with scales (out, groups, 1) go to its
    C++ form ``fdb_round_cpu`` (bit for bit the same, tested) where a compiler is available and
    ``FDB_ROUND_CPP`` is True (set it False to time or rule out the C++ form)."""
    if (FDB_ROUND_CPP and w.device.type == "cpu" and w.dim() == 3
            and w.dtype == a1.dtype == a2.dtype == torch.float32 and a1.shape == a2.shape == (*w.shape[:2], 1)
            and not (w.requires_grad or a1.requires_grad or a2.requires_grad)):
        from . import cpu_kernel
        if cpu_kernel.available():
            return fdb_round_cpu(w, a1[..., 0], a2[..., 0], dequantize)
    b1, b2 = fdb_round_torch(w, a1, a2)
    return (b1, b2, a1 * b1.to(a1.dtype) + a2 * b2.to(a2.dtype)) if dequantize else (b1, b2)


def fdb_scale_grads(grad, b1, b2):
    """Gradients of the scales through w_hat = a1 * b1 + a2 * b2 (method.md §1; the binaries are constants):
    dL/da1 = sum over the group of dL/dw_hat * b1, dL/da2 likewise with b2. ``grad``: (..., g) grouped as the
    codes b1, b2 of ``fdb_round``; returns two (...) tensors in grad's dtype. fp32 CPU (out, groups, g) goes to
    ``fdb_scale_grads_cpu`` (one pass, the same sums in another order) under the same switch as
    ``fdb_round``'s C++ form, ``FDB_ROUND_CPP``."""
    if (FDB_ROUND_CPP and grad.device.type == "cpu" and grad.dim() == 3 and grad.dtype == torch.float32
            and b1.dtype == b2.dtype == torch.uint8):
        from . import cpu_kernel
        if cpu_kernel.available():
            return fdb_scale_grads_cpu(grad, b1, b2)
    return (grad * b1.to(grad.dtype)).sum(-1), (grad * b2.to(grad.dtype)).sum(-1)


def fdb_round_cpu(w, a1, a2, dequantize=False, threads=1):
    """``quant.fdb_round_torch``'s rule in C++, bit for bit (``tests/test_cpu_kernel.py``): w (R, G, g), a1, a2
    (R, G), fp32 CPU tensors -> (b1, b2) uint8 (R, G, g), and with ``dequantize`` also w_hat = a1 b1 + a2 b2
    (fp32, equal to torch's). One pass over the weights, no temporaries: training recomputes every FDB layer's
    binaries on every forward, and the torch form was a large share of a block's training step.

    One thread by default: a call takes milliseconds, and on a machine whose other cores are busy an OpenMP team
    spins at its closing barrier for a descheduled member: several times slower than one thread."""
    from . import cpu_kernel
    R, G, g = w.shape
    if w.dtype != torch.float32 or a1.dtype != torch.float32 or a2.dtype != torch.float32:
        raise TypeError(f"fdb_round_cpu takes float32 tensors, got {w.dtype}, {a1.dtype}, {a2.dtype}")
    if tuple(a1.shape) != (R, G) or tuple(a2.shape) != (R, G):
        raise ValueError(f"a1, a2 must have shape {(R, G)}, got {tuple(a1.shape)}, {tuple(a2.shape)}")
    w, a1, a2 = w.contiguous(), a1.contiguous(), a2.contiguous()
    b1, b2 = torch.empty(w.shape, dtype=torch.uint8), torch.empty(w.shape, dtype=torch.uint8)
    w_hat = torch.empty(w.shape, dtype=torch.float32) if dequantize else None
    if w.numel():
        cpu_kernel.load().dbl_fdb_round(w.data_ptr(), a1.data_ptr(), a2.data_ptr(), b1.data_ptr(), b2.data_ptr(),
                                        w_hat.data_ptr() if dequantize else None, R, G, g, threads)
    return (b1, b2, w_hat) if dequantize else (b1, b2)


def fdb_scale_grads_cpu(grad, b1, b2, threads=1):
    """``quant.fdb_scale_grads`` in C++: grad (R, G, g) fp32 and the codes b1, b2 (R, G, g) uint8 -> the sums
    over each group of grad * b1 and grad * b2, (R, G) fp32 each. Same sums as torch's, another summation
    order (equal to rounding, ``tests/test_cpu_kernel.py``). One thread by default, as ``fdb_round_cpu``."""
    from . import cpu_kernel
    R, G, g = grad.shape
    if grad.dtype != torch.float32 or b1.dtype != torch.uint8 or b2.dtype != torch.uint8:
        raise TypeError(f"fdb_scale_grads_cpu takes a float32 gradient and uint8 codes, got {grad.dtype}, "
                        f"{b1.dtype}, {b2.dtype}")
    if b1.shape != grad.shape or b2.shape != grad.shape:
        raise ValueError(f"b1, b2 must have the gradient's shape {tuple(grad.shape)}, got {tuple(b1.shape)}, "
                         f"{tuple(b2.shape)}")
    grad, b1, b2 = grad.contiguous(), b1.contiguous(), b2.contiguous()
    ga1, ga2 = torch.empty(R, G, dtype=torch.float32), torch.empty(R, G, dtype=torch.float32)
    if grad.numel():
        cpu_kernel.load().dbl_fdb_scale_grads(grad.data_ptr(), b1.data_ptr(), b2.data_ptr(), ga1.data_ptr(),
                                              ga2.data_ptr(), R, G, g, threads)
    return ga1, ga2


def fdb_round_torch(w, a1, a2):
    """``fdb_round`` in torch: the reference rule (any device, dtype and broadcastable shapes; computed in fp32).

    Rule, exactly. The levels are sorted per group (stably, so equal levels keep the code order) and w moves up
    past each midpoint m = (l_k + l_k+1) / 2 (fp32) it exceeds; a weight exactly on a midpoint goes to the level
    nearer zero. A group on a 2-bit grid (|a1| = 2|a2| != 0, step s = |a2|) instead rounds with RTN's own
    arithmetic, k = round_half_to_zero(w / s) clamped to the grid, so FDB built from a grid (``fdb_from_rtn``)
    reproduces RTN bit for bit, ties included. Three comparisons per weight: no distance tensor, no argmin.
    Off a grid this equals the nearest level by fp32 distance |w - l| except within an ulp of a midpoint;
    ``tests/test_quant.py`` checks it against that argmin, exact ties included.

    Speed (``python bench/fdb_round.py`` -> bench/results/fdb_round.json; forward + backward of a layer's w_hat,
    one thread, the embedded model's layer shapes): this torch form is 2.7-6.6x faster than the argmin form and
    1.2-1.6x faster than the training-only form train.py used to swap in, which also disagreed with the grid rule on
    5-87 weights per layer at the clip init. ``fdb_round`` runs this rule in C++ on fp32 CPU tensors and the
    layer's backward its scale gradients (``fdb_scale_grads``): forward + backward 1.3-1.4x faster than this form
    with torch's backward on 2-bit grids (the clip init) and 3.0-3.7x off them.
    """
    w, a1, a2 = w.float(), a1.float(), a2.float()
    levels = torch.stack(torch.broadcast_tensors(torch.zeros_like(a1), a2, a1, a1 + a2), -1)  # (..., 1, 4)
    srt, order = levels.sort(dim=-1, stable=True)
    on_grid = (a1.abs() == 2 * a2.abs()) & (a2 != 0)
    rank = None
    if not on_grid.all():
        mid = (srt[..., 1:] + srt[..., :-1]) / 2
        # w moves up iff w > t: t = m for m >= 0 (a tie stays below, nearer zero), the next float below m for
        # m < 0 (a tie moves up, nearer zero)
        t = torch.where(mid < 0, torch.nextafter(mid, torch.full_like(mid, -torch.inf)), mid)
        rank = sum((w > t[..., k]).to(torch.uint8) for k in range(3))
    if on_grid.any():  # rank above the lowest level = clamp(round_half_to_zero(w / s) - lowest / s, 0, 3)
        s = torch.where(on_grid, a2.abs(), torch.ones_like(a2))
        k = (round_half_to_zero(w / s) - torch.round(srt[..., 0] / s)).clamp(0, 3).to(torch.uint8)
        rank = k if rank is None else torch.where(on_grid, k, rank)
    # code (b1 b2 in binary) of each rank; equal levels (degenerate scales) all take the first one's code
    code = order.to(torch.uint8)
    for r in range(1, 4):
        code[..., r] = torch.where(srt[..., r] == srt[..., r - 1], code[..., r - 1], code[..., r])
    code = code.expand(*w.shape, 4).gather(-1, rank.long()[..., None])[..., 0]
    return code >> 1, code & 1


def dual_binarize(w, a1, a2, group_size):
    """Binaries (b1, b2), uint8 (out, in), of w for scales (a1, a2) per group: the nearest-level assignment
    onto {0, a2, a1, a1 + a2}. When a1 > -a2 > 0 this equals method.md §1's Heaviside formulas
    b1 = H(w - (a1 + a2)/2), b2 = H(-(w - a1 b1 - a2/2)) (see ``dual_binarize_heaviside``)."""
    wg = grouped(w, group_size)
    b1, b2 = fdb_round(wg, a1[..., None], a2[..., None])
    return b1.reshape(w.shape), b2.reshape(w.shape)


def dual_binarize_heaviside(w, a1, a2, group_size):
    """method.md §1 literally: b1 = H(w - (a1 + a2)/2), b2 = H(-(w - a1 b1 - a2/2)), H(x) = [x >= 0].
    Valid (equal to the nearest level) only when the level order is a2 < 0 < a1 + a2 < a1."""
    check_group_size(w.shape[1], group_size)
    A1, A2, w = expand_groups(a1.float(), group_size), expand_groups(a2.float(), group_size), w.float()
    b1 = (w - (A1 + A2) / 2 >= 0).to(torch.uint8)
    b2 = (-(w - A1 * b1 - A2 / 2) >= 0).to(torch.uint8)
    return b1, b2


def dual_binary_dequantize(b1, b2, a1, a2, group_size):
    """w_hat = a1 * b1 + a2 * b2 with (a1, a2) per group (method.md §1)."""
    check_group_size(b1.shape[1], group_size)
    return expand_groups(a1.float(), group_size) * b1.float() + expand_groups(a2.float(), group_size) * b2.float()
