"""
LoRA-SMoE end to end on the toy tasks of data.py, every phase in plain sight. main() runs six phases:

  1. pretrain a tiny base model on copy and digit sums (or load it from the cache in --cache)
  2. measure each task's sensitivity to each candidate matrix      (smoe.compute_sensitivity)
  3. allocate the expert budget by per-task votes                   (smoe.allocate_experts)
     (or by a peer's rule, --alloc, or from a file, --allocation)
  4. wrap the chosen matrices in LoRA-MoE layers                    (smoe.apply_lora_moe)
  5. fine-tune on the task mixture with loss = ce + aux_coef * aux  (smoe.moe_aux_loss)
  6. report held-out exact match, routing statistics, times and memory

The file reads in that order: main(), one function per phase, then the evaluation they share. After
the line marked PLUMBING comes what a real run needs besides the method, grouped by concern (reporting,
the command line, torchrun, signals, non-finite values, checkpoints, files, reloading a finished run).

Run:  python train.py --budget 16        (python train.py --help for every flag)
      torchrun --nproc_per_node=N train.py --budget 16   (N processes, DistributedDataParallel)
      python train.py --out out --evaluate  (reload a finished run, print its table again; or --prompt A12+34=)
Writes to --out: allocation.json, results.json, adapter.pt, checkpoint.pt (every --checkpoint-every
steps and at the end; `--resume` continues from it, Ctrl-C or SIGTERM saves it and exits 130 or 143),
and the cached base model to --cache (default --out). A new run replaces the previous run's files.
A bad flag or file stops the run with one line `train.py: error: ...` and a non-zero exit, before
anything is computed or created.

References: [1] LoRA-SMoE, arXiv 2505.06272; [2] LoRA, arXiv 2106.09685;
[3] Switch Transformers, arXiv 2101.03961. Method notes: README.md.
"""

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import resource
import signal
import sys
import tempfile
import threading
import time
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
from smoe import (GPT, GPTConfig, adapter_state, adapter_state_dict, allocate_alpha, allocate_experts, allocate_mola,
                  allocate_random, allocate_uniform, apply_lora_moe, candidate_names, compute_sensitivity,
                  load_adapter, moe_aux_loss, moe_layers, normalise_per_layer, routing_counts, set_adapter)

MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")  # what --targets may name
ALLOC_RULES = ("sensitivity", "uniform", "mola", "alpha", "random")  # what --alloc may name
EXAMPLES = 3  # held-out examples per task shown after fine-tuning and kept in results.json

# -----------------------------------------------------------------------------
# The method: main() and its six phases


def main(args):
    """LoRA-SMoE on the toy, phase by phase (args from parse_args, already checked). Returns what it
    writes to results.json."""
    cfg = toy_config()
    device, ckpt = start_run(args, cfg)  # [ddp] torchrun set-up; --resume's checkpoint read and checked before any work
    eval_sets = {t: data.eval_set(t, args.eval_examples) for t in args.tasks}  # the same held-out set for every seed
    times = {}  # seconds per phase

    # 1. pretrain the base model on copy and digit sums (or load it from the cache), and see what it knows
    model = pretrained_base(args, cfg, device, times)
    torch.manual_seed(args.seed)  # everything from here on (sampling, adapter initialisation) follows --seed
    base_answers = evaluate_base(model, eval_sets, args, device, times)

    # 2. sensitivity S_t(W) = sum over sampled examples x of ||d l(x)/dW||_F^2, per task and candidate matrix
    candidates = candidate_names(model, args.targets)
    sensitivity = measure_sensitivity(model, candidates, args, device, times)

    # 3. allocate the budget: LoRA-SMoE's per-task votes, a peer's rule (--alloc), or an --allocation file
    allocation = allocate(model, candidates, sensitivity, args)

    # 4. wrap the allocated matrices in LoRA-MoE layers; every other weight stays frozen
    model, parameters = wrap(model, allocation, candidates, args)

    # 5. fine-tune the experts and routers on the mixture of tasks, loss = ce + aux_coef * aux
    history, curve, tuned_answers = finetune(model, allocation, eval_sets, args, device, ckpt, times)

    # 6. report held-out exact match of base and tuned model, routing, times and memory; save the results
    results = {"config": vars(args), "allocation": allocation, "parameters": parameters, "sensitivity": sensitivity,
               "history": history, "curve": curve}
    report(model, results, eval_sets, base_answers, tuned_answers, device, times)
    end_torchrun()
    return results


def pretrained_base(args, cfg, device, times=None):
    """Phase 1: the base model pretrained on copy and digit sums, loaded from the cache when it holds exactly
    this base (load_base checks it), pretrained and cached otherwise. Records the seconds it took in
    times["load base"] or times["pretrain"]. Ctrl-C or SIGTERM stops pretraining after the step in
    flight with one line and exit status 130 or 143; nothing is cached, the next run pretrains afresh."""
    t0 = time.time()
    cache, key = base_cache(args, cfg)
    torch.manual_seed(args.base_seed)
    model = GPT(cfg).to(device)
    with rank_0_first():  # [ddp] the other ranks wait until rank 0 has the base in the cache, then load it
        reason = load_base(model, cache, key)
        if not reason:
            tqdm.write(f"1. loaded the pretrained base model from {cache}")
        else:
            tqdm.write(f"1. pretraining the base model on {' and '.join(data.PRETRAIN_TASKS)} ({args.pretrain_steps} "
                       f"steps, cache {cache}: {reason})")
            stop = pretrain(model, args, device, t0)
            os.makedirs(args.cache, exist_ok=True)
            write_atomic(cache, lambda p: torch.save({"key": key, "model": model.state_dict()}, p))
            if stop:  # asked during the last step: the base is complete and cached; stop all the same, as asked
                stop_run(stop, f"stopped by {signal_name(stop)} after the last pretraining step; the base is cached in {cache}")
    if times is not None:
        times["pretrain" if reason else "load base"] = time.time() - t0
    return model


