"""Training an FDB student against its full-precision teacher (DB-LLM, method.md §1-§3).

What trains: the FDB scales a1, a2 of every ``DualBinaryLinear`` (method.md §1, "what trains"); with
``train_latent=True`` also the latent weights through the STE; with ``train_norms=True`` also the RMSNorm
weights (kept in full precision as in every row, so bits per weight do not change). Everything else
(embeddings, lm_head) stays frozen. Loss: "dad" (method.md §2, with ``gamma``), "kd" (plain KL) or "ce" (next-token
cross-entropy on the generated tokens), see ``dbllm_lab.distill``.

Optimiser: AdamW, linear warm-up then cosine decay to ``min_lr_ratio * lr``, gradient accumulation,
gradient-norm clipping. The data order is a function of (seed, step) only: epoch e visits the windows in
``randperm(n, seed + e)`` order. Checkpoints (trainable tensors, optimiser, scheduler, RNG states, loss
curve) are written every ``ckpt_every`` steps atomically (temp file + os.replace); a killed run resumed
from its checkpoint reproduces the uninterrupted loss curve. Resuming a checkpoint written with a different
configuration raises a ValueError that names the differing fields.

    cfg = TrainConfig(loss="dad", gamma=1.0, steps=200, seqlen=128, batch_size=4, lr=1e-3)
    result = train(student, windows, teacher=teacher, config=cfg, out_dir="checkpoints/dad")
"""
import copy
import csv
import json
import os
import random
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from tqdm.auto import tqdm

from .blockwise import BlockwiseConfig, blockwise_reconstruct, check_folder, stage1_windows
from .data import to_windows
from .distill import LOSSES, check_gamma, distill_loss
from .layers import (DualBinaryLinear, FakeQuantLinear, learnable_layers, learnable_state, param_groups,
                     trainable_parameters)
from .model import set_module
from .quant import GROUP_SIZE
from .runtime import (adamw, atomic_save, autocast, check_min_lr_ratio, check_precision, cosine_lr,
                      load_checkpoint, peak_rss_gib)

CHECKPOINT = "checkpoint.pt"
# Fields that do not change the loss curve; a resumed run may change them.
NOT_IDENTITY = ("ckpt_every", "log_every")


