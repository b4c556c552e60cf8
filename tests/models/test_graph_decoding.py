"""In-place steps and CUDA-graph decoding (``Mixer.step_inplace``, ``ssmkit.models.decoding.CUDAGraphDecoder``).

The specification is the model's own ``step``: ``step_inplace`` must give the same output and leave in the
given tensors exactly the state ``step`` returns, for every registered mixer with a state of constant size and
each of its backends (Triton under the interpreter on the CPU). The decoder's bookkeeping (state copied in
once, finished rows keeping their state, the returned state a copy) is checked on the CPU with the graph
recording turned off (``capture=False``, the same in-place step run eagerly); the recorded graph itself is
checked on a GPU, where ``generate`` must give the tokens and states of ``decode_backend="module"``.
"""

import pytest
import torch

import ssmkit
from ssmkit.layers import MIXERS, build_mixer
from ssmkit.models import decoding
from ssmkit.models.decoding import CUDAGraphDecoder, graph_support
from ssmkit.ops._triton import triton_available

ON_GPU = torch.cuda.is_available()
D_MODEL = 8
RECURRENT = sorted(name for name, cls in MIXERS.items()
                   if cls.constant_state and not cls.contract_config.get("bidirectional"))
GROWING = sorted(name for name, cls in MIXERS.items() if not cls.constant_state)


def _rows():
    rows = []
    for name in RECURRENT:
        for backend in MIXERS[name].contract_backends:
            if backend == "cpp":
                continue  # the C++ backend is the scan's; the one-token ops have torch and triton
            marks = [pytest.mark.skipif(not triton_available(), reason="triton is not installed")] \
                if backend == "triton" else []
            rows.append(pytest.param(name, backend, id=name if backend is None else f"{name}-{backend}", marks=marks))
    return rows


def _state_like(mixer, batch, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    state = mixer.init_state(batch, device=device, dtype=dtype)
    return {k: (torch.randn(v.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=v.dtype)
                if v.is_floating_point() or v.is_complex() else v) for k, v in state.items()}


@pytest.mark.parametrize("name,backend", _rows())
def test_step_inplace_equals_step(name, backend):
    device = "cuda" if backend == "triton" and ON_GPU else "cpu"
    dtype = torch.float32 if backend == "triton" else torch.float64
    torch.manual_seed(0)
    mixer = build_mixer(name, D_MODEL, **MIXERS[name].contract_config).to(device=device, dtype=dtype)
    mixer.backend = backend
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.05 * torch.randn_like(p))
        x = torch.randn(3, D_MODEL, device=device, dtype=dtype)
        state = _state_like(mixer, 3, dtype, device, seed=1)
        want_y, want_state = mixer.step(x, {k: v.clone() for k, v in state.items()})
        addresses = {k: v.data_ptr() for k, v in state.items()}
        y = mixer.step_inplace(x, state)
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, want_y, **tol)
    assert {k: v.data_ptr() for k, v in state.items()} == addresses, "the state must stay where it was"
    for key, value in want_state.items():
        torch.testing.assert_close(state[key], value, **tol, msg=lambda m: f"{name} state {key}: {m}")
    if MIXERS[name].inplace_step and backend is not None:  # the one-token ops ran on the asked backend
        assert set(mixer.last_backends.values()) == {backend}, mixer.last_backends


@pytest.mark.parametrize("name", GROWING)
def test_step_inplace_refuses_a_growing_state(name):
    mixer = build_mixer(name, D_MODEL, **MIXERS[name].contract_config)
    with pytest.raises(ValueError, match="growing state"):
        mixer.step_inplace(torch.randn(2, D_MODEL), mixer.init_state(2))


MODELS = {
    "mamba": dict(d_model=24, n_layers=2, vocab_size=37, mixer="mamba", mixer_kwargs=dict(d_state=5, d_conv=3)),
    "mamba2": dict(d_model=32, n_layers=2, vocab_size=37, mixer="mamba2",
                   mixer_kwargs=dict(headdim=8, d_state=6, ngroups=2)),
    "hybrid-mlp": dict(d_model=16, n_layers=3, vocab_size=37, mixer="MHS", mlp="gated",
                       mixer_kwargs=dict(mamba=dict(d_state=4), s4d=dict(d_state=4))),
    "mlp-only-layer": dict(d_model=16, n_layers=3, vocab_size=37, mixer="M-M", mlp=["none", "gated", "none"],
                           mixer_kwargs=dict(mamba=dict(d_state=4))),
    "multipliers": dict(d_model=16, n_layers=2, vocab_size=37, mixer="mamba2", mlp="gated",
                        mixer_kwargs=dict(headdim=8, d_state=4), embedding_multiplier=1.5, residual_multiplier=0.7,
                        logit_multiplier=0.4),
}


