"""A new curvature matrix gets every estimator by implementing one product method.

``DampedHessian`` (the loss Hessian plus :math:`\\lambda I`, written here and nowhere in the package) subclasses
:class:`~landscape.curvature.operators.CurvatureOperator` with :meth:`product` alone; each estimator is run on it
and on its dense float64 matrix, built independently with :func:`torch.autograd.functional.hessian`.
"""

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from torch import nn

from landscape.curvature.density import spectral_density
from landscape.curvature.lanczos import top_eigenvalues
from landscape.curvature.loss import LossFunction
from landscape.curvature.operators import CurvatureOperator, preconditioned_operator
from landscape.curvature.products import ForwardOverReverse
from landscape.curvature.trace import deflated_group_traces, deflated_trace, hutch_plus_plus_trace, hutchinson_trace

DAMPING = 0.3


class DampedHessian(CurvatureOperator):
    """:math:`H + \\lambda I`: the only method a curvature matrix has to give is its product."""

    matrix = "damped-hessian"

    def __init__(self, loss: LossFunction, damping: float, **kwargs):
        super().__init__(loss, **kwargs)
        self.damping = damping

    def product(self, vectors: torch.Tensor) -> torch.Tensor:
        return ForwardOverReverse(self.loss).matmat(vectors) + self.damping * vectors


@pytest.fixture(scope="module")
def problem():
    """The operator on a 51-parameter network over three batches, and its dense matrix."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(10, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (10,), generator=g)
    loss = LossFunction(model, x, y, batch_size=4)
    names = loss.names
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])

    def mean_loss(flat):
        pieces = torch.split(flat, [int(np.prod(s)) for s in shapes])
        values = {n: p.view(s) for n, p, s in zip(names, pieces, shapes)}
        return nn.functional.cross_entropy(torch.func.functional_call(model, values, (x,)), y)

    H = torch.autograd.functional.hessian(mean_loss, theta)
    return DampedHessian(loss, DAMPING), H + DAMPING * torch.eye(len(theta), dtype=torch.float64)


def test_the_subclass_is_its_dense_matrix_through_every_interface(problem):
    op, A = problem
    V = torch.randn(A.shape[0], 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    before = op.num_matvecs
    torch.testing.assert_close(op.torch_matmat(V), A @ V, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.torch_matvec(V[:, 0]), A @ V[:, 0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(op @ V.numpy(), (A @ V).numpy(), rtol=1e-10, atol=1e-12)
    assert op.num_matvecs - before == 3 + 1 + 3
    torch.testing.assert_close(op.dense(), A, rtol=1e-10, atol=1e-12)


def test_lanczos_finds_both_ends_of_the_dense_spectrum(problem):
    op, A = problem
    exact = np.linalg.eigvalsh(A.numpy())
    result = top_eigenvalues(op, 3, which="both", tol=1e-10, seed=0, return_eigenvectors=True)
    np.testing.assert_allclose(result.largest, exact[::-1][:3], rtol=1e-8)
    np.testing.assert_allclose(result.smallest, exact[:3], rtol=1e-8)
    residuals = A @ result.eigenvectors.T - result.eigenvectors.T * torch.from_numpy(result.eigenvalues)
    assert float(residuals.norm(dim=0).max()) <= 1e-6 * float(np.abs(exact).max())


def test_scipy_eigsh_takes_the_subclass(problem):
    op, A = problem
    values = scipy.sparse.linalg.eigsh(op, k=2, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(values), np.linalg.eigvalsh(A.numpy())[-2:], rtol=1e-8)


def test_trace_estimators_equal_their_dense_runs_and_hutch_plus_plus_is_exact_with_a_full_sketch(problem):
    op, A = problem
    n = A.shape[0]
    for estimator in (lambda B: hutchinson_trace(B, 40, seed=3, block_size=7),
                      lambda B: hutch_plus_plus_trace(B, 30, seed=3, block_size=7)):
        on_operator, on_dense = estimator(op), estimator(A)
        assert on_operator.estimate == pytest.approx(on_dense.estimate, rel=1e-10)
        assert on_operator.standard_error == pytest.approx(on_dense.standard_error, rel=1e-8)
    exact = float(torch.trace(A))
    assert hutch_plus_plus_trace(op, 2 * n + 2, seed=0, sketch_size=n).estimate == pytest.approx(exact, rel=1e-10)
    basis = top_eigenvalues(op, 4, tol=1e-10, seed=0, return_basis=True)
    deflated = deflated_trace(op, basis.basis, 40, basis_trace=basis.basis_trace, seed=4)
    assert deflated.estimate == pytest.approx(deflated_trace(A, basis.basis, 40, seed=4).estimate, rel=1e-9)
    assert abs(deflated.estimate - exact) <= 5 * deflated.standard_error


def test_group_traces_add_up_and_equal_their_dense_run(problem):
    op, A = problem
    n = A.shape[0]
    indices = {"first": torch.arange(0, 20), "rest": torch.arange(20, n)}
    whole, parts, _ = deflated_group_traces(op, indices, 30, seed=2)
    dense_whole, dense_parts, _ = deflated_group_traces(A, indices, 30, seed=2)
    assert whole.estimate == pytest.approx(dense_whole.estimate, rel=1e-10)
    np.testing.assert_allclose(parts, dense_parts, rtol=1e-10)
    assert parts.sum() == pytest.approx(whole.estimate, rel=1e-10)


def test_density_with_a_full_krylov_space_has_the_dense_eigenvalues_as_nodes(problem):
    op, A = problem
    n = A.shape[0]
    density = spectral_density(op, num_probes=2, num_steps=n, seed=1)
    exact = np.linalg.eigvalsh(A.numpy())
    for probe in range(2):
        nodes = np.sort(density.nodes[probe][~np.isnan(density.nodes[probe])])
        # every node is an eigenvalue (exact arithmetic would give all n; rounding may stop a step early)
        assert np.abs(nodes[:, None] - exact[None, :]).min(axis=1).max() <= 1e-7 * np.abs(exact).max()
    dense = spectral_density(A, num_probes=2, num_steps=n, seed=1)
    assert density.moment(1) == pytest.approx(dense.moment(1), rel=1e-9)
    assert density.moment(2) == pytest.approx(dense.moment(2), rel=1e-9)
    assert density.moment(1) == pytest.approx(float(torch.trace(A)) / n, rel=0.5)


def test_the_preconditioned_subclass_has_the_spectrum_of_the_scaled_dense_matrix(problem):
    op, A = problem
    scale = torch.linspace(0.5, 2.0, A.shape[0], dtype=torch.float64)
    result = top_eigenvalues(preconditioned_operator(op, scale), 2, tol=1e-10, seed=0)
    exact = np.linalg.eigvalsh((scale[:, None] * A * scale[None, :]).numpy())[::-1][:2]
    np.testing.assert_allclose(result.eigenvalues, exact, rtol=1e-8)
