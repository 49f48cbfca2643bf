"""The notebook API (``import landscape as ls``): same numbers as the command line, any data form, any loss."""

import copy
import functools
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import xarray as xr
from click.testing import CliRunner
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import landscape as ls
from landscape.errors import LandscapeError

KWARGS = dict(img_size=8, patch_size=4, in_chans=1, num_classes=10, embed_dim=8, depth=1, num_heads=2, mlp_ratio=2)
SAMPLES = 24


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run with one checkpoint of a tiny ViT on the embedded digits."""
    from landscape.checkpoints import save_checkpoint
    from landscape.config import save_yaml
    from landscape.models import create_model
    from landscape.runs import Run

    run = Run.create(tmp_path_factory.mktemp("api") / "run")
    save_yaml({"model": {"name": "vit_tiny_patch16_224", "kwargs": KWARGS}, "data": {"name": "digits", "img_size": 8},
               "seed": 0}, run.config_path)
    torch.manual_seed(3)
    model = create_model("vit_tiny_patch16_224", **KWARGS)
    save_checkpoint(run.checkpoint_path(epoch=1), model.state_dict(), model="vit_tiny_patch16_224",
                    model_kwargs=KWARGS, epoch=1, step=5)
    return run


def checkpoint_model_and_data(run):
    from landscape.analyses.evaluation import analysis_data_for_run
    from landscape.checkpoints import build_model, load_checkpoint

    info = run.checkpoints()[-1]
    _, state = load_checkpoint(info.path, weights="raw")
    x, y = analysis_data_for_run(run, SAMPLES, seed=0)
    return build_model(info, state), x, y


def cli_result(run, analysis, *args, name=None):
    from landscape.cli import cli
    from landscape.summary import load_run

    result = CliRunner().invoke(cli, ["analyze", analysis, str(run.root), "--samples", str(SAMPLES), *args])
    assert result.exit_code == 0, result.output
    kind = analysis
    found = [r for r in load_run(run.root).results if r.kind == kind and (name is None or name in r.path.name)]
    assert len(found) == 1, [r.path.name for r in load_run(run.root).results]
    return found[0].dataset.isel(checkpoint=-1)


def assert_same_numbers(api: xr.Dataset, cli: xr.Dataset) -> None:
    cli = cli.drop_vars([c for c in ("checkpoint", "epoch", "step") if c in cli.coords])
    # where each checkpoint's eigensolve started is a record of the series over checkpoints, not of one model
    cli = cli.drop_vars([v for v in ("eigenvalue_warm_start", "eigenvalue_start_step") if v in cli.data_vars])
    api, cli = api.drop_vars("seconds"), cli.drop_vars("seconds")
    assert sorted(api.data_vars) == sorted(cli.data_vars)
    for name in api.data_vars:
        np.testing.assert_allclose(api[name].values, cli[name].values, rtol=1e-6, atol=1e-9, err_msg=name)
    assert api.attrs["settings"] == cli.attrs["settings"]
    assert api.attrs["analysis"] == cli.attrs["analysis"]
    policies = [key for key in cli.attrs if key.startswith("normalization_")]
    assert {key: api.attrs.get(key) for key in policies} == {key: cli.attrs[key] for key in policies}


def test_hessian_equals_the_cli_on_the_same_checkpoint_and_data(run):
    cli = cli_result(run, "hessian", "--top-k", "3", "--trace")
    model, x, y = checkpoint_model_and_data(run)
    api = ls.hessian(model, (x, y), top_k=3, trace=True)
    assert_same_numbers(api, cli)


def test_sharpness_from_a_dataloader_equals_the_cli(run):
    cli = cli_result(run, "sharpness", "--rho", "0.05,0.1", "--steps", "3", "--draws", "2", "--m", "8")
    model, x, y = checkpoint_model_and_data(run)
    loader = DataLoader(TensorDataset(x, y), batch_size=7)  # batches of another size, concatenated in order
    api = ls.sharpness(model, loader, rho=[0.05, 0.1], steps=3, draws=2, m=8)
    assert_same_numbers(api, cli)
    assert int(api["m_batches"]) == 3


@pytest.mark.parametrize("policies", [{}, {"tokens": "tensor", "one_dim": "filter", "qkv": "row"}],
                         ids=["ours", "li-et-al"])
def test_one_surface_call_equals_the_cli_random_slice(run, policies):
    # each normalisation switch changes the numbers (the ViT has a class token, a position table and a fused qkv)
    options = [a for key, value in policies.items() for a in (f"--{key.replace('_', '-')}", value)]
    options += ["--force"] if policies else []  # the module's run may hold the default slice already
    cli = cli_result(run, "surface", "--dims", "1", "--points", "5", *options)
    model, x, y = checkpoint_model_and_data(run)
    api = ls.surface(model, (x, y), dims=1, points=5, **policies)
    assert_same_numbers(api, cli)
    for key, value in policies.items():
        alone = ls.surface(model, (x, y), dims=1, points=5, **{key: value})
        default = ls.surface(model, (x, y), dims=1, points=5)
        assert not np.allclose(alone["loss"].values, default["loss"].values, rtol=0, atol=1e-7), key


def test_m_larger_than_the_examples_is_refused_in_one_sentence():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    with pytest.raises(LandscapeError, match=r"m=100 is larger than the 10 examples") as error:
        ls.sharpness(model, (x, y), m=100)
    assert str(error.value).count(". ") == 0 and str(error.value).endswith(".")


def test_unknown_setting_and_bad_data_are_refused_in_one_sentence():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    with pytest.raises(LandscapeError, match="has no setting 'topk'"):
        ls.hessian(model, (x, y), topk=3)
    with pytest.raises(LandscapeError, match="10 inputs but 9 targets"):
        ls.hessian(model, (x, y[:9]))
    with pytest.raises(LandscapeError, match="give a DataLoader"):
        ls.hessian(model, x)


class DictModel(nn.Module):
    """Takes ``pixel_values=`` and returns an object with ``.logits``, as a Hugging Face classifier does."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, pixel_values):
        class Output:
            pass

        out = Output()
        out.logits = self.inner(pixel_values)
        return out


def tiny_regression():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randn(12, 2, generator=g,
                                                                                     dtype=torch.float64)


