"""Measurement tools for the notebooks (method.md §7): weight distributions, loss landscapes of the
quantizers' scales, bit-plane sparsity, and operation / storage counts.

Weights are (out, in) and groups are ``group_size`` consecutive input columns of one row, as in quant.py.
Everything here measures; the quantizers themselves live in ``dbllm_lab.quant`` and are reused.

Output error of a layer (method.md §7 (a)) for inputs X (tokens x in): ||W X^T - W_hat X^T||^2, relative
to ||W X^T||^2. Landscapes take a fixed random subset of rows and the first tokens to stay fast.
"""
import math

import torch
from tqdm.auto import tqdm

from .kernel import bits_per_weight as db_bits_per_weight
from .model import LINEAR_NAMES, decoder_layers, quantizable_linears
from .quant import rtn_bits_per_weight
from .quant import (_expand, _grouped, _rtn_codes, check_group_size, dequantize_rtn, dual_binarize,
                    dual_binary_dequantize, fdb_init, quantize_rtn, sign_binarize)

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
    wg = _grouped(w.detach(), group_size)
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


# ---------------------------------------------------------------------------------------------------------
# Per-layer output error and its landscape over the quantizer's scales (method.md §7 (a))
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def capture_inputs(model, windows, names, max_tokens=None):
    """Inputs of the named linear layers on ``windows`` (n, seqlen): {name: X (tokens, in) fp32}."""
    layers = quantizable_linears(model)
    missing = [n for n in names if n not in layers]
    if missing:
        raise ValueError(f"layers {missing} are not decoder linear layers of this model "
                         f"(e.g. {next(iter(layers))!r})")
    store = {n: [] for n in names}
    hooks = [layers[n].register_forward_hook(lambda m, a, o, n=n: store[n].append(a[0].reshape(-1, a[0].shape[-1])
                                                                                  .float()))
             for n in names]
    try:
        for i in range(len(windows)):
            model(windows[i:i + 1])
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v)[:max_tokens] for n, v in store.items()}


def output_error(w, w_hat, x, relative=True):
    """||W X^T - W_hat X^T||^2 for inputs x (tokens, in); relative: divided by ||W X^T||^2."""
    if x.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x must be (tokens, in={w.shape[1]}), got {tuple(x.shape)}")
    xt = x.float().T
    err = ((w.float() - w_hat.float()) @ xt).pow(2).sum()
    if relative:
        err = err / (w.float() @ xt).pow(2).sum()
    return float(err)


def _rows(w, max_rows, seed=0):
    """A fixed random subset of ``max_rows`` rows (the error is a sum over rows, so this estimates the
    relative error's numerator and denominator alike)."""
    if max_rows is None or w.shape[0] <= max_rows:
        return w.detach().float()
    idx = torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(seed))[:max_rows].sort().values
    return w.detach().float()[idx]


def fdb_error(w, x, a1, a2, group_size):
    """Relative output error of FDB with scales (a1, a2); binaries re-chosen as the nearest level (§1)."""
    b1, b2 = dual_binarize(w, a1, a2, group_size)
    return output_error(w, dual_binary_dequantize(b1, b2, a1, a2, group_size), x)


def sign_scaled(w, group_size, m):
    """Sign binarization with its scale multiplied by m: mu + m * alpha * sign(w - mu) (signs fixed)."""
    mu = _expand(_grouped(w, group_size).mean(-1), group_size)
    return mu + m * (sign_binarize(w, group_size).float() - mu)


def rtn2_scaled(w, group_size, m, grid=None):
    """2-bit uniform with the step multiplied by m (MSE-clip grid, zero point fixed, codes re-rounded).
    ``grid`` = (scale, zero) from ``quantize_rtn`` to skip recomputing it."""
    scale, zero = grid if grid is not None else quantize_rtn(w, 2, group_size, clip_search=True)[1:]
    s = scale * m
    q = _rtn_codes(_grouped(w, group_size), s, zero, 2)
    return ((q - zero[..., None]) * s[..., None]).reshape(w.shape)


