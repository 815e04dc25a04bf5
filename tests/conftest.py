"""Shared fixtures: the embedded model is loaded once per test session (~25 s)."""
import os

import pytest

import dbllm_lab.kernel  # noqa: F401  first, so its CPU rule (TRITON_INTERPRET=1 without a GPU) precedes any triton import


def _data_dir():
    d = os.environ.get("DBLLM_DATA_DIR")
    if not d:
        here = os.path.dirname(os.path.abspath(__file__))
        cand = os.path.normpath(os.path.join(here, "..", "..", "shared", "data"))
        d = cand if os.path.isdir(cand) else None
    return d


@pytest.fixture(scope="session")
def data_dir():
    """A folder holding wikitext-2-raw/wiki.test.raw: DBLLM_DATA_DIR, ../shared/data, else the shipped data/."""
    from dbllm_lab.data import SHIPPED_DIR
    d = _data_dir()
    if not d or not os.path.isfile(os.path.join(d, "wikitext-2-raw", "wiki.test.raw")):
        d = SHIPPED_DIR
    if not os.path.isfile(os.path.join(d, "wikitext-2-raw", "wiki.test.raw")):
        pytest.skip("WikiText-2 test text not found: set DBLLM_DATA_DIR to a folder holding wikitext-2-raw/wiki.test.raw")
    return d


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer) of the embedded SmolLM2-135M; tests must not modify it (deep-copy first)."""
    from dbllm_lab.model import load_model
    return load_model()


@pytest.fixture
def tiny():
    from dbllm_lab.model import tiny_llama
    return tiny_llama()


# fp32 scales rebuild w_hat exactly (only summation order differs); fp16 scales, the checkpoint format's default,
# perturb each scale by <= 2^-11 relative
PACKED_LOGIT_TOL = {"torch.float32": 1e-4, "torch.float16": 2e-2}


def packed_checkpoints(sim, base, ids, gen, tmp_path):
    """Save the simulated FDB model ``sim`` as packed checkpoints with fp32 and fp16 scales, rebuild each on a copy
    of ``base`` and check it against ``sim``: logits within PACKED_LOGIT_TOL of max |logit| and, with fp32 scales,
    the same greedy tokens (fp16 scales may flip near-tied top logits of an untrained 2-bit model, so only its
    logits are asserted). Yields (scale_dtype, packed model, its logits) for further checks."""
    import copy

    import torch

    from dbllm_lab import checkpoint
    with torch.no_grad():
        ls = sim(ids).logits
        out_s = sim.generate(ids, **gen)
    for scale_dtype in (torch.float32, torch.float16):
        path = str(tmp_path / str(scale_dtype))
        checkpoint.save_quantized(sim, path, scale_dtype=scale_dtype)
        packed = checkpoint.load_quantized(path, base_model=copy.deepcopy(base))
        with torch.no_grad():
            lp = packed(ids).logits
            out_p = packed.generate(ids, **gen)
        rel = ((lp - ls).abs().max() / ls.abs().max()).item()
        tol = PACKED_LOGIT_TOL[str(scale_dtype)]
        assert rel < tol, f"scales {scale_dtype}: max |logit diff| / max |logit| = {rel:.2e} >= {tol}"
        if scale_dtype == torch.float32:
            assert torch.equal(out_p, out_s)
        yield scale_dtype, packed, lp