def dense_eigenvalues(model, x, y, loss):
    params = dict(model.named_parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    shapes = {n: p.shape for n, p in params.items()}

    def f(vector):
        tensors, start = {}, 0
        for n, s in shapes.items():
            tensors[n] = vector[start:start + s.numel()].view(s)
            start += s.numel()
        return loss(torch.func.functional_call(model, tensors, (x,)), y)

    return np.linalg.eigvalsh(torch.autograd.functional.hessian(f, flat).numpy())


def test_mse_loss_eigenvalues_match_the_dense_float64_hessian():
    model, x, y = tiny_regression()
    exact = dense_eigenvalues(model, x, y, torch.nn.functional.mse_loss)
    ds = ls.hessian(model, (x, y), loss=torch.nn.functional.mse_loss, top_k=2, which="both", tol=1e-8)
    np.testing.assert_allclose(ds["eigenvalue_largest"].values, exact[::-1][:2], rtol=1e-6)
    np.testing.assert_allclose(ds["eigenvalue_smallest"].values, exact[:2], rtol=1e-6, atol=1e-10)
    assert ds.attrs["loss_function"] == "torch.nn.functional.mse_loss"
    assert ds["loss"].attrs["long_name"] == "mean torch.nn.functional.mse_loss on the evaluation set (the loss given)"
    assert '"loss_function": "torch.nn.functional.mse_loss"' in ds.attrs["settings"]
    assert "units" not in ds["loss"].attrs  # not nats: a squared error has the targets' units squared
    assert ds["eigenvalue_largest"].attrs["units"] == "loss units per squared weight"
    assert ds["gradient_norm"].attrs["units"] == "loss units per weight"



def test_a_loss_that_is_not_a_batch_mean_is_refused_and_label_smoothing_is_exact():
    import torch.nn.functional as F

    model, x, y = tiny_regression()
    total = lambda out, target: F.mse_loss(out, target, reduction="sum")  # noqa: E731
    per_example = lambda out, target: ((out - target) ** 2).mean(dim=1)  # noqa: E731
    for call in (lambda loss: ls.hessian(model, (x, y), loss=loss, top_k=1, batch_size=4),
                 lambda loss: ls.sharpness(model, (x, y), loss=loss, rho=0.1, steps=1, draws=0),
                 lambda loss: ls.surface(model, (x, y), loss=loss, dims=1, points=3)):
        with pytest.raises(LandscapeError, match="not a mean over the batch's examples"):
            call(total)  # its Hessian would be a different multiple of the mean's for every batch_size
        with pytest.raises(LandscapeError, match=r"a tensor of shape \(\d+,\), not one number"):
            call(per_example)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    xs, ys = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    # a mean over the targets kept (ignore_index: padding, void pixels) or weighted by class: each batch weighs its
    # share of the counted targets, so every batch_size gives the whole set's Hessian (batches of 6 took it 21% off)
    ignored = torch.where(torch.arange(20) % 3 == 0, -100, ys)
    ignored[:5] = -100  # a first batch of one kept target in six
    for loss, targets in ((None, ignored), (nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0, 0.5]).double()), ys),
                          (nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0, 0.5]).double(), ignore_index=1), ys),
                          (nn.NLLLoss(ignore_index=0), ys),
                          (functools.partial(nn.functional.cross_entropy, weight=torch.tensor([2.0, 1.0, 0.5]).double(),
                                             ignore_index=-100), ignored)):
        criterion = loss if loss is not None else nn.CrossEntropyLoss()
        measured = net if not isinstance(loss, nn.NLLLoss) else nn.Sequential(net, nn.LogSoftmax(-1))
        exact = dense_eigenvalues(measured, xs, targets, criterion)
        for batch_size in (6, 20):
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # nothing to warn about: the weighting is exact
                ds = ls.hessian(measured, (xs, targets), loss=loss, top_k=2, tol=1e-10, batch_size=batch_size)
            np.testing.assert_allclose(ds["eigenvalue_largest"].values, exact[::-1][:2], rtol=1e-8)
            assert float(ds["loss"]) == pytest.approx(float(criterion(measured(xs), targets).detach()), rel=1e-10)
    # a loss that hides how it counts (a function with ignore_index) is measured with a warning
    with pytest.warns(UserWarning, match="mean over something other than the batch's examples"):
        ls.hessian(net, (xs, ignored), loss=lambda o, t: nn.functional.cross_entropy(o, t, ignore_index=-100),
                   top_k=1, batch_size=6)
    smoothed = nn.CrossEntropyLoss(label_smoothing=0.1)
    exact = dense_eigenvalues(net, xs, ys, smoothed)
    ds = ls.hessian(net, (xs, ys), loss=smoothed, top_k=2, tol=1e-10, batch_size=6)
    np.testing.assert_allclose(ds["eigenvalue_largest"].values, exact[::-1][:2], rtol=1e-8)

def test_dict_inputs_and_logits_objects_give_the_numbers_of_the_plain_model():
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Flatten(), nn.Linear(16, 5), nn.GELU(), nn.Linear(5, 3)).double()
    x = torch.randn(9, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (9,))
    plain = ls.hessian(inner, (x, y), top_k=2, tol=1e-8)
    batches = [{"pixel_values": x[i:i + 4], "labels": y[i:i + 4]} for i in range(0, 9, 4)]
    wrapped = ls.hessian(DictModel(inner), batches, top_k=2, tol=1e-8)
    np.testing.assert_allclose(wrapped["eigenvalue_largest"].values, plain["eigenvalue_largest"].values, rtol=1e-9)
    sharp = ls.sharpness(DictModel(inner), batches, rho=0.1, m=3, steps=2, draws=0)
    assert int(sharp["m_batches"]) == 3 and np.isfinite(sharp["m_sharpness"].values).all()


