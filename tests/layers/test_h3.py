"""H3 against its paper (Fu, Dao et al. 2023, Sec. 3.1): the shift SSM with A = shift matrix and B = e_1 is a
register of the last N keys, so its output is a short causal convolution of K; a hand-built layer whose
only interaction is that shift reproduces K shifted by m steps."""

import torch

import ssmkit
from ssmkit.ops.h3 import shift_ssm_ref, shift_ssm_step

DT = torch.float64


def test_shift_register_holds_the_last_n_keys():
    """With B = e_1 the state after step t is (k_t, k_{t-1}, ..., k_{t-N+1}) (zeros before the start)."""
    H, N, L = 3, 4, 9
    k = torch.randn(2, H, L, dtype=DT)
    B = torch.zeros(H, N, dtype=DT)
    B[:, 0] = 1
    x = torch.zeros(2, H, N, dtype=DT)
    for t in range(L):
        _, x = shift_ssm_step(k[..., t], x, B, torch.zeros(H, N, dtype=DT))
        expected = torch.stack([k[..., t - n] if t - n >= 0 else torch.zeros(2, H, dtype=DT) for n in range(N)], -1)
        assert torch.equal(x, expected), f"register at step {t}"


def test_shift_ssm_with_c_e_m_shifts_k_by_m():
    """C = e_m reads tap m: the shift SSM's output is K delayed by m steps (Sec. 3.1: 'shift SSM')."""
    H, N, L, m = 3, 5, 12, 2
    k = torch.randn(2, H, L, dtype=DT)
    B, C = torch.zeros(H, N, dtype=DT), torch.zeros(H, N, dtype=DT)
    B[:, 0], C[:, m] = 1, 1
    y, _ = shift_ssm_ref(k, B, C)
    assert torch.equal(y[..., m:], k[..., :-m]) and torch.equal(y[..., :m], torch.zeros(2, H, m, dtype=DT))


def test_layer_parallel_pass_reproduces_a_key_shift():
    """In the layer's FFT pass: with C = e_1 (delay 1), no skips, identity projections and a diagonal SSM that
    only passes its input through (D = 1, C = 0), head_dim = 1 gives y_t = q_t k_{t-1} v_t."""
    torch.manual_seed(0)
    layer = ssmkit.H3(d_model=4, d_state=4, head_dim=1).to(DT)
    with torch.no_grad():
        for proj in (layer.q_proj, layer.k_proj, layer.v_proj, layer.output_linear):
            proj.weight.copy_(torch.eye(4))
            proj.bias.zero_()
        layer.ssm_k_C.zero_()
        layer.ssm_k_C[:, 1] = 1
        layer.ssm_k_D.zero_()
        layer.C.zero_()
        layer.D.fill_(1)
    x = torch.randn(2, 10, 4, dtype=DT)
    y = layer(x)
    k_shifted = torch.cat([torch.zeros(2, 1, 4, dtype=DT), x[:, :-1]], 1)
    torch.testing.assert_close(y, x * k_shifted * x, rtol=1e-10, atol=1e-10)


def test_parameter_names_follow_the_authors():
    names = dict(ssmkit.H3(d_model=8, d_state=4).named_parameters())
    for n in ("q_proj.weight", "q_proj.bias", "k_proj.weight", "v_proj.weight", "output_linear.weight",
              "ssm_k_D", "D"):
        assert n in names
