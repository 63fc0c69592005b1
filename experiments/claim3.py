"""
The test of the paper's claim on the toy by experiments/PROTOCOL3.md: every arm at its own learning
rate, chosen by one rule on tuning bases and a validation half of the held-out inputs; then the gate,
P1, P2 and P3 (Holm over the three) and the secondary comparisons on test bases and the other half.

Run from the repository root:  python experiments/claim3.py     (148 runs, about 75 minutes of 2 cores)
Every run is `python train.py` with train.py's defaults and the arm's flags, one thread, two at a time.
out/claim3/runs.json is rewritten after every run, and a stopped test continues where it stopped when
run again. The report prints at the end and goes to out/claim3/report.txt.
"""

import argparse
import concurrent.futures
import json
import os
import random
import statistics
import subprocess
import sys
import zlib

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: smoe, data
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402
from runs import TRAIN_PY, load_base  # noqa: E402
from smoe import allocate_experts, load_adapter  # noqa: E402
from stats import T_975, holm, noninferiority_p, spearman, t_test  # noqa: E402

T, M, RANK = 4, 16, 2  # 4 tasks, 16 candidates (v_proj and up_proj of 8 layers), the rank of PROTOCOL2's gate
DELTA = 0.02  # the smallest effect worth caring about, in mean exact match
GATE_GAIN, CEILING = 0.03, 0.95
RATES = (3e-3, 1e-2, 3e-2)
TUNING_BASES, TEST_BASES = (90, 91), tuple(range(100, 116))
PRIMARY_ARMS = ("plain", "uniform2", "uniform4", "smoe", "random", "smoe60")
SECONDARY_ARMS = {"smoe_params": "smoe"}  # a secondary arm runs at the rate of the primary arm it varies
EVAL_POOL = 400  # held-out pairs drawn per task before the split (add has 88)


