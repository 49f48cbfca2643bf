"""The Gauss-Newton and Fisher operators against dense float64 matrices built from their definitions."""

import numpy as np
import pytest
import torch

from landscape.curvature.loss import LossFunction
from landscape.curvature.operators import EmpiricalFisherOperator, FisherOperator, GGNOperator, curvature_operator
from landscape.curvature.lanczos import top_eigenvalues
from landscape.errors import ConfigError, LandscapeError
from landscape.curvature.products import dense_hessian
from tests.tiny_models import data, tiny_mlp, tiny_vit


def _jacobian_and_outputs(model, x, closure):
    """Dense per-example output Jacobians ``(N, C, P)`` and outputs ``(N, C)`` in the closure's parameter order."""
    params = closure.parameters()
    fixed = {n: t for n, t in model.state_dict().items() if n not in params}

    def outputs(flat):
        return torch.func.functional_call(model, {**fixed, **closure.unflatten(flat)}, (x,))

    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        theta = closure.parameter_vector()
        return torch.func.jacrev(outputs)(theta), outputs(theta).detach()


def _per_example_gradients(model, x, y, closure, labels=None):
    """``(N, P)``: the gradient of each example's own cross-entropy (at ``labels`` when given)."""
    params = closure.parameters()
    fixed = {n: t for n, t in model.state_dict().items() if n not in params}
    labels = y if labels is None else labels

    def loss(flat, xi, yi):
        out = torch.func.functional_call(model, {**fixed, **closure.unflatten(flat)}, (xi[None],))
        return torch.nn.functional.cross_entropy(out, yi[None])

    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(closure.parameter_vector(), x, labels)


@pytest.fixture(params=["mlp", "vit"])
def problem(request):
    model = tiny_mlp() if request.param == "mlp" else tiny_vit()
    x, y = data(10)
    closure = LossFunction(model, x, y, batch_size=4)  # three batches, the last one short
    return model, x, y, closure


def test_ggn_matches_dense_jacobian_sandwich_of_the_cross_entropy_hessian(problem):
    model, x, y, closure = problem
    jac, z = _jacobian_and_outputs(model, x, closure)
    p = torch.softmax(z, dim=-1)
    out_hessian = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (N, C, C): Hessian of CE in the logits
    dense = torch.einsum("icp,icd,idq->pq", jac, out_hessian, jac) / len(x)
    ggn = GGNOperator(closure).dense()
    torch.testing.assert_close(ggn, dense, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ggn, ggn.T, rtol=1e-9, atol=1e-12)



def test_ggn_under_mean_squared_error_is_the_jacobian_outer_product(problem):
    """MSE's Hessian in the outputs is the constant 2 / (n C) I: the GGN is 2 / (N C) J^T J (forward-over-reverse
    through mse_loss failed inside torch)."""
    model, x, y, _ = problem
    targets = torch.nn.functional.one_hot(y, 3).to(torch.float64) if model(x[:1]).shape[-1] == 3 else None
    targets = torch.randn(len(x), model(x[:1]).shape[-1], dtype=torch.float64) if targets is None else targets
    closure = LossFunction(model, x, targets, batch_size=4, criterion=torch.nn.functional.mse_loss)
    jac, _ = _jacobian_and_outputs(model, x, closure)
    flat = jac.reshape(-1, jac.shape[-1])
    dense = 2 * flat.T @ flat / flat.shape[0]
    torch.testing.assert_close(GGNOperator(closure).dense(), dense, rtol=1e-9, atol=1e-12)

def test_true_fisher_equals_the_ggn_for_softmax_cross_entropy(problem):
    _, _, _, closure = problem
    torch.testing.assert_close(FisherOperator(closure).dense(), GGNOperator(closure).dense(), rtol=1e-10, atol=1e-13)


def test_empirical_fisher_is_the_mean_outer_product_of_per_example_gradients(problem):
    model, x, y, closure = problem
    g = _per_example_gradients(model, x, y, closure)
    torch.testing.assert_close(EmpiricalFisherOperator(closure).dense(), g.T @ g / len(x), rtol=1e-9, atol=1e-12)


