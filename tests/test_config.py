"""DetectorConfig and LoaderOptions: validated on construction, field named in the error."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from gaussian_ad.config import DetectorConfig, LoaderOptions, parse_reduction


def test_levels_are_parsed_and_stored_as_a_tuple():
    assert DetectorConfig(levels="6-8").levels == (6, 7, 8)
    assert DetectorConfig().levels == tuple(range(1, 10))
    assert DetectorConfig(backbone="resnet18").levels == (1, 2, 3, 4, 5)
    assert DetectorConfig(levels=[9, 7]).levels == (7, 9)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"backbone": "vgg"}, "backbone"),
        ({"levels": "0-3"}, "levels"),
        ({"levels": "x"}, "levels"),
        ({"reduction": "bogus"}, "reduction"),
        ({"variance_threshold": 1.5}, "variance_threshold"),
        ({"score": "max"}, "score"),
        ({"score": "fused", "patch": False}, "score"),  # needs patch=True
        ({"patch": True, "patch_grid": 0}, "patch_grid"),
        ({"patch_channels": 0}, "patch_channels"),
    ],
)
def test_invalid_values_name_their_field(changes, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        DetectorConfig(**changes)


@pytest.mark.parametrize(
    ("changes", "field"), [({"batch_size": 0}, "batch_size"), ({"workers": -1}, "workers")]
)
def test_loader_options_are_validated(changes, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        LoaderOptions(**changes)


def test_round_trip_and_unknown_keys():
    config = DetectorConfig(levels="7", reduction="npca", patch=True, score="fused", seed=3)
    assert DetectorConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown detector settings \\['levles'\\]"):
        DetectorConfig.from_dict({"levles": "7"})
    assert config.replace(seed=4).seed == 4 and config.seed == 3


def test_pydantic_validates_the_dataclasses_and_rejects_typos():
    adapter = TypeAdapter(DetectorConfig)
    assert adapter.validate_python({"levels": "8-9"}).levels == (8, 9)
    with pytest.raises(ValidationError, match="reducton"):
        adapter.validate_python({"reducton": "npca"})
    with pytest.raises(ValidationError, match="variance_threshold"):
        adapter.validate_python({"variance_threshold": 2})


def test_parse_reduction():
    assert parse_reduction("None") is None and parse_reduction(None) is None
    assert parse_reduction("NPCA") == "npca"
    with pytest.raises(ValueError, match="reduction"):
        parse_reduction("pcaa")
