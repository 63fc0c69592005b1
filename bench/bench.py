"""
How fast is LoRA-SMoE next to plain LoRA? Three measurements, each taken side by side in one
process: the candidates of a group run in turn, round after round, and each reports the median
of its rounds, so that machine noise hits them all alike.

  1. layer        forward + backward of one LoRAMoELinear over d, E, k, r at N tokens, against
                  the frozen base nn.Linear alone, plain LoRA of rank r and of rank E*r, and the
                  naive per-expert loop of common LoRA-MoE code (checked equal to the layer first)
  2. step         one fine-tuning step of train.py's tiny GPT (forward, ce + aux_coef * aux,
                  backward, AdamW) under a budget-16 sensitivity allocation against plain LoRA on
                  all 16 candidate matrices (v_proj and up_proj of 8 layers): time and peak memory
  3. sensitivity  the sensitivity phase's time as a fraction of the fine-tuning phase's, both at
                  train.py's defaults

Run from the repository root:
    python bench/bench.py           the full grid (a few minutes on a 2-core CPU)
    python bench/bench.py --quick   a smaller grid, to check that everything runs
Tables print as Markdown. Milliseconds are per call (layer) or per step (step). On CUDA every
timing is bracketed by torch.cuda.synchronize().

References: [1] LoRA-SMoE, arXiv 2505.06272; [2] LoRA, arXiv 2106.09685; [3] Hugging Face
transformers, MixtralSparseMoeBlock (the per-expert gather / index_add loop).
"""

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # smoe.py, data.py
import data  # noqa: E402
from smoe import (GPT, GPTConfig, LoRAMoELinear, allocate_experts, apply_lora_moe, candidate_names,  # noqa: E402
                  compute_sensitivity, moe_aux_loss)

# train.py's defaults, the setting the step and sensitivity measurements describe
RANK, ALPHA, TOP_K, AUX_COEF, LR, BATCH_SIZE, SENS_BATCHES, STEPS = 8, 16.0, 2, 0.01, 1e-2, 32, 4, 1500  # train.py's defaults
TARGETS = ("v_proj", "up_proj")
BUDGET = 16

# -----------------------------------------------------------------------------
# Timing side by side


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_side_by_side(fns, rounds, device, desc, min_seconds=0.02):
    """{name: median seconds per call of fn()}. Each candidate is warmed up, then timed over
    enough calls to last about min_seconds; the candidates take turns, round after round."""
    pbar = tqdm(total=rounds + 1, desc=desc, unit="round", dynamic_ncols=True, leave=False)  # warm-up, then rounds
    inner = {}
    for name, fn in fns.items():
        fn()  # first call: allocations, kernel selection
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        inner[name] = max(1, math.ceil(min_seconds / (time.perf_counter() - t0)))
    pbar.update()
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            sync(device)
            samples[name].append((time.perf_counter() - t0) / inner[name])
        pbar.update()
    pbar.close()
    return {name: statistics.median(s) for name, s in samples.items()}


def markdown(header, rows):
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"] + [line(r) for r in rows])

# -----------------------------------------------------------------------------
# 1. The layer against the frozen base, plain LoRA and the naive per-expert loop


class LoRALinear(nn.Module):
    """Plain LoRA as PEFT writes it [2]: base(x) + scaling * lora_B(lora_A(x))."""

    def __init__(self, base, r, lora_alpha=ALPHA):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device)
        self.scaling = lora_alpha / r

    def forward(self, x):
        return self.base(x) + self.scaling * self.lora_B(self.lora_A(x))


