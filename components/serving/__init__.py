"""The registered model: the served pyfunc (pyfunc.py) and the file MLflow loads it from
(model_code.py), ONNX files (onnx_model.py), the model card (model_card.py)."""
