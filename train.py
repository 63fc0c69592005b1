"""
LoRA-SMoE end to end on the toy tasks of data.py, every phase in plain sight:

  1. pretrain a tiny base model on the copy task (or load it from the cache in --out)
  2. measure each task's sensitivity to each candidate matrix      (smoe.compute_sensitivity)
  3. allocate the expert budget by per-task votes                   (smoe.allocate_experts)
  4. wrap the chosen matrices in LoRA-MoE layers                    (smoe.apply_lora_moe)
  5. fine-tune on the task mixture with loss = ce + aux_coef * aux  (smoe.load_balancing_loss)
  6. report held-out exact match, routing statistics, times and memory

Run:  python train.py --budget 16        (python train.py --help for every flag)
Writes to --out: allocation.json, results.json, adapter.pt and the cached base model.

References: [1] LoRA-SMoE, arXiv 2505.06272; [2] LoRA, arXiv 2106.09685;
[3] Switch Transformers, arXiv 2101.03961. Method notes: README.md.
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import resource
import sys
import time

import torch
from tqdm import tqdm

import data
from smoe import (GPT, GPTConfig, adapter_state_dict, allocate_experts, apply_lora_moe, candidate_names,
                  compute_sensitivity, moe_aux_loss, moe_layers)

MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")  # what --targets may name

# -----------------------------------------------------------------------------
# Evaluation and reporting helpers


@torch.no_grad()
def evaluate(model, eval_sets, device):
    """Exact match of greedy decoding per task: {task: fraction of answers right, "." included}."""
    was_training = model.training
    model.eval()
    accuracy = {}
    for task, pairs in eval_sets.items():
        n = len(pairs)
        buf = torch.full((n, data.BLOCK_SIZE + 1), data.STOI[data.PAD], dtype=torch.long, device=device)
        pos = torch.tensor([len(p) for p, _ in pairs], device=device)  # next position to write, per example
        for i, (prompt, _) in enumerate(pairs):
            buf[i, :len(prompt)] = torch.tensor([data.STOI[c] for c in prompt])
        rows = torch.arange(n, device=device)
        for _ in range(max(len(a) for _, a in pairs)):
            # right padding is harmless: causal attention never looks past a position
            logits, _ = model(buf[:, :data.BLOCK_SIZE])              # (n, T, vocab)
            buf[rows, pos] = logits[rows, pos - 1].argmax(dim=-1)    # greedy next token
            pos = (pos + 1).clamp(max=data.BLOCK_SIZE)
        out = buf.tolist()
        correct = sum(data.decode(out[i][len(p):len(p) + len(a)]) == a for i, (p, a) in enumerate(pairs))
        accuracy[task] = correct / n
    model.train(was_training)
    return accuracy


@torch.no_grad()
def routing_stats(model, eval_sets, device):
    """Share of routing slots per expert and normalised entropy (1 = uniform, 0 = collapse)
    for every routing layer, over the held-out lines (no padding: lines are grouped by length)."""
    layers = [(name, m) for name, m in moe_layers(model) if m.router is not None]
    counts = {name: torch.zeros(m.num_experts, device=device) for name, m in layers}
    lines = [p + a for pairs in eval_sets.values() for p, a in pairs]
    for length in sorted(set(map(len, lines))):
        ids = torch.tensor([[data.STOI[c] for c in s] for s in lines if len(s) == length], device=device)
        model(ids[:, :-1])
        for name, m in layers:
            counts[name] += m.expert_counts
    stats = {}
    for name, m in layers:
        share = counts[name] / counts[name].sum()
        entropy = -(share * share.clamp_min(1e-12).log()).sum() / math.log(m.num_experts)
        stats[name] = {"share": [round(s, 3) for s in share.tolist()], "entropy": round(entropy.item(), 3)}
    return stats


def allocation_table(allocation, n_layer, targets):
    """The allocation as a small layer x matrix table of expert counts; names look like layers.{i}.attn.q_proj."""
    lines = ["layer " + " ".join(f"{t:>7}" for t in targets)]
    for i in range(n_layer):
        row = {name.rsplit(".", 1)[-1]: n for name, n in allocation.items() if name.startswith(f"layers.{i}.")}
        lines.append(f"{i:>5} " + " ".join(f"{row[t]:>7}" for t in targets))
    return "\n".join(lines)


def write_atomic(path, write):
    """write(tmp_path), then rename over `path`: a crash never leaves a half-written file."""
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def to_device(t, device):
    """A CPU tensor onto the device. On CUDA through pinned memory without waiting: a plain copy
    from pageable memory would make the host wait for the device at every step (nanoGPT does the same)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux reports KiB)

