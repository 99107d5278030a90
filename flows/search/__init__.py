"""The search: N workers optimizing one Optuna study. study.py (storage, samplers, the study of
these settings), workers.py (a worker's objective, the budget, the end), trial.py (one trial's
training, in a process of its own), sweep.py (the Prefect flows and `cnn-pipeline search`)."""
