"""
The paper's own test: LoRA-SMoE against plain LoRA and a uniform mixture of LoRA experts, and the
peers' allocation rules, on the same pretrained base, the same data and the same seeds.

With T tasks and M candidate matrices (the released example allocation spends 60 % of T x M):
  plain LoRA        one expert on every matrix                       budget M
  uniform LoRA-MoE  T experts on every matrix                        budget T x M
  LoRA-SMoE         sensitivity votes, each task for its top 60 %    budget T x round(0.6 M)  (the paper's regime)
                    and at plain LoRA's count                        budget M
                    for each sensitivity option: fisher (default), fisher with per-layer shares
  MoLA, AlphaLoRA, random (the sensitivity counts shuffled)          at the 60 % budget only (to keep the time)
Every run is `python train.py` with the same settings except --alloc, --budget, --sens-norm, --seed
and, for the peers' rules, --allocation: no rule gets its own tuning. The peers' allocations come
from peers.py, on the base every run loads (random: the same seed's LoRA-SMoE fisher counts, shuffled).

The rule for "better" is stats.py's, fixed before any run: per seed, the difference in mean held-out
exact match (rule minus reference); better or worse when the 95 % t interval of the mean difference
lies entirely above or below 0.

Then: is the sensitivity signal stable? For each seed, the Spearman rank correlation between the
scores train.py computed from its few sampled batches and scores from many batches, per task, and
the overlap of the allocations they give, next to the overlap a random allocation gets by chance.

Run (from the repository root):  python experiments/compare.py        (5 seeds; see README.md for time)
Flags it does not know go to every train.py run, e.g. `python experiments/compare.py --rank 4`.
A one-step run pretrains and caches the base first; then the runs go --jobs at a time (default one
per core), each a `python train.py` process on one thread, its output in its folder's log.txt.
Writes out/compare/compare.json and one folder per run.
"""

import argparse
import concurrent.futures
import json
import os
import random
import statistics
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # smoe.py, data.py
import data  # noqa: E402
from peers import allocate_alpha, allocate_mola, allocate_random  # noqa: E402
from runs import load_base, run_train  # noqa: E402
from smoe import allocate_experts, candidate_names, compute_sensitivity  # noqa: E402
from stats import paired_interval, spearman, verdict  # noqa: E402

SENSITIVITY_OPTIONS = {"fisher": [], "fisher/layer": ["--sens-norm", "layer"]}
SET_HERE = ("--alloc", "--budget", "--allocation", "--seed", "--sens-norm", "--cache", "--evaluate", "--prompt", "--resume")


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
    return path


def overlap(a, b):
    """Share of the budget two allocations place on the same matrices: sum_m min(a_m, b_m) / budget."""
    return sum(min(a[m], b[m]) for m in a) / sum(a.values())


def stability(base, names, fisher_runs, budget, many_batches, batch_size):
    """Each seed's sensitivity as its train.py run computed it (few batches) against scores from many batches."""
    tasks = list(fisher_runs[0]["sensitivity"])
    rng = random.Random("stability-many")
    batches = {t: [data.get_batch([t], batch_size, rng) for _ in range(many_batches)] for t in tasks}
    many = compute_sensitivity(base, batches, data.example_losses, names)
    many_alloc = allocate_experts(many, budget)
    per_seed = []
    for seed, run in enumerate(fisher_runs):
        few = run["sensitivity"]
        few_alloc = allocate_experts(few, budget)
        chance = [overlap(allocate_random(few_alloc, f"chance-{seed}-{i}"), many_alloc) for i in range(1000)]
        per_seed.append({"seed": seed, "spearman": {t: spearman([few[t][m] for m in names], [many[t][m] for m in names])
                                                    for t in tasks},
                         "overlap": overlap(few_alloc, many_alloc), "chance_overlap": statistics.mean(chance)})
    return {"many_batches": many_batches, "budget": budget, "many_allocation": many_alloc, "per_seed": per_seed}


