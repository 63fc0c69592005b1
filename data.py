"""
A tiny synthetic, character-level multi-task dataset, and how a model is scored on it.

Every example is one line: a task tag, the input, "=", the answer, ".".

    Rbdaf=fadb.     reverse   the letters in reverse order
    Sbdaf=abdf.     sort      the letters in alphabetical order
    Hbdaf=cebg.     shift     each letter to the next one in the alphabet (j wraps to a)
    A7+48=550.      add       a digit plus a number below 100, least significant digit first (055)

The toy is an instrument for where experts go, so each task is meant to need a different part of
the network: reverse a new attention pattern (the position mirrored), sort attention by content,
shift a mapping of each token on its own, add the base's digit sums read from new places (its
operands are those of sums the other way round) with the carry passed on. Measured, the four still
rank the matrices much alike (experiments/README.md, "The toy"). add's answer comes least
significant digit first, as the carry flows, so that each digit depends only on what the decoder
has already seen.

The base model (base/ keeps the default one; train.py pretrains any other) learns two other tasks,
which teach it the alphabet, the digits and the line format, but none of the four: copy ("Cbdaf=bdaf.",
"C27+08=27+08.") and sums of a digit, or of a two-digit number and a digit ("F7+8=51.", "F27+8=53.").

The loss covers only the answer (after "="); prompt and padding targets are -1. An input whose
CRC-32 is divisible by 10 is held out from all training, pretraining included; evaluation draws
only from those (add's 1,000 inputs hold out 88). Everything is deterministic given a seed
(random.Random(seed)).
"""

import functools
import itertools
import random
import zlib

import torch
import torch.nn.functional as F

LETTERS = "abcdefghij"  # 10 letters keep sort and shift learnable by a tiny model in a minute of CPU
DIGITS = "0123456789"
TAGS = {"copy": "C", "sums": "F", "reverse": "R", "sort": "S", "shift": "H", "add": "A"}
TASKS = ("reverse", "sort", "shift", "add")  # the fine-tuning tasks
PRETRAIN_TASKS = ("copy", "sums")  # the base model's tasks
PAD = "_"
VOCAB = PAD + ".=+" + DIGITS + LETTERS + "".join(TAGS.values())
STOI = {ch: i for i, ch in enumerate(VOCAB)}
MIN_LEN, MAX_LEN = 3, 5  # letters per input: long enough that reverse and sort need attention, short enough for a CPU
BLOCK_SIZE = 1 + 2 * max(MAX_LEN, 5) + 1  # tag + input + "=" + answer + "." minus the last token, for the
# longest line: MAX_LEN letters, or copy's five-character "27+08"
EVAL_MOD = 10  # one input in EVAL_MOD is held out


def is_heldout(inp):
    return zlib.crc32(inp.encode()) % EVAL_MOD == 0


def random_input(task, rng):
    if task == "sums":  # a digit plus a digit, or a two-digit number plus a digit
        return f"{rng.randrange(10)}+{rng.randrange(10)}" if rng.random() < 0.5 else f"{rng.randrange(100):02d}+{rng.randrange(10)}"
    if task == "add":
        return f"{rng.randrange(10)}+{rng.randrange(100):02d}"  # sums' operands the other way round
    if task == "copy" and rng.random() < 0.25:
        return f"{rng.randrange(100):02d}+{rng.randrange(100):02d}"
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))


def answer(task, inp):
    if task == "copy":
        return inp
    if task == "sums":
        a, b = inp.split("+")
        return str(int(a) + int(b))[::-1]  # least significant digit first, as add
    if task == "reverse":
        return inp[::-1]
    if task == "sort":
        return "".join(sorted(inp))
    if task == "shift":
        return "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in inp)
    if task == "add":
        a, b = inp.split("+")
        return f"{int(a) + int(b):03d}"[::-1]  # least significant digit first: 7+48 = 055 -> "550"
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TAGS)}")


def sample(task, rng, split):
    """One (prompt, answer) pair of `task` from split "train" or "eval"."""
    while True:
        inp = random_input(task, rng)
        if is_heldout(inp) == (split == "eval"):
            return TAGS[task] + inp + "=", answer(task, inp) + "."


def encode(pairs):
    """(prompt, answer) pairs -> x, y of shape (B, BLOCK_SIZE); y is -1 outside the answer."""
    x = torch.full((len(pairs), BLOCK_SIZE), STOI[PAD], dtype=torch.long)
    y = torch.full((len(pairs), BLOCK_SIZE), -1, dtype=torch.long)
    for i, (prompt, ans) in enumerate(pairs):
        ids = [STOI[c] for c in prompt + ans]
        x[i, :len(ids) - 1] = torch.tensor(ids[:-1])
        y[i, len(prompt) - 1:len(ids) - 1] = torch.tensor(ids[len(prompt):])  # predict the answer only
    return x, y


def get_batch(tasks, batch_size, rng, split="train"):
    """A batch with each example's task drawn uniformly from `tasks`: x, y (B, BLOCK_SIZE)."""
    return encode([sample(rng.choice(tasks), rng, split) for _ in range(batch_size)])


