"""The public API of gaussian_ad: lazy names that resolve, and a cheap top-level import."""

from __future__ import annotations

import subprocess
import sys

import pytest

import gaussian_ad


@pytest.mark.parametrize("name", gaussian_ad.__all__)
def test_public_names_resolve_to_their_modules(name):
    value = getattr(gaussian_ad, name)
    assert value.__module__ == gaussian_ad._EXPORTS[name]
    assert name in dir(gaussian_ad)


def test_all_lists_exactly_the_exports():
    assert sorted(gaussian_ad.__all__) == sorted(gaussian_ad._EXPORTS)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        gaussian_ad.Nope  # noqa: B018


def test_import_and_config_need_no_torch():
    code = (
        "import sys, gaussian_ad; gaussian_ad.DetectorConfig(levels='7'); "
        "print(sorted(m for m in ('torch', 'timm', 'prefect', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
