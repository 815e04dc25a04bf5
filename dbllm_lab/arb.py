"""ARB-LLM 1-bit post-training baselines (method.md §4): BiLLM-style, ARB, ARB-X and ARB-RC, each with or
without CGB.

A layer (``arb_layer``) is quantized in blocks of ``blocksize`` = 128 input columns, left to right:

1. Partition the block (BiLLM). Columns are ranked by Hessian saliency sum_i w_ij^2 / U_jj^2, with U the upper
   Cholesky factor of the damped H^-1 (the diagonal GPTQ divides by; BiLLM's code uses the same). The top-k columns
   are "salient" and get the second-order form; k <= max_salient (a grid, ``SALIENT_GRID``) is chosen by BiLLM's
   proxy (second-order residual error of salient + rest). The remaining weights are split by |w| at a searched threshold into a dense
   and a sparse group, each first order. With CGB (column-group bitmap) the salient columns are split by |w| the
   same way, both halves second order.
2. Fit every group (each row has its own parameters per group and block):
     billm  : residual binarization, no refinement: mu = mean, alpha = mean|W - mu|, B = sign(W - mu);
              second order binarizes the residual the same way (mu = mu1 + mu2).
     arb    : billm, then ``iters`` = 15 alternating closed-form updates (method.md §4):
              mu = mean(W - alpha B), alpha = mean(B (W - mu)), B = sign(W - mu); second order: mu, alpha1,
              alpha2 refit in turn, then each weight's sign pair is the nearest of the four levels
              mu +- alpha1 +- alpha2. Every step is an exact minimiser, so the error never increases.
     arb-x  : arb, then mu and alpha of all groups of a row refit jointly in closed form with B fixed, to minimise
              the block's output error (w - w_hat)^T S (w - w_hat), S = the block of X^T X (H up to a factor).
     arb-rc : no mean; w_hat_ij = a_r,i a_c,j B_ij (second order: two such terms), B = sign(W), row and column
              scales alternately refit by least squares (second order: sign pairs nearest of four).
3. Compensate (GPTQ): the block error E = W_b - Q_b is pushed onto the later columns. For a block quantized at
   once, GPTQ's column loop gives Err = E U_bb^-1 (triangular solve) and W[:, later] -= Err U_b,later.
   Damping 0.01 * mean(diag H) (``gptq.inverse_hessian_cholesky``).

Storage (``BITS_RULE``), counted per layer and reported as bits per weight of the decoder's linear layers:
1 sign bit per weight + 1 more per salient weight (second plane) + 1 group-bitmap bit per weight of a magnitude-split
region (non-salient weights; with CGB also salient) + 1 salient-column bit per input column + 16 bits per fp16
parameter: per row, block and group mu, alpha (second order mu, alpha1, alpha2); for arb-rc a row scale per row and
a column scale per column of the group, per term.
"""
import torch

from .gptq import inverse_hessian_cholesky
from .layers import FakeQuantLinear

VARIANTS = ("billm", "arb", "arb-x", "arb-rc")
# Candidate salient-column counts per 128-column block (BiLLM tries every k < 30; a grid keeps the search cheap on CPU)
SALIENT_GRID = (1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 64)
BITS_RULE = ("1 sign bit per weight + 1 per salient weight (2nd order) + 1 group-bitmap bit per weight in a "
             "magnitude-split region (non-salient; salient too with CGB) + 1 salient-column bit per input column + "
             "16 bits per fp16 parameter (per row, 128-column block and group: mu and alpha, 2nd order mu, alpha1, "
             "alpha2; arb-rc: row scale per row + column scale per column, per term); over the decoder linear "
             "layers, embeddings and lm_head stay full precision")


def check_variant(method):
    if method not in VARIANTS:
        raise ValueError(f"ARB variant {method!r} is not supported; use one of {VARIANTS}")


def _sign(x):
    """sign with sign(0) = +1, so every weight gets a level."""
    return (x >= 0).to(x.dtype) * 2 - 1


def _mask(W, mask):
    return torch.ones_like(W) if mask is None else mask.to(W.dtype)


def _rowmean(x, m):
    """Mean of each row over the mask; works on a batch (..., rows, cols) of regions too."""
    return (x * m).sum(-1) / m.sum(-1).clamp_min(1)


def _ls(num, den):
    """num / den, 0 where den = 0 (an empty group keeps a zero scale)."""
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))


