"""What-if widgets (dbllm_lab.widgets): the state follows the sliders; static figures; bad input."""
import matplotlib
import pytest
import torch

matplotlib.use("Agg")
from dbllm_lab import widgets as Wd  # noqa: E402


@pytest.fixture
def layer():
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 128, generator=g) * 0.02, torch.randn(64, 128, generator=g)


def test_alpha_sliders_move_levels_and_error(layer):
    w, x = layer
    ex = Wd.AlphaExplorer(w, x, group_size=32, grid=[0.5, 1.0, 1.5])
    box = ex.widget()  # builds sliders, figure and display handle
    assert ex.state["levels"] == [-1.0, 0.0, 1.0, 2.0] and ex.state["rel_output_error"] == pytest.approx(ex.init_error)
    before = dict(ex.state)
    ex.sliders[0].value = 1.6  # m1
    assert ex.state["m1"] == pytest.approx(1.6) and ex.state["levels"] == pytest.approx([-1.0, 0.0, 2.2, 3.2])
    assert ex.state["rel_output_error"] > before["rel_output_error"]
    assert ex.state["ones_b1"] < before["ones_b1"]  # larger a1: fewer weights reach the a1 levels
    ex.sliders[1].value = 0.5  # m2
    assert ex.state["levels"] == pytest.approx([-0.5, 0.0, 2.7, 3.2])
    # the drawn level lines follow the state
    xs = sorted({round(float(l.get_xdata()[0]), 4) for l in ex._fig.axes[0].lines if l.get_linestyle() == "-"})
    assert xs == pytest.approx(ex.state["levels"])
    assert len(box.children) == 2


def test_alpha_bad_multiplier(layer):
    w, x = layer
    ex = Wd.AlphaExplorer(w, x, group_size=32, grid=[1.0, 1.5])
    with pytest.raises(ValueError, match="m1=-1"):
        ex.update(m1=-1.0)


def test_gamma_slider_reweights_positions():
    g = torch.Generator().manual_seed(1)
    t, s = torch.randn(1, 50, 40, generator=g) * 3, torch.randn(1, 50, 40, generator=g)
    h_t, h_s, kl = Wd.token_entropies(s, t)
    assert h_t.shape == (50,) and (h_t > 0).all() and (kl >= -1e-6).all()
    ex = Wd.GammaExplorer(h_t, h_s, kl, gamma=0.0)
    ex.widget()
    assert torch.allclose(ex.state["omega"], h_s / h_s.mean(), rtol=1e-5)
    ex.slider.value = 1.0
    assert ex.state["gamma"] == 1.0 and torch.allclose(ex.state["omega"], h_t / h_t.mean(), rtol=1e-5)
    # gamma = 1 weights the teacher-ambiguous positions more than gamma = 0 does
    assert ex.state["top_share"] > Wd.dad_state(h_t, h_s, 0.0)["top_share"]
    assert ex.state["dad_loss"] != pytest.approx(Wd.dad_state(h_t, h_s, 0.0, kl)["dad_loss"])
    with pytest.raises(ValueError, match="gamma"):
        Wd.dad_state(h_t, h_s, 1.5)
    fig = ex.figure()
    assert len(fig.axes) >= 2


def _png(output):
    """PNG bytes of one Output-widget output (what the browser renders)."""
    import base64
    assert output["output_type"] == "display_data" and "image/png" in output["data"], output
    png = base64.b64decode(output["data"]["image/png"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return png


def test_slider_change_puts_a_new_image_in_the_output_and_leaves_no_figure_open(layer):
    import matplotlib.pyplot as plt
    plt.close("all")
    g = torch.Generator().manual_seed(2)
    h_t, h_s = torch.rand(60, generator=g) * 5, torch.rand(60, generator=g) * 5
    alpha, gamma = Wd.AlphaExplorer(*layer, group_size=32, grid=[0.5, 1.0, 1.5]), Wd.GammaExplorer(h_t, h_s)
    for ex in (alpha, gamma):
        out = ex.widget().children[1]
        (first,) = out.outputs  # the Output holds exactly the current figure
        if ex is alpha:
            ex.sliders[0].value = 1.3
        else:
            ex.slider.value = 0.9
        (second,) = out.outputs
        assert _png(second) != _png(first), f"{type(ex).__name__}: the slider moved but the Output kept its image"
        assert plt.get_fignums() == [], f"{type(ex).__name__} left pyplot figures open: {plt.get_fignums()}"
