"""WKV-7 (RWKV-7's generalised delta rule): the chunked form against the sequential reference (outputs, final
states, every gradient, in float64, on awkward sizes), the reference against the paper's matrix form written
out by hand, and 10k steps in float32 where cumulative decays under/overflow."""

import pytest
import torch
import torch.nn.functional as F

from ssmkit.ops.backends import last_backend
from ssmkit.ops.rwkv7 import wkv7, wkv7_chunked, wkv7_ref, wkv7_step


def rwkv7_inputs(batch, length, heads, key_dim, value_dim, generator, dtype=torch.float64, min_log_w=-0.6065):
    """Inputs shaped as RWKV-7's time mix makes them: a = -kappa_hat, b = kappa_hat * alpha with kappa_hat unit
    per head and alpha in (0, 1); log w in (min_log_w, 0)."""
    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    kappa_hat = F.normalize(randn(batch, length, heads, key_dim), dim=-1)
    alpha = torch.rand(batch, length, heads, key_dim, generator=generator, dtype=dtype)
    log_w = min_log_w * torch.rand(batch, length, heads, key_dim, generator=generator, dtype=dtype)
    r, k = randn(batch, length, heads, key_dim), randn(batch, length, heads, key_dim) * 0.5
    v = randn(batch, length, heads, value_dim)
    return [t.requires_grad_() for t in (r, log_w, k, v, -kappa_hat, kappa_hat * alpha)]


def run(backend, inputs, state0, chunk_size=16):
    leaves = list(inputs) + ([state0] if state0 is not None else [])
    y, state = wkv7(*inputs, initial_state=state0, return_final_state=True, chunk_size=chunk_size, backend=backend)
    assert last_backend("wkv7") == backend
    g = torch.Generator().manual_seed(7)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum() + \
        (state * torch.randn(state.shape, generator=g, dtype=y.dtype)).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)  # one step from zeros never reads log_w
    return (y, state) + tuple(torch.zeros_like(x) if d is None else d for x, d in zip(leaves, grads))


