"""What every training job here shares: its optimiser, atomic checkpoint writes and its peak memory."""
import os
import resource

import torch


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a killed process never leaves a half-written file."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def peak_rss_gib():
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# settings added to BlockwiseConfig / TrainConfig after checkpoints were written, with the value they had then:
# a resume compares an old checkpoint's settings with these filled in, not with today's defaults
ADDED_LATER = {"fused_adamw": False, "window_offset": 0}


def adamw(groups, fused=True):
    """AdamW with betas (0.9, 0.95) over the parameter ``groups`` (each with its lr and weight_decay).
    ``fused``: torch's fused update, one pass over each tensor per step instead of a pass per operation
    (``bench/train_speed.py`` times both); False: torch's unfused default (a per-tensor loop on the CPU, the foreach
    form on CUDA), which checkpoints written before ``fused_adamw`` existed used. The two differ by rounding only."""
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), fused=fused or None)