def naive_lora_moe(layer, x):
    """LoRAMoELinear's output computed the way common LoRA-MoE code does it [3]: route with the
    layer's router and top-k, then for each expert gather the tokens routed to it, run its A then
    its B, scale by the gate and add the result back at those tokens with index_add."""
    xs = x.reshape(-1, x.shape[-1])                                 # (N, C)
    y = layer.base(xs)                                              # (N, out)
    logits = layer.router(xs)                                       # (N, E)
    top_logits, top_idx = logits.topk(layer.top_k, dim=-1)          # (N, k)
    if layer.top_k == 1:  # the layer's top-1 gate: the full-softmax probability (Switch)
        gates = F.softmax(logits, dim=-1).gather(-1, top_idx)       # (N, 1)
    else:
        gates = F.softmax(top_logits, dim=-1)                       # (N, k)
    delta = torch.zeros_like(y)                                     # (N, out)
    for i in range(layer.num_experts):
        token, slot = torch.where(top_idx == i)                     # (n_i,) tokens routed to expert i; a host sync on CUDA
        h = xs[token] @ layer.lora_A[i].t()                         # (n_i, r)
        out = (h @ layer.lora_B[i].t()) * (layer.scaling * gates[token, slot, None])  # (n_i, out)
        delta.index_add_(0, token, out.to(delta.dtype))
    return (y + delta).view(*x.shape[:-1], -1)


def check_naive_equals_layer(layer, x, grad):
    """Outputs and gradients (input, A, B, router) of the naive loop and the layer agree, in float32."""
    results = []
    for fn in (layer, lambda x: naive_lora_moe(layer, x)):
        xg = x.detach().clone().requires_grad_(True)
        params = [layer.lora_A, layer.lora_B, layer.router.weight]
        for p in params:
            p.grad = None
        y = fn(xg)
        y.backward(grad)
        results.append([y.detach(), xg.grad] + [p.grad.clone() for p in params])
    for name, a, b in zip(("output", "input grad", "lora_A grad", "lora_B grad", "router grad"), *results):
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item()):
            sys.exit(f"bench.py: the naive loop's {name} differs from LoRAMoELinear's by "
                     f"{(a - b).abs().max().item():.3e} at d={layer.base.in_features}, E={layer.num_experts}, "
                     f"k={layer.top_k}, r={layer.r}; the comparison would not be fair")


def bench_layer(args, device, ctx, compute_dtype):
    tqdm.write(f"\n1. layer: forward + backward at N = {args.tokens} tokens, {'bf16 autocast' if args.dtype == 'bf16' else 'float32'}, "
               f"{device}; milliseconds per call, median of {args.rounds} rounds; extra = time above the base layer's")
    rows, results = [], {}
    for d in args.dims:
        torch.manual_seed(d)
        base = nn.Linear(d, d, bias=False, device=device).requires_grad_(False)
        x = torch.randn(args.tokens, d, device=device, requires_grad=True)  # as inside a network: dL/dx is needed
        grad = torch.randn(args.tokens, d, device=device)
        configs = [(E, k, r) for r in args.ranks for E in (1, 2, 4, 8) for k in ((1,) if E == 1 else (1, 2))]
        candidates = {"base": (base, base)}  # name: (function of x, module whose parameters it trains)
        for r in sorted({E * r for E, _, r in configs}):
            lora = LoRALinear(base, r)
            candidates[f"lora {r}"] = (lora, lora)
        for E, k, r in configs:
            layer = LoRAMoELinear(base, E, r=r, lora_alpha=ALPHA, top_k=k)
            nn.init.normal_(layer.lora_B, std=0.1)  # nonzero B, so that the equality check below means something
            candidates[f"moe {E} {k} {r}"] = (layer, layer)
            if E > 1:
                check_naive_equals_layer(layer, x, grad)
                candidates[f"naive {E} {k} {r}"] = (lambda x, layer=layer: naive_lora_moe(layer, x), layer)

        def fwd_bwd(fn, module):
            params = [p for p in module.parameters() if p.requires_grad]
            g = grad.to(compute_dtype)

            def run():
                x.grad = None
                for p in params:
                    p.grad = None  # as optimizer.zero_grad(set_to_none=True) leaves them
                with ctx:
                    y = fn(x)
                y.backward(g)
            return run

        seconds = time_side_by_side({name: fwd_bwd(*c) for name, c in candidates.items()}, args.rounds, device,
                                    desc=f"layer d={d}, {len(candidates)} candidates")
        ms = {name: 1e3 * t for name, t in seconds.items()}
        for E, k, r in configs:
            v = {"base": ms["base"], "lora_r": ms[f"lora {r}"], "lora_Er": ms[f"lora {E * r}"],
                 "moe": ms[f"moe {E} {k} {r}"], "naive": ms.get(f"naive {E} {k} {r}")}
            results[(d, E, k, r)] = v
            naive = v["naive"] is not None
            cells = [v["base"], v["lora_r"], v["lora_Er"], v["naive"], v["moe"], v["moe"] / v["base"],
                     v["moe"] / v["lora_r"], v["moe"] / v["lora_Er"], naive and v["naive"] / v["moe"],
                     naive and (v["naive"] - v["base"]) / (v["moe"] - v["base"])]
            rows.append([d, E, k, r] + ["-" if c is None or c is False else f"{c:.2f}" for c in cells])
    tqdm.write(markdown(["d", "E", "k", "r", "base", "LoRA r", "LoRA E*r", "naive", "MoE", "MoE/base", "MoE/LoRA r",
                         "MoE/LoRA E*r", "naive/MoE", "naive extra/MoE extra"], rows))
    return results

