"""
The quick start over ten bases: LoRA-SMoE (`python train.py --budget 16`) against plain LoRA
(`python train.py --alloc uniform --budget 16`) on the bases of base seeds 0 to 9 (seed 0: the base
kept in base/), every other setting at train.py's defaults, nothing tuned for either side.

A run wins when its mean held-out exact match over the four tasks is the higher; equal means tie.
The allocation column shows where the 16 experts went: each task votes for its 4 most sensitive
matrices, so the experts land on few matrices when the tasks agree.

Run from the repository root:  python experiments/bases.py      (its table and time: README.md)
Each run is a `python train.py` process on one thread, --jobs at a time (default 2), its output in
its folder's log.txt; a folder that already holds results.json is read back, not run again, so a
stopped table resumes. Writes out/bases/<seed>-<smoe|lora>/ and out/bases/table.md.
"""

import argparse
import concurrent.futures
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # smoe.py, data.py
import data  # noqa: E402
from runs import run_train  # noqa: E402

ARMS = {"smoe": ["--budget", "16"], "lora": ["--alloc", "uniform", "--budget", "16"]}


def run_or_read(argv, out):
    """A run's results.json, run first unless its folder already holds one."""
    if not os.path.exists(os.path.join(out, "results.json")):
        return run_train(argv, out)
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def experts_by_layer(allocation, matrix, n_layer):
    """'4 4 4 4 0 0 0 0': the experts on `matrix` of each layer."""
    return " ".join(str(allocation.get(f"layers.{i}.{'mlp' if matrix == 'up_proj' else 'attn'}.{matrix}", 0)) for i in range(n_layer))


def table(results):
    """{seed: {"smoe": results.json, "lora": results.json}} -> the Markdown table's lines, then the count of wins."""
    lines = ["| base seed | fingerprint | LoRA-SMoE: " + ", ".join(data.TASKS) + " | mean | plain LoRA mean | "
             "LoRA-SMoE - plain LoRA | experts on v_proj, layers 0 to 7 | on up_proj |", "|---" * 8 + "|"]
    wins = {"LoRA-SMoE": 0, "plain LoRA": 0, "tie": 0}
    for seed, r in sorted(results.items()):
        smoe, lora = r["smoe"], r["lora"]
        diff = smoe["mean"] - lora["mean"]
        wins["LoRA-SMoE" if diff > 0 else "plain LoRA" if diff < 0 else "tie"] += 1
        n_layer = smoe["model_config"]["n_layer"]
        lines.append(f"| {seed} | {smoe['base_fingerprint']} | " + ", ".join(f"{smoe['accuracy'][t]:.3f}" for t in data.TASKS)
                     + f" | {smoe['mean']:.3f} | {lora['mean']:.3f} | {diff:+.3f} | "
                     + f"{experts_by_layer(smoe['allocation'], 'v_proj', n_layer)} | {experts_by_layer(smoe['allocation'], 'up_proj', n_layer)} |")
    return lines, wins


def main():
    p = argparse.ArgumentParser(description="LoRA-SMoE against plain LoRA over base seeds 0 to 9, every run kept.")
    p.add_argument("--seeds", type=int, default=10, help="base seeds 0 to N - 1 (default 10)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each (default 2)")
    p.add_argument("--out", default=os.path.join("out", "bases"), help="folder of the runs and table.md (default out/bases)")
    args = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # each train.py process on one thread
    cache = os.path.join(args.out, "cache")
    # both runs of a seed read one cached base: the seeds go two by two, so that a seed's second run starts
    # after its first has pretrained the base
    jobs = [(seed, arm) for pair in range(0, args.seeds, 2) for arm in ARMS for seed in range(pair, min(pair + 2, args.seeds))]
    results = {seed: {} for seed in range(args.seeds)}
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run_or_read, ARMS[arm] + ["--base-seed", str(seed), "--cache", cache],
                               os.path.join(args.out, f"{seed}-{arm}")): (seed, arm) for seed, arm in jobs}
        for future in concurrent.futures.as_completed(futures):
            seed, arm = futures[future]
            results[seed][arm] = future.result()
            print(f"base seed {seed}, {arm}: mean {results[seed][arm]['mean']:.3f}", flush=True)
    lines, wins = table(results)
    lines.append("")
    lines.append(f"Over {args.seeds} bases: LoRA-SMoE has the higher mean on {wins['LoRA-SMoE']}, plain LoRA on "
                 f"{wins['plain LoRA']}, {wins['tie']} tie.")
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
