"""DAD / KD / CE losses (method.md §2)."""
import pytest
import torch
import torch.nn.functional as F

from dbllm_lab.distill import (ce_loss, dad_loss, dad_weights, distill_loss, kd_loss, token_stats, weighted_kl)


def _logits(seed, shape=(2, 7, 50), scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def test_stats_match_direct_formulas():
    s, t = _logits(0), _logits(1)
    kl, h_t, h_s = token_stats(s, t, chunk=3)
    ls, lt = F.log_softmax(s, -1).reshape(-1, 50), F.log_softmax(t, -1).reshape(-1, 50)
    ref = F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(kl, ref, atol=1e-5)
    assert torch.allclose(h_t, -(lt.exp() * lt).sum(-1), atol=1e-5)
    assert torch.allclose(h_s, -(ls.exp() * ls).sum(-1), atol=1e-5)
    assert (kl >= -1e-6).all()


def test_dad_with_unit_weights_is_kd():
    s, t = _logits(2), _logits(3)
    kl, _, _ = token_stats(s, t)
    assert torch.allclose(weighted_kl(kl, torch.ones_like(kl)), kd_loss(s, t), atol=1e-6)
    # weights all equal (any constant) also give KD
    assert torch.allclose(weighted_kl(kl, torch.full_like(kl, 3.7)), kd_loss(s, t), atol=1e-6)


def test_dad_is_the_entropy_weighted_mean():
    s, t = _logits(4), _logits(5)
    kl, h_t, h_s = token_stats(s, t)
    for gamma in (0.0, 0.3, 1.0):
        w = h_t ** gamma * h_s ** (1 - gamma)
        assert torch.allclose(dad_loss(s, t, gamma), (w * kl).sum() / w.sum(), atol=1e-6)
    # gamma = 1 only uses the teacher: changing the student's entropy profile leaves the weights
    assert torch.allclose(dad_weights(h_t, h_s, 1.0), h_t)
    assert torch.allclose(dad_weights(h_t, h_s, 0.0), h_s)
    # not KD in general
    assert not torch.allclose(dad_loss(s, t, 1.0), kd_loss(s, t))


def test_weights_are_detached_and_gradients_flow():
    s = _logits(6).requires_grad_(True)
    t = _logits(7)
    loss = dad_loss(s, t, 0.5, chunk=4)
    loss.backward()
    g_chunked = s.grad.clone()
    # same gradient as an unchunked reference with detached weights
    s2 = s.detach().clone().requires_grad_(True)
    ls, lt = F.log_softmax(s2, -1), F.log_softmax(t, -1)
    kl = (lt.exp() * (lt - ls)).sum(-1).reshape(-1)
    h_t = -(lt.exp() * lt).sum(-1).reshape(-1)
    h_s = -(ls.exp() * ls).sum(-1).reshape(-1).detach()
    w = h_t ** 0.5 * h_s ** 0.5
    ((w * kl).sum() / w.sum()).backward()
    assert torch.allclose(g_chunked, s2.grad, atol=1e-6)


def test_identical_distributions_give_zero():
    t = _logits(8)
    assert abs(dad_loss(t.clone(), t, 0.5).item()) < 1e-5
    assert abs(kd_loss(t.clone(), t).item()) < 1e-5


def test_numerically_stable_with_huge_logits():
    s, t = _logits(9, scale=1e4), _logits(10, scale=1e4)
    for v in (dad_loss(s, t, 0.5), kd_loss(s, t)):
        assert torch.isfinite(v)
    t16 = _logits(11).half()
    assert torch.isfinite(dad_loss(_logits(12), t16, 1.0))


def test_ce_is_shifted_cross_entropy():
    s = _logits(13)
    y = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    ref = F.cross_entropy(s[:, :-1].reshape(-1, 50), y[:, 1:].reshape(-1))
    assert torch.allclose(ce_loss(s, y, chunk=2), ref, atol=1e-6)


@pytest.mark.parametrize("gamma", [-0.1, 1.5, "1", True, float("nan")])
def test_bad_gamma(gamma):
    with pytest.raises(ValueError, match="gamma"):
        dad_loss(_logits(0), _logits(1), gamma)


def test_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(_logits(0), _logits(1, shape=(2, 7, 49)))
    with pytest.raises(ValueError, match="loss="):
        distill_loss("mse", _logits(0))
    with pytest.raises(ValueError, match="teacher"):
        distill_loss("dad", _logits(0))
