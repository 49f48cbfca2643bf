"""Loss closures and Hessian-vector products, checked against dense float64 Hessians of tiny models."""

import numpy as np
import pytest
import scipy.sparse.linalg
import timm
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from landscape.curvature.loss import LossFunction, parameters_by_pattern, unflatten_vector
from landscape.curvature.operators import HessianOperator
from tiny_models import data, tiny_mlp, tiny_vit

from landscape.errors import ConfigError
from landscape.curvature.products import dense_hessian, hessian_vector_product, hessian_vector_product_double_backward


def dense_reference(model: nn.Module, x, y, names) -> torch.Tensor:
    """The Hessian by torch.autograd.functional.hessian of the mean loss over all of (x, y) in one batch."""
    params = dict(model.named_parameters())
    shapes = {n: params[n].shape for n in names}
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])

    def loss(flat):
        values = unflatten_vector(flat, shapes)
        out = torch.func.functional_call(model, {**{n: p.detach() for n, p in params.items()}, **values}, (x,))
        return nn.functional.cross_entropy(out, y)

    was_training = model.training
    model.eval()
    with sdpa_kernel(SDPBackend.MATH):
        H = torch.autograd.functional.hessian(loss, theta, vectorize=True)
    model.train(was_training)
    return H


MODELS = {"vit": tiny_vit, "mlp": tiny_mlp}


@pytest.fixture(scope="module", params=list(MODELS))
def problem(request):
    model = MODELS[request.param]()
    x, y = data()
    loss = LossFunction(model, x, y, batch_size=4)  # 4 + 4 + 2: the short last batch must count by its size
    return model, x, y, loss, dense_reference(model, x, y, loss.names)


