"""scikit-learn's estimator contract, checked on both estimators of the statistical core."""

from __future__ import annotations

import pytest
from sklearn.utils import estimator_checks

from gaussian_ad.stats.gaussian import GaussianAD
from gaussian_ad.stats.patch_gaussian import PatchGaussian

SKLEARN_CHECKS = [
    "check_no_attributes_set_in_init",
    "check_parameters_default_constructible",
    "check_get_params_invariance",
    "check_set_params",
    "check_estimator_cloneable",
    "check_estimator_repr",
    "check_do_not_raise_errors_in_init_or_set_params",
]


@pytest.mark.parametrize("estimator", [GaussianAD, PatchGaussian])
@pytest.mark.parametrize("check", SKLEARN_CHECKS)
def test_sklearn_parameter_checks(check, estimator):
    getattr(estimator_checks, check)(estimator.__name__, estimator())


@pytest.mark.parametrize("estimator", [GaussianAD, PatchGaussian])
def test_parameters_are_keyword_only(estimator):
    with pytest.raises(TypeError):
        estimator(0.5)
