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