def layer_landscape(w, x, group_size=64, multipliers=None, grid=None, init="clip", orientation="per-group",
                    max_rows=128, max_tokens=512, seed=0, progress=False):
    """Loss landscape of one layer (method.md §7 (a)): relative output error ||WX - W_hat X||^2 / ||WX||^2
    for inputs x (tokens, in) as the quantizer's scales are multiplied.

    - FDB: 2-D grid over (m1, m2) with a1 -> m1 * a1, a2 -> m2 * a2 (from ``fdb_init``), binaries re-chosen;
      1-D curves along a1 only, a2 only and both (m1 = m2).
    - sign: its scale alpha -> m * alpha (signs fixed); 2-bit uniform: its step s -> m * s (codes re-rounded).
    ``multipliers`` (1-D curves) default to 0.25..1.75 in 21 points, ``grid`` (each axis of the 2-D grid) to
    0.25..1.75 in 11. ``max_rows`` rows (a fixed random subset) and the first ``max_tokens`` tokens keep it
    fast. Returns a dict of lists plus ``basin`` (abs tolerance 0.05) and ``basin_rel`` (10 %) widths.
    """
    ms = torch.linspace(0.25, 1.75, 21) if multipliers is None else torch.as_tensor(multipliers, dtype=torch.float32)
    gs = torch.linspace(0.25, 1.75, 11) if grid is None else torch.as_tensor(grid, dtype=torch.float32)
    if ms.dim() != 1 or len(ms) < 3 or gs.dim() != 1 or len(gs) < 2 or (ms <= 0).any() or (gs <= 0).any():
        raise ValueError("multipliers need >= 3 and grid >= 2 positive values (1-D), e.g. torch.linspace(0.25, 1.75, 21)")
    check_group_size(w.shape[1], group_size)
    if x.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x must be (tokens, in={w.shape[1]}), got {tuple(x.shape)}")
    w, x = _rows(w, max_rows, seed), x[:max_tokens].float()
    a1, a2 = fdb_init(w, group_size, init, orientation)
    rgrid = quantize_rtn(w, 2, group_size, clip_search=True)[1:]
    fdb_grid = torch.zeros(len(gs), len(gs))
    pts = [(i, j) for i in range(len(gs)) for j in range(len(gs))]
    for i, j in tqdm(pts, desc="FDB grid", disable=not progress):
        fdb_grid[i, j] = fdb_error(w, x, a1 * gs[i], a2 * gs[j], group_size)
    curves = {
        "fdb_both": [fdb_error(w, x, a1 * m, a2 * m, group_size) for m in ms],
        "fdb_a1": [fdb_error(w, x, a1 * m, a2, group_size) for m in ms],
        "fdb_a2": [fdb_error(w, x, a1, a2 * m, group_size) for m in ms],
        "sign": [output_error(w, sign_scaled(w, group_size, float(m)), x) for m in ms],
        "rtn2": [output_error(w, rtn2_scaled(w, group_size, float(m), rgrid), x) for m in ms],
    }
    return {"multipliers": ms.tolist(), "grid": gs.tolist(), "fdb_grid": fdb_grid.tolist(), "curves": curves,
            "rows": w.shape[0], "tokens": x.shape[0],
            "argmin": {k: float(ms[min(range(len(v)), key=v.__getitem__)]) for k, v in curves.items()},
            "basin": {k: basin_width(ms, v) for k, v in curves.items()},
            "basin_rel": {k: basin_width(ms, v, tol=0.1, mode="rel") for k, v in curves.items()}}


def basin_width(multipliers, errors, tol=0.05, mode="abs"):
    """Width of the multiplier interval around the minimum where the error stays within tolerance.

    mode="abs": error <= min + tol (tol in the same units as the error, e.g. 0.05 of ||WX||^2 for relative
    errors: every quantizer is allowed the same loss increase); mode="rel": error <= (1 + tol) * min.
    The interval is the contiguous run of grid points containing the minimum, widened by linear
    interpolation to the crossing points (an interval touching the grid's end is cut there).
    """
    if mode not in ("abs", "rel"):
        raise ValueError(f"mode={mode!r} is not supported; use 'abs' or 'rel'")
    if not tol > 0:
        raise ValueError(f"tol={tol!r} must be positive")
    m = [float(v) for v in multipliers]
    e = [float(v) for v in errors]
    if len(m) != len(e) or len(m) < 2:
        raise ValueError(f"need equally long multipliers and errors (>= 2), got {len(m)} and {len(e)}")
    k = min(range(len(e)), key=e.__getitem__)
    limit = e[k] + tol if mode == "abs" else e[k] * (1 + tol)
    lo = k
    while lo > 0 and e[lo - 1] <= limit:
        lo -= 1
    hi = k
    while hi < len(e) - 1 and e[hi + 1] <= limit:
        hi += 1
    left, right = m[lo], m[hi]
    if lo > 0:  # interpolate the crossing between lo - 1 (outside) and lo (inside)
        left = m[lo] - (m[lo] - m[lo - 1]) * (limit - e[lo]) / (e[lo - 1] - e[lo])
    if hi < len(e) - 1:
        right = m[hi] + (m[hi + 1] - m[hi]) * (limit - e[hi]) / (e[hi + 1] - e[hi])
    return right - left


