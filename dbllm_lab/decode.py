"""A lean greedy decoder for LLaMA-family models: the model's own modules called directly, a static KV cache, no HF
``generate`` machinery. ``dbllm_lab.generate.greedy_generate(..., engine="lean")`` runs it.

Per token it computes what ``LlamaForCausalLM.forward`` computes (transformers' modeling_llama), block by block:

    x = input_norm(h);  q, k, v = x Wq, x Wk, x Wv;  q, k = rope(q), rope(k) at their positions
    h = h + o_proj(softmax(q K^T / sqrt(head_dim) + causal mask) V)      (K, V: the cache; GQA: a KV head serves
    h = h + down(act(gate(x)) * up(x)),  x = post_attention_norm(h)       num_heads / num_kv_heads query heads)
    logits = lm_head(norm(h))

The norms, activation and rotary tables are the model's own modules (``rotary_emb`` gives cos / sin, so RoPE
scaling of the static kinds comes with it); for fp32 models on the CPU the residual add + RMSNorm and RoPE run as
one C++ call each (``cpu_kernel_decode.cpp``: the same formulas; torch's ops on one token cost their call overhead). The cache is preallocated, (layers, kv_heads, length, head_dim) for K
and for V, and grown only when a longer sequence comes. Linear layers that read one input run as one call where
that is free: q / k / v and gate / up of packed layers on the C++ integer path share one activation quantization
and one kernel launch (their repacked planes concatenated; the same bits as three calls, as every output row is
computed on its own). Packed layers on the exact path call the kernel directly; ``nn.Linear`` runs ``F.linear``;
anything else is called as a module. One-token steps of an fp32 model whose projections all take the fused
integer path run as one C++ call instead (``decode_step.NativeStep``: the same kernels, no Python per operation).

``lm_head="int8"`` (optional) replaces the fp32 LM head by int8 weight rows with per-row scales
(``Int8LMHead``): 4x fewer bytes read per token, activations exact; its speed and perplexity cost are measured
by ``bench/decode_profile.py`` (bench/results/decode_profile.json). Memory: the fused integer-path layout is a
second copy of the packed planes (2.5 bits per weight again, as each layer's own ``int8_weights`` would be); the
int8 head adds 1/4 of the fp32 head beside it (the tied embedding stays).
"""
import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernel, decode_step
from .packed_linear import CPU_PATHS, INT8_MAX_ROWS, PackedDualBinaryLinear

SUPPORTED_MODEL_TYPES = ("llama",)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # rope tables that do not depend on the sequence length
LM_HEADS = ("exact", "int8")


# ---- int8 weight rows (the optional LM head; C++: cpu_kernel_head.cpp) --------------------------------------------------------
def quantize_rows_int8(w):
    """w (N, K) float -> (codes (N, K) int8, scales (N,) fp32): symmetric per row, s = max |w| / 127,
    codes = round(w / s) (ties to even) in [-127, 127]; an all-zero row gets s = 0 and zero codes."""
    w = w.detach().float()
    s = w.abs().amax(1) / 127
    codes = torch.where(s[:, None] > 0, torch.round(w / s[:, None].clamp_min(torch.finfo(torch.float32).tiny)),
                        torch.zeros_like(w)).clamp(-127, 127)
    return codes.to(torch.int8).contiguous(), s.contiguous()


INT8_ROWS_LOOPS = ("portable", "avx2", "avx512")  # cpu_kernel_head.cpp's loops, slowest first


def int8_rows_matmul_cpu(x, codes, scales, threads=None, loop="avx512"):
    """y = x @ (scales[:, None] * codes).T with the int8 rows read as they are (``cpu_kernel_head.cpp``): x (..., K)
    fp32, codes (N, K) int8, scales (N,) fp32 -> (..., N) fp32. Activations stay fp32 (weight-only quantization).
    ``loop``: the fastest of ``INT8_ROWS_LOOPS`` to use where the CPU has it (tests force the slower ones: the same
    sums in other orders)."""
    if loop not in INT8_ROWS_LOOPS:
        raise ValueError(f"loop={loop!r} is not one of {INT8_ROWS_LOOPS}")
    if x.dtype != torch.float32 or codes.dtype != torch.int8 or scales.dtype != torch.float32:
        raise TypeError(f"int8_rows_matmul_cpu takes fp32 x, int8 codes and fp32 scales, got {x.dtype}, "
                        f"{codes.dtype}, {scales.dtype}")
    N, K = codes.shape
    if x.shape[-1] != K or tuple(scales.shape) != (N,):
        raise ValueError(f"x has {x.shape[-1]} features and scales shape {tuple(scales.shape)}; codes (N, K) = "
                         f"{(N, K)} need K features and (N,) scales")
    if not (codes.is_contiguous() and scales.is_contiguous()):
        raise ValueError("codes and scales must be contiguous")
    x2 = x.reshape(-1, K).contiguous()
    y = torch.empty(x2.shape[0], N, dtype=torch.float32)
    if x2.shape[0] and N:
        cpu_kernel.load().dbl_int8_rows_matmul(x2.data_ptr(), x2.shape[0], codes.data_ptr(), scales.data_ptr(), y.data_ptr(),
                                    N, K, threads or torch.get_num_threads(), INT8_ROWS_LOOPS.index(loop))
    return y.view(*x.shape[:-1], N)


