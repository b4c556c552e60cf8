"""ssmkit.viz: every picture is a non-empty PNG, and the numbers behind the pictures are the model's own
(kernels equal the layers' convolution, Delta equals what the Mamba layer hands its scan)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ssmkit
from ssmkit import viz
from ssmkit.models.config import ModelConfig
from ssmkit.ops import use_backend

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000, f"{path} is not a drawn PNG ({len(data)} bytes)"


def small_model(mixer, **kwargs):
    config = dict(d_model=8, n_layers=2, mixer=mixer, vocab_size=11)
    config.update(kwargs)
    return ssmkit.from_config(ModelConfig(**config)).eval()


@pytest.mark.parametrize("mixer", ["s4", "s4d", "hyena"])
def test_kernel_is_the_layers_impulse_response_and_is_drawn(mixer, tmp_path):
    kwargs = {"hyena": dict(l_max=64, order=2, filter_order=8)}.get(mixer, dict(d_state=8))
    layer = ssmkit.build_mixer(mixer, 4, **kwargs).double()
    length = 32
    kernel = viz.convolution_kernel(layer, length)
    if mixer == "hyena":
        assert kernel.shape == (1, 4, length)
    else:
        # the kernel is what the SSM outputs (before the nonlinearity and D) for a unit impulse: K_l = C Abar^l Bbar
        assert kernel.shape == (4, length)
        impulse = torch.zeros(1, length, 4, dtype=torch.float64)
        impulse[0, 0] = 1.0
        state = layer.init_state(1, dtype=torch.float64)
        outputs = []
        layer._output = lambda s: outputs.append(s[0]) or s  # the SSM output, before GELU and the GLU
        for t in range(length):
            _, state = layer.step(impulse[:, t], state)
        del layer._output
        response = torch.stack(outputs, -1)  # (H, L): K_l, plus D at l = 0
        response[:, 0] -= layer.D.detach()
        torch.testing.assert_close(kernel.double(), response, rtol=1e-4, atol=1e-6)
    path = viz.plot_kernels(layer, tmp_path / "kernels.png", length=length)
    assert_png(path)


def test_plot_kernels_refuses_a_model_without_kernels(tmp_path):
    with pytest.raises(ValueError, match="no S4, S4D or Hyena"):
        viz.plot_kernels(small_model("mamba"), tmp_path / "k.png")
    with pytest.raises(TypeError, match="S4, S4D or Hyena"):
        viz.convolution_kernel(ssmkit.build_mixer("mamba", 8), 16)


def test_hippo_reconstruction_png(tmp_path):
    assert_png(viz.plot_hippo_reconstruction(tmp_path / "hippo.png", measures=("legs",), N=16, T=1.0))


def test_state_trajectory_follows_the_recurrence(tmp_path):
    model = small_model("s4d", mixer_kwargs={"d_state": 8})
    tokens = torch.randint(0, 11, (20,))
    trajectory = viz.state_trajectory(model, tokens, layer=1)
    (key, values), = trajectory.items()
    assert key == "s4d.h" and values.shape == (20, 8)
    state = model(tokens[None], return_state=True).state  # the parallel pass ends in the same state
    torch.testing.assert_close(values[-1], state[1]["s4d.h"][0].abs().norm(dim=-1), rtol=1e-4, atol=1e-5)
    assert_png(viz.plot_state_trajectory(model, tokens, tmp_path / "states.png", layer=1))
    with pytest.raises(ValueError, match="layer"):
        viz.state_trajectory(model, tokens, layer=2)


def test_mamba_selectivity_is_the_delta_the_layer_scans_with(monkeypatch, tmp_path):
    import ssmkit.layers.mamba as mamba_module

    model = small_model("mamba")
    tokens = torch.randint(0, 11, (17,))
    seen = []
    real_scan = mamba_module.selective_scan

    def spy(u, delta, *args, delta_bias=None, delta_softplus=False, **kwargs):
        seen.append(F.softplus(delta + delta_bias[:, None])[0] if delta_softplus else delta[0])
        return real_scan(u, delta, *args, delta_bias=delta_bias, delta_softplus=delta_softplus, **kwargs)

    monkeypatch.setattr(mamba_module, "selective_scan", spy)
    # the plain PyTorch scan: this test is about Delta, not about building the C++ one (which may wait on a lock)
    with use_backend("torch"), torch.no_grad():
        model(tokens[None])
        deltas = viz.mamba_selectivity(model, tokens)
    assert sorted(deltas) == [0, 1] and deltas[0].shape == (16, 17)  # d_inner = 2 * d_model
    for layer, expected in zip(sorted(deltas), seen[:2]):
        torch.testing.assert_close(deltas[layer], expected.float(), rtol=1e-5, atol=1e-6)
    with use_backend("torch"):
        assert_png(viz.plot_selectivity(model, tokens, tmp_path / "sel.png",
                                        token_labels=[str(int(t)) for t in tokens]))
    with pytest.raises(ValueError, match="no Mamba"):
        viz.mamba_selectivity(small_model("s4d"), tokens)


def test_confusion_matrix_counts_and_png(tmp_path):
    counts = viz.confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0], 3)
    assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    with pytest.raises(ValueError, match="num_classes"):
        viz.confusion_matrix([0, 3], [0, 1], 3)
    assert_png(viz.plot_confusion_matrix([0, 0, 1, 2], [0, 1, 1, 2], tmp_path / "cm.png", class_names=["a", "b", "c"]))


def test_forecast_png(tmp_path):
    history = np.sin(np.arange(48) / 3)
    truth = np.sin(np.arange(48, 60) / 3)
    path = viz.plot_forecast(history, truth, truth + 0.1, tmp_path / "f.png", baselines={"naive": truth * 0},
                             history_start=10)
    assert_png(path)
    with pytest.raises(ValueError, match="truth and forecast"):
        viz.plot_forecast(history, truth, truth[:3], tmp_path / "g.png")


def test_training_curves_need_a_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        viz.plot_training_curves(tmp_path, tmp_path / "c.png")
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"event": "train", "step": s, "loss": 2.0 / s} for s in range(1, 6)] +
        [{"event": "eval", "step": 5, "split": "val", "length": 8, "loss": 0.5, "accuracy": 0.7}]))
    assert_png(viz.plot_training_curves(tmp_path, tmp_path / "c.png"))
