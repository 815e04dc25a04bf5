"""Two things every long job here needs: atomic checkpoint writes and its peak memory."""
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