def pretrain(model, args, device, t0):
    """Plain next-token training of the whole base model on data.PRETRAIN_TASKS for --pretrain-steps steps.
    Returns the signal that asked to stop during the last step, if one did (None otherwise)."""
    rng = random.Random(f"pretrain-{args.base_seed}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, weight_decay=0.0)
    bad_step = torch.zeros(2, dtype=torch.long, device=device)  # first step with a non-finite loss, gradient
    with stop_requests(not under_torchrun(), lambda: "nothing was cached") as stop:
        bar = progress(range(args.pretrain_steps), "pretrain")
        for step in bar:
            if stop:  # a signal asked to stop: pretraining is short, so it stops and says what that costs
                stop_pretraining(stop[0], step, args.pretrain_steps, time.time() - t0, bar)
            x, y = data.get_batch(data.PRETRAIN_TASKS, args.pretrain_batch_size, rng)
            _, loss = model(to_device(x, device), to_device(y, device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            bad_step = note_nonfinite(bad_step, step, loss, model.parameters())
            optimizer.step()
            if step % 25 == 0 or step == args.pretrain_steps - 1:
                stop_if_nonfinite(bad_step, "pretraining", ", nothing was cached")
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return stop[0] if stop else None


def evaluate_base(model, eval_sets, args, device, times):
    """What the base knows before any adapter: exact match on its own pretraining tasks and on the
    fine-tuning tasks. Returns its answers to the held-out sets, which phase 6 shows beside the tuned ones."""
    t0 = time.time()
    answers = model_answers(model, eval_sets, device)
    own = {t: data.eval_set(t, min(args.eval_examples, data.heldout_size(t))) for t in data.PRETRAIN_TASKS}
    own_acc, acc = exact_match(model_answers(model, own, device), own), exact_match(answers, eval_sets)
    tqdm.write(f"   base model: {', '.join(f'{t} {a:.2f}' for t, a in own_acc.items())} (its pretraining tasks); "
               + ", ".join(f"{t} {a:.2f}" for t, a in acc.items()))
    times["evaluate base"] = time.time() - t0
    return answers


def measure_sensitivity(model, candidates, args, device, times):
    """Phase 2: {task: {candidate: score}} from --sens-batches batches per task, on the pretrained base
    weights (smoe.compute_sensitivity; on fresh adapters, B = 0, the scores would be zero)."""
    t0 = time.time()
    tqdm.write(f"2. sensitivity of {len(candidates)} candidate matrices to each task: {args.sens_estimator} estimator, "
               f"{args.sens_batches} batches of {args.batch_size} per task"
               + (", shares within each layer" if args.sens_norm == "layer" else ""))
    rng = random.Random(f"sensitivity-{args.seed + rank()}")  # [ddp] rank r samples like seed + r; rank 0 as a single process
    sensitivity = {}
    for t in progress(args.tasks, "sensitivity"):
        batches = [data.get_batch([t], args.batch_size, rng) for _ in range(args.sens_batches)]
        try:
            sensitivity[t] = compute_sensitivity(model, {t: batches}, partial(example_losses, device=device), candidates,
                                                 args.sens_estimator, args.sens_reduction)[t]
        except ValueError as e:  # a score that is not finite
            fail(str(e))
    sensitivity = sum_over_ranks(sensitivity, candidates, device)  # [ddp] so that every rank allocates alike
    if args.sens_norm == "layer":
        sensitivity = normalise_per_layer(sensitivity)
    times["sensitivity"] = time.time() - t0
    if args.allocation is None and args.alloc in ("sensitivity", "random"):  # the votes: what each task would spend where
        tqdm.write("   each task's scores, % of its total; shade = how far below the task's largest: █ <10x ▓ <100x ▒ <1000x ░ <10^4x")
        tqdm.write(score_table(sensitivity, model.cfg.n_layer, args.targets))
    return sensitivity


def allocate(model, candidates, sensitivity, args):
    """Phase 3: {matrix: experts} for the matrices that get at least one, in module order. An --allocation
    file (read and checked by parse_args) wins over --alloc. Writes allocation.json in the released code's
    format (zero counts left out), editable and accepted by --allocation."""
    if args.allocation:
        allocation = {name: args.allocation.get(name, 0) for name in candidates}
    elif args.alloc == "sensitivity":
        allocation = allocate_experts(sensitivity, args.budget)  # each task votes for its most sensitive matrices
    elif args.alloc == "uniform":
        allocation = allocate_uniform(candidates, args.budget)
    elif args.alloc == "mola":
        allocation = allocate_mola(candidates, args.budget)
    elif args.alloc == "alpha":
        allocation, layer_alpha = allocate_alpha(model, candidates, args.budget)
        tqdm.write("   power-law alpha per layer: " + ", ".join(f"{l}: {a:.2f}" for l, a in layer_alpha.items()))
    elif args.alloc == "random":
        allocation = allocate_random(allocate_experts(sensitivity, args.budget), args.seed)
    check_ranks_agree(allocation)  # [ddp]
    tqdm.write(f"3. {'--allocation file' if args.allocation else args.alloc} allocation of {args.budget} experts over "
               f"{len(candidates)} candidate matrices (experts per matrix):")
    tqdm.write(allocation_table(allocation, model.cfg.n_layer, args.targets))
    allocation = {name: n for name, n in allocation.items() if n > 0}  # a matrix with 0 gets no adapter at all
    check_top_k(args.top_k, max(allocation.values()), "in the allocation")  # the vote and alpha counts depend on the base
    start_writing(args)  # the first file in --out: the folder is created, a previous run's files removed
    write_json(os.path.join(args.out, "allocation.json"), allocation)
    return allocation


def wrap(model, allocation, candidates, args):
    """Phase 4: each allocated matrix becomes a LoRA-MoE layer with its count of experts (rank --rank,
    scaling --alpha / --rank, top-k routing); everything else is frozen. Returns (model, parameter counts)."""
    top_k = args.top_k or 2  # default top-2, clamped to each matrix's expert count
    model = apply_lora_moe(model, allocation, r=args.rank, lora_alpha=args.alpha, top_k=top_k)
    parameters = {"total": sum(p.numel() for p in model.parameters()),
                  "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                  "plain_lora_all_candidates": sum(args.rank * (m.in_features + m.out_features)
                                                   for m in map(model.get_submodule, candidates))}
    tqdm.write(f"4. parameters: {parameters['total']:,} total, {parameters['trainable']:,} trainable (LoRA and routers); "
               f"plain LoRA r={args.rank} on all {len(candidates)} candidates would train "
               f"{parameters['plain_lora_all_candidates']:,}")
    return model, parameters


def finetune(model, allocation, eval_sets, args, device, ckpt, times):
    """Phase 5: AdamW on the experts and routers, --steps steps on batches of the task mixture, the learning
    rate cosine-decayed to 0, loss = ce + aux_coef * aux; evaluated every --eval-every steps and at the end,
    a checkpoint every --checkpoint-every steps and at the end. Continues from `ckpt` when resuming. With
    --dtype bf16 the forward pass runs under bf16 autocast (float32 weights and optimizer, bf16 matmuls).
    Returns (history, curve, the model's held-out answers at the end)."""
    t0 = time.time()
    tqdm.write(f"5. fine-tuning on the mixture of {', '.join(args.tasks)} for {args.steps} steps, "
               f"loss = ce + {args.aux_coef} * aux" + (" (bf16 autocast)" if args.dtype == "bf16" else ""))
    ddp_model = for_training(model, device)  # [ddp] averages the adapter gradients over the ranks; `model` otherwise
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    rng = random.Random(f"finetune-{args.seed + rank()}")  # [ddp] each rank its own batches
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    start, history, curve = resume(ckpt, ckpt_path, allocation, model, optimizer, rng, device) if ckpt else (0, [], [])
    saved = start if ckpt else None  # the step of the last good checkpoint on disk
    log_every = max(1, args.steps // 100)  # about 100 points of loss curve; .item() waits for the device
    bad_step = torch.zeros(2, dtype=torch.long, device=device)  # first step with a non-finite loss, gradient
    answers = None  # the model's held-out answers at the last evaluation
    with stop_requests(not under_torchrun(), lambda: "fine-tuning stopped" + kept(ckpt_path, saved)) as stop:
        bar = progress(range(start, args.steps), "fine-tune", initial=start, total=args.steps)
        for step in bar:
            lr = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))  # cosine decay to 0
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = data.get_batch(args.tasks, args.batch_size, rng)
            x, y = to_device(x, device), to_device(y, device)
            with autocast:
                _, ce = ddp_model(x, y)  # cross-entropy on the answer tokens
                aux = moe_aux_loss(model, mask=x != data.STOI[data.PAD])  # balancing loss, on the real tokens
            loss = ce + args.aux_coef * aux
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            bad_step = note_nonfinite(bad_step, step, loss, trainable)  # on the device: read at the cadences below
            optimizer.step()

            done = step + 1
            if step % log_every == 0 or done == args.steps:
                stop_if_nonfinite(bad_step, "fine-tuning", kept(ckpt_path, saved))
                curve.append({"step": done, "ce": ce.item(), "aux": aux.item()})
                bar.set_postfix(ce=f"{ce.item():.3f}", aux=f"{aux.item():.3f}")
            if done % args.eval_every == 0 or done == args.steps:
                answers = model_answers(ddp_model, eval_sets, device)
                acc = exact_match(answers, eval_sets)
                history.append({"step": done, "ce": ce.item(), "aux": aux.item(), "accuracy": acc})
                tqdm.write(f"   step {done}: ce {ce.item():.3f} aux {aux.item():.3f} exact match "
                           + " ".join(f"{t} {a:.2f}" for t, a in acc.items()) + f" mean {mean(acc):.3f}")
            if done % args.checkpoint_every == 0 or done == args.steps or stop:  # everything needed to go on exactly
                state = {"step": done, "config": run_config(args, model.cfg), "allocation": allocation,
                         "adapter": adapter_state_dict(model), "optimizer": optimizer.state_dict(),
                         "history": history, "curve": curve, "rng": rng_state(rng, device)}
                saved = save_checkpoint(ckpt_path, state, bad_step, saved, stop, bar)  # stops here if a signal asked to
    times["finetune"] = time.time() - t0
    if answers is None:  # resumed from the checkpoint of a finished run: no step ran here
        answers = model_answers(model, eval_sets, device)
    return history, curve, answers


def report(model, results, eval_sets, base_answers, tuned_answers, device, times):
    """Phase 6: the held-out table and examples, the routing, times and memory; adds them to `results`
    and writes results.json and adapter.pt (the adapter alone: LoRA weights, routers, allocation, settings)."""
    routing = routing_stats(model, eval_sets, device)
    base_acc, acc, examples = print_report(eval_sets, base_answers, tuned_answers)
    print_routing(routing)
    memory = peak_memory_mb(device)
    tqdm.write("   time: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items())
               + f"; peak memory {memory:.0f} MB ({'CUDA allocated' if device.type == 'cuda' else 'process RSS'})")
    results.update({"base_accuracy": base_acc, "base_mean": mean(base_acc), "accuracy": acc, "mean": mean(acc),
                    "examples": examples, "routing": routing, "times_s": times, "peak_memory_mb": memory,
                    "world_size": dist.get_world_size() if dist.is_initialized() else 1})
    out = results["config"]["out"]
    write_json(os.path.join(out, "results.json"), results)
    adapter = {**adapter_state(model), "model_config": dataclasses.asdict(model.cfg)}
    write_atomic(os.path.join(out, "adapter.pt"), lambda p: torch.save(adapter, p))
    tqdm.write(f"   wrote allocation.json, results.json, adapter.pt and checkpoint.pt to {out}")

# -----------------------------------------------------------------------------
# What the phases share: the toy model, the per-example loss, greedy decoding and exact match


def toy_config():
    """The tiny GPT of smoe.py (its default sizes) for data.py's vocabulary and line length."""
    return GPTConfig(vocab_size=len(data.VOCAB), block_size=data.BLOCK_SIZE)


def example_losses(model, batch, device):
    """(B,) each line's mean cross-entropy over its answer tokens: the per-example loss l(x)
    whose gradients the sensitivity squares. (The training loss averages over all answer tokens.)
    data.encode's targets are already shifted (y[t] is the token after x[t]); a Hugging Face
    model's labels are not (experiments/hf_model.py shifts them)."""
    x, y = (t.to(device) for t in batch)
    logits, _ = model(x)                                                                  # (B, T, vocab)
    ce = F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=-1, reduction="none")  # (B, T), 0 off the answer
    return ce.sum(dim=1) / (y != -1).sum(dim=1)


