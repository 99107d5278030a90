"""The runners over the same steps: Prefect flows (pipeline.py, batch_predict.py), the Optuna
search (search/), the Kubeflow pipeline (kubeflow/)."""
