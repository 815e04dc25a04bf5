"""Perplexity with the GPTQ protocol (method.md §5): text tokenised once, cut into non-overlapping
windows of ``seqlen`` tokens (tail dropped), PPL = exp(mean next-token NLL over all windows).

The evaluation protocol of this project (docs/protocol.md): on WikiText-2 test at seqlen 512 the first
``DEV_WINDOWS`` windows are the **dev** windows, where recipes are compared and chosen; the rest (windows 41-589)
are **held out**, where headlines are reported. ``perplexity`` scores dev, held-out and full in one pass."""
import json
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import DATASETS, c4_windows, load_text, tokenize

DEV_WINDOWS = 40  # WikiText-2 test windows 1-40: dev (choosing); 41-: held out (reporting)


@dataclass
class PPLResult:
    ppl: float
    nll: float
    dataset: str
    split: str
    seqlen: int
    windows: int
    tokens: int
    dtype: str
    model: str = ""
    seconds: float = 0.0
    note: str = ""
    ppl_dev: float = None      # the first DEV_WINDOWS windows (WikiText-2 test only)
    ppl_heldout: float = None  # the windows after them (WikiText-2 test only, when there are any)
    extra: dict = field(default_factory=dict)

    def __str__(self):
        corpus = f"{self.dataset}/{self.split}" if self.split else self.dataset  # a local file has no split
        split = "" if self.ppl_dev is None else f"; dev {self.ppl_dev:.3f}" + (
            "" if self.ppl_heldout is None else f", held-out {self.ppl_heldout:.3f}")
        return (f"PPL {self.ppl:.3f} on {corpus} ({self.windows} windows x {self.seqlen} tokens = "
                f"{self.tokens} predicted tokens{split}; {self.dtype}, model {self.model}, {self.seconds:.1f} s)"
                + (f" [{self.note}]" if self.note else ""))

    def to_dict(self):
        return asdict(self)

    def to_json(self, path=None):
        text = json.dumps(self.to_dict(), indent=2)
        if path:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text


def max_context(model):
    return int(getattr(model.config, "max_position_embeddings", 0) or 0) or None


def check_seqlen(model, seqlen):
    limit = max_context(model)
    if not isinstance(seqlen, int) or seqlen < 2 or (limit and seqlen > limit):
        raise ValueError(f"seqlen={seqlen!r} is not allowed: it must be an integer in [2, {limit or 'inf'}] "
                         f"(the model's context is {limit} tokens)")


def windows_from_tokens(ids, seqlen, max_windows=None):
    """Non-overlapping windows of seqlen tokens, tail dropped, as (n, seqlen)."""
    n = ids.numel() // seqlen
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows={max_windows!r} must be >= 1 or None")
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


def eval_windows(model, tokenizer=None, dataset="wikitext2", split="test", seqlen=512, max_windows=None,
                 data_dir=None):
    """The (n, seqlen) token windows the protocol evaluates on."""
    if dataset == "c4":
        return c4_windows(tokenizer, seqlen, n=max_windows or 256, data_dir=data_dir)
    return windows_from_tokens(tokenize(tokenizer, load_text(dataset, split, data_dir)), seqlen, max_windows)


@torch.no_grad()
def window_nll(model, windows, batch_size=1, device=None, progress=True, desc="ppl", per_position=False,
               per_window=False):
    """Sum of next-token NLL over the windows and the number of predicted tokens. ``per_position``: the sum as a
    float64 tensor (seqlen - 1,), entry t for the token at position t + 1, and the number of windows.
    ``per_window``: a float64 tensor (windows,) of each window's NLL sum, and the tokens predicted per window."""
    device = device or next(model.parameters()).device
    total, count = torch.zeros(windows.shape[1] - 1, dtype=torch.float64), 0
    by_window = []
    for i in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, leave=False):
        batch = windows[i:i + batch_size].to(device)
        logits = model(batch).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
        total += nll.view(len(batch), -1).sum(0).double().cpu()
        by_window.append(nll.view(len(batch), -1).double().sum(1).cpu())
        count += len(batch)
    if per_window:
        return torch.cat(by_window), total.numel()
    if per_position:
        return total, count
    return total.sum().item(), count * total.numel()


def perplexity(model, tokenizer, dataset="wikitext2", split="test", seqlen=512, max_windows=None, batch_size=1,
               device=None, data_dir=None, progress=True, windows=None):
    """Perplexity of ``model`` with the GPTQ protocol; returns a PPLResult that carries its settings.

    Memory holds one batch of windows. ``windows`` may be passed directly to skip loading text.
    """
    check_seqlen(model, seqlen)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    t0 = time.time()
    from_split = windows is None  # dev / held-out only for windows cut here from the split
    if from_split:
        windows = eval_windows(model, tokenizer, dataset, split, seqlen, max_windows, data_dir)
    was_training = model.training
    model.eval()
    by_window, per = window_nll(model, windows, batch_size, device, progress, per_window=True)
    model.train(was_training)
    total, count = by_window.sum().item(), per * len(windows)
    nll = total / count
    dev = heldout = None
    if from_split and dataset == "wikitext2" and split == "test" and seqlen == 512 and len(windows) >= DEV_WINDOWS:
        dev = math.exp(by_window[:DEV_WINDOWS].sum().item() / (per * DEV_WINDOWS))
        if len(windows) > DEV_WINDOWS:
            heldout = math.exp(by_window[DEV_WINDOWS:].sum().item() / (per * (len(windows) - DEV_WINDOWS)))
    note = ""
    if getattr(model, "name_or_path", "") == "smollm2-135m":
        note = "reference is the embedded GGUF Q4_1 model dequantized to float, not the FP16 checkpoint"
    split = split if dataset in DATASETS else ""  # a text file is read whole: no split
    return PPLResult(ppl=math.exp(nll), nll=nll, dataset=str(dataset), split=split, seqlen=seqlen,
                     windows=len(windows), tokens=count, dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
                     model=getattr(model, "name_or_path", ""), seconds=time.time() - t0, note=note,
                     ppl_dev=dev, ppl_heldout=heldout)
