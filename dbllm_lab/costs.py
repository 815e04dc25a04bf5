"""Chapter 06 (sparsity, operations, storage): how many bits of FDB's bit-planes are set, what a linear layer costs
per token in multiplies, adds and bit-operations under one stated counting rule (``COUNTING_RULE``), and its bytes
with scales, on the embedded model or on LLaMA shapes (``LLAMA_CONFIGS``). Storage per weight comes from the method
registry (``quantize.METHODS``).
"""
from tqdm.auto import tqdm

from .model import LINEAR_NAMES, quantizable_linears
from .quant import check_group_size, dual_binarize, fdb_init, quantize_rtn
from .quantize import METHODS
from .weights import layer_block, layer_type


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


# ---------------------------------------------------------------------------------------------------------
# Operation and storage counts
# ---------------------------------------------------------------------------------------------------------
FORMATS = ("fp16", "int2", "int2-planes", "sign", "db-dense", "db-sparse")
SPARSE_FORMATS = ("int2-planes", "db-sparse")  # only one-bits cost an add: need a count of one-bits
COUNTING_RULE = (
    "Per token (one activation row) for a linear layer of out N x in K with G = K / g groups per row. "
    "fp16: N*K multiplies + N*K adds (one MAC per weight). "
    "int2 (asymmetric 2-bit codes q in 0..3): N*K multiplies q*x + N*K adds, then per (row, group) "
    "1 scale multiply + 1 zero-point multiply (z * sum_group x) + 2 adds, plus K adds for the group sums of x "
    "(shared by all rows). "
    "int2-planes (the same 2-bit code run as two bit-planes, q = q0 + 2 q1, sparsity-aware): only the one-bits of "
    "q0 and q1 add (ones(q0) + ones(q1) adds), per (row, group) 3 multiplies (s for plane 0, 2s for plane 1, z*s on "
    "the group sum of x) + 3 adds, plus K adds for the group sums of x. "
    "sign (w = alpha * (+-1) + mu): N*K adds (+-x), per (row, group) 2 multiplies (alpha, mu) + 2 adds, plus K adds. "
    "db-dense (w = a1 b1 + a2 b2): every weight costs 2 masked adds (one per bit-plane) = 2*N*K adds, "
    "per (row, group) 2 multiplies (a1, a2) + 2 adds. "
    "db-sparse: as db-dense, but only the one-bits add (ones(b1) + ones(b2) adds). "
    "FLOPs = multiplies + adds. Bit-ops: a multiply of a w-bit weight code by a 16-bit activation costs 16*w "
    "(16*16 for fp16 weights and fp16 scales), an add costs 16; binary masked adds cost 16.")


def linear_ops(out_features, in_features, group_size, fmt, ones=None, tokens=1):
    """Multiplies, adds, FLOPs and bit-ops of one linear layer for ``tokens`` activation rows under
    ``COUNTING_RULE``. ``ones`` (db-sparse and int2-planes only): the number of one-bits in b1 plus b2 (in q0 plus
    q1 for int2-planes)."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r} is not supported; use one of {FORMATS}")
    for k, v in (("out_features", out_features), ("in_features", in_features), ("tokens", tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{k}={v!r} must be a positive integer")
    check_group_size(in_features, group_size)
    N, K = out_features, in_features
    NG = N * (K // group_size)
    if fmt in SPARSE_FORMATS:
        if ones is None or not 0 <= ones <= 2 * N * K:
            raise ValueError(f"fmt={fmt!r} needs ones = one-bits of its two planes, between 0 and {2 * N * K}; got {ones!r}")
    elif ones is not None:
        raise ValueError(f"ones is only used with fmt in {SPARSE_FORMATS}, not {fmt!r}")
    if fmt == "fp16":
        mults, adds, bitops = N * K, N * K, N * K * (16 * 16 + 16)
    elif fmt == "int2":
        mults, adds = N * K + 2 * NG, N * K + 2 * NG + K
        bitops = N * K * (16 * 2 + 16) + 2 * NG * 16 * 16 + (2 * NG + K) * 16
    elif fmt == "int2-planes":
        mults, adds = 3 * NG, ones + 3 * NG + K
        bitops = 3 * NG * 16 * 16 + adds * 16
    elif fmt == "sign":
        mults, adds = 2 * NG, N * K + 2 * NG + K
        bitops = 2 * NG * 16 * 16 + adds * 16
    else:
        inner = 2 * N * K if fmt == "db-dense" else ones
        mults, adds = 2 * NG, inner + 2 * NG
        bitops = 2 * NG * 16 * 16 + adds * 16
    t = tokens
    return {"format": fmt, "mults": mults * t, "adds": adds * t, "flops": (mults + adds) * t, "bitops": bitops * t}


# the registry method whose storage rule each format uses (fp16: 16 bits per weight)
FORMAT_METHODS = {"int2": ("rtn", 2), "int2-planes": ("rtn", 2), "sign": ("sign", 1), "db-dense": ("fdb", 2), "db-sparse": ("fdb", 2)}


def linear_bytes(out_features, in_features, group_size, fmt):
    """Storage of one linear layer in bytes, scales included: fp16 2 bytes/weight; the others the registry's
    ``bits_per_weight`` of their method (``FORMAT_METHODS``): int2 = rtn W2 (codes + fp16 scale + 2-bit zero per
    group), sign (1 bit + fp16 alpha and mu per group), db-dense / db-sparse = fdb (2 planes + 2 fp16 scales)."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r} is not supported; use one of {FORMATS}")
    check_group_size(in_features, group_size)
    if fmt == "fp16":
        bpw = 16.0
    else:
        method, bits = FORMAT_METHODS[fmt]
        bpw = METHODS[method].bits_per_weight(bits, group_size)
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


def cost_table(shapes, group_size=64, ones_fraction=None, other_params=0, tokens=1, int2_ones_fraction=None):
    """Totals over ``shapes`` [(name, out, in)] for every format in ``FORMATS``: FLOPs, bit-ops, multiplies,
    adds per ``tokens`` tokens, and bytes of the linear layers and of the whole model (other parameters in fp16).

    ``ones_fraction``: one-bits per weight (ones_b1 + ones_b2, in [0, 2]) for db-sparse, a float used for every
    layer or {name: float}; None leaves db-sparse out. ``int2_ones_fraction``: the same for the plain 2-bit code's
    planes (int2-planes); None leaves int2-planes out.
    """
    rows = []
    for fmt in FORMATS:
        frac = {"db-sparse": ones_fraction, "int2-planes": int2_ones_fraction}.get(fmt)
        if fmt in SPARSE_FORMATS and frac is None:
            continue
        tot = {"mults": 0, "adds": 0, "flops": 0, "bitops": 0, "bytes_linear": 0.0}
        for name, o, i in shapes:
            ones = None
            if fmt in SPARSE_FORMATS:
                f = frac[name] if isinstance(frac, dict) else frac
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
