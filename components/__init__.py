"""The pipeline's steps and what they share. `python -m components.<step>` imports this package
before the step's module: components/preflight.py refuses bad settings or missing input data
there, before the step's module imports torch, timm, mlflow or scikit-learn."""

import sys

if sys.argv[:1] == ["-m"]:  # only while `python -m` looks for its module (see preflight.py)
    from components.preflight import run

    run()
