"""Running: task configs, training, MLflow tracking, the bench, sweeps, pretraining, full scale
and multi-process training. Imports the core and data."""
