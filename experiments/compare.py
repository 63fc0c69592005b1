"""
The paper's own test: LoRA-SMoE against plain LoRA and a uniform mixture of LoRA experts, and the
peers' allocation rules, on the same pretrained base, the same data and the same seeds.

With T tasks and M candidate matrices (the released example allocation spends 60 % of T x M):
  plain LoRA        one expert on every matrix                       budget M
  uniform LoRA-MoE  T experts on every matrix                        budget T x M
  LoRA-SMoE         sensitivity votes, each task for its top 60 %    budget T x round(0.6 M)  (the paper's regime)
                    and at plain LoRA's count                        budget M
                    for each sensitivity option: fisher (default), batch, fisher with per-layer shares
  MoLA, AlphaLoRA, random (the sensitivity counts shuffled)          at the 60 % budget only (to keep the time)
Every run is `train.main` with the same settings except --alloc, --budget, the sensitivity option
and --seed: no rule gets its own tuning.

The rule for "better", fixed before any run: for each seed, the difference in mean held-out
exact match (rule minus reference) on the same base, data and seed; rule A is better than B
when the two-sided 95 % Student-t confidence interval of the mean paired difference lies
entirely above 0, worse when entirely below, and otherwise no difference was detected.

Then: is the sensitivity signal stable? For each seed, the Spearman rank correlation between the
scores from train.py's few sampled batches and from many batches, per task, and the overlap of
the allocations they give, next to the overlap a random allocation would get by chance.

Run (from the repository root):  python experiments/compare.py        (5 seeds; see README.md for time)
Flags it does not know go to every train.py run, e.g. `python experiments/compare.py --rank 4`.
The runs go --jobs at a time (default one per core), each a `python train.py` process on one
thread, its output in its folder's log.txt. Writes out/compare/compare.json and one folder per run.
"""

import concurrent.futures
import json
import os
import random
import subprocess
import sys
import time
from functools import partial

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import train  # noqa: E402
from smoe import GPTConfig, allocate_experts, candidate_names, compute_sensitivity  # noqa: E402

TRAIN_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")
SENSITIVITY_OPTIONS = {"fisher": [], "batch": ["--sens-estimator", "batch"], "fisher/layer": ["--sens-norm", "layer"]}
# two-sided 95 % quantiles of Student's t with df = 1..30 degrees of freedom (any statistics table)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042}


