"""Packed dual-bit-plane format: {0,1} bit-planes packed into int32 words along the input dimension.

Word k of row r holds columns 32k .. 32k+31 of that row; bit j (LSB = 0) is column 32k + j.
Scales a1, a2 are stored per (row, group) in fp16. This is the on-disk and in-kernel layout.
"""
import torch

WORD_BITS = 32
_SHIFTS = torch.arange(WORD_BITS, dtype=torch.int64)


def pack_bits(bits):
    """(out, in) tensor of {0,1} -> (out, in // 32) int32 words. ``in`` must be a multiple of 32."""
    if bits.dim() != 2:
        raise ValueError(f"pack_bits expects a 2-D (out, in) tensor, got shape {tuple(bits.shape)}")
    out_f, in_f = bits.shape
    if in_f % WORD_BITS:
        raise ValueError(f"input width {in_f} is not a multiple of {WORD_BITS}; packed bit-planes need in % 32 == 0")
    b = bits.to(torch.int64).view(out_f, in_f // WORD_BITS, WORD_BITS)
    if b.numel() and (b.min() < 0 or b.max() > 1):
        raise ValueError("pack_bits expects only 0/1 values")
    words = (b << _SHIFTS.to(b.device)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_bits(words, in_features=None):
    """(out, in // 32) int32 words -> (out, in) uint8 tensor of {0,1}; inverse of ``pack_bits``."""
    if words.dtype != torch.int32 or words.dim() != 2:
        raise ValueError(f"unpack_bits expects 2-D int32 words, got {words.dtype} of shape {tuple(words.shape)}")
    bits = (words.to(torch.int64).unsqueeze(-1) >> _SHIFTS.to(words.device)) & 1
    bits = bits.reshape(words.shape[0], -1).to(torch.uint8)
    if in_features is not None and in_features != bits.shape[1]:
        raise ValueError(f"in_features={in_features} does not match {words.shape[1]} words x 32 = {bits.shape[1]}")
    return bits


# ---- operands of y = x @ w_hat.T in this format (every backend checks them the same way) ----------------------
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SCALE_DTYPES = (torch.float16, torch.float32)


def _names(dtypes):
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_inputs(x, p1, p2, a1, a2, group_size):
    """Validate the operands of ``y = x @ w_hat.T``; raise TypeError/ValueError naming the bad value.

    Returns (M, N, K) with M = number of activation rows (leading dims of x flattened).
    """
    for name, t in (("x", x), ("p1", p1), ("p2", p2), ("a1", a1), ("a2", a2)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {group_size!r}")
    if group_size <= 0 or group_size % WORD_BITS:
        raise ValueError(f"group_size={group_size} is not supported: it must be a positive multiple of {WORD_BITS} "
                         f"(e.g. 32, 64, 128) so that groups align with the packed int32 words")
    if x.dtype not in ACT_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; activations must be one of {_names(ACT_DTYPES)}")
    for name, t in (("p1", p1), ("p2", p2)):
        if t.dtype != torch.int32:
            raise TypeError(f"{name} has dtype {t.dtype}; packed bit-planes must be int32 (see packing.pack_bits)")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (out, in // 32), got shape {tuple(t.shape)}")
    for name, t in (("a1", a1), ("a2", a2)):
        if t.dtype not in SCALE_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; scales must be one of {_names(SCALE_DTYPES)}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (out, in // group_size), got shape {tuple(t.shape)}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in_features)")
    devices = {t.device for t in (x, p1, p2, a1, a2)}
    if len(devices) > 1:
        raise ValueError(f"all operands must be on one device, got x:{x.device} p1:{p1.device} p2:{p2.device} "
                         f"a1:{a1.device} a2:{a2.device}")
    if p1.shape != p2.shape:
        raise ValueError(f"p1 and p2 shapes differ: {tuple(p1.shape)} vs {tuple(p2.shape)}")
    if a1.shape != a2.shape:
        raise ValueError(f"a1 and a2 shapes differ: {tuple(a1.shape)} vs {tuple(a2.shape)}")
    N, KW = p1.shape
    K = x.shape[-1]
    if K != KW * WORD_BITS:
        raise ValueError(f"x has in_features={K} but the bit-planes hold {KW} words x 32 = {KW * WORD_BITS} columns")
    if K % group_size:
        raise ValueError(f"in_features={K} is not a multiple of group_size={group_size}")
    if tuple(a1.shape) != (N, K // group_size):
        raise ValueError(f"scales have shape {tuple(a1.shape)}, expected (out, in // group_size) = "
                         f"({N}, {K // group_size}) for group_size={group_size}")
    M = x.numel() // K if K else 0
    return M, N, K
