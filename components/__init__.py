"""The pipeline's steps, one module each: prepare, augment, train, evaluate, register, export, and
predict for new images. Each has one public function of its name; `cnn-pipeline <step>` runs it
from params.yaml (cnn_pipeline/), dvc.yaml's stages and the flows call the same functions.

What the steps use lives in one folder per concern: core/ (settings, output names, atomic
writes, step code, secrets), data/ (sources, image files, the prepared format, drift), training/
(models, the run's set-up, batches, DDP, checkpoints, augmentation), serving/ (the served pyfunc,
ONNX, the model card), tracking/ (MLflow: the run, lineage, delivery), report/ (pictures and
tables). None of them imports a step or the command line.
"""