@torch.no_grad()
def generate(model, prompts, n_new, device):
    """Greedy decoding: each prompt continued by n_new tokens (fewer where the block ends), as strings.
    Past an answer's final "." the model goes on writing whatever it likes: answer() stops there."""
    was_training = model.training
    model.eval()
    n = len(prompts)
    buf = torch.full((n, data.BLOCK_SIZE + 1), data.STOI[data.PAD], dtype=torch.long, device=device)
    pos = torch.tensor([len(p) for p in prompts], device=device)  # next position to write, per prompt
    for i, prompt in enumerate(prompts):
        buf[i, :len(prompt)] = torch.tensor([data.STOI[c] for c in prompt])
    rows = torch.arange(n, device=device)
    for _ in range(n_new):
        # right padding is harmless: causal attention never looks past a position
        logits, _ = model(buf[:, :data.BLOCK_SIZE])              # (n, T, vocab)
        buf[rows, pos] = logits[rows, pos - 1].argmax(dim=-1)    # greedy next token
        pos = (pos + 1).clamp(max=data.BLOCK_SIZE)
    model.train(was_training)
    out = buf.tolist()
    return [data.decode(out[i][len(p):len(p) + n_new]) for i, p in enumerate(prompts)]


def model_answers(model, eval_sets, device):
    """The model's greedy answer to every held-out prompt, as long as the expected answer ("." included):
    {task: [answer, ...]} in the order of eval_sets. One batch per task."""
    answers = {}
    for task, pairs in eval_sets.items():
        got = generate(model, [p for p, _ in pairs], max(len(a) for _, a in pairs), device)
        answers[task] = [g[:len(a)] for g, (_, a) in zip(got, pairs)]
    return answers


def exact_match(answers, eval_sets):
    """{task: fraction of answers equal to the expected ones, "." included}."""
    return {task: sum(got == a for got, (_, a) in zip(answers[task], pairs)) / len(pairs) for task, pairs in eval_sets.items()}


def mean(accuracy):
    return sum(accuracy.values()) / len(accuracy)

# =============================================================================
# PLUMBING: what a real run needs besides the method. A reader learning the method can stop here.
# -----------------------------------------------------------------------------
# Reporting: the tables printed along the way, routing statistics, memory


SHADES = " ░▒▓█"  # within 1, 2, 3, 4 decades of the task's largest score: █ ▓ ▒ ░; blank below


def score_table(sensitivity, n_layer, targets):
    """Each task's scores as a layer x matrix table, tasks side by side: a shade for how far the score
    is below the task's largest (SHADES) and its share of the task's total in percent. Reading
    across a row shows where in a layer a task's gradient lands; reading down, by depth. Names look
    like layers.{i}.attn.q_proj, as in allocation_table."""
    cells = {}  # task -> {name: "█37"}
    for task, scores in sensitivity.items():
        top, total = max(scores.values()), sum(scores.values())
        cells[task] = {}
        for name, s in scores.items():
            level = 4 + math.ceil(math.log10(s / top)) if s > 0 else 0  # 4: within 10x of the top, 3: within 100x, ...
            cells[task][name] = f"{SHADES[max(0, level)]}{min(99, round(100 * s / total)) if total > 0 else 0:>2}"
    width = 4 * len(targets)
    lines = ["layer " + " | ".join(f"{task:<{width - 1}}"[:width - 1] for task in sensitivity),
             "      " + " | ".join(" ".join(f"{t.removesuffix('_proj'):>3}" for t in targets) for _ in sensitivity)]
    for i in range(n_layer):
        rows = [{name.rsplit(".", 1)[-1]: cell for name, cell in task_cells.items() if name.startswith(f"layers.{i}.")}
                for task_cells in cells.values()]
        lines.append(f"{i:>5} " + " | ".join(" ".join(row[t] for t in targets) for row in rows))
    return "\n".join(lines)


def allocation_table(allocation, n_layer, targets):
    """The allocation as a small layer x matrix table: each matrix's expert count and as many
    blocks (at most 8), so that where the budget went reads at a glance. Names look like
    layers.{i}.attn.q_proj."""
    width = 3 + min(8, max(allocation.values()))  # "NN " and the bar
    lines = ["layer " + " ".join(f"{t:<{width}}" for t in targets)]
    for i in range(n_layer):
        row = {name.rsplit(".", 1)[-1]: n for name, n in allocation.items() if name.startswith(f"layers.{i}.")}
        lines.append(f"{i:>5} " + " ".join(f"{row.get(t, 0):>2} {'█' * min(8, row.get(t, 0)):<{width - 3}}" for t in targets))
    return "\n".join(lines)


