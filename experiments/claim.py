"""
The test of the paper's claim on the toy, carried out as experiments/PROTOCOL.md says: first the
gate from baselines only (plain LoRA against uniform LoRA-MoE x T, at ranks 2, 1, 4 until it
passes), then at the gate's rank the primary comparisons P1 (LoRA-SMoE against uniform LoRA-MoE
with the same experts) and P2 (LoRA-SMoE against the random shuffle of its own counts), Holm
over the two, and the secondary ones. Units: base seeds x fine-tuning seeds; intervals over the
bases' means.

Run from the repository root:  python experiments/claim.py              (--jobs 2 at a time, 1 thread each)
Every run is `python train.py` with train.py's defaults and the rule's flags; its folder holds its
log and results. out/claim/runs.json is rewritten after every run, and a stopped test continues
where it stopped when run again. The report prints at the end and goes to out/claim/report.txt.

PROTOCOL.md's own runs (experiments/README.md) were made on the toy of commit 40a5c64; on today's
toy, PROTOCOL2.md governs the same design, run as `python experiments/claim.py --out out/claim2`.
"""

import argparse
import concurrent.futures
import json
import os
import random
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: smoe
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runs import run_train  # noqa: E402
from stats import decide, holm, spearman, t_test  # noqa: E402

T, M = 4, 16  # train.py's defaults: 4 tasks, 16 candidate matrices (v_proj and up_proj of 8 layers)
DELTA = 0.02  # the smallest effect worth caring about, in mean held-out exact match
GATE_GAIN, CEILING = 0.03, 0.95


def flags(rule, rank):
    """train.py's flags for a rule at the gate's rank (random's allocation file is added by run())."""
    return {"plain": ["--alloc", "uniform", "--budget", str(M)],
            "uniform4": ["--alloc", "uniform", "--budget", str(T * M)],
            "uniform2": ["--alloc", "uniform", "--budget", str(2 * M)],
            "smoe": ["--budget", str(2 * M)],
            "random": [],
            "plain2r": ["--alloc", "uniform", "--budget", str(M), "--rank", str(2 * rank)],
            "smoe60": ["--budget", str(round(0.6 * T * M))]}[rule] + (["--rank", str(rank)] if rule != "plain2r" else [])


def by_base(runs, rule, reference, rank):
    """Each base's mean over its seeds of the paired difference rule - reference in mean exact match."""
    found = {}
    rule_runs = {(r["base"], r["seed"]): r["mean"] for r in runs if r["rule"] == rule and r["rank"] == rank}
    ref_runs = {(r["base"], r["seed"]): r["mean"] for r in runs if r["rule"] == reference and r["rank"] == rank}
    for unit in sorted(set(rule_runs) & set(ref_runs)):
        found.setdefault(unit[0], []).append(rule_runs[unit] - ref_runs[unit])
    return [statistics.mean(d) for d in found.values()]