def basin_area(grid, errors2d, tol=0.05, mode="abs"):
    """Area (in multiplier units^2) of the 2-D grid cells whose error is within tolerance of the minimum."""
    e = torch.as_tensor(errors2d, dtype=torch.float64)
    g = torch.as_tensor(grid, dtype=torch.float64)
    limit = e.min() + tol if mode == "abs" else e.min() * (1 + tol)
    step = float(g[1] - g[0])
    return float((e <= limit).sum()) * step * step


# ---------------------------------------------------------------------------------------------------------
# Model loss along perturbations of all FDB scales (method.md §7 (b))
# ---------------------------------------------------------------------------------------------------------
class ScaleLandscape:
    """Model loss on a batch while every FDB scale of the chosen layers is perturbed together:
    a1 -> (1 + u) a1, a2 -> (1 + v) a2 (binaries re-chosen), or sign binarization's alpha -> (1 + u) alpha.

    Layers of ``blocks`` (None = all) are quantized from the model's own weights (``fdb_init``); the
    hidden states entering the first perturbed block are computed once and cached, so each point runs only
    the perturbed blocks onward. The model's weights are restored by ``restore()`` (also on ``with``-exit).
    """

    def __init__(self, model, windows, group_size=64, init="clip", orientation="per-group", blocks=None,
                 progress=True):
        from .calib import block_forward, capture_block0_inputs
        self.model, self.windows, self.group_size = model, windows, group_size
        self._forward_block = block_forward
        self.layers = select_layers(model, blocks)
        if not self.layers:
            raise ValueError(f"blocks={blocks!r} selects no layer")
        for m in self.layers.values():
            check_group_size(m.in_features, group_size)
        self.first = min(layer_block(n) for n in self.layers)
        self.orig, self.a1, self.a2, self.sign_mu, self.sign_dev = {}, {}, {}, {}, {}
        for n, m in tqdm(self.layers.items(), desc="FDB init", disable=not progress):
            w = m.weight.detach().clone()
            self.orig[n] = w
            self.a1[n], self.a2[n] = fdb_init(w, group_size, init, orientation)
        with torch.no_grad():
            inputs, self.kwargs = capture_block0_inputs(model, windows)
            for block in decoder_layers(model)[:self.first]:
                inputs = [block_forward(block, h, self.kwargs) for h in inputs]
        self.hidden = inputs

    @torch.no_grad()
    def loss(self):
        """Mean next-token cross-entropy (nats) of the windows under the current weights."""
        total, count = 0.0, 0
        for h, ids in zip(self.hidden, self.windows):
            for block in decoder_layers(self.model)[self.first:]:
                h = self._forward_block(block, h, self.kwargs)
            logits = self.model.lm_head(self.model.model.norm(h))[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits.float(), ids[1:].to(logits.device),
                                                             reduction="sum"))
            count += len(ids) - 1
        return total / count

    @torch.no_grad()
    def set_fdb(self, u, v):
        for n, m in self.layers.items():
            a1, a2 = self.a1[n] * (1 + u), self.a2[n] * (1 + v)
            b1, b2 = dual_binarize(self.orig[n], a1, a2, self.group_size)
            m.weight.copy_(dual_binary_dequantize(b1, b2, a1, a2, self.group_size))

    @torch.no_grad()
    def set_sign(self, u):
        for n, m in self.layers.items():
            if n not in self.sign_mu:
                w = self.orig[n]
                self.sign_mu[n] = _expand(_grouped(w, self.group_size).mean(-1), self.group_size)
                self.sign_dev[n] = sign_binarize(w, self.group_size).float() - self.sign_mu[n]
            m.weight.copy_(self.sign_mu[n] + (1 + u) * self.sign_dev[n])

    @torch.no_grad()
    def restore(self):
        for n, m in self.layers.items():
            m.weight.copy_(self.orig[n])

    def fp_loss(self):
        self.restore()
        return self.loss()

    def fdb_grid(self, us, vs, progress=True):
        """Loss at every (u, v): list of rows, row i for us[i]."""
        out = []
        for u in tqdm(list(us), desc="FDB (u, v) grid", disable=not progress):
            row = []
            for v in vs:
                self.set_fdb(float(u), float(v))
                row.append(self.loss())
            out.append(row)
        self.restore()
        return out

    def sign_curve(self, us, progress=True):
        out = []
        for u in tqdm(list(us), desc="sign alpha", disable=not progress):
            self.set_sign(float(u))
            out.append(self.loss())
        self.restore()
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()