def test_bfloat16_model_is_measured_in_float32_with_a_warning_and_an_attr():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    low = model.to(torch.bfloat16)
    reference = ls.hessian(_float_copy(low), (x, y), top_k=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ls.hessian(low, (x, y), top_k=1)
    assert [w.filename for w in caught if "measured in float32" in str(w.message)] == [__file__]
    assert "bfloat16" in ds.attrs["precision_note"]
    assert next(low.parameters()).dtype == torch.bfloat16  # the caller's model is not changed
    assert float(ds["eigenvalue_largest"][0]) == float(reference["eigenvalue_largest"][0])


def _float_copy(model):
    import copy

    return copy.deepcopy(model).float()


def test_figures_draw_datasets_in_memory():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(12, 1, 4, 4), torch.randint(0, 3, (12,))
    hessian = ls.hessian(model, (x, y), top_k=2)
    sharp = ls.sharpness(model, (x, y), rho=[0.01, 0.1], steps=2, draws=2)
    surface = ls.surface(model, (x, y), dims=1, points=5)
    run = ls.results(hessian, sharp, surface, label="mlp")
    for name in ("sharpness_vs_rho", "surface_1d"):  # hessian_vs_epoch needs epochs: see the test below
        fig = ls.figure(name, run)
        assert fig is not None and fig.axes, name
    with pytest.raises(LandscapeError, match="Unknown figure"):
        ls.figure("nope", run)
    with pytest.raises(LandscapeError, match="sharpness_vs_rho has nothing to draw: the results given hold surface"):
        ls.figure("sharpness_vs_rho", ls.results(surface))  # it returned None, and fig.savefig failed later
    assert "(nats)" in ls.figure("sharpness_vs_rho", run).axes[0].get_ylabel()
    # another loss given: its values are not nats, and the axes say only "loss"
    target = torch.nn.functional.one_hot(y, 3).float()
    mse = dict(loss=torch.nn.functional.mse_loss)
    other = ls.results(ls.hessian(model, (x, target), top_k=1, **mse),
                       ls.sharpness(model, (x, target), rho=[0.01, 0.1], steps=2, draws=2, **mse),
                       ls.surface(model, (x, target), dims=1, points=5, **mse), label="mse")
    labels = {name: " ".join(ax.get_ylabel() for ax in ls.figure(name, other).axes)
              for name in ("sharpness_vs_rho", "surface_1d")}
    assert all("nats" not in text and "loss" in text for text in labels.values()), labels


def test_import_landscape_loads_neither_torch_nor_matplotlib():
    code = "import sys, landscape; assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_frozen_and_unused_parameters_left_out_are_named_in_the_results():
    from torch import nn

    class Frozen(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.body, self.head, self.unused = nn.Linear(6, 4), nn.Linear(4, 3), nn.Linear(2, 2)
            self.body.requires_grad_(False)

        def forward(self, x):
            return self.head(torch.tanh(self.body(x)))

    x, y = torch.randn(12, 6), torch.arange(12) % 3
    for ds in (ls.hessian(Frozen(), (x, y), top_k=1), ls.sharpness(Frozen(), (x, y), rho=[0.01], draws=0)):
        left_out = ds["num_parameters_left_out"]
        assert int(left_out) == 6 * 4 + 4 + 2 * 2 + 2 and int(ds["num_parameters"]) == 4 * 3 + 3
        assert left_out.attrs["names"] == "body.weight, body.bias, unused.weight, unused.bias"


def test_a_line_between_models_with_batchnorm_ends_at_the_other_model_running_statistics_included():
    # the running statistics move with the weights: a=0 is the first model, a=1 the second, both in eval mode
    torch.manual_seed(0)

    def cnn():
        return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3)).double()

    x, y = torch.randn(20, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (20,))
    m0, m1, m2 = cnn(), cnn(), cnn()
    with torch.no_grad():
        for m, shift in ((m0, 0.0), (m1, 2.0), (m2, -1.0)):
            m.train()(x * 3 + shift)
            m.eval()

    def loss(m):
        with torch.no_grad():
            return float(nn.functional.cross_entropy(m(x), y))

    half = cnn().eval()
    half.load_state_dict({n: (t + m1.state_dict()[n]) / 2 if t.is_floating_point() else t
                          for n, t in m0.state_dict().items()})
    for given in (m1, m1.state_dict()):
        ds = ls.surface(m0, (x, y), directions=given, points=3, range=(0, 1))
        np.testing.assert_allclose(ds["loss"].values, [loss(m0), loss(half), loss(m1)], rtol=1e-12)
        assert "moved with the weights (1.running_mean, 1.running_var)" in ds.attrs["buffers"]
    plane = ls.surface(m0, (x, y), directions=[m1, m2], points=3, range=(0, 1))
    np.testing.assert_allclose([plane["loss"].sel(a=0, b=0), plane["loss"].sel(a=1, b=0), plane["loss"].sel(a=0, b=1)],
                               [loss(m0), loss(m1), loss(m2)], rtol=1e-12)
    with pytest.raises(LandscapeError, match="one_dim chooses how random directions are normalised, and plane"):
        ls.surface(m0, (x, y), directions=[m1, m2], points=3, one_dim="filter")  # recorded, it described nothing
    random = ls.surface(m0, (x, y), dims=1, points=3)  # a random slice holds the statistics
    assert random.attrs["buffers"].startswith("held at the centre's values")
    assert m0.training is False and loss(m0) == float(ds["loss"][0])


def test_a_model_given_in_train_mode_is_measured_in_eval_mode_and_says_so():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Dropout(0.3),
                          nn.Linear(32, 3)).double()
    x, y = torch.randn(20, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (20,))
    with torch.no_grad():
        model(x * 3 + 1)  # running statistics unlike the batch's
    stats = {n: b.clone() for n, b in model.named_buffers()}
    params = torch.cat([p.detach().flatten() for p in model.parameters()])

    named = dict(model.named_parameters())

    def loss(flat):
        pieces = torch.split(flat, [p.numel() for p in named.values()])
        weights = {n: t.view_as(p) for (n, p), t in zip(named.items(), pieces)}
        return nn.functional.cross_entropy(torch.func.functional_call(model, weights, (x,)), y)

    model.eval()
    dense = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, params))
    model.train()
    for measure in (lambda: ls.hessian(model, (x, y), top_k=2), lambda: ls.sharpness(model, (x, y), rho=0.05),
                    lambda: ls.surface(model, (x, y), dims=1, points=3)):
        with pytest.warns(UserWarning, match="measured in eval mode") as caught:
            ds = measure()
        note = ds.attrs["mode_note"]
        assert note == str(caught[0].message) and caught[0].filename == __file__  # said of the caller's line
        assert "BatchNorm uses its running statistics" in note and "dropout is off" in note
        assert model.training and all(torch.equal(b, stats[n]) for n, b in model.named_buffers())
        if "eigenvalue" in ds:  # eval mode's Hessian, deterministic
            np.testing.assert_allclose(ds["eigenvalue"].values, dense.flip(0)[:2].numpy(), rtol=1e-6)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "mode_note" not in ls.hessian(model, (x, y), top_k=1).attrs
    plain = nn.Sequential(nn.Flatten(), nn.Dropout(0.0), nn.Linear(36, 3)).double().train()  # nothing changes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "mode_note" not in ls.hessian(plain, (x, y), top_k=1).attrs