def main():
    p = argparse.ArgumentParser(description="The paper's claim on the toy, as experiments/PROTOCOL.md says.")
    p.add_argument("--bases", type=int, nargs="+", default=[0, 1, 2, 3], help="base seeds (default 0 1 2 3)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="fine-tuning seeds (default 0)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each (default 2)")
    p.add_argument("--out", default=os.path.join("out", "claim"), help="output folder (default out/claim)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags for every train.py run (tiny checks only)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "runs.json")
    runs = json.load(open(path)) if os.path.exists(path) else []
    os.environ["OMP_NUM_THREADS"] = "1"
    cache = os.path.join(args.out, "bases")

    def run(rule, rank, base, seed):
        done = [r for r in runs if (r["rule"], r["rank"], r["base"], r["seed"]) == (rule, rank, base, seed)]
        if done:
            return done[0]
        out = os.path.join(args.out, f"{rule}-r{rank}-base{base}-seed{seed}")
        argv = flags(rule, rank) + ["--base-seed", str(base), "--seed", str(seed), "--cache", cache, *args.extra]
        if rule == "random":  # the same unit's LoRA-SMoE counts, shuffled over the candidates
            counts = next(r for r in runs if (r["rule"], r["rank"], r["base"], r["seed"]) == ("smoe", rank, base, seed))["allocation"]
            shuffled = list(counts.values())
            random.Random(seed).shuffle(shuffled)
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "allocation.in.json"), "w") as f:
                json.dump(dict(zip(counts, shuffled)), f)
            argv += ["--allocation", os.path.join(out, "allocation.in.json")]
        res = run_train(argv, out)
        every = {n: 0 for n in (res["sensitivity"] or {}).get(res["config"]["tasks"][0], {})} | res["allocation"]
        record = {"rule": rule, "rank": rank, "base": base, "seed": seed, "mean": res["mean"], "accuracy": res["accuracy"],
                  "experts": sum(res["allocation"].values()), "trainable": res["parameters"]["trainable"],
                  "allocation": every, "sensitivity": res["sensitivity"], "seconds": res["times_s"]["total"]}
        runs.append(record)
        with open(path + ".tmp", "w") as f:
            json.dump(runs, f, indent=1)
        os.replace(path + ".tmp", path)
        print(f"{rule:>8} r={rank} base {base} seed {seed}: mean {res['mean']:.3f} "
              f"({', '.join(f'{t} {a:.2f}' for t, a in res['accuracy'].items())}), {record['seconds']:.0f} s", flush=True)
        return record

    def all_of(rules, rank):
        units = [(b, s) for b in args.bases for s in args.seeds]
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:  # each base pretrained once, before its other runs
            list(pool.map(lambda b: run(rules[0], rank, b, args.seeds[0]), args.bases))
            list(pool.map(lambda job: run(*job), [(rule, rank, b, s) for rule in rules for b, s in units]))

    report = []
    say = lambda line="": (print(line), report.append(line))  # noqa: E731
    say("Step 1, the gate: uniform LoRA-MoE x4 minus plain LoRA, mean exact match, 95 % interval over the bases")
    rank = None
    for r in (2, 1, 4):
        all_of(["plain", "uniform4"], r)
        gain, half, p_value = t_test(by_base(runs, "uniform4", "plain", r))
        plain = statistics.mean(x["mean"] for x in runs if x["rule"] == "plain" and x["rank"] == r)
        passed = gain >= GATE_GAIN and gain - half > 0 and plain <= CEILING
        say(f"  rank {r}: {gain:+.3f} [{gain - half:+.3f}, {gain + half:+.3f}], plain LoRA {plain:.3f}: "
            + ("passes" if passed else "fails"))
        if passed:
            rank = r
            break
    if rank is None:
        say("Verdict: no verdict (the gate failed at every rank: uniform LoRA-MoE x4 did not beat plain LoRA by the margin)")
    else:
        all_of(["smoe"], rank)  # random shuffles smoe's counts, so smoe runs first
        all_of(["uniform2", "random", "plain2r", "smoe60"], rank)
        say(f"\nStep 2, at rank {rank}: per-unit mean exact match (base, seed)")
        rules = ["plain", "uniform4", "uniform2", "smoe", "random", "plain2r", "smoe60"]
        say("  unit     " + " ".join(f"{r:>8}" for r in rules))
        for b in args.bases:
            for s in args.seeds:
                row = {x["rule"]: x["mean"] for x in runs if x["rank"] == rank and (x["base"], x["seed"]) == (b, s)}
                say(f"  {b},{s}      " + " ".join(f"{row.get(r, float('nan')):>8.3f}" for r in rules))
        say("  trainable (seed 0 of base 0): " + ", ".join(
            f"{x['rule']} {x['trainable']:,}" for x in runs if x["rank"] == rank and (x["base"], x["seed"]) == (args.bases[0], args.seeds[0])))
        primary = [("P1", "smoe", "uniform2"), ("P2", "smoe", "random")]
        tests = [t_test(by_base(runs, a, b, rank)) for _, a, b in primary]
        adjusted = holm([t[2] for t in tests])
        say("\nPrimary (paired difference over the bases' means, 95 % t interval, Holm-adjusted p):")
        for (name, a, b), (mean, half, p_value), p_holm in zip(primary, tests, adjusted):
            better = mean > 0 and p_holm < 0.05
            ruled_out = mean + half < DELTA
            say(f"  {name} {a} - {b}: {mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}], p {p_value:.3f}, Holm {p_holm:.3f}"
                f"{', better' if better else ', worse' if mean < 0 and p_holm < 0.05 else ', no difference detected'}"
                f"{f', a gain of {DELTA} or more ruled out' if ruled_out else ''}")
        say("Secondary (no correction):")
        for a, b in [("smoe", "plain2r"), ("smoe60", "uniform4")]:
            mean, half, p_value = t_test(by_base(runs, a, b, rank))
            say(f"  {a} - {b}: {mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}], p {p_value:.3f}")
        say(f"Verdict: {decide(True, tests, adjusted, DELTA)}")
        say("\nDo the tasks rank the matrices alike? Spearman correlation of two tasks' scores over the candidates:")
        for b in args.bases:
            sens = next(x["sensitivity"] for x in runs if x["rule"] == "smoe" and x["rank"] == rank and x["base"] == b)
            tasks = list(sens)
            rhos = {f"{t}/{u}": spearman(list(sens[t].values()), list(sens[u].values()))
                    for i, t in enumerate(tasks) for u in tasks[i + 1:]}
            say(f"  base {b}: " + ", ".join(f"{k} {v:.2f}" for k, v in rhos.items()))
    with open(os.path.join(args.out, "report.txt"), "w") as f:
        f.write("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