def print_report(eval_sets, base_answers, tuned_answers):
    """Phase 6's table, also printed by --evaluate: held-out exact match per task, base and tuned, then
    the first EXAMPLES held-out examples of each task with both models' answers, marked right (ok) or
    wrong (x). Returns (base accuracy, tuned accuracy, examples), the examples as results.json keeps them:
    {task: [{"prompt": "A27+48=", "expected": "570.", "base": "470.", "tuned": "570."}, ...]}."""
    base_acc, tuned_acc = exact_match(base_answers, eval_sets), exact_match(tuned_answers, eval_sets)
    tqdm.write(f"6. held-out exact match ({len(next(iter(eval_sets.values())))} per task, greedy decoding):")
    tqdm.write(f"   {'task':<8} {'base':>6} {'tuned':>6}")
    for t in eval_sets:
        tqdm.write(f"   {t:<8} {base_acc[t]:>6.2f} {tuned_acc[t]:>6.2f}")
    tqdm.write(f"   {'mean':<8} {mean(base_acc):>6.2f} {mean(tuned_acc):>6.2f}")
    examples = {t: [{"prompt": p, "expected": a, "base": base_answers[t][i], "tuned": tuned_answers[t][i]}
                    for i, (p, a) in enumerate(pairs[:EXAMPLES])] for t, pairs in eval_sets.items()}
    tqdm.write(f"   held-out examples, the first {EXAMPLES} per task (ok right, x wrong; the final '.' not shown):")
    tqdm.write(f"   {'prompt':<9} {'expected':<8} {'base':<10} tuned")
    for rows in examples.values():
        for e in rows:
            base, tuned = (f"{e[k].removesuffix('.'):<7} {'ok' if e[k] == e['expected'] else 'x':<2}" for k in ("base", "tuned"))
            tqdm.write(f"   {e['prompt']:<9} {e['expected'].removesuffix('.'):<8} {base} {tuned}".rstrip())
    return base_acc, tuned_acc, examples


@torch.no_grad()
def routing_stats(model, eval_sets, device):
    """Share of routing slots per expert and normalised entropy (1 = uniform, 0 = collapse)
    for every routing layer, over the held-out lines (no padding: lines are grouped by length)."""
    layers = [(name, m) for name, m in moe_layers(model) if m.router is not None]
    counts = {name: torch.zeros(m.num_experts, dtype=torch.long, device=device) for name, m in layers}
    lines = [p + a for pairs in eval_sets.values() for p, a in pairs]
    for length in sorted(set(map(len, lines))):
        ids = torch.tensor([[data.STOI[c] for c in s] for s in lines if len(s) == length], device=device)
        model(ids[:, :-1])
        for name, m in layers:
            counts[name] += routing_counts(m.top_idx, m.num_experts)
    stats = {}
    for name, m in layers:
        share = counts[name] / counts[name].sum()
        entropy = torch.special.entr(share).sum() / math.log(m.num_experts)  # entr(p) = -p ln p, 0 at p = 0
        stats[name] = {"share": [round(s, 3) for s in share.tolist()], "entropy": round(entropy.item(), 3)}
    return stats


def print_routing(routing):
    if routing:
        tqdm.write("   routing (share of tokens per expert, normalised entropy):")
        for name, s in routing.items():
            tqdm.write(f"   {name:<22} {' '.join(f'{x:.2f}' for x in s['share']):<24} entropy {s['entropy']:.2f}")


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # process peak RSS: bytes on macOS, KiB on Linux
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def progress(iterable, desc, **kwargs):
    """A tqdm bar with the live loss set by the loop; [ddp] only rank 0 shows bars."""
    return tqdm(iterable, desc=desc, dynamic_ncols=True, disable=rank() > 0, **kwargs)


def to_device(t, device):
    """A CPU tensor onto the device. On CUDA through pinned memory without waiting: a plain copy
    from pageable memory would make the host wait for the device at every step (nanoGPT does the same)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)

# -----------------------------------------------------------------------------
# Command line: every bad value is one line saying what is wrong and what is allowed, before any work


class Parser(argparse.ArgumentParser):
    def error(self, message):
        sys.exit(f"{self.prog}: error: {message}")  # one line, exit status 1, as fail()


def fail(message):
    """Stop with one line saying what is wrong: exit status 1, no traceback."""
    sys.exit(f"train.py: error: {message}")


def number(kind, low, inclusive=True, high=None):
    """An argparse type: a `kind` (int or float) >= low (or > low), and <= high if given."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if (value is None or not math.isfinite(value) or value < low or (value == low and not inclusive)
                or (high is not None and value > high)):
            raise argparse.ArgumentTypeError(
                f"expected {'a whole number' if kind is int else 'a number'} {'>=' if inclusive else '>'} {low}"
                f"{f' and <= {high}' if high is not None else ''}, got {text!r}")
        return value
    return parse


def parse_args(argv=None):
    """The flags, checked: any bad value or combination stops here with one line (see the check_* below)."""
    p = Parser(prog="train.py", description="LoRA-SMoE on toy tasks: sensitivity, allocation, LoRA-MoE fine-tuning, evaluation.")
    p.add_argument("--budget", type=number(int, 1), default=None,
                   help="total experts to spend over the candidate matrices, 1..tasks x candidates for the vote rules "
                        "(sensitivity, random); default: the number of candidates (32 with the default --targets), plain LoRA's count; "
                        "with --allocation, the file's total")
    p.add_argument("--allocation", metavar="FILE", default=None,
                   help="a JSON file {module name: experts} (the format of allocation.json, zeros may be left out) "
                        "to use instead of the sensitivity allocation; its total must equal --budget if that is given")
    p.add_argument("--alloc", choices=ALLOC_RULES, default="sensitivity",
                   help="how to spend the budget: sensitivity (LoRA-SMoE), uniform (same count everywhere; budget = "
                        "number of candidates is plain LoRA), mola (more in higher layers), alpha (AlphaLoRA, "
                        "from weight spectra), random (sensitivity counts shuffled); --allocation overrides it")
    p.add_argument("--top-k", type=number(int, 1), default=None,
                   help="experts each token uses per matrix (default 2, clamped to each matrix's count); "
                        "a value given here may not exceed the largest count")
    p.add_argument("--rank", type=number(int, 1), default=8, help="LoRA rank r of every expert (default 8)")
    p.add_argument("--alpha", type=number(float, 0, inclusive=False), default=16.0, help="LoRA alpha; scaling = alpha / rank (default 16)")
    p.add_argument("--aux-coef", type=number(float, 0), default=0.01, help="weight of the load-balancing loss, Switch Transformer's 0.01 (default 0.01)")
    p.add_argument("--sens-batches", type=number(int, 1), default=4, help="sampled batches per task for sensitivity (default 4)")
    p.add_argument("--sens-estimator", choices=("fisher", "batch"), default="fisher",
                   help="fisher: sum over examples of squared per-example gradient norms (the paper's score); "
                        "batch: squared gradient of each batch's mean loss (default fisher)")
    p.add_argument("--sens-norm", choices=("none", "layer"), default="none",
                   help="layer: each score as a share of its task's total within the layer, roughly the released "
                        "code's implicit per-layer gradient clipping (default none)")
    p.add_argument("--sens-reduction", choices=("sum", "mean"), default="sum",
                   help="sensitivity per matrix: sum of squared gradients (the paper) or mean per entry (fair across shapes)")
    p.add_argument("--tasks", default=",".join(data.TASKS),
                   help=f"comma-separated fine-tuning tasks, from {','.join(data.TASKS)} (default all)")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj",
                   help=f"comma-separated candidate matrices in every layer, from {','.join(MATRICES)} (default the "
                        "attention's q,k,v,o: with the MLP matrices too, plain LoRA learns every task perfectly and "
                        "leaves no room for allocations to differ)")
    p.add_argument("--steps", type=number(int, 1), default=2500,
                   help="fine-tuning steps (default 2500: the fewest of 2000, 2500, 3000 at which plain LoRA learns every "
                        "task steadily over seeds 0-4, leaving the most room above it; README, \"The toy's base\")")
    p.add_argument("--pretrain-steps", type=number(int, 1), default=2000, help="base-model pretraining steps on copy and digit sums (default 2000)")
    p.add_argument("--batch-size", type=number(int, 1), default=64, help="examples per sensitivity and fine-tuning batch (default 64)")
    p.add_argument("--pretrain-batch-size", type=number(int, 1), default=64,
                   help="examples per base-model pretraining batch; part of the base's cache key (default 64)")
    p.add_argument("--lr", type=number(float, 0, inclusive=False), default=3e-3, help="peak fine-tuning learning rate, cosine-decayed (default 3e-3)")
    p.add_argument("--pretrain-lr", type=number(float, 0, inclusive=False), default=1e-3, help="pretraining learning rate (default 1e-3)")
    p.add_argument("--eval-every", type=number(int, 1), default=1000, help="evaluate every this many steps, and at the end (default 1000)")
    p.add_argument("--eval-examples", type=number(int, 1), default=200, help="held-out examples per task (default 200)")
    p.add_argument("--seed", type=number(int, 0, high=2**64 - 1), default=0,
                   help="seed for sampling, adapter initialisation and fine-tuning, 0..2**64-1 (default 0)")
    p.add_argument("--base-seed", type=number(int, 0, high=2**64 - 1), default=0,
                   help="seed of the pretrained base model, 0..2**64-1 (default 0)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="fine-tuning precision: bf16 autocast or float32; auto is bf16 on a CUDA GPU that supports it, else fp32")
    p.add_argument("--out", default="out", help="output folder (default out)")
    p.add_argument("--cache", default=None, help="folder of the pretrained-base cache (default: the output folder)")
    p.add_argument("--checkpoint-every", type=number(int, 1), default=500,
                   help="save out/checkpoint.pt every this many fine-tuning steps, and at the end (default 500)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --out; every setting that changes the numbers must match it")
    p.add_argument("--allow-large", action="store_true",
                   help="allow adapters with more trainable parameters than the base model has (refused by default: "
                        "a typo in --budget or --rank would otherwise build a giant)")
    p.add_argument("--evaluate", action="store_true",
                   help="train nothing: load the finished run in --out (base and adapter.pt) and print its held-out "
                        "table again, re-evaluated (with --device, --prompt)")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="train nothing: answer TEXT, e.g. 'A12+34=', with the finished run in --out (greedy "
                        "decoding; may be given several times)")
    args = p.parse_args(argv)
    if args.evaluate or args.prompt:
        return check_inspect(p, args)
    args.targets = names_from(p, "--targets", args.targets, MATRICES, "matrices")
    args.tasks = names_from(p, "--tasks", args.tasks, data.TASKS, "tasks")
    check_eval_examples(p, args)
    check_budget(p, args)
    if args.resume and under_torchrun():
        p.error("--resume continues single-process runs only; run it without torchrun")
    device = check_device(p, args)
    if device.type == "mps" and under_torchrun():
        p.error("--device mps cannot run under torchrun (its gloo and nccl backends need cpu or cuda)")
    args.cache = args.cache or args.out
    check_folders(p, args)
    return args


