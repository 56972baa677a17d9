"""The estimator contract of the statistical core, without importing scikit-learn.

The core's estimators keep scikit-learn's contract: keyword-only parameters stored
unchanged by ``__init__``, ``get_params`` / ``set_params`` (so ``sklearn.base.clone``
works on them), a repr that shows the parameters that differ from their defaults, learned
state in attributes ending in ``_``, and :class:`NotFittedError` before fitting.
scikit-learn is not imported for it: importing it costs about 1.6 s of CPU, which every
``gaussian-ad score`` call and every worker process would pay for three small functions.
The tests run scikit-learn's own estimator checks on both estimators.
"""

from __future__ import annotations

import inspect
from typing import Any, Self


class NotFittedError(ValueError, AttributeError):
    """An estimator or detector used before it was fitted.

    The same bases as ``sklearn.exceptions.NotFittedError``, so code that catches
    ``ValueError`` or ``AttributeError`` for scikit-learn's catches this one too.
    """


class Estimator:
    """Parameters from the keyword-only ``__init__`` signature; see the module docstring.

    Examples
    --------
    >>> from gaussian_ad.stats.estimator import Estimator
    >>> class Model(Estimator):
    ...     def __init__(self, *, alpha: float = 1.0, beta: int = 2):
    ...         self.alpha = alpha
    ...         self.beta = beta
    >>> model = Model(beta=3)
    >>> model
    Model(beta=3)
    >>> model.set_params(alpha=0.5).get_params()
    {'alpha': 0.5, 'beta': 3}
    """

    @classmethod
    def _defaults(cls) -> dict[str, Any]:
        """Each parameter's default, in the signature's order."""
        signature = inspect.signature(cls.__init__)
        return {
            name: p.default
            for name, p in signature.parameters.items()
            if name != "self" and p.kind is p.KEYWORD_ONLY
        }

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The parameters as given (``deep`` is accepted for scikit-learn; none nest)."""
        return {name: getattr(self, name) for name in self._defaults()}

    def set_params(self, **params: Any) -> Self:
        """Set parameters by name; validated when fitting, as in scikit-learn."""
        valid = self._defaults()
        for name, value in params.items():
            if name not in valid:
                raise ValueError(
                    f"Invalid parameter {name!r} for {type(self).__name__}: "
                    f"valid parameters are {sorted(valid)}"
                )
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        changed = [
            f"{name}={getattr(self, name)!r}"
            for name, default in self._defaults().items()
            if not _same(getattr(self, name), default)
        ]
        return f"{type(self).__name__}({', '.join(changed)})"


def check_fitted(estimator: object, attribute: str, message: str) -> None:
    """Raise :class:`NotFittedError` (``message`` with the class name) if ``attribute``
    is missing."""
    if not hasattr(estimator, attribute):
        raise NotFittedError(message % {"name": type(estimator).__name__})


def _same(value: Any, default: Any) -> bool:
    """Whether a parameter still equals its default (by identity or equal type and value)."""
    if value is default:
        return True
    try:
        return type(value) is type(default) and bool(value == default)
    except (TypeError, ValueError):  # e.g. an array compared elementwise
        return False
