"""Run loggers (`LOGGERS`): console progress and optional Weights & Biases."""