def _model(kind, device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    model = ssmkit.from_config(MODELS[kind]).to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _eager_graph_decoder(monkeypatch):
    """Route generate's "cuda_graph" backend to the decoder with recording off, on the CPU."""
    monkeypatch.setattr(decoding, "resolve_decode_backend", lambda model, choice: ("cuda_graph", "test"))
    decoders = {}

    def get(model):
        return decoders.setdefault(id(model), CUDAGraphDecoder(model, capture=False))
    monkeypatch.setattr(decoding, "graph_decoder", get)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_in_place_decoding_bookkeeping(monkeypatch, kind):
    model = _model(kind)
    prompts = [torch.randint(1, 37, (n,)) for n in (5, 3, 5)]
    args = dict(eos_token_id=[4, 7, 9], return_state=True, do_sample=True, seed=3, temperature=1.5)
    want = model.generate(prompts, 16, **args)
    want_more = model.generate(torch.tensor([[2], [3], [5]]), 6, state=want.state, return_state=True)
    _eager_graph_decoder(monkeypatch)
    got = model.generate(prompts, 16, **args)
    assert model.last_decode_backend == "cuda_graph"
    assert torch.equal(got.sequences, want.sequences)
    finished = (got.new_tokens == 4) | (got.new_tokens == 7) | (got.new_tokens == 9)
    assert bool(finished.any()), "the test needs rows that finish early (change the seed)"
    for a, b in zip(got.state, want.state):
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-6)
    got_more = model.generate(torch.tensor([[2], [3], [5]]), 6, state=got.state, return_state=True)
    assert torch.equal(got_more.sequences, want_more.sequences)
    # the state given back is the caller's own: decoding again does not change it
    kept = [{k: v.clone() for k, v in layer.items()} for layer in got.state]
    model.generate(prompts, 4)
    assert all(torch.equal(kept[i][k], got.state[i][k]) for i in range(len(kept)) for k in kept[i])


def test_graph_support_reasons():
    attention = ssmkit.from_config(dict(d_model=16, n_layers=2, vocab_size=11, mixer="attention"))
    assert "CUDA model" in graph_support(attention)
    assert "growing cache" in graph_support(attention, require_cuda=False)
    moe = ssmkit.from_config(dict(d_model=16, n_layers=2, vocab_size=11, mixer="mamba", mlp="moe", num_experts=3,
                                  top_k=2))
    assert "MoE" in graph_support(moe, require_cuda=False)
    assert graph_support(_model("mamba"), require_cuda=False) is None
    with pytest.raises(ValueError, match="decode_backend='cuda_graph'.*CUDA"):
        _model("mamba").generate(torch.tensor([[1, 2]]), 2, decode_backend="cuda_graph")
    model = _model("mamba")
    model.generate(torch.tensor([[1, 2]]), 2)
    assert model.last_decode_backend == "module" and model.last_decode_backend_reason == "the default"


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_cuda_graph_generate_equals_module(kind):
    model = _model(kind, device="cuda")
    prompts = torch.randint(1, 37, (4, 9), device="cuda")
    want = model.generate(prompts, 20, eos_token_id=4, return_state=True, decode_backend="module")
    got = model.generate(prompts, 20, eos_token_id=4, return_state=True)
    assert model.last_decode_backend == "cuda_graph", model.last_decode_backend_reason
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.state, want.state):
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4)
    # another batch size records another graph; the first is reused
    model.generate(prompts[:1], 3)
    again = model.generate(prompts, 20, eos_token_id=4)
    assert torch.equal(again.sequences, want.sequences)
    assert set(decoding.graph_decoder(model)._graphs) == {4, 1}


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_bf16_and_fallbacks():
    model = _model("mamba2", device="cuda", dtype=torch.bfloat16)
    prompts = torch.randint(1, 37, (2, 7), device="cuda")
    want = model.generate(prompts, 8, decode_backend="module")
    got = model.generate(prompts, 8)
    assert model.last_decode_backend == "cuda_graph"
    assert torch.equal(got.sequences, want.sequences)
    moe = ssmkit.from_config(dict(d_model=16, n_layers=2, vocab_size=11, mixer="mamba", mlp="moe", num_experts=3,
                                  top_k=2)).cuda()
    moe.generate(torch.tensor([[1, 2]], device="cuda"), 2)
    assert moe.last_decode_backend == "module" and "MoE" in moe.last_decode_backend_reason


def test_logits_to_keep():
    model = _model("mamba")
    ids = torch.randint(0, 37, (2, 9))
    full = model(ids).logits
    last = model(ids, logits_to_keep=3).logits
    assert last.shape == (2, 3, full.shape[-1])
    torch.testing.assert_close(last, full[:, -3:])
    with pytest.raises(ValueError, match="logits_to_keep must be a positive int"):
        model(ids, logits_to_keep=0)
    with pytest.raises(ValueError, match="no labels"):
        model(ids, labels=ids, logits_to_keep=1)