# -----------------------------------------------------------------------------
# 2. A fine-tuning step: budget-16 sensitivity allocation against plain LoRA on every candidate


def train_step(model, optimizer, batch, ctx):
    x, y = batch
    with ctx:
        _, ce = model(x, y)
        aux = moe_aux_loss(model, mask=x != data.STOI[data.PAD])  # the real tokens, as train.py
    loss = ce + AUX_COEF * aux
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def lora_model(cfg, allocation, device, seed):
    torch.manual_seed(seed)  # the same base weights for every candidate
    model = apply_lora_moe(GPT(cfg).to(device), allocation, r=RANK, lora_alpha=ALPHA, top_k=TOP_K)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    return model, optimizer


def peak_memory(cfg, allocation, batch, ctx, device, seed):
    """Peak bytes of tensors while a fresh model (base weights, adapters), its AdamW and three
    training steps live: weights, activations, gradients, optimizer state and temporaries.
    CUDA: torch.cuda.max_memory_allocated above what was allocated before. CPU, which keeps no
    such counter: the running total of the profiler's allocation records, each operator's
    allocations counted when it starts and its frees when it ends."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        model, optimizer = lora_model(cfg, allocation, device, seed)
        for _ in range(3):
            train_step(model, optimizer, batch, ctx)
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        model, optimizer = lora_model(cfg, allocation, device, seed)
        for _ in range(3):
            train_step(model, optimizer, batch, ctx)
    changes = sorted((e.time_range.start if e.self_cpu_memory_usage > 0 else e.time_range.end, e.self_cpu_memory_usage)
                     for e in prof.events() if e.self_cpu_memory_usage != 0)
    now = peak = 0
    for _, change in changes:
        now += change
        peak = max(peak, now)
    return peak


def host_syncs_in_step(model, optimizer, batch, ctx):
    """CUDA only: how many device-to-host synchronisations one training step makes."""
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_step(model, optimizer, batch, ctx)
    torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def sensitivity_allocation(cfg, device, seed):
    """train.py's phase 2 on a randomly initialised base model: sensitivity at its defaults. Returns the candidate names and a function that runs the sensitivity phase on
    the base model (which it leaves as found) and returns the scores."""
    torch.manual_seed(seed)
    model = GPT(cfg).to(device)
    names = candidate_names(model, TARGETS)

    def phase():
        rng = random.Random(f"sensitivity-{seed}")
        task_batches = {t: [data.get_batch([t], BATCH_SIZE, rng) for _ in range(SENS_BATCHES)] for t in data.TASKS}
        return compute_sensitivity(model, task_batches, data.example_losses, names)  # as train.py
    return names, phase


def bench_step(args, device, ctx, cfg, names, allocation):
    plain = {name: 1 for name in names}
    rng = random.Random(f"bench-{args.seed}")
    batches = [tuple(t.to(device) for t in data.get_batch(list(data.TASKS), BATCH_SIZE, rng)) for _ in range(16)]
    candidates = {"LoRA-SMoE": lora_model(cfg, allocation, device, args.seed), "plain LoRA": lora_model(cfg, plain, device, args.seed)}
    fns = {}
    for name, (model, optimizer) in candidates.items():
        def run(model=model, optimizer=optimizer, i=[0]):
            train_step(model, optimizer, batches[i[0] % len(batches)], ctx)
            i[0] += 1
        fns[name] = run
    seconds = time_side_by_side(fns, args.step_rounds, device, desc="step", min_seconds=0.2)
    memory = {"LoRA-SMoE": peak_memory(cfg, allocation, batches[0], ctx, device, args.seed),
              "plain LoRA": peak_memory(cfg, plain, batches[0], ctx, device, args.seed)}
    tqdm.write(f"\n2. fine-tuning step of the tiny GPT, batch {BATCH_SIZE}, rank {RANK}, top-{TOP_K}, {device}; "
               f"milliseconds per step, median of {args.step_rounds} rounds; peak MB of tensors over building the model and "
               f"three steps ({'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'from the profiler'})")
    rows = []
    for name, (model, _) in candidates.items():
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        alloc = allocation if name == "LoRA-SMoE" else plain
        experts = f"{sum(n > 0 for n in alloc.values())} matrices, {sum(alloc.values())} experts"
        rows.append([name, experts, f"{trainable:,}", f"{1e3 * seconds[name]:.2f}", f"{memory[name] / 2**20:.2f}",
                     f"{seconds[name] / seconds['plain LoRA']:.2f}", f"{memory[name] / memory['plain LoRA']:.2f}"])
    tqdm.write(markdown(["adapters", "where", "trainable", "ms / step", "peak MB", "time ratio", "memory ratio"], rows))
    if device.type == "cuda":
        for name, (model, optimizer) in candidates.items():
            tqdm.write(f"   {name}: {host_syncs_in_step(model, optimizer, batches[0], ctx)} host syncs in one step "
                       "(torch.cuda.set_sync_debug_mode)")
    return seconds, memory, candidates["LoRA-SMoE"]

# -----------------------------------------------------------------------------
# 3. The sensitivity phase against the fine-tuning phase


def bench_sensitivity(args, device, ctx, phase, smoe_model, smoe_optimizer):
    rng = random.Random(f"finetune-{args.seed}")
    tasks = list(data.TASKS)

    def finetune_step():  # as train.py's loop: sample a batch, move it, step
        x, y = data.get_batch(tasks, BATCH_SIZE, rng)
        train_step(smoe_model, smoe_optimizer, (x.to(device), y.to(device)), ctx)

    seconds = time_side_by_side({"sensitivity": phase, "step": finetune_step}, args.sens_rounds, device,
                                desc="sensitivity vs fine-tuning", min_seconds=0.5)
    finetune = STEPS * seconds["step"]
    fraction = seconds["sensitivity"] / finetune
    tqdm.write(f"\n3. sensitivity phase ({len(tasks)} tasks x {SENS_BATCHES} batches of {BATCH_SIZE}, float32) "
               f"{seconds['sensitivity']:.2f} s; fine-tuning phase {STEPS} steps x {1e3 * seconds['step']:.2f} ms "
               f"= {finetune:.1f} s (per-step median of {args.sens_rounds} rounds times {STEPS}, evaluations left out); "
               f"sensitivity / fine-tuning = {100 * fraction:.2f}%")
    return fraction

# -----------------------------------------------------------------------------


def main(args):
    device = torch.device(args.device)
    bf16 = args.dtype == "bf16"
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    compute_dtype = torch.bfloat16 if bf16 else torch.float32
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    tqdm.write(f"device {device}{gpu}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
               f"{'bf16 autocast' if bf16 else 'float32'}{', quick' if args.quick else ''}")
    layer = bench_layer(args, device, ctx, compute_dtype)

    cfg = GPTConfig(vocab_size=len(data.VOCAB), block_size=data.BLOCK_SIZE)
    names, phase = sensitivity_allocation(cfg, device, args.seed)
    if args.allocation is None:
        allocation = allocate_experts(phase(), BUDGET)
        source = (f"computed by sensitivity + allocate_experts (budget {BUDGET}) on a randomly initialised base "
                  f"(seed {args.seed}); pass --allocation out/allocation.json to time train.py's")
    else:
        allocation = {name: args.allocation.get(name, 0) for name in names}
        source = f"read from {args.allocation_path}"
    tqdm.write(f"\nallocation timed in 2 and 3, {source}:")
    tqdm.write("layer " + " ".join(f"{t:>6}" for t in TARGETS))  # experts per matrix, one row per layer
    for i in range(cfg.n_layer):
        tqdm.write(f"{i:>5} " + " ".join(f"{allocation[n]:>6}" for n in names if n.startswith(f"layers.{i}.")))
    step_seconds, step_memory, (smoe_model, smoe_optimizer) = bench_step(args, device, ctx, cfg, names, allocation)
    fraction = bench_sensitivity(args, device, ctx, phase, smoe_model, smoe_optimizer)

    # the targets this benchmark was written against; the layer's are read at E = 8, k = 2, worst case over d and r
    e8k2 = {(d, r): v for (d, E, k, r), v in layer.items() if E == 8 and k == 2}
    slowest_naive = min(e8k2, key=lambda dr: e8k2[dr]["naive"] / e8k2[dr]["moe"])
    slowest_lora = max(e8k2, key=lambda dr: e8k2[dr]["moe"] / e8k2[dr]["lora_Er"])
    targets = [
        (f"layer E=8 k=2: naive / MoE >= 2 (worst: d={slowest_naive[0]} r={slowest_naive[1]})",
         e8k2[slowest_naive]["naive"] / e8k2[slowest_naive]["moe"], 2.0, True),
        (f"layer E=8 k=2: MoE / LoRA E*r <= 1.5 (worst: d={slowest_lora[0]} r={slowest_lora[1]})",
         e8k2[slowest_lora]["moe"] / e8k2[slowest_lora]["lora_Er"], 1.5, False),
        ("step time: LoRA-SMoE / plain LoRA <= 1.3", step_seconds["LoRA-SMoE"] / step_seconds["plain LoRA"], 1.3, False),
        ("step peak memory: LoRA-SMoE / plain LoRA <= 1.2", step_memory["LoRA-SMoE"] / step_memory["plain LoRA"], 1.2, False),
        ("sensitivity / fine-tuning <= 0.03", fraction, 0.03, False),
    ]
    tqdm.write("\ntargets:")
    for text, value, bound, at_least in targets:
        met = value >= bound if at_least else value <= bound
        tqdm.write(f"   {text:<62} {value:7.3f}  {'met' if met else 'missed'}")

# -----------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench.py", description="LoRA-SMoE against plain LoRA: the layer, a fine-tuning step, "
                                "the sensitivity phase.")
    p.add_argument("--quick", action="store_true", help="d in {128, 512}, r = 8 and fewer rounds: checks that everything runs")
    p.add_argument("--tokens", type=int, default=4096, help="tokens N per layer call, e.g. a batch of 8 x 512 (default 4096)")
    p.add_argument("--rounds", type=int, default=7, help="timing rounds per layer candidate; the median is reported (default 7)")
    p.add_argument("--allocation", default=None,
                   help="an allocation.json written by train.py to time instead of computing one on a random base")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 autocast on CUDA, float32 elsewhere (the equality check runs in float32)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed of the base weights and the data (default 0)")
    args = p.parse_args(argv)
    args.dims, args.ranks = ((128, 512), (8,)) if args.quick else ((128, 512, 1024), (4, 8))
    args.rounds = min(args.rounds, 3) if args.quick else args.rounds
    args.step_rounds, args.sens_rounds = (5, 3) if args.quick else (15, 5)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype == "auto":
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    args.allocation_path = args.allocation
    if args.allocation is not None:
        with open(args.allocation) as f:
            args.allocation = json.load(f)
        names = candidate_names(GPT(GPTConfig(vocab_size=len(data.VOCAB), block_size=data.BLOCK_SIZE)), TARGETS)
        unknown = sorted(set(args.allocation) - set(names))
        if unknown:
            p.error(f"--allocation {args.allocation_path}: {', '.join(unknown)} are not {', '.join(TARGETS)} of the tiny GPT")
    return args


if __name__ == "__main__":
    main(parse_args())
