"""Exported step and prefill (ONNX through onnxruntime, and torch.export .pt2) against eager PyTorch.

Each program is driven for 200 steps of greedy generation beside the eager model; both are fed the eager
model's tokens, so a difference in one step cannot hide behind diverging texts. Logits and every state tensor
must agree to 1e-5 in float32 at every step.
"""

import pytest
import torch

from ssmkit import ModelConfig, from_config
from ssmkit.deploy import require
from ssmkit.deploy.export import ExportedRecurrence, check_exportable, export_recurrence

STEPS = 200
TOL = 1e-5
MODELS = {  # name -> (mixer pattern, mixer kwargs): small, so that each export takes seconds
    "mamba": ("M", {"mamba": {"d_state": 8}}),
    "mamba2": ("D", {"mamba2": {"d_state": 16, "headdim": 16, "chunk_size": 8}}),
    "s4d": ("S", {"s4d": {"d_state": 16}}),
    "hybrid": ("MSD", {"mamba": {"d_state": 8}, "s4d": {"d_state": 16},
                       "mamba2": {"d_state": 16, "headdim": 16, "chunk_size": 8}}),
}


def small_model(name, vocab_size=50):
    pattern, kwargs = MODELS[name]
    config = ModelConfig(d_model=32, n_layers=len(pattern), vocab_size=vocab_size, mixer=pattern, mixer_kwargs=kwargs)
    return from_config(config).eval()


def flat(state):
    return [t for layer in state for t in layer.values()]


def max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "hybrid" else n for n in MODELS])
def test_exported_generation_matches_eager(name, fmt, tmp_path):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    model = small_model(name)
    export_recurrence(model, tmp_path, format=fmt, prefill_chunk=8)
    runner = ExportedRecurrence(tmp_path, threads=1)

    prompt = torch.randint(0, 50, (1, 19))  # two chunks of 8 and a remainder of 3 read by the step
    with torch.no_grad():
        out = model(prompt, return_state=True)
        eager_logits, eager_state = out.logits[:, -1], out.state
    logits, state = runner.prefill(prompt, runner.init_state())
    assert max_diff([logits], [eager_logits]) <= TOL
    assert max_diff(state, flat(eager_state)) <= TOL

    worst = 0.0
    for _ in range(STEPS):
        token = eager_logits.argmax(-1)
        with torch.no_grad():
            eager_logits, eager_state = model.step(token, eager_state)
        logits, state = runner.step(token, state)
        worst = max(worst, max_diff([logits], [eager_logits]), max_diff(state, flat(eager_state)))
    assert worst <= TOL, f"{name} {fmt}: largest difference over {STEPS} steps {worst:.3g}"

    # and the runner's own greedy loop gives the eager model's tokens
    tokens, _ = runner.generate(prompt, 20)
    assert torch.equal(tokens, model.generate(prompt, 20).new_tokens)


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
@pytest.mark.parametrize("mixer", ["s4", "s5", "linear_attention"])
def test_other_constant_state_mixers_export(mixer, fmt, tmp_path):
    """The remaining constant-state mixers: 50 greedy tokens and the final state, relative to its size
    (linear attention's state is a running sum that grows)."""
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    model = from_config(ModelConfig(d_model=32, n_layers=1, vocab_size=50, mixer=mixer)).eval()
    manifest = export_recurrence(model, tmp_path, format=fmt, prefill_chunk=8)
    runner = ExportedRecurrence(tmp_path)
    # ONNX reads S4/S5 prompts with the step (their parallel forms compute in complex numbers); pt2 has both
    assert runner.prompt_mode == ("step" if fmt == "onnx" and mixer != "linear_attention" else "prefill+step")
    assert ("prefill" in manifest["not_exported"]) == (runner.prompt_mode == "step")
    prompt = torch.randint(0, 50, (1, 11))
    tokens, state = runner.generate(prompt, 50)
    reference = model.generate(prompt, 50, return_state=True)
    assert torch.equal(tokens, reference.new_tokens)
    for got, want in zip(state, flat(reference.state)):
        assert float((got - want).abs().max()) <= TOL * max(1.0, float(want.abs().max()))


def test_export_regression_model_pt2(tmp_path):
    """Real-valued inputs (a regression head): the step takes (B, input_dim) features."""
    config = ModelConfig(d_model=16, n_layers=1, input_dim=3, head="regression", output_dim=2, mixer="mamba",
                         mixer_kwargs={"d_state": 4})
    model = from_config(config).eval()
    export_recurrence(model, tmp_path, format="pt2", prefill_chunk=4)
    runner = ExportedRecurrence(tmp_path)
    x = torch.randn(1, 6, 3)
    out, state = runner.prefill(x, runner.init_state())
    with torch.no_grad():
        ref = model(inputs=x, return_state=True)
    assert max_diff([out], [ref.logits[:, -1]]) <= TOL
    assert max_diff(state, flat(ref.state)) <= TOL


def test_growing_state_is_refused():
    model = from_config(ModelConfig(d_model=32, n_layers=2, vocab_size=50, mixer="MA"))
    with pytest.raises(ValueError, match="layer 1 \\(attention\\).*grows with the sequence"):
        check_exportable(model)


def test_classifier_is_refused(tmp_path):
    model = from_config(ModelConfig(d_model=16, n_layers=1, vocab_size=10, head="classifier", num_classes=3))
    with pytest.raises(ValueError, match="classifier head"):
        export_recurrence(model, tmp_path, format="pt2")


def test_bad_arguments(tmp_path):
    model = small_model("mamba")
    with pytest.raises(ValueError, match="format must be one of"):
        export_recurrence(model, tmp_path, format="tflite")
    with pytest.raises(ValueError, match="prefill_chunk must be a positive int"):
        export_recurrence(model, tmp_path, prefill_chunk=0)


def test_runner_refuses_ids_outside_vocabulary(tmp_path):
    model = small_model("mamba")
    export_recurrence(model, tmp_path, format="pt2", prefill_chunk=4)
    runner = ExportedRecurrence(tmp_path)
    with pytest.raises(ValueError, match="vocab_size=50"):
        runner.step(torch.tensor([50]), runner.init_state())


def test_missing_extra_names_it():
    with pytest.raises(ImportError, match=r"pip install 'ssmkit\[deploy\]'"):
        require("ssmkit_no_such_package", "ONNX export")


# Whole module: subprocesses, exports or many drawn cases (tens of seconds); `make test` and CI run it,
# `make test-fast` does not.
pytestmark = pytest.mark.slow