# -----------------------------------------------------------------------------


def main(args):
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    tasks = list(data.TASKS)
    cfg = GPTConfig(vocab_size=len(data.VOCAB), block_size=data.BLOCK_SIZE)
    eval_sets = {t: data.eval_set(t, args.eval_examples, args.seed) for t in tasks}
    times = {}
    tqdm.write(f"device {device}, tasks {', '.join(tasks)}, budget {args.budget}, seed {args.seed}")

    # 1. pretrain the base model on copy, or load it from the cache keyed by its settings
    t0 = time.time()
    fingerprint = [data.sample("copy", random.Random(i), "train") for i in range(32)]  # changes if data.py does
    key = {"model": dataclasses.asdict(cfg), "data": fingerprint, "seed": args.seed,
           "steps": args.pretrain_steps, "batch_size": args.batch_size, "lr": args.pretrain_lr}
    cache = os.path.join(args.out, f"base-{hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]}.pt")
    model = GPT(cfg).to(device)
    if os.path.exists(cache):
        model.load_state_dict(torch.load(cache, map_location=device, weights_only=True))
        tqdm.write(f"1. loaded the pretrained base model from {cache}")
    else:
        tqdm.write(f"1. pretraining the base model on copy ({args.pretrain_steps} steps, cache {cache})")
        rng = random.Random(f"pretrain-{args.seed}")
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, weight_decay=0.0)
        pbar = tqdm(range(args.pretrain_steps), desc="pretrain", dynamic_ncols=True)
        for step in pbar:
            x, y = data.get_batch(["copy"], args.batch_size, rng)
            _, loss = model(to_device(x, device), to_device(y, device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % 25 == 0 or step == args.pretrain_steps - 1:
                pbar.set_postfix(loss=f"{loss.item():.3f}")
        write_atomic(cache, lambda p: torch.save(model.state_dict(), p))
    base_acc = evaluate(model, eval_sets, device)
    base_copy = evaluate(model, {"copy": data.eval_set("copy", args.eval_examples, args.seed)}, device)["copy"]
    tqdm.write(f"   base model: copy {base_copy:.2f} (its pretraining task); "
               + ", ".join(f"{t} {a:.2f}" for t, a in base_acc.items()))
    times["pretrain"] = time.time() - t0

    # 2. sensitivity S_t(W) = sum over sampled batches of ||dL_t/dW||_F^2, per task and candidate matrix
    t0 = time.time()
    candidates = candidate_names(model, args.targets)
    tqdm.write(f"2. sensitivity of {len(candidates)} candidate matrices to each task, {args.sens_batches} batches per task")
    rng = random.Random(f"sensitivity-{args.seed}")
    task_batches = {t: [data.get_batch([t], args.batch_size, rng) for _ in range(args.sens_batches)] for t in tasks}
    pbar = tqdm(total=len(tasks) * args.sens_batches, desc="sensitivity", dynamic_ncols=True)

    def loss_fn(model, batch):
        pbar.update()
        x, y = batch
        return model(x.to(device), y.to(device))[1]

    sensitivity = compute_sensitivity(model, task_batches, loss_fn, candidates, reduction=args.sens_reduction)
    pbar.close()
    times["sensitivity"] = time.time() - t0

    # 3. allocate the budget by per-task votes; allocation.json keeps the released code's format (no zeros)
    allocation = allocate_experts(sensitivity, args.budget)
    tqdm.write(f"3. allocation of {args.budget} experts over {len(candidates)} candidate matrices (experts per matrix):")
    tqdm.write(allocation_table(allocation, cfg.n_layer, args.targets))
    nonzero = {name: n for name, n in allocation.items() if n > 0}
    write_atomic(os.path.join(args.out, "allocation.json"),
                 lambda p: open(p, "w").write(json.dumps(nonzero, indent=2) + "\n"))

    # 4. wrap the allocated matrices in LoRA-MoE layers; everything else is frozen
    model = apply_lora_moe(model, allocation, r=args.rank, lora_alpha=args.alpha, top_k=args.top_k)
    n_total = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_lora = sum(args.rank * (m.in_features + m.out_features) for m in map(model.get_submodule, candidates))
    tqdm.write(f"4. parameters: {n_total:,} total, {n_trainable:,} trainable (LoRA and routers); "
               f"plain LoRA r={args.rank} on all {len(candidates)} candidates would train {n_lora:,}")

    # 5. fine-tune on the mixture of tasks; with --dtype bf16 the forward pass runs under bf16 autocast
    # (float32 weights and optimizer, bf16 matmuls); pretraining, sensitivity and evaluation stay in float32
    t0 = time.time()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    tqdm.write(f"5. fine-tuning on the mixture of {', '.join(tasks)} for {args.steps} steps, loss = ce + {args.aux_coef} * aux"
               + (" (bf16 autocast)" if args.dtype == "bf16" else ""))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    rng = random.Random(f"finetune-{args.seed}")
    history = []
    pbar = tqdm(range(args.steps), desc="fine-tune", dynamic_ncols=True)
    for step in pbar:
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))  # cosine decay to 0
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = data.get_batch(tasks, args.batch_size, rng)
        with autocast:
            _, ce = model(to_device(x, device), to_device(y, device))
            aux = moe_aux_loss(model)  # mean load-balancing loss over the routing layers
        loss = ce + args.aux_coef * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 25 == 0 or step == args.steps - 1:  # .item() waits for the device, so only now and then
            pbar.set_postfix(ce=f"{ce.item():.3f}", aux=f"{aux.item():.3f}")
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            acc = evaluate(model, eval_sets, device)
            history.append({"step": step + 1, "ce": ce.item(), "aux": aux.item(), "accuracy": acc})
            tqdm.write(f"   step {step + 1}: ce {ce.item():.3f} aux {aux.item():.3f} exact match "
                       + " ".join(f"{t} {a:.2f}" for t, a in acc.items()) + f" mean {sum(acc.values()) / len(acc):.3f}")
    times["finetune"] = time.time() - t0

    # 6. report and save
    final_acc = history[-1]["accuracy"]
    routing = routing_stats(model, eval_sets, device)
    tqdm.write(f"6. held-out exact match ({args.eval_examples} per task, greedy decoding):")
    tqdm.write(f"   {'task':<8} {'base':>6} {'tuned':>6}")
    for t in tasks:
        tqdm.write(f"   {t:<8} {base_acc[t]:>6.2f} {final_acc[t]:>6.2f}")
    base_mean, final_mean = sum(base_acc.values()) / len(tasks), sum(final_acc.values()) / len(tasks)
    tqdm.write(f"   {'mean':<8} {base_mean:>6.2f} {final_mean:>6.2f}")
    if routing:
        tqdm.write("   routing (share of tokens per expert, normalised entropy):")
        for name, s in routing.items():
            tqdm.write(f"   {name:<22} {' '.join(f'{x:.2f}' for x in s['share']):<24} entropy {s['entropy']:.2f}")
    memory = peak_memory_mb(device)
    tqdm.write("   time: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items())
               + f"; peak memory {memory:.0f} MB ({'CUDA allocated' if device.type == 'cuda' else 'process RSS'})")
    results = {"config": vars(args), "allocation": allocation, "parameters": {"total": n_total, "trainable": n_trainable,
               "plain_lora_all_candidates": n_lora}, "sensitivity": sensitivity, "base_accuracy": base_acc,
               "base_mean": base_mean, "accuracy": final_acc, "mean": final_mean, "history": history,
               "routing": routing, "times_s": times, "peak_memory_mb": memory}
    write_atomic(os.path.join(args.out, "results.json"),
                 lambda p: open(p, "w").write(json.dumps(results, indent=2) + "\n"))
    adapter = {"adapter": adapter_state_dict(model), "allocation": nonzero, "model_config": dataclasses.asdict(cfg),
               "lora": {"r": args.rank, "lora_alpha": args.alpha, "top_k": args.top_k}}
    write_atomic(os.path.join(args.out, "adapter.pt"), lambda p: torch.save(adapter, p))
    tqdm.write(f"   wrote allocation.json, results.json and adapter.pt to {args.out}")
    return results

