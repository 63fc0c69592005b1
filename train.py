"""
LoRA-SMoE on the toy tasks of data.py, every step in plain sight, top to bottom: the pretrained base, each task's
sensitivity to each candidate matrix, the budgeted allocation, the LoRA-MoE layers, fine-tuning with
loss = ce + aux_coef * aux, evaluation, saving.

    python train.py --budget 16                          the whole run (python train.py --help lists the flags)
    python train.py --out out --resume                   continue a stopped run from out/checkpoint.pt
    python sample.py --out out --prompt A7+48=           ask the finished run (sample.py --help)
    torchrun --nproc_per_node=2 train.py --budget 16     one process per device, as nanoGPT

Writes to --out: allocation.json, results.json, adapter.pt and checkpoint.pt (every --checkpoint-every steps, at
the end, and on Ctrl-C or SIGTERM). The base is looked up by its recipe's hash: first in base/, which keeps the
default one (base seed 0, pretrained by `OMP_NUM_THREADS=1 python train.py`), so that it is the same on every
machine; then in --cache (default --out); else it is pretrained here and cached there.
"""

import argparse
import hashlib
import json
import math
import os
import random
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
from smoe import (GPT, GPTConfig, adapter_state, allocate_experts, allocate_uniform, apply_lora_moe, candidate_names,
                  compute_sensitivity, moe_aux_loss, moe_layers, normalise_per_layer)

MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
PRETRAIN_BATCH, PRETRAIN_LR = 32, 1e-3
KEPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "base")  # bases kept in the repository


