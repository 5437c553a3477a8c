"""Batch norm, noisy batch norm and layer norm against PyTorch autograd in float64.

Skipped without torch (an optional extra). PyTorch is an independent implementation of the
forward passes, and its autograd an independent derivation of the backward passes.

Conventions compared explicitly: PyTorch's ``momentum=0.1`` weights the new batch statistic, ours
(0.9) weights the old running value, so they are the same update. PyTorch stores the *unbiased*
batch variance in ``running_var``; bnexp stores the biased one, like CS231n.
"""

import numpy as np
import pytest

from bnexp import layers as L

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _torch_bn(x, gamma, beta, dout, running_mean, running_var, training, eps=1e-5):
    """Output, gradients and updated running stats from torch for one (N, D) network."""
    xt = torch.tensor(x, requires_grad=True)
    gt = torch.tensor(gamma, requires_grad=True)
    bt = torch.tensor(beta, requires_grad=True)
    rm, rv = torch.tensor(running_mean), torch.tensor(running_var)
    out = F.batch_norm(xt, rm, rv, gt, bt, training=training, momentum=0.1, eps=eps)
    out.backward(torch.tensor(dout))
    grads = (xt.grad.numpy(), gt.grad.numpy(), bt.grad.numpy()) if training else None
    return out.detach().numpy(), grads, rm.numpy(), rv.numpy()


