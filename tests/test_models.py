"""The model zoo: exact sizes and costs, weight sharing, slicing, mixture-of-experts routing, second derivatives."""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from landscape.errors import ConfigError
from landscape.models import (
    MixtureOfSwiGLUExperts,
    count_macs,
    count_parameters,
    create_model,
    list_variants,
    model_table,
    moe_aux_loss,
    narrow_mlps,
    share_mlps,
    unique_mlps,
)

TINY_VIT = dict(img_size=8, patch_size=2, in_chans=1, num_classes=5, embed_dim=16, depth=2, num_heads=2)
TINY_MLIT = dict(
    img_size=6, patch_size=2, in_chans=1, num_classes=5, embed_dim=16, depth=3, num_heads=4, num_kv_heads=2,
    hidden_first=12, hidden_last=6,
)
TINY_MAE = dict({k: v for k, v in TINY_MLIT.items() if k != "num_classes"}, decoder_dim=8, decoder_depth=1,
                decoder_num_heads=2)

# Every registered variant (and timm's ViT-B/16) at a tiny size, for the per-variant checks.
TINY_VARIANTS = {
    "vit_base_patch16_224": TINY_VIT,
    **{name: dict(TINY_VIT) for name in list_variants() if name.startswith("vit_")},
    "vit_base_patch16_224_grouped_mlp": dict(TINY_VIT, group_size=2),
    "vit_pico_patch4_32_shallow_mlp": dict(TINY_VIT, width_ratio=0.5, mlp_init="random"),
    "mlit_s": TINY_MLIT,
    "mlit_xs": TINY_MLIT,
    "mlit_xxs": TINY_MLIT,
    "mae_mlit_xxs": TINY_MAE,
}


def meta_model(name: str, **kwargs):
    with torch.device("meta"):
        return create_model(name, **kwargs)


