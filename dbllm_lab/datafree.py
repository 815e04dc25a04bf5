"""Data-free training text written by the FP teacher (method.md §3, as LLM-QAT does).

Each sample starts from a random vocabulary token; the next ``greedy_tokens`` tokens are greedy and the
rest are sampled at ``temperature`` up to ``seqlen`` tokens. ``precision="bf16"`` writes the text with a bf16 copy
of the teacher (``generation_model``: weights and activations in bf16; the KV cache, attention, logits and sampling
in fp32): the same sampling procedure on slightly rounded logits, so a sample follows the fp32 one until a rounding
moves a sampled token across a CDF boundary, and the text is a different draw from (nearly) the same distribution.
Generation is batched, with a KV cache written in place and inverse-CDF sampling over chunk sums
(``sample_inverse_cdf``).
All randomness (start tokens and one uniform number per sampled position) is drawn up front from one
seeded generator, so a sample does not depend on the batch size. Results are cached on disk under
``cache_dir`` (default ``data/generated``, git-ignored), keyed by model, seed, count, length and the
generation settings, so notebooks and benchmarks reuse them.

``corpus_samples`` is the option of training on real text instead (never the split you evaluate on).
"""
import copy
import hashlib
import inspect
import json
import os
import re
import time

import torch
from tqdm.auto import tqdm
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .model import decoder_layers
from .paths import root
from .runtime import check_precision

DEFAULT_CACHE = os.path.join(root(), "data", "generated")  # the project's data/generated, wherever run from
GREEDY_TOKENS, TEMPERATURE = 4, 1.0  # method.md §3: a few greedy tokens, then sampling at temperature 1
TEXT_PRECISION = "fp32"  # the teacher's precision while it writes, unless a recipe sets "bf16"


def _cache_path(cache_dir, model, n, seqlen, seed, greedy_tokens, temperature, precision=TEXT_PRECISION):
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(getattr(model, "name_or_path", "") or type(model).__name__))
    suffix = "" if precision == "fp32" else f"_{precision}"  # fp32 text keeps the names it was cached under
    return os.path.join(cache_dir, f"{name}_seed{seed}_n{n}_len{seqlen}_greedy{greedy_tokens}_t{temperature:g}"
                                   f"{suffix}.pt")


def _check(n, seqlen, greedy_tokens, temperature, batch_size):
    for key, v in (("n", n), ("seqlen", seqlen), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{key}={v!r} must be a positive integer")
    if seqlen < 2:
        raise ValueError(f"seqlen={seqlen!r} must be >= 2")
    if not isinstance(greedy_tokens, int) or greedy_tokens < 0:
        raise ValueError(f"greedy_tokens={greedy_tokens!r} must be an integer >= 0")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")


class _PreallocatedLayer(DynamicLayer):
    """A KV-cache layer written in place into fp32 buffers of the final length: the default cache concatenates, which
    copies the whole cache at every step (quadratic in the sample length). A bf16 model's keys and values are
    stored in fp32 too, for ``sdpa_fp32``."""

    def __init__(self, capacity):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states, value_states):
        b, h, _, d = key_states.shape
        self.key_buffer = key_states.new_empty(b, h, self.capacity, d, dtype=torch.float32)
        self.value_buffer = value_states.new_empty(b, h, self.capacity, d, dtype=torch.float32)
        self.device, self.is_initialized = key_states.device, True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self.key_buffer[:, :, self.length:end] = key_states
        self.value_buffer[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self):
        return self.length


CDF_CHUNK = 256  # inverse-CDF sampling scans chunk sums, then one chunk: two short cumsums, not one over the vocabulary


def sample_inverse_cdf(logits, uniforms, temperature=1.0):
    """The token whose CDF interval holds ``u``: the smallest k with sum_{i<=k} p_i > u, p = softmax(logits / T)
    (inverse-transform sampling). ``logits`` (b, V) is overwritten; ``uniforms`` (b,) in [0, 1).
    The normalisation is folded into ``u`` (u * sum of the unnormalised weights)."""
    b, vocab = logits.shape
    w = logits.sub_(logits.amax(-1, keepdim=True))
    if temperature != 1:
        w.div_(temperature)
    w = torch.nn.functional.pad(w.exp_(), (0, -vocab % CDF_CHUNK)).view(b, -1, CDF_CHUNK)
    chunk_cdf = w.sum(-1).cumsum(-1)  # (b, chunks)
    u = uniforms[:, None].to(chunk_cdf) * chunk_cdf[:, -1:]
    chunk = torch.searchsorted(chunk_cdf, u, side="right").clamp_max(chunk_cdf.shape[1] - 1)  # (b, 1)
    before = torch.where(chunk > 0, chunk_cdf.gather(1, (chunk - 1).clamp_min(0)), torch.zeros_like(u))
    within = w.gather(1, chunk[:, :, None].expand(-1, -1, CDF_CHUNK)).squeeze(1).cumsum(-1)
    k = torch.searchsorted(within, u - before, side="right").clamp_max(CDF_CHUNK - 1)
    return (chunk * CDF_CHUNK + k).squeeze(1).clamp_max(vocab - 1)


