#!/usr/bin/env python3
"""dartquant's HF export checked in transformers itself. Not part of CI (transformers and torch are
not installable on the build machines); run it where they are:

  build/dartquant export --model MODEL --format hf --out /tmp/hf
  scripts/check-transformers.py /tmp/hf TEXT [--seqlen 256] [--windows 4] [--dartquant build/dartquant]

It loads the directory with AutoModelForCausalLM and AutoTokenizer (float32, CPU or CUDA), then
checks, against `dartquant eval` of the same directory on the same text:
  - the token ids: transformers' tokenization of the whole text (special tokens added) has the
    length dartquant's eval reports for the windows it scores, and equals `dartquant tokenize`
    line by line on the text's first 200 lines;
  - the logits, through the mean next-token NLL of the same non-overlapping windows (GPTQ
    protocol: every token of each window after the first is scored), to a relative 1e-4.
The HF directory needs a tokenizer.json (a llama2.c tokenizer.bin is not readable by transformers).
Exit status 0 when every check passes.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir")
    p.add_argument("text")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--dartquant", default=os.path.join(os.path.dirname(__file__), "..", "build", "dartquant"))
    p.add_argument("--tolerance", type=float, default=1e-4)
    a = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.exists(os.path.join(a.hf_dir, "tokenizer.json")):
        sys.exit(f"{a.hf_dir}: no tokenizer.json; transformers cannot read a llama2.c tokenizer.bin")
    tok = AutoTokenizer.from_pretrained(a.hf_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(a.hf_dir, torch_dtype=torch.float32).to(device).eval()
    text = open(a.text, encoding="utf-8").read()
    ok = True

    # Token ids, line by line, against `dartquant tokenize`.
    lines = [l for l in text.split("\n") if l.strip()][:200]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "lines.txt")
        open(path, "w", encoding="utf-8").write("\n".join(lines) + "\n")
        out = subprocess.run([a.dartquant, "tokenize", "--tokenizer", os.path.join(a.hf_dir, "tokenizer.json"),
                              "--text-file", path], check=True, capture_output=True, text=True).stdout
        ours = [json.loads(l) for l in out.splitlines()]
        theirs = [tok(l, add_special_tokens=False)["input_ids"] for l in lines]
        equal = sum(x == y for x, y in zip(ours, theirs))
        print(f"tokenizer: {equal} of {len(lines)} lines give equal ids")
        ok &= equal == len(lines)

        # Perplexity windows: dartquant eval --json, and the same windows in transformers.
        report = os.path.join(tmp, "eval.json")
        subprocess.run([a.dartquant, "eval", "--model", a.hf_dir, "--ppl", a.text, "--seqlen", str(a.seqlen),
                        "--max-windows", str(a.windows), "--json", report], check=True, capture_output=True)
        want = json.load(open(report))

    ids = tok(text, return_tensors="pt")["input_ids"][0]
    windows = min(a.windows, len(ids) // a.seqlen)
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            x = ids[w * a.seqlen:(w + 1) * a.seqlen].unsqueeze(0).to(device)
            logp = torch.log_softmax(model(x).logits[0, :-1].double(), dim=-1)
            total += -logp.gather(1, x[0, 1:].unsqueeze(1)).sum().item()
            count += a.seqlen - 1
    mean_nll = total / count
    rel = abs(mean_nll / want["mean_nll"] - 1)
    print(f"windows {windows} x {a.seqlen}: transformers mean NLL {mean_nll:.8f} (ppl {math.exp(mean_nll):.4f}), "
          f"dartquant {want['mean_nll']:.8f} (ppl {want['ppl']:.4f}), rel. diff {rel:.1e}")
    ok &= count == want["tokens"] and rel <= a.tolerance
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