def test_a_slice_along_directions_moves_only_the_parameters_the_other_measures_take():
    # frozen parameters are held (as hessian() and sharpness() leave them out) and named in the attrs
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    m[0].weight.requires_grad_(False)
    x, y = torch.randn(12, 6, dtype=torch.float64), torch.randint(0, 3, (12,))
    before = {n: t.clone() for n, t in m.state_dict().items()}
    only_frozen = {n: (torch.ones_like(p) if n == "0.weight" else torch.zeros_like(p)) for n, p in m.named_parameters()}
    flat = ls.surface(m, (x, y), directions=[only_frozen], points=3, range=(-1, 1))
    assert np.ptp(flat["loss"].values) == 0.0  # the frozen tensor does not move
    assert flat.attrs["parameters_left_out"] == "30 frozen (requires_grad False), held at the model's values: 0.weight"
    d = {n: torch.randn_like(p) for n, p in m.named_parameters() if p.requires_grad}  # as ls.hessian's vectors
    ds = ls.surface(m, (x, y), directions=[d], points=3, range=(-1, 1))
    for a, value in zip((-1.0, 0.0, 1.0), ds["loss"].values):
        moved = {n: t + a * d[n] if n in d else t for n, t in before.items()}
        out = torch.func.functional_call(m, moved, (x,))
        assert abs(float(nn.functional.cross_entropy(out, y)) - value) < 1e-12
    ls.surface(m, (x, y), dims=1, points=3)
    assert all(torch.equal(before[n], t) for n, t in m.state_dict().items())
    assert not m[0].weight.requires_grad


def test_a_loss_given_is_recorded_with_its_settings_and_cross_entropy_keeps_its_unit():
    import functools

    import torch.nn.functional as F

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    smoothed = ls.hessian(model, (x, y), top_k=1, loss=nn.CrossEntropyLoss(label_smoothing=0.1))
    assert smoothed.attrs["loss_function"] == ("CrossEntropyLoss(reduction='mean', ignore_index=-100, "
                                               "label_smoothing=0.1)")
    assert smoothed["loss"].attrs["units"] == "nats" and "label_smoothing=0.1" in smoothed.attrs["settings"]
    partial = ls.hessian(model, (x, y), top_k=1, loss=functools.partial(F.cross_entropy, label_smoothing=0.1))
    assert partial.attrs["loss_function"] == "torch.nn.functional.cross_entropy(label_smoothing=0.1)"
    plain = ls.hessian(model, (x, y), top_k=1)
    assert plain.attrs["settings"] != smoothed.attrs["settings"]  # two losses are two settings
    assert float(plain["loss"]) != float(smoothed["loss"])


def _bad_api_calls():
    import numpy as np

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    nan_x = x.clone()
    nan_x[3, 1] = float("nan")
    nan_m = copy.deepcopy(m)
    with torch.no_grad():
        nan_m[2].weight[0, 0] = float("nan")
    frozen = copy.deepcopy(m).requires_grad_(False)
    meta = nn.Linear(4, 3, device="meta")
    return [
        (lambda: ls.sharpness(m, (nan_x, y), rho=0.1, steps=2, draws=1), "The inputs hold NaN or infinite values"),
        (lambda: ls.surface(m, (nan_x, y), dims=1, points=3), "The inputs hold NaN or infinite values"),
        (lambda: ls.sharpness(nan_m, (x, y), rho=0.1, p="inf"), "The model's 2.weight holds NaN or infinite values"),
        (lambda: ls.hessian(meta, (x, y)), "on the meta device"),
        (lambda: ls.hessian(frozen, (x, y)), "Every parameter of the model is frozen"),
        (lambda: ls.sharpness(frozen, (x, y), rho=0.1), "Every parameter of the model is frozen"),
        (lambda: ls.hessian(m, (x, y), top_k="2"), "hessian(): top_k must be a whole number, not '2'"),
        (lambda: ls.surface(m, (x, y), dims=1, points=2.5), "surface(): points must be a whole number, not 2.5"),
        (lambda: ls.surface(m, (x, y), dims=1, range=1.0), "surface(): range must be a sequence of numbers"),
        (lambda: ls.surface(m, (x, y), dims=1, range=(0, 1, 2)), "range must hold 2 values, not 3"),
        (lambda: ls.hessian(m, (x, y), device="gpu0"), "device='gpu0' cannot be used (Unknown device 'gpu0'"),
        # the CLI's check: torch's own RuntimeError for mps and meta, and "auto" refused
        (lambda: ls.hessian(m, (x, y), device="mps"), "device='mps' cannot be used (Device 'mps' was asked for but "
                                                      "no Apple GPU (MPS) is available)"),
        (lambda: ls.hessian(m, (x, y), device="meta"), "device='meta' cannot be used (Unknown device 'meta'"),
        (lambda: ls.hessian(m, (x, y), device=3), "device=3 cannot be used"),
        (lambda: ls.hessian(m, (x, y), top_k=-1), "top_k must be 0 or more"),  # not the option --top-k
        (lambda: ls.hessian(m, (x, y), preconditioned=True), "there is no optimizer state here"),
        (lambda: ls.hessian(m, (x, y), img_size=999), "hessian() has no setting 'img_size'"),
        (lambda: ls.hessian(m, (x[:0], y[:0])), "data holds no examples"),
        (lambda: ls.hessian(m, (torch.randn(12, 7), y)), "The model cannot take the inputs (12 examples, (12, 7))"),
        (lambda: ls.results(ls.hessian(m, (x, y), top_k=1)["loss"]), "is a DataArray"),
        (lambda: ls.results(ls.hessian(m, (x, y), top_k=1), label=3), "label must be a name"),
        (lambda: ls.sharpness(m, (x, y), rho=np.float64(-0.1)), "rho"),
    ]


@pytest.mark.parametrize("case", range(22))
def test_notebook_mistakes_are_one_sentence_naming_the_keyword_not_a_traceback(case):
    call, message = _bad_api_calls()[case]
    with pytest.raises(LandscapeError) as error:
        call()
    assert message in str(error.value), str(error.value)
    if "landscape analyze" not in str(error.value):  # a command named as the alternative keeps its options
        assert "--" not in str(error.value), str(error.value)


