"""
train.py as a program: one run in its own process, and the pretrained base it used read back from its
cache file. compare.py and toy_profile.py run the toy this way; nothing imports train.py.
"""

import json
import os
import subprocess
import sys

import torch

from smoe import GPT, GPTConfig

TRAIN_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")


def run_train(argv, out):
    """`python train.py *argv --out out`, its output in out/log.txt; returns the run's results.json."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "log.txt"), "w") as log:
        rc = subprocess.run([sys.executable, TRAIN_PY, *argv, "--out", out], stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"train.py {' '.join(argv)} failed (exit {rc}); its output is in {os.path.join(out, 'log.txt')}")
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def load_base(results):
    """The pretrained base of a run, from its results.json: an smoe.GPT on the CPU."""
    model = GPT(GPTConfig(**results["model_config"]))
    model.load_state_dict(torch.load(results["base"], weights_only=True)["model"])
    return model
