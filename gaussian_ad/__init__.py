"""gaussian-ad: a multivariate Gaussian on pretrained deep features for anomaly detection.

The core library: no Prefect imports. See ``GaussianAD`` (gaussian.py) for the
estimator and ``Detector`` (detector.py) for images in, scores out.
"""

__version__ = "0.1.0"