def eval_set(task, n, seed=0):
    """n distinct held-out (prompt, answer) pairs of `task` (all it has, if fewer), the same for the same seed."""
    rng, seen, n = random.Random(f"eval-{task}-{seed}"), {}, min(n, heldout_size(task))
    while len(seen) < n:
        prompt, ans = sample(task, rng, "eval")
        seen[prompt] = ans
    return list(seen.items())


@functools.lru_cache(maxsize=None)
def heldout_size(task):
    """How many distinct held-out inputs `task` has: the most examples eval_set can return.
    add has the fewest (a digit plus a number below 100: 1,000 inputs); the letter tasks draw from the
    111,000 strings of 3 to 5 letters; copy draws from both kinds; sums from the 100 pairs of
    digits and the 1,000 pairs of a two-digit number and a digit."""
    if task not in TAGS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TAGS)}")
    words = ("".join(w) for n in range(MIN_LEN, MAX_LEN + 1) for w in itertools.product(LETTERS, repeat=n))
    inputs = {"copy": itertools.chain((f"{a:02d}+{b:02d}" for a in range(100) for b in range(100)), words),
              "sums": itertools.chain((f"{a}+{b}" for a in range(10) for b in range(10)),
                                      (f"{a:02d}+{b}" for a in range(100) for b in range(10))),
              "add": (f"{a}+{b:02d}" for a in range(10) for b in range(100))}.get(task, words)
    return sum(map(is_heldout, inputs))


def decode(ids):
    return "".join(VOCAB[i] for i in ids)

# -----------------------------------------------------------------------------
# Scoring a model (model(x) -> (logits (b, L, V), loss), as smoe.GPT)


def example_losses(model, batch):
    """(b,) each line's mean cross-entropy over its answer tokens: the per-example loss l(x) whose
    gradients the sensitivity squares. y is already shifted: y[l] is the token after x[l]."""
    device = next(model.parameters()).device
    x, y = (t.to(device) for t in batch)
    logits, _ = model(x)                                                                        # (b, L, V)
    ce = F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=-1, reduction="none")  # (b, L), 0 off the answer
    return ce.sum(dim=1) / (y != -1).sum(dim=1)


@torch.no_grad()
def generate(model, prompts, n_new):
    """Greedy decoding: each prompt continued by n_new characters (fewer where the block ends)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    buf = torch.full((len(prompts), BLOCK_SIZE + 1), STOI[PAD], dtype=torch.long, device=device)
    for i, prompt in enumerate(prompts):
        buf[i, :len(prompt)] = torch.tensor([STOI[c] for c in prompt])
    pos = torch.tensor([len(p) for p in prompts], device=device)  # the next position to write, per prompt
    rows = torch.arange(len(prompts), device=device)
    for _ in range(n_new):  # right padding is harmless: causal attention never looks past a position
        logits, _ = model(buf[:, :BLOCK_SIZE])                    # (b, L, V)
        buf[rows, pos] = logits[rows, pos - 1].argmax(dim=-1)
        pos = (pos + 1).clamp(max=BLOCK_SIZE)
    model.train(was_training)
    return [decode(row[len(p):len(p) + n_new]) for row, p in zip(buf.tolist(), prompts)]


def answers(model, eval_sets):
    """{task: [the model's greedy answer to each prompt, as long as the expected one]} for {task: [(prompt, answer)]}."""
    return {task: [g[:len(a)] for g, (_, a) in zip(generate(model, [p for p, _ in pairs], max(len(a) for _, a in pairs)), pairs)]
            for task, pairs in eval_sets.items()}


def exact_match(got, eval_sets):
    """{task: share of answers equal to the expected ones, the final "." included}."""
    return {task: sum(g == a for g, (_, a) in zip(got[task], pairs)) / len(pairs) for task, pairs in eval_sets.items()}


def table(eval_sets, n, base_answers, answers):
    """The held-out results as train.py's step 6 prints them (sample.py --evaluate too): a title, each task's exact
    match for the base and the tuned model with its first example, then the mean over the tasks."""
    base_acc, acc = exact_match(base_answers, eval_sets), exact_match(answers, eval_sets)
    fewer = ", ".join(f"{t}: all {len(pairs)} it has" for t, pairs in eval_sets.items() if len(pairs) < n)
    lines = [f"held-out exact match, {n} examples per task{f' ({fewer})' if fewer else ''}, greedy decoding:",
             f"{'task':<8} {'base':>5} {'tuned':>6}   an example: prompt, expected, tuned answer"]
    lines += [f"{t:<8} {base_acc[t]:>5.2f} {acc[t]:>6.2f}   {pairs[0][0]} {pairs[0][1]} {answers[t][0]}" for t, pairs in eval_sets.items()]
    return lines + [f"{'mean':<8} {sum(base_acc.values()) / len(acc):>5.2f} {sum(acc.values()) / len(acc):>6.2f}"]