@dataclass
class TrainConfig:
    loss: str = "dad"            # "dad" | "kd" | "ce"
    gamma: float = 0.0           # DAD's gamma in [0, 1] (best of the committed end-to-end sweep)
    steps: int = 60              # optimiser steps
    seqlen: int = 128            # training window length (samples are cut into windows of this length)
    batch_size: int = 2          # windows per micro-batch
    grad_accum: int = 1          # micro-batches per optimiser step
    lr: float = 1e-2             # peak learning rate of the quantizer parameters (FDB a1, a2)
    lr_latent: float = 1e-5      # peak learning rate of the latent weights (train_latent=True)
    train_latent: bool = False   # also train the latent weights through the STE
    train_norms: bool = False    # also train the RMSNorm weights (full precision; a per-input-channel scale)
    lr_norm: float = 1e-3        # peak learning rate of the norm weights (train_norms=True)
    warmup: int = 3              # linear warm-up steps
    min_lr_ratio: float = 0.1    # cosine decays to min_lr_ratio * lr
    weight_decay: float = 0.0    # AdamW decay (on latent weights only; scales never decay)
    max_grad_norm: float = 1.0   # gradient clipping (0 = off)
    precision: str = "fp32"      # "bf16": forward passes under bf16 autocast (loss in fp32); "fp32": none
    fused_adamw: bool = True     # torch's fused AdamW update (runtime.adamw); False: torch's unfused one
    seed: int = 0
    chunk: int = 256             # positions per chunk in the vocabulary-wide loss reductions
    ckpt_every: int = 10         # checkpoint every N steps (0 = only at the end when out_dir is set)
    log_every: int = 10          # tqdm postfix refresh

    def validate(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r} is not supported; use one of {LOSSES}")
        check_gamma(self.gamma)
        for key in ("steps", "seqlen", "batch_size", "grad_accum"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{key}={v!r} is not allowed: it must be a positive integer")
        if self.seqlen < 2:
            raise ValueError(f"seqlen={self.seqlen!r} must be >= 2")
        for key in ("lr", "lr_latent", "lr_norm"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key}={getattr(self, key)!r} must be > 0")
        for key in ("warmup", "ckpt_every", "log_every"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise ValueError(f"{key}={getattr(self, key)!r} must be an integer >= 0")
        check_min_lr_ratio(self.min_lr_ratio)
        check_precision(self.precision)
        return self

    def identity(self):
        return {k: v for k, v in asdict(self).items() if k not in NOT_IDENTITY}


def numpy_rng_state():
    """numpy's global RNG state with its key array as a tensor, so that ``torch.load(weights_only=True)`` reads it."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, torch.from_numpy(keys.copy()), int(pos), int(has_gauss), float(cached)]


def batch_indices(counter, batch_size, n, seed):
    """Window indices of micro-batch ``counter``: a stream of per-epoch permutations (seed + epoch)."""
    out, perms = [], {}
    for k in range(counter * batch_size, (counter + 1) * batch_size):
        e = k // n
        if e not in perms:
            perms[e] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + e))
        out.append(int(perms[e][k % n]))
    return torch.tensor(out)


@torch.no_grad()
def freeze_quantized(model):
    """Replace every learnable quantized layer (DualBinaryLinear, UniformQuantLinear) by a FakeQuantLinear holding
    its current w_hat (computed once by the layer's reference ``dequantized_weight``): the trained student becomes
    a plain inference model without latent weights or trainable quantizer parameters. Same outputs."""
    for name, m in learnable_layers(model).items():
        kind = "fdb" if isinstance(m, DualBinaryLinear) else "uniform"
        set_module(model, name, FakeQuantLinear(m.dequantized_weight(), m.bias, m.bits_per_weight, kind))
    return model


def _fingerprint(windows):
    return {"shape": list(windows.shape), "sum": int(windows.sum()), "head": windows.reshape(-1)[:16].tolist()}


def write_curve(history, out_dir, stem="curve"):
    """The loss curve as CSV and JSON (atomically) in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    if not history:
        return
    path = os.path.join(out_dir, stem)
    with open(path + ".csv.tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
    os.replace(path + ".csv.tmp", path + ".csv")
    with open(path + ".json.tmp", "w") as f:
        json.dump(history, f)
    os.replace(path + ".json.tmp", path + ".json")


@torch.no_grad()
def teacher_logits_cache(teacher, windows, batch_size=4, dtype=torch.float16, progress=True):
    """Teacher logits for every training window, (n, seqlen, vocab) in ``dtype`` (n*seqlen*vocab*2 bytes
    in fp16: only worth it when several runs share the same windows and it fits in memory)."""
    teacher.eval()
    out = []
    for i in tqdm(range(0, len(windows), batch_size), desc="teacher logits", disable=not progress):
        out.append(teacher(windows[i:i + batch_size]).logits.to(dtype))
    return torch.cat(out)


def train(student, data, teacher=None, config=None, out_dir=None, resume=True, teacher_logits=None,
          progress=True, stop_after=None):
    """Train the student's FDB scales (and optionally latent weights) for ``config.steps`` steps.

    data: (n, L) LongTensor of token ids (e.g. ``generate_samples``), cut into windows of ``config.seqlen``.
    teacher: the FP model (needed for "dad"/"kd" unless ``teacher_logits`` (n_windows, seqlen, vocab) is
    given). out_dir: where checkpoints and the loss curve (curve.csv / curve.json) go; with ``resume`` an
    existing checkpoint there is continued. stop_after: return after this many steps of this call without
    checkpointing (simulates a killed run; for tests).

    Returns {"history": [{step, loss, lr, seconds, cpu_seconds, tokens}], "config", "seconds",
    "cpu_seconds", "peak_rss_gib", "steps_done", "completed"}.
    """
    cfg = (config or TrainConfig()).validate()
    windows = to_windows(data, cfg.seqlen).to(next(student.parameters()).device)
    n = len(windows)
    if cfg.loss != "ce" and teacher is None and teacher_logits is None:
        raise ValueError(f"loss={cfg.loss!r} needs the FP teacher (teacher=) or cached teacher_logits=")
    if teacher_logits is not None and teacher_logits.shape[:2] != windows.shape:
        raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} do not match the windows "
                         f"{tuple(windows.shape)}")
    scales, latents, norms = trainable_parameters(student, cfg.train_latent, cfg.train_norms)
    opt = adamw(param_groups(scales, latents, norms, cfg.lr, cfg.lr_latent, cfg.lr_norm, cfg.weight_decay),
                cfg.fused_adamw)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_lr(s, cfg.steps, cfg.min_lr_ratio, cfg.warmup))
    named = {**scales, **latents, **norms}

    step, history, seconds, cpu_seconds = 0, [], 0.0, 0.0
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    ckpt_path = os.path.join(out_dir, CHECKPOINT) if out_dir else None
    if ckpt_path and resume and os.path.isfile(ckpt_path):
        ck = load_checkpoint(ckpt_path)
        old = ck["config"]
        diff = {k: (old.get(k), v) for k, v in cfg.identity().items() if old.get(k) != v}
        if ck["data"] != _fingerprint(windows):
            diff["data"] = ("other windows", f"{tuple(windows.shape)} windows")
        if sorted(ck["params"]) != sorted(named):
            diff["trainable parameters"] = (f"{len(ck['params'])} tensors", f"{len(named)} tensors")
        if diff:
            raise ValueError(f"cannot resume {ckpt_path}: it was written by a different configuration ("
                             + "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
                             + "). Use another out_dir or resume=False.")
        with torch.no_grad():
            for k, p in named.items():
                p.copy_(ck["params"][k])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["rng"]["torch"])
        random.setstate(ck["rng"]["python"])
        name, keys, pos, has_gauss, cached = ck["rng"]["numpy"]
        np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
        step, history = ck["step"], ck["history"]
        seconds, cpu_seconds = ck["seconds"], ck["cpu_seconds"]

    def save():
        if not ckpt_path:
            return
        os.makedirs(out_dir, exist_ok=True)
        atomic_save({"config": cfg.identity(), "step": step, "data": _fingerprint(windows),
                      "params": {k: p.detach().clone() for k, p in named.items()},
                      "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                      "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                              "numpy": numpy_rng_state()},
                      "history": history, "seconds": seconds, "cpu_seconds": cpu_seconds}, ckpt_path)
        write_curve(history, out_dir)

    student.train()
    if teacher is not None:
        teacher.eval()
    params = list(named.values())
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.loss}", disable=not progress)
    done_here = 0
    while step < cfg.steps:
        if stop_after is not None and done_here >= stop_after:
            break
        t0, c0 = time.time(), time.process_time()
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(cfg.grad_accum):
            idx = batch_indices(step * cfg.grad_accum + micro, cfg.batch_size, n, cfg.seed)
            x = windows[idx]
            t_logits = None
            with autocast(cfg.precision, x.device.type):
                if cfg.loss != "ce":
                    if teacher_logits is not None:
                        t_logits = teacher_logits[idx]
                    else:
                        with torch.no_grad():
                            t_logits = teacher(x).logits.float()
                s_logits = student(x).logits.float()
            loss = distill_loss(cfg.loss, s_logits, x, t_logits, cfg.gamma, cfg.chunk) / cfg.grad_accum
            loss.backward()
            total += loss.item()
            del s_logits, t_logits, loss
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        step += 1
        done_here += 1
        seconds += time.time() - t0
        cpu_seconds += time.process_time() - c0
        history.append({"step": step, "loss": total, "lr": lr, "seconds": round(seconds, 3),
                        "cpu_seconds": round(cpu_seconds, 3), "tokens": step * cfg.grad_accum * cfg.batch_size
                        * cfg.seqlen})
        bar.update(1)
        if cfg.log_every and (step % cfg.log_every == 0 or step == 1):
            bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}")
        if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.steps:
            save()
    bar.close()
    completed = step >= cfg.steps
    if completed:
        save()
    student.eval()
    for p in params:
        p.requires_grad_(False)
    return {"history": history, "config": asdict(cfg), "seconds": seconds, "cpu_seconds": cpu_seconds,
            "peak_rss_gib": peak_rss_gib(), "steps_done": step, "completed": completed}



