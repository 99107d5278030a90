"""Data: where images come from (sources.py), decoding image files (images.py), the prepared
format and where the data is (dataset.py), how new images compare with the training data
(drift.py)."""
