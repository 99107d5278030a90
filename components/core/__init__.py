"""What every step shares: the settings (params.py), the names of output files (outputs.py), atomic
writes (atomic.py), what a step's code is (step_code.py), what counts as a secret (secrets.py)."""
