"""Head-class bias statistic (method.md §7)."""
import pytest
import torch

from dbllm_lab.bias import entropy_edges, head_class_bias, head_tokens, teacher_entropies
from dbllm_lab.model import tiny_llama


def test_head_tokens_are_the_most_frequent():
    ids = torch.tensor([5, 5, 5, 2, 2, 9, 1, 1, 1, 1])
    assert head_tokens(ids, 2).tolist() == [1, 5]
    with pytest.raises(ValueError, match="k="):
        head_tokens(ids, 0)
    with pytest.raises(ValueError, match="distinct"):
        head_tokens(ids, 9)


class _Fixed(torch.nn.Module):
    """A 'model' whose logits are given: lets the test know every argmax and entropy."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return type("Out", (), {"logits": self.logits[:len(x)]})()


def test_shares_per_bucket_are_counted_exactly():
    V = 6
    # 1 window of 4 positions: two confident (low entropy), two flat (high entropy) teacher positions
    t = torch.full((1, 4, V), -10.0)
    t[0, 0, 3] = t[0, 1, 4] = 10.0
    t[0, 2] = t[0, 3] = 0.0
    t[0, 2, 5] = t[0, 3, 2] = 0.1
    teacher = _Fixed(t)
    w = torch.zeros(1, 4, dtype=torch.long)
    ent = teacher_entropies(teacher, w, progress=False)
    assert ent[:2].max() < 0.01 and ent[2:].min() > 1.5
    edges = entropy_edges(ent, 2)
    head = torch.tensor([0, 1])
    s = torch.full((1, 4, V), 0.0)
    s[0, 0, 3] = 5  # low bucket: not head
    s[0, 1, 0] = 5  # low bucket: head
    s[0, 2, 1] = 5  # high bucket: head
    s[0, 3, 0] = 5  # high bucket: head
    r = head_class_bias(_Fixed(s), w, head, ent, edges, progress=False)
    assert [b["positions"] for b in r["buckets"]] == [2, 2]
    assert r["buckets"][0]["head_share"] == 0.5 and r["buckets"][1]["head_share"] == 1.0
    assert r["overall"] == 0.75
    rt = head_class_bias(teacher, w, head, ent, edges, progress=False)
    assert rt["overall"] == 0.0


def test_runs_on_a_real_model():
    m = tiny_llama(vocab_size=64)
    w = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    ent = teacher_entropies(m, w, progress=False)
    edges = entropy_edges(ent, 3)
    r = head_class_bias(m, w, head_tokens(w, 5), ent, edges, progress=False)
    assert sum(b["positions"] for b in r["buckets"]) == 2 * 16
    assert 0.0 <= r["overall"] <= 1.0 and r["k"] == 5
    with pytest.raises(ValueError, match="positions"):
        head_class_bias(m, w[:1], head_tokens(w, 5), ent, edges, progress=False)
