"""CaiT's talking-heads attention through the fused attention call (trainer.talking_heads) against timm's.

The rewrite must be the same function with the same parameters (issue 8: "a faster path must match the
reference path's outputs within bf16 tolerance"): outputs and every gradient against timm's
``TalkingHeadAttn`` on random weights (biases included, heads mixed by full random matrices), in fp32 and
under bf16 autocast, alone, inside a CaiT built from a recipe, and compiled.
"""

from __future__ import annotations

import copy

import pytest
import torch
from timm.models.cait import TalkingHeadAttn

from trainer import recipes
from trainer.config import ConfigError
from trainer.overrides import apply_overrides
from trainer.talking_heads import SdpaTalkingHeadAttn, check_against_timm, use_sdpa_talking_heads

TINY_CAIT = ["model.img_size=32", "data.augment.image_size=32", "model.patch_size=4", "model.depth=2",
             "model.embed_dim=48", "model.num_heads=4", "model.num_classes=10", "model.layer_scale_init=1.0"]


def attention_pair(width: int, heads: int, qkv_bias: bool, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """timm's layer with every parameter random (std 0.3: the heads' mixes are far from the identity) and a
    copy switched to the fused path."""
    torch.manual_seed(seed)
    timm_layer = TalkingHeadAttn(width, heads, qkv_bias=qkv_bias)
    for p in timm_layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    fused = copy.deepcopy(timm_layer)
    assert use_sdpa_talking_heads(fused) == 1 and type(fused) is SdpaTalkingHeadAttn
    return timm_layer, fused


def grads(module: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """d(sum(module(x) * weight)) / d(x and every parameter); the same drop-path draws at every call."""
    torch.manual_seed(1)
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    (module(x).float() * weight).sum().backward()
    return x.grad, {n: p.grad for n, p in module.named_parameters()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("width, heads, tokens, qkv_bias", [(48, 4, 17, True), (64, 8, 10, False), (24, 1, 5, True)])
def test_outputs_and_every_gradient_match_timm_in_fp32(width: int, heads: int, tokens: int, qkv_bias: bool) -> None:
    timm_layer, fused = attention_pair(width, heads, qkv_bias)
    x = torch.randn(3, tokens, width)
    expected = timm_layer(x)
    assert rel_err(fused(x), expected) < 1e-5
    weight = torch.randn_like(expected)  # a random cotangent: every output element's gradient counts
    gx_timm, gp_timm = grads(timm_layer, x, weight)
    gx_fused, gp_fused = grads(fused, x, weight)
    assert rel_err(gx_fused, gx_timm) < 1e-5
    assert gp_fused.keys() == gp_timm.keys()
    for name, g in gp_timm.items():
        assert gp_fused[name] is not None, f"{name} has no gradient (DDP would wait for it)"
        if name == "proj_l.bias":  # the softmax cancels it: exactly zero here, rounding noise in timm
            assert torch.count_nonzero(gp_fused[name]) == 0
            assert g.abs().max() < 1e-4 * gp_timm["proj_l.weight"].abs().max()
        else:
            assert rel_err(gp_fused[name], g) < 1e-5, name


def test_bf16_autocast_error_is_timms_own() -> None:
    """Under bf16 autocast both paths round; the fused path's distance from the fp32 reference is within
    a small factor of timm's own bf16 distance (the tolerance the issue asks for is bf16's)."""
    timm_layer, fused = attention_pair(64, 8, True)
    x = torch.randn(4, 20, 64)
    reference = timm_layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        timm_bf16, fused_bf16 = timm_layer(x), fused(x)
    assert fused_bf16.dtype == timm_bf16.dtype == torch.bfloat16  # no fp32 promotion through the mixes
    timm_error, fused_error = rel_err(timm_bf16, reference), rel_err(fused_bf16, reference)
    assert 0 < timm_error < 0.05 and fused_error < 2 * timm_error + 1e-3


def test_the_device_check_passes_the_fused_layer_and_catches_a_wrong_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """``check_against_timm``, which trainer.bench_gpu runs on the GPU before timing a fused row (kernels CI
    never runs): it passes the layer, and fails one that is off by 10% or feeds its projection fp32."""
    _, fused = attention_pair(64, 8, True)
    model = torch.nn.Sequential(fused)
    assert 0 < check_against_timm(model, torch.device("cpu"), tokens=20) <= 3.0
    original = SdpaTalkingHeadAttn.forward
    monkeypatch.setattr(SdpaTalkingHeadAttn, "forward", lambda self, x: original(self, x) * 1.1)
    with pytest.raises(AssertionError, match="bf16 error is"):
        check_against_timm(model, torch.device("cpu"), tokens=20)
    monkeypatch.setattr(SdpaTalkingHeadAttn, "forward", lambda self, x: self.proj(original(self, x).float()))
    with pytest.raises(AssertionError, match="fed its projection"):
        check_against_timm(model, torch.device("cpu"), tokens=20)


def test_attention_dropout_in_training_is_timms_path() -> None:
    timm_layer, fused = attention_pair(32, 4, True)
    timm_layer.attn_drop.p = fused.attn_drop.p = 0.5
    x = torch.randn(2, 9, 32)
    torch.manual_seed(7)
    expected = timm_layer(x)
    torch.manual_seed(7)
    assert torch.equal(fused(x), expected)  # same dropout mask: the same code ran
    fused.eval(), timm_layer.eval()
    assert rel_err(fused(x), timm_layer(x)) < 1e-5  # no dropout at eval: the fused path again


def test_recipe_builds_a_cait_with_the_fused_path_and_timms_weights_load() -> None:
    timm_config = apply_overrides(recipes.get("cait_xxs24"), [*TINY_CAIT, "scaling.use_gpu=false"]).validate()
    fused_config = apply_overrides(timm_config, ["model.talking_heads=sdpa"]).validate()
    torch.manual_seed(0)
    timm_model = timm_config.model.build().train()
    fused_model = fused_config.model.build().train()
    kinds = [type(m) for m in fused_model.modules() if isinstance(m, TalkingHeadAttn)]
    assert kinds == [SdpaTalkingHeadAttn] * 2  # both self-attention blocks; class attention is timm's own
    assert not any(type(m) is SdpaTalkingHeadAttn for m in timm_model.modules())
    fused_model.load_state_dict(timm_model.state_dict(), strict=True)  # checkpoints are interchangeable
    for m in timm_model.modules():
        if isinstance(m, TalkingHeadAttn):  # mixes and biases far from their init, so a slip would show
            for p in (m.proj_l.weight, m.proj_l.bias, m.proj_w.weight, m.proj_w.bias):
                torch.nn.init.normal_(p, std=0.5)
    fused_model.load_state_dict(timm_model.state_dict())
    x = torch.randn(4, 3, 32, 32)
    assert timm_config.model.drop_path > 0  # the models train with stochastic depth: one seed for both
    torch.manual_seed(1)
    expected = timm_model(x)
    torch.manual_seed(1)
    assert rel_err(fused_model(x), expected) < 1e-5
    weight = torch.randn_like(expected)
    _, g_timm = grads(timm_model, x, weight)
    _, g_fused = grads(fused_model, x, weight)
    largest = max(g.abs().max() for g in g_timm.values())
    for name, g in g_timm.items():
        if name.endswith(("proj_l.bias", "attn.k.bias")):  # a softmax cancels both: zero up to rounding
            assert max(g.abs().max(), g_fused[name].abs().max()) < 1e-6 * largest, name
        else:
            assert rel_err(g_fused[name], g) < 1e-4, name


@pytest.mark.slow
def test_compiled_fused_path_matches_eager() -> None:
    """The GPU benchmark times it compiled: Dynamo's trace and AOTAutograd's graphs of the fused path
    compute the same (aot_eager: CI need not have the C++ compiler inductor's CPU code wants)."""
    timm_layer, fused = attention_pair(48, 4, True)
    x = torch.randn(2, 17, 48)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    weight = torch.randn(2, 17, 48)
    gx_eager, gp_eager = grads(timm_layer, x, weight)
    gx_comp, gp_comp = grads(compiled, x, weight)
    assert rel_err(gx_comp, gx_eager) < 1e-4
    for name, g in gp_eager.items():
        if name != "proj_l.bias":
            assert rel_err(gp_comp[f"_orig_mod.{name}"], g) < 1e-4, name


def test_fused_path_on_a_model_without_talking_heads_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"model\.talking_heads='sdpa' but model\.name='deit_small_patch16_224'"):
        apply_overrides(recipes.get("deit_s"), ["model.talking_heads=sdpa"]).validate()