def paired_interval(a, b):
    """Mean of the per-seed differences a - b and the half-width of its 95 % t interval
    (None with one seed: no spread to estimate). Example: a = [0.9, 0.8, 0.7], b = [0.8, 0.8, 0.6]:
    differences 0.1, 0, 0.1, mean 0.0667, sd 0.0577, half-width 4.303 * 0.0577 / sqrt(3) = 0.1434."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(d) < 2:
        return float(d.mean()), None
    t = T_975.get(len(d) - 1, 1.96 + 2.4 / (len(d) - 1))  # beyond the table (df > 30): within 0.003 of the exact quantile
    return float(d.mean()), float(t * d.std(ddof=1) / np.sqrt(len(d)))


def verdict(mean, half):
    if half is None:
        return "one seed: no interval"
    return "better" if mean - half > 0 else "worse" if mean + half < 0 else "no difference detected"


def spearman(a, b):
    """Spearman rank correlation: the Pearson correlation of the ranks (ties share their average rank)."""
    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = v.argsort(kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(1, len(v) + 1)
        for value in np.unique(v):  # ties: the average of their ranks
            r[v == value] = r[v == value].mean()
        return r
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def overlap(a, b):
    """Share of the budget two allocations place on the same matrices: sum_m min(a_m, b_m) / budget."""
    return sum(min(a[m], b[m]) for m in a) / sum(a.values())


def stability(base_args, seeds, tasks, budget, many_batches):
    """Sensitivity from few (train.py's --sens-batches) vs many batches, per seed, with train.py's estimator."""
    device = torch.device(base_args.device)
    cfg = GPTConfig(vocab_size=len(data.VOCAB), block_size=data.BLOCK_SIZE)
    model = train.pretrained_base(base_args, cfg, device)
    candidates = candidate_names(model, base_args.targets)

    def scores(n_batches, rng):
        batches = {t: [data.get_batch([t], base_args.batch_size, rng) for _ in range(n_batches)] for t in tasks}
        return compute_sensitivity(model, batches, partial(train.example_losses, device=device), candidates,
                                   base_args.sens_estimator, base_args.sens_reduction)

    many = scores(many_batches, random.Random("stability-many"))
    many_alloc = allocate_experts(many, budget)
    per_seed = []
    for seed in seeds:
        few = scores(base_args.sens_batches, random.Random(f"sensitivity-{seed}"))  # the batches train.py --seed draws
        few_alloc = allocate_experts(few, budget)
        rng = random.Random(f"chance-{seed}")
        chance = []
        for _ in range(1000):  # the overlap a random allocation with the same counts gets
            counts = list(few_alloc.values())
            rng.shuffle(counts)
            chance.append(overlap(dict(zip(few_alloc, counts)), many_alloc))
        per_seed.append({"seed": seed,
                         "spearman": {t: spearman([few[t][m] for m in candidates], [many[t][m] for m in candidates])
                                      for t in tasks},
                         "overlap": overlap(few_alloc, many_alloc), "chance_overlap": float(np.mean(chance))})
    return {"few_batches": base_args.sens_batches, "many_batches": many_batches, "budget": budget,
            "many_allocation": many_alloc, "per_seed": per_seed}


def main():
    p = train.Parser(prog="compare.py", description="LoRA-SMoE against plain LoRA, uniform LoRA-MoE and the peers' "
                     "rules, several seeds each, with paired 95 % intervals.")
    p.add_argument("--seeds", type=train.number(int, 1), default=5, help="seeds per rule: 0..N-1 (default 5)")
    p.add_argument("--fraction", type=train.number(float, 0, inclusive=False, high=1), default=0.6,
                   help="each task votes for this share of the candidates in the paper's regime (default 0.6)")
    p.add_argument("--many-batches", type=train.number(int, 1), default=32,
                   help="batches per task of the reference sensitivity in the stability check (default 32)")
    p.add_argument("--jobs", type=train.number(int, 1), default=os.cpu_count() or 1,
                   help=f"runs at a time, one thread each (default: the {os.cpu_count()} cores here)")
    p.add_argument("--device", default="auto", help="as in train.py")
    p.add_argument("--out", default=os.path.join("out", "compare"), help="output folder (default out/compare)")
    args, shared = p.parse_known_args()  # any other flag is passed on to every train.py run, e.g. --rank 4
    for flag in ("--alloc", "--budget", "--allocation", "--seed", "--sens-estimator", "--sens-norm"):
        if any(a == flag or a.startswith(flag + "=") for a in shared):
            p.error(f"{flag} is set by compare.py for each run; leave it out")
    for flag in ("--evaluate", "--prompt", "--resume"):
        if any(a == flag or a.startswith(flag + "=") for a in shared):
            p.error(f"{flag} works on one finished train.py run, not on a comparison; leave it out")
    base_args = train.parse_args(["--out", args.out, "--device", args.device, *shared])  # what every run shares
    tasks, seeds = base_args.tasks, range(args.seeds)
    T, M = len(tasks), GPTConfig.n_layer * len(base_args.targets)
    paper_budget = T * round(args.fraction * M)
    runs = [("plain LoRA", ["--alloc", "uniform", "--budget", str(M)]),
            (f"uniform LoRA-MoE x{T}", ["--alloc", "uniform", "--budget", str(T * M)])]
    for budget in (paper_budget, M):
        runs += [(f"LoRA-SMoE {name} @{budget}", ["--budget", str(budget), *flags])
                 for name, flags in SENSITIVITY_OPTIONS.items()]
    runs += [(f"{rule} @{paper_budget}", ["--alloc", rule, "--budget", str(paper_budget)]) for rule in ("mola", "alpha", "random")]
    # validate every run's settings before the first one starts
    settings = {}
    for label, flags in runs:
        for seed in seeds:
            folder = label.replace(" ", "-").replace("/", "-").replace("@", "")
            settings[label, seed] = ["--seed", str(seed), "--device", args.device, "--cache", args.out,
                                     "--out", os.path.join(args.out, f"{folder}-seed{seed}"), *flags, *shared]
    for argv in settings.values():
        train.parse_args(argv)

    t_start = time.time()
    torch.set_num_threads(1)  # this process too (pretraining, stability check): --jobs processes share the cores
    cfg = GPTConfig(vocab_size=len(data.VOCAB), block_size=data.BLOCK_SIZE)
    train.pretrained_base(base_args, cfg, torch.device(base_args.device))  # pretrain and cache once; every run loads it
    # one run per core, each on one thread: the runs are independent, and a model this small gains
    # little from a second thread (its accuracy does not depend on how many run at once)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(item):
        (label, seed), argv = item
        folder = argv[argv.index("--out") + 1]
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "log.txt"), "w") as log:
            rc = subprocess.run([sys.executable, TRAIN_PY, *argv], stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        if rc != 0:
            raise RuntimeError(f"{label}, seed {seed} failed (exit {rc}); its output is in {folder}/log.txt")
        with open(os.path.join(folder, "results.json")) as f:
            return (label, seed), json.load(f)

    tqdm.write(f"{len(settings)} runs, {args.jobs} at a time; each run's output goes to its folder's log.txt")
    results = {}
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for key, result in tqdm(pool.map(launch, settings.items()), total=len(settings), desc="runs", dynamic_ncols=True):
            results[key] = result
            tqdm.write(f"   {key[0]}, seed {key[1]}: " + " ".join(f"{t} {a:.2f}" for t, a in result["accuracy"].items())
                       + f" mean {result['mean']:.3f}")

    tqdm.write("\n=== stability of the sensitivity signal ===")
    stable = stability(base_args, seeds, tasks, paper_budget, args.many_batches)

    # the table: mean and sd over seeds, then the paired differences against the two references
    rows = []
    for label, _ in runs:
        rs = [results[label, seed] for seed in seeds]
        means = [r["mean"] for r in rs]
        row = {"rule": label, "experts": sum(rs[0]["allocation"].values()), "trainable": rs[0]["parameters"]["trainable"],
               "accuracy": {t: [r["accuracy"][t] for r in rs] for t in tasks}, "mean": means,
               "finetune_s": float(np.mean([r["times_s"]["finetune"] for r in rs])),
               "allocation_seed0": rs[0]["allocation"], "sensitivity_seed0": rs[0]["sensitivity"]}
        for ref in ("plain LoRA", f"uniform LoRA-MoE x{T}"):
            row[f"vs {ref}"] = paired_interval(means, [results[ref, seed]["mean"] for seed in seeds])
        rows.append(row)

    def ms(values):
        return f"{np.mean(values):.3f}" + (f"±{np.std(values, ddof=1):.3f}" if len(values) > 1 else "      ")

    def diff(m, h):
        return f"{m:+.3f}" + (f" [{m - h:+.3f}, {m + h:+.3f}]" if h is not None else " (one seed)")

    lines = [f"{'rule':<27} {'experts':>7} {'trainable':>9} " + " ".join(f"{t:>11}" for t in tasks)
             + f" {'mean':>11} {'finetune':>8}"]
    for row in rows:
        lines.append(f"{row['rule']:<27} {row['experts']:>7} {row['trainable']:>9,} "
                     + " ".join(f"{ms(row['accuracy'][t]):>11}" for t in tasks)
                     + f" {ms(row['mean']):>11} {row['finetune_s']:>7.1f}s")
    lines.append(f"(held-out exact match, {base_args.eval_examples} per task, mean ± sd over seeds "
                 f"{', '.join(map(str, seeds))}; {base_args.steps} fine-tuning steps; fine-tuning time per run, {args.jobs} runs at a time)")
    lines.append(f"\npaired per-seed difference in mean exact match, with its 95 % t interval ({args.seeds} seeds):")
    lines.append(f"{'rule':<27} {'vs plain LoRA':>26}  {'vs uniform LoRA-MoE x' + str(T):>26}")
    for row in rows[2:]:
        a, b = row["vs plain LoRA"], row[f"vs uniform LoRA-MoE x{T}"]
        lines.append(f"{row['rule']:<27} {diff(*a):>26}  {diff(*b):>26}   {verdict(*a)} / {verdict(*b)}")
    lines.append(f"\nsensitivity from {stable['few_batches']} vs {stable['many_batches']} batches per task "
                 f"(allocations of {stable['budget']} experts):")
    for s in stable["per_seed"]:
        lines.append(f"  seed {s['seed']}: Spearman " + " ".join(f"{t} {v:.2f}" for t, v in s["spearman"].items())
                     + f"; allocation overlap {s['overlap']:.2f} (chance {s['chance_overlap']:.2f})")
    total = time.time() - t_start
    lines.append(f"\ntotal time {total / 60:.1f} min")
    tqdm.write("\n" + "\n".join(lines))
    summary = {"settings": {**vars(args), "shared": shared}, "rows": rows, "stability": stable, "total_s": total,
               "table": lines}
    train.write_json(os.path.join(args.out, "compare.json"), summary)


if __name__ == "__main__":
    main()
