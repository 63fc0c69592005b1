"""
How long the quick start takes: `python train.py --budget 16` run twice in a fresh folder, wall-clock time of the
whole command as a user waits for it, and train.py's own time per phase; then what the second run printed.
The first run is cold (a new process, a new folder); the default base comes from base/ either way, and a base
that flags such as --base-seed ask for is pretrained by the first run and loaded from its cache by the second.

Run from the repository root:  python bench/quickstart.py [train.py's flags, e.g. --base-seed 3]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

p = argparse.ArgumentParser(usage="python bench/quickstart.py [train.py's flags]", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
_, flags = p.parse_known_args()  # the rest go to train.py
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
with tempfile.TemporaryDirectory() as out:
    for run in ("cold", "again"):
        t0 = time.time()
        proc = subprocess.run([sys.executable, "train.py", "--budget", "16", "--out", out, *flags], cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        took = time.time() - t0
        if proc.returncode != 0:
            sys.exit(proc.stderr.strip().splitlines()[-1])  # train.py's own error line
        with open(os.path.join(out, "results.json")) as f:
            results = json.load(f)
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in results["times_s"].items())
        print(f"{run:<6} {took:6.1f} s   ({phases}; mean exact match {results['mean']:.3f})")
print(proc.stdout)