def test_hvp_equals_dense_hessian_times_vector(problem):
    model, x, y, loss, H = problem
    v = torch.randn(loss.num_parameters, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    hv = hessian_vector_product(loss, v)
    assert torch.linalg.norm(hv - H @ v) <= 1e-10 * torch.linalg.norm(H @ v)


def test_forward_over_reverse_equals_double_backward(problem):
    _, _, _, loss, _ = problem
    v = torch.randn(loss.num_parameters, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    a = hessian_vector_product(loss, v)
    b = hessian_vector_product_double_backward(loss, v)
    assert torch.linalg.norm(a - b) <= 1e-10 * torch.linalg.norm(b)


def test_batched_hvp_equals_one_vector_at_a_time(problem):
    _, _, _, loss, H = problem
    V = torch.randn(loss.num_parameters, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    batched = hessian_vector_product(loss, V)
    assert batched.shape == V.shape
    singles = torch.stack([hessian_vector_product(loss, V[:, i]) for i in range(5)], dim=1)
    assert torch.allclose(batched, singles, rtol=1e-10, atol=1e-12)
    assert torch.linalg.norm(batched - H @ V) <= 1e-10 * torch.linalg.norm(H @ V)


def test_dict_vectors_round_trip_and_hvp(problem):
    _, _, _, loss, H = problem
    v = torch.randn(loss.num_parameters, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    as_dict = loss.unflatten(v)
    assert list(as_dict) == loss.names and torch.equal(loss.flatten(as_dict), v)
    hv = hessian_vector_product(loss, as_dict)
    assert isinstance(hv, dict) and torch.allclose(loss.flatten(hv), H @ v, rtol=1e-10, atol=1e-12)


def test_loss_is_batch_size_independent_with_a_short_last_batch(problem):
    model, x, y, loss, _ = problem
    whole = LossFunction(model, x, y, batch_size=None)
    was_training = model.training
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        model.eval()
        expected = float(nn.functional.cross_entropy(model(x), y))
    model.train(was_training)  # the model is shared by the module's tests
    assert loss.loss() == pytest.approx(expected, rel=1e-12)
    assert whole.loss() == pytest.approx(expected, rel=1e-12)
    l1, g1 = loss.loss_and_gradient()
    l2, g2 = whole.loss_and_gradient()
    assert l1 == pytest.approx(l2, rel=1e-12) and torch.allclose(g1, g2, rtol=1e-10, atol=1e-13)


def test_gradient_matches_autograd(problem):
    model, x, y, loss, _ = problem
    was_training = model.training
    model.eval()
    with sdpa_kernel(SDPBackend.MATH):
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y),
                                    [dict(model.named_parameters())[n] for n in loss.names])
    model.train(was_training)
    assert torch.allclose(loss.gradient(), torch.cat([g.reshape(-1) for g in grads]), rtol=1e-10, atol=1e-13)


def test_evaluate_reports_loss_and_top1_at_other_parameters(problem):
    model, x, y, loss, _ = problem
    theta = loss.parameter_vector()
    shifted = theta + 0.01
    l_shift, acc = loss.evaluate(shifted)
    assert l_shift != pytest.approx(loss.loss(), rel=1e-9)
    assert 0.0 <= acc <= 100.0
    assert torch.equal(loss.parameter_vector(), theta)  # evaluating elsewhere changes nothing
    other = MODELS["vit" if isinstance(model, timm.models.VisionTransformer) else "mlp"]()  # same seed: theta
    with torch.no_grad():
        for name, p in other.named_parameters():
            if name in loss.names:
                p.add_(0.01)
    assert loss.evaluate(other) == pytest.approx((l_shift, acc), rel=1e-12)  # its own weights, not the closure's


def test_dense_hessian_is_symmetric_and_matches(problem):
    _, _, _, loss, H = problem
    dense = dense_hessian(loss)
    assert torch.allclose(dense, dense.T, atol=1e-12)
    assert torch.linalg.norm(dense - H) <= 1e-10 * torch.linalg.norm(H)


def test_hessian_operator_works_with_scipy(problem):
    _, _, _, loss, H = problem
    op = HessianOperator(loss)
    assert op.shape == (loss.num_parameters,) * 2 and op.dtype == np.float64
    x = np.random.default_rng(0).standard_normal((loss.num_parameters, 2))
    assert np.allclose(op @ x, H.numpy() @ x, rtol=1e-10, atol=1e-12)
    assert op.num_matvecs == 2
    top = scipy.sparse.linalg.eigsh(op, k=1, which="LA", return_eigenvectors=False)
    assert top[0] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-8)


def test_kept_graph_products_equal_the_dense_hessian_over_several_batches(problem):
    _, _, _, loss, H = problem
    op = HessianOperator(loss, product="kept-graph")
    V = torch.randn(loss.num_parameters, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    first = op.torch_matmat(V)
    assert torch.linalg.norm(first - H @ V) <= 1e-10 * torch.linalg.norm(H @ V)
    assert torch.equal(op.torch_matmat(V), first)  # the kept graph gives the same numbers every time
    value, gradient = op.loss_and_gradient()
    expected_value, expected_gradient = loss.loss_and_gradient()
    assert value == pytest.approx(expected_value, rel=1e-12)
    assert torch.allclose(gradient, expected_gradient, rtol=1e-10, atol=1e-13)
    op.release()
    assert torch.allclose(op.torch_matmat(V[:, :1]), first[:, :1], rtol=1e-12, atol=1e-14)  # rebuilt on demand
    assert op.num_matvecs == 7


def test_every_product_path_equals_the_dense_hessian_on_a_block(problem):
    _, _, _, loss, H = problem
    V = torch.randn(loss.num_parameters, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    for product in ("kept-graph", "double-backward", "forward-over-reverse"):
        op = HessianOperator(loss, product=product)
        assert op.strategy == product
        HV = op.torch_matmat(V)
        assert torch.linalg.norm(HV - H @ V) <= 1e-10 * torch.linalg.norm(H @ V), product
        assert torch.allclose(op.torch_matvec(V[:, 1]), HV[:, 1], rtol=1e-10, atol=1e-13), product


def test_auto_keeps_the_graph_only_for_a_single_batch(problem):
    model, x, y, loss, H = problem
    assert HessianOperator(loss).strategy == "double-backward"  # three batches, on a CPU
    whole = LossFunction(model, x, y, batch_size=None)
    op = HessianOperator(whole)
    assert op.strategy == "kept-graph"
    v = torch.randn(whole.num_parameters, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    assert torch.linalg.norm(op.torch_matvec(v) - H @ v) <= 1e-10 * torch.linalg.norm(H @ v)
    with pytest.raises(ConfigError, match="Unknown Hessian-vector product"):
        HessianOperator(whole, product="finite-differences")


def test_subset_hessian_is_the_principal_block_of_the_full_one():
    model, (x, y) = tiny_vit(), data()
    full = LossFunction(model, x, y, batch_size=None)
    H = dense_hessian(full)
    part = LossFunction(model, x, y, batch_size=3, params="blocks.0.mlp.*")
    assert part.names == ["blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias"]
    offsets = np.cumsum([0] + [int(np.prod(s)) for s in full.shapes.values()])
    index = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i, n in enumerate(full.names) if n in part.names])
    assert torch.allclose(dense_hessian(part), H[index][:, index], rtol=1e-10, atol=1e-12)


def test_parameters_by_pattern_accepts_globs_prefixes_and_regexes():
    model = tiny_vit()
    assert set(parameters_by_pattern(model, "*attn*")) == {
        "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias"}
    assert set(parameters_by_pattern(model, "blocks.0.norm1")) == {"blocks.0.norm1.weight", "blocks.0.norm1.bias"}
    assert set(parameters_by_pattern(model, r"re:^head\.")) == {"head.weight", "head.bias"}
    assert set(parameters_by_pattern(model, "cls_token, pos_embed")) == {"cls_token", "pos_embed"}
    assert len(parameters_by_pattern(model, None)) == len(list(model.parameters()))
    with pytest.raises(ConfigError, match="No trainable parameter"):
        parameters_by_pattern(model, "blocks.7.*")
    with pytest.raises(ConfigError, match="regular expression"):
        parameters_by_pattern(model, "re:(")
    # a regular expression's {1,2} was cut at the comma, into a regex matching a literal '{1' and a prefix '2}',
    # and the selection was the head alone; a comma outside braces and brackets still separates alternatives
    assert set(parameters_by_pattern(model, r"re:^(blocks\.0\.norm){1,2}1\.[wb],head.weight")) == {
        "head.weight", "blocks.0.norm1.weight", "blocks.0.norm1.bias"}
    assert set(parameters_by_pattern(model, r"re:^head\.[w,]eight|cls_token, pos_embed")) == {
        "head.weight", "cls_token", "pos_embed"}


class SharedMLP(nn.Module):
    """One Linear used by two blocks (as in GroupedMLP), a frozen scale and a Linear that is never used."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.embed = nn.Linear(64, 5)
        shared = nn.Linear(5, 5)
        self.block1, self.block2 = nn.Sequential(shared, nn.Tanh()), nn.Sequential(shared, nn.Tanh())
        self.unused = nn.Linear(5, 5)
        self.scale = nn.Parameter(torch.ones(5), requires_grad=False)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = self.embed(x.flatten(1))
        h = self.block2(self.block1(h)) * self.scale
        return self.head(h)


def test_shared_parameters_count_once_and_unused_or_frozen_ones_are_skipped():
    model = SharedMLP().double()
    x, y = data()
    loss = LossFunction(model, x, y, batch_size=4)
    assert loss.names == ["embed.weight", "embed.bias", "block1.0.weight", "block1.0.bias", "head.weight", "head.bias"]
    assert loss.skipped == ["unused.weight", "unused.bias"]
    # a pattern naming the shared module under its second name selects the one parameter
    assert list(parameters_by_pattern(model, "block2.*")) == ["block1.0.weight", "block1.0.bias"]
    H = dense_reference(model, x, y, loss.names)
    v = torch.randn(loss.num_parameters, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    assert torch.linalg.norm(hessian_vector_product(loss, v) - H @ v) <= 1e-10 * torch.linalg.norm(H @ v)


class TiedEmbedding(nn.Module):
    """An output layer tied to the embedding (``head.weight = emb.weight``): one tensor held by two modules."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.emb, self.lin, self.head = nn.Embedding(12, 6), nn.Linear(6, 6), nn.Linear(6, 12, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.lin(self.emb(x).mean(1))))


def test_a_tensor_tied_between_two_modules_is_one_parameter_moved_everywhere_it_is_used():
    from landscape.curvature.loss import tied_aliases

    model = TiedEmbedding().double()
    x = torch.randint(0, 12, (20, 3), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 12, (20,), generator=torch.Generator().manual_seed(2))
    assert tied_aliases(model) == {"head.weight": "emb.weight"}
    assert tied_aliases(SharedMLP()) == {}  # one module under two paths is swapped once
    loss = LossFunction(model, x, y, batch_size=8)
    assert loss.names == ["emb.weight", "lin.weight", "lin.bias"]
    params = list(model.parameters())  # the model as written, by plain autograd
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(
        nn.functional.cross_entropy(model(x), y), params, create_graph=True)])
    H = torch.stack([torch.cat([t.reshape(-1) for t in torch.autograd.grad(gi, params, retain_graph=True)])
                     for gi in g]).detach()
    _, gradient = loss.loss_and_gradient()
    torch.testing.assert_close(gradient, g.detach(), rtol=1e-10, atol=1e-12)
    v = torch.randn(loss.num_parameters, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    assert torch.linalg.norm(hessian_vector_product(loss, v) - H @ v) <= 1e-10 * torch.linalg.norm(H @ v)
    w = loss.parameter_vector()
    moved = TiedEmbedding().double()
    torch.nn.utils.vector_to_parameters(w + 0.1 * v, moved.parameters())
    with torch.no_grad():
        expected = float(nn.functional.cross_entropy(moved(x), y))
    assert loss.evaluate(w + 0.1 * v)[0] == pytest.approx(expected, rel=1e-12)
    assert model.head.weight is model.emb.weight  # the model keeps its tie and its values
    torch.testing.assert_close(loss.parameter_vector(), w)
    import landscape

    sharp = landscape.sharpness(model, (x, y), rho=[0.01], draws=0)  # swaps the weights in, like the Hessian
    assert 0 < float(sharp["worst_case"][0]) < 0.1


def test_the_model_is_left_exactly_as_it_was():
    model = tiny_vit().train()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    x, y = data()
    loss = LossFunction(model, x, y, batch_size=4)
    v = torch.ones(loss.num_parameters, dtype=torch.float64)
    hessian_vector_product(loss, v)
    hessian_vector_product_double_backward(loss, v)
    loss.loss_and_gradient(loss.parameter_vector() * 2)
    loss.evaluate(loss.parameter_vector() + 1)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_unflatten_vector_splits_the_concatenation_back_into_the_tensors():
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([7.0])}
    vector = torch.cat([t.reshape(-1) for t in tensors.values()])
    back = unflatten_vector(vector, {k: t.shape for k, t in tensors.items()})
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    with pytest.raises(ValueError):
        unflatten_vector(vector[:-1], {k: t.shape for k, t in tensors.items()})