def test_the_devices_the_cli_accepts_are_accepted_by_the_api():
    # device="auto" (the CLI's default) was refused as "not a device torch knows"
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    values = [float(ls.hessian(m, (x, y), top_k=1, trace=False, device=d)["eigenvalue_largest"].values.ravel()[0])
              for d in (None, "auto", "cpu", torch.device("cpu"))]
    assert values == [values[0]] * 4


def test_numpy_data_zero_dim_numbers_and_mixed_precision_models_are_measured():
    import numpy as np

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    reference = ls.hessian(m, (x, y), top_k=2, tol=1e-10)
    from_numpy = ls.hessian(m, (x.numpy(), y.numpy()), top_k=2, tol=1e-10)
    np.testing.assert_allclose(from_numpy["eigenvalue_largest"], reference["eigenvalue_largest"], rtol=1e-12)
    listed = ls.hessian(m, (x, y), top_k=1, samples=np.int64(10), params=["0.weight", "2.weight"], tol=1e-10)
    joined = ls.hessian(m, (x, y), top_k=1, samples=10, params="0.weight,2.weight", tol=1e-10)
    assert float(listed["eigenvalue_largest"][0]) == float(joined["eigenvalue_largest"][0])
    s = ls.sharpness(m, (x, y), rho=torch.tensor(0.05, dtype=torch.float64), steps=2, draws=1)
    assert list(s["rho"].values) == [0.05]
    mixed = copy.deepcopy(m)
    mixed[0].float()  # a float32 first layer, the rest float64: measured as one float64 copy, with a note
    with pytest.warns(UserWarning, match="float32 and float64; it was measured in float64"):
        ds = ls.hessian(mixed, (x, y), top_k=2, tol=1e-10)
    assert "float32 and float64" in ds.attrs["precision_note"] and mixed[0].weight.dtype == torch.float32
    low = copy.deepcopy(m).float()
    low[2].bfloat16()  # bfloat16 behind a float32 first layer: upcast, not measured in bfloat16
    with pytest.warns(UserWarning, match="bfloat16 and float32; it was measured in float32"):
        ds = ls.hessian(low, (x.float(), y), top_k=1)
    assert json.loads(ds.attrs["settings"])["dtype"] == "float32"
    with torch.inference_mode(), pytest.raises(LandscapeError, match="inference_mode"):
        ls.hessian(m, (x, y), top_k=1)


def test_seeds_measured_on_other_radii_are_aligned_by_radius_in_sharpness_vs_rho():
    # stacked by position, two grids of three radii were averaged pairwise (0.02 with 0.01), of other lengths a crash
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    a = ls.sharpness(model, (x, y), rho=[0.01, 0.05, 0.1], steps=2, draws=2)
    b = ls.sharpness(model, (x, y), rho=[0.02, 0.05, 0.2], steps=2, draws=2)
    c = ls.sharpness(model, (x, y), rho=[0.05], steps=2, draws=2)
    runs = [ls.results(a, label="m", seed=0), ls.results(b, label="m", seed=1), ls.results(c, label="m", seed=2)]
    fig = ls.figure("sharpness_vs_rho", runs)
    line = fig.axes[0].lines[0]
    np.testing.assert_allclose(line.get_xdata(), [0.01, 0.02, 0.05, 0.1, 0.2])
    worst = {float(r): float(v) for ds in (a, b) for r, v in zip(ds["rho"].values, ds["worst_case"].values)}
    at_005 = np.mean([float(ds["worst_case"].sel(rho=0.05)) for ds in (a, b, c)])
    np.testing.assert_allclose(line.get_ydata(), [worst[0.01], worst[0.02], at_005, worst[0.1], worst[0.2]],
                               rtol=1e-12)


def test_a_figure_over_epochs_of_a_model_in_memory_says_why_it_has_nothing_to_draw():
    # it returned an empty 3-panel figure for one seed, and one savefig could not log-scale for two
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    h = ls.hessian(model, (x, y), top_k=1, trace=True, trace_matvecs=4)
    for runs in (ls.results(h), [ls.results(h, label="A", seed=0), ls.results(h, label="A", seed=1)]):
        with pytest.raises(LandscapeError, match="figures over epochs need a run's checkpoints, ls.load_run"):
            ls.figure("hessian_vs_epoch", runs)


def test_surface_figures_with_an_infinite_loss_draw_and_one_panel_is_a_column_wide():
    # an infinite point set the log colour scale to inf (savefig: "Invalid vmin or vmax"); one panel took a page
    import io

    from landscape.figures import COLUMN_WIDTH

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    ds = ls.surface(model, (x, y), dims=2, points=5)
    loss = ds["loss"].values.copy()
    loss[0, 0] = np.inf
    ds["loss"] = (ds["loss"].dims, loss, ds["loss"].attrs)
    for name in ("surface_2d", "surface_3d"):
        fig = ls.figure(name, ls.results(ds))
        fig.savefig(io.BytesIO(), format="png")
        assert fig.get_figwidth() == COLUMN_WIDTH, name
    sharp = ls.sharpness(model, (x, y), rho=[0.01, 0.1], steps=2, draws=2)
    fig = ls.figure("sharpness_vs_rho", [ls.results(sharp, label="m", seed=s) for s in (0, 1)])
    assert "bars: ± 1 standard deviation" in fig._supxlabel.get_text()  # what the bars are, on the figure


def test_block_curvature_leaves_blank_the_shares_of_a_trace_within_its_noise():
    # a trace of -2.79 ± 18.8 gave block shares from -623% to +502%
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    ds = ls.hessian(model, (x, y), top_k=1, trace=True, trace_matvecs=4, per_block=True)
    noisy = ds.expand_dims(checkpoint=["epoch-0001"]).assign_coords(epoch=("checkpoint", [1.0]),
                                                                      step=("checkpoint", [10]))
    noisy["trace_standard_error"] = noisy["trace"].copy(data=np.abs(noisy["trace"].values) * 10)
    fig = ls.figure("block_curvature", ls.results(noisy))
    shares = fig.axes[1].images[0].get_array()
    assert np.ma.getmaskarray(shares).all() or np.isnan(np.ma.filled(shares, np.nan)).all()


def _dense_top(model, x, y, k=2):
    """The top ``k`` eigenvalues of the dense float64 Hessian of the mean cross-entropy of ``model`` (each
    parameter in turn made a function of one flat vector)."""
    from torch.func import functional_call

    model = copy.deepcopy(model)
    model._apply(lambda t: t.double() if t.is_floating_point() else t.to(torch.complex128) if t.is_complex() else t)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def loss(w):
        tensors, at = {}, 0
        for n, shape in zip(names, shapes):
            tensors[n] = w[at:at + shape.numel()].reshape(shape)
            at += shape.numel()
        return nn.functional.cross_entropy(functional_call(model, tensors, (x.double(),)), y)

    H = torch.autograd.functional.hessian(loss, flat)
    return np.sort(torch.linalg.eigvalsh(H).numpy())[::-1][:k]