def masked_error(W, W_hat, mask=None):
    """Squared reconstruction error sum over the masked weights."""
    return float((((W - W_hat) ** 2) * _mask(W, mask)).sum())


# ---- first and second order with a row mean (billm / arb) -------------------------------------------------------

def binarize_first(W, mask=None):
    """BiLLM residual binarization, one order: mu = row mean, alpha = mean|W - mu|, B = sign(W - mu).
    Returns (mu, alpha, B), mu and alpha of shape (rows,)."""
    m = _mask(W, mask)
    mu = _rowmean(W, m)
    return mu, _rowmean((W - mu[..., None]).abs(), m), _sign(W - mu[..., None])


def reconstruct(mu, alphas, Bs, mask=None):
    """w_hat = (mu + sum_k alpha_k B_k) on the mask (0 elsewhere)."""
    W_hat = mu[..., None] + sum(a[..., None] * B for a, B in zip(alphas, Bs))
    return W_hat * _mask(W_hat, mask)


def arb_first(W, mask=None, iters=15, trace=False):
    """ARB, first order (method.md §4): from the BiLLM init, repeat ``iters`` times
    mu = mean(W - alpha B), alpha = mean(B (W - mu)), B = sign(alpha) sign(W - mu) (= sign(W - mu) as alpha > 0).
    Each update is the exact minimiser of its variable, so the masked error never increases (ARB Theorem 1).
    Returns (mu, alpha, B), plus the error after init and after every iteration if ``trace``."""
    m = _mask(W, mask)
    mu, alpha, B = binarize_first(W, m)
    errs = [masked_error(W, reconstruct(mu, [alpha], [B], m), m)] if trace else None
    for _ in range(iters):
        mu = _rowmean(W - alpha[:, None] * B, m)
        alpha = _rowmean(B * (W - mu[:, None]), m)
        B = _sign(W - mu[:, None]) * _sign(alpha)[:, None]
        if trace:
            errs.append(masked_error(W, reconstruct(mu, [alpha], [B], m), m))
    return (mu, alpha, B, errs) if trace else (mu, alpha, B)


def nearest_sign_pair(R, a1, a2):
    """Signs (B1, B2) in {-1, +1} minimising |R - a1 B1 - a2 B2| per weight: the nearest of the four levels
    +-a1 +-a2. ``a1``, ``a2``: per-row (rows,) or per-weight tensors broadcastable to R."""
    a1 = a1[:, None] if a1.dim() == 1 else a1
    a2 = a2[:, None] if a2.dim() == 1 else a2
    # the levels are +-p, +-q with p = a1 + a2 (B1 = B2), q = a1 - a2 (B1 = -B2); the nearest one has the sign of R
    # and the magnitude |p| or |q| nearest to |R|
    p, q, r = a1 + a2, a1 - a2, R.abs()
    use_p = (r - p.abs()).abs() <= (r - q.abs()).abs()
    B1 = _sign(R) * torch.where(use_p, _sign(p), _sign(q))
    return B1, torch.where(use_p, B1, -B1)


def binarize_second(W, mask=None):
    """BiLLM second order: binarize, then binarize the residual. Returns (mu, a1, a2, B1, B2), mu = mu1 + mu2."""
    m = _mask(W, mask)
    mu1, a1, B1 = binarize_first(W, m)
    mu2, a2, B2 = binarize_first(W - mu1[..., None] - a1[..., None] * B1, m)
    return mu1 + mu2, a1, a2, B1, B2


def arb_second(W, mask=None, iters=15, trace=False):
    """ARB, second order (salient weights): w_hat = mu + a1 B1 + a2 B2. From the BiLLM init, repeat: mu, a1, a2 refit
    in turn (each the least-squares optimum given the rest), then (B1, B2) = nearest of the four levels. Error never
    increases. Returns (mu, a1, a2, B1, B2) (+ error trace)."""
    m = _mask(W, mask)
    mu, a1, a2, B1, B2 = binarize_second(W, m)
    errs = [masked_error(W, reconstruct(mu, [a1, a2], [B1, B2], m), m)] if trace else None
    for _ in range(iters):
        mu = _rowmean(W - a1[:, None] * B1 - a2[:, None] * B2, m)
        a1 = _rowmean(B1 * (W - mu[:, None] - a2[:, None] * B2), m)
        a2 = _rowmean(B2 * (W - mu[:, None] - a1[:, None] * B1), m)
        B1, B2 = nearest_sign_pair(W - mu[:, None], a1, a2)
        if trace:
            errs.append(masked_error(W, reconstruct(mu, [a1, a2], [B1, B2], m), m))
    return (mu, a1, a2, B1, B2, errs) if trace else (mu, a1, a2, B1, B2)