def number(kind, low, strict=False):
    """An argparse type: a `kind` >= low (> low if strict), else argparse's one-line error."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"expected a {'whole ' if kind is int else ''}number {'>' if strict else '>='} {low}, got {text!r}")
        return value
    return parse


def names(allowed):
    """An argparse type: a comma-separated list of distinct names from `allowed`."""
    def parse(text):
        got = [t for t in text.split(",") if t]
        if not got or any(t not in allowed for t in got) or len(set(got)) < len(got):
            raise argparse.ArgumentTypeError(f"expected distinct names from {','.join(allowed)}, got {text!r}")
        return got
    return parse


def device_name(text):
    """An argparse type: auto (cuda, then mps, then cpu) or a device this PyTorch build and machine can use."""
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(text)
    except RuntimeError:  # a name torch does not know
        device = None
    usable = device is not None and {"cpu": True, "mps": torch.backends.mps.is_available(),
                                     "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()}.get(device.type)
    if not usable:
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps that this PyTorch build "
                                         f"({torch.__version__}) can use here, got {text!r}")
    return text


# The flags and their defaults (python train.py --help); the checks that need several of them follow
p = argparse.ArgumentParser(usage="python train.py [flags]; python train.py --help lists them; python sample.py asks a finished run",
                            description="LoRA-SMoE on toy tasks: sensitivity, allocation, LoRA-MoE fine-tuning.")
p.add_argument("--budget", type=number(int, 1), help="experts to spend over the candidate matrices (default: one per candidate, plain LoRA's count)")
p.add_argument("--alloc", choices=("sensitivity", "uniform"), default="sensitivity", help="sensitivity: each task votes for its "
               "most sensitive matrices (LoRA-SMoE); uniform: the same count everywhere (plain LoRA at budget = candidates)")
p.add_argument("--allocation", metavar="FILE", help="a JSON file {matrix: experts}, as allocation.json, used instead of --alloc")
p.add_argument("--top-k", type=number(int, 1), default=2, help="experts each token uses per matrix (default 2)")
p.add_argument("--rank", type=number(int, 1), default=8, help="LoRA rank r of every expert (default 8)")
p.add_argument("--alpha", type=number(float, 0, strict=True), default=16.0, help="LoRA alpha; scaling = alpha / rank (default 16)")
p.add_argument("--aux-coef", type=number(float, 0), default=0.01, help="weight of the balancing loss (default 0.01)")
p.add_argument("--sens-batches", type=number(int, 1), default=4, help="batches per task for the sensitivity (default 4)")
p.add_argument("--sens-norm", choices=("none", "layer"), default="none", help="layer: each score as a share of its task's total within its layer (default none)")
p.add_argument("--tasks", type=names(data.TASKS), default=list(data.TASKS), help="comma-separated tasks (default all)")
p.add_argument("--targets", type=names(MATRICES), default=["v_proj", "up_proj"],
               help=f"comma-separated candidate matrices of every layer, from {','.join(MATRICES)} (default v_proj,up_proj)")
p.add_argument("--steps", type=number(int, 1), default=1500, help="fine-tuning steps (default 1500)")
p.add_argument("--pretrain-steps", type=number(int, 1), default=2000, help="pretraining steps of the base (default 2000)")
p.add_argument("--batch-size", type=number(int, 1), default=32, help="examples per batch (default 32)")
p.add_argument("--lr", type=number(float, 0, strict=True), default=1e-2, help="peak learning rate, cosine-decayed (default 1e-2)")
p.add_argument("--eval-every", type=number(int, 1), default=500, help="evaluate every N steps and at the end (default 500)")
p.add_argument("--eval-examples", type=number(int, 1), default=200, help="held-out examples per task, at most all it has (default 200; add has 88)")
p.add_argument("--seed", type=number(int, 0), default=0, help="seed of sampling and adapter initialisation (default 0)")
p.add_argument("--base-seed", type=number(int, 0), default=0, help="seed of the pretrained base (default 0; at the default pretraining, the base kept in base/)")
p.add_argument("--device", type=device_name, default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
p.add_argument("--out", default="out", help="output folder (default out)")
p.add_argument("--cache", help="folder of the pretrained-base cache (default: --out)")
p.add_argument("--checkpoint-every", type=number(int, 1), default=500, help="steps between checkpoints (default 500)")
p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint, with its settings")
args = p.parse_args()

if args.allocation is not None:  # the file's allocation replaces steps 2 and 3
    try:
        with open(args.allocation) as f:
            args.allocation = json.load(f)
    except (OSError, ValueError) as e:
        p.error(f"--allocation: {e}")
    if not isinstance(args.allocation, dict) or not all(isinstance(n, int) and n >= 0 for n in args.allocation.values()):
        p.error("--allocation: expected a JSON object {matrix name: whole number of experts >= 0}")
# --resume: the stopped run's settings, sensitivity and allocation here; its adapter, optimizer and step in step 5
ckpt_path, ckpt, sensitivity, allocation = os.path.join(args.out, "checkpoint.pt"), None, None, None
if args.resume:
    if not os.path.isfile(ckpt_path):
        p.error(f"--resume: {ckpt_path} does not exist")
    try:
        ckpt = torch.load(ckpt_path, weights_only=True)
    except Exception as e:
        p.error(f"--resume: {ckpt_path} cannot be read ({type(e).__name__})")
    for k, v in ckpt["config"].items():  # a flag given again must agree with the run's
        if getattr(args, k) not in (p.get_default(k), v):
            p.error(f"--resume: --{k.replace('_', '-')} {getattr(args, k)} differs from the checkpoint's {v}")
        setattr(args, k, v)
    sensitivity, allocation = ckpt["sensitivity"], ckpt["adapter"]["allocation"]
# the model, the budget's bounds, and the base's recipe: its cache name and what --resume checks
cfg = GPTConfig(vocab_size=len(data.VOCAB), block_size=data.BLOCK_SIZE)
M = cfg.n_layer * len(args.targets)  # candidate matrices
if args.budget and args.allocation is None and args.alloc == "sensitivity" and args.budget > len(args.tasks) * M:
    p.error(f"--budget: at most tasks x candidate matrices = {len(args.tasks)} x {M} = {len(args.tasks) * M}, got {args.budget}")
if args.budget and args.allocation is None and args.alloc == "uniform" and args.budget % M:
    p.error(f"--budget: a uniform allocation needs a multiple of the {M} candidate matrices, got {args.budget}")
base_key = json.dumps({"model": vars(cfg), "seed": args.base_seed, "steps": args.pretrain_steps, "batch": PRETRAIN_BATCH,
                       "lr": PRETRAIN_LR, "data": [data.sample(t, random.Random(i), "train") for t in data.PRETRAIN_TASKS for i in range(8)]})
base_name, cache = f"base-{hashlib.sha1(base_key.encode()).hexdigest()[:12]}.pt", args.cache or args.out
base_path = os.path.join(KEPT if os.path.exists(os.path.join(KEPT, base_name)) else cache, base_name)
if ckpt and ckpt["base_key"] != base_key:
    p.error(f"--resume: {ckpt_path} was made on another pretrained base (another version of the toy); start a new run")
# one process, or under torchrun one per device as nanoGPT; Ctrl-C and SIGTERM; the output folders
device = torch.device(args.device)
ddp = "RANK" in os.environ  # under torchrun: one process per device, rank 0 prints and writes
if ddp:
    if args.resume:
        p.error("--resume continues single-process runs; run it without torchrun")
    if device.type == "cuda":
        device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}")
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
rank = dist.get_rank() if ddp else 0
master = rank == 0
say = tqdm.write if master else lambda *a: None
stop = []  # Ctrl-C or SIGTERM asks the loops to stop between steps; fine-tuning saves its checkpoint first
if not ddp:
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda signum, frame: stop.append(signum))
try:
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(cache, exist_ok=True)
except OSError as e:
    p.error(f"--out or --cache: {e}")


def save(obj, path):
    """torch.save (or JSON for .json) to a temporary file, then rename: a file is written whole or not at all."""
    if path.endswith(".json"):
        with open(path + ".tmp", "w") as f:
            json.dump(obj, f, indent=1)
    else:
        torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def say_grid(tables):
    """{"layers.3.attn.v_proj": text} tables side by side as layer x matrix grids, each row after its layer number."""
    say("   layer " + " | ".join(" ".join(f"{m.removesuffix('_proj'):>4}" for m in args.targets) for _ in tables))
    for i in range(cfg.n_layer):
        rows = [{n.rsplit(".", 1)[1]: v for n, v in t.items() if n.startswith(f"layers.{i}.")} for t in tables]
        say(f"   {i:>5} " + " | ".join(" ".join(f"{row.get(m, 0):>4}" for m in args.targets) for row in rows))


t0 = time.time()
times = {}

# -----------------------------------------------------------------------------
# 1. The pretrained base: copy and digit sums; the kept or cached one when there is one for these flags

torch.manual_seed(args.base_seed)
model = GPT(cfg).to(device)
if ddp and not master:
    dist.barrier()  # rank 0 pretrains and caches the base first
loaded = False
if os.path.exists(base_path):
    try:
        model.load_state_dict(torch.load(base_path, weights_only=True)["model"])
        loaded = True
        say(f"1. loaded the pretrained base model {'kept in' if base_path.startswith(KEPT) else 'cached in'} {os.path.relpath(base_path)}")
    except Exception as e:
        say(f"   {base_path} cannot be read ({type(e).__name__}); pretraining the base again")
if not loaded:
    base_path = os.path.join(cache, base_name)  # never over a kept base
    say(f"1. pretraining the base model on {' and '.join(data.PRETRAIN_TASKS)} ({args.pretrain_steps} steps)")
    rng = random.Random(f"pretrain-{args.base_seed}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.0)
    for step in (bar := tqdm(range(args.pretrain_steps), "pretrain", disable=not master)):
        x, y = data.get_batch(data.PRETRAIN_TASKS, PRETRAIN_BATCH, rng)
        _, loss = model(x.to(device), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if stop:
            print(f"train.py: pretraining stopped at step {step + 1} of {args.pretrain_steps}; nothing was cached", file=sys.stderr)
            sys.exit(128 + stop[0])
    if master:
        save({"key": base_key, "model": model.state_dict()}, base_path)
if ddp and master:
    dist.barrier()
times["base"] = time.time() - t0
eval_sets = {t: data.eval_set(t, args.eval_examples) for t in args.tasks}
base_answers = data.answers(model, eval_sets)
base_acc = data.exact_match(base_answers, eval_sets)
weights = b"".join(w.cpu().numpy().tobytes() for _, w in sorted(model.state_dict().items()))  # in name order
base_fingerprint = hashlib.sha256(weights).hexdigest()[:12]  # which base this is, at a glance
say(f"   fingerprint {base_fingerprint}; held-out exact match " + ", ".join(f"{t} {a:.2f}" for t, a in base_acc.items()))

# -----------------------------------------------------------------------------
# 2. Sensitivity S_t(W) = sum over sampled examples x of task t of ||d l(x)/dW||_F^2, on the frozen base weights

torch.manual_seed(args.seed)
candidates = candidate_names(model, args.targets)
if sensitivity is None and args.allocation is None and args.alloc == "sensitivity":
    t1 = time.time()
    rng = random.Random(f"sensitivity-{args.seed}-{rank}")  # each rank its own batches; the scores add up over ranks
    batches = {t: [data.get_batch([t], args.batch_size, rng) for _ in range(args.sens_batches)] for t in args.tasks}
    sensitivity = compute_sensitivity(model, batches, data.example_losses, candidates)
    if ddp:
        scores = torch.tensor([[s[n] for n in candidates] for s in sensitivity.values()], dtype=torch.float64, device=device)
        dist.all_reduce(scores)
        sensitivity = {t: dict(zip(candidates, row)) for t, row in zip(sensitivity, scores.tolist())}
    if args.sens_norm == "layer":
        sensitivity = normalise_per_layer(sensitivity)
    times["sensitivity"] = time.time() - t1
if sensitivity is None:
    say(f"2. sensitivity: not measured, {'--allocation' if args.allocation is not None else 'the uniform allocation'} does not use it")
else:
    say(f"2. sensitivity of the {len(candidates)} candidate matrices to each task, from {args.sens_batches} batches of "
        f"{args.batch_size} per task{' (read from the checkpoint)' if ckpt else ''}; each task's scores as % of its total (read across: a layer; down: depth)")
    width = 5 * len(args.targets) - 1
    say(("         " + " | ".join(f"{t:<{width}}" for t in sensitivity)).rstrip())
    say_grid([{n: f"{100 * v / sum(s.values()):.0f}" for n, v in s.items()} for s in sensitivity.values()])

# -----------------------------------------------------------------------------
# 3. Allocation: {matrix: experts}, spending exactly the budget

if allocation is None and args.allocation is not None:
    unknown = set(args.allocation) - set(candidates)
    if unknown:
        p.error(f"--allocation names {sorted(unknown)[0]}, not one of the candidate matrices (--targets)")
    allocation = {n: args.allocation.get(n, 0) for n in candidates}
    if args.budget not in (None, sum(allocation.values())):
        p.error(f"--budget {args.budget} differs from the {sum(allocation.values())} experts of --allocation")
elif allocation is None:
    budget = args.budget or M
    allocation = allocate_experts(sensitivity, budget) if args.alloc == "sensitivity" else allocate_uniform(candidates, budget)
args.budget = sum(allocation.values())
if args.budget == 0:
    p.error("the allocation spends no experts: nothing would train")
say(f"3. {args.alloc if args.allocation is None else 'file'} allocation of {args.budget} experts over {len(candidates)} candidate "
    "matrices (experts per matrix; 0: no adapter, the matrix stays frozen):")
say_grid([allocation])
allocation = {n: e for n, e in allocation.items() if e > 0}
if master:
    save(allocation, os.path.join(args.out, "allocation.json"))

# -----------------------------------------------------------------------------
# 4. LoRA-MoE layers on the allocated matrices; every other weight stays frozen

model = apply_lora_moe(model, allocation, r=args.rank, lora_alpha=args.alpha, top_k=args.top_k)
trainable = [p for p in model.parameters() if p.requires_grad]
parameters = {"total": sum(p.numel() for p in model.parameters()), "trainable": sum(p.numel() for p in trainable),
              "plain_lora": sum(args.rank * sum(model.get_submodule(n).weight.shape) for n in candidates)}
say(f"4. {parameters['trainable']:,} trainable parameters (LoRA A and B of every expert, and a router where a matrix "
    f"has 2 or more experts) of {parameters['total']:,}; plain LoRA r={args.rank} on all {len(candidates)} candidates: "
    f"{parameters['plain_lora']:,}")

# -----------------------------------------------------------------------------
# 5. Fine-tuning on the mixture of tasks: loss = ce + aux_coef * aux

say(f"5. fine-tuning for {args.steps} steps on batches of {args.batch_size} mixing {', '.join(args.tasks)}; ce: the "
    "cross-entropy of the answers; aux: the balancing loss, 1 when each router spreads its tokens evenly")
t1 = time.time()
optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
rng = random.Random(f"finetune-{args.seed}-{rank}")
start, history = 0, []
if ckpt:
    model.load_state_dict(ckpt["adapter"]["adapter"], strict=False)
    optimizer.load_state_dict(ckpt["optimizer"])
    rng.setstate(ckpt["rng"])
    start, history = ckpt["step"], ckpt["history"]
    say(f"   resuming from {ckpt_path} after step {start}")
ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if ddp else model
for step in (bar := tqdm(range(start, args.steps), "fine-tune", initial=start, total=args.steps, disable=not master)):
    for group in optimizer.param_groups:
        group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))  # cosine decay to 0
    x, y = (t.to(device) for t in data.get_batch(args.tasks, args.batch_size, rng))
    _, ce = ddp_model(x, y)
    aux = moe_aux_loss(model, mask=x != data.STOI[data.PAD])  # balancing loss over the real tokens, not the padding
    loss = ce + args.aux_coef * aux
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    done = step + 1
    if step % 25 == 0 or done % args.checkpoint_every == 0 or done == args.steps or stop:  # .item() waits for the device
        if not math.isfinite(loss.item()):
            sys.exit(f"train.py: the loss is {loss.item()} at step {done}; stopped before saving (try a smaller --lr)")
        bar.set_postfix(ce=f"{ce.item():.3f}", aux=f"{aux.item():.3f}")
    if done % args.eval_every == 0 or done == args.steps:
        acc = data.exact_match(data.answers(model, eval_sets), eval_sets)
        history.append({"step": done, "ce": ce.item(), "aux": aux.item(), "accuracy": acc})
        say(f"   step {done}: ce {ce.item():.3f}, aux {aux.item():.3f}, held-out exact match "
            + ", ".join(f"{t} {a:.2f}" for t, a in acc.items()))
    if master and (done % args.checkpoint_every == 0 or done == args.steps or stop):
        config = {k: v for k, v in vars(args).items() if k not in ("out", "device", "resume")}
        save({"step": done, "config": config, "base_key": base_key, "sensitivity": sensitivity, "adapter": adapter_state(model),
              "optimizer": optimizer.state_dict(), "rng": rng.getstate(), "history": history}, ckpt_path)
    if stop:
        bar.close()
        print(f"train.py: stopped after step {done}; continue with: python train.py --out {args.out} --resume", file=sys.stderr)
        sys.exit(128 + stop[0])
times["fine-tune"] = time.time() - t1

# -----------------------------------------------------------------------------
# 6. Evaluation and saving

answers = data.answers(model, eval_sets)
acc = data.exact_match(answers, eval_sets)
table = data.table(eval_sets, args.eval_examples, base_answers, answers)
say("6. " + table[0])
for line in table[1:]:
    say("   " + line)
with torch.no_grad():  # each router's share of the held-out tokens per expert: a router sending all to one has collapsed
    x, _ = data.encode([pair for pairs in eval_sets.values() for pair in pairs])
    model(x.to(device))
    real = (x != data.STOI[data.PAD]).flatten().to(device)  # (N,) not padding
    routing = {n: (torch.bincount(m.top_idx[real].flatten(), minlength=m.num_experts) / (real.sum() * m.top_k)).tolist()
               for n, m in moe_layers(model) if m.top_k < m.num_experts}
if routing:
    say("   routing, share of held-out tokens per expert: " + "; ".join(
        f"{n.removeprefix('layers.').replace('.attn', '')} {' '.join(f'{s:.2f}' for s in shares)}" for n, shares in routing.items()))
if args.allocation is None and args.alloc == "sensitivity" and args.budget % M == 0:  # the same experts, spread evenly
    E = args.budget // M
    routers = E * sum(model.get_submodule(n).weight.shape[1] for n in candidates) if E > 1 else 0  # E x in per matrix
    even = E * parameters["plain_lora"] + routers
    same = [f"--{k.replace('_', '-')} {','.join(v) if isinstance(v, list) else v}" for k, v in vars(args).items()
            if k not in ("alloc", "budget", "out", "cache", "device", "resume") and v != p.get_default(k)]
    same += [f"--out {args.out.rstrip('/')}-uniform"] + ([] if base_path.startswith(KEPT) else [f"--cache {cache}"])
    say(f"   to compare, {'plain LoRA' if E == 1 else f'uniform LoRA-MoE x{E}'}: the same {args.budget} experts spread evenly, "
        f"{even:,} trainable parameters against these {parameters['trainable']:,}: "
        f"python train.py --alloc uniform --budget {args.budget} {' '.join(same)}")
times["total"] = time.time() - t0
say("   time: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
if master:
    results = {"config": vars(args), "model_config": vars(cfg), "base": base_path, "base_fingerprint": base_fingerprint,
               "allocation": allocation,
               "parameters": parameters, "sensitivity": sensitivity, "history": history, "base_accuracy": base_acc,
               "accuracy": acc, "mean": sum(acc.values()) / len(acc), "routing": routing, "times_s": times,
               "examples": {t: [{"prompt": p_, "expected": a, "base": base_answers[t][i], "tuned": answers[t][i]}
                                for i, (p_, a) in enumerate(pairs[:3])] for t, pairs in eval_sets.items()}}
    save(results, os.path.join(args.out, "results.json"))
    save(adapter_state(model), os.path.join(args.out, "adapter.pt"))
    say(f"   wrote allocation.json, results.json, adapter.pt and checkpoint.pt to {args.out}")
if ddp:
    dist.destroy_process_group()