QUANTIZERS = ("fdb", "uniform")
STAGES = ("blockwise", "e2e", "both")


def build_student(teacher, quant="fdb", init="clip", group_size=GROUP_SIZE, calib_windows=None, train_latent=False,
                  progress=True):
    """A deep copy of ``teacher`` with learnable W2 layers; returns (student, report).

    quant "fdb": ``quantize_model(..., "fdb", init=init)`` (``calib_windows``, teacher-written and never the
    evaluation text, feed init="gptq"); quant "uniform": the learnable uniform 2-bit grid from RTN + clip search."""
    from .quantize import quantize_model
    if quant not in QUANTIZERS:
        raise ValueError(f"quant={quant!r} is not supported; use one of {QUANTIZERS}")
    student = copy.deepcopy(teacher)
    if quant == "fdb":
        report = quantize_model(student, "fdb", bits=2, group_size=group_size, init=init,
                                calib_windows=calib_windows if init == "gptq" else None,
                                train_latent=train_latent, progress=progress)
    else:
        report = quantize_model(student, "uniform", bits=2, group_size=group_size, train_latent=train_latent,
                                progress=progress)
    return student, report


def train_two_stage(teacher, data, stage="both", quant="fdb", blockwise=None, config=None, out_dir=None,
                    stage1_dir=None, init="clip", group_size=GROUP_SIZE, calib_windows=None, device="cpu", progress=True,
                    e2e_data=None):
    """The two-stage recipe: build a learnable W2 student from ``teacher``, then
    stage 1 (``blockwise.blockwise_reconstruct`` with ``blockwise``, a BlockwiseConfig) on the samples ``data``
    (n, L) and/or stage 2 (``train``: end-to-end DAD / KD / CE with ``config``, a TrainConfig) from its result,
    on ``e2e_data`` when given (e.g. more samples than stage 1 can afford), else on ``data``.

    Checkpoints: stage 1 per block under ``stage1_dir`` (default ``out_dir/stage1``; rows that share a stage 1
    may share this folder), stage 2 under ``out_dir/e2e``; a rerun resumes. Returns (student, info) with the
    CPU minutes and tokens of each stage, the per-block reconstruction statistics and the e2e loss curve."""
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r} is not supported; use one of {STAGES}")
    for key, d in (("data", data), ("e2e_data", data if e2e_data is None else e2e_data)):
        if not torch.is_tensor(d) or d.dim() != 2 or len(d) == 0:
            raise ValueError(f"{key} must be a non-empty (n, length) LongTensor of token ids, got "
                             f"{tuple(getattr(d, 'shape', ())) or type(d).__name__}")
    bw_cfg = (blockwise or BlockwiseConfig()).validate()
    cfg = (config or TrainConfig()).validate()
    c0 = time.process_time()
    student, report = build_student(teacher, quant=quant, init=init, group_size=group_size,
                                    calib_windows=calib_windows, progress=progress)
    # init_cpu_minutes: building the W2 student (e.g. FDB's clip search), remeasured on every call, not training
    info = {"bits_per_weight": report["bits_per_weight"], "init_cpu_minutes": round((time.process_time() - c0) / 60, 2),
            "stage1_cpu_minutes": 0.0, "stage2_cpu_minutes": 0.0, "stage1_tokens": 0, "stage2_tokens": 0}
    if stage in ("blockwise", "both"):
        stage1_dir = stage1_dir or (os.path.join(out_dir, "stage1") if out_dir else None)
        done = os.path.join(stage1_dir, "stage1_result.pt") if stage1_dir else None
        windows = stage1_windows(data, bw_cfg)  # what stage 1 trains on (cut when bw_cfg.seqlen)
        if done and os.path.isfile(done):
            check_folder(stage1_dir, bw_cfg, windows)  # another configuration's is not reused
            ck = load_checkpoint(done)
            student.load_state_dict(ck["state"], strict=False)
            r = ck["result"]
        else:
            r = blockwise_reconstruct(teacher, student, data, bw_cfg, out_dir=stage1_dir, device=device,
                                      progress=progress)
            r["cpu_seconds"] = sum(b["cpu_seconds"] for b in r["blocks"])  # also right after a resume
            if done:
                atomic_save({"state": learnable_state(student), "result": r}, done)
        # stage1_cpu_minutes: whole blocks (targets, statistics, stream passes); stages checkpointed before blocks
        # recorded that count only their optimiser steps (stage1_cpu_counts says which)
        whole = all("block_cpu_seconds" in b for b in r["blocks"])
        if device != "cpu":  # stage 1 streams the blocks back to the CPU; the models run whole on the device
            teacher.to(device), student.to(device)
        info.update(stage1_cpu_minutes=round(sum(b["block_cpu_seconds" if whole else "cpu_seconds"]
                                                 for b in r["blocks"]) / 60, 2),
                    stage1_optimiser_cpu_minutes=round(r["cpu_seconds"] / 60, 2),
                    stage1_cpu_counts="whole blocks" if whole else "optimiser steps only", stage1_blocks=r["blocks"],
                    stage1_tokens=bw_cfg.epochs * windows.numel(),
                    stage1_peak_rss_gib=round(r["peak_rss_gib"], 2))
    if stage in ("e2e", "both"):
        r = train(student, data if e2e_data is None else e2e_data, teacher=teacher, config=cfg, out_dir=os.path.join(out_dir, "e2e") if out_dir else None,
                  progress=progress)
        info.update(stage2_cpu_minutes=round(r["cpu_seconds"] / 60, 2), stage2_tokens=r["history"][-1]["tokens"],
                    stage2_final_loss=r["history"][-1]["loss"], stage2_curve=r["history"],
                    stage2_peak_rss_gib=round(r["peak_rss_gib"], 2))
    info["train_cpu_minutes"] = round(info["stage1_cpu_minutes"] + info["stage2_cpu_minutes"], 2)
    info["peak_rss_gib"] = round(peak_rss_gib(), 2)
    return student, info


def config_from_dict(d, cls=TrainConfig):
    """A ``cls`` (TrainConfig or blockwise.BlockwiseConfig) from a dict (e.g. a papermill parameters cell),
    refusing unknown keys."""
    known = {f.name for f in fields(cls)}
    bad = sorted(set(d) - known)
    if bad:
        raise ValueError(f"unknown {cls.__name__} settings {bad}; allowed: {sorted(known)}")
    return cls(**d).validate()