def cache_keyword(model):
    """The keyword ``model``'s forward takes its KV cache by: "cache" since transformers renamed it (5.x),
    "past_key_values" before; the old name still works there with a warning, until 5.40."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def _generate_batch(model, start, uniforms, greedy_tokens, temperature):
    """Continue the (b,) start tokens to (b, 1 + uniforms.shape[1]) tokens with a preallocated KV cache."""
    steps = uniforms.shape[1]
    cache = DynamicCache(config=model.config)
    cache.layers = [_PreallocatedLayer(steps + 1) for _ in range(len(decoder_layers(model)))]
    out = torch.empty(start.shape[0], steps + 1, dtype=torch.long, device=start.device)
    out[:, 0] = cur = start
    kv = {cache_keyword(model): cache}
    for j in range(steps):
        logits = model(input_ids=cur[:, None], use_cache=True, logits_to_keep=1, **kv).logits
        logits = logits[:, -1].float()
        cur = logits.argmax(-1) if j < greedy_tokens else sample_inverse_cdf(logits, uniforms[:, j], temperature)
        out[:, j + 1] = cur
    return out


def sdpa_fp32(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention computed in fp32 and returned in the query's dtype. On the CPU, torch's fused
    attention for one query token over a long bf16 cache is several times slower than in fp32
    (bench/generation_cost.py), while bf16 matmuls are faster: a bf16 writer keeps its attention in fp32."""
    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(),
                                          None if attention_mask is None else attention_mask.float()
                                          if attention_mask.is_floating_point() else attention_mask, **kwargs)
    return out.to(query.dtype), weights


AttentionInterface.register("sdpa_fp32", sdpa_fp32)


def generation_model(model, precision=TEXT_PRECISION):
    """The model that writes the text: ``model`` itself for "fp32"; for "bf16" a bf16 copy of it whose attention
    runs in fp32 (``sdpa_fp32``, over the fp32 cache of ``_PreallocatedLayer``)."""
    check_precision(precision)
    if precision == "fp32":
        return model
    writer = copy.deepcopy(model).to(torch.bfloat16)
    writer.set_attn_implementation("sdpa_fp32")
    return writer


