"""Chapters 02-03 (the FDB quantizer, loss landscapes): a layer's output error under a quantizer, how it changes as
the quantizer's scales are multiplied (method.md §7 (a)), the model loss along perturbations of all FDB scales
(§7 (b)), and the table comparing FDB's init choices.

Output error of a layer for inputs X (tokens x in): ||W X^T - W_hat X^T||^2, relative to ||W X^T||^2. Landscapes
take a fixed random subset of rows and the first tokens to stay fast.
"""
import torch
from tqdm.auto import tqdm

from .costs import bitplane_sparsity
from .model import decoder_layers, quantizable_linears
from .quant import (check_group_size, dequantize_rtn, dual_binarize, dual_binary_dequantize, expand_groups, fdb_init,
                    grouped, quantize_rtn, rtn_codes, sign_binarize)
from .weights import layer_block, layer_type, select_layers


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


def sample_rows(w, max_rows, seed=0):
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
    mu = expand_groups(grouped(w, group_size).mean(-1), group_size)
    return mu + m * (sign_binarize(w, group_size).float() - mu)


def rtn2_scaled(w, group_size, m, grid=None):
    """2-bit uniform with the step multiplied by m (MSE-clip grid, zero point fixed, codes re-rounded).
    ``grid`` = (scale, zero) from ``quantize_rtn`` to skip recomputing it."""
    scale, zero = grid if grid is not None else quantize_rtn(w, 2, group_size, clip_search=True)[1:]
    s = scale * m
    q = rtn_codes(grouped(w, group_size), s, zero, 2)
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
    w, x = sample_rows(w, max_rows, seed), x[:max_tokens].float()
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
    interpolation to the crossing points (an interval touching the grid's end is cut there: see
    ``basin_interval``, which says so).
    """
    lo, hi, _, _ = basin_interval(multipliers, errors, tol, mode)
    return hi - lo


def basin_interval(multipliers, errors, tol=0.05, mode="abs"):
    """(left, right, cut_left, cut_right) of the basin ``basin_width`` measures; ``cut_left`` / ``cut_right``
    are True where the basin reaches the first / last grid point, so its true edge lies outside the scan (the
    width is then a lower bound). A minimum at a grid end has that side cut."""
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
    return left, right, lo == 0, hi == len(e) - 1


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
                self.sign_mu[n] = expand_groups(grouped(w, self.group_size).mean(-1), self.group_size)
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
