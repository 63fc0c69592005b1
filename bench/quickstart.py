"""
How long the quick start takes: `python train.py --budget 16` in a fresh folder (cold: the base is
pretrained first), then again in the same folder (cached: the base is loaded). Wall-clock time of
the whole command, as a new user waits for it, and train.py's own time per phase; then what the
cached run printed.

Run from the repository root:  python bench/quickstart.py            (flags after it go to train.py)
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import torch

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
with tempfile.TemporaryDirectory() as out:
    for run in ("cold", "cached"):
        t0 = time.time()
        printed = subprocess.run([sys.executable, "train.py", "--budget", "16", "--out", out, *sys.argv[1:]], cwd=root,
                                 check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
        took = time.time() - t0
        with open(os.path.join(out, "results.json")) as f:
            results = json.load(f)
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in results["times_s"].items())
        print(f"{run:<7} {took:6.1f} s   ({phases}; mean exact match {results['mean']:.3f})")
print(printed)