# ---- ARB-RC: row scale x column scale, no mean ------------------------------------------------------------------

def rc_reconstruct(ar, ac, Bs, mask=None):
    """w_hat = sum_k (a_r,k a_c,k^T) ⊙ B_k on the mask."""
    W_hat = sum(torch.outer(r, c) * B for r, c, B in zip(ar, ac, Bs))
    return W_hat * _mask(W_hat, mask)


def arb_rc(W, mask=None, order=1, iters=15, trace=False):
    """ARB-RC (method.md §4): w_hat_ij = sum_k a_r,k,i a_c,k,j B_k,ij, no mean. Init per order on the residual R:
    a_r = mean_j |R|, a_c = mean_i |R| / a_r, B = sign(R). Then ``iters`` rounds of: for each term, a_r (given a_c,
    B) and a_c (given a_r, B) by least squares; B re-chosen as the nearest level (order 1: sign(W a_r a_c); order 2:
    nearest of four). Error never increases. Returns (ar, ac, Bs) lists (+ error trace)."""
    if order not in (1, 2):
        raise ValueError(f"order={order!r} must be 1 or 2")
    m = _mask(W, mask)
    ar, ac, Bs = [], [], []
    R = W * m
    for _ in range(order):
        r = _rowmean(R.abs(), m)
        c = _ls((R.abs() / r.clamp_min(1e-30)[:, None] * m).sum(0), m.sum(0))
        ar.append(r), ac.append(c), Bs.append(_sign(R))
        R = R - torch.outer(r, c) * Bs[-1] * m
    errs = [masked_error(W, rc_reconstruct(ar, ac, Bs, m), m)] if trace else None
    for _ in range(iters):
        for k in range(order):
            T = W - sum(torch.outer(ar[j], ac[j]) * Bs[j] for j in range(order) if j != k)
            P = ac[k][None, :] * Bs[k] * m
            ar[k] = _ls((P * T).sum(1), (P * P).sum(1))
            P = ar[k][:, None] * Bs[k] * m
            ac[k] = _ls((P * T).sum(0), (P * P).sum(0))
        if order == 1:
            Bs[0] = _sign(W * torch.outer(ar[0], ac[0]))
        else:
            Bs = list(nearest_sign_pair(W, torch.outer(ar[0], ac[0]), torch.outer(ar[1], ac[1])))
        if trace:
            errs.append(masked_error(W, rc_reconstruct(ar, ac, Bs, m), m))
    return (ar, ac, Bs, errs) if trace else (ar, ac, Bs)


# ---- ARB-X: closed-form mu, alpha under S = X^T X, B fixed --------------------------------------------------------

def output_error(W, W_hat, S):
    """sum_i (w_i - w_hat_i)^T S (w_i - w_hat_i) = ||(W - W_hat) X^T||^2 for S = X^T X."""
    D = W - W_hat
    return float(((D @ S) * D).sum())


def refit_x(W, S, bases, coefs):
    """ARB-X: with the bases fixed (masks and masked signs of every group, (p, rows, cols)), choose each row's
    coefficients theta (mu's and alpha's, (rows, p)) minimising (w - Phi theta)^T S (w - Phi theta):
    theta = (Phi^T S Phi)^+ Phi^T S w (least squares, rank-deficient safe). A row keeps ``coefs`` where the solve
    does not lower its error (round-off guard), so the output error never exceeds the input one."""
    Phi = bases.permute(1, 2, 0)                                   # rows, cols, p
    SPhi = torch.matmul(S, Phi)                                    # rows, cols, p
    G = Phi.transpose(1, 2) @ SPhi                                 # rows, p, p
    b = (SPhi.transpose(1, 2) @ W[:, :, None])[..., 0]             # rows, p   (S symmetric)
    theta = torch.linalg.lstsq(G.double(), b.double()[..., None], driver="gelsd").solution[..., 0].to(W.dtype)

    def err(t):  # per-row error up to the constant w^T S w
        return ((G @ t[..., None])[..., 0] * t).sum(1) - 2 * (b * t).sum(1)
    keep = err(theta) > err(coefs)
    return torch.where(keep[:, None], coefs, theta)