def test_sampled_fisher_is_the_mean_outer_product_at_its_drawn_labels_and_seeded():
    model, (x, y) = tiny_mlp(), data(10)
    closure = LossFunction(model, x, y, batch_size=4)
    op = FisherOperator(closure, samples=3, seed=7)
    matrix = op.dense()
    labels = torch.cat([op.sampled_labels[b] for b in range(3)], dim=1)  # (S, N), batches in order
    grads = torch.stack([_per_example_gradients(model, x, y, closure, labels[s]) for s in range(3)])  # (S, N, P)
    dense = torch.einsum("snp,snq->pq", grads, grads) / (3 * len(x))
    torch.testing.assert_close(matrix, dense, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(FisherOperator(closure, samples=3, seed=7).dense(), matrix, rtol=0, atol=0)
    assert not torch.equal(FisherOperator(closure, samples=3, seed=8).dense(), matrix)


def test_sampled_fisher_approaches_the_exact_one_with_many_labels():
    model, (x, y) = tiny_mlp(), data(10)
    closure = LossFunction(model, x, y)
    exact = FisherOperator(closure).dense()
    sampled = FisherOperator(closure, samples=4000, seed=0).dense()
    assert float(torch.linalg.norm(sampled - exact) / torch.linalg.norm(exact)) < 0.05


def test_every_estimator_takes_the_ggn_top_eigenvalue_below_dense_eigh():
    model, (x, y) = tiny_mlp(), data(10)
    closure = LossFunction(model, x, y)
    op = curvature_operator(closure, "ggn")
    exact = np.linalg.eigvalsh(op.dense().numpy())[::-1][:3]
    result = top_eigenvalues(op, 3, tol=1e-8, seed=0)
    np.testing.assert_allclose(result.eigenvalues, exact, rtol=1e-6)
    assert exact[-1] >= -1e-12  # positive semi-definite, unlike the Hessian


def test_the_fisher_takes_cross_entropy_in_torchs_spellings_too():
    # F.cross_entropy and nn.CrossEntropyLoss() were refused as "another criterion"
    model, (x, y) = tiny_mlp(), data(10)
    exact = FisherOperator(LossFunction(model, x, y)).dense()
    for criterion in (torch.nn.functional.cross_entropy, torch.nn.CrossEntropyLoss()):
        torch.testing.assert_close(FisherOperator(LossFunction(model, x, y, criterion=criterion)).dense(), exact,
                                   rtol=0, atol=0)


def test_empirical_fisher_of_a_mean_over_the_counted_examples_is_their_mean_outer_product():
    # with ignore_index the loss is a mean over the V counted examples; the matrix came out N / V times too large
    import warnings

    model, (x, y) = tiny_mlp(), data(12)
    y = y.clone()
    y[::3] = -100  # 4 of 12 ignored, 2 in each batch of 6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the mean over a varying count is warned about
        closure = LossFunction(model, x, y, batch_size=6, criterion=torch.nn.CrossEntropyLoss(ignore_index=-100))
    kept = y != -100
    g = _per_example_gradients(model, x[kept], y[kept], closure)
    torch.testing.assert_close(EmpiricalFisherOperator(closure).dense(), g.T @ g / int(kept.sum()), rtol=1e-9,
                               atol=1e-12)


@pytest.mark.parametrize("criterion", [torch.nn.CrossEntropyLoss(ignore_index=-100),
                                       torch.nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0]).double()),
                                       torch.nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0]).double(),
                                                                 ignore_index=1)])
