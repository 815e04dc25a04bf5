"""Distillation losses: Deviation-Aware Distillation (method.md §2), plain KL distillation, and
next-token cross-entropy on the generated tokens (the baselines of §2).

All losses take logits of shape (batch, T, vocab). Reductions run in fp32 on log-softmax values, and
the vocabulary-wide work (49k columns for SmolLM2) is done ``chunk`` positions at a time; with autograd
on, each chunk is recomputed in backward (activation checkpointing), so peak memory is a few chunks of
(chunk, vocab) floats instead of several full (batch * T, vocab) copies. Teacher logits may be fp16.

KL(p_t || p_s) = sum_v p_t (log p_t - log p_s), entropy H(p) = -sum_v p log p, both in nats.
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSSES = ("dad", "kd", "ce")
CHUNK = 256  # positions per chunk of the vocabulary-wide reductions


def check_gamma(gamma):
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= float(gamma) <= 1.0:
        raise ValueError(f"gamma={gamma!r} is not allowed: DAD's gamma must be a number in [0, 1] "
                         f"(1 = teacher entropy only, 0 = student entropy only)")
    return float(gamma)


def _stats(s, t):
    """Per position: KL(p_t || p_s), H(p_t), H(p_s) for one chunk of logits (rows x vocab), fp32."""
    ls = F.log_softmax(s.float(), dim=-1)
    lt = F.log_softmax(t.float(), dim=-1)
    pt = lt.exp()
    kl = (pt * (lt - ls)).sum(-1)
    h_t = -(pt * lt).sum(-1)
    h_s = -(ls.exp() * ls).sum(-1)
    return kl, h_t, h_s


def token_stats(student_logits, teacher_logits, chunk=CHUNK):
    """(kl, h_teacher, h_student), each of shape (batch * T,), computed ``chunk`` positions at a time.

    Gradients flow to ``student_logits`` through ``kl`` and ``h_student``; entropies are used detached by
    the losses below.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape (batch, T, vocab)")
    s = student_logits.reshape(-1, student_logits.shape[-1])
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).detach()
    outs = []
    for i in range(0, s.shape[0], chunk):
        si, ti = s[i:i + chunk], t[i:i + chunk]
        if torch.is_grad_enabled() and si.requires_grad:
            outs.append(checkpoint(_stats, si, ti, use_reentrant=False))
        else:
            outs.append(_stats(si, ti))
    return tuple(torch.cat(x) for x in zip(*outs))


def dad_weights(h_teacher, h_student, gamma):
    """omega_i = H(p_t,i)^gamma * H(p_s,i)^(1 - gamma) (method.md §2), detached; 0^0 = 1."""
    gamma = check_gamma(gamma)
    h_t, h_s = h_teacher.detach().clamp_min(0), h_student.detach().clamp_min(0)
    return h_t.pow(gamma) * h_s.pow(1.0 - gamma)


def weighted_kl(kl, weights):
    """sum_i omega_i KL_i / sum_i omega_i (fp32)."""
    w = weights.detach().float()
    return (w * kl).sum() / w.sum().clamp_min(torch.finfo(torch.float32).tiny)


def dad_loss(student_logits, teacher_logits, gamma, chunk=CHUNK):
    """Deviation-Aware Distillation, method.md §2:

        omega_i = H(p_t,i)^gamma * H(p_s,i)^(1 - gamma)   (nats, detached)
        L_DAD   = sum_i omega_i KL(p_t,i || p_s,i) / sum_i omega_i
    """
    gamma = check_gamma(gamma)
    kl, h_t, h_s = token_stats(student_logits, teacher_logits, chunk)
    return weighted_kl(kl, dad_weights(h_t, h_s, gamma))


def kd_loss(student_logits, teacher_logits, chunk=CHUNK):
    """Plain KL distillation: mean over positions of KL(p_t || p_s) (= DAD with omega = 1)."""
    kl, _, _ = token_stats(student_logits, teacher_logits, chunk)
    return kl.mean()


def ce_loss(student_logits, tokens, chunk=CHUNK):
    """Next-token cross-entropy of the student on the (generated) tokens: logits[:, :-1] predict tokens[:, 1:]."""
    if tokens.shape != student_logits.shape[:2]:
        raise ValueError(f"tokens {tuple(tokens.shape)} must match the logits' (batch, T) = "
                         f"{tuple(student_logits.shape[:2])}")
    s = student_logits[:, :-1].reshape(-1, student_logits.shape[-1])
    y = tokens[:, 1:].reshape(-1)
    total = 0.0
    for i in range(0, s.shape[0], chunk):
        si, yi = s[i:i + chunk], y[i:i + chunk]
        f = lambda a, b: F.cross_entropy(a.float(), b, reduction="sum")  # noqa: E731
        total = total + (checkpoint(f, si, yi, use_reentrant=False)
                         if torch.is_grad_enabled() and si.requires_grad else f(si, yi))
    return total / y.numel()


def distill_loss(kind, student_logits, tokens=None, teacher_logits=None, gamma=None, chunk=CHUNK):
    """Dispatch by name: "dad" (needs teacher logits, gamma), "kd" (teacher logits), "ce" (tokens). gamma has no
    default here: its one default is ``train.TrainConfig.gamma``."""
    if kind not in LOSSES:
        raise ValueError(f"loss={kind!r} is not supported; use one of {LOSSES}")
    if kind == "ce":
        return ce_loss(student_logits, tokens, chunk)
    if teacher_logits is None:
        raise ValueError(f"loss={kind!r} needs teacher logits")
    if kind == "dad" and gamma is None:
        raise ValueError("loss='dad' needs gamma (a number in [0, 1]; TrainConfig.gamma is the default)")
    return dad_loss(student_logits, teacher_logits, gamma, chunk) if kind == "dad" else \
        kd_loss(student_logits, teacher_logits, chunk)
