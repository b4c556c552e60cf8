"""H3's FFT core (ssmkit.ops.h3.fft) against its token-by-token specification (ssmkit.ops.h3.reference):
outputs, final states and every gradient, float64, awkward sizes (L shorter and longer than the register)."""

import pytest
import torch

from ssmkit.ops.h3 import H3System, h3_fft, h3_ref, shift_ssm, shift_ssm_kernel, shift_ssm_ref

from ..helpers import assert_close_scaled

DT = torch.float64


def random_system(d_model, head_dim, N, N2, seed=0):
    g = torch.Generator().manual_seed(seed)
    H = d_model // head_dim
    r = lambda *s: torch.randn(*s, dtype=DT, generator=g)  # noqa: E731
    dtA = torch.complex(-0.05 - r(H, N2).abs() * 0.3, r(H, N2))
    return H3System(r(d_model, N), r(d_model, N), r(d_model), dtA, torch.complex(r(H, N2), r(H, N2)),
                    torch.complex(r(H, N2), r(H, N2)), r(H))


@pytest.mark.parametrize("L", [1, 4, 7, 63])
@pytest.mark.parametrize("with_state", [False, True])
def test_shift_ssm_fft_equals_recurrence(L, with_state):
    torch.manual_seed(L)
    H, N = 5, 7  # L = 4 < N, L = 7 == N, L = 63 > N
    u, B, C, D = torch.randn(3, H, L, dtype=DT), torch.randn(H, N, dtype=DT), torch.randn(H, N, dtype=DT), \
        torch.randn(H, dtype=DT)
    x0 = torch.randn(3, H, N, dtype=DT) if with_state else None
    y_ref, x_ref = shift_ssm_ref(u, B, C, D, x0)
    y, x = shift_ssm(u, B, C, D, x0, return_state=True)
    assert_close_scaled(y, y_ref, 1e-12, "shift SSM outputs")
    assert_close_scaled(x, x_ref, 1e-12, "shift SSM final register")


@pytest.mark.parametrize("L, head_dim", [(1, 2), (5, 3), (13, 1), (40, 2)])
def test_h3_fft_equals_reference_outputs_states_gradients(L, head_dim):
    d_model, N, N2, batch = 6, 5, 3, 2
    system = random_system(d_model, head_dim, N, N2)
    H = d_model // head_dim
    torch.manual_seed(1)
    # the layer passes transposed views of (batch, L, d_model) projections: use that layout
    q, k, v = (torch.randn(batch, L, d_model, dtype=DT).transpose(1, 2).requires_grad_() for _ in range(3))
    s0 = torch.randn(batch, d_model, N, dtype=DT, requires_grad=True)
    z0 = torch.randn(batch, H, head_dim, head_dim, N2, dtype=torch.complex128, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in system]
    inputs = [q, k, v, s0, z0, *params]

    def run(fn):
        sysp = H3System(*params)
        if fn is h3_ref:
            y, (s, z) = h3_ref(q, k, v, sysp, head_dim, s0, z0)
        else:
            y, (s, z) = h3_fft(q, k, v, sysp, head_dim, s0, z0, return_state=True)
        g = torch.Generator().manual_seed(7)
        loss = (y * torch.randn(y.shape, dtype=DT, generator=g)).sum() + s.square().sum() \
            + torch.view_as_real(z).square().sum()
        grads = torch.autograd.grad(loss, inputs)
        return y.detach(), s.detach(), z.detach(), grads

    y1, s1, z1, g1 = run(h3_ref)
    y2, s2, z2, g2 = run(h3_fft)
    assert_close_scaled(y2, y1, 1e-10, "outputs")
    assert_close_scaled(s2, s1, 1e-10, "final shift register")
    assert_close_scaled(torch.view_as_real(z2), torch.view_as_real(z1), 1e-10, "final kv state")
    names = ["q", "k", "v", "shift_state", "kv_state", *H3System._fields]
    for name, a, b in zip(names, g2, g1):
        if a.is_complex():
            a, b = torch.view_as_real(a), torch.view_as_real(b)
        assert_close_scaled(a, b, 1e-10, f"gradient of {name}")


def test_shift_kernel_with_e1_is_c():
    B = torch.zeros(3, 4, dtype=DT)
    B[:, 0] = 1
    C = torch.randn(3, 4, dtype=DT)
    K = shift_ssm_kernel(B, C, 6)
    assert torch.equal(K[:, :4], C) and torch.equal(K[:, 4:], torch.zeros(3, 2, dtype=DT))


def test_bad_system_is_refused():
    system = random_system(6, 2, 4, 3)
    q = torch.randn(1, 6, 5, dtype=DT)
    with pytest.raises(ValueError, match="head_dim must divide d_model"):
        h3_fft(q, q, q, system, 4)
    with pytest.raises(ValueError, match=r"D must be \(H=3,\)"):
        h3_fft(q, q, q, system._replace(D=torch.randn(4, dtype=DT)), 2)
