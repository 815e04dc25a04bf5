"""What-if sliders for notebook 09 (ipywidgets + matplotlib), with pure state functions the tests drive.

- ``fdb_state`` / ``AlphaExplorer``: multiply a real layer's FDB scales a1 -> m1 a1, a2 -> m2 a2 (method.md §1);
  the levels move over the weight histogram and the layer's output error ||WX - W_hat X||^2 / ||WX||^2 changes.
  Weights are drawn in units of each group's initial step s = |a2| with the group's orientation folded in
  (u = w * sign(a1) / |a2|), so every group shares the levels {0, -m2, 2 m1, 2 m1 - m2} at once.
- ``dad_state`` / ``GammaExplorer``: the DAD token weights omega_i = H(p_t,i)^gamma H(p_s,i)^(1 - gamma)
  (method.md §2) of a real batch as gamma moves.

``AlphaExplorer(...).widget()`` / ``GammaExplorer(...).widget()`` return the slider boxes; ``.figure()`` draws the
current state as a static matplotlib figure (what headless runs save); ``.state`` holds the numbers.
"""
import base64
import io

import torch

from .landscape import fdb_error, sample_rows
from .quant import dual_binarize, fdb_init, grouped


# ---------------------------------------------------------------------------------------------------------
# FDB scale multipliers
# ---------------------------------------------------------------------------------------------------------
def fdb_state(w, x, a1, a2, group_size, m1=1.0, m2=1.0):
    """Numbers for scale multipliers (m1, m2) of one layer with initial scales (a1, a2):
    shared levels and thresholds in step units, relative output error, fraction of one-bits."""
    for k, v in (("m1", m1), ("m2", m2)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{k}={v!r} must be a positive number (a multiplier of the initial scale)")
    s1, s2 = a1 * m1, a2 * m2
    b1, b2 = dual_binarize(w, s1, s2, group_size)
    levels = sorted([0.0, -m2, 2 * m1, 2 * m1 - m2])
    return {"m1": float(m1), "m2": float(m2), "levels": levels,
            "thresholds": [(a + b) / 2 for a, b in zip(levels[:-1], levels[1:])],
            "rel_output_error": fdb_error(w, x, s1, s2, group_size),
            "ones_b1": float(b1.float().mean()), "ones_b2": float(b2.float().mean())}


def png_output(fig):
    """``fig`` as one Output-widget output: a display_data message with the PNG (base64), what a browser renders."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return {"output_type": "display_data", "metadata": {},
            "data": {"image/png": base64.b64encode(buf.getvalue()).decode("ascii"), "text/plain": repr(fig)}}


class _Explorer:
    """Shared plumbing: ``draw(fig)`` of the current ``state``; a static pyplot ``figure()`` (what headless runs
    save); ``_show()`` returns an ipywidgets Output whose ``outputs`` hold the current figure as a PNG, replaced
    after each update (``_redraw``).

    Setting ``Output.outputs`` is what the browser renders (as ``Output.append_display_data`` does); a display-id
    update of output captured inside an Output is not applied by JupyterLab. The widget's figure is a bare
    matplotlib ``Figure``, never registered with pyplot, so the inline backend shows no stray copy of it in a later
    cell and no figure stays open."""
    figsize = (10, 3.6)
    _fig = _out = None

    def _redraw(self):
        if self._out is not None:
            self.draw(self._fig)
            self._out.outputs = (png_output(self._fig),)

    def figure(self):
        import matplotlib.pyplot as plt
        return self.draw(plt.figure(figsize=self.figsize))

    def _show(self):
        import ipywidgets as W
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        self._fig = Figure(figsize=self.figsize)
        FigureCanvasAgg(self._fig)
        self._out = W.Output()
        self._redraw()
        return self._out


class AlphaExplorer(_Explorer):
    """Sliders for the FDB scale multipliers of one real layer: levels over the weight histogram (left) and the
    output error over a precomputed (m1, m2) grid with the current point marked (right)."""

    def __init__(self, w, x, group_size=64, init="clip", orientation="per-group", max_rows=128, max_tokens=256,
                 grid=None, m1=1.0, m2=1.0, title=""):
        self.w = sample_rows(w, max_rows)
        self.x = x[:max_tokens].float()
        self.group_size, self.title = group_size, title
        self.a1, self.a2 = fdb_init(self.w, group_size, init, orientation)
        # weights in step units with the orientation folded in: every group's levels are {0, -1, 2, 1} at m = 1
        step = (self.a2.abs() * torch.sign(self.a1))[..., None]
        self.u = (grouped(self.w, group_size) / step).flatten()
        self.grid = torch.linspace(0.5, 1.5, 11) if grid is None else torch.as_tensor(grid, dtype=torch.float32)
        self.grid_error = torch.tensor([[fdb_error(self.w, self.x, self.a1 * g1, self.a2 * g2, group_size)
                                         for g2 in self.grid] for g1 in self.grid])
        self.state = fdb_state(self.w, self.x, self.a1, self.a2, group_size, m1, m2)
        self.init_error = fdb_state(self.w, self.x, self.a1, self.a2, group_size)["rel_output_error"]
        self.sliders = None

    def update(self, m1=None, m2=None):
        """Recompute the state for new multipliers (defaults: the sliders' values) and redraw if shown."""
        if self.sliders is not None:
            m1 = self.sliders[0].value if m1 is None else m1
            m2 = self.sliders[1].value if m2 is None else m2
        m1 = self.state["m1"] if m1 is None else m1
        m2 = self.state["m2"] if m2 is None else m2
        self.state = fdb_state(self.w, self.x, self.a1, self.a2, self.group_size, m1, m2)
        self._redraw()
        return self.state

    def draw(self, fig):
        fig.clf()
        ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
        st = self.state
        ax1.hist(self.u.clamp(-4, 5).numpy(), bins=120, density=True, color="0.75")
        for lv in st["levels"]:
            ax1.axvline(lv, color="tab:red", lw=2)
        for th in st["thresholds"]:
            ax1.axvline(th, color="tab:red", ls=":", lw=1)
        ax1.set_xlabel("weight / initial step |a2| (orientation folded in)")
        ax1.set_title(f"levels {{0, -m2, 2m1, 2m1-m2}}: ones b1 {st['ones_b1']:.2f}, b2 {st['ones_b2']:.2f}", fontsize=9)
        g = self.grid.tolist()
        im = ax2.imshow(self.grid_error.T.numpy(), origin="lower", aspect="auto", cmap="viridis",
                        extent=[g[0], g[-1], g[0], g[-1]])
        fig.colorbar(im, ax=ax2, label="relative output error")
        ax2.plot([st["m1"]], [st["m2"]], "r*", ms=14)
        ax2.set_xlabel("m1 (a1 multiplier)"); ax2.set_ylabel("m2 (a2 multiplier)")
        ax2.set_title(f"error {st['rel_output_error']:.4f} (init {self.init_error:.4f})", fontsize=9)
        fig.suptitle(self.title, fontsize=10)
        fig.tight_layout()
        return fig

    def widget(self):
        import ipywidgets as W
        self.sliders = [W.FloatSlider(value=self.state[k], min=0.25, max=2.0, step=0.01, description=k,
                                      continuous_update=False) for k in ("m1", "m2")]
        out = self._show()
        for s in self.sliders:
            s.observe(lambda _: self.update(), names="value")
        return W.VBox([W.HBox(self.sliders), out])


# ---------------------------------------------------------------------------------------------------------
# DAD gamma
# ---------------------------------------------------------------------------------------------------------
def token_entropies(student_logits, teacher_logits):
    """(h_teacher, h_student, kl) per position in nats; ``dbllm_lab.distill.token_stats`` when available,
    else computed here with torch.softmax."""
    try:
        from .distill import token_stats
    except ImportError:
        token_stats = None
    with torch.no_grad():
        if token_stats is not None:
            kl, h_t, h_s = token_stats(student_logits, teacher_logits)
            return h_t, h_s, kl
        s = student_logits.reshape(-1, student_logits.shape[-1]).float()
        t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).float()
        ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
        pt, ps = torch.softmax(t, -1), torch.softmax(s, -1)
        return -(pt * lt).sum(-1), -(ps * ls).sum(-1), (pt * (lt - ls)).sum(-1)


def dad_state(h_t, h_s, gamma, kl=None, top=0.1):
    """omega_i = H_t^gamma H_s^(1-gamma) normalised to mean 1, and summary numbers: the share of total weight
    on the ``top`` fraction most ambiguous (highest teacher entropy) positions, the effective sample size
    (sum w)^2 / sum w^2 as a fraction of positions, and (with ``kl``) the DAD loss and plain KD loss."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma <= 1:
        raise ValueError(f"gamma={gamma!r} must be a number in [0, 1]")
    if h_t.shape != h_s.shape or h_t.dim() != 1 or h_t.numel() == 0:
        raise ValueError(f"h_t and h_s must be equally long 1-D tensors, got {tuple(h_t.shape)}, {tuple(h_s.shape)}")
    try:
        from .distill import dad_weights
        omega = dad_weights(h_t, h_s, gamma)
    except ImportError:
        omega = h_t.clamp(min=0) ** gamma * h_s.clamp(min=0) ** (1 - gamma)
    omega = omega.float()
    w = omega / omega.mean().clamp(min=1e-12)
    k = max(1, int(round(top * len(h_t))))
    top_idx = h_t.argsort(descending=True)[:k]
    out = {"gamma": float(gamma), "omega": w, "top_share": float(w[top_idx].sum() / w.sum()),
           "top_fraction": k / len(h_t), "ess": float(w.sum() ** 2 / (w.pow(2).sum() * len(w)))}
    if kl is not None:
        out["dad_loss"] = float((w * kl).sum() / w.sum())
        out["kd_loss"] = float(kl.mean())
    return out


class GammaExplorer(_Explorer):
    """A gamma slider over the DAD weights of a batch: omega against teacher entropy (left) and along the
    positions (right)."""

    def __init__(self, h_t, h_s, kl=None, gamma=0.5, title=""):
        self.h_t, self.h_s, self.kl, self.title = h_t.float(), h_s.float(), kl, title
        self.state = dad_state(self.h_t, self.h_s, gamma, kl)
        self.slider = None

    def update(self, gamma=None):
        if gamma is None:
            gamma = self.slider.value if self.slider is not None else self.state["gamma"]
        self.state = dad_state(self.h_t, self.h_s, gamma, self.kl)
        self._redraw()
        return self.state

    def draw(self, fig):
        fig.clf()
        ax1, ax2 = fig.subplots(1, 2)
        st = self.state
        sc = ax1.scatter(self.h_t.numpy(), st["omega"].numpy(), c=self.h_s.numpy(), s=6, cmap="plasma")
        fig.colorbar(sc, ax=ax1, label="student entropy H(p_s) [nats]")
        ax1.set_xlabel("teacher entropy H(p_t) [nats]"); ax1.set_ylabel("omega / mean omega")
        ax1.set_title(f"gamma {st['gamma']:.2f}: top {st['top_fraction']:.0%} ambiguous positions carry "
                      f"{st['top_share']:.0%} of the weight", fontsize=9)
        ax2.plot(st["omega"].numpy(), lw=0.8)
        ax2.set_xlabel("position"); ax2.set_ylabel("omega / mean omega")
        loss = f", DAD loss {st['dad_loss']:.3f} vs KD {st['kd_loss']:.3f}" if "dad_loss" in st else ""
        ax2.set_title(f"effective sample size {st['ess']:.2f}{loss}", fontsize=9)
        fig.suptitle(self.title, fontsize=10)
        fig.tight_layout()
        return fig

    def widget(self):
        import ipywidgets as W
        self.slider = W.FloatSlider(value=self.state["gamma"], min=0.0, max=1.0, step=0.05, description="gamma",
                                    continuous_update=False)
        out = self._show()
        self.slider.observe(lambda _: self.update(), names="value")
        return W.VBox([self.slider, out])