def run_all(settings, jobs):
    """{(label, seed): (results.json, seconds)} for {(label, seed): (train.py flags, folder)}, `jobs` at a time."""
    def launch(key):
        t0 = time.time()
        return key, (run_train(*settings[key]), time.time() - t0)

    done = {}
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for key, (result, seconds) in tqdm(pool.map(launch, settings), total=len(settings), desc="runs", dynamic_ncols=True):
            done[key] = result, seconds
            tqdm.write(f"   {key[0]}, seed {key[1]}: " + " ".join(f"{t} {a:.2f}" for t, a in result["accuracy"].items())
                       + f" mean {result['mean']:.3f} ({seconds:.0f} s)")
    return done


def main(argv=None):
    p = argparse.ArgumentParser(prog="compare.py", allow_abbrev=False, description="LoRA-SMoE against plain LoRA, "
                                "uniform LoRA-MoE and the peers' rules, several seeds each, with paired 95 % intervals.")
    p.add_argument("--seeds", type=int, default=5, help="seeds per rule: 0..N-1 (default 5)")
    p.add_argument("--fraction", type=float, default=0.6,
                   help="each task votes for this share of the candidates in the paper's regime (default 0.6)")
    p.add_argument("--many-batches", type=int, default=32,
                   help="batches per task of the reference sensitivity in the stability check (default 32)")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help=f"runs at a time, one thread each (default {os.cpu_count()})")
    p.add_argument("--out", default=os.path.join("out", "compare"), help="output folder (default out/compare)")
    args, shared = p.parse_known_args(argv)  # any other flag is passed on to every train.py run, e.g. --rank 4
    for flag in SET_HERE:
        if any(a == flag or a.startswith(flag + "=") for a in shared):
            p.error(f"{flag} is set by compare.py for each run, or works on one finished run; leave it out")
    t_start = time.time()
    os.environ["OMP_NUM_THREADS"] = "1"  # every train.py run on one thread: --jobs of them share the cores
    torch.set_num_threads(1)  # this process too (the stability check)
    shared = ["--cache", args.out, *shared]

    # one step pretrains and caches the base that every run then loads, and checks the shared flags
    first = run_train([*shared, "--steps", "1", "--eval-examples", "1"], os.path.join(args.out, "base"))
    config, base = first["config"], load_base(first)
    tasks, names, seeds = config["tasks"], candidate_names(base, config["targets"]), range(args.seeds)
    T, M = len(tasks), len(names)
    paper = T * round(args.fraction * M)
    rules = {"plain LoRA": ["--alloc", "uniform", "--budget", str(M)],
             f"uniform LoRA-MoE x{T}": ["--alloc", "uniform", "--budget", str(T * M)]}
    for budget in (paper, M):
        rules |= {f"LoRA-SMoE {name} @{budget}": ["--budget", str(budget), *flags] for name, flags in SENSITIVITY_OPTIONS.items()}
    for label, allocation in ((f"mola @{paper}", allocate_mola(names, paper)),
                              (f"alpha @{paper}", allocate_alpha(base, names, paper)[0])):
        path = write_json(os.path.join(args.out, label.replace(" @", "-") + ".json"), allocation)
        rules[label] = ["--allocation", path]

    def setting(label, seed, flags):  # (train.py flags, output folder) of one run
        folder = label.replace(" ", "-").replace("/", "-").replace("@", "")
        return [*shared, "--seed", str(seed), *flags], os.path.join(args.out, f"{folder}-seed{seed}")

    labels = [*rules, f"random @{paper}"]
    tqdm.write(f"{len(labels) * args.seeds} runs of {T} tasks over {M} candidate matrices, {args.jobs} at a time; "
               "each run's output goes to its folder's log.txt")
    runs = run_all({(label, seed): setting(label, seed, flags) for label, flags in rules.items() for seed in seeds}, args.jobs)
    # random, once those are done: each seed's LoRA-SMoE fisher counts, zeros included, shuffled with that seed
    shuffled = {}
    for seed in seeds:
        counts = runs[f"LoRA-SMoE fisher @{paper}", seed][0]["allocation"]
        path = write_json(os.path.join(args.out, f"random-{paper}-seed{seed}.json"),
                          allocate_random({n: counts.get(n, 0) for n in names}, seed))
        shuffled[f"random @{paper}", seed] = setting(f"random @{paper}", seed, ["--allocation", path])
    runs |= run_all(shuffled, args.jobs)

    config = runs["plain LoRA", 0][0]["config"]  # the settings every run shares (the first run's are a step long)
    tqdm.write("\n=== stability of the sensitivity signal ===")
    stable = stability(base, names, [runs[f"LoRA-SMoE fisher @{paper}", seed][0] for seed in seeds], paper,
                       args.many_batches, config["batch_size"])

    # the table: mean and sd over seeds, then the paired differences against the two references
    rows = []
    for label in labels:
        rs = [runs[label, seed][0] for seed in seeds]
        means = [r["mean"] for r in rs]
        row = {"rule": label, "experts": sum(rs[0]["allocation"].values()), "trainable": rs[0]["parameters"]["trainable"],
               "accuracy": {t: [r["accuracy"][t] for r in rs] for t in tasks}, "mean": means,
               "seconds": statistics.mean(runs[label, seed][1] for seed in seeds),
               "allocation_seed0": rs[0]["allocation"], "sensitivity_seed0": rs[0]["sensitivity"]}
        for ref in ("plain LoRA", f"uniform LoRA-MoE x{T}"):
            row[f"vs {ref}"] = paired_interval(means, [runs[ref, seed][0]["mean"] for seed in seeds])
        rows.append(row)

    def ms(values):
        return f"{statistics.mean(values):.3f}" + (f"±{statistics.stdev(values):.3f}" if len(values) > 1 else "      ")

    def diff(m, h):
        return f"{m:+.3f}" + (f" [{m - h:+.3f}, {m + h:+.3f}]" if h is not None else " (one seed)")

    lines = [f"{'rule':<27} {'experts':>7} {'trainable':>9} " + " ".join(f"{t:>11}" for t in tasks)
             + f" {'mean':>11} {'run':>7}"]
    for row in rows:
        lines.append(f"{row['rule']:<27} {row['experts']:>7} {row['trainable']:>9,} "
                     + " ".join(f"{ms(row['accuracy'][t]):>11}" for t in tasks)
                     + f" {ms(row['mean']):>11} {row['seconds']:>6.0f}s")
    fewer = "".join(f", {t}: all {data.heldout_size(t)} it has" for t in tasks if data.heldout_size(t) < config["eval_examples"])
    lines.append(f"(held-out exact match, {config['eval_examples']} per task{fewer}, mean ± sd over seeds "
                 f"{', '.join(map(str, seeds))}; {config['steps']} fine-tuning steps; wall time per run, {args.jobs} runs at a time)")
    lines.append(f"\npaired per-seed difference in mean exact match, with its 95 % t interval ({args.seeds} seeds):")
    lines.append(f"{'rule':<27} {'vs plain LoRA':>26}  {'vs uniform LoRA-MoE x' + str(T):>26}")
    for row in rows[2:]:
        a, b = row["vs plain LoRA"], row[f"vs uniform LoRA-MoE x{T}"]
        lines.append(f"{row['rule']:<27} {diff(*a):>26}  {diff(*b):>26}   {verdict(*a)} / {verdict(*b)}")
    lines.append(f"\nsensitivity from {config['sens_batches']} vs {stable['many_batches']} batches per task "
                 f"(allocations of {stable['budget']} experts):")
    for s in stable["per_seed"]:
        lines.append(f"  seed {s['seed']}: Spearman " + " ".join(f"{t} {v:.2f}" for t, v in s["spearman"].items())
                     + f"; allocation overlap {s['overlap']:.2f} (chance {s['chance_overlap']:.2f})")
    total = time.time() - t_start
    lines.append(f"\ntotal time {total / 60:.1f} min")
    tqdm.write("\n" + "\n".join(lines))
    summary = {"settings": {**vars(args), "shared": shared}, "rows": rows, "stability": stable, "total_s": total, "table": lines}
    write_json(os.path.join(args.out, "compare.json"), summary)
    return summary


if __name__ == "__main__":
    main()
