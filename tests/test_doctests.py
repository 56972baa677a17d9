"""The Examples sections of the public API and the statistical core run as doctests."""

import doctest
import importlib
import pkgutil

import pytest

import gaussian_ad.stats

STATS_MODULES = sorted(
    f"gaussian_ad.stats.{info.name}" for info in pkgutil.iter_modules(gaussian_ad.stats.__path__)
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


@pytest.mark.parametrize("name", STATS_MODULES)
def test_examples_pass(name):
    assert run_doctests(name).failed == 0


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_estimators_have_examples(name):
    results = run_doctests(name)
    assert results.failed == 0
    assert results.attempted >= 1