def check_inspect(p, args):
    """--evaluate and --prompt inspect a finished run: only --out and --device apply."""
    given = [a.option_strings[0] for a in p._actions
             if a.dest not in ("help", "out", "device", "evaluate", "prompt") and getattr(args, a.dest) != a.default]
    if given:
        p.error(f"--evaluate and --prompt use the settings of the run in --out; {given[0]} does not apply to them")
    for prompt in args.prompt or []:
        try:
            check_prompt(prompt)
        except ValueError as e:
            p.error(f"--prompt {e}")
    args.dtype = "fp32"
    check_device(p, args)
    if not os.path.isdir(args.out):
        p.error(f"--out {args.out!r} is not a folder; give the --out of a finished run")
    return args


def names_from(p, flag, text, allowed, what):
    """The comma-separated names in `text`, each one of `allowed` and none twice; else one line naming the wrong one."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in allowed]
    twice = [n for n in names if names.count(n) > 1]
    if not names or unknown or twice:
        why = f": {unknown[0]!r} is not one of them" if unknown else f": {twice[0]!r} twice" if twice else ""
        p.error(f"{flag} must name distinct {what} from {','.join(allowed)}, got {','.join(names) or 'nothing'}{why}")
    return names


def check_eval_examples(p, args):
    # eval_set draws distinct held-out inputs and cannot return more than a task has; add has the
    # fewest and is quick to count, so the other tasks are counted only when add's count is exceeded
    if args.eval_examples > data.heldout_size("add"):
        short = next((t for t in args.tasks + ["copy"] if data.heldout_size(t) < args.eval_examples), None)
        if short:
            p.error(f"--eval-examples {args.eval_examples} is more than the {data.heldout_size(short)} held-out "
                    f"inputs of task {short}; use at most that many")


def check_budget(p, args):
    """--allocation read and checked (args.allocation becomes its counts), --budget set and in range, --top-k
    within what the rule can give, and the cap: no more trainable parameters than the base has."""
    n_tasks, n_candidates = len(args.tasks), GPTConfig.n_layer * len(args.targets)
    with torch.device("meta"):  # only names and shapes are needed: no memory, no random numbers
        shapes = GPT(toy_config())
    candidates = candidate_names(shapes, args.targets)
    if args.allocation is not None:  # read and check the file now; main() uses the checked counts
        try:
            counts = read_allocation(args.allocation, candidates)
        except ValueError as e:
            p.error(f"--allocation {args.allocation}: {e}")
        if args.budget is not None and args.budget != sum(counts.values()):
            p.error(f"--allocation {args.allocation} spends {sum(counts.values())} experts but --budget is {args.budget}; "
                    f"make them agree, or leave --budget out to spend the file's {sum(counts.values())}")
        args.allocation, args.budget = counts, sum(counts.values())
    if args.budget is None:
        args.budget = n_candidates  # plain LoRA's count: one expert per candidate on average; always valid
    if args.allocation is None and args.alloc in ("sensitivity", "random") and args.budget > n_tasks * n_candidates:
        p.error(f"--budget must be from 1 to {n_tasks * n_candidates} (tasks x candidate matrices = "
                f"{n_tasks} x {n_candidates}), got {args.budget}")
    if args.allocation is None and args.alloc == "uniform":
        try:
            allocate_uniform(range(n_candidates), args.budget)
        except ValueError as e:
            p.error(f"--budget: {e}")
    # what can be known of the allocation before the base exists: the counts themselves (a file, uniform,
    # mola) or a bound on the largest (votes: one expert per task; alpha: the budget)
    def trainable(n, m):  # an adapter of n experts on matrix m: n LoRA pairs (B A), and a router when n > 1
        return n * (args.rank * (m.in_features + m.out_features) + (m.in_features if n > 1 else 0))
    known = args.allocation or args.alloc in ("uniform", "mola")
    if known:
        counts = args.allocation or (allocate_uniform(candidates, args.budget) if args.alloc == "uniform"
                                     else allocate_mola(candidates, args.budget))
        largest, why = max(counts.values()), ""
        n_adapter = sum(trainable(n, shapes.get_submodule(name)) for name, n in counts.items())
    else:
        largest, why = ((n_tasks, ", one per task at most") if args.alloc in ("sensitivity", "random") and n_tasks < args.budget
                        else (args.budget, ", the budget"))
        n_adapter = args.budget * max(trainable(2, shapes.get_submodule(name)) // 2 for name in candidates)  # at most
    rule = "the allocation" if args.allocation else f"the {args.alloc} allocation"
    check_top_k(args.top_k, largest, f"{rule} can give", why)
    n_base = sum(p.numel() for p in shapes.parameters())
    if n_adapter > n_base and not args.allow_large:
        p.error(f"--budget {args.budget} at --rank {args.rank} would train {'' if known else 'up to '}{n_adapter:,} "
                f"parameters, more than the base model's {n_base:,}; use a smaller --budget or --rank, "
                "or add --allow-large to train it anyway")


def check_top_k(top_k, largest, source, why=""):
    """A --top-k given by hand may not exceed the largest expert count (the default top-2 is clamped per
    matrix instead). parse_args checks what the rule can give; allocate() the counts once known."""
    if top_k is not None and top_k > largest:
        fail(f"--top-k {top_k} is more than the largest expert count {source} ({largest}{why}); "
             f"use --top-k {largest} or less, a larger --budget, or leave --top-k out")


def check_device(p, args, types=("cpu", "cuda", "mps")):
    """Resolve --device auto (cuda, then mps, then cpu, among `types`) and --dtype auto (bf16
    autocast on a CUDA GPU that supports it, else fp32) in place; p.error names what this
    machine lacks. Returns the torch.device. bench/bench.py uses it too."""
    if args.device == "auto":
        available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
        args.device = next(t for t in ("cuda", "mps", "cpu") if t in types and available[t])
    names = ["auto"] + [n for t in types for n in ((t, f"{t}:N") if t == "cuda" else (t,))]
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in types:
        p.error(f"--device must be {', '.join(names[:-1])} or {names[-1]}, got {args.device!r}")
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        p.error(f"--device {args.device}: no such CUDA device here (use cpu or auto)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        p.error(f"--device {args.device}: MPS is not available here (use cpu or auto)")
    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
    if args.dtype == "auto":
        args.dtype = "bf16" if device.type == "cuda" and bf16_ok else "fp32"
    if args.dtype == "bf16" and not bf16_ok:
        p.error(f"--dtype bf16: this GPU ({torch.cuda.get_device_name(device)}) has no bfloat16 support; use --dtype fp32")
    return device


def check_folders(p, args):
    """--out and --cache tried, not predicted: each is created with a file in it, then what was created is
    removed again, so that a refused run leaves nothing and an accepted one cannot fail later for want of a
    folder (os.access says yes to root in /proc, on a read-only mount, ...). Then --resume's checkpoint."""
    for flag, folder in (("--out", args.out), ("--cache", args.cache)):
        if os.path.exists(folder) and not os.path.isdir(folder):
            p.error(f"{flag} {folder!r} is a file; give a folder to write into")
        existed = os.path.isdir(folder)
        try:
            if rank() == 0:  # [ddp] only rank 0 writes, so only it tries: ranks removing each other's trial folders would collide
                try_writing(folder)
        except OSError as e:
            p.error(f"{flag} {folder!r} {'is not writable' if existed else 'cannot be created'} "
                    f"({e.strerror or type(e).__name__}); give a writable folder")
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    if args.resume and not os.path.isfile(ckpt_path):
        p.error(f"--resume: there is no checkpoint {ckpt_path} to resume from; run without --resume to start afresh")
    for file in ("allocation.json", "results.json", "adapter.pt", "checkpoint.pt"):
        if os.path.isdir(os.path.join(args.out, file)):
            p.error(f"--out {args.out!r} holds a folder named {file}, where train.py writes that file; "
                    "move it away or give another --out")