# ---- partition and one block --------------------------------------------------------------------------------------

def _init_error(W, m, order):
    """Error of the BiLLM init (no refinement) of a batch of regions m (..., rows, cols) -> (...,), used by the
    partition searches."""
    if order == 1:  # sum (x - alpha sign x)^2 = sum x^2 - n alpha^2 with x = W - mu, alpha = mean|x|
        X = (W - _rowmean(W, m)[..., None]) * m
        return (X ** 2).sum((-1, -2)) - (m.sum(-1) * _rowmean(X.abs(), m) ** 2).sum(-1)
    mu, a1, a2, B1, B2 = binarize_second(W, m)
    return (((W - reconstruct(mu, [a1, a2], [B1, B2])) ** 2) * m).sum((-1, -2))


def _search_rows(W, search_rows):
    """Evenly spaced rows (at most ``search_rows``) on which the partition searches score their candidates."""
    return W[::-(-W.shape[0] // search_rows)]


def magnitude_split(W, order, steps=40, search_rows=256):
    """Split a region by |w| <= t (dense) / > t (sparse), t = f * max|W| over f in linspace(0.1, 0.8, steps),
    choosing t with the least BiLLM-init error of the two groups (all thresholds at once, scored on at most
    ``search_rows`` evenly spaced rows). Returns the dense mask of W."""
    t = torch.linspace(0.1, 0.8, steps, dtype=W.dtype) * W.abs().max()
    Ws = _search_rows(W, search_rows)
    dense = (Ws.abs()[None] <= t[:, None, None]).to(W.dtype)          # steps, rows, cols
    e = _init_error(Ws, dense, order) + _init_error(Ws, 1 - dense, order)
    return W.abs() <= t[int(torch.argmin(e))]


def partition_block(W, u_diag, cgb=False, max_salient=30, split_steps=40, search_rows=256):
    """BiLLM/CGB partition of one block. Returns (groups, k): groups = [(mask (rows, cols) bool, order)], k = number
    of salient columns (from ``SALIENT_GRID`` up to ``max_salient``, by BiLLM's proxy: both regions second order,
    all candidates at once, scored on at most ``search_rows`` evenly spaced rows)."""
    rows, cols = W.shape
    saliency = (W ** 2 / u_diag[None, :] ** 2).sum(0)
    rank = torch.empty(cols, dtype=torch.long)
    rank[torch.argsort(saliency, descending=True)] = torch.arange(cols)
    k = 0
    if cols > 1:
        cand = torch.tensor([c for c in SALIENT_GRID if c <= min(max_salient, cols - 1)] or [1])
        Ws = _search_rows(W, search_rows)
        sal = (rank[None, :] < cand[:, None]).to(W.dtype)[:, None, :].expand(-1, len(Ws), -1)  # cands, rows, cols
        e = _init_error(Ws, sal, 2) + _init_error(Ws, 1 - sal, 2)
        k = int(cand[torch.argmin(e)])
    salient = rank < k
    groups = []
    for region, reg_order, split in ((salient, 2, cgb), (~salient, 1, True)):
        if not region.any():
            continue
        if not split:
            groups.append((region[None, :].expand(rows, cols).clone(), reg_order))
            continue
        dense = magnitude_split(W[:, region], reg_order, split_steps, search_rows)
        for part in (dense, ~dense):
            mask = torch.zeros(rows, cols, dtype=torch.bool)
            mask[:, region] = part
            groups.append((mask, reg_order))
    return groups, k


def fit_block(W, groups, method, iters=15, S=None):
    """Quantize one partitioned block with ``method``. Each group is fitted on the columns it touches only.
    Returns (W_hat, n_fp16_params)."""
    rows = W.shape[0]
    W_hat, n_params = torch.zeros_like(W), 0
    bases, coefs = [], []
    for mask, order in groups:
        cols = mask.any(0)
        Wg, m = W[:, cols], mask[:, cols].to(W.dtype)
        if method == "arb-rc":
            ar, ac, Bs = arb_rc(Wg, m, order, iters)
            W_hat[:, cols] += rc_reconstruct(ar, ac, Bs, m)
            n_params += order * (rows + int(cols.sum()))
            continue
        if method == "billm":
            p = binarize_first(Wg, m) if order == 1 else binarize_second(Wg, m)
        else:
            p = arb_first(Wg, m, iters) if order == 1 else arb_second(Wg, m, iters)
        mu, alphas, Bs = p[0], p[1:1 + order], p[1 + order:]
        for basis in [m] + [B * m for B in Bs]:
            full = torch.zeros_like(W)
            full[:, cols] = basis
            bases.append(full)
        coefs += [mu, *alphas]
        n_params += rows * (1 + order)
    if method == "arb-rc":
        return W_hat, n_params
    bases, coefs = torch.stack(bases), torch.stack(coefs, 1)
    if method == "arb-x":
        coefs = refit_x(W, S, bases, coefs)
    return torch.einsum("rp,prc->rc", coefs, bases), n_params


def arb_layer(W, H, method="arb", cgb=False, blocksize=128, percdamp=0.01, iters=15, max_salient=30, split_steps=40,
              search_rows=256):
    """Binarize one weight matrix W (out x in) with input Hessian H = 2/N X^T X (see the module docstring).
    Returns (W_hat, info) with info = bits_per_weight, bits breakdown and the salient-column count."""
    check_variant(method)
    out_f, in_f = W.shape
    if H.shape != (in_f, in_f):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match the weight's input width {in_f}")
    for name, v, lo in (("blocksize", blocksize, 1), ("iters", iters, 0), ("max_salient", max_salient, 1),
                        ("split_steps", split_steps, 1), ("search_rows", search_rows, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name}={v!r} must be an integer >= {lo}")
    W = W.detach().clone().float()
    U, dead = inverse_hessian_cholesky(H, percdamp)
    W[:, dead] = 0
    S = H.detach().float()
    Q = torch.zeros_like(W)
    sign_bits = bitmap_bits = params = salient = 0
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        W1, U1 = W[:, i1:i2], U[i1:i2, i1:i2]
        groups, k = partition_block(W1, torch.diag(U1), cgb, max_salient, split_steps, search_rows)
        Q1, n_params = fit_block(W1, groups, method, iters, S[i1:i2, i1:i2] if method == "arb-x" else None)
        Q[:, i1:i2] = Q1
        err = torch.linalg.solve_triangular(U1, W1 - Q1, upper=True, left=False)
        W[:, i2:] -= err @ U[i1:i2, i2:]
        salient += k
        sign_bits += out_f * ((i2 - i1) + k)
        bitmap_bits += (i2 - i1) + out_f * ((i2 - i1) - k + (k if cgb else 0))
        params += n_params
    n = out_f * in_f
    info = {"bits_per_weight": (sign_bits + bitmap_bits + 16 * params) / n, "sign_bits": sign_bits,
            "bitmap_bits": bitmap_bits, "fp16_params": params, "salient_columns": salient, "n_weights": n}
    return Q, info


def quantize_linear(linear, H, *, method="arb", cgb=False, iters=15, blocksize=128, percdamp=0.01, max_salient=30,
                    split_steps=40, search_rows=256):
    """The ARB methods' per-layer step for ``quantize.quantize_model``: binarize one decoder linear layer from its
    input Hessian ``H`` (``arb_layer``), write the result into ``linear.weight`` in place (the later blocks
    calibrate on it) and return (FakeQuantLinear holding it, info); bits per weight follow ``BITS_RULE``."""
    check_variant(method)
    W_hat, info = arb_layer(linear.weight, H, method, cgb, blocksize, percdamp, iters, max_salient, split_steps,
                            search_rows)
    linear.weight.data.copy_(W_hat.to(linear.weight.dtype))
    name = method + ("+cgb" if cgb else "")
    return FakeQuantLinear(linear.weight, linear.bias, info["bits_per_weight"], name), info


def summarize(infos):
    """Model-level bits of the ARB layers' ``info`` dicts: total, and its sign / bitmap / fp16-scale parts."""
    n = sum(i["n_weights"] for i in infos)
    tot = {k: sum(i[k] for i in infos) for k in ("sign_bits", "bitmap_bits", "fp16_params")}
    return {"bits_per_weight": (tot["sign_bits"] + tot["bitmap_bits"] + 16 * tot["fp16_params"]) / n,
            "sign_bits_per_weight": tot["sign_bits"] / n, "bitmap_bits_per_weight": tot["bitmap_bits"] / n,
            "scale_bits_per_weight": 16 * tot["fp16_params"] / n,
            "salient_columns": sum(i["salient_columns"] for i in infos)}
