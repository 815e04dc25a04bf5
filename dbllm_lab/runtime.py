"""What every training job here shares: its optimiser, precision, atomic checkpoint writes and its peak memory."""
import contextlib
import math
import os
import resource

import torch


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a killed process never leaves a half-written file."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


PRECISIONS = ("fp32", "bf16")


def check_precision(value):
    if value not in PRECISIONS:
        raise ValueError(f"precision={value!r} is not supported; use one of {PRECISIONS}")


def autocast(precision, device_type="cpu"):
    """bf16 autocast for ``precision == "bf16"``; for "fp32" no context at all, so that a caller's enclosing
    autocast stays in force."""
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cosine_lr(step, steps, min_lr_ratio, warmup=0):
    """Multiplier of the peak lr at optimiser step ``step`` (0-based), the one schedule of both stages: linear warm-up
    over ``warmup`` steps, then cosine from 1 to ``min_lr_ratio`` at step ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, steps - warmup)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(step - warmup, span) / span))


def check_min_lr_ratio(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"min_lr_ratio={value!r} must be a number in [0, 1]")


def load_checkpoint(path):
    """A checkpoint written by ``atomic_save``, read with ``torch.load(weights_only=True)``: tensors and plain values
    only, nothing unpickled, so a run folder from elsewhere cannot execute code. Anything else is refused."""
    import pickle
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} holds objects other than tensors and plain values; refusing to unpickle it "
                         f"({str(e).splitlines()[0][:200]})") from None


def peak_rss_gib():
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def adamw(groups, fused=True):
    """AdamW with betas (0.9, 0.95) over the parameter ``groups`` (each with its lr and weight_decay).
    ``fused``: torch's fused update, one pass over each tensor per step instead of a pass per operation
    (``bench/train_speed.py`` times both); False: torch's unfused default (a per-tensor loop on the CPU, the foreach
    form on CUDA). The two differ by rounding only."""
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), fused=fused or None)
