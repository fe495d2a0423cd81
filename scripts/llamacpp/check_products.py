"""Recomputes llama.cpp's matrix products from its own inputs with ggml-cpu's activation rounding.

Reads the tensors dump_tensors wrote (llama.cpp's inputs and outputs of each weight's product) and
the GGUF's weights (gguf-py, from llama.cpp's source tree), rounds each input as ggml-cpu does for
the weight's type (f16; q8_0 blocks for q8_0 / q4_0; q8_1 blocks with their stored sum for q4_1),
multiplies in double and prints, per weight type, the largest relative difference from llama.cpp's
output. Usage (PYTHONPATH=LLAMA_CPP_SOURCE/gguf-py): check_products.py GGUF DUMP_DIR
"""
import os
import sys
import numpy as np
from rows_file import read
from gguf import GGUFReader
from gguf.quants import dequantize


def q8_blocks(x):
    """ggml's x86 quantize_row_q8_0 / q8_1: per block of 32, d = amax / 127, codes = rne(x * 127 / amax)."""
    b = x.reshape(x.shape[0], -1, 32).astype(np.float32)
    amax = np.abs(b).max(2, keepdims=True)
    inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax != 0)
    codes = np.rint(b * inv)
    d = amax / np.float32(127)
    return codes.astype(np.float64), d.astype(np.float16).astype(np.float64), d


def product(x, t):
    kind = t.tensor_type.name
    w = dequantize(t.data, t.tensor_type).astype(np.float64).reshape(int(t.shape[1]), int(t.shape[0]))
    if kind == "F32":
        return x.astype(np.float64) @ w.T
    if kind == "F16":
        return x.astype(np.float16).astype(np.float64) @ w.T
    codes, d16, d = q8_blocks(x)
    xr = (codes * d16).reshape(x.shape)
    y = xr @ w.T
    if kind == "Q4_1":  # ggml's q4_1 x q8_1 takes m times the stored block sum, not the rounded values' sum
        raw = np.asarray(t.data).reshape(w.shape[0], -1, 20)
        m = raw[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(np.float64)  # [rows, blocks]
        s = (d[:, :, 0] * codes.sum(2)).astype(np.float32).astype(np.float16).astype(np.float64)
        y += s @ m.T - (codes * d16).sum(2) @ m.T
    return y


gguf, dump = sys.argv[1], sys.argv[2]
tensors = {t.name: t for t in GGUFReader(gguf).tensors}
worst = {}
l = -1
while os.path.exists(f"{dump}/attn_norm-{l + 1}.f32"):
    l += 1
    for inp, weight, out in [("attn_norm", "attn_v", "Vcur"), ("kqv_out", "attn_output", "attn_out"),
                             ("ffn_norm", "ffn_gate", "ffn_gate"), ("ffn_norm", "ffn_up", "ffn_up"),
                             ("ffn_swiglu", "ffn_down", "ffn_out")]:
        t = tensors[f"blk.{l}.{weight}.weight"]
        if not os.path.exists(f"{dump}/{out}-{l}.f32"):  # e.g. Qwen2's graph leaves o_proj's output unnamed
            continue
        x = read(f"{dump}/{inp}-{l}.f32")
        y = product(x, t)
        bias = tensors.get(f"blk.{l}.{weight}.bias")  # Qwen2's q/k/v biases: llama.cpp names the sum
        if bias is not None:
            y += np.asarray(bias.data, dtype=np.float64)
        z = read(f"{dump}/{out}-{l}.f32").reshape(y.shape).astype(np.float64)
        rel = np.abs(y - z).max() / np.abs(z).max()
        kind = t.tensor_type.name
        worst[kind] = max(worst.get(kind, 0.0), rel)
x = read(f"{dump}/result_norm.f32")
t = tensors.get("output.weight", tensors["token_embd.weight"])
y = product(x, t)
z = read(f"{dump}/result_output.f32").reshape(y.shape).astype(np.float64)
worst["output " + t.tensor_type.name] = np.abs(y - z).max() / np.abs(z).max()
print(" ".join(f"{k}:{v:.1e}" for k, v in worst.items()))