def generate_samples(model, tokenizer, n, seqlen, seed=0, batch_size=128, cache_dir=DEFAULT_CACHE,
                     greedy_tokens=None, temperature=None, precision=TEXT_PRECISION, progress=True):
    """``n`` teacher-written samples of ``seqlen`` tokens as a LongTensor (n, seqlen), cached on disk.

    ``tokenizer`` is only used for its vocabulary size (start tokens avoid ids beyond it); ``cache_dir=None``
    disables the cache. ``precision``: "fp32" or "bf16" (``generation_model``).
    """
    greedy_tokens = GREEDY_TOKENS if greedy_tokens is None else greedy_tokens
    temperature = TEMPERATURE if temperature is None else temperature
    _check(n, seqlen, greedy_tokens, temperature, batch_size)
    check_precision(precision)
    path = cache_dir and _cache_path(cache_dir, model, n, seqlen, seed, greedy_tokens, temperature, precision)
    if path and os.path.isfile(path):
        data = torch.load(path)
        if data.shape == (n, seqlen):
            return data
    vocab = model.config.vocab_size
    if tokenizer is not None:
        vocab = min(vocab, len(tokenizer))
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n,), generator=g)
    uniforms = torch.rand(n, seqlen - 1, generator=g, dtype=torch.float64)
    device = next(model.parameters()).device
    t0, c0 = time.time(), time.process_time()
    was_training = model.training
    model.eval()
    writer = generation_model(model, precision)
    chunks = []
    for i in tqdm(range(0, n, batch_size), desc=f"generate {n}x{seqlen} ({precision})", disable=not progress):
        chunks.append(_generate_batch(writer, start[i:i + batch_size].to(device), uniforms[i:i + batch_size],
                                      greedy_tokens, temperature).cpu())
    del writer
    model.train(was_training)
    data = torch.cat(chunks).long()
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        torch.save(data, path + ".tmp")
        os.replace(path + ".tmp", path)
        cost = {"cpu_seconds": round(time.process_time() - c0, 1), "seconds": round(time.time() - t0, 1),
                "threads": torch.get_num_threads(), "batch_size": batch_size, "device": str(device),
                "precision": precision,
                "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        with open(path + ".json.tmp", "w") as f:
            json.dump(cost, f)
        os.replace(path + ".json.tmp", path + ".json")
    return data


SEED_STRIDE = 1000  # set k of text seed s is generated with seed s * SEED_STRIDE + k (< SEED_STRIDE ** 2)


def teacher_text(model, tokenizer, samples, tokens, seed=0, set_size=128, cache_dir=DEFAULT_CACHE,
                 precision=TEXT_PRECISION, progress=True):
    """A recipe's training text: the first ``samples`` samples of ``tokens`` tokens from sets of ``set_size``
    (``generate_samples``, each cached), set k generated with seed ``seed * SEED_STRIDE + k``. A larger pool extends
    a smaller one of the same seed; seed 0 with sets of 128 is the pool of the committed table rows. ``precision``
    is the teacher's while it writes ("fp32" or "bf16": ``generation_model``)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_STRIDE:
        raise ValueError(f"seed={seed!r} must be an integer in [0, {SEED_STRIDE}) (seeds from "
                         f"{SEED_STRIDE ** 2} on are kept for held-out text)")
    _check(samples, tokens, 0, 1.0, set_size)
    sets = -(-samples // set_size)
    if sets > SEED_STRIDE:
        raise ValueError(f"samples={samples} needs {sets} sets of {set_size}; at most {SEED_STRIDE} are allowed")
    return torch.cat([generate_samples(model, tokenizer, set_size, tokens, seed=seed * SEED_STRIDE + k,
                                       cache_dir=cache_dir, precision=precision, progress=progress)
                      for k in range(sets)])[:samples]


def text_digest(tokens):
    """sha256 of the token ids (int64, little-endian, row by row): texts written on two machines are the same text
    exactly when their digests agree (``run_recipe`` records it in every row as ``text_sha256``)."""
    data = tokens.detach().to("cpu", torch.int64).contiguous().numpy().astype("<i8", copy=False)
    return hashlib.sha256(data.tobytes()).hexdigest()


def _set_paths(cache_dir, model, samples, tokens, seed, set_size, precision):
    return [_cache_path(cache_dir, model, set_size, tokens, seed * SEED_STRIDE + k, GREEDY_TOKENS, TEMPERATURE,
                        precision) for k in range(-(-samples // set_size))]


def text_is_cached(model, samples, tokens, seed=0, set_size=128, cache_dir=DEFAULT_CACHE, precision=TEXT_PRECISION):
    """Whether every set ``teacher_text`` would read is already in the cache."""
    return bool(cache_dir) and all(map(os.path.isfile, _set_paths(cache_dir, model, samples, tokens, seed, set_size,
                                                                  precision)))


def text_cpu_minutes(model, samples, tokens, seed=0, set_size=128, cache_dir=DEFAULT_CACHE, precision=TEXT_PRECISION):
    """CPU-minutes it took to generate the cached sets of this text (recorded beside each set when it was
    written), or None when a set has no record: a budget counts the text whether or not it came from the cache."""
    total = 0.0
    for path in _set_paths(cache_dir, model, samples, tokens, seed, set_size, precision):
        if not os.path.isfile(path + ".json"):
            return None
        with open(path + ".json") as f:
            total += json.load(f)["cpu_seconds"]
    return round(total / 60, 2)


def corpus_samples(tokenizer, n, seqlen, text=None, path=None, dataset=None, split="train", data_dir=None, seed=0):
    """``n`` random windows of ``seqlen`` tokens from real text (a string, a text file, or a
    ``dbllm_lab.data`` dataset split), the option of training on a corpus instead of generated text.
    Refuses the WikiText-2 test split (it is the evaluation text)."""
    from .data import load_text, tokenize
    if sum(x is not None for x in (text, path, dataset)) != 1:
        raise ValueError("pass exactly one of text=, path= or dataset=")
    if dataset is not None:
        if dataset == "wikitext2" and split == "test":
            raise ValueError("refusing to train on the WikiText-2 test split: it is the evaluation text")
        text = load_text(dataset, split, data_dir)
    elif path is not None:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    ids = tokenize(tokenizer, text)
    if ids.numel() < seqlen + 1:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (n,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()]).long()