@pytest.mark.parametrize("length, chunk_size", [(1, 16), (15, 16), (16, 16), (17, 16), (63, 16), (40, 5)])
def test_chunked_matches_the_reference(length, chunk_size):
    g = torch.Generator().manual_seed(length)
    inputs = rwkv7_inputs(2, length, 3, 5, 3, g)  # key_dim 5 != value_dim 3
    state0 = torch.randn(2, 3, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    for s0 in (None, state0):
        got, want = run("chunked", inputs, s0, chunk_size), run("reference", inputs, s0)
        names = ["y", "final state", "d r", "d log_w", "d k", "d v", "d a", "d b", "d initial_state"]
        for name, a, b in zip(names, got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10,
                                       msg=f"L={length} chunk={chunk_size} h0={s0 is not None}: {name}")


def test_chunked_matches_the_reference_for_any_rank_one_update():
    """The op takes any a, b (not only RWKV-7's -kappa_hat, kappa_hat * alpha) and log decays beyond RWKV-7's
    range; the triangular solve must still agree with the loop."""
    g = torch.Generator().manual_seed(11)
    shape = (1, 29, 2, 4)
    r, k, a, b = (torch.randn(*shape, generator=g, dtype=torch.float64) * 0.5 for _ in range(4))
    log_w = -3.0 * torch.rand(*shape, generator=g, dtype=torch.float64)
    v = torch.randn(1, 29, 2, 6, generator=g, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (r, log_w, k, v, a, b)]
    for got, want in zip(run("chunked", inputs, None, 8), run("reference", inputs, None)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_gradcheck_of_the_chunked_form():
    g = torch.Generator().manual_seed(3)
    inputs = rwkv7_inputs(1, 7, 1, 3, 2, g)
    state0 = torch.randn(1, 1, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: wkv7_chunked(*t[:6], initial_state=t[6], return_final_state=True, chunk_size=3),
        (*inputs, state0))


def test_reference_is_the_papers_matrix_form():
    """Two steps of S_t = S_{t-1} (diag(w_t) - kappa_hat_t^T (alpha_t kappa_hat_t)) + v_t^T k~_t, y_t = S_t r_t
    (Peng et al. 2025, Sec. 4, with S as (value, key) as in the authors' code), written with dense matrices."""
    g = torch.Generator().manual_seed(1)
    K, V = 3, 2
    state = torch.randn(V, K, generator=g, dtype=torch.float64)
    steps = []
    for _ in range(2):
        kappa_hat = F.normalize(torch.randn(K, generator=g, dtype=torch.float64), dim=0)
        alpha = torch.rand(K, generator=g, dtype=torch.float64)
        w = torch.rand(K, generator=g, dtype=torch.float64) * 0.5 + 0.5
        r, k, v = (torch.randn(n, generator=g, dtype=torch.float64) for n in (K, K, V))
        steps.append((r, w, k, v, kappa_hat, alpha))
    expected, S = [], state.clone()
    for r, w, k, v, kappa_hat, alpha in steps:
        S = S @ (torch.diag(w) - torch.outer(kappa_hat, alpha * kappa_hat)) + torch.outer(v, k)
        expected.append(S @ r)

    def seq(i):
        return torch.stack([s[i] for s in steps])[None, :, None]                # (1, 2, 1, dim)

    r, w, k, v, kappa_hat, alpha = (seq(i) for i in range(6))
    y, final = wkv7_ref(r, w.log(), k, v, -kappa_hat, kappa_hat * alpha, state[None, None], True)
    torch.testing.assert_close(y[0, :, 0], torch.stack(expected), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(final[0, 0], S, rtol=1e-13, atol=1e-13)
    y_1, state_1 = wkv7_step(r[:, 0], w[:, 0].log(), k[:, 0], v[:, 0], -kappa_hat[:, 0],
                             (kappa_hat * alpha)[:, 0], state[None, None])
    torch.testing.assert_close(y_1[0, 0], expected[0], rtol=1e-13, atol=1e-13)


def test_ten_thousand_steps_in_float32_without_overflow():
    """10k steps, float32, chunks of 64 with log decays down to -4: the cumulative decay of a chunk reaches
    about exp(-128), below float32's smallest number, so a form dividing by cumulative decays would make inf / NaN.
    The chunked form must stay finite and equal the float32 loop and the float64 loop."""
    g = torch.Generator().manual_seed(0)
    length, chunk = 10_000, 64
    inputs = [t.detach() for t in rwkv7_inputs(1, length, 2, 4, 4, g, min_log_w=-4.0)]
    inputs[1][..., 0] = -1e-4                    # one channel that barely decays: the state keeps its history
    cumulative = inputs[1].float()[:, :chunk].cumsum(1)
    assert torch.isinf(torch.exp(-cumulative)).any() and (torch.exp(cumulative) == 0).any()  # the trap is set
    inputs32 = [t.float() for t in inputs]
    with torch.no_grad():
        y_chunked, s_chunked = wkv7(*inputs32, return_final_state=True, chunk_size=chunk, backend="chunked")
        y_loop, s_loop = wkv7(*inputs32, return_final_state=True, backend="reference")
        y_exact, s_exact = wkv7(*inputs, return_final_state=True, backend="reference")
    assert torch.isfinite(y_chunked).all() and torch.isfinite(s_chunked).all()
    scale = y_exact.abs().max().item()
    assert (y_chunked.double() - y_exact).abs().max().item() <= 1e-4 * scale
    assert (y_chunked - y_loop).abs().max().item() <= 1e-4 * scale
    assert (s_chunked.double() - s_exact).abs().max().item() <= 1e-4 * s_exact.abs().max().item()


def test_bad_input_is_refused_naming_the_argument():
    g = torch.Generator().manual_seed(0)
    r, log_w, k, v, a, b = (t.detach() for t in rwkv7_inputs(2, 5, 2, 3, 3, g))
    for backend in ("chunked", "reference"):
        with pytest.raises(ValueError, match=r"k must be \(2, 5, 2, 3\) like r; got \(2, 5, 2, 4\)"):
            wkv7(r, log_w, torch.zeros(2, 5, 2, 4, dtype=r.dtype), v, a, b, backend=backend)
        with pytest.raises(ValueError, match=r"v must be \(2, 5, 2, 'value_dim'\)"):
            wkv7(r, log_w, k, v[:, :4], a, b, backend=backend)
        with pytest.raises(ValueError, match=r"initial_state must be \(batch=2, n_heads=2, value_dim=3, key_dim=3\)"):
            wkv7(r, log_w, k, v, a, b, initial_state=torch.zeros(2, 2, 3, 4, dtype=r.dtype), backend=backend)
        with pytest.raises(TypeError, match=r"b must have the dtype of r \(torch.float64\); got torch.float32"):
            wkv7(r, log_w, k, v, a, b.float(), backend=backend)
        with pytest.raises(ValueError, match=r"r must be \(batch, length, n_heads, key_dim\)"):
            wkv7(r[0], log_w[0], k[0], v[0], a[0], b[0], backend=backend)
    with pytest.raises(ValueError, match="backend"):
        wkv7(r, log_w, k, v, a, b, backend="triton")
    with pytest.raises(ValueError, match="chunk_size"):
        wkv7(r, log_w, k, v, a, b, chunk_size=0, backend="chunked")
