"""MLflow, attached to every step the same way: the run (run.py: the Tracker and `tracked`),
lineage tags (lineage.py), delivery that survives a server going away (delivery.py), and where
the store is (store.py)."""
