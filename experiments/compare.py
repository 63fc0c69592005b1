"""
Compare the allocation rules at the same budget: LoRA-SMoE's sensitivity votes against the
peers' rules (uniform, MoLA, AlphaLoRA, random), plus plain LoRA, on the same pretrained base,
the same data and the same seeds. Every run is `train.main` with the same settings except
--alloc (and --seed): no rule gets its own tuning.

Then: is the sensitivity signal stable? For each seed, the Spearman rank correlation between
the scores from train.py's few sampled batches and from many batches, per task, and the overlap
of the allocations they give, next to the overlap a random allocation would get by chance.

Run (from the repository root):  python experiments/compare.py
Flags it does not know go to every train.py run, e.g. `python experiments/compare.py --rank 4`.
Writes out/compare/compare.json and one folder per run. See README.md for the measured table.
"""

import os
import random
import statistics
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import train  # noqa: E402
from smoe import GPTConfig, allocate_experts, candidate_names, compute_sensitivity  # noqa: E402


def ranks(values):
    """Ranks 1..n, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    r = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(a, b):
    """Spearman rank correlation: the Pearson correlation of the ranks."""
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5


def overlap(a, b):
    """Share of the budget two allocations place on the same matrices: sum_m min(a_m, b_m) / budget."""
    return sum(min(a[m], b[m]) for m in a) / sum(a.values())


def stability(args, seeds, tasks):
    """Sensitivity from few (train.py's --sens-batches) vs many (--many-batches) batches, per seed."""
    base_args = train.parse_args(["--device", args.device, "--out", args.out, "--budget", str(args.budget), *args.shared])
    device = torch.device(base_args.device)
    cfg = GPTConfig(vocab_size=len(data.VOCAB), block_size=data.BLOCK_SIZE)
    model = train.pretrained_base(base_args, cfg, device)
    candidates = candidate_names(model, base_args.targets)

    def loss_fn(model, batch):
        x, y = batch
        return model(x.to(device), y.to(device))[1]

    def scores(n_batches, rng):
        batches = {t: [data.get_batch([t], base_args.batch_size, rng) for _ in range(n_batches)] for t in tasks}
        return compute_sensitivity(model, batches, loss_fn, candidates)

    many = scores(args.many_batches, random.Random("stability-many"))
    many_alloc = allocate_experts(many, args.budget)
    per_seed = []
    for seed in seeds:
        few = scores(base_args.sens_batches, random.Random(f"sensitivity-{seed}"))  # the batches train.py --seed draws
        few_alloc = allocate_experts(few, args.budget)
        rng = random.Random(f"chance-{seed}")
        chance = []
        for _ in range(1000):  # the overlap a random allocation with the same counts gets
            counts = list(few_alloc.values())
            rng.shuffle(counts)
            chance.append(overlap(dict(zip(few_alloc, counts)), many_alloc))
        per_seed.append({"seed": seed,
                         "spearman": {t: spearman([few[t][m] for m in candidates], [many[t][m] for m in candidates])
                                      for t in tasks},
                         "overlap": overlap(few_alloc, many_alloc), "chance_overlap": statistics.fmean(chance)})
    return {"few_batches": base_args.sens_batches, "many_batches": args.many_batches,
            "many_allocation": many_alloc, "per_seed": per_seed}


def mean_sd(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main():
    p = train.Parser(description="Compare allocation rules at the same budget, several seeds each.")
    p.add_argument("--budget", type=train.number(int, 1), default=16, help="experts for every rule (default 16)")
    p.add_argument("--seeds", type=train.number(int, 1), default=3, help="seeds per rule: 0..N-1 (default 3)")
    p.add_argument("--steps", type=train.number(int, 1), default=2000,
                   help="fine-tuning steps of every run (default 2000, to keep the whole comparison near 15 minutes on 2 CPU cores)")
    p.add_argument("--many-batches", type=train.number(int, 1), default=64,
                   help="batches per task of the reference sensitivity in the stability check (default 64)")
    p.add_argument("--device", default="auto", help="as in train.py")
    p.add_argument("--out", default=os.path.join("out", "compare"), help="output folder (default out/compare)")
    args, shared = p.parse_known_args()  # any other flag is passed on to every train.py run, e.g. --rank 4
    args.shared = shared
    shared_args = train.parse_args(["--out", args.out, *shared])  # the tasks and targets every run shares
    tasks, n_candidates = shared_args.tasks, GPTConfig.n_layer * len(shared_args.targets)
    runs = [(rule, args.budget) for rule in train.ALLOC_RULES]
    if args.budget != n_candidates:
        runs.append(("plain LoRA", n_candidates))  # uniform at budget M: one expert, no router, per matrix
    # validate every run's settings before the first one starts
    settings = {}
    for rule, budget in runs:
        for seed in range(args.seeds):
            argv = ["--alloc", "uniform" if rule == "plain LoRA" else rule, "--budget", str(budget),
                    "--seed", str(seed), "--steps", str(args.steps), "--eval-every", str(args.steps),
                    "--device", args.device, "--cache", args.out,
                    "--out", os.path.join(args.out, f"{rule.replace(' ', '-')}-seed{seed}"), *shared]
            settings[rule, seed] = argv
    for argv in settings.values():
        train.parse_args(argv)

    t_start = time.time()
    results = {}
    for (rule, seed), argv in settings.items():
        tqdm.write(f"\n=== {rule}, seed {seed} ===")
        results[rule, seed] = train.main(train.parse_args(argv))

    tqdm.write("\n=== stability of the sensitivity signal ===")
    stable = stability(args, range(args.seeds), tasks)

    # the table: mean (sd) over seeds
    rows = []
    for rule, budget in runs:
        rs = [results[rule, seed] for seed in range(args.seeds)]
        label = "uniform (= plain LoRA)" if rule == "uniform" and budget == n_candidates else rule
        rows.append({"rule": label, "experts": budget, "trainable": rs[0]["parameters"]["trainable"],
                     "accuracy": {t: mean_sd([r["accuracy"][t] for r in rs]) for t in tasks},
                     "mean": mean_sd([r["mean"] for r in rs]),
                     "finetune_s": statistics.fmean(r["times_s"]["finetune"] for r in rs),
                     "allocation_seed0": rs[0]["allocation"]})
    lines = [f"{'rule':<24} {'experts':>7} {'trainable':>9} " + " ".join(f"{t:>11}" for t in tasks)
             + f" {'mean':>11} {'finetune':>9}"]
    for row in rows:
        lines.append(f"{row['rule']:<24} {row['experts']:>7} {row['trainable']:>9,} "
                     + " ".join(f"{m:.3f}±{s:.3f}" for m, s in (row["accuracy"][t] for t in tasks))
                     + f" {row['mean'][0]:.3f}±{row['mean'][1]:.3f} {row['finetune_s']:>8.1f}s")
    lines.append(f"(held-out exact match, mean ± sd over seeds 0..{args.seeds - 1}; {args.steps} steps; "
                 f"fine-tuning time per run)")
    lines.append(f"\nsensitivity from {stable['few_batches']} vs {stable['many_batches']} batches per task:")
    for s in stable["per_seed"]:
        lines.append(f"  seed {s['seed']}: Spearman " + " ".join(f"{t} {v:.2f}" for t, v in s["spearman"].items())
                     + f"; allocation overlap {s['overlap']:.2f} (chance {s['chance_overlap']:.2f})")
    total = time.time() - t_start
    lines.append(f"\ntotal time {total / 60:.1f} min")
    tqdm.write("\n" + "\n".join(lines))
    summary = {"settings": vars(args), "rows": rows, "stability": stable, "total_s": total, "table": lines}
    train.write_json(os.path.join(args.out, "compare.json"), summary)


if __name__ == "__main__":
    main()
