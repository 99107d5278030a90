"""The Prefect flows. `python -m flows.pipeline` imports this package before the flow's module:
importing the components package runs components/preflight.py there (its __init__), which refuses
bad settings or missing input data before Prefect, torch and the steps are imported."""

import components  # noqa: F401  (under `python -m`, its __init__ runs the preflight once)
