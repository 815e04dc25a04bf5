"""Block-wise reconstruction: the first training stage (the idea of EfficientQAT's Block-AP and OmniQuant,
applied to FDB and to a learnable uniform 2-bit grid).

Decoder block i of the quantized student is trained so that it reproduces block i of the FP teacher:

    min over (a1, a2[, latent W]) of  L( S_i(x_i^q),  T_i(x_i^fp) )

where x_i^fp are the FP model's hidden states entering block i and x_i^q the student's (the outputs of the
already-trained quantized blocks before it; ``inputs="fp"`` feeds x_i^fp instead). The target T_i(x_i^fp) is
the FP block's output on FP inputs, so a block can also repair the error its predecessors left.

The loss (``loss=``):
- "mse": plain mean squared error. On SmolLM2-135M blocks >= 11 it is swamped by one position: the attention
  sink writes ~25,000 into one channel of the residual stream at position 0, and its squared error outweighs
  all other positions together.
- "relative": per-token relative error, mean_t ||e_t||^2 / ||y_t||^2 (every token weighs the same).
- "split" (default): the sink is its own term. A token is a sink when its FP output norm exceeds
  ``sink_ratio`` times the median token norm of the batch; then

      L = sum_{t ordinary} ||e_t||^2 / sum_{t ordinary} ||y_t||^2  +  sink_weight * mean_{t sink} ||e_t||^2 / ||y_t||^2

  i.e. a normalised MSE over ordinary tokens (which keeps MSE's weighting of large ordinary errors, such as a
  misfiring outlier channel) plus a relative error on the sinks, so neither side can drown the other.

Streaming: one block at a time. Teacher and student blocks are moved to ``device`` only while they are used
(so a model larger than the accelerator fits); what the stage allocates is one block's activations for the
calibration set (three streams: FP input, quantized input, target), that block's gradients and optimiser
state. After each block its trainable tensors are written atomically to ``out_dir/block_NNN.pt``; a rerun
loads the finished blocks, recomputes the two streams through them and continues with the next block (a run
killed inside a block restarts that block, which is deterministic given the seed).
"""
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from .calib import block_forward, capture_block0_inputs
from .data import to_windows
from .layers import learnable_layers, learnable_state, param_groups, trainable_parameters
from .model import decoder_layers
from .runtime import (adamw, atomic_save, autocast, check_min_lr_ratio, check_precision, cosine_lr,
                      load_checkpoint, peak_rss_gib)

LOSSES = ("split", "relative", "mse")
INPUTS = ("quant", "fp")


