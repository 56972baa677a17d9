"""Supported backbones: architecture, native resolution, input statistics, level selection.

Torch-free, so configuration can be validated before torch is imported.
EfficientNet levels (Rippel et al. 2020): 1 = stem (conv + BN + act), 2..8 = the output
of each of the 7 block stages, 9 = the 1x1 head conv (+ BN + act) before pooling.
ResNet levels: 1 = stem (conv + BN + act + max-pool), 2..5 = layer1..layer4.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
LITE0_INPUT_SIZE = 352


@dataclass(frozen=True)
class BackboneSpec:
    """A supported backbone: timm architecture, native resolution and input statistics.

    ``default_input_size`` is the square side a detector uses unless told otherwise, where
    it was measured to beat the native side on real products (None: the native side).
    """

    name: str
    timm_name: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    n_levels: int
    default_input_size: int | None = None

    @property
    def is_efficientnet(self) -> bool:
        return "efficientnet" in self.timm_name


def _efficientnet_specs() -> dict[str, BackboneSpec]:
    # The ".aa_in1k" tags are the TF AutoAugment checkpoints, the same weights as
    # lukemelas' efficientnet_pytorch that the paper used (timm's default tag is Noisy Student).
    sizes = (224, 240, 260, 300, 380, 456, 528, 600)
    specs = {
        f"b{i}": BackboneSpec(
            f"b{i}", f"tf_efficientnet_b{i}.aa_in1k", size, IMAGENET_MEAN, IMAGENET_STD, 9
        )
        for i, size in enumerate(sizes)
    }
    for i, size in enumerate(sizes[:3]):
        specs[f"lite{i}"] = BackboneSpec(
            f"lite{i}", f"tf_efficientnet_lite{i}.in1k", size, LITE_MEAN, LITE_STD, 9
        )
    # Lite0 at 352 px instead of 224: image AUROC +0.045 / +0.020 on the two real dev
    # categories, at about 1.7-2.5x the backbone time (README, "Input resolution").
    specs["lite0"] = dataclasses.replace(specs["lite0"], default_input_size=LITE0_INPUT_SIZE)
    return specs


def _resnet_specs() -> dict[str, BackboneSpec]:
    # ".tv_in1k" = the torchvision weights (timm's default tag is its own A1 recipe).
    return {
        name: BackboneSpec(name, f"{name}.tv_in1k", 224, IMAGENET_MEAN, IMAGENET_STD, 5)
        for name in ("resnet18", "resnet34", "resnet50")
    }


BACKBONES: dict[str, BackboneSpec] = {**_efficientnet_specs(), **_resnet_specs()}


class WeightsNotFoundError(FileNotFoundError):
    """No pretrained weights are available offline for the requested backbone."""


class WeightsMismatchError(ValueError):
    """A weights file does not fit the backbone's architecture (or cannot be read)."""


def parse_levels(text: str | Sequence[int] | None, n_levels: int) -> tuple[int, ...]:
    """Parse a 1-based level selection: ``"1-9"``, ``"7"``, ``"3,5,7"``, ``"all"``/None, [3, 7].

    Returns the sorted unique levels; raises ValueError on syntax errors or out-of-range levels.
    """
    if text is None or (isinstance(text, str) and text.strip().lower() in ("all", "")):
        return tuple(range(1, n_levels + 1))
    if isinstance(text, str):
        levels: list[int] = []
        for part in text.split(","):
            match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
            if match is None:
                raise ValueError(
                    f"invalid level selection {text!r}: use e.g. '1-9', '7', '3,5,7' or 'all'"
                )
            first = int(match.group(1))
            last = int(match.group(2) or first)
            if last < first:
                raise ValueError(f"invalid level range {part.strip()!r}: end before start")
            levels.extend(range(first, last + 1))
    else:
        levels = [int(level) for level in text]
    if not levels:
        raise ValueError("empty level selection")
    out_of_range = sorted({level for level in levels if not 1 <= level <= n_levels})
    if out_of_range:
        raise ValueError(f"levels {out_of_range} out of range: the backbone has 1-{n_levels}")
    return tuple(sorted(set(levels)))
