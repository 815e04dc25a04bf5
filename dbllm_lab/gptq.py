"""GPTQ (Frantar et al., 2023): k-bit group-wise quantization with Hessian-based error compensation.

For a layer with weight W (out x in) and input Hessian H = 2/N X^T X, columns are quantized left to
right; the error of column j, e = (w_j - q_j) / [H^-1]_jj, is pushed onto the remaining columns by
W[:, j:] -= e [H^-1]_{j, j:} (upper Cholesky factor of H^-1, eq. 3-4 of the paper). Updates inside a
block of ``blocksize`` columns are applied eagerly, the rest lazily once per block ("lazy batch
updates"). Each group's scale and zero point are computed when the quantizer reaches its first column,
from the already error-compensated weights. Damping: H += percdamp * mean(diag H) * I.
"""
import torch

from .calib import sequential_quantize
from .quant import GROUP_SIZE, check_bits, check_group_size, quantize_rtn, round_half_to_zero


def inverse_hessian_cholesky(H, percdamp=0.01):
    """Upper Cholesky factor U of the damped H^-1 (H^-1 = U^T U) and the mask of dead input columns
    (diag H = 0: their weights should be zeroed). Damping: H += percdamp * mean(diag H) * I."""
    H = H.detach().clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], device=H.device)
    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True), dead
    except torch._C._LinAlgError:
        raise ValueError(f"the Hessian is not positive definite even with damping percdamp={percdamp}; "
                         f"raise percdamp or use more calibration data") from None


def gptq_layer(W, H, bits, group_size, blocksize=128, percdamp=0.01, clip_search=False):
    """Quantize one weight matrix. Returns (W_hat, scale, zero) with W_hat on the per-group k-bit grid
    (W_hat = (q - zero) * scale) and scale/zero of shape (out, in // group_size)."""
    check_bits(bits)
    out_f, in_f = W.shape
    check_group_size(in_f, group_size)
    if H.shape != (in_f, in_f):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match the weight's input width {in_f}")
    W = W.detach().clone().float()
    Hinv, dead = inverse_hessian_cholesky(H, percdamp)
    W[:, dead] = 0
    blocksize = group_size * max(1, blocksize // group_size)  # every group lies inside one block
    Q = torch.zeros_like(W)
    scale = torch.zeros(out_f, in_f // group_size, device=W.device)
    zero = torch.zeros_like(scale)
    qmax = 2**bits - 1
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                g = col // group_size
                _, s, z = quantize_rtn(W1[:, i:i + group_size], bits, group_size, clip_search)
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
            s, z = scale[:, col // group_size], zero[:, col // group_size]
            w = W1[:, i]
            q = (torch.clamp(round_half_to_zero(w / s) + z, 0, qmax) - z) * s
            Q[:, col] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q, scale, zero


def gptq_quantize_model(model, calib_windows, bits=4, group_size=GROUP_SIZE, blocksize=128, percdamp=0.01,
                        clip_search=False, progress=True):
    """Run GPTQ on every decoder linear layer, block by block (``calib.sequential_quantize``).

    Each layer's weight is overwritten in place by its quantized value (so later blocks calibrate on the
    quantized model's activations, as in GPTQ). Returns {name: (W_hat, scale, zero)}.
    """
    def quantize_layer(name, module, H):
        W_hat, scale, zero = gptq_layer(module.weight, H, bits, group_size, blocksize, percdamp, clip_search)
        module.weight.data.copy_(W_hat.to(module.weight.dtype))
        return W_hat, scale, zero

    return sequential_quantize(model, calib_windows, quantize_layer, progress=progress, desc=f"gptq w{bits}")
