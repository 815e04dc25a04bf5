"""Trainer (dbllm_lab.train): what trains, exact resume, configuration checks; data-free generation."""
import copy
import hashlib
import inspect
import json
import os
import struct

import pytest
import torch

from dbllm_lab.datafree import corpus_samples, generate_samples
from dbllm_lab.model import tiny_llama
from dbllm_lab.layers import fdb_layers, trainable_parameters
from dbllm_lab.runtime import cosine_lr
from dbllm_lab.train import TrainConfig, build_student, config_from_dict, to_windows, train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    teacher = tiny_llama(vocab_size=128, hidden=64, layers=2, seed=1)
    data = generate_samples(teacher, None, n=8, seqlen=32, seed=0, batch_size=4,
                            cache_dir=str(tmp_path_factory.mktemp("gen")), progress=False)
    student, _ = build_student(teacher, init="clip", group_size=32, progress=False)
    return teacher, data, student


def _cfg(**kw):
    base = dict(loss="dad", gamma=0.5, steps=8, seqlen=16, batch_size=2, grad_accum=2, lr=3e-3, warmup=2,
                ckpt_every=2, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def test_sample_inverse_cdf_matches_the_full_cdf():
    """Chunked inverse-CDF sampling picks exactly the token a cumsum over the whole vocabulary picks."""
    from dbllm_lab.datafree import sample_inverse_cdf
    g = torch.Generator().manual_seed(0)
    for vocab, temperature in ((300, 1.0), (1024, 0.7), (49152, 1.0)):
        logits = 4 * torch.randn(64, vocab, generator=g, dtype=torch.float64)
        u = torch.rand(64, generator=g, dtype=torch.float64)
        cdf = torch.softmax(logits / temperature, -1).cumsum(-1)
        expected = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], side="right").squeeze(1)
        assert torch.equal(sample_inverse_cdf(logits.clone(), u, temperature), expected)
    peaked = torch.full((3, 500), -1e4, dtype=torch.float64)
    peaked[0, 0], peaked[1, 257], peaked[2, 499] = 0, 0, 0  # one token holds all the mass: first, mid-chunk, last
    assert sample_inverse_cdf(peaked, torch.tensor([0.0, 0.5, 0.999], dtype=torch.float64)).tolist() == [0, 257, 499]


def test_generation_cache_matches_the_full_forward():
    """Greedy generation with the preallocated KV cache equals the argmax of a full forward at every position."""
    m = tiny_llama(vocab_size=128, seed=2)
    a = generate_samples(m, None, n=4, seqlen=20, seed=1, cache_dir=None, progress=False, greedy_tokens=19)
    with torch.no_grad():
        assert torch.equal(m(a[:, :-1]).logits.argmax(-1), a[:, 1:])


