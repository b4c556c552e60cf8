"""The Mamba-3 core: our reference and chunked form against the authors' pure-PyTorch references (a float64
fixture generated from them, see mamba3_fixture_inputs.py), and the chunked form against our sequential
reference on outputs, final states and every gradient (initial states included) in float64."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ssmkit.ops.backends import last_backend
from ssmkit.ops.mamba3 import mamba3_ssm, mamba3_ssm_step

from .mamba3_fixture_inputs import fixture_inputs

FIXTURE = json.loads((Path(__file__).parent / "mamba3_reference_fixture.json").read_text())
BACKENDS = ("reference", "chunked")


def expected(case, key):
    return torch.tensor(FIXTURE[case][key], dtype=torch.float64)


def angle_close(ours, theirs):
    """Angles agree modulo 2 pi (the authors' MIMO step reference does not wrap them)."""
    return ((ours - theirs + math.pi) % (2 * math.pi) - math.pi).abs().max().item()


def our_inputs(i, rank=None):
    q = i["C"] + i["C_bias"].permute(1, 0, 2)                       # (B, L, R, H, N) + (R, H, N)
    k = i["B"] + i["B_bias"].permute(1, 0, 2)
    if rank is not None:
        q, k = q[:, :, rank:rank + 1], k[:, :, rank:rank + 1]
    return q, k, i["A"] * i["dt"], i["dt"], torch.sigmoid(i["trap"]), math.pi * torch.tanh(i["angles"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_siso_matches_the_authors_step_reference(backend):
    i = fixture_inputs()
    q, k, adt, dt, trap, rates = our_inputs(i, rank=0)
    theta, ssm, k0, v0 = i["state"]
    state = (theta, ssm, k0[:, :, 0].unsqueeze(1), v0[:, :, 0].unsqueeze(1))
    y, (theta_f, ssm_f, k_f, v_f) = mamba3_ssm(q, k, i["x"].unsqueeze(2), adt, dt, trap, rates, i["D"], state, True,
                                               "adjacent", chunk_size=3, backend=backend)
    assert last_backend("mamba3_ssm") == backend
    torch.testing.assert_close(y[:, :, 0], expected("siso_step_ref", "y"), rtol=0, atol=1e-10)
    torch.testing.assert_close(ssm_f, expected("siso_step_ref", "ssm"), rtol=0, atol=1e-10)
    torch.testing.assert_close(k_f[:, 0], expected("siso_step_ref", "k"), rtol=0, atol=1e-10)
    torch.testing.assert_close(v_f[:, 0], expected("siso_step_ref", "v"), rtol=0, atol=0)
    assert angle_close(theta_f, expected("siso_step_ref", "angle")) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_mimo_matches_the_authors_step_reference(backend):
    """Their MIMO step reference rotates adjacent pairs; up-projects x by mimo_x, contracts by mimo_o."""
    i = fixture_inputs()
    q, k, adt, dt, trap, rates = our_inputs(i)
    v = torch.einsum("blhp,hrp->blrhp", i["x"], i["mimo_x"])
    theta, ssm, k0, v0 = i["state"]
    state = (theta, ssm, k0.permute(0, 2, 1, 3), v0.permute(0, 2, 1, 3))  # theirs (B, H, R, .), ours (B, R, H, .)
    y, (theta_f, ssm_f, k_f, _) = mamba3_ssm(q, k, v, adt, dt, trap, rates, i["D"], state, True, "adjacent",
                                             chunk_size=4, backend=backend)
    y = torch.einsum("blrhp,hrp->blhp", y, i["mimo_o"])
    torch.testing.assert_close(y, expected("mimo_step_ref", "y"), rtol=0, atol=1e-10)
    torch.testing.assert_close(ssm_f, expected("mimo_step_ref", "ssm"), rtol=0, atol=1e-10)
    torch.testing.assert_close(k_f, expected("mimo_step_ref", "k").permute(0, 2, 1, 3), rtol=0, atol=1e-10)
    assert angle_close(theta_f, expected("mimo_step_ref", "angle")) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_mimo_halves_match_the_authors_chunk_reference(backend):
    """Their MIMO kernels (and the chunk reference aligned with them) pair state channel i with i + N/2; with
    rope_fraction 0.5 the first N/4 of each half rotate."""
    i = fixture_inputs()
    q, k, adt, dt, trap, rates = our_inputs(i)
    v = torch.einsum("blhp,hrp->blrhp", i["x"], i["mimo_x"])
    y, (_, ssm_f, k_f, _) = mamba3_ssm(q, k, v, adt, dt, trap, rates, i["D"], None, True, "halves", chunk_size=3,
                                       backend=backend)
    y = torch.einsum("blrhp,hrp->blhp", y, i["mimo_o"])
    torch.testing.assert_close(y, expected("mimo_chunk_ref_halves", "y"), rtol=0, atol=1e-10)
    # their chunk reference returns the final state cast to float32 (``next_state.float()``)
    torch.testing.assert_close(ssm_f, expected("mimo_chunk_ref_halves", "ssm_key_value").transpose(-1, -2),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k_f, expected("mimo_chunk_ref_halves", "k"), rtol=0, atol=1e-10)


def random_inputs(g, B, L, R, H, N, P, S):
    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    dt = F.softplus(r(B, L, H) - 1)
    tensors = [r(B, L, R, H, N), r(B, L, R, H, N), r(B, L, R, H, P),
               -dt * (torch.rand(B, L, H, generator=g, dtype=torch.float64) + 0.05), dt,
               torch.sigmoid(r(B, L, H)), r(B, L, H, S)]
    D = r(H)
    state = (r(B, H, S), r(B, H, P, N), r(B, R, H, N), r(B, R, H, P))
    return [t.requires_grad_() for t in tensors], D.requires_grad_(), tuple(s.requires_grad_() for s in state)


def run(backend, tensors, D, state, pairs, chunk):
    y, final = mamba3_ssm(*tensors, D, state, True, pairs, chunk_size=chunk, backend=backend)
    g = torch.Generator().manual_seed(5)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum()
    for part in final:
        loss = loss + (part * torch.randn(part.shape, generator=g, dtype=part.dtype)).sum()
    leaves = list(tensors) + [D] + (list(state) if state is not None else [])
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [y, *final] + [torch.zeros_like(x) if d is None else d for x, d in zip(leaves, grads)]


@pytest.mark.parametrize("pairs", ["adjacent", "halves"])
@pytest.mark.parametrize("length, chunk, rank", [(1, 4, 1), (13, 4, 1), (16, 8, 2), (21, 5, 3)])
def test_chunked_matches_the_reference_with_gradients(length, chunk, rank, pairs):
    g = torch.Generator().manual_seed(length)
    tensors, D, state = random_inputs(g, 2, length, rank, 3, 8, 3, 2)
    for s in (None, state):
        got, want = run("chunked", tensors, D, s, pairs, chunk), run("reference", tensors, D, s, pairs, chunk)
        for n, (a, b) in enumerate(zip(got, want)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"L={length} state={s is not None} item {n}")


def test_step_continues_the_sequence():
    g = torch.Generator().manual_seed(1)
    tensors, D, state = random_inputs(g, 2, 6, 2, 2, 4, 2, 1)
    tensors = [t.detach() for t in tensors]
    y, final = mamba3_ssm(*tensors, D.detach(), None, True, "halves", backend="chunked")
    y_last, stepped = mamba3_ssm_step(*(t[:, -1] for t in tensors), D.detach(),
                                      tuple(s.detach() for s in mamba3_ssm(*(t[:, :-1] for t in tensors), D.detach(),
                                                                           None, True, "halves")[1]), "halves")
    torch.testing.assert_close(y_last, y[:, -1], rtol=1e-12, atol=1e-12)
    for a, b in zip(stepped, final):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_bad_input_is_refused_naming_the_argument():
    g = torch.Generator().manual_seed(0)
    tensors, D, _ = random_inputs(g, 2, 5, 1, 2, 4, 2, 1)
    q, k, v, adt, dt, trap, rates = (t.detach() for t in tensors)
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=r"k must be \(2, 5, 1, 2, 4\) like q"):
            mamba3_ssm(q, k[..., :3], v, adt, dt, trap, rates, backend=backend)
        with pytest.raises(ValueError, match=r"dt must be \(batch=2, length=5, n_heads=2\)"):
            mamba3_ssm(q, k, v, adt, dt[:, :4], trap, rates, backend=backend)
        with pytest.raises(ValueError, match="rotary_pairs must be one of"):
            mamba3_ssm(q, k, v, adt, dt, trap, rates, rotary_pairs="interleaved", backend=backend)
        with pytest.raises(ValueError, match="d_state must be even and hold 2 \\* n_angles"):
            mamba3_ssm(q, k, v, adt, dt, trap, torch.zeros(2, 5, 2, 3, dtype=q.dtype), backend=backend)
        with pytest.raises(TypeError, match=r"trap must have the dtype of q \(torch.float64\); got torch.float32"):
            mamba3_ssm(q, k, v, adt, dt, trap.float(), rates, backend=backend)