class Int8LMHead(nn.Module):
    """An LM head stored as int8 rows, one fp32 scale per row (``quantize_rows_int8``): y = s * (codes x).
    Up to ``INT8_MAX_ROWS`` rows of x run the C++ kernel (``int8_rows_matmul_cpu``); more rows (prefill,
    perplexity) multiply by the dequantized weight, made for that call only. Output fp32."""

    def __init__(self, weight):
        super().__init__()
        codes, scales = quantize_rows_int8(weight)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)

    def forward(self, x):
        x = x.float()
        if x.reshape(-1, x.shape[-1]).shape[0] <= INT8_MAX_ROWS and cpu_kernel.available():
            return int8_rows_matmul_cpu(x, self.codes, self.scales)
        return F.linear(x, self.codes.float() * self.scales[:, None])


class Projections:
    """Linear layers that read the same input, run as ``__call__(x) -> [y_1, y_2, ...]`` (x: (T, in))."""

    def __init__(self, modules):
        self.modules = list(modules)
        self.sizes = [m.out_features for m in self.modules]
        self.path = _kernel_path(self.modules)  # 'cpu', 'cpu-exact', 'cpu-int8' or None (modules called as such)
        self.int8 = _fused_int8(self.modules) if self.path in ("cpu", "cpu-int8") else None
        self.bias = None
        if self.path and any(m.bias is not None for m in self.modules):
            self.bias = torch.cat([m.bias if m.bias is not None else m.p1.new_zeros(m.out_features, dtype=torch.float32)
                                   for m in self.modules])

    def __call__(self, x):
        if self.path is None:
            return [F.linear(x, m.weight, m.bias) if type(m) is nn.Linear else m(x) for m in self.modules]
        y = self.joined(x)
        return list(y.split(self.sizes, dim=-1)) if len(self.modules) > 1 else [y]

    def joined(self, x):
        """The layers' outputs side by side, (T, sum of out_features)."""
        if self.path is None:
            ys = self(x)
            return ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
        lib, rows, x = cpu_kernel.load(), x.shape[0], x.contiguous()
        if self.int8 is not None and (self.path == "cpu-int8" or rows <= INT8_MAX_ROWS):
            y = cpu_kernel._run_int8(lib, x, rows, self.int8)  # all the layers in one launch
        else:
            y = torch.cat([m.matmul_cpu(x, self.path) for m in self.modules], dim=-1)  # exact or prefill path
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y


def _kernel_path(modules):
    """The C++ kernel path all ``modules`` take on CPU inputs (packed, contiguous, one backend), else None."""
    if not all(isinstance(m, PackedDualBinaryLinear) for m in modules):
        return None
    if any(m.p1.device.type != "cpu" for m in modules):
        return None
    paths = {m.path(torch.empty(0)) for m in modules}
    if len(paths) != 1 or next(iter(paths)) not in CPU_PATHS:
        return None
    if not all(t.is_contiguous() for m in modules for t in (m.p1, m.p2, m.a1, m.a2)):
        return None
    return paths.pop()


def _fused_int8(modules):
    """The integer path's layout of all ``modules`` stacked along the output rows (one launch for all), or None
    where stacking would put padding rows between layers (out_features not a multiple of 32) or settings differ."""
    if len({(m.in_features, m.group_size, m.a1.dtype) for m in modules}) != 1:
        return None
    if modules[0].group_size > cpu_kernel.INT8_MAX_GROUP:
        return None
    if len(modules) > 1 and any(m.out_features % cpu_kernel.BLOCK_ROWS for m in modules):
        return None
    parts = [cpu_kernel.repack_int8(m.p1, m.p2, m.a1, m.a2, m.group_size) for m in modules]
    if len(parts) == 1:
        return parts[0]
    w1, w2, s1, s2 = (torch.cat([getattr(p, f) for p in parts]) for f in ("w1", "w2", "s1", "s2"))
    ptrs = (w1.data_ptr(), w2.data_ptr(), s1.data_ptr(), s2.data_ptr(), int(s1.dtype == torch.float16))
    return cpu_kernel.Int8Weights(w1, w2, s1, s2, sum(p.N for p in parts), parts[0].K, parts[0].group_size, ptrs,
                                  parts[0].layout)