def test_generate_samples_cached_seeded_and_batch_independent(tmp_path):
    m = tiny_llama(vocab_size=128, seed=2)
    a = generate_samples(m, None, n=5, seqlen=12, seed=3, batch_size=2, cache_dir=str(tmp_path), progress=False)
    assert a.shape == (5, 12) and a.dtype == torch.long and int(a.max()) < 128
    files = sorted(os.listdir(tmp_path))  # the samples, and beside them what generating them cost
    assert len(files) == 2 and files[1] == files[0] + ".json"
    cost = json.load(open(tmp_path / files[1]))
    assert cost["cpu_seconds"] >= 0 and cost["batch_size"] == 2
    b = generate_samples(m, None, n=5, seqlen=12, seed=3, batch_size=5, cache_dir=None, progress=False)
    assert torch.equal(a, b)  # same samples whatever the batch size
    c = generate_samples(m, None, n=5, seqlen=12, seed=4, batch_size=5, cache_dir=None, progress=False)
    assert not torch.equal(a, c)
    # the first greedy tokens follow the argmax of the model
    with torch.no_grad():
        nxt = m(a[:, :1]).logits[:, -1].argmax(-1)
    assert torch.equal(nxt, a[:, 1])
    from dbllm_lab.datafree import teacher_text, text_cpu_minutes, text_is_cached
    t = teacher_text(m, None, 5, 12, seed=0, set_size=3, cache_dir=str(tmp_path), progress=False)
    first = generate_samples(m, None, n=3, seqlen=12, seed=0, batch_size=5, cache_dir=None, progress=False)
    assert t.shape == (5, 12) and torch.equal(t[:3], first)  # set k of seed s: generation seed s * 1000 + k
    assert text_is_cached(m, 5, 12, seed=0, set_size=3, cache_dir=str(tmp_path))
    assert text_cpu_minutes(m, 5, 12, seed=0, set_size=3, cache_dir=str(tmp_path)) >= 0
    assert not text_is_cached(m, 5, 12, seed=1, set_size=3, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="seed=1000"):
        teacher_text(m, None, 5, 12, seed=1000, cache_dir=None)
    from dbllm_lab.datafree import text_digest  # the text read back from the cache is the text written
    again = teacher_text(m, None, 5, 12, seed=0, set_size=3, cache_dir=str(tmp_path), progress=False)
    by_hand = hashlib.sha256(struct.pack("<60q", *t.flatten().tolist())).hexdigest()  # 5 x 12 int64, little-endian
    assert text_digest(again) == text_digest(t) == by_hand
    assert text_digest(t.to(torch.int32)) == text_digest(t) and text_digest(t.t().contiguous().t()) == text_digest(t)
    flipped = t.clone()
    flipped[4, 11] = (flipped[4, 11] + 1) % 128
    assert text_digest(flipped) != text_digest(t)
    with pytest.raises(ValueError, match="seqlen"):
        generate_samples(m, None, n=2, seqlen=1, cache_dir=None)