def halves(task):
    """The task's held-out pairs split in two by their input's CRC-32: "validation" (tuning) and "test"."""
    pairs = data.eval_set(task, EVAL_POOL)
    split = {"validation": [], "test": []}
    for prompt, ans in pairs:
        split["validation" if zlib.crc32(prompt[1:-1].encode()) // data.EVAL_MOD % 2 == 0 else "test"].append((prompt, ans))
    return split


def trainable(allocation, shapes, r=RANK):
    """Trainable parameters of an allocation: each expert's A and B, r * (in + out), and a router of
    in x E where E >= 2; shapes {name: (out, in)}. Uniform x2 on the toy: v_proj (64, 64) 2 * 2 * 128 + 128
    and up_proj (128, 64) 2 * 2 * 192 + 128 in each of 8 layers, 8 * (640 + 896) = 12,288."""
    return sum(n * r * (o + i) + (n * i if n >= 2 else 0) for name, n in allocation.items() for o, i in [shapes[name]])


def choose_rate(cells):
    """PROTOCOL3.md's rule for an arm's learning rate: the highest mean validation exact match over the tuning
    units, a tie going to the lower mean validation loss. cells {rate: [(exact match, loss) of each tuning unit]}.
    Example: {3e-4: [(0.5, 0.9)], 1e-3: [(0.7, 0.8)], 3e-3: [(0.7, 0.6)]} -> 3e-3 (0.7 ties; loss 0.6 < 0.8)."""
    return max(cells, key=lambda lr: (statistics.mean(m for m, _ in cells[lr]), -statistics.mean(x for _, x in cells[lr])))


def flags(arm, lr):
    return {"plain": ["--alloc", "uniform", "--budget", str(M)],
            "uniform2": ["--alloc", "uniform", "--budget", str(2 * M)],
            "uniform4": ["--alloc", "uniform", "--budget", str(T * M)],
            "smoe": ["--budget", str(2 * M)],
            "smoe60": ["--budget", str(round(0.6 * T * M))]}.get(arm, []) + [
        "--rank", str(RANK), "--lr", str(lr), "--eval-every", "1500", "--eval-examples", "8"]


def judge(name, mean, half, p_holm):
    """One primary comparison's outcome by PROTOCOL3.md: P3 tests non-inferiority, P1 and P2 a gain."""
    if name == "P3":
        return "non-inferior" if p_holm < 0.05 else "inferior" if mean + half < -DELTA else "undecided"
    return "better" if mean > 0 and p_holm < 0.05 else f"a gain of {DELTA} or more ruled out" if mean + half < DELTA else "undecided"


def verdict(gate, outcome):
    """PROTOCOL3.md's verdict from the gate and {"P1": outcome, "P2": ..., "P3": ...}."""
    if not gate:
        return "no verdict"
    if outcome["P1"] == outcome["P2"] == "better" and outcome["P3"] == "non-inferior":
        return "supported"
    if any(o.endswith("ruled out") or o == "inferior" for o in outcome.values()):
        return "refuted"
    return "inconclusive"


def main():
    p = argparse.ArgumentParser(description="The paper's claim on the toy, as experiments/PROTOCOL3.md says.")
    p.add_argument("--out", default=os.path.join("out", "claim3"), help="output folder (default out/claim3)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each (default 2)")
    p.add_argument("--tuning-bases", type=int, nargs="+", default=TUNING_BASES, help="tuning base seeds (default 90 91)")
    p.add_argument("--test-bases", type=int, nargs="+", default=TEST_BASES, help="test base seeds (default 100-115)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags for every train.py run (tiny checks only)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "runs.json")
    runs = json.load(open(path)) if os.path.exists(path) else []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    cache = os.path.join(args.out, "bases")
    split = {t: halves(t) for t in data.TASKS}

    def find(arm, base, lr=None):
        return next((r for r in runs if r["arm"] == arm and r["base"] == base and lr in (None, r["lr"])), None)

    def score(out, res, half):
        """{task: exact match} and {task: mean answer cross-entropy} on one half of the held-out pairs."""
        model = load_adapter(load_base(res), torch.load(os.path.join(out, "adapter.pt"), weights_only=True)).eval()
        sets = {t: split[t][half] for t in data.TASKS}
        acc = data.exact_match(data.answers(model, sets), sets)
        with torch.no_grad():
            ce = {t: data.example_losses(model, data.encode(sets[t])).mean().item() for t in data.TASKS}
        return acc, ce

    def run(stage, arm, lr, base):
        done = find(arm, base, lr)
        if done:
            return done
        out = os.path.join(args.out, f"{stage}-{arm}-lr{lr:g}-base{base}")
        os.makedirs(out, exist_ok=True)
        argv = flags(arm, lr) + ["--base-seed", str(base), "--seed", "0", "--cache", cache]
        if arm in ("random", "smoe_params"):  # from the same base's LoRA-SMoE run: its scores and counts
            smoe = find("smoe", base)
            if arm == "random":  # its counts shuffled over the candidates, a shuffle of its own per base
                counts = list(smoe["allocation"].values())
                random.Random(f"random-{base}").shuffle(counts)
                allocation = dict(zip(smoe["allocation"], counts))
            else:  # the largest budget whose trainable parameters are at most uniform x2's
                even = trainable(dict.fromkeys(smoe["allocation"], 2), smoe["shapes"])
                budget = max(b for b in range(1, T * M + 1) if trainable(allocate_experts(smoe["sensitivity"], b), smoe["shapes"]) <= even)
                allocation = allocate_experts(smoe["sensitivity"], budget)
            with open(os.path.join(out, "allocation.in.json"), "w") as f:
                json.dump(allocation, f)
            argv += ["--allocation", os.path.join(out, "allocation.in.json")]
        with open(os.path.join(out, "log.txt"), "w") as log:
            rc = subprocess.run([sys.executable, TRAIN_PY, *argv, *args.extra, "--out", out], stdout=log,
                                stderr=subprocess.STDOUT, env=env).returncode
        diverged = rc != 0 and "the loss is" in open(os.path.join(out, "log.txt")).read()
        if rc != 0 and not diverged:
            raise RuntimeError(f"train.py {' '.join(argv)} failed (exit {rc}); its output is in {os.path.join(out, 'log.txt')}")
        half = "validation" if stage == "tuning" else "test"
        record = {"stage": stage, "arm": arm, "lr": lr, "base": base, "half": half, "diverged": diverged}
        if diverged:  # a run that stopped on a non-finite loss scores 0 on every task; nothing to evaluate
            record |= {"accuracy": dict.fromkeys(data.TASKS, 0.0), "mean": 0.0, "ce": None}
        else:
            res = json.load(open(os.path.join(out, "results.json")))
            every = {n: 0 for n in (res["sensitivity"] or {}).get(data.TASKS[0], {})} | res["allocation"]
            shapes = {n: list(load_base(res).get_submodule(n).weight.shape) for n in every}
            acc, ce = score(out, res, half)
            record |= {"accuracy": acc, "mean": statistics.mean(acc.values()), "ce": ce,
                       "experts": sum(res["allocation"].values()), "trainable": res["parameters"]["trainable"],
                       "allocation": every, "sensitivity": res["sensitivity"], "shapes": shapes,
                       "seconds": res["times_s"]["total"]}
        runs.append(record)
        with open(path + ".tmp", "w") as f:
            json.dump(runs, f, indent=1)
        os.replace(path + ".tmp", path)
        print(f"{stage:>6} {arm:>11} lr {lr:g} base {base}: {record['half']} mean {record['mean']:.3f} "
              f"({', '.join(f'{t} {a:.2f}' for t, a in record['accuracy'].items())})"
              + (" DIVERGED" if diverged else f", {record['trainable']:,} trainable"), flush=True)
        return record

    def all_of(stage, jobs, bases):
        """Every job on every base, a base's jobs in order: jobs[0], LoRA-SMoE, pretrains the base, and random and
        smoe_params read its scores. A stopped test leaves whole bases behind it."""
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda b: [run(stage, *job, b) for job in jobs], bases))

    report = []
    say = lambda line="": (print(line, flush=True), report.append(line))  # noqa: E731

    # Stage 1: each primary arm's rate, the highest mean validation exact match over the tuning bases
    all_of("tuning", [("smoe", lr) for lr in RATES] + [(a, lr) for a in PRIMARY_ARMS if a != "smoe" for lr in RATES], args.tuning_bases)
    say("Stage 1, tuning: mean validation exact match over base seeds " + ", ".join(map(str, args.tuning_bases))
        + " (ties: the lower validation cross-entropy)")
    rate = {}
    for arm in PRIMARY_ARMS:
        cells = {lr: [(r["mean"], statistics.mean(r["ce"].values()) if r["ce"] else float("inf"))
                      for r in (find(arm, b, lr) for b in args.tuning_bases)] for lr in RATES}
        rate[arm] = choose_rate(cells)
        say(f"  {arm:>11}: " + ", ".join(f"lr {lr:g} {statistics.mean(m for m, _ in c):.3f} (ce {statistics.mean(x for _, x in c):.3f})"
                                         for lr, c in cells.items()) + f" -> {rate[arm]:g}")
    rate |= {arm: rate[of] for arm, of in SECONDARY_ARMS.items()}

    # Stage 2: the test bases, each arm at its rate, scored on the test half
    arms = list(PRIMARY_ARMS) + list(SECONDARY_ARMS)
    all_of("test", [("smoe", rate["smoe"])] + [(a, rate[a]) for a in arms if a != "smoe"], args.test_bases)
    test = {(r["arm"], r["base"]): r for r in runs if r["stage"] == "test" and r["lr"] == rate[r["arm"]]}

    def diff(a, b):
        return [test[a, base]["mean"] - test[b, base]["mean"] for base in args.test_bases]

    say(f"\nStage 2, test: mean exact match on the test half, base seeds {args.test_bases[0]}-{args.test_bases[-1]}, each arm at its rate")
    say("  base  " + " ".join(f"{a:>11}" for a in arms))
    for base in args.test_bases:
        say(f"  {base:<5} " + " ".join(f"{test[a, base]['mean']:>11.3f}" for a in arms))
    say("  mean  " + " ".join(f"{statistics.mean(test[a, b]['mean'] for b in args.test_bases):>11.3f}" for a in arms))
    say("  trainable parameters (mean over bases, min-max): " + "; ".join(
        f"{a} {statistics.mean(v):,.0f} ({min(v):,}-{max(v):,})" for a in arms
        for v in [[test[a, b]["trainable"] for b in args.test_bases if not test[a, b]["diverged"]] or [0]]))
    say("  diverged runs: " + (", ".join(f"{a} base {b}" for (a, b), r in test.items() if r["diverged"]) or "none"))

    gain, half, _ = t_test(diff("uniform4", "plain"))
    plain = statistics.mean(test["plain", b]["mean"] for b in args.test_bases)
    gate = gain >= GATE_GAIN and gain - half > 0 and plain <= CEILING
    say(f"\nGate: uniform x4 - plain LoRA {gain:+.3f} [{gain - half:+.3f}, {gain + half:+.3f}], plain LoRA {plain:.3f}: "
        + ("passes" if gate else "fails"))
    primary = [("P1", "smoe", "uniform2"), ("P2", "smoe", "random"), ("P3", "smoe60", "uniform4")]
    tests = [t_test(diff(a, b)) for _, a, b in primary]
    p_values = [tests[0][2], tests[1][2], noninferiority_p(diff("smoe60", "uniform4"), DELTA)]
    adjusted = holm(p_values)
    say("Primary (paired difference over the test bases, 95 % t interval, p and Holm-adjusted p;"
        f" P1, P2: two-sided, mean 0; P3: one-sided, mean <= -{DELTA}):")
    outcome = {name: judge(name, mean, half, p_holm) for (name, _, _), (mean, half, _), p_holm in zip(primary, tests, adjusted)}
    for (name, a, b), (mean, half, _), p_raw, p_holm in zip(primary, tests, p_values, adjusted):
        say(f"  {name} {a} - {b}: {mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}], half-width {half:.3f}, "
            f"p {p_raw:.3f}, Holm {p_holm:.3f}: {outcome[name]}")
    say(f"Verdict: {verdict(gate, outcome)}")
    sds = {name: statistics.stdev(diff(a, b)) for name, a, b in primary}
    say("  per-base sd of the differences: " + ", ".join(f"{k} {v:.3f}" for k, v in sds.items())
        + f"; the design's half-width at sd s: {T_975[len(args.test_bases) - 1] / len(args.test_bases) ** 0.5:.3f} x s")

    say("\nSecondary (no correction):")
    for a, b in [("smoe_params", "uniform2"), ("smoe", "plain"), ("uniform2", "plain"), ("smoe60", "smoe")]:
        mean, half, p_value = t_test(diff(a, b))
        say(f"  {a} - {b}: {mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}], p {p_value:.3f}")
    say("  per task, P1 smoe - uniform2: " + ", ".join(
        f"{t} {statistics.mean(test['smoe', b]['accuracy'][t] - test['uniform2', b]['accuracy'][t] for b in args.test_bases):+.3f}"
        for t in data.TASKS))
    ok = [b for b in args.test_bases if all(test[a, b]["ce"] for _, *pair in primary for a in pair)]
    say(f"  held-out answer cross-entropy, mean over tasks ({len(ok)} bases without a diverged run; lower is better): "
        + ", ".join(f"{name} {statistics.mean(statistics.mean(test[a, b]['ce'].values()) - statistics.mean(test[c, b]['ce'].values()) for b in ok):+.3f}"
                    for name, a, c in primary))
    say("Do the tasks rank the matrices alike? Spearman correlation of two tasks' scores, median over the test bases:")
    tasks = list(data.TASKS)
    say("  " + ", ".join(f"{t}/{u} {statistics.median(spearman(list(test['smoe', b]['sensitivity'][t].values()), list(test['smoe', b]['sensitivity'][u].values())) for b in args.test_bases):.2f}"
                         for i, t in enumerate(tasks) for u in tasks[i + 1:]))
    with open(os.path.join(args.out, "report.txt"), "w") as f:
        f.write("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