# ---------------------------------------------------------------------------------------------------------
# Bit-plane sparsity (method.md §7, last item)
# ---------------------------------------------------------------------------------------------------------
def bitplane_sparsity(b1, b2):
    """Fractions of ones in b1 and b2, of weights with both bits zero, and one-bits per weight
    ((ones_b1 + ones_b2), between 0 and 2)."""
    if b1.shape != b2.shape:
        raise ValueError(f"b1 and b2 shapes differ: {tuple(b1.shape)} vs {tuple(b2.shape)}")
    if b1.numel() == 0:
        raise ValueError("empty bit-planes")
    if b1.max() > 1 or b2.max() > 1 or b1.min() < 0 or b2.min() < 0:
        raise ValueError("bit-planes must hold only 0 and 1")
    o1, o2 = b1.float().mean(), b2.float().mean()
    return {"ones_b1": float(o1), "ones_b2": float(o2),
            "both_zero": float(((b1 == 0) & (b2 == 0)).float().mean()), "ones_per_weight": float(o1 + o2)}


def rtn2_code_sparsity(w, group_size, clip_search=True):
    """The same fractions for a plain 2-bit code: the bits of the unsigned integer q = 0..3 of asymmetric
    2-bit RTN (bit 0 = q & 1, bit 1 = q >> 1). Near-zero weights get q = z (1 or 2): one bit set."""
    q, _, _ = quantize_rtn(w, 2, group_size, clip_search)
    return bitplane_sparsity(q & 1, q >> 1)


def sparsity_table(layers, group_size=64, init="clip", orientation="per-group", progress=True):
    """Per layer of ``layers`` ({name: nn.Linear}): FDB bit-plane sparsity (prefix ``fdb_``) and the plain
    2-bit code's (prefix ``rtn2_``), plus the FDB relative weight error."""
    rows = []
    for name, m in tqdm(layers.items(), desc="sparsity", disable=not progress):
        w = m.weight.detach()
        a1, a2 = fdb_init(w, group_size, init, orientation)
        b1, b2 = dual_binarize(w, a1, a2, group_size)
        rows.append({"layer": name, "block": layer_block(name), "type": layer_type(name),
                     "out": m.out_features, "in": m.in_features,
                     **{f"fdb_{k}": v for k, v in bitplane_sparsity(b1, b2).items()},
                     **{f"rtn2_{k}": v for k, v in rtn2_code_sparsity(w, group_size).items()}})
    return rows


FDB_CHOICES = (("minmax", "fixed"), ("minmax", "per-group"), ("clip", "fixed"), ("clip", "per-group"))


