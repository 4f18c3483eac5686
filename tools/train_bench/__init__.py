"""tools/bench_train.py's parts: models and batch, torch twins, the ORT-training side venv, workers, report."""