@dataclass
class BlockwiseConfig:
    epochs: int = 2                # passes over the calibration samples per block
    batch_size: int = 1            # samples per optimiser step (1: the most steps for the same compute)
    lr: float = 5e-4               # peak lr of the quantizer scales (FDB a1, a2 / uniform step, zero)
    lr_latent: float = 2e-3        # peak lr of the latent weights (STE); used when train_latent
    train_latent: bool = True      # also train the latent full-precision weights through the STE
    loss: str = "split"            # "split" | "relative" | "mse"
    inputs: str = "quant"          # "quant": outputs of the quantized blocks before; "fp": the FP model's
    sink_ratio: float = 20.0       # "split": a token is a sink when ||y_t|| > sink_ratio * median_t ||y_t||
    sink_weight: float = 1.0       # "split": weight of the sink term
    min_lr_ratio: float = 0.1      # cosine decay to min_lr_ratio * lr within each block
    seed: int = 0
    stats_samples: int = 0         # before/after error statistics on the first N samples (0: all); the forward
                                   # pass for the "before" statistics is the only one that training does not need
    train_norms: bool = False      # also train the block's RMSNorm weights (full precision, a scale per input
                                   # channel of q/k/v and of gate/up: the idea of Norm-Tweaking)
    lr_norm: float = 1e-3          # peak lr of the norm weights (train_norms)
    fused_adamw: bool = True       # torch's fused AdamW update (runtime.adamw); False: torch's unfused one
    seqlen: int = 0                # cut each sample into windows of this many tokens (0: whole samples): more,
                                   # shorter optimiser steps for the same tokens
    window_offset: int = 0         # > 0: join the samples into one stream and cut the windows from this token on,
                                   # so that every window starts mid-sample, as evaluation windows start mid-text
    precision: str = "fp32"        # "bf16": every block pass of stage 1 (targets, training steps, streams) under
                                   # bf16 autocast; weights, optimiser state, streams kept and the loss in fp32

    def validate(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r} is not supported for the block-wise stage; use one of {LOSSES}")
        if self.inputs not in INPUTS:
            raise ValueError(f"inputs={self.inputs!r} is not supported; use one of {INPUTS}")
        for key in ("epochs", "batch_size"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{key}={v!r} is not allowed: it must be a positive integer")
        if isinstance(self.seqlen, bool) or not isinstance(self.seqlen, int) or self.seqlen == 1 or self.seqlen < 0:
            raise ValueError(f"seqlen={self.seqlen!r} is not allowed: it must be an integer >= 2, or 0 (whole samples)")
        if isinstance(self.window_offset, bool) or not isinstance(self.window_offset, int) or self.window_offset < 0:
            raise ValueError(f"window_offset={self.window_offset!r} is not allowed: it must be an integer >= 0 "
                             f"(0: windows start where the samples start)")
        if isinstance(self.stats_samples, bool) or not isinstance(self.stats_samples, int) or self.stats_samples < 0:
            raise ValueError(f"stats_samples={self.stats_samples!r} is not allowed: it must be an integer >= 0 "
                             f"(0: all samples)")
        for key in ("lr", "lr_latent", "lr_norm", "sink_ratio"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key}={getattr(self, key)!r} must be > 0")
        if not self.sink_weight >= 0:
            raise ValueError(f"sink_weight={self.sink_weight!r} must be >= 0")
        check_min_lr_ratio(self.min_lr_ratio)
        check_precision(self.precision)
        return self


def sink_mask(y, sink_ratio):
    """(batch, seq) bool: tokens whose norm exceeds ``sink_ratio`` x the median token norm of the batch."""
    norms = y.float().norm(dim=-1)
    return norms > sink_ratio * norms.flatten().median()


def reconstruction_loss(out, y, kind="split", sink_ratio=20.0, sink_weight=1.0):
    """Block output error (see the module docstring for the three kinds); out, y: (batch, seq, hidden)."""
    e2 = (out.float() - y.float()).pow(2).sum(-1)
    y2 = y.float().pow(2).sum(-1)
    if kind == "mse":
        return e2.mean() / y.shape[-1]
    if kind == "relative":
        return (e2 / y2.clamp(min=1e-12)).mean()
    sink = sink_mask(y, sink_ratio)
    ordinary = ~sink
    loss = e2[ordinary].sum() / y2[ordinary].sum().clamp(min=1e-12)
    if sink.any() and sink_weight:
        loss = loss + sink_weight * (e2[sink] / y2[sink]).mean()
    return loss


@torch.no_grad()
def error_stats(out, y, sink_ratio=20.0):
    """Relative errors of one block's output, split by sink / ordinary token (sinks found in the FP output ``y``),
    ``sink_misfires``: ordinary tokens that look like sinks in ``out``, and the largest |activation| (value,
    position, channel) of ``out`` and ``y``. out, y: lists of (1, seq, hidden) tensors."""
    e_ord = y_ord = e_sink = y_sink = 0.0
    n_sink = misfires = 0
    top = {"fp": (0.0, -1, -1), "quant": (0.0, -1, -1)}
    for o, t in zip(out, y):
        o, t = o.float(), t.float()
        sink = sink_mask(t, sink_ratio)
        e2 = (o - t).pow(2).sum(-1)
        y2 = t.pow(2).sum(-1)
        e_ord += float(e2[~sink].sum())
        y_ord += float(y2[~sink].sum())
        e_sink += float(e2[sink].sum())
        y_sink += float(y2[sink].sum())
        n_sink += int(sink.sum())
        misfires += int((sink_mask(o, sink_ratio) & ~sink).sum())
        for key, a in (("fp", t), ("quant", o)):
            v, flat = a[0].abs().flatten().max(0)
            if float(v) > top[key][0]:
                top[key] = (float(v), int(flat) // a.shape[-1], int(flat) % a.shape[-1])
    return {"rel_err_ordinary": e_ord / max(y_ord, 1e-12), "rel_err_sink": e_sink / y_sink if n_sink else None,
            "sink_tokens": n_sink, "sink_misfires": misfires,
            "max_fp": top["fp"][0], "max_fp_pos": top["fp"][1], "max_fp_channel": top["fp"][2],
            "max_quant": top["quant"][0], "max_quant_pos": top["quant"][1], "max_quant_channel": top["quant"][2]}


def _run(block, xs, kwargs, device, batch=8, precision="fp32"):
    """``block`` on every sample of the stream ``xs``, in batches: the output stream (in the dtype of ``xs``)."""
    with torch.no_grad(), autocast(precision, torch.device(device).type):
        out = None
        for i in range(0, len(xs), batch):
            y = block_forward(block, torch.cat(xs[i:i + batch]).to(device), kwargs)
            if out is None:
                out = torch.empty(len(xs), *y.shape[1:], dtype=xs[0].dtype, device=xs[0].device)
            out[i:i + len(y)] = y
    return list(out.split(1))


def _stream(chunks):
    """A stream: a list of (1, seq, d) views of ONE tensor. Thousands of batch-sized buffers instead, freed and
    reallocated block after block among the training step's own, fragmented glibc's heap: a long stage-1 process
    spent several times the share of its time in libc that a fresh process did (py-spy)."""
    return list(torch.cat(chunks).split(1))


def _drop_caches(block):
    for m in learnable_layers(block).values():
        m.__dict__.pop("_w_cache", None)


def train_block(block, x_in, y, kwargs, cfg, seed, device="cpu", progress=True, desc="block"):
    """Train one block's quantizer parameters (and latent weights) to map x_in -> y (lists of (1, seq, d)).
    Returns the per-step losses."""
    scales, latents, norms = trainable_parameters(block, cfg.train_latent, cfg.train_norms)
    opt = adamw(param_groups(scales, latents, norms, cfg.lr, cfg.lr_latent, cfg.lr_norm), cfg.fused_adamw)
    n = len(x_in)
    per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, total, cfg.min_lr_ratio))
    losses = []
    block.train()
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1009 + epoch))
        for k in range(per_epoch):
            idx = perm[k * cfg.batch_size:(k + 1) * cfg.batch_size].tolist()
            x = torch.cat([x_in[j] for j in idx]).to(device)
            t = torch.cat([y[j] for j in idx]).to(device)
            with autocast(cfg.precision, x.device.type):
                out = block_forward(block, x, kwargs)
            loss = reconstruction_loss(out.float(), t, cfg.loss, cfg.sink_ratio, cfg.sink_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
    block.eval()
    # free the gradients too: kept, they would grow memory with every block trained
    for p in [*scales.values(), *latents.values(), *norms.values()]:
        p.grad = None
        p.requires_grad_(False)
    return losses


@torch.no_grad()
def block_errors(teacher, student, windows, sink_ratio=20.0, device="cpu"):
    """Per block, ``error_stats`` of the student's block output on the student's own stream against the FP
    block's output on the FP stream: how far each block of a quantized model is from the FP model, as the
    model runs (errors of earlier blocks included). Works for any student (quantized or not)."""
    x_fp, kwargs = capture_block0_inputs(teacher, windows.to(device))
    x_fp = _stream(x_fp)
    x_q, rows = list(x_fp), []
    for i, (tb, sb) in enumerate(zip(decoder_layers(teacher), decoder_layers(student))):
        y = _run(tb, x_fp, kwargs, device)
        x_q = _run(sb, x_q, kwargs, device)
        _drop_caches(sb)
        rows.append({"block": i, **error_stats(x_q, y, sink_ratio)})
        x_fp = y
    return rows


def _identity(cfg, windows):
    return {**asdict(cfg), "windows": list(windows.shape), "windows_sum": int(windows.sum())}


def stage1_windows(samples, cfg):
    """The windows stage 1 trains on: the samples, or each cut into windows of ``cfg.seqlen`` tokens; with
    ``cfg.window_offset`` the samples are joined into one stream, its first ``window_offset`` tokens dropped, and
    the rest cut into windows of ``cfg.seqlen`` (or the sample length) tokens, the tail dropped."""
    seqlen = cfg.seqlen or samples.shape[1]
    if cfg.window_offset:
        if cfg.window_offset >= samples.shape[1]:
            raise ValueError(f"window_offset={cfg.window_offset} must be smaller than the sample length "
                             f"({samples.shape[1]} tokens)")
        samples = samples.reshape(1, -1)[:, cfg.window_offset:]
    return to_windows(samples, seqlen) if seqlen != samples.shape[1] else samples


def check_folder(out_dir, cfg, windows):
    """Start ``out_dir`` (its manifest, ``blockwise.json``) or check that it was written by the same configuration
    and samples, so that a rerun resumes only its own run; fields added to BlockwiseConfig after a folder was
    written take their defaults. Raises ValueError naming the differences; returns the run's identity."""
    identity = _identity(cfg, windows)
    os.makedirs(out_dir, exist_ok=True)
    manifest = os.path.join(out_dir, "blockwise.json")
    if not os.path.isfile(manifest):
        with open(manifest + ".tmp", "w") as f:
            json.dump({"identity": identity}, f)
        os.replace(manifest + ".tmp", manifest)
        return identity
    with open(manifest) as f:
        old = json.load(f)["identity"]
    old = {**asdict(BlockwiseConfig()), **old}
    if old != identity:
        diff = {k: (old.get(k), v) for k, v in identity.items() if old.get(k) != v}
        raise ValueError(f"cannot resume {out_dir}: written by a different configuration ("
                         + "; ".join(f"{k}: {a!r} vs now {b!r}" for k, (a, b) in diff.items())
                         + "). Use another out_dir.")
    return identity


def blockwise_reconstruct(teacher, student, windows, config=None, out_dir=None, device="cpu", progress=True,
                          stop_after_blocks=None):
    """Stage 1 of the two-stage recipe: reconstruct every decoder block of ``student`` (a quantized copy of
    ``teacher`` with learnable quantized layers) from the FP ``teacher`` on ``windows`` (n, seqlen) of
    teacher-written text. Trains in place; returns {"blocks": [per-block stats], "seconds", "cpu_seconds",
    "peak_rss_gib", "config"}. ``stop_after_blocks`` returns early (a simulated kill, for tests)."""
    cfg = (config or BlockwiseConfig()).validate()
    if not learnable_layers(student):
        raise ValueError("the student has no learnable quantized layers (DualBinaryLinear or UniformQuantLinear):"
                         " quantize it with quantize_model(model, 'fdb' or 'uniform', ...) first")
    if windows.dim() != 2 or len(windows) == 0:
        raise ValueError(f"windows must be a non-empty (n, seqlen) LongTensor, got shape {tuple(windows.shape)}")
    windows = stage1_windows(windows, cfg)
    t_blocks, s_blocks = decoder_layers(teacher), decoder_layers(student)
    if len(t_blocks) != len(s_blocks):
        raise ValueError(f"teacher has {len(t_blocks)} blocks, student {len(s_blocks)}")
    identity = check_folder(out_dir, cfg, windows) if out_dir else None  # saved with each block's checkpoint
    t0, c0 = time.time(), time.process_time()
    x_fp, kwargs = capture_block0_inputs(teacher, windows.to(device))
    x_fp = _stream(x_fp)
    x_q = list(x_fp)
    stats, done = [], 0
    bar = tqdm(total=len(s_blocks), desc="block-wise", disable=not progress)
    for i, (tb, sb) in enumerate(zip(t_blocks, s_blocks)):
        if stop_after_blocks is not None and done >= stop_after_blocks:
            break
        b0 = c0 if i == 0 else time.process_time()  # block 0 also pays for capturing the inputs
        path = os.path.join(out_dir, f"block_{i:03d}.pt") if out_dir else None
        tb.to(device), sb.to(device)
        y = _run(tb, x_fp, kwargs, device, precision=cfg.precision)
        trained = not (path and os.path.isfile(path))
        if not trained:
            ck = load_checkpoint(path)
            with torch.no_grad():
                for n, p in sb.named_parameters():
                    if n in ck["state"]:
                        p.copy_(ck["state"][n])
            stats.append(ck["stats"])
        else:
            x_in = x_q if cfg.inputs == "quant" else x_fp
            m = cfg.stats_samples or len(y)
            before = error_stats(_run(sb, x_in[:m], kwargs, device, precision=cfg.precision), y[:m],
                                 cfg.sink_ratio)
            _drop_caches(sb)
            bt, bc = time.time(), time.process_time()
            losses = train_block(sb, x_in, y, kwargs, cfg, seed=cfg.seed * 1000 + i, device=device,
                                 progress=progress, desc=f"block {i}")
            seconds, cpu_seconds = time.time() - bt, time.process_time() - bc
            out = _run(sb, x_in, kwargs, device, precision=cfg.precision)
            _drop_caches(sb)
            row = {"block": i, "before": before, "after": error_stats(out[:m], y[:m], cfg.sink_ratio),
                   "loss_first": losses[0], "loss_last": losses[-1], "steps": len(losses), "seconds": seconds,
                   "cpu_seconds": cpu_seconds}
        if not (trained and cfg.inputs == "quant"):  # else the trained block's output on x_q is ``out`` already
            out = _run(sb, x_q, kwargs, device, precision=cfg.precision)
            _drop_caches(sb)
        x_q = out
        if trained:  # cpu_seconds: the optimiser steps; block_cpu_seconds: the whole block (its targets, the
            # before/after statistics and the stream passed on to the next block)
            row["block_cpu_seconds"] = time.process_time() - b0
            stats.append(row)
            if path:
                atomic_save({"state": learnable_state(sb), "stats": row, "identity": identity}, path)
            done += 1
        x_fp = y
        if device != "cpu":
            tb.to("cpu"), sb.to("cpu")
        bar.update(1)
        bar.set_postfix(err=f"{stats[-1]['after']['rel_err_ordinary']:.3f}")
    bar.close()
    return {"blocks": stats, "config": asdict(cfg), "seconds": time.time() - t0,
            "cpu_seconds": time.process_time() - c0, "peak_rss_gib": peak_rss_gib(),
            "completed": len(stats) == len(s_blocks)}