def init_choice_table(layers, xs, group_size=64, progress=True):
    """Per layer of ``layers`` and per quantizer: relative weight error ||W - W_hat||^2 / ||W||^2, relative
    output error on inputs ``xs[name]`` (tokens, in), and one-bits per weight. Quantizers: sign, 2-bit RTN
    (clip search; bits of the code q) and FDB for every (init, orientation) in ``FDB_CHOICES``."""
    rows = []
    for name, m in tqdm(layers.items(), desc="init choices", disable=not progress):
        w = m.weight.detach().float()
        base = {"layer": name, "block": layer_block(name), "type": layer_type(name)}
        q, scale, zero = quantize_rtn(w, 2, group_size, clip_search=True)
        cands = [("sign", sign_binarize(w, group_size).float(), None),
                 ("rtn2 clip", dequantize_rtn(q, scale, zero, group_size), bitplane_sparsity(q & 1, q >> 1))]
        for init, orient in FDB_CHOICES:
            a1, a2 = fdb_init(w, group_size, init, orient)
            b1, b2 = dual_binarize(w, a1, a2, group_size)
            cands.append((f"fdb {init}/{orient}", dual_binary_dequantize(b1, b2, a1, a2, group_size),
                          bitplane_sparsity(b1, b2)))
        for method, w_hat, sp in cands:
            rows.append({**base, "method": method,
                         "weight_rel_error": float((w - w_hat).pow(2).sum() / w.pow(2).sum()),
                         "output_rel_error": output_error(w, w_hat, xs[name]),
                         "ones_per_weight": sp["ones_per_weight"] if sp else float("nan"),
                         "both_zero": sp["both_zero"] if sp else float("nan")})
    return rows


# ---------------------------------------------------------------------------------------------------------
# Operation and storage counts
# ---------------------------------------------------------------------------------------------------------
FORMATS = ("fp16", "int2", "sign", "db-dense", "db-sparse")
COUNTING_RULE = (
    "Per token (one activation row) for a linear layer of out N x in K with G = K / g groups per row. "
    "fp16: N*K multiplies + N*K adds (one MAC per weight). "
    "int2 (asymmetric 2-bit codes q in 0..3): N*K multiplies q*x + N*K adds, then per (row, group) "
    "1 scale multiply + 1 zero-point multiply (z * sum_group x) + 2 adds, plus K adds for the group sums of x "
    "(shared by all rows). "
    "sign (w = alpha * (+-1) + mu): N*K adds (+-x), per (row, group) 2 multiplies (alpha, mu) + 2 adds, plus K adds. "
    "db-dense (w = a1 b1 + a2 b2): every weight costs 2 masked adds (one per bit-plane) = 2*N*K adds, "
    "per (row, group) 2 multiplies (a1, a2) + 2 adds. "
    "db-sparse: as db-dense, but only the one-bits add (ones(b1) + ones(b2) adds). "
    "FLOPs = multiplies + adds. Bit-ops: a multiply of a w-bit weight code by a 16-bit activation costs 16*w "
    "(16*16 for fp16 weights and fp16 scales), an add costs 16; binary masked adds cost 16.")


def linear_ops(out_features, in_features, group_size, fmt, ones=None, tokens=1):
    """Multiplies, adds, FLOPs and bit-ops of one linear layer for ``tokens`` activation rows under
    ``COUNTING_RULE``. ``ones`` (db-sparse only): the number of one-bits in b1 plus b2."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r} is not supported; use one of {FORMATS}")
    for k, v in (("out_features", out_features), ("in_features", in_features), ("tokens", tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{k}={v!r} must be a positive integer")
    check_group_size(in_features, group_size)
    N, K = out_features, in_features
    NG = N * (K // group_size)
    if fmt == "db-sparse":
        if ones is None or not 0 <= ones <= 2 * N * K:
            raise ValueError(f"fmt='db-sparse' needs ones = one-bits in b1 + b2, between 0 and {2 * N * K}; got {ones!r}")
    elif ones is not None:
        raise ValueError(f"ones is only used with fmt='db-sparse', not {fmt!r}")
    if fmt == "fp16":
        mults, adds, bitops = N * K, N * K, N * K * (16 * 16 + 16)
    elif fmt == "int2":
        mults, adds = N * K + 2 * NG, N * K + 2 * NG + K
        bitops = N * K * (16 * 2 + 16) + 2 * NG * 16 * 16 + (2 * NG + K) * 16
    elif fmt == "sign":
        mults, adds = 2 * NG, N * K + 2 * NG + K
        bitops = 2 * NG * 16 * 16 + adds * 16
    else:
        inner = 2 * N * K if fmt == "db-dense" else ones
        mults, adds = 2 * NG, inner + 2 * NG
        bitops = 2 * NG * 16 * 16 + adds * 16
    t = tokens
    return {"format": fmt, "mults": mults * t, "adds": adds * t, "flops": (mults + adds) * t, "bitops": bitops * t}


def linear_bytes(out_features, in_features, group_size, fmt):
    """Storage of one linear layer in bytes, scales included: fp16 2 bytes/weight; int2
    ``quant.rtn_bits_per_weight(2, g)`` (codes + fp16 scale + 2-bit zero per group); sign 1 bit + fp16
    alpha and mu per group; db-dense / db-sparse ``kernel.bits_per_weight(g)`` (2 planes + 2 fp16 scales)."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r} is not supported; use one of {FORMATS}")
    check_group_size(in_features, group_size)
    bpw = {"fp16": 16.0, "int2": rtn_bits_per_weight(2, group_size), "sign": 1 + 32 / group_size}.get(
        fmt, db_bits_per_weight(group_size))
    return bpw * out_features * in_features / 8