class _Filtered(nn.Module):
    """An MLP behind a fixed complex FFT filter (a complex buffer), its head in ``head_dtype``."""

    def __init__(self, head_dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("filt", torch.randn(4, generator=g, dtype=torch.complex64))
        self.body = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3).to(head_dtype)

    def forward(self, x):
        x = torch.fft.irfft(torch.fft.rfft(x) * self.filt.to(torch.fft.rfft(x).dtype), n=x.shape[-1])
        return self.head(torch.tanh(self.body(x.to(self.body.weight.dtype))).to(self.head.weight.dtype))


def test_a_complex_buffer_keeps_its_imaginary_part_in_the_copy_of_a_mixed_precision_model():
    # Module.to(float64) cast the complex filter to real: top eigenvalue 0.581 for the true 0.675, without a word
    torch.manual_seed(0)
    model = _Filtered(torch.float64)
    x, y = torch.randn(24, 6), torch.randint(0, 3, (24,))
    with pytest.warns(UserWarning, match="float32 and float64"):
        ds = ls.hessian(model, (x, y), top_k=2, tol=1e-8)
    assert model.filt.is_complex()  # the model given is left as it was
    np.testing.assert_allclose(ds["eigenvalue_largest"].values, _dense_top(model, x, y), rtol=1e-6)


def test_wrapped_models_are_measured_as_the_module_inside():
    # nn.DataParallel refused parameters swapped in (a torch traceback); a compiled model refused double backward
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(24, 6), torch.randint(0, 3, (24,))
    plain = ls.hessian(model, (x, y), top_k=2, tol=1e-8)["eigenvalue_largest"].values
    for wrapped in (nn.DataParallel(model), torch.compile(model)):
        values = ls.hessian(wrapped, (x, y), top_k=2, tol=1e-8)["eigenvalue_largest"].values
        np.testing.assert_allclose(values, plain, rtol=1e-10)
        assert float(ls.sharpness(wrapped, (x, y), rhos=[0.05], steps=2, draws=0)["worst_case"][0]) >= 0
    # a wrapped model as a line's end: its tensors were looked for under the wrapper's names ("has no tensor")
    other = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    line = ls.surface(model, (x, y), directions=other, points=3)["loss"].values
    for wrapped in (nn.DataParallel(other), torch.compile(other)):
        np.testing.assert_allclose(ls.surface(model, (x, y), directions=wrapped, points=3)["loss"].values, line,
                                   rtol=1e-12)


def test_a_weight_the_forward_reads_around_its_attribute_is_refused_not_left_out_as_unused():
    # read through a Python list, functional_call cannot swap it: it was dropped as "not reaching the loss"
    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(6, 5)
            self.head = nn.Linear(5, 3)
            self._ws = [self.l.weight]

        def forward(self, x):
            return self.head(torch.tanh(x @ self._ws[0].T + self.l.bias))

    x, y = torch.randn(24, 6), torch.randint(0, 3, (24,))
    for measure in (lambda m: ls.hessian(m, (x, y), top_k=1), lambda m: ls.sharpness(m, (x, y), rhos=[0.05]),
                    lambda m: ls.surface(m, (x, y), dims=1, points=3)):  # a surface moved every weight but that one
        with pytest.raises(LandscapeError, match=r"reads l\.weight other than through its module attribute"):
            measure(Aliased())


def test_a_mixed_precision_model_whose_copy_cannot_run_says_so_not_that_the_data_is_wrong():
    class Cast(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(6, 5), nn.Linear(5, 3).double()

        def forward(self, x):
            return self.head(torch.tanh(self.body(x.float())).double())

    x, y = torch.randn(24, 6), torch.randint(0, 3, (24,))
    with pytest.warns(UserWarning), pytest.raises(LandscapeError, match="float64 copy of the model measured .* "
                                                  "convert the model to one precision first"):
        ls.hessian(Cast(), (x, y), top_k=1)


def test_a_weight_normed_model_is_refused_while_torch_gets_its_second_derivative_wrong():
    # torch 2.14's double backward through torch._weight_norm is off by a third of the product (and the GGN's
    # forward mode is not implemented): eigenvalues came out wrong without a word
    from torch.nn.utils.parametrizations import weight_norm

    from landscape.api import _weight_norm_second_derivative_is_right

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    weight_norm(model[0])
    x, y = torch.randn(24, 6, dtype=torch.float64), torch.randint(0, 3, (24,))
    if _weight_norm_second_derivative_is_right():
        pytest.skip(f"torch {torch.__version__} differentiates weight_norm twice correctly")
    with pytest.raises(LandscapeError, match="weight_norm, whose second derivative is wrong"):
        ls.hessian(model, (x, y), top_k=1)
    assert np.isfinite(ls.sharpness(model, (x, y), rhos=[0.05], steps=2, draws=0)["worst_case"].values).all()


def _mlp(outputs=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, outputs)).double()


