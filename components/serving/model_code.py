"""The code MLflow runs to load the served model (MLflow's models from code).

register logs this file as the pyfunc's model code, with the components/ package beside it
(code_paths); the model is components/serving/pyfunc.py's ImageClassifier, which reads model.pt from
the model's artifacts when MLflow calls its load_context.
"""

from mlflow.models import set_model

from components.serving.pyfunc import ImageClassifier

set_model(ImageClassifier())