def model_shapes(model):
    """[(name, out, in)] of the decoder linear layers, and the count of other (full-precision) parameters
    (embeddings, lm_head if untied, norms)."""
    layers = quantizable_linears(model)
    shapes = [(n, m.out_features, m.in_features) for n, m in layers.items()]
    n_lin = sum(o * i for _, o, i in shapes)
    n_all = sum(p.numel() for p in model.parameters())  # tied embeddings are counted once
    return shapes, n_all - n_lin


# Public architecture dims (Hugging Face config.json of each model): shapes only, no results.
LLAMA_CONFIGS = {
    "llama-7b": dict(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000),
    "llama-13b": dict(hidden=5120, intermediate=13824, layers=40, heads=40, kv_heads=40, vocab=32000),
    "llama-2-70b": dict(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=32000),
}


def llama_shapes(name):
    """[(name, out, in)] of the decoder linear layers of a LLaMA config in ``LLAMA_CONFIGS`` and the count of
    other parameters (untied embedding + lm_head, RMSNorm weights)."""
    if name not in LLAMA_CONFIGS:
        raise ValueError(f"{name!r} is not a known config; use one of {tuple(LLAMA_CONFIGS)}")
    c = LLAMA_CONFIGS[name]
    h, i, kv = c["hidden"], c["intermediate"], c["kv_heads"] * c["hidden"] // c["heads"]
    per = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
           "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    shapes = [(f"model.layers.{b}.{n}", *per[n]) for b in range(c["layers"]) for n in LINEAR_NAMES]
    other = 2 * c["vocab"] * h + (2 * c["layers"] + 1) * h
    return shapes, other


def cost_table(shapes, group_size=64, ones_fraction=None, other_params=0, tokens=1):
    """Totals over ``shapes`` [(name, out, in)] for every format in ``FORMATS``: FLOPs, bit-ops, multiplies,
    adds per ``tokens`` tokens, and bytes of the linear layers and of the whole model (other parameters in fp16).

    ``ones_fraction``: one-bits per weight (ones_b1 + ones_b2, in [0, 2]) for db-sparse, a float used for every
    layer or {name: float}; None leaves db-sparse out.
    """
    rows = []
    for fmt in FORMATS:
        if fmt == "db-sparse" and ones_fraction is None:
            continue
        tot = {"mults": 0, "adds": 0, "flops": 0, "bitops": 0, "bytes_linear": 0.0}
        for name, o, i in shapes:
            ones = None
            if fmt == "db-sparse":
                f = ones_fraction[name] if isinstance(ones_fraction, dict) else ones_fraction
                if not 0 <= f <= 2:
                    raise ValueError(f"ones_fraction={f!r} for {name} must be in [0, 2] (ones_b1 + ones_b2)")
                ones = round(f * o * i)
            c = linear_ops(o, i, group_size, fmt, ones, tokens)
            for k in ("mults", "adds", "flops", "bitops"):
                tot[k] += c[k]
            tot["bytes_linear"] += linear_bytes(o, i, group_size, fmt)
        tot["bytes_model"] = tot["bytes_linear"] + 2 * other_params
        rows.append({"format": fmt, **tot})
    fp = rows[0]
    for r in rows:
        r["flops_vs_fp16"] = fp["flops"] / r["flops"]
        r["bitops_vs_fp16"] = fp["bitops"] / r["bitops"]
        r["storage_vs_fp16"] = fp["bytes_model"] / r["bytes_model"]
    return rows


def time_ms(fn, repeats=5, warmup=1):
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` calls after ``warmup`` calls."""
    import statistics
    import time
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
