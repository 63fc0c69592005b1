"""
Held-out accuracy against trainable parameters, one mark per rule and seed, one panel per
comparison: the toy (compare.py's out/compare/compare.json) and the real model (real_model.py's
out/real_model/results.json), whichever of the two exist.

Run (from the repository root; needs `pip install matplotlib`, which nothing else here does):
  python experiments/plot.py                    writes experiments/accuracy_vs_parameters.png
  python experiments/plot.py --toy A.json --real B.json --out C.png
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def toy_points(path):
    """[(rule, [trainable per seed], [mean exact match per seed])] from compare.py's compare.json
    (which keeps one parameter count per rule)."""
    with open(path) as f:
        rows = json.load(f)["rows"]
    return [(row["rule"], [row["trainable"]] * len(row["mean"]), row["mean"]) for row in rows]


def real_points(path):
    """The same from real_model.py's results.json, each seed at its own parameter count."""
    with open(path) as f:
        results = json.load(f)["results"]
    return [(rule, [r["trainable"] for r in runs.values()], [r["mean"] for r in runs.values()])
            for rule, runs in results.items()]


def main(argv=None):
    p = argparse.ArgumentParser(prog="plot.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy", default="out/compare/compare.json", help="compare.py's summary (default out/compare/compare.json)")
    p.add_argument("--real", default="out/real_model/results.json", help="real_model.py's results (default out/real_model/results.json)")
    p.add_argument("--out", default=os.path.join(HERE, "accuracy_vs_parameters.png"), help="the PNG to write")
    args = p.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        p.error("this plot needs matplotlib: pip install matplotlib")
    panels = []
    for title, path, read in (("toy (0.27 M parameters, 8 layers), compare.py", args.toy, toy_points),
                              ("SmolLM2-135M-Instruct, real_model.py", args.real, real_points)):
        if os.path.exists(path):
            try:
                panels.append((title, read(path)))
            except (OSError, ValueError, KeyError, StopIteration) as e:
                p.error(f"{path} cannot be read as its script's results ({type(e).__name__}: {e})")
    if not panels:
        p.error(f"neither {args.toy} nor {args.real} exists: run experiments/compare.py or experiments/real_model.py first")
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, (title, points) in zip(axes[0], panels):
        for i, (rule, trainable, means) in enumerate(points):  # trainable, means: one per seed
            color = f"C{i % 10}"
            ax.scatter(trainable, means, color=color, alpha=0.45, s=22)   # each seed
            ax.scatter([sum(trainable) / len(trainable)], [sum(means) / len(means)], color=color, marker="_", s=400,
                       label=rule)  # the mean
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (LoRA experts and routers)")
        ax.set_ylabel("held-out exact match, mean over tasks")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("Each dot one seed, each bar the mean over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
