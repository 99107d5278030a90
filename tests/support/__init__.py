"""What tests (and bench/) share besides conftest.py's fixtures: project copies and reading MLflow
back (projects.py), servers on loopback (servers.py, postgres.py), files in real formats
(formats.py), full disks (disks.py), processes started at once (racing.py)."""
