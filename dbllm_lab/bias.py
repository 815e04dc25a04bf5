"""Head-class prediction bias (method.md §7).

Rank tokens by frequency in a reference text; the head is the top-k. For every position of some text,
take the teacher's predictive entropy (nats; the ambiguity of the position) and the model's argmax
prediction. Per teacher-entropy bucket, report the share of the model's argmax predictions that fall in
the head. Quantization should raise that share on ambiguous (high-entropy) positions; DAD should pull it
back. Buckets are fixed by the teacher's entropies, so every model is measured on the same positions.

    head = head_tokens(reference_ids, k=100)
    ent = teacher_entropies(teacher, windows)
    edges = entropy_edges(ent, buckets=4)
    fp = head_class_bias(teacher, windows, head, ent, edges)
    q = head_class_bias(student, windows, head, ent, edges)
    excess_high = q["buckets"][-1]["head_share"] - fp["buckets"][-1]["head_share"]
"""
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def head_tokens(reference_ids, k=100, vocab_size=None):
    """The ``k`` most frequent token ids of ``reference_ids`` (any shape), most frequent first."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} must be a positive integer (the number of head tokens)")
    ids = torch.as_tensor(reference_ids).reshape(-1).long()
    counts = torch.bincount(ids, minlength=vocab_size or 0)
    if k > int((counts > 0).sum()):
        raise ValueError(f"k={k} exceeds the {int((counts > 0).sum())} distinct tokens of the reference text")
    return torch.argsort(counts, descending=True, stable=True)[:k]


@torch.no_grad()
def _per_position(model, windows, batch_size, progress, desc):
    """(entropy, argmax) of the model's next-token distribution at every position, flattened."""
    model.eval()
    ents, tops = [], []
    for i in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, leave=False):
        logits = model(windows[i:i + batch_size]).logits.float()
        logp = F.log_softmax(logits, -1)
        ents.append(-(logp.exp() * logp).sum(-1).reshape(-1))
        tops.append(logits.argmax(-1).reshape(-1))
        del logits, logp
    return torch.cat(ents), torch.cat(tops)


def teacher_entropies(teacher, windows, batch_size=1, progress=True):
    """Teacher predictive entropy (nats) at every position of ``windows`` (n, seqlen), flattened."""
    return _per_position(teacher, windows, batch_size, progress, "teacher entropy")[0]


def entropy_edges(entropies, buckets=4):
    """Bucket edges at the teacher-entropy quantiles (equal-count buckets), first edge 0, last inf."""
    if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
        raise ValueError(f"buckets={buckets!r} must be a positive integer")
    q = torch.quantile(entropies.float(), torch.linspace(0, 1, buckets + 1)[1:-1]).tolist()
    return [0.0] + q + [float("inf")]


def head_class_bias(model, windows, head, teacher_entropy, edges, batch_size=1, progress=True):
    """Share of ``model``'s argmax predictions inside ``head``, per teacher-entropy bucket and overall.

    windows: (n, seqlen) token ids; head: LongTensor of head-token ids; teacher_entropy: from
    ``teacher_entropies`` on the same windows; edges: bucket edges (``entropy_edges``).
    Returns {"overall": share, "buckets": [{"lo", "hi", "positions", "head_share", "mean_entropy"}], "k"}.
    """
    _, top = _per_position(model, windows, batch_size, progress, "head-class bias")
    if top.shape != teacher_entropy.shape:
        raise ValueError(f"teacher_entropy has {teacher_entropy.numel()} positions, the windows {top.numel()}")
    if len(edges) < 2:
        raise ValueError(f"edges={edges!r} needs at least two values")
    in_head = torch.isin(top, torch.as_tensor(head))
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (teacher_entropy >= lo) & (teacher_entropy < hi)
        cnt = int(m.sum())
        out.append({"lo": float(lo), "hi": float(hi), "positions": cnt,
                    "head_share": float(in_head[m].float().mean()) if cnt else float("nan"),
                    "mean_entropy": float(teacher_entropy[m].mean()) if cnt else float("nan")})
    return {"overall": float(in_head.float().mean()), "buckets": out, "k": int(len(head))}