def try_writing(folder):
    """Create `folder` (parents too) and a file in it, then remove the file and the folders this created.
    Raises OSError where that cannot be done."""
    created, path = [], os.path.abspath(folder)
    while not os.path.exists(path):
        created.append(path)  # deepest first
        path = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".train-py-", suffix=".tmp"):
            pass
    finally:
        for path in created:
            with contextlib.suppress(OSError):  # gone already, or another run now uses it
                os.rmdir(path)


def check_prompt(prompt):
    """A prompt the toy can read: 1 to BLOCK_SIZE - 1 characters of its vocabulary; else ValueError."""
    if not 1 <= len(prompt) < data.BLOCK_SIZE or any(c not in data.VOCAB[1:] for c in prompt):
        raise ValueError(f"{prompt!r}: give 1 to {data.BLOCK_SIZE - 1} characters from {data.VOCAB[1:]}, "
                         "e.g. 'A12+34=' or 'Rabc=' (tags: " + ", ".join(f"{v} {k}" for k, v in data.TAGS.items()) + ")")


def read_allocation(path, candidates):
    """An allocation file in the format train.py writes, {module name: expert count} with zero
    counts left out, checked against the candidate matrices. Returns {name: count} for the counts
    >= 1, in module order. Anything else raises ValueError saying what is wrong, for example
    {"layers.0.attn.q_proj": 1.0} (a count must be a whole number, not 1.0 or true)."""
    def no_duplicates(pairs):
        names = [name for name, _ in pairs]
        twice = [name for name in names if names.count(name) > 1]
        if twice:
            raise ValueError(f"names {twice[0]!r} twice")
        return dict(pairs)
    try:
        with open(path, encoding="utf-8") as f:
            counts = json.load(f, object_pairs_hook=no_duplicates)
    except OSError as e:
        raise ValueError(f"cannot be read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ValueError("is not a text file; expected a JSON object {module name: expert count}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"is not valid JSON ({e.msg}, line {e.lineno} column {e.colno}); "
                         "expected a JSON object {module name: expert count}") from None
    if not isinstance(counts, dict):
        raise ValueError(f"must hold a JSON object {{module name: expert count}}, not {json.dumps(counts)[:40]}")
    unknown = [name for name in counts if name not in candidates]
    if unknown:
        raise ValueError(f"names {unknown[0]!r}{f' and {len(unknown) - 1} more' if len(unknown) > 1 else ''}, not a "
                         f"candidate matrix; the {len(candidates)} candidates (set by --targets) are "
                         f"{', '.join(candidates[:3])}, ..., {candidates[-1]}")
    for name, n in counts.items():
        if type(n) is not int or n < 0:  # type(), not isinstance: true is a bool, not a count
            raise ValueError(f"the count for {name!r} must be a whole number >= 0, got {json.dumps(n)}")
    if sum(counts.values()) == 0:
        raise ValueError("gives no experts at all; give at least one matrix a count >= 1")
    return {name: counts[name] for name in candidates if counts.get(name, 0) > 0}

# -----------------------------------------------------------------------------
# torchrun: one process per device, as nanoGPT does; rank 0 alone prints and writes


def under_torchrun():
    return "RANK" in os.environ  # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK


def rank():
    return int(os.environ.get("RANK", 0))


def start_run(args, cfg):
    """Before phase 1: [ddp] the process group and this process's device; the --resume checkpoint read and
    checked, so that a mismatch costs nothing; the run's header line. Returns (device, checkpoint or None)."""
    device = torch.device(args.device)
    if under_torchrun():
        if device.type == "cuda":
            device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}")
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        if rank() > 0:
            sys.stdout = open(os.devnull, "w")  # only rank 0 prints; bars are off there too, and write_atomic skips
        tqdm.write(f"torchrun: {dist.get_world_size()} processes ({dist.get_backend()}), each sampling its own batches "
                   f"of {args.batch_size}; sensitivity sums the scores of every rank's batches")
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    try:
        ckpt = read_checkpoint(ckpt_path, run_config(args, cfg)) if args.resume else None
    except ValueError as e:
        fail(f"--resume: {e}")
    tqdm.write(f"device {device}, tasks {', '.join(args.tasks)}, budget {args.budget}, "
               f"allocation {'from --allocation' if args.allocation else args.alloc}, seed {args.seed}")
    if not args.resume and unfinished_checkpoint(ckpt_path):
        tqdm.write(f"   note: this run will replace {ckpt_path}, which holds an unfinished run; "
                   "stop now and add --resume to continue that run instead")
    return device, ckpt


@contextlib.contextmanager
def rank_0_first():
    """[ddp] Rank 0 runs the block first (it pretrains and caches the base); the others wait, then run it."""
    if dist.is_initialized() and dist.get_rank() > 0:
        dist.barrier()
    yield
    if dist.is_initialized() and dist.get_rank() == 0:
        dist.barrier()


def sum_over_ranks(sensitivity, candidates, device):
    """[ddp] The scores summed over every rank's batches; unchanged in a single process."""
    if not dist.is_initialized():
        return sensitivity
    scores = torch.tensor([[s[m] for m in candidates] for s in sensitivity.values()], dtype=torch.float64, device=device)
    dist.all_reduce(scores)  # (tasks, candidates), summed in place
    return {t: dict(zip(candidates, row)) for t, row in zip(sensitivity, scores.tolist())}


def check_ranks_agree(allocation):
    """[ddp] Fail loudly if any rank reached a different allocation."""
    if dist.is_initialized():
        allocations = [None] * dist.get_world_size()
        dist.all_gather_object(allocations, allocation)
        if any(a != allocation for a in allocations):
            raise RuntimeError(f"ranks disagree on the allocation: {allocations}")


def for_training(model, device):
    """[ddp] The model wrapped to average the adapter gradients over the ranks in backward (an expert
    without tokens gets zeros); the model itself in a single process."""
    if not dist.is_initialized():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def end_torchrun():
    if dist.is_initialized():
        dist.destroy_process_group()