def test_regression_targets_from_a_loader_keep_their_shape():
    # a loader's (B, 1) targets were flattened to (N,), broadcast against (N, 1) outputs: loss 0.189 for 0.112
    m = _mlp(outputs=1)
    x = torch.randn(48, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = x.mean(1, keepdim=True)
    mse = nn.functional.mse_loss
    pair = ls.hessian(m, (x, t), loss=mse, top_k=2, tol=1e-8)
    loader = ls.hessian(m, DataLoader(TensorDataset(x, t), batch_size=16), loss=mse, top_k=2, tol=1e-8)
    assert float(loader["loss"]) == pytest.approx(float(mse(m(x), t)), rel=1e-12)
    np.testing.assert_allclose(loader["eigenvalue_largest"].values, pair["eigenvalue_largest"].values, rtol=1e-6)
    three = x[:, :3]
    m3 = _mlp(outputs=3)
    wide = ls.hessian(m3, DataLoader(TensorDataset(x, three), batch_size=16), loss=mse, top_k=1)
    assert float(wide["loss"]) == pytest.approx(float(mse(m3(x), three)), rel=1e-12)


@pytest.mark.parametrize("case, words", [
    ("ignored batch", "Every target of examples 0 to 31 (a batch of batch_size=32) is ignored (ignore_index)"),
    ("all ignored", "Every target of the evaluation set is ignored"),
    ("label past the first examples", "Target 9 of example 100 is not a class"),
    ("nan target", "The targets hold NaN or infinite values"),
    ("detached loss", "The loss does not depend on the model's parameters"),
    ("single examples", "looks like a list of single examples"),
    ("nan direction", "has NaN or infinite values in"),
    ("targets of several tasks", "The targets are a dict; give one tensor of targets"),
    ("targets broadcast", "would be broadcast against each other"),
    ("another loss's bad label past the first examples", "The loss cannot be computed on examples 96 to 119"),
    ("ignored batch of another loss", "Every target of examples 32 to 63 (a batch of batch_size=32) is ignored"),
    ("loss nan on one batch", "The loss is nan on examples 64 to 95 at the model's weights"),
    ("loss of shape (1,)", "The loss returned a tensor of shape (1,), not a 0-d tensor"),
    ("complex loss", "The loss returned a torch.complex128 tensor; give a real floating-point loss"),
    ("loss as a float", "The loss returned a float, not a torch tensor"),
    ("nan class weight", "The loss's class weight holds NaN or infinite values"),
    ("negative class weight", "The loss's class weight holds negative values"),
])
def test_bad_targets_losses_and_directions_are_one_sentence_not_a_nan_result(case, words):
    m = _mlp()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(120, 8, dtype=torch.float64, generator=g)
    y = torch.randint(0, 4, (120,), generator=g)
    call = dict(top_k=1, batch_size=32)
    if case == "ignored batch":
        y[:40] = -100
    elif case == "all ignored":
        y[:] = -100
    elif case == "label past the first examples":
        y[100] = 9
    elif case == "nan target":
        m, y = _mlp(outputs=1), x.mean(1, keepdim=True)
        y[70] = float("nan")
        call["loss"] = nn.functional.mse_loss
    elif case == "targets broadcast":  # outputs (N,) against targets (N, 1): every output against every target
        m = nn.Sequential(_mlp(outputs=1), nn.Flatten(0))
        y, call["loss"] = x.mean(1, keepdim=True), nn.functional.mse_loss
    elif case == "detached loss":
        call["loss"] = lambda out, t: nn.functional.cross_entropy(out, t).detach()
    elif case == "another loss's bad label past the first examples":  # only the first examples were tried before
        y[100], call["loss"] = 9, nn.functional.cross_entropy
    elif case == "ignored batch of another loss":
        y[32:64], call["loss"] = 0, nn.NLLLoss(ignore_index=0)
        m = nn.Sequential(m, nn.LogSoftmax(-1))
    elif case == "loss nan on one batch":
        y[64:96] = 3  # the loss is NaN on a batch of class 3 only (a loss of a vanishing count, say)
        call["loss"] = lambda out, t: nn.functional.cross_entropy(out, t) * (float("nan") if bool((t == 3).all()) else 1)
    elif case == "loss of shape (1,)":
        call["loss"] = lambda out, t: nn.functional.cross_entropy(out, t).reshape(1)
    elif case == "complex loss":
        call["loss"] = lambda out, t: nn.functional.cross_entropy(out, t) * (1 + 0j)
    elif case == "loss as a float":
        call["loss"] = lambda out, t: float(nn.functional.cross_entropy(out, t))
    elif case == "nan class weight":
        call["loss"] = nn.CrossEntropyLoss(weight=torch.tensor([1.0, float("nan"), 1.0, 1.0]).double())
    elif case == "negative class weight":
        call["loss"] = nn.CrossEntropyLoss(weight=torch.tensor([1.0, -1.0, 1.0, 1.0]).double())
    data = list(TensorDataset(x, y)) if case == "single examples" else (x, y)
    if case == "targets of several tasks":
        data = (x, {"digit": y, "parity": y % 2})
    with pytest.raises(LandscapeError, match=words.replace("(", r"\(").replace(")", r"\)")):
        if case == "nan direction":
            ls.surface(m, data, directions=[{n: torch.full_like(p, float("nan")) for n, p in m.named_parameters()}],
                       points=3)
        else:
            ls.hessian(m, data, **call)
    if case in ("ignored batch", "label past the first examples", "another loss's bad label past the first examples",
                "loss nan on one batch", "nan class weight"):  # the same for the other measures
        loss = call.get("loss")
        with pytest.raises(LandscapeError, match=words.split(" (")[0]):
            ls.sharpness(m, data, rho=0.05, steps=2, draws=1, batch_size=32, loss=loss)
        with pytest.raises(LandscapeError, match=words.split(" (")[0]):
            ls.surface(m, data, dims=1, points=3, batch_size=32, loss=loss)


def test_losses_with_tensors_are_measured_in_the_models_precision_and_without_their_graph():
    # a class weight that requires grad (torch's losses have no derivative in it) or of another precision than the
    # model measured (a float32 weight, a bfloat16 model measured as a float32 copy) is taken as a detached copy
    m = _mlp()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(30, 8, dtype=torch.float64, generator=g), torch.randint(0, 4, (30,), generator=g)
    weight = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)
    reference = ls.hessian(m, (x, y), loss=nn.CrossEntropyLoss(weight=weight), top_k=2, tol=1e-10, batch_size=7)
    given = [nn.CrossEntropyLoss(weight=weight.clone().requires_grad_()), nn.CrossEntropyLoss(weight=weight.float()),
             functools.partial(nn.functional.cross_entropy, weight=weight.clone().requires_grad_())]
    for loss in given:
        ds = ls.hessian(m, (x, y), loss=loss, top_k=2, tol=1e-10, batch_size=7)
        np.testing.assert_allclose(ds["eigenvalue_largest"].values, reference["eigenvalue_largest"].values, rtol=1e-6)
        assert ls.sharpness(m, (x, y), loss=loss, rho=0.05, steps=2, draws=1)["loss"].notnull().all()
    assert given[0].weight.requires_grad and given[1].weight.dtype == torch.float32  # the losses given are left alone
    # unsigned class labels are labels too; probability targets get a top-1 (their most likely class)
    unsigned = ls.hessian(m, (x, y.to(torch.uint16)), top_k=1, tol=1e-10)
    assert float(unsigned["eigenvalue_largest"][0]) == pytest.approx(float(ls.hessian(m, (x, y), top_k=1, tol=1e-10)
                                                                           ["eigenvalue_largest"][0]), rel=1e-8)
    soft = torch.softmax(torch.randn(30, 4, generator=g, dtype=torch.float64) * 3, 1)
    top1 = float(ls.hessian(m, (x, soft), top_k=1)["top1"])
    assert top1 == pytest.approx(100 * float((m(x).argmax(1) == soft.argmax(1)).double().mean()))
    regression = torch.randn(30, 4, generator=g, dtype=torch.float64)  # no classes: no top-1
    assert np.isnan(float(ls.hessian(m, (x, regression), loss=nn.functional.mse_loss, top_k=1)["top1"]))

    # any other loss module is used as given: one holding a float32 teacher of its own, or a `weight` that is not a
    # class weight (a margin loss's class centres, negative entries and all)
    class Distilled(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(3)
            self.teacher = nn.Linear(4, 4)  # float32, beside a float64 student

        def forward(self, out, t):
            soft = torch.softmax(self.teacher(out.detach().float()), -1).to(out.dtype)
            return nn.functional.cross_entropy(out, t) + nn.functional.cross_entropy(out, soft)

    class Centres(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(-torch.rand(4, 4, dtype=torch.float64, generator=g))

        def forward(self, out, t):
            return nn.functional.cross_entropy(out @ self.weight.detach().T, t)

    distilled = Distilled()
    for loss in (distilled, Centres()):
        ds = ls.hessian(m, (x, y), loss=loss, top_k=1)
        assert np.isfinite(float(ds["eigenvalue_largest"][0]))
    assert distilled.teacher.weight.dtype == torch.float32


def test_forms_people_pass_are_taken():
    m = _mlp()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 8, dtype=torch.float64, generator=g)
    y = torch.randint(0, 4, (40,), generator=g)
    reference = float(ls.hessian(m, (x, y), top_k=1, tol=1e-8)["eigenvalue_largest"][0])
    loader = DataLoader(TensorDataset(x, y[:, None]), batch_size=16)  # labels of shape (B, 1)
    for data in ((x, y.int()), (x, y.tolist()), (x, y.numpy().astype(np.int32)), loader, (x, y[:, None])):
        value = float(ls.hessian(m, data, top_k=1, tol=1e-8)["eigenvalue_largest"][0])
        assert value == pytest.approx(reference, rel=1e-6)
    y5 = y.clone()
    y5[3] = 5  # the loss's own ignore_index, not a class
    ls.hessian(m, (x, y5), loss=nn.CrossEntropyLoss(ignore_index=5), top_k=1)  # exact: no warning
    with pytest.warns(UserWarning, match="mean over something other") as caught:
        ls.hessian(m, (x, y5), loss=lambda o, t: nn.functional.cross_entropy(o, t, ignore_index=5), top_k=1)
    assert caught[0].filename == __file__  # said of the caller's line
    two = ls.sharpness(m, (x, y), rho=0.05, p=2, steps=2, draws=1)
    inf = ls.sharpness(m, (x, y), rho=0.05, p=float("inf"), steps=2, draws=1)
    assert json.loads(two.attrs["settings"])["p"] == "2" and json.loads(inf.attrs["settings"])["p"] == "inf"


def test_a_vit_given_images_of_another_size_is_one_sentence():
    from landscape.models import create_model

    vit = create_model("vit_tiny_patch16_224", **KWARGS)
    x, y = torch.randn(4, 1, 12, 12), torch.arange(4)
    with pytest.raises(LandscapeError, match="The model cannot take the inputs"):
        ls.hessian(vit, (x, y), top_k=1)


def test_runs_and_results_refuse_what_they_cannot_read(run):
    from landscape.errors import ConfigError

    with pytest.raises(ConfigError, match="weights must be 'raw' or 'ema', not 'EMA'"):
        ls.load_run(run.root, weights="EMA")
    for path in (str(run.root).encode(), 3, None):
        with pytest.raises(LandscapeError, match="give a run folder's path"):
            ls.load_run(path)
    with pytest.raises(LandscapeError, match="the 'analysis' attr 'bogus'"):
        ls.results(xr.Dataset(attrs={"analysis": "bogus"}))
    with pytest.raises(LandscapeError, match="says it holds sharpness results but has no 'rho'"):
        ls.results(xr.Dataset(attrs={"analysis": "sharpness"}))


def test_a_loss_class_and_directions_of_another_kind_are_named():
    m = _mlp()
    x, y = torch.randn(8, 8, dtype=torch.float64), torch.arange(8) % 4
    with pytest.raises(LandscapeError, match=r"loss is the class CrossEntropyLoss; give an instance of it"):
        ls.hessian(m, (x, y), loss=nn.CrossEntropyLoss, top_k=1)
    with pytest.raises(LandscapeError, match="not a NoneType"):
        ls.surface(m, (x, y), directions=None, points=3)


@pytest.mark.slow
def test_the_jit_script_warning_is_off_inside_the_measures_only():
    # torch's deprecation warning of torch.jit.script (printed by its forward-mode rules) is nothing a caller can act
    # on inside ls.hessian & co., but importing landscape must not hide the caller's own code's warnings of it
    def loss(outputs, targets):
        warnings.warn("torch.jit.script is deprecated", FutureWarning)
        return nn.functional.cross_entropy(outputs, targets)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        ls.hessian(model, (x, y), top_k=1, loss=loss)
        assert not [w for w in caught if issubclass(w.category, FutureWarning)]
    # a filter a library installs on its first import inside the call stays (catch_warnings() had dropped it)
    def installing(outputs, targets):
        warnings.filterwarnings("ignore", message="a library's own filter")
        return nn.functional.cross_entropy(outputs, targets)

    with warnings.catch_warnings():
        ls.hessian(model, (x, y), top_k=1, loss=installing)
        assert any(f[1] is not None and f[1].pattern == "a library's own filter" for f in warnings.filters)
        assert not any(f[1] is not None and "jit" in f[1].pattern for f in warnings.filters[:1])
    outside = subprocess.run(
        [sys.executable, "-c", "import warnings, torch, landscape as ls\n"
         "ls.hessian(torch.nn.Linear(3, 2), (torch.randn(4, 3), torch.tensor([0, 1, 0, 1])), top_k=1)\n"
         "warnings.warn('torch.jit.script is deprecated', FutureWarning)"], capture_output=True, text=True, check=True)
    assert "FutureWarning: torch.jit.script is deprecated" in outside.stderr