def test_analysis_data_for_run_reads_the_dataset_from_the_run_config(tmp_path):
    from landscape.analyses.evaluation import analysis_data_for_run
    from landscape.config import save_yaml
    from landscape.errors import LandscapeError
    from landscape.runs import Run

    run = Run.create(tmp_path / "run")
    with pytest.raises(LandscapeError, match="which dataset"):
        analysis_data_for_run(run, 16)
    save_yaml({"model": {"name": "x", "kwargs": {}}, "data": {"name": "digits", "img_size": 8}, "seed": 0}, run.config_path)
    x, y = analysis_data_for_run(run, 16, seed=3)
    assert x.shape == (16, 1, 8, 8) and x.dtype == torch.float32 and y.shape == (16,) and y.dtype == torch.int64
    x2, _ = analysis_data_for_run(run, 16, seed=3)
    assert torch.equal(x, x2)


def test_perturbed_evaluation_leaves_a_grouped_model_untouched():
    """functional_call must not leave a shared (GroupedMLP) module holding the perturbed tensors."""
    import torch

    from landscape.curvature.loss import LossFunction
    from landscape.models import create_model

    torch.manual_seed(0)
    model = create_model("vit_pico_patch4_32_grouped_mlp", img_size=8, patch_size=4, in_chans=1, num_classes=3,
                         embed_dim=16, depth=2, num_heads=2, group_size=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    loss = LossFunction(model, x, y, batch_size=4)
    w = loss.parameter_vector()
    shifted = loss.evaluate(w + 0.5)
    assert shifted != loss.evaluate()
    loss.gradient(w + 0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())
    assert model.blocks[0].mlp is model.blocks[1].mlp
