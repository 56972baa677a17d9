"""The Examples sections of the public API and the statistical core run as doctests."""

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import gaussian_ad
import gaussian_ad.stats

STATS_MODULES = sorted(
    f"gaussian_ad.stats.{info.name}" for info in pkgutil.iter_modules(gaussian_ad.stats.__path__)
)
PACKAGE = Path(gaussian_ad.__file__).parent
DOCUMENTED_MODULES = sorted(  # every module of the library with an example in it
    ".".join(("gaussian_ad", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(
        ".__init__"
    )
    for path in PACKAGE.rglob("*.py")
    if ">>>" in path.read_text()
)
WITH_EXAMPLES = (
    "gaussian_ad",
    "gaussian_ad.config",
    "gaussian_ad.stats.gaussian",
    "gaussian_ad.stats.patch_gaussian",
    "gaussian_ad.stats.estimator",
    "gaussian_ad.store.plan",
)


def run_doctests(name: str) -> doctest.TestResults:
    module = importlib.import_module(name)
    return doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)


@pytest.mark.parametrize("name", sorted({*STATS_MODULES, *DOCUMENTED_MODULES}))
def test_examples_pass(name):
    assert run_doctests(name).failed == 0


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_estimators_have_examples(name):
    results = run_doctests(name)
    assert results.failed == 0
    assert results.attempted >= 1