@pytest.mark.parametrize("shape", [(2, 1), (7, 5), (50, 16)])
@pytest.mark.parametrize("backward", [L.batchnorm_backward, L.batchnorm_backward_alt])
def test_train_mode_forward_backward_and_running_stats(shape, backward):
    rng = np.random.default_rng(0)
    N, D = shape
    x = 3.0 * rng.standard_normal(shape) + 1.0
    gamma, beta = rng.standard_normal(D), rng.standard_normal(D)
    dout = rng.standard_normal(shape)
    r_mean, r_var = rng.standard_normal(D), rng.uniform(0.5, 2, D)

    bn_param = {"mode": "train", "running_mean": r_mean, "running_var": r_var}
    out, cache = L.batchnorm_forward(x, gamma, beta, bn_param)
    dx, dgamma, dbeta = backward(dout, cache)
    t_out, (t_dx, t_dgamma, t_dbeta), t_mean, t_var = _torch_bn(
        x, gamma, beta, dout, r_mean, r_var, training=True
    )

    np.testing.assert_allclose(out, t_out, rtol=1e-12, atol=1e-12)
    scale = np.max(np.abs(dout)) * np.max(np.abs(gamma / np.sqrt(x.var(axis=0) + 1e-5)))
    np.testing.assert_allclose(dx, t_dx, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(dgamma, t_dgamma, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dbeta, t_dbeta, rtol=1e-12, atol=1e-12)

    # torch momentum 0.1 == ours 0.9: identical running means.
    np.testing.assert_allclose(bn_param["running_mean"], t_mean, rtol=1e-13)
    # Running variances differ by design: torch folds in the unbiased batch variance.
    batch_var = x.var(axis=0)
    np.testing.assert_allclose(bn_param["running_var"], 0.9 * r_var + 0.1 * batch_var, rtol=1e-13)
    np.testing.assert_allclose(t_var, 0.9 * r_var + 0.1 * batch_var * N / (N - 1), rtol=1e-13)
    assert np.all(t_var > bn_param["running_var"])


def test_test_mode_matches_torch_eval():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((9, 4))
    gamma, beta = rng.standard_normal(4), rng.standard_normal(4)
    r_mean, r_var = rng.standard_normal(4), rng.uniform(0.5, 2, 4)
    bn_param = {"mode": "test", "running_mean": r_mean, "running_var": r_var, "eps": 1e-3}
    out, _ = L.batchnorm_forward(x, gamma, beta, bn_param)
    t_out, _, t_mean, t_var = _torch_bn(
        x, gamma, beta, np.ones_like(x), r_mean, r_var, training=False, eps=1e-3
    )
    np.testing.assert_allclose(out, t_out, rtol=1e-13, atol=1e-14)
    np.testing.assert_array_equal(t_mean, r_mean)  # eval mode updates nothing, in either
    np.testing.assert_array_equal(t_var, r_var)


def test_stack_matches_torch_per_network():
    rng = np.random.default_rng(2)
    K, N, D = 3, 10, 6
    x = rng.standard_normal((K, N, D)) * 2
    gamma, beta = rng.standard_normal((K, D)), rng.standard_normal((K, D))
    dout = rng.standard_normal((K, N, D))
    out, cache = L.batchnorm_forward(x, gamma, beta, {"mode": "train"})
    dx, dgamma, _ = L.batchnorm_backward_alt(dout, cache)
    for k in range(K):
        t_out, (t_dx, t_dgamma, _), _, _ = _torch_bn(
            x[k], gamma[k], beta[k], dout[k], np.zeros(D), np.ones(D), training=True
        )
        np.testing.assert_allclose(out[k], t_out, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dx[k], t_dx, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(dgamma[k], t_dgamma, rtol=1e-12, atol=1e-12)


def _torch_grads(fn, dout, *arrays):
    """Output of ``fn`` on float64 tensors of `arrays` and the gradients of sum(out * dout)."""
    tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
    out = fn(*tensors)
    out.backward(torch.tensor(dout))
    return out.detach().numpy(), [t.grad.numpy() for t in tensors]


@pytest.mark.parametrize("shape", [(1, 2), (7, 5), (50, 16)])
def test_layernorm_matches_torch(shape):
    rng = np.random.default_rng(3)
    D = shape[-1]
    x = 3.0 * rng.standard_normal(shape) - 2.0
    gamma, beta = rng.standard_normal(D), rng.standard_normal(D)
    dout = rng.standard_normal(shape)
    out, cache = L.layernorm_forward(x, gamma, beta, {"eps": 1e-5})
    grads = L.layernorm_backward(dout, cache)
    t_out, t_grads = _torch_grads(
        lambda a, g, b: F.layer_norm(a, (D,), g, b, eps=1e-5), dout, x, gamma, beta
    )
    np.testing.assert_allclose(out, t_out, rtol=1e-12, atol=1e-12)
    for ours, theirs in zip(grads, t_grads, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)


def test_layernorm_stack_matches_torch_per_network():
    rng = np.random.default_rng(4)
    K, N, D = 3, 6, 8
    x = rng.standard_normal((K, N, D)) * 2
    gamma, beta = rng.standard_normal((K, D)), rng.standard_normal((K, D))
    dout = rng.standard_normal((K, N, D))
    out, cache = L.layernorm_forward(x, gamma, beta, {})
    dx, dgamma, dbeta = L.layernorm_backward(dout, cache)
    for k in range(K):
        t_out, (t_dx, t_dgamma, t_dbeta) = _torch_grads(
            lambda a, g, b: F.layer_norm(a, (D,), g, b, eps=1e-5), dout[k], x[k], gamma[k], beta[k]
        )
        np.testing.assert_allclose(out[k], t_out, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dx[k], t_dx, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(dgamma[k], t_dgamma, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dbeta[k], t_dbeta, rtol=1e-12, atol=1e-12)


def test_noisy_batchnorm_matches_torch_with_the_noise_as_constants():
    rng = np.random.default_rng(5)
    N, D = 10, 6
    x = 2.0 * rng.standard_normal((N, D)) + 1.0
    gamma, beta = rng.standard_normal(D), rng.standard_normal(D)
    scale, shift = L.sample_bn_noise(rng, (D,), 1.0)
    dout = rng.standard_normal((N, D))
    out, cache = L.noisy_batchnorm_forward(x, gamma, beta, {"mode": "train"}, (scale, shift))
    grads = L.noisy_batchnorm_backward(dout, cache)
    s, t = torch.tensor(scale), torch.tensor(shift)  # no requires_grad: constants

    def noisy(a, g, b):
        return F.batch_norm(a, None, None, g, b, training=True, eps=1e-5) * s + t

    t_out, t_grads = _torch_grads(noisy, dout, x, gamma, beta)
    np.testing.assert_allclose(out, t_out, rtol=1e-12, atol=1e-12)
    for ours, theirs in zip(grads, t_grads, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)
