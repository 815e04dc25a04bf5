"""Layer-wise calibration through the decoder blocks (the GPTQ driver).

Inputs of block 0 are captured once; then, block by block: hooks accumulate each linear layer's
input second moment H = 2/N * sum_n x_n x_n^T, a callback quantizes the layer from (W, H), and the
block's outputs under the quantized weights become the next block's inputs. Peak memory is one
block's activations for the calibration windows, not the whole model's.
"""
import torch
from tqdm.auto import tqdm

from .model import decoder_layers, quantizable_linears, set_module


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_block0_inputs(model, windows, batch_size=1):
    """Hidden states entering block 0 for every window, and the keyword arguments the blocks get
    (attention mask, position embeddings, ...) as captured from the model's own forward."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    inputs, kwargs = [], {}
    first = layers[0]

    class Catcher(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = first

        def forward(self, hidden_states, *args, **kw):
            inputs.append(hidden_states.detach())
            kwargs.update(kw)
            raise _StopForward

    layers[0] = Catcher()
    try:
        for i in range(0, len(windows), batch_size):
            try:
                model(windows[i:i + batch_size].to(device))
            except _StopForward:
                pass
    finally:
        layers[0] = first
    for name in ("cache", "past_key_values", "past_key_value"):  # the KV cache's names across transformers versions
        kwargs.pop(name, None)
    kwargs["use_cache"] = False
    return inputs, kwargs


def block_forward(block, hidden, kwargs):
    """One decoder block on hidden states (batch, seq, d) with the keyword arguments captured from the model
    (``capture_block0_inputs``); returns the output hidden states."""
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def sequential_quantize(model, windows, quantize_layer, batch_size=1, progress=True, desc="calibrate"):
    """Quantize every decoder linear layer block by block on calibration ``windows`` (n, seqlen).

    ``quantize_layer(name, module, H)`` gets the full name, the nn.Linear and its input Hessian
    H = 2/N X^T X (fp32, in x in). It may change ``module.weight`` in place and/or return a
    replacement module, which is installed. Returns {name: whatever non-module the callback returned}.
    """
    if len(windows) == 0:
        raise ValueError("sequential_quantize needs at least one calibration window")
    inputs, kwargs = capture_block0_inputs(model, windows, batch_size)
    results = {}
    layers = decoder_layers(model)
    for i, block in enumerate(tqdm(layers, desc=desc, disable=not progress)):
        linears = quantizable_linears(block)
        hessians = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float32, device=m.weight.device)
                    for n, m in linears.items()}
        counts = {n: 0 for n in linears}

        def make_hook(n):
            def hook(_module, args, _output):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                hessians[n] += x.T @ x
                counts[n] += x.shape[0]
            return hook

        handles = [m.register_forward_hook(make_hook(n)) for n, m in linears.items()]
        for h in inputs:
            block_forward(block, h, kwargs)
        for handle in handles:
            handle.remove()
        for n, m in linears.items():
            H = hessians.pop(n) * (2.0 / max(counts[n], 1))
            out = quantize_layer(f"model.layers.{i}.{n}", m, H)
            if isinstance(out, torch.nn.Module):
                set_module(block, n, out)
            elif out is not None:
                results[f"model.layers.{i}.{n}"] = out
        inputs = [block_forward(block, h, kwargs) for h in inputs]
    return results
