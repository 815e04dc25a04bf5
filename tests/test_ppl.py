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
    assert 10 < res.ppl < 80, res
    assert "Q4_1" in res.note
