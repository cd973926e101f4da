"""Analysis: statistics over seeds and runs, and the reports built from the MLflow store and the
harness's outputs."""
