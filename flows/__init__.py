"""The Prefect flows. `python -m flows.pipeline` imports this package before the flow's module:
components/preflight.py refuses bad settings or missing input data there, before Prefect, torch
and the steps are imported."""

import sys

if sys.argv[:1] == ["-m"]:  # only while `python -m` looks for its module (see preflight.py)
    from components.preflight import run

    run()