def tiny_batch(kwargs: dict, n: int = 3, seed: int = 0, dtype=torch.float32):
    """Random images of the size in the model keywords ``kwargs`` and labels of 5 classes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, kwargs["in_chans"], kwargs["img_size"], kwargs["img_size"], generator=g, dtype=dtype)
    return x, torch.randint(0, 5, (n,), generator=g)


def task_loss(model, params, x, y, noise=None):
    """Loss at ``params`` (unique names, as ``named_parameters()`` gives them).

    ``tie_weights=False``: a module reachable under several names (a shared MLP) is then swapped once; with
    weight tying, torch.func.functional_call swaps it once per name and leaves the model holding the passed
    tensors afterwards (pytorch/pytorch#164759).
    """
    if noise is not None:  # masked autoencoder: its own reconstruction loss at a fixed masking
        return functional_call(model, params, (x,), {"noise": noise}, tie_weights=False)[0]
    return F.cross_entropy(functional_call(model, params, (x,), tie_weights=False), y)


# -- exact sizes and costs of ViT-B/16 and its variants ----------------------------------------------------------
def vit_b16_macs(hidden: int) -> tuple[int, int]:
    """Closed-form MACs of ViT-B/16 at 224x224: (convolution + linear layers, attention products)."""
    tokens, width, depth = 197, 768, 12
    per_block = tokens * width * (3 * width + width + 2 * hidden)
    weights = depth * per_block + 196 * width * (3 * 16 * 16) + width * 1000
    attention = depth * 2 * tokens * tokens * width
    return weights, attention


@pytest.mark.parametrize(
    "name, params, hidden",
    [
        ("vit_base_patch16_224", 86_567_656, 3072),
        ("vit_base_patch16_224_grouped_mlp", 58_233_064, 3072),
        ("vit_base_patch16_224_shallow_mlp", 58_237_672, 1536),
    ],
)
def test_vit_b16_variants_have_the_papers_parameter_counts_and_closed_form_macs(name, params, hidden):
    model = meta_model(name)
    assert count_parameters(model) == params
    macs = count_macs(model, (3, 224, 224))
    weights, attention = vit_b16_macs(hidden)
    assert macs["total"] - macs["attention"] == weights
    assert macs["attention"] == attention


def test_grouped_vit_b16_costs_the_same_macs_and_shallow_about_11_3():
    full = count_macs(meta_model("vit_base_patch16_224"), (3, 224, 224))
    grouped = count_macs(meta_model("vit_base_patch16_224_grouped_mlp"), (3, 224, 224))
    shallow = count_macs(meta_model("vit_base_patch16_224_shallow_mlp"), (3, 224, 224))
    assert grouped == full
    assert round((shallow["total"] - shallow["attention"]) / 1e9, 1) == 11.3
    assert round((full["total"] - full["attention"]) / 1e9, 2) == 16.85


def test_count_parameters_counts_a_shared_storage_once():
    model = create_model("vit_base_patch16_224_grouped_mlp", **dict(TINY_VIT, depth=4))
    state = model.state_dict()
    naive = sum(v.numel() for v in state.values())
    per_mlp = sum(p.numel() for p in model.blocks[0].mlp.parameters())
    assert count_parameters(model) == naive - 2 * per_mlp


# -- GroupedMLP -------------------------------------------------------------------------------------------------------
def test_grouped_blocks_use_one_mlp_module_with_one_storage_under_every_name():
    model = create_model("vit_pico_patch4_32_grouped_mlp", **dict(TINY_VIT, depth=4))
    blocks = model.blocks
    assert blocks[0].mlp is blocks[1].mlp and blocks[2].mlp is blocks[3].mlp
    assert blocks[1].mlp is not blocks[2].mlp
    assert blocks[0].norm2 is not blocks[1].norm2 and blocks[0].attn is not blocks[1].attn
    state = model.state_dict()
    for key in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        assert state[f"blocks.0.mlp.{key}"].data_ptr() == state[f"blocks.1.mlp.{key}"].data_ptr()
    assert state["blocks.1.mlp.fc1.weight"].data_ptr() != state["blocks.2.mlp.fc1.weight"].data_ptr()
    assert unique_mlps(model) == 2


def test_init_scale_multiplies_first_blocks_fc1_and_fc2_weight_but_not_fc2_bias():
    torch.manual_seed(0)
    base = create_model("vit_pico_patch4_32", **dict(TINY_VIT, depth=4))
    with torch.no_grad():
        for p in base.parameters():  # timm starts biases at zero: make every entry visible to the check
            p.copy_(torch.randn_like(p))
    shared = share_mlps(copy.deepcopy(base), group_size=2, init_scale=0.25)
    default = share_mlps(copy.deepcopy(base), group_size=4)
    for i in (0, 2):
        old, new = base.blocks[i].mlp, shared.blocks[i].mlp
        torch.testing.assert_close(new.fc1.weight, 0.25 * old.fc1.weight, rtol=0, atol=0)
        torch.testing.assert_close(new.fc1.bias, 0.25 * old.fc1.bias, rtol=0, atol=0)
        torch.testing.assert_close(new.fc2.weight, 0.25 * old.fc2.weight, rtol=0, atol=0)
        torch.testing.assert_close(new.fc2.bias, old.fc2.bias, rtol=0, atol=0)
    torch.testing.assert_close(default.blocks[3].mlp.fc1.weight, 0.5 * base.blocks[0].mlp.fc1.weight)
    torch.testing.assert_close(shared.blocks[1].norm2.weight, base.blocks[1].norm2.weight, rtol=0, atol=0)


def test_one_optimizer_step_changes_every_use_of_a_shared_mlp():
    torch.manual_seed(0)
    model = create_model("vit_pico_patch4_32_grouped_mlp", **TINY_VIT)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = tiny_batch(TINY_VIT)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    after = model.state_dict()
    for key in ("blocks.0.mlp.fc1.weight", "blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc2.bias"):
        assert not torch.equal(after[key], before[key]), key
    torch.testing.assert_close(after["blocks.0.mlp.fc1.weight"], after["blocks.1.mlp.fc1.weight"], rtol=0, atol=0)


def test_shared_mlp_gradient_is_the_sum_over_uses_and_matches_finite_differences():
    torch.manual_seed(0)
    model = create_model("vit_pico_patch4_32_grouped_mlp", **TINY_VIT).double().eval()
    x, y = tiny_batch(TINY_VIT, dtype=torch.float64)
    shared = model.blocks[0].mlp.fc1.weight

    F.cross_entropy(model(x), y).backward()
    gradient = shared.grad.clone()

    untied = copy.deepcopy(model)
    untied.blocks[1].mlp = copy.deepcopy(untied.blocks[0].mlp)
    untied.zero_grad()
    F.cross_entropy(untied(x), y).backward()
    torch.testing.assert_close(
        gradient, untied.blocks[0].mlp.fc1.weight.grad + untied.blocks[1].mlp.fc1.weight.grad, rtol=1e-12, atol=1e-14
    )
    assert untied.blocks[1].mlp.fc1.weight.grad.abs().sum() > 0

    direction = torch.randn_like(shared)
    eps = 1e-5
    with torch.no_grad():
        shared.add_(eps * direction)
        plus = F.cross_entropy(model(x), y)
        shared.sub_(2 * eps * direction)
        minus = F.cross_entropy(model(x), y)
        shared.add_(eps * direction)
    finite_difference = (plus - minus) / (2 * eps)
    torch.testing.assert_close(finite_difference, (gradient * direction).sum(), rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("group_size", [1, 2, 3, 4, 6, 12])
def test_every_divisor_of_depth_12_is_a_valid_group_size(group_size):
    kwargs = dict(TINY_VIT, depth=12)
    torch.manual_seed(0)
    base = create_model("vit_pico_patch4_32", **kwargs)
    torch.manual_seed(0)
    model = create_model("vit_pico_patch4_32_grouped_mlp", group_size=group_size, **kwargs)
    per_mlp = sum(p.numel() for p in base.blocks[0].mlp.parameters())
    assert unique_mlps(model) == 12 // group_size
    assert count_parameters(model) == count_parameters(base) - (12 - 12 // group_size) * per_mlp
    x, _ = tiny_batch(kwargs)
    assert model(x).shape == (3, 5)
    if group_size == 1:  # the baseline: nothing shared, nothing rescaled
        torch.testing.assert_close(model.state_dict(), base.state_dict(), rtol=0, atol=0)


def test_group_size_not_dividing_the_depth_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"group_size 5 does not divide the depth 12; accepted group sizes are "
                                          r"1, 2, 3, 4, 6, 12\."):
        create_model("vit_pico_patch4_32_grouped_mlp", group_size=5, **dict(TINY_VIT, depth=12))


# -- ShallowMLP -------------------------------------------------------------------------------------------------------
def test_sliced_init_equals_the_slice_of_the_full_width_init_with_the_same_seed():
    torch.manual_seed(3)
    full = create_model("vit_pico_patch4_32", **TINY_VIT)
    torch.manual_seed(3)
    narrow = create_model("vit_pico_patch4_32_shallow_mlp", width_ratio=0.5, **TINY_VIT)
    hidden = full.blocks[0].mlp.fc1.out_features // 2
    for a, b in zip(full.blocks, narrow.blocks):
        assert b.mlp.fc1.weight.shape == (hidden, 16)
        torch.testing.assert_close(b.mlp.fc1.weight, a.mlp.fc1.weight[:hidden], rtol=0, atol=0)
        torch.testing.assert_close(b.mlp.fc1.bias, a.mlp.fc1.bias[:hidden], rtol=0, atol=0)
        torch.testing.assert_close(b.mlp.fc2.weight, a.mlp.fc2.weight[:, :hidden], rtol=0, atol=0)
        torch.testing.assert_close(b.mlp.fc2.bias, a.mlp.fc2.bias, rtol=0, atol=0)
    others = {k: v for k, v in full.state_dict().items() if ".mlp." not in k}
    torch.testing.assert_close({k: narrow.state_dict()[k] for k in others}, others, rtol=0, atol=0)


def test_random_init_draws_new_mlp_weights_and_keeps_everything_else():
    torch.manual_seed(3)
    sliced = create_model("vit_pico_patch4_32_shallow_mlp", mlp_init="sliced", **TINY_VIT)
    torch.manual_seed(3)
    fresh = create_model("vit_pico_patch4_32_shallow_mlp", mlp_init="random", **TINY_VIT)
    a, b = sliced.state_dict(), fresh.state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    for key in a:
        if ".mlp." in key and key.endswith("weight"):
            assert not torch.equal(a[key], b[key]), key
        elif ".mlp." not in key:
            assert torch.equal(a[key], b[key]), key


def test_narrowing_a_grouped_model_keeps_the_sharing():
    model = narrow_mlps(create_model("vit_pico_patch4_32_grouped_mlp", **TINY_VIT), 0.25)
    assert model.blocks[0].mlp is model.blocks[1].mlp
    assert model.blocks[0].mlp.fc1.out_features == 16


def test_random_init_of_a_swiglu_mlp_runs_the_mlps_own_initialisation():
    from timm.layers import SwiGLU

    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", mlp_layer=SwiGLU, **TINY_VIT)
    full = model.blocks[0].mlp
    # SwiGLU's own init_weights: gate bias 1, gate weight ~N(0, 1e-6); timm's ViT init runs it for every block.
    assert torch.equal(full.fc1_g.bias, torch.ones_like(full.fc1_g.bias)) and full.fc1_g.weight.std() < 1e-5
    narrow_mlps(model, 0.5, init="random")
    for block in model.blocks:
        mlp = block.mlp
        assert mlp.fc1_g.weight.shape == (full.fc1_g.out_features // 2, 16)
        assert torch.equal(mlp.fc1_g.bias, torch.ones_like(mlp.fc1_g.bias))
        assert 0 < mlp.fc1_g.weight.std() < 1e-5
        assert 0.01 < mlp.fc1_x.weight.std() < 0.03  # the other layers: timm's truncated normal, std 0.02


def test_narrowing_an_mlp_with_other_parameters_is_refused():
    model = create_model("mlit_xxs", **TINY_MLIT)
    with pytest.raises(ConfigError, match=r"MixtureOfSwiGLUExperts also has the parameters fc1_g_weight, "
                                          r"fc1_g_bias, router\.weight, router\.bias, so it cannot be narrowed\."):
        narrow_mlps(model, 0.5)
    assert model.blocks[0].mlp.fc1_x.out_features == 12  # nothing was changed


@pytest.mark.parametrize("ratio, init", [(0.0, "sliced"), (1.5, "sliced"), (0.5, "zeros")])
def test_invalid_width_ratio_or_init_is_a_config_error(ratio, init):
    with pytest.raises(ConfigError):
        create_model("vit_pico_patch4_32_shallow_mlp", width_ratio=ratio, mlp_init=init, **TINY_VIT)


# -- mLiT -----------------------------------------------------------------------------------------------------------
def test_mlit_schedules_shrink_the_hidden_size_linearly_and_grow_the_experts_in_three_stages():
    model = meta_model("mlit_s")
    assert model.hidden_sizes[0] == 144 and model.hidden_sizes[-1] == 72
    steps = [a - b for a, b in zip(model.hidden_sizes, model.hidden_sizes[1:])]
    assert all(s in (5, 6) for s in steps) and sum(steps) == 72
    assert model.num_experts == [3] * 5 + [4] * 5 + [5] * 5
    assert [b.mlp.fc1_g_weight.shape for b in model.blocks][-1] == (5, 72, 144)
    assert meta_model("mlit_xxs").num_experts == [3] * 3 + [4] * 3 + [5] * 3


@pytest.mark.parametrize("name, paper", [("mlit_s", 2.36e6), ("mlit_xxs", 0.67e6)])
def test_mlit_parameter_counts_at_100_classes_are_within_1_5_percent_of_the_paper(name, paper):
    count = count_parameters(meta_model(name, num_classes=100))
    assert abs(count - paper) / paper < 0.015, count


def test_moe_output_is_the_gate_weighted_sum_of_the_two_chosen_experts():
    torch.manual_seed(0)
    moe = MixtureOfSwiGLUExperts(8, 6, num_experts=4, top_k=2).double()
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    out = moe(x)
    tokens = x.reshape(-1, 8)
    logits = moe.router(tokens)
    expected = torch.zeros_like(tokens)
    for t in range(tokens.shape[0]):
        chosen = logits[t].argsort(descending=True)[:2]
        weights = logits[t, chosen].softmax(0)
        for g, e in zip(weights, chosen):
            expert = F.silu(moe.fc1_g_weight[e] @ tokens[t] + moe.fc1_g_bias[e]) * moe.fc1_x(tokens[t])
            expected[t] += g * moe.fc2(expert)
    torch.testing.assert_close(out.reshape(-1, 8), expected, rtol=1e-12, atol=1e-12)


def test_moe_routes_every_token_to_exactly_k_distinct_experts_and_every_expert_gets_tokens():
    torch.manual_seed(0)
    model = create_model("mlit_xxs", **TINY_MLIT).eval()
    x, _ = tiny_batch(TINY_MLIT, n=8)
    model(x)
    tokens = 8 * (model.patch_embed.num_patches + 1)
    for block in model.blocks:
        moe = block.mlp
        _, chosen, weights = moe.route(torch.randn(tokens, 16))
        assert chosen.shape == (tokens, 2)
        assert (chosen[:, 0] != chosen[:, 1]).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones(tokens))
        assert moe.tokens_per_expert.sum() == 2 * tokens
        assert (moe.tokens_per_expert > 0).all(), moe.tokens_per_expert
        assert torch.isfinite(moe.aux_loss)
    expected = sum(0.01 * b.mlp.aux_loss for b in model.blocks)
    torch.testing.assert_close(moe_aux_loss(model), expected)


def test_load_balancing_loss_is_one_when_the_router_is_uniform_and_reaches_the_router():
    moe = MixtureOfSwiGLUExperts(8, 6, num_experts=5, top_k=2)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.bias.zero_()
    moe(torch.randn(10, 8))
    torch.testing.assert_close(moe.aux_loss, torch.tensor(1.0))
    moe.aux_loss.backward()
    assert moe.router.weight.grad is not None


def test_mlit_copies_and_ema_work_after_a_training_forward_and_backward():
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    model = create_model("mlit_xxs", **TINY_MLIT)
    x, y = tiny_batch(TINY_MLIT)
    loss = F.cross_entropy(model(x), y)
    aux = moe_aux_loss(model)
    assert aux.grad_fn is not None  # attached to the graph, so that the trainer's backward reaches the routers
    (loss + aux).backward()
    clone = copy.deepcopy(model)
    ema = ModelEmaV3(model, decay=0.9)
    for copied in (clone, ema.module):
        assert all(b.mlp.aux_loss is None and b.mlp.tokens_per_expert is None for b in copied.blocks)
        torch.testing.assert_close(copied.state_dict(), model.state_dict(), rtol=0, atol=0)
    ema.update(model)
    # The original keeps its last forward's statistics for the trainer.
    torch.testing.assert_close(moe_aux_loss(model), aux, rtol=0, atol=0)
    assert all(b.mlp.tokens_per_expert is not None for b in model.blocks)


def test_forwards_inside_torch_func_transforms_leave_the_recorded_statistics_alone():
    torch.manual_seed(0)
    model = create_model("mlit_xxs", **TINY_MLIT).double().eval()
    x, y = tiny_batch(TINY_MLIT, dtype=torch.float64)
    with torch.no_grad():
        model(x)
    recorded = moe_aux_loss(model)
    params = {k: p.detach() for k, p in model.named_parameters()}
    vector = {k: torch.randn_like(p) for k, p in params.items()}
    with sdpa_kernel(SDPBackend.MATH):
        jvp(grad(lambda p: task_loss(model, p, x[:2], y[:2])), (params,), (vector,))
    assert all(type(b.mlp.aux_loss) is torch.Tensor for b in model.blocks)
    assert not any(torch._C._functorch.is_functorch_wrapped_tensor(b.mlp.aux_loss) for b in model.blocks)
    torch.testing.assert_close(moe_aux_loss(model), recorded, rtol=0, atol=0)
    copy.deepcopy(model)


def test_moe_aux_loss_is_zero_for_a_model_without_experts():
    assert moe_aux_loss(create_model("vit_pico_patch4_32", **TINY_VIT)).item() == 0.0


def test_grouped_query_attention_shapes_and_equivalence_to_repeated_key_value_heads():
    torch.manual_seed(0)
    model = create_model("mlit_s", **dict(TINY_MLIT, embed_dim=24, num_heads=6, num_kv_heads=2))
    attn = model.blocks[0].attn
    assert attn.q_proj.weight.shape == (24, 24)
    assert attn.k_proj.weight.shape == (8, 24) and attn.v_proj.weight.shape == (8, 24)
    x = torch.randn(2, 10, 24)
    assert attn(x).shape == (2, 10, 24)

    full = create_model("mlit_s", **dict(TINY_MLIT, embed_dim=24, num_heads=6, num_kv_heads=6)).blocks[0].attn
    with torch.no_grad():
        full.q_proj.load_state_dict(attn.q_proj.state_dict())
        full.proj.load_state_dict(attn.proj.state_dict())
        for name in ("k_proj", "v_proj"):  # head h of the grouped layer reads key/value head h // 3
            src, dst = getattr(attn, name), getattr(full, name)
            dst.weight.copy_(src.weight.reshape(2, 1, 4, 24).expand(2, 3, 4, 24).reshape(24, 24))
            dst.bias.copy_(src.bias.reshape(2, 1, 4).expand(2, 3, 4).reshape(24))
    torch.testing.assert_close(full(x), attn(x))


# -- masked autoencoder -----------------------------------------------------------------------------------------------
def test_mae_masks_three_quarters_and_its_encoder_weights_load_into_the_classifier():
    from landscape.models import encoder_state_dict

    torch.manual_seed(0)
    mae = create_model("mae_mlit_xs", **dict(TINY_MAE, img_size=8))
    x = torch.randn(2, 1, 8, 8)
    loss, pred, mask = mae(x)
    assert pred.shape == (2, 16, 4) and mask.shape == (2, 16)
    assert (mask.sum(1) == 12).all() and torch.isfinite(loss)
    noise = torch.rand(2, 16)
    assert torch.equal(mae(x, noise)[2], mae(x, noise)[2])
    # loss is the mean squared error over the removed patches only
    manual = ((pred - mae.patchify(x)) ** 2).mean(-1)
    torch.testing.assert_close(loss, (manual * mask).sum() / mask.sum())
    classifier = create_model("mlit_xs", **dict(TINY_MLIT, img_size=8))
    result = classifier.load_state_dict(encoder_state_dict(mae.state_dict()), strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"] and not result.unexpected_keys


# -- every variant: round trip, speed, second derivatives --------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TINY_VARIANTS))
def test_same_name_kwargs_and_seed_rebuild_the_same_model(name):
    torch.manual_seed(0)
    a = create_model(name, **TINY_VARIANTS[name]).state_dict()
    torch.manual_seed(0)
    b = create_model(name, **TINY_VARIANTS[name]).state_dict()
    torch.manual_seed(1)
    c = create_model(name, **TINY_VARIANTS[name]).state_dict()
    assert list(a) == list(b)
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the values come from the seed


@pytest.mark.parametrize("name, kwargs", [
    ("vit_pico_patch4_32_grouped_mlp", dict(TINY_VIT, group_size=2, init_scale=0.5)),
    ("vit_pico_patch4_32_shallow_mlp", dict(TINY_VIT, width_ratio=0.25, mlp_init="random")),
    ("mlit_xxs", TINY_MLIT),
])
def test_a_checkpoint_rebuilds_the_model_from_its_name_and_kwargs(tmp_path, name, kwargs):
    from landscape.checkpoints import build_model, load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = create_model(name, **kwargs).eval()
    save_checkpoint(tmp_path / "c.safetensors", model.state_dict(), model=name, model_kwargs=kwargs)
    torch.manual_seed(1)
    rebuilt = build_model(*load_checkpoint(tmp_path / "c.safetensors")).eval()
    x, _ = tiny_batch(kwargs)
    torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)
    assert unique_mlps(rebuilt) == unique_mlps(model)
    assert count_parameters(rebuilt) == count_parameters(model)


@pytest.mark.parametrize("name", sorted(TINY_VARIANTS))
def test_forward_and_backward_of_a_tiny_configuration_reach_every_parameter_quickly(name):
    model = create_model(name, **TINY_VARIANTS[name])
    x, y = tiny_batch(TINY_VARIANTS[name], n=4)
    start = time.process_time()  # CPU time of this process: a loaded machine does not inflate it
    out = model(x)
    loss = out[0] if isinstance(out, tuple) else F.cross_entropy(out, y)
    (loss + moe_aux_loss(model)).backward()
    assert time.process_time() - start < 5.0  # generous: a tiny model takes well under 0.1 s of one core
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("name", sorted(TINY_VARIANTS))
def test_hessian_vector_product_forward_over_reverse_equals_double_backward(name):
    torch.manual_seed(0)
    model = create_model(name, **TINY_VARIANTS[name]).double().eval()
    x, y = tiny_batch(TINY_VARIANTS[name], dtype=torch.float64)
    noise = torch.rand(x.shape[0], model.encoder.patch_embed.num_patches) if name.startswith("mae_") else None
    params = {k: p.detach() for k, p in model.named_parameters()}
    vector = {k: torch.randn_like(p) for k, p in params.items()}
    with sdpa_kernel(SDPBackend.MATH):
        _, forward_over_reverse = jvp(grad(lambda p: task_loss(model, p, x, y, noise)), (params,), (vector,))
        leaves = dict(model.named_parameters())
        gradient = torch.autograd.grad(task_loss(model, leaves, x, y, noise), list(leaves.values()),
                                       create_graph=True, allow_unused=True)
        used = [(k, g) for k, g in zip(leaves, gradient) if g is not None]
        double_backward = torch.autograd.grad([g for _, g in used], [leaves[k] for k, _ in used],
                                              grad_outputs=[vector[k] for k, _ in used], allow_unused=True)
    for (key, _), expected in zip(used, double_backward):
        expected = torch.zeros_like(params[key]) if expected is None else expected
        torch.testing.assert_close(forward_over_reverse[key], expected, rtol=1e-8, atol=1e-12, msg=key)
    assert sum(v.abs().sum() for v in forward_over_reverse.values()) > 0


def test_functional_call_without_weight_tying_uses_and_restores_a_shared_mlp():
    model = create_model("vit_pico_patch4_32_grouped_mlp", **TINY_VIT)
    before = dict(model.named_parameters())
    zeros = {k: torch.zeros_like(p) for k, p in before.items()}
    x, y = tiny_batch(TINY_VIT)
    assert torch.equal(functional_call(model, zeros, (x,), tie_weights=False), torch.zeros(3, 5))
    after = dict(model.named_parameters())
    assert all(after[k] is before[k] for k in before)
    assert model.blocks[1].mlp.fc1.weight is before["blocks.0.mlp.fc1.weight"]


# -- the registry and the table ---------------------------------------------------------------------------------------
def test_unknown_model_name_is_one_sentence_listing_the_variants():
    with pytest.raises(ConfigError, match=r"Unknown model 'vit_huge_mlp'; the landscape models are .*mlit_xs.*"
                                          r"any timm model name"):
        create_model("vit_huge_mlp")


def test_unknown_keyword_is_a_config_error():
    with pytest.raises(ConfigError, match="group_size"):
        create_model("vit_pico_patch4_32", group_size=2)


@pytest.mark.parametrize("name, key, value, reason", [
    ("vit_pico_patch4_32", "num_heads", 5, "dim should be divisible by num_heads"),  # an AssertionError in timm
    ("vit_pico_patch4_32_grouped_mlp", "init_scale", "a", "could not convert string to float"),  # ValueError
    ("vit_pico_patch4_32", "depth", "two", ""),  # a TypeError deep inside timm
])
def test_invalid_keyword_values_are_one_config_error_naming_model_and_arguments(name, key, value, reason):
    with pytest.raises(ConfigError) as e:
        create_model(name, **dict(TINY_VIT, **{key: value}))
    message = str(e.value)
    assert message.startswith(f"Model {name} cannot be built with img_size=8, patch_size=2, ")
    assert f"{key}={value!r}" in message and reason in message
    assert message.endswith(".") and "\n" not in message


def test_any_timm_model_name_works():
    model = create_model("vit_tiny_patch16_224", **TINY_VIT)
    assert model(torch.randn(1, 1, 8, 8)).shape == (1, 5)


def test_model_table_rows_report_exact_counts():
    rows = {r["name"]: r for r in model_table(["vit_base_patch16_224", "vit_base_patch16_224_grouped_mlp", "mlit_xxs"])}
    assert rows["vit_base_patch16_224"]["params"] == 86_567_656
    assert rows["vit_base_patch16_224"]["GMACs"] == 17.5638
    assert rows["vit_base_patch16_224"]["GMACs w/o attn"] == 16.8485
    assert rows["vit_base_patch16_224_grouped_mlp"]["unique MLPs"] == 6
    assert rows["mlit_xxs"]["params"] == count_parameters(create_model("mlit_xxs"))
    assert rows["mlit_xxs"]["unique MLPs"] == 9 and rows["mlit_xxs"]["description"].startswith("mLiT-XXS")


def test_models_command_prints_the_table_and_rejects_unknown_names():
    from click.testing import CliRunner

    from landscape.cli import cli

    result = CliRunner().invoke(cli, ["models", "vit_base_patch16_224_shallow_mlp"])
    assert result.exit_code == 0, result.output
    assert "58237672" in result.output and "11.27" in result.output
    result = CliRunner().invoke(cli, ["models", "no_such_vit"])
    assert result.exit_code == 1 and "Unknown model 'no_such_vit'" in result.output


def test_mlit_trains_under_bf16_autocast():
    """The experts' bf16 activations are added into the float32 gate (index_add needs one dtype)."""
    from landscape.models import create_model

    model = create_model("mlit_xxs", embed_dim=16, depth=3, num_heads=2, num_kv_heads=1, hidden_first=32,
                         hidden_last=16, patch_size=7, img_size=28, num_classes=10, in_chans=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(4, 1, 28, 28))
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and model.head.weight.grad is not None


@pytest.mark.parametrize("name, key, value", [("vit_pico_patch4_32", "class_token", "maybe"),
                                              ("vit_pico_patch4_32_grouped_mlp", "qkv_bias", 2),
                                              ("vit_pico_patch4_32", "final_norm", "off ")])
def test_a_flag_argument_takes_true_or_false_only(name, key, value):
    # class_token=maybe built a class token (non-empty text is true) and the run recorded 'maybe'
    with pytest.raises(ConfigError, match=f"argument {key} is true or false, not {value!r}"):
        create_model(name, img_size=8, in_chans=1, patch_size=2, num_classes=10, **{key: value})
    built = create_model(name, img_size=8, in_chans=1, patch_size=2, num_classes=10, **{key: True})
    assert isinstance(built, torch.nn.Module)
