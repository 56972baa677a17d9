"""MLflow: the detector as a pyfunc model, registered versions, aliases and promotion."""
