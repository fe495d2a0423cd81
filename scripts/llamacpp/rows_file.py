"""Reads the files rows_file.h writes: int64 rows, int64 cols, then the floats."""
import numpy as np


def read(path):
    with open(path, "rb") as f:
        rows, cols = np.frombuffer(f.read(16), dtype=np.int64)
        return np.frombuffer(f.read(), dtype=np.float32).reshape(rows, cols)
