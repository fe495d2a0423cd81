"""How far dartquant's f32 activations are from llama.cpp's on the same tokens: per site and layer,
the relative RMS difference over the elements above 1e-3 of the tensor's largest magnitude.
Reads dump_sites' DIR and dump_tensors' DIR. Usage: compare_sites.py DARTQUANT_DIR LLAMA_CPP_DIR
"""
import os
import sys
import numpy as np
from rows_file import read

# dartquant's site -> the tensor llama.cpp's graph names the same activation
SITES = {"attn_in": "attn_norm", "o_proj_in": "kqv_out", "mlp_in": "ffn_norm", "down_in": "ffn_swiglu"}


ours, theirs = sys.argv[1], sys.argv[2]
for site, name in SITES.items():
    rms = []
    layer = 0
    while os.path.exists(f"{ours}/{site}-{layer}.f32"):
        x = read(f"{ours}/{site}-{layer}.f32").astype(np.float64)
        y = read(f"{theirs}/{name}-{layer}.f32").astype(np.float64).reshape(x.shape)
        big = np.abs(x) > 1e-3 * np.abs(x).max()
        rms.append(np.sqrt(np.mean(((x - y)[big] / x[big]) ** 2)))
        layer += 1
    print(f"{site} ({name}): " + " ".join(f"{r:.1e}" for r in rms))