class Norm:
    """A residual add and the RMSNorm after it: ``(h, delta) -> (h + delta, norm(h + delta))`` (no add without
    ``delta``). fp32 LlamaRMSNorm on the CPU: one C++ call that updates h in place; else torch and the module."""

    def __init__(self, norm):
        self.module, self.eps = norm, getattr(norm, "variance_epsilon", None)
        self.fast = (type(norm).__name__ == "LlamaRMSNorm" and self.eps is not None and norm.weight.dtype ==
                     torch.float32 and norm.weight.device.type == "cpu" and cpu_kernel.available())

    def __call__(self, h, delta=None):
        if not self.fast or h.dtype != torch.float32:
            h = h if delta is None else h + delta
            return h, self.module(h)
        delta = None if delta is None else delta.contiguous()
        out = torch.empty_like(h)
        cpu_kernel.load().dbl_add_rms_norm(h.data_ptr(), None if delta is None else delta.data_ptr(),
                                           self.module.weight.data_ptr(), self.eps, out.data_ptr(), *h.shape)
        return h, out


class Block:
    """One decoder block's callables."""

    def __init__(self, layer):
        attn, mlp = layer.self_attn, layer.mlp
        self.input_norm, self.post_norm = Norm(layer.input_layernorm), Norm(layer.post_attention_layernorm)
        self.qkv = Projections([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o = Projections([attn.o_proj])
        self.gate_up = Projections([mlp.gate_proj, mlp.up_proj])
        self.down = Projections([mlp.down_proj])
        self.act = mlp.act_fn
        self.scaling = attn.scaling


def check_supported(model):
    """ValueError unless ``model`` is a LLaMA-family causal LM this decoder computes exactly."""
    cfg = model.config
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"the lean decoder supports model_type in {SUPPORTED_MODEL_TYPES}, got {cfg.model_type!r}; "
                         f"use engine='hf'")
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in STATIC_ROPE_TYPES:
        raise ValueError(f"rope_type={rope_type!r}: the lean decoder precomputes the rotary table and supports "
                         f"{STATIC_ROPE_TYPES}; use engine='hf'")
    if getattr(cfg, "sliding_window", None):
        raise ValueError(f"sliding_window={cfg.sliding_window}: not supported by the lean decoder; use engine='hf'")


class LeanDecoder:
    """Greedy decoding of a LLaMA-family ``model`` (module docstring). ``lm_head``: 'exact' (the model's head) or
    'int8' (``Int8LMHead``, CPU only)."""

    def __init__(self, model, lm_head="exact"):
        check_supported(model)
        if lm_head not in LM_HEADS:
            raise ValueError(f"lm_head={lm_head!r} is not one of {LM_HEADS}")
        cfg, inner = model.config, model.model
        self.model, self.lm_head_kind = model, lm_head
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.embed, self.norm, self.rotary = inner.embed_tokens, Norm(inner.norm), inner.rotary_emb
        self.blocks = [Block(layer) for layer in inner.layers]
        self.head = Int8LMHead(model.get_output_embeddings().weight) if lm_head == "int8" \
            else model.get_output_embeddings()
        self.dtype, self.device = self.embed.weight.dtype, self.embed.weight.device
        self.fast_rope = self.dtype == torch.float32 and self.device.type == "cpu" and cpu_kernel.available()
        self.k_cache = self.v_cache = self.cos = self.sin = None
        self.native = None if decode_step.why_not(self) else decode_step.NativeStep(self)  # one-token steps

    def reserve(self, length):
        """Make the KV cache and rotary table hold ``length`` positions (kept when already long enough; a longer
        cache keeps the positions already written)."""
        old = 0 if self.k_cache is None else self.k_cache.shape[2]
        if old >= length:
            return
        shape = (len(self.blocks), self.kv_heads, length, self.head_dim)
        k, v = (torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(2))
        if old:
            k[:, :, :old], v[:, :, :old] = self.k_cache, self.v_cache
        self.k_cache, self.v_cache = k, v
        positions = torch.arange(length, device=self.device)[None]
        cos, sin = self.rotary(self.k_cache, positions)  # (1, length, head_dim), in the model's dtype
        half = self.head_dim // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)  # rotate_half's sign, baked in
        self.cos, self.sin = cos[0, :, None, :], sin[0, :, None, :]  # (length, 1, head_dim): broadcast over heads

    def rope(self, x, start):
        """x (T, heads, head_dim) rotated at positions start .. start + T - 1: modeling_llama's
        x * cos + rotate_half(x) * sin, with rotate_half(x) = (-x2, x1) = roll(x, half) * (-1 .. -1, 1 .. 1)."""
        end = start + x.shape[0]
        return torch.addcmul(x * self.cos[start:end], x.roll(self.head_dim // 2, -1), self.sin[start:end])

    @torch.inference_mode()
    def forward(self, ids, start, all_logits=False):
        """Logits for token ids (T,) at positions start .. start + T - 1, whose K / V enter the cache; the cache
        must already hold positions 0 .. start - 1. Returns (T, vocab) with ``all_logits``, else the last row (vocab,)."""
        T, end = ids.shape[0], start + ids.shape[0]
        H, KV, D = self.heads, self.kv_heads, self.head_dim
        self.reserve(end)
        if T == 1 and self.native is not None:
            logits = self.native(int(ids[0]), start)
            return logits if all_logits else logits[0]
        mask = None
        if T > 1:  # query i sees keys 0 .. start + i
            mask = torch.ones(T, end, dtype=torch.bool, device=self.device).tril(diagonal=start)
        h, x = self.blocks[0].input_norm(self.embed(ids))
        for i, b in enumerate(self.blocks):
            qkv = b.qkv.joined(x)  # (T, (H + 2 KV) D): q, k, v side by side
            qk = self.rope_qk(qkv, start)  # (T, H + KV, D)
            self.k_cache[i, :, start:end] = qk[:, H:].transpose(0, 1)
            self.v_cache[i, :, start:end] = qkv[:, (H + KV) * D:].reshape(T, KV, D).transpose(0, 1)
            attn = F.scaled_dot_product_attention(qk[None, :, :H].transpose(1, 2), self.k_cache[None, i, :, :end],
                                                  self.v_cache[None, i, :, :end], attn_mask=mask, scale=b.scaling,
                                                  enable_gqa=True)
            h, x = b.post_norm(h, b.o.joined(attn[0].transpose(0, 1).reshape(T, H * D)))
            gate, up = b.gate_up(x)
            after = self.blocks[i + 1].input_norm if i + 1 < len(self.blocks) else self.norm
            h, x = after(h, b.down.joined(b.act(gate) * up))
        logits = self.head(x if all_logits else x[-1:])
        return logits if all_logits else logits[0]

    def rope_qk(self, qkv, start):
        """The q and k heads of ``qkv`` rotated at positions start .. start + T - 1, as (T, H + KV, D): in place
        by one C++ call for fp32 on the CPU, else ``rope`` in torch."""
        T, n, D = qkv.shape[0], self.heads + self.kv_heads, self.head_dim
        if not (self.fast_rope and qkv.is_contiguous() and qkv.dtype == torch.float32):
            return self.rope(qkv[:, :n * D].reshape(T, n, D), start)
        cpu_kernel.load().dbl_rope(qkv.data_ptr(), T, n, D, qkv.shape[1], self.cos[start].data_ptr(),
                                   self.sin[start].data_ptr())
        return qkv[:, :n * D].view(T, n, D)

    @torch.inference_mode()
    def generate(self, ids, max_new_tokens, on_first_token=None, return_logits=False):
        """Greedy continuation of prompt ids (T,): a list of ``max_new_tokens`` token ids (the end-of-text token
        does not stop it), and with ``return_logits`` also the (max_new_tokens, vocab) logits that chose them.
        ``on_first_token()`` is called once the prompt is processed and the first token chosen (for timing)."""
        if ids.dim() != 1 or ids.shape[0] == 0:
            raise ValueError(f"ids must be a non-empty 1-D tensor of prompt token ids, got shape {tuple(ids.shape)}")
        self.reserve(ids.shape[0] + max_new_tokens)
        logits = self.forward(ids.to(self.device), 0)
        tokens, kept = [], []
        for n in range(max_new_tokens):
            if n:
                logits = self.forward(tokens[-1], ids.shape[0] + n - 1)
            if return_logits:
                kept.append(logits.float())
            tokens.append(logits.argmax(-1, keepdim=True))
            if n == 0 and on_first_token:
                on_first_token()
        out = torch.cat(tokens).tolist()
        return (out, torch.stack(kept)) if return_logits else out
