"""Prefect flows: training, scoring and the nightly schedule.

Telemetry is off by default (before Prefect or MLflow read their settings);
set the variables yourself to override.
"""

import os

os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
