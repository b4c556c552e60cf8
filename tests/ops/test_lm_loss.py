"""Chunked LM cross-entropy == the full-logits reference: value and gradients, awkward sizes, ignored rows."""

import pytest
import torch

from ssmkit.ops.lm_loss import lm_loss_chunked, lm_loss_ref


@pytest.mark.parametrize("tokens,vocab,chunk", [(1, 7, 1), (37, 61, 8), (64, 50, 64), (65, 33, 1000)])
def test_chunked_equals_reference(tokens, vocab, chunk):
    hidden = torch.randn(tokens, 12, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, 12, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    targets[::5] = -100
    targets[0] = 3 % vocab  # at least one row counts
    grad_out = torch.tensor(1.7, dtype=torch.float64)
    want = lm_loss_ref(hidden, weight, targets)
    want_grads = torch.autograd.grad(want, (hidden, weight), grad_out)
    got = lm_loss_chunked(hidden, weight, targets, chunk_size=chunk)
    got_grads = torch.autograd.grad(got, (hidden, weight), grad_out)
    torch.testing.assert_close(got, want.to(got.dtype))
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


def test_transposed_weight_view_and_bad_args():
    hidden = torch.randn(9, 6, requires_grad=True)
    weight_t = torch.randn(6, 20, requires_grad=True)  # a tied head stored (D, V): pass its transpose view
    targets = torch.randint(0, 20, (9,))
    want = lm_loss_ref(hidden, weight_t.T, targets)
    got = lm_loss_chunked(hidden, weight_t.T, targets, chunk_size=4)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, weight_t)[0], torch.autograd.grad(want, weight_t)[0])
    with pytest.raises(ValueError, match="chunk_size must be"):
        lm_loss_chunked(hidden, weight_t.T, targets, chunk_size=0)
    with pytest.raises(ValueError, match="targets must be"):
        lm_loss_chunked(hidden, weight_t.T, targets[:3])


def test_model_loss_chunk_size_matches_full_logits():
    import ssmkit

    model = ssmkit.from_config(dict(d_model=16, n_layers=2, vocab_size=37, mixer="mamba"))
    ids = torch.randint(0, 37, (2, 11))
    labels = ids.clone()
    labels[0, 4] = -100
    full = model(ids, labels=labels)
    full.loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    chunked = model(ids, labels=labels, loss_chunk_size=7)
    assert chunked.logits is None
    chunked.loss.backward()
    torch.testing.assert_close(chunked.loss, full.loss)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], atol=1e-6, rtol=1e-5, msg=name)