# -----------------------------------------------------------------------------
# Signals: Ctrl-C (SIGINT) and SIGTERM (what `timeout`, Slurm preemption and Kubernetes send) stop a
# run alike. In the training loops the first one is a request, honoured between steps; a second one,
# and any outside the loops, stops at once. The exit status is the shell's 128 + signal number.

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum):
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


class Interrupted(Exception):
    """A signal stopped the run at once; str() is the line to print, exit status 128 + signum."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum


@contextlib.contextmanager
def stop_requests(enabled=True, second=lambda: "no file was left half-written"):
    """Inside the block SIGINT and SIGTERM only append their number to the list it yields, which a
    training loop reads between steps; a second one raises Interrupted at once, its message ending
    in second(). A signal ignored when the process started stays ignored: a background job of a
    script starts with SIGINT ignored, so Ctrl-C in the terminal does not reach it (SIGTERM does).
    enabled=False ([ddp], or outside the main thread) leaves the handlers alone. Puts them back on leaving."""
    stop = []
    def request(signum, frame):
        if stop:
            raise Interrupted(signum, f"stopped at once by a second {signal_name(signum)}; {second()}")
        stop.append(signum)
    enabled = enabled and threading.current_thread() is threading.main_thread()
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s, handler in previous.items():
        if enabled and handler is not signal.SIG_IGN:
            signal.signal(s, request)
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            if enabled and handler is not signal.SIG_IGN:
                signal.signal(s, signal.SIG_DFL if handler is None else handler)


def stop_run(signum, message):
    """Stop as a signal asked: one line on stderr, exit status 128 + signum."""
    print(f"train.py: {message}", file=sys.stderr)
    sys.exit(128 + signum)


def stop_pretraining(signum, step, steps, took, bar):
    bar.close()
    stop_run(signum, f"pretraining stopped by {signal_name(signum)} after step {step} of {steps}; nothing was cached, "
             "the next run pretrains from step 0 again" + (f" (about {took / step * steps:.0f} s)" if step else ""))

# -----------------------------------------------------------------------------
# Non-finite values: a loss or gradient that is NaN or infinite stops training with one line


def note_nonfinite(bad_step, step, loss, params):
    """Record in bad_step (2,) the first step (counted from 1) whose loss, gradient norm over
    `params` is not finite. Stays on the device: no wait for it at every step."""
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    bad = ~torch.isfinite(torch.stack([loss.detach(), grad_norm]))
    return torch.where(bad & (bad_step == 0), step + 1, bad_step)


def stop_if_nonfinite(bad_step, phase, note):
    """bad_step: (2,) the first step (counted from 1) whose loss, gradient was not finite, 0 while
    none was. Reading it waits for the device, so the loops read it only at their log and
    checkpoint cadence; the step it names is exact all the same."""
    loss_step, grad_step = bad_step.tolist()
    if loss_step or grad_step:
        what, step = ("loss", loss_step) if loss_step and (not grad_step or loss_step <= grad_step) else ("gradient", grad_step)
        fail(f"non-finite {what} at {phase} step {step}; training stopped{note}")

# -----------------------------------------------------------------------------
# Checkpoints and resume: a run stopped between steps continues exactly as if it had never stopped

# settings a resumed run may change (nothing that changes the numbers)
RESUME_FREE = ("resume", "out", "cache", "device", "checkpoint_every", "allow_large", "evaluate", "prompt")
CHECKPOINT_KEYS = {"step", "config", "allocation", "adapter", "optimizer", "history", "curve", "rng"}


def run_config(args, cfg):
    """Every setting that changes a run's numbers, and the cached base it starts from: what a checkpoint
    records and --resume must match."""
    return {k: v for k, v in vars(args).items() if k not in RESUME_FREE} | {"base": os.path.basename(base_cache(args, cfg)[0])}


def kept(path, step):
    """What a run stopped now leaves behind, for the line that says so."""
    if step is None:
        return " before any checkpoint was saved"
    return f", the last good checkpoint (after step {step}) is kept in {path}"


def rng_state(rng, device):
    return {"data": rng.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}


def save_checkpoint(path, state, bad_step, saved, stop, bar):
    """Write `state` to `path` whole, after checking that no loss or gradient so far was non-finite (a
    broken run never replaces a good checkpoint); then stop with one line if a signal asked to. Returns
    the step now saved."""
    stop_if_nonfinite(bad_step, "fine-tuning", kept(path, saved))
    write_atomic(path, lambda p: torch.save(state, p))
    if stop:
        bar.close()
        if state["step"] == state["config"]["steps"]:  # asked during the last step: stop all the same, as asked
            stop_run(stop[0], f"stopped by {signal_name(stop[0])} after the last fine-tuning step; saved {path}, "
                     "add --resume to the same flags to write the results")
        stop_run(stop[0], f"stopped by {signal_name(stop[0])} after fine-tuning step {state['step']} of "
                 f"{state['config']['steps']}; saved {path}, continue with the same flags plus --resume")
    return state["step"]


def resume(ckpt, path, allocation, model, optimizer, rng, device):
    """Put a checked checkpoint's adapter, optimizer and random states back. Returns (step, history, curve)."""
    if ckpt["allocation"] != allocation:
        fail(f"--resume: {path} trained another allocation than this run computes (the base or the code changed); "
             "start afresh with another --out")
    try:
        set_adapter(model, ckpt["adapter"])
        optimizer.load_state_dict(ckpt["optimizer"])
        rng.setstate(ckpt["rng"]["data"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        fail(f"--resume: {path} does not fit this run ({str(e).splitlines()[0][:300] if str(e) else type(e).__name__})")
    tqdm.write(f"   resuming from {path} after step {ckpt['step']}")
    return ckpt["step"], ckpt["history"], ckpt["curve"]


def read_checkpoint(path, config):
    """The checkpoint to resume from (parse_args made sure there is one), checked: readable, complete, and
    made with the same `config` (every setting that changes the run's numbers, and its cached base)."""
    ckpt = read_torch(path)
    if not isinstance(ckpt, dict) or set(ckpt) != CHECKPOINT_KEYS or not isinstance(ckpt["config"], dict):
        raise ValueError(f"{path} is not a checkpoint written by train.py (expected {', '.join(sorted(CHECKPOINT_KEYS))})")
    saved = ckpt["config"]
    changed = []
    for k in sorted(set(saved) | set(config)):
        if saved.get(k) != config.get(k):  # lists (--tasks, --targets) shown as typed
            old, new = (",".join(map(str, v)) if isinstance(v, list) else repr(v) for v in (saved.get(k), config.get(k)))
            changed.append(f"{'--' + k.replace('_', '-') if k != 'base' else 'pretrained base'} {old} -> {new}")
    if changed:
        raise ValueError(f"{path} was made with other settings ({'; '.join(changed)}); "
                         "resume with the checkpoint's settings, or start afresh with another --out")
    if not isinstance(ckpt["step"], int) or not 0 <= ckpt["step"] <= config["steps"]:
        raise ValueError(f"{path} records step {ckpt['step']!r}, not one of 0..{config['steps']}")
    if not (isinstance(ckpt["history"], list) and isinstance(ckpt["curve"], list) and isinstance(ckpt["rng"], dict)
            and isinstance(ckpt["allocation"], dict)):
        raise ValueError(f"{path} is damaged: its history, curve, rng or allocation has the wrong type")
    return ckpt


def unfinished_checkpoint(path):
    """Whether `path` holds a checkpoint that --resume could still continue: False when there is none
    or it is a finished run's (its step is its --steps; adapter.pt and results.json hold its outcome),
    True otherwise, an unreadable file included (a new run replacing it deserves a note)."""
    if not os.path.exists(path):
        return False
    try:
        ckpt = read_torch(path)
        return ckpt["step"] < ckpt["config"]["steps"]
    except (ValueError, TypeError, KeyError):
        return True


def start_writing(args):
    """Before a run's first file in --out: the folder exists, and a fresh run (not --resume) removes the
    previous run's checkpoint.pt, results.json and adapter.pt, so that the folder never holds two runs'
    files side by side (a stopped run's allocation.json beside an older run's results)."""
    if rank() > 0:
        return
    os.makedirs(args.out, exist_ok=True)
    for file in ([] if args.resume else ["checkpoint.pt", "results.json", "adapter.pt"]):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(args.out, file))

# -----------------------------------------------------------------------------
# Files: written whole or not at all, read back safely and checked, never trusted blindly


def write_atomic(path, write):
    """write(tmp_path), then rename over `path`: a crash or Ctrl-C never leaves a half-written file,
    and the previous version of `path` stays intact until the new one is complete. The temporary
    file is unique (tempfile), in the same folder, so runs sharing a --cache never collide.
    Under torchrun only rank 0 writes; the other ranks hold the same results."""
    if rank() > 0:
        return
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # the permissions of a plain open(path, "w"), not mkstemp's owner-only 0o600
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    """obj as indented JSON at `path`, written atomically (write_atomic)."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(json.dumps(obj, indent=2) + "\n")
    write_atomic(path, write)


def read_torch(path, name=None):
    """torch.load with weights_only=True: tensors and plain containers only, never code from the
    file. Anything unreadable raises a one-line ValueError about `name` (default: the path)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, garbage bytes, a pickle asking for code: all unreadable
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        reason = next((line for line in lines if line.startswith("WeightsUnpickler error:")), lines[0])
        reason = reason.removeprefix("WeightsUnpickler error: ").split(". ")[0][:100]  # the first sentence of torch's words
        raise ValueError(f"{name or path} cannot be read ({reason}); it is truncated, corrupt, "
                         "or holds more than tensors and plain data") from None


def base_cache(args, cfg):
    """Where the pretrained base is cached, and the key it is cached under: everything that shapes
    the base (model configuration, a fingerprint of the data, base seed, pretraining settings)."""
    fingerprint = [data.sample(t, random.Random(i), "train") for t in data.PRETRAIN_TASKS for i in range(16)]  # changes if data.py does
    key = json.dumps({"model": dataclasses.asdict(cfg), "data": fingerprint, "seed": args.base_seed,
                      "steps": args.pretrain_steps, "batch_size": args.pretrain_batch_size, "lr": args.pretrain_lr}, sort_keys=True)
    return os.path.join(args.cache, f"base-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"), key


def load_base(model, path, key):
    """Load the cached pretrained base into `model` if `path` holds one built with exactly `key`
    (names, shapes and finite values checked before anything is copied). Returns "" when loaded,
    otherwise why not, and `model` is left untouched: the caller pretrains it afresh."""
    if not os.path.exists(path):
        return "none cached yet"
    try:
        saved = read_torch(path, name="the cached file")
    except ValueError as e:
        return str(e)
    if not isinstance(saved, dict) or saved.get("key") != key or not isinstance(saved.get("model"), dict):
        return "the cached file was built with other settings or another version of train.py"
    state, expected = saved["model"], model.state_dict()
    if set(state) != set(expected) or any(not isinstance(state[k], torch.Tensor) or state[k].shape != v.shape
                                          for k, v in expected.items()):
        return "the cached file holds weights of another model shape"
    if not all(torch.isfinite(t).all() for t in state.values()):
        return "the cached file holds weights that are not finite"
    model.load_state_dict(state)
    return ""


def load_adapter_file(model, path):
    """A saved adapter.pt on a fresh base `model` (a GPT holding the same pretrained weights):
    checked, then smoe.load_adapter wraps the matrices its allocation names with its r, alpha and
    top-k and loads its LoRA and router weights, after checking that the adapted base matrices are
    the ones it was trained on (their sha256 fingerprint). The result computes exactly what the
    fine-tuned model computed. A file that is unreadable or made for another model or base raises ValueError."""
    saved = read_torch(path)
    if (not isinstance(saved, dict) or not {"adapter", "allocation", "model_config", "lora"} <= set(saved)
            or not isinstance(saved["allocation"], dict)):
        raise ValueError(f"{path} is not an adapter saved by train.py (expected adapter, allocation, model_config, lora)")
    if saved["model_config"] != dataclasses.asdict(model.cfg):
        raise ValueError(f"{path} was trained on a model with {saved['model_config']}, this one has {dataclasses.asdict(model.cfg)}")
    if not isinstance(saved["lora"], dict) or set(saved["lora"]) != {"r", "lora_alpha", "top_k"}:
        raise ValueError(f"{path}: 'lora' must give r, lora_alpha and top_k, got {saved['lora']!r}")
    return load_adapter(model, saved)

# -----------------------------------------------------------------------------
# A finished run, loaded back without training: python train.py --out out --evaluate (or --prompt A12+34=)


def load_trained(out_dir, device="cpu", adapter=True):
    """The fine-tuned model a finished run left in `out_dir`: its pretrained base from the cache (found
    from the run's settings in results.json, checked by load_base) with adapter.pt loaded on it
    (load_adapter_file), in eval mode on `device`; adapter=False gives the base alone.
    Returns (model, results), results being the run's results.json. A missing or unfitting file
    raises ValueError saying which. From Python:

        model, results = load_trained("out")
        answer(model, "A12+34=")  # '640.' once the run has learned add (46, units first)
    """
    paths = {name: os.path.join(out_dir, name) for name in ("results.json", "adapter.pt")}
    missing = [path for path in paths.values() if not os.path.isfile(path)]
    if missing:
        raise ValueError(f"{missing[0]} is missing; a finished run writes it (a stopped one: finish it with --resume)")
    cfg = toy_config()
    try:
        with open(paths["results.json"], encoding="utf-8") as f:
            results = json.load(f)
        cache, key = base_cache(argparse.Namespace(**results["config"]), cfg)  # the run's own settings
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{paths['results.json']} is not the results of a train.py run ({type(e).__name__}: {e})") from None
    if not os.path.exists(cache):  # the run's cache folder, or out_dir (the default cache) moved elsewhere
        cache = os.path.join(out_dir, os.path.basename(cache))
    model = GPT(cfg)
    reason = load_base(model, cache, key)
    if reason:
        raise ValueError(f"the run's pretrained base {cache} cannot be used: {reason}")
    if adapter:
        load_adapter_file(model, paths["adapter.pt"])
    return model.to(device).eval(), results


def answer(model, prompt):
    """The model's greedy answer to one prompt, up to and including its final "." (generate would write
    on past it): answer(model, "A12+34=") -> "640." once add is learned. A prompt the toy cannot
    read raises ValueError."""
    check_prompt(prompt)
    head, dot, _ = generate(model, [prompt], data.BLOCK_SIZE + 1 - len(prompt), next(model.parameters()).device)[0].partition(".")
    return head + dot


def inspect_run(args):
    """--prompt and --evaluate: the run in --out answers without training. --evaluate prints phase 6's
    table for its held-out sets again, re-evaluated, and returns what print_report does."""
    device = torch.device(args.device)
    try:
        model, results = load_trained(args.out, device)
        base = load_trained(args.out, device, adapter=False)[0] if args.evaluate else None
    except ValueError as e:
        fail(f"--out {args.out}: {e}")
    for prompt in args.prompt or []:
        print(prompt + answer(model, prompt))
    if args.evaluate:
        config = results["config"]
        eval_sets = {t: data.eval_set(t, config["eval_examples"]) for t in config["tasks"]}
        return print_report(eval_sets, model_answers(base, eval_sets, device), model_answers(model, eval_sets, device))


if __name__ == "__main__":
    def stop_now(signum, frame):  # outside the training loops, which stop between steps themselves
        raise Interrupted(signum, f"stopped by {signal_name(signum)}; no file was left half-written")
    for s in STOP_SIGNALS:
        if signal.getsignal(s) in (signal.SIG_DFL, signal.default_int_handler):  # an ignored signal stays ignored
            signal.signal(s, stop_now)
    try:
        args = parse_args()
        if args.evaluate or args.prompt:
            inspect_run(args)
        else:
            main(args)
    except Interrupted as e:
        print(f"train.py: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