def test_every_matrix_of_a_loss_counting_its_targets_unequally_is_the_whole_sets(criterion):
    # batches weigh their share of the counted targets: the GGN is the dense sandwich of the loss over every example
    # (ignored ones count 0, weighted ones c_i), and the exact Fisher, over the same examples, stays equal to it
    model, (x, y) = tiny_mlp(), data(12)
    y = y.clone()
    y[[0, 1, 2, 7]] = criterion.ignore_index  # batches of 4: at most one kept target in the first, three, four
    jac, z = _jacobian_and_outputs(model, x, LossFunction(model, x, y, batch_size=4, criterion=criterion))
    p = torch.softmax(z, dim=-1)
    kept = (y != criterion.ignore_index).double()
    c = kept * (criterion.weight[y.clamp(min=0)] if criterion.weight is not None else 1.0)
    out_hessian = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) * c[:, None, None]
    dense = torch.einsum("icp,icd,idq->pq", jac, out_hessian, jac) / c.sum()
    loss = LossFunction(model, x, y, batch_size=12, criterion=criterion)
    hessian = dense_hessian(loss)
    # the empirical Fisher: each example's own (unweighted) gradient, weighted as the loss weighs the example
    counted = c > 0
    g = _per_example_gradients(model, x[counted], y[counted], loss)
    empirical = g.T @ (g * c[counted, None]) / c.sum()
    for batch_size in (4, 5, 12):
        closure = LossFunction(model, x, y, batch_size=batch_size, criterion=criterion)
        torch.testing.assert_close(GGNOperator(closure).dense(), dense, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(FisherOperator(closure).dense(), dense, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(EmpiricalFisherOperator(closure).dense(), empirical, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(dense_hessian(closure), hessian, rtol=1e-9, atol=1e-12)
        assert closure.loss() == pytest.approx(float(criterion(model(x), y)), rel=1e-12)


def test_a_sequence_loss_counting_its_tokens_is_the_whole_sets_and_the_fisher_refuses_its_logits():
    # outputs (N, C, T) against targets (N, T), padding ignored: batches weigh their share of the kept tokens, and
    # the empirical Fisher's example is all of its tokens (its r_i r_i^T over every output, not per class row)
    class Tokens(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))

        def forward(self, x):  # (N, T, 3) -> (N, C=3, T)
            return self.net(x).transpose(1, 2)

    model = Tokens().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8, 4), generator=g)
    y[0, 1:] = -100
    y[3, :3] = -100
    y[5, 2:] = -100  # examples of 1 to 4 kept tokens
    criterion = torch.nn.CrossEntropyLoss()
    whole = LossFunction(model, x, y, batch_size=8, criterion=criterion)
    params = whole.parameters()

    def example_loss(flat, xi, yi):  # the mean over one example's kept tokens
        return criterion(torch.func.functional_call(model, whole.unflatten(flat), (xi[None],)), yi[None])

    gradients = torch.func.vmap(torch.func.grad(example_loss), in_dims=(None, 0, 0))(whole.parameter_vector(), x, y)
    tokens = (y != -100).sum(1).double()
    empirical = gradients.T @ (gradients * tokens[:, None]) / tokens.sum()
    hessian, ggn = dense_hessian(whole), GGNOperator(whole).dense()
    assert set(params) == set(dict(model.named_parameters()))
    for batch_size in (3, 8):
        closure = LossFunction(model, x, y, batch_size=batch_size, criterion=criterion)
        assert closure.loss() == pytest.approx(float(criterion(model(x), y)), rel=1e-12)
        torch.testing.assert_close(dense_hessian(closure), hessian, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(GGNOperator(closure).dense(), ggn, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(EmpiricalFisherOperator(closure).dense(), empirical, rtol=1e-9, atol=1e-12)
        with pytest.raises(LandscapeError, match=r"logits of shape \(examples, classes\).*\(3, 3, 4\)|"
                                                 r"logits of shape \(examples, classes\).*\(8, 3, 4\)"):
            FisherOperator(closure).dense()


def test_counted_targets_apply_to_torchs_own_losses_only_and_a_batch_counting_nothing_is_refused():
    model, (x, y) = tiny_mlp(), data(12)

    class Focal(torch.nn.CrossEntropyLoss):  # a subclass with its own forward: a plain mean over examples
        def forward(self, z, t):
            return ((1 - torch.softmax(z, -1).gather(1, t[:, None])[:, 0]) ** 2
                    * torch.nn.functional.cross_entropy(z, t, reduction="none")).mean()

    focal = Focal(weight=torch.tensor([0.5, 2.0, 1.0]).double())
    values = [LossFunction(model, x, y, batch_size=b, criterion=focal).loss() for b in (3, 5, 12)]
    assert values == pytest.approx([float(focal(model(x), y))] * 3, rel=1e-12)
    nll = torch.nn.NLLLoss(ignore_index=0)
    logs = torch.nn.Sequential(model, torch.nn.LogSoftmax(-1))
    y = torch.tensor([0, 0, 0, 1, 2, 0, 1, 1, 2, 0, 2, 1])
    assert LossFunction(logs, x, y, batch_size=4, criterion=nll).loss() == pytest.approx(float(nll(logs(x), y)),
                                                                                        rel=1e-12)
    with pytest.raises(LandscapeError, match=r"Every target of examples 0 to 2 \(a batch of batch_size=3\) is ignored"):
        LossFunction(logs, x, y, batch_size=3, criterion=nll)
    with pytest.raises(LandscapeError, match="Every target of the evaluation set is ignored"):
        LossFunction(logs, x, torch.zeros(12, dtype=torch.long), criterion=nll)


def test_every_matrix_of_a_model_with_multihead_attention_is_its_dense_one():
    # nn.MultiheadAttention takes torch's fused fast path in eval mode, which has no forward-mode derivative: the
    # GGN's, Fisher's and empirical Fisher's products ended in torch's NotImplementedError
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.inp = torch.nn.Linear(3, 4)
            self.att = torch.nn.MultiheadAttention(4, 2, batch_first=True)
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            h = self.inp(x)
            return self.fc((h + self.att(h, h, h)[0]).mean(1))

    model = Net().double().eval()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 5, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
    closure = LossFunction(model, x, y)
    jac, z = _jacobian_and_outputs(model, x, closure)
    p = torch.softmax(z, dim=-1)
    dense = torch.einsum("icp,icd,idq->pq", jac, torch.diag_embed(p) - p[:, :, None] * p[:, None, :], jac) / len(x)
    for matrix in ("ggn", "fisher"):
        torch.testing.assert_close(curvature_operator(closure, matrix).dense(), dense, rtol=1e-9, atol=1e-12)
    assert torch.backends.mha.get_fastpath_enabled()  # restored after


def test_fisher_of_another_criterion_is_one_sentence():
    model, (x, y) = tiny_mlp(), data(10)
    closure = LossFunction(model, x, y, criterion=lambda z, t: torch.nn.functional.cross_entropy(z, t) * 2)
    with pytest.raises(ConfigError, match="for softmax classifiers, whose loss is a cross-entropy"):
        curvature_operator(closure, "fisher")
    with pytest.raises(ConfigError, match="accepted are hessian, ggn"):
        curvature_operator(closure, "kfac")


@pytest.mark.slow
def test_hessian_analysis_takes_the_matrix_and_per_batch_top_eigenvalues():
    from landscape.analyses.hessian import HessianSettings, hessian_analysis

    model, (x, y) = tiny_mlp(), data(10)
    settings = HessianSettings(top_k=2, tol=1e-9, matrix="ggn", per_batch=4, samples=10, dtype="float64")
    ds = hessian_analysis(model, x, y, settings)
    dense = GGNOperator(LossFunction(model, x, y)).dense().numpy()
    np.testing.assert_allclose(ds["eigenvalue_largest"].values, np.linalg.eigvalsh(dense)[::-1][:2], rtol=1e-7)
    assert "Gauss-Newton" in ds["eigenvalue_largest"].attrs["long_name"]
    assert ds["eigenvalue_per_batch"].dims == ("batch",) and ds.sizes["batch"] == 2  # 10 // 4, the rest left out
    for b in range(2):
        part = GGNOperator(LossFunction(model, x[4 * b:4 * b + 4], y[4 * b:4 * b + 4])).dense().numpy()
        assert float(ds["eigenvalue_per_batch"][b]) == pytest.approx(np.linalg.eigvalsh(part)[-1], rel=1e-7)
    hessian = hessian_analysis(model, x, y, HessianSettings(top_k=1, tol=1e-9, per_batch=5, samples=10))
    for b in range(2):
        part = dense_hessian(LossFunction(model, x[5 * b:5 * b + 5], y[5 * b:5 * b + 5])).numpy()
        assert float(hessian["eigenvalue_per_batch"][b]) == pytest.approx(np.linalg.eigvalsh(part)[-1], rel=1e-7)


@pytest.mark.parametrize("kwargs, message", [
    (dict(matrix="kfac"), "accepted are hessian, ggn"),
    (dict(fisher_samples=3), "--matrix fisher only"),
    (dict(per_batch=0), "--per-batch must be between 1"),
    (dict(per_batch=600), "--per-batch must be between 1"),
    (dict(matrix="ggn", which="both"), "--matrix ggn is positive semi-definite .* use --which largest"),
    (dict(matrix="empirical-fisher", which="smallest"), "smallest eigenvalues are 0"),
])
def test_hessian_settings_refuse_bad_matrix_options_in_one_sentence(kwargs, message):
    from landscape.analyses.hessian import HessianSettings

    with pytest.raises(ConfigError, match=message):
        HessianSettings(**kwargs).validate()


def test_results_of_another_matrix_get_a_file_of_their_own():
    from landscape.analyses.hessian import HessianSettings
    from landscape.analyses.results import results_name

    assert results_name("hessian", HessianSettings().determining()) == "hessian"
    # the defaults are left out of the stored settings, so files written before these options still resume
    assert not {"matrix", "fisher_samples", "per_batch"} & set(HessianSettings().determining())
    assert HessianSettings(matrix="ggn").determining()["matrix"] == "ggn"
    assert results_name("hessian", HessianSettings(matrix="ggn").determining()) == "hessian-ggn"
    assert results_name("hessian", HessianSettings(per_batch=64).determining()) == "hessian-per-batch-64"
