"""The lean decoder's one-call decode step (``dbl_decode_step`` in ``cpu_kernel_decode.cpp``): for a one-token step
of an fp32 LLaMA model on the CPU whose projections all run the C++ integer path, every layer's norms, q/k/v, RoPE,
attention over the static KV cache, o, gate/up, SiLU * up and down, then the final norm and the int8 LM head when
chosen, run as one ctypes call with one OpenMP parallel region (``LeanDecoder.forward`` uses it for T = 1 when
``NativeStep.why_not`` finds nothing against it). The same operations as the Python path: the integer kernel's own
block routine on the same fused layouts, the same norm and RoPE functions; attention and SiLU are C++ loops in place
of torch's, so logits differ from the Python path's by fp32 reassociation only (``tests/test_decode.py``).
"""
import ctypes

import torch

from . import cpu_kernel

LAYER_FIELDS = ("qkv", "o", "gate_up", "down")  # after the two norm weights: LAYER_PTRS of cpu_kernel_decode.cpp
SILU = ("SiLU", "SiLUActivation")


def why_not(decoder):
    """None when ``decoder`` (a ``LeanDecoder``) can decode one-token steps with ``dbl_decode_step``, else why not."""
    if not cpu_kernel.available():
        return "the C++ kernel is unavailable"
    if decoder.dtype != torch.float32 or decoder.device.type != "cpu":
        return f"the model is {decoder.dtype} on {decoder.device}, not float32 on the CPU"
    norms = [n for b in decoder.blocks for n in (b.input_norm, b.post_norm)] + [decoder.norm]
    if not all(n.fast for n in norms) or len({n.eps for n in norms}) != 1:
        return "a norm is not an fp32 LlamaRMSNorm, or the norms' eps differ"
    projections = [getattr(b, f) for b in decoder.blocks for f in LAYER_FIELDS]
    if any(p.path not in ("cpu", "cpu-int8") or p.int8 is None or p.bias is not None for p in projections):
        return "a projection is not a packed layer on the fused integer path without bias"
    if len({(p.int8.group_size, p.int8.ptrs[4], p.int8.layout) for p in projections}) != 1:
        return "the projections' group sizes, scale dtypes or integer layouts differ"
    if any(type(b.act).__name__ not in SILU for b in decoder.blocks) or len({b.scaling for b in decoder.blocks}) != 1:
        return "an activation is not SiLU, or the attention scalings differ"
    if decoder.heads % decoder.kv_heads or not decoder.embed.weight.is_contiguous():
        return "heads are not a multiple of the KV heads, or the embedding is not contiguous"
    return None


class NativeStep:
    """``dbl_decode_step`` bound to a ``LeanDecoder``'s modules: ``__call__(token, pos)`` -> the logits (1, vocab)."""

    def __init__(self, decoder):
        self.decoder, b0 = decoder, decoder.blocks[0]
        ptrs = []
        for b in decoder.blocks:
            ptrs += [b.input_norm.module.weight.data_ptr(), b.post_norm.module.weight.data_ptr()]
            ptrs += [p for f in LAYER_FIELDS for p in getattr(b, f).int8.ptrs[:4]]
        self.layers = (ctypes.c_void_p * len(ptrs))(*ptrs)
        self.hidden = decoder.embed.weight.shape[1]
        self.int8_head = decoder.lm_head_kind == "int8"
        self.vocab = decoder.head.codes.shape[0] if self.int8_head else self.hidden
        fields = b0.qkv.int8
        self.dims = (ctypes.c_int64 * 11)(len(decoder.blocks), self.hidden, decoder.heads, decoder.kv_heads,
                                          decoder.head_dim, b0.down.int8.K, fields.group_size, fields.ptrs[4], 0,
                                          self.vocab, cpu_kernel.INT8_LAYOUTS.index(fields.layout))
        self.eps, self.scaling = float(decoder.norm.eps), float(b0.scaling)

    def __call__(self, token, pos):
        d = self.decoder
        self.dims[8] = d.k_cache.shape[2]  # CACHE_LEN: reserve() may have grown the cache
        out = torch.empty(1, self.vocab, dtype=torch.float32)
        head = (d.head.codes.data_ptr(), d.head.scales.data_ptr()) if self.int8_head else (None, None)
        rc = cpu_kernel.load().dbl_decode_step(
            ctypes.addressof(self.dims), ctypes.addressof(self.layers), d.embed.weight.data_ptr(),
            d.norm.module.weight.data_ptr(), *head, d.k_cache.data_ptr(), d.v_cache.data_ptr(),
            d.cos[pos].data_ptr(), d.sin[pos].data_ptr(), token, pos, self.eps, self.scaling, out.data_ptr(),
            torch.get_num_threads())
        if rc:
            raise MemoryError("dbl_decode_step could not allocate its buffers")
        return out if self.int8_head else d.head(out)