def test_bf16_text_is_written_by_a_bf16_copy_and_cached_apart(tmp_path):
    """precision="bf16": the greedy tokens are the argmax of the teacher's bf16 copy (fp32 attention) over the whole
    prefix, the teacher itself stays fp32, and the text is cached under its own name with its precision and cost beside it."""
    from dbllm_lab.datafree import generation_model, teacher_text, text_cpu_minutes, text_is_cached
    m = tiny_llama(vocab_size=128, seed=2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    a = generate_samples(m, None, n=4, seqlen=16, seed=1, cache_dir=str(tmp_path), progress=False, greedy_tokens=15,
                         precision="bf16")
    copy16 = generation_model(m, "bf16")
    assert next(copy16.parameters()).dtype == torch.bfloat16 and generation_model(m, "fp32") is m
    assert copy16.config._attn_implementation == "sdpa_fp32"  # bf16 matmuls, fp32 attention over an fp32 cache
    fp32_attn = copy.deepcopy(m)
    fp32_attn.set_attn_implementation("sdpa_fp32")  # on fp32 inputs it is transformers' sdpa, exactly
    with torch.no_grad():
        assert m.config._attn_implementation == "sdpa" and torch.equal(fp32_attn(a).logits, m(a).logits)
    with torch.no_grad():
        assert torch.equal(copy16(a[:, :-1]).logits.float().argmax(-1), a[:, 1:])
    assert all(v.dtype == torch.float32 and torch.equal(v, before[k]) for k, v in m.state_dict().items())
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2 and files[0].endswith("_bf16.pt")
    assert json.load(open(tmp_path / files[1]))["precision"] == "bf16"
    t = teacher_text(m, None, 5, 12, seed=0, set_size=3, cache_dir=str(tmp_path), precision="bf16", progress=False)
    assert t.shape == (5, 12)
    assert text_is_cached(m, 5, 12, seed=0, set_size=3, cache_dir=str(tmp_path), precision="bf16")
    assert not text_is_cached(m, 5, 12, seed=0, set_size=3, cache_dir=str(tmp_path))  # fp32 text is another file
    assert text_cpu_minutes(m, 5, 12, seed=0, set_size=3, cache_dir=str(tmp_path), precision="bf16") >= 0
    with pytest.raises(ValueError, match=r"precision='fp16'.*\('fp32', 'bf16'\)"):
        generate_samples(m, None, n=2, seqlen=4, cache_dir=None, precision="fp16")


def test_generation_passes_the_cache_by_the_models_own_keyword():
    """The writer passes its KV cache by the keyword the installed transformers takes (no deprecation warning, which
    would become an error when the old name goes) and writes the same tokens as the full forward."""
    import warnings
    from dbllm_lab.datafree import cache_keyword
    m = tiny_llama(vocab_size=128, seed=2)
    assert cache_keyword(m) in inspect.signature(m.forward).parameters
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = generate_samples(m, None, n=2, seqlen=8, seed=0, cache_dir=None, progress=False)
    with torch.no_grad():
        assert torch.equal(m(a[:, :1]).logits[:, -1].argmax(-1), a[:, 1])


def test_budget_counts_every_text_set_cached_or_not(tmp_path):
    """A recipe whose text is partly cached counts what every set cost when it was written, not only the sets
    written in this call (run_recipe.train_recipe: the budget includes the text)."""
    from dbllm_lab.run_recipe import train_recipe
    m = tiny_llama(vocab_size=128, seed=2)
    generate_samples(m, None, n=2, seqlen=16, seed=0, cache_dir=str(tmp_path), progress=False)  # set 0 only
    (cost,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    rec = json.load(open(tmp_path / cost))
    rec["cpu_seconds"] = 600.0  # as if set 0 had cost 10 CPU-minutes
    json.dump(rec, open(tmp_path / cost, "w"))
    r = {"quant": "fdb", "init": "clip", "stage": "blockwise", "text": {"samples": 4, "tokens": 16, "set_size": 2},
         "blockwise": {"epochs": 1, "stats_samples": 2}, "e2e": {}}
    _, info = train_recipe(m, None, r, seed=0, out_dir=str(tmp_path / "run"), cache_dir=str(tmp_path), progress=False)
    costs = [json.load(open(tmp_path / f))["cpu_seconds"] for f in os.listdir(tmp_path) if f.endswith(".json")]
    assert len(costs) == 2 and not info["text_from_cache"]
    assert info["generation_cpu_minutes"] == round(sum(costs) / 60, 2) >= 10


def test_corpus_option_refuses_the_test_split():
    with pytest.raises(ValueError, match="test split"):
        corpus_samples(None, 2, 8, dataset="wikitext2", split="test")


def test_only_scales_get_gradients_when_latent_frozen(setup):
    teacher, data, student = setup
    st = copy.deepcopy(student)
    scales, latents, _ = trainable_parameters(st, train_latent=False)
    assert latents == {}
    from dbllm_lab.distill import dad_loss
    x = data[:2, :16]
    with torch.no_grad():
        t = teacher(x).logits
    dad_loss(st(x).logits, t, 1.0).backward()
    for name, p in st.named_parameters():
        if name.endswith(".a1") or name.endswith(".a2"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    # with train_latent the latent weights get gradients too (STE)
    st2 = copy.deepcopy(student)
    _, latents, _ = trainable_parameters(st2, train_latent=True)
    dad_loss(st2(x).logits, t, 1.0).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in latents.values())
    assert st2.model.embed_tokens.weight.grad is None


def test_train_norms_trains_the_rmsnorm_weights_only_when_asked(setup):
    teacher, data, student = setup
    n_norms = 2 * len(student.model.layers) + 1  # input and post-attention norm per block, final norm
    st = copy.deepcopy(student)
    r = train(st, data, teacher=teacher, config=_cfg(steps=4, train_norms=True, lr_norm=1e-2), progress=False)
    assert r["completed"]
    norms = {n: p for n, p in st.named_parameters() if "norm" in n}
    assert len(norms) == n_norms
    before = dict(student.named_parameters())
    assert all(not torch.equal(p, before[n]) for n, p in norms.items())
    assert torch.equal(st.model.embed_tokens.weight, student.model.embed_tokens.weight)
    st2 = copy.deepcopy(student)
    train(st2, data, teacher=teacher, config=_cfg(steps=4), progress=False)
    assert all(torch.equal(p, before[n]) for n, p in st2.named_parameters() if "norm" in n)


def test_bf16_autocast_follows_the_fp32_curve(setup):
    teacher, data, student = setup
    curves = {p: [h["loss"] for h in train(copy.deepcopy(student), data, teacher=teacher,
                                           config=_cfg(steps=4, precision=p), progress=False)["history"]]
              for p in ("fp32", "bf16")}
    assert curves["bf16"] != curves["fp32"]  # autocast is really on
    assert all(abs(b - a) <= 0.05 * a for a, b in zip(curves["fp32"], curves["bf16"])), curves


def test_resume_refuses_another_configuration_and_pickled_objects(setup, tmp_path):
    """A resumed run continues the same loss curve; a checkpoint of another configuration (or one missing a
    setting) is refused by name, and one holding a pickled object is refused before anything is unpickled."""
    import argparse
    teacher, data, student = setup
    out = str(tmp_path / "run")
    full = train(copy.deepcopy(student), data, teacher=teacher, config=_cfg(steps=4), progress=False)
    train(copy.deepcopy(student), data, teacher=teacher, config=_cfg(steps=4), out_dir=out, progress=False,
          stop_after=2)
    path = os.path.join(out, "checkpoint.pt")
    ck = torch.load(path, weights_only=True)
    resumed = train(copy.deepcopy(student), data, teacher=teacher, config=_cfg(steps=4), out_dir=out,
                    progress=False)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    with pytest.raises(ValueError, match="different configuration.*train_norms"):
        train(copy.deepcopy(student), data, teacher=teacher, config=_cfg(steps=4, train_norms=True), out_dir=out,
              progress=False)
    del ck["config"]["precision"]
    torch.save(ck, path)
    with pytest.raises(ValueError, match="different configuration.*precision"):
        train(copy.deepcopy(student), data, teacher=teacher, config=_cfg(steps=4), out_dir=out, progress=False)
    torch.save({**ck, "note": argparse.Namespace(x=1)}, path)  # any class instance is pickled code to run
    with pytest.raises(ValueError, match="refusing to unpickle"):
        train(copy.deepcopy(student), data, teacher=teacher, config=_cfg(steps=4), out_dir=out, progress=False)


def test_fused_and_unfused_adamw_differ_by_rounding_only(setup):
    teacher, data, student = setup
    curves = {f: [h["loss"] for h in train(copy.deepcopy(student), data, teacher=teacher,
                                           config=_cfg(steps=6, fused_adamw=f), progress=False)["history"]]
              for f in (True, False)}
    assert curves[True] == pytest.approx(curves[False], rel=1e-3), curves


def test_training_lowers_the_loss(setup):
    teacher, data, student = setup
    from dbllm_lab.distill import kd_loss
    x = to_windows(data, 16)

    def full_kd(m):
        with torch.no_grad():
            return kd_loss(m(x).logits, teacher(x).logits).item()

    st = copy.deepcopy(student)
    r = train(st, data, teacher=teacher, config=_cfg(loss="kd", steps=20, lr=1e-3), progress=False)
    assert r["completed"] and len(r["history"]) == 20
    assert full_kd(st) < 0.9 * full_kd(student)
    a1 = next(iter(fdb_layers(st).values())).a1
    assert not torch.equal(a1, next(iter(fdb_layers(student).values())).a1)


@pytest.mark.parametrize("loss,kw", [("dad", {"gamma": 0.5}), ("ce", {}), ("kd", {"train_latent": True}),
                                     ("kd", {"train_latent": True, "train_norms": True})])
def test_kill_and_resume_reproduces_the_curve(setup, tmp_path, loss, kw):
    teacher, data, student = setup
    cfg = _cfg(loss=loss, **kw)
    full = train(copy.deepcopy(student), data, teacher=teacher, config=cfg, progress=False)
    out = str(tmp_path / "run")
    # "killed" after 5 steps: the last checkpoint is at step 4, step 5 is lost
    part = train(copy.deepcopy(student), data, teacher=teacher, config=cfg, out_dir=out, progress=False,
                 stop_after=5)
    assert not part["completed"] and part["steps_done"] == 5
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["step"] == 4
    st = copy.deepcopy(student)
    resumed = train(st, data, teacher=teacher, config=cfg, out_dir=out, progress=False)
    assert resumed["completed"]
    assert [h["step"] for h in resumed["history"]] == list(range(1, 9))
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    assert os.path.isfile(os.path.join(out, "curve.csv")) and os.path.isfile(os.path.join(out, "curve.json"))


def test_resume_with_another_configuration_fails(setup, tmp_path):
    teacher, data, student = setup
    out = str(tmp_path / "run")
    train(copy.deepcopy(student), data, teacher=teacher, config=_cfg(steps=4), out_dir=out, progress=False,
          stop_after=2)
    with pytest.raises(ValueError, match="different configuration.*gamma"):
        train(copy.deepcopy(student), data, teacher=teacher, config=_cfg(steps=4, gamma=1.0), out_dir=out,
              progress=False)
    with pytest.raises(ValueError, match="different configuration.*data"):
        train(copy.deepcopy(student), data[:6], teacher=teacher, config=_cfg(steps=4), out_dir=out,
              progress=False)
    # ckpt_every does not change the curve: allowed
    train(copy.deepcopy(student), data, teacher=teacher, config=_cfg(steps=4, ckpt_every=3), out_dir=out,
          progress=False)


@pytest.mark.parametrize("kw,match", [({"gamma": 1.2}, "gamma"), ({"gamma": -0.5}, "gamma"),
                                      ({"steps": 0}, "steps"), ({"steps": -3}, "steps"),
                                      ({"loss": "mse"}, "loss"), ({"batch_size": 0}, "batch_size"),
                                      ({"lr": 0.0}, "lr"), ({"lr_norm": -1e-3}, "lr_norm"),
                                      ({"precision": "fp16"}, "precision")])
def test_bad_configuration(setup, kw, match):
    teacher, data, student = setup
    with pytest.raises(ValueError, match=match):
        train(copy.deepcopy(student), data, teacher=teacher, config=_cfg(**kw), progress=False)


def test_misc_errors(setup):
    teacher, data, student = setup
    with pytest.raises(ValueError, match="teacher"):
        train(copy.deepcopy(student), data, config=_cfg(), progress=False)
    with pytest.raises(ValueError, match="DualBinaryLinear"):
        train(copy.deepcopy(teacher), data, teacher=teacher, config=_cfg(), progress=False)
    with pytest.raises(ValueError, match="unknown TrainConfig settings"):
        config_from_dict({"steps": 3, "lr_scales": 1.0})
    with pytest.raises(ValueError, match="fewer than seqlen"):
        to_windows(data, 64)


def test_schedule():
    """One schedule for both stages: warm-up, cosine to min_lr_ratio, flat after the last step."""
    assert cosine_lr(0, 20, 0.1, warmup=4) == pytest.approx(0.25)
    assert cosine_lr(4, 20, 0.1, warmup=4) == 1.0
    assert cosine_lr(20, 20, 0.1, warmup=4) == pytest.approx(0.1)
    assert cosine_lr(25, 20, 0.1, warmup=4) == pytest.approx(0.1)
    assert cosine_lr(12, 20, 0.1, warmup=4) == pytest.approx(0.55)
    assert [cosine_lr(s, 10, 0.01) for s in (0, 10)] == [1.0, pytest.approx(0.01)]  # stage 1: no warm-up
    values = [cosine_lr(s, 50, 0.01) for s in range(51)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_freeze_quantized_keeps_the_outputs(setup):
    from dbllm_lab.layers import FakeQuantLinear
    from dbllm_lab.train import freeze_quantized
    _, data, student = setup
    st = copy.deepcopy(student)
    x = data[:2, :16]
    with torch.no_grad():
        ref = st(x).logits
        freeze_quantized(st)
        assert not fdb_layers(st) and any(isinstance(m, FakeQuantLinear) for m in st.modules())
        assert torch.equal(st(x).logits, ref)
