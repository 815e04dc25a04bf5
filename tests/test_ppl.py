import math

import pytest
import torch
import torch.nn.functional as F

from dbllm_lab.ppl import perplexity, window_nll, windows_from_tokens


def test_ppl_equals_direct_computation_on_tiny_model(tiny):
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (1000,))
    res = perplexity(tiny, None, seqlen=64, windows=windows_from_tokens(ids, 64), batch_size=3, progress=False)
    # direct: each window separately, log-softmax by hand
    nll, n = 0.0, 0
    for w in ids[: 15 * 64].view(15, 64):
        with torch.no_grad():
            logp = torch.log_softmax(tiny(w[None]).logits[0, :-1].double(), -1)
        nll -= logp[torch.arange(63), w[1:]].sum().item()
        n += 63
    assert res.windows == 15 and res.tokens == n
    assert res.ppl == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert "15 windows x 64 tokens" in str(res)
    assert '"seqlen": 64' in res.to_json()


def test_per_position_nll_equals_direct_computation_and_sums_to_the_total(tiny):
    windows = windows_from_tokens(torch.randint(0, 256, (5 * 32,), generator=torch.Generator().manual_seed(2)), 32)
    per_pos, n = window_nll(tiny, windows, batch_size=2, progress=False, per_position=True)
    with torch.no_grad():
        logp = torch.log_softmax(tiny(windows).logits[:, :-1].double(), -1)
    direct = -logp.gather(-1, windows[:, 1:, None])[..., 0].sum(0)  # position t + 1, summed over windows
    assert n == 5 and per_pos.shape == (31,) and per_pos.dtype == torch.float64
    assert torch.allclose(per_pos, direct, rtol=1e-5)
    total, count = window_nll(tiny, windows, batch_size=2, progress=False)
    assert count == 5 * 31 and total == pytest.approx(float(per_pos.sum()), rel=1e-12)


def test_windows_drop_the_tail_and_respect_max():
    ids = torch.arange(130)
    assert windows_from_tokens(ids, 64).shape == (2, 64)
    assert windows_from_tokens(ids, 64, max_windows=1).shape == (1, 64)
    with pytest.raises(ValueError, match="fewer than one window"):
        windows_from_tokens(ids, 200)


@pytest.mark.parametrize("seqlen", [1, 0, 10**6, 2.5])
def test_bad_seqlen_is_rejected(tiny, seqlen):
    with pytest.raises(ValueError, match="seqlen="):
        perplexity(tiny, None, seqlen=seqlen, windows=torch.zeros(1, 8, dtype=torch.long))


def test_embedded_model_wikitext_ppl_few_windows(embedded, data_dir):
    model, tok = embedded
    res = perplexity(model, tok, seqlen=256, max_windows=3, data_dir=data_dir, progress=False)
    assert res.windows == 3 and res.tokens == 3 * 255
    # measured with this command (dequantized Q4_1, fp32); CPUs differ only in float rounding
    assert res.ppl == pytest.approx(30.3774, rel=1e-3), res
    assert "Q4_1" in res.note


def test_dev_and_heldout_split_the_full_split_exactly(tiny, monkeypatch):
    """On WikiText-2 test at seqlen 512 one pass gives dev (windows 1-40), held-out (41-) and full PPL, and the full
    NLL is their token-weighted mean (every window predicts seqlen - 1 tokens)."""
    import dbllm_lab.ppl as ppl
    windows = torch.randint(0, 256, (45, 512), generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(ppl, "eval_windows", lambda *a, **k: windows)
    tiny.config.max_position_embeddings = 512
    res = ppl.perplexity(tiny, None, seqlen=512, progress=False)
    dev = ppl.perplexity(tiny, None, seqlen=512, windows=windows[:40], progress=False)
    held = ppl.perplexity(tiny, None, seqlen=512, windows=windows[40:], progress=False)
    assert res.ppl_dev == pytest.approx(dev.ppl, rel=1e-12) and res.ppl_heldout == pytest.approx(held.ppl, rel=1e-12)
    assert math.log(res.ppl) == pytest.approx((40 * math.log(res.ppl_dev) + 5 * math.log(res.ppl_heldout)) / 45,
                                              rel=1e-12)
    assert dev.ppl_dev is None and dev.ppl_heldout is None  # windows passed in: not the split, no dev / held-out
    assert "dev " in str(res) and "held-out " in str(res)


def test_heldout_derived_from_dev_and_full_is_exact():
    """bench/dbllm_table.complete_rows: held-out PPL from dev and full-split PPL (589 windows, 40 dev)."""
    import importlib.util
    import os
    spec = importlib.util.spec_from_file_location("dbllm_table", os.path.join(os.path.dirname(__file__), "..", "bench",
                                                                               "dbllm_table.py"))
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    nll = torch.rand(589, dtype=torch.float64) + 3.0
    row = {"method": "x", "ppl": math.exp(nll[:40].mean().item()), "ppl_full_split": math.exp(nll.mean().item()),
           "full_split_windows": 589}
    table.complete_rows([row])
    assert row["ppl_heldout"] == pytest.approx(math.exp(nll[40:].mean().item()), rel=1e-12)
    assert row["heldout_derived"] is True and row["ppl_dev"] == row["ppl"]
    partial = {"method": "y", "ppl": 50.0}
    table.complete_rows([partial])
    assert partial["ppl_heldout"] is None  # never measured past window 40: not invented
