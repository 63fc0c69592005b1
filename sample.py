"""
Ask a finished run of train.py: its base with its adapter, greedy decoding, nothing trained.

    python sample.py --out out --prompt A7+48=      the tuned model's line: A7+48=550. (add answers least significant digit first)
    python sample.py --out out --evaluate           the held-out table of train.py's step 6 again
"""

import argparse
import json
import os

import torch

import data
from smoe import GPT, GPTConfig, load_adapter


def prompt(text):
    """An argparse type: a line of one of the toy's tasks up to its '=', as data.py shows them."""
    tags = ", ".join(f"{tag} {task}" for task, tag in data.TAGS.items())
    if not text.endswith("="):
        raise argparse.ArgumentTypeError(f"expected a line up to its '=', like A7+48=, got {text!r}")
    if len(text) >= data.BLOCK_SIZE:
        raise argparse.ArgumentTypeError(f"{text!r} is too long: the model reads {data.BLOCK_SIZE} characters, prompt and "
                                         f"answer together (the tasks' inputs have {data.MIN_LEN} to {data.MAX_LEN} letters)")
    if text[0] not in data.TAGS.values():
        raise argparse.ArgumentTypeError(f"{text!r} starts with {text[0]!r}, not a task's tag ({tags})")
    outside = sorted(set(text[1:-1]) - set(data.LETTERS + data.DIGITS + "+"))
    if outside:
        raise argparse.ArgumentTypeError(f"{text!r} holds {''.join(outside)!r}: the toy's letters are a to j, its digits 0 to 9")
    return text


p = argparse.ArgumentParser(description="Ask a finished run of train.py: its answers, or its held-out table again.")
p.add_argument("--out", default="out", help="the run's folder, as train.py's --out (default out)")
p.add_argument("--prompt", action="append", type=prompt, default=[], metavar="TEXT", help="a line up to its '=', e.g. A7+48=")
p.add_argument("--evaluate", action="store_true", help="print the run's held-out table again")
args = p.parse_args()
if not args.prompt and not args.evaluate:
    p.error("nothing to do: give --prompt TEXT or --evaluate")
try:
    with open(os.path.join(args.out, "results.json")) as f:
        results = json.load(f)
    model = GPT(GPTConfig(**results["model_config"]))
    model.load_state_dict(torch.load(results["base"], map_location="cpu", weights_only=True)["model"])
    base = GPT(model.cfg)
    base.load_state_dict(model.state_dict())
    load_adapter(model, torch.load(os.path.join(args.out, "adapter.pt"), map_location="cpu", weights_only=True))
except (OSError, KeyError, ValueError, RuntimeError) as e:
    p.error(f"--out {args.out} holds no finished run to load ({e})")

for text in args.prompt:
    head, dot, _ = data.generate(model, [text], data.BLOCK_SIZE + 1 - len(text))[0].partition(".")
    print(text + head + dot)  # the answer up to its '.'
if args.evaluate:
    n = results["config"]["eval_examples"]
    eval_sets = {t: data.eval_set(t, n) for t in results["accuracy"]}
    table = data.table(eval_sets, n, data.answers(base, eval_sets), data.answers(model, eval_sets))
    print("\n   ".join(table))
