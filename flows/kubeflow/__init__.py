"""The same steps as a Kubeflow Pipelines v2 pipeline: compiler.py (the graph, `cnn-pipeline kfp
compile` and `run-local`), tasks.py (one container task per step)."""