# -----------------------------------------------------------------------------
# Command line: every bad value is one line saying what is wrong and what is allowed


class Parser(argparse.ArgumentParser):
    def error(self, message):
        sys.exit(f"train.py: error: {message}")


def number(kind, low, inclusive=True):
    """An argparse type: a `kind` (int or float) >= low (or > low)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(
                f"expected {'a whole number' if kind is int else 'a number'} {'>=' if inclusive else '>'} {low}, got {text!r}")
        return value
    return parse


def parse_args(argv=None):
    p = Parser(description="LoRA-SMoE on toy tasks: sensitivity, allocation, LoRA-MoE fine-tuning, evaluation.")
    p.add_argument("--budget", type=number(int, 1), default=16,
                   help="total experts to spend over the candidate matrices, 1..tasks x candidates (default 16 = one per candidate, plain LoRA's count)")
    p.add_argument("--top-k", type=number(int, 1), default=2, help="experts each token uses per matrix, clamped to the matrix's count (default 2)")
    p.add_argument("--rank", type=number(int, 1), default=8, help="LoRA rank r of every expert (default 8)")
    p.add_argument("--alpha", type=number(float, 0, inclusive=False), default=16.0, help="LoRA alpha; scaling = alpha / rank (default 16)")
    p.add_argument("--aux-coef", type=number(float, 0), default=0.01, help="weight of the load-balancing loss, Switch Transformer's 0.01 (default 0.01)")
    p.add_argument("--sens-batches", type=number(int, 1), default=4, help="sampled batches per task for sensitivity (default 4)")
    p.add_argument("--sens-reduction", choices=("sum", "mean"), default="sum",
                   help="sensitivity per matrix: sum of squared gradients (the paper) or mean per entry (fair across shapes)")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj",
                   help=f"comma-separated candidate matrices in every layer, from {','.join(MATRICES)} (default q,k,v,o)")
    p.add_argument("--steps", type=number(int, 1), default=3000, help="fine-tuning steps (default 3000)")
    p.add_argument("--pretrain-steps", type=number(int, 1), default=2000, help="base-model pretraining steps on copy (default 2000)")
    p.add_argument("--batch-size", type=number(int, 1), default=64, help="examples per batch (default 64)")
    p.add_argument("--lr", type=number(float, 0, inclusive=False), default=3e-3, help="peak fine-tuning learning rate, cosine-decayed (default 3e-3)")
    p.add_argument("--pretrain-lr", type=number(float, 0, inclusive=False), default=1e-3, help="pretraining learning rate (default 1e-3)")
    p.add_argument("--eval-every", type=number(int, 1), default=1000, help="evaluate every this many steps, and at the end (default 1000)")
    p.add_argument("--eval-examples", type=number(int, 1), default=200, help="held-out examples per task (default 200)")
    p.add_argument("--seed", type=number(int, 0), default=0, help="seed for data, initialisation and sampling (default 0)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="fine-tuning precision: bf16 autocast or float32; auto is bf16 on a CUDA GPU that supports it, else fp32")
    p.add_argument("--out", default="out", help="output folder (default out)")
    args = p.parse_args(argv)

    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in args.targets if t not in MATRICES]
    if unknown or not args.targets or len(set(args.targets)) != len(args.targets):
        p.error(f"--targets must name distinct matrices from {','.join(MATRICES)}, got {','.join(args.targets) or 'nothing'}")
    n_tasks, n_candidates = len(data.TASKS), GPTConfig.n_layer * len(args.targets)
    if args.budget > n_tasks * n_candidates:
        p.error(f"--budget must be from 1 to {n_tasks * n_candidates} (tasks x candidate matrices = "
                f"{n_tasks} x {n_candidates}), got {args.budget}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device must be auto, cpu, cuda, cuda:N or mps, got {args.device!r}")
    if device.type not in ("cpu", "cuda", "mps"):
        p.error(f"--device must be auto, cpu, cuda, cuda:N or mps, got {args.device!r}")
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        p.error(f"--device {args.device}: no such CUDA device here (use cpu or auto)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        p.error(f"--device {args.device}: MPS is not available here (use cpu or auto)")
    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
    if args.dtype == "auto":
        args.dtype = "bf16" if device.type == "cuda" and bf16_ok else "fp32"
    if args.dtype == "bf16" and not bf16_ok:
        p.error(f"--dtype bf16: this GPU ({torch.cuda.get_device_name(device)}) has no bfloat16 support; use --dtype fp32")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out!r} is a file; give a folder to write results into")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        p.error(f"--out {args.out!r} cannot be created ({e.strerror}); give a writable folder")
    if not os.access(args.out, os.W_OK | os.X_OK):
        p.error(f"--out {args.out!r} is not writable; give a writable folder")
    return args


if __name__ == "__main__":
    main(parse_args())
