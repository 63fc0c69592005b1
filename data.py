"""
A tiny synthetic, character-level multi-task dataset.

Every example is one line: a task tag, the input, "=", the answer, ".".

    Rbdaf=fadb.     reverse   the letters in reverse order
    Sbdaf=abdf.     sort      the letters in alphabetical order
    Hbdaf=cebg.     shift     each letter to the next one in the alphabet (j wraps to a)
    A27+48=570.     add       the sum of two numbers below 100, least significant digit first (075)

The principle, fixed before any allocation rule was compared: the toy is an instrument, so
1. each task needs a different part of the network, so that where the experts go can matter:
   reverse needs a new attention pattern (the position mirrored), sort compares content across
   the line (attention by content), shift remaps every token on its own (a token mapping: value,
   output or MLP matrices), and add needs arithmetic (a digit-sum table in the MLP, with the
   digits brought together by attention and the carry passed on);
2. every task is learned reliably at train.py's defaults, whatever the seed, so that a
   difference between rules is not luck on one task (measured: experiments/README.md, "The toy");
3. the base model knows what a pretrained language model would (the alphabet, the digits, the
   line format, and adding a digit to a number) but none of the four tasks;
4. like a pretrained language model, the base has every layer trained and its sensitivity is not
   all in one layer, since the method reads exactly that: judged by each task's raw Fisher per layer
   at train.py's defaults (target: no layer above 40 %; SmolLM2-135M's largest is 31 %) and by each
   layer's weight change from its initialisation (experiments/toy_profile.py prints both).
   With GPT-2's embedding scale (std 0.02) and 4 layers, pretraining trained every layer (each
   matrix moved 1.1 to 3.3 times its initial norm) yet put 89 to 94 % of every task's Fisher in
   layer 0: the embedding entered the residual stream at a norm of 0.5 and layer 0 raised it to 4,
   so the LayerNorms after layer 0 magnified its gradients. More pretraining tasks, longer
   pretraining or weight decay left that unchanged. Two changes, both toward a pretrained model,
   meet the target: embeddings at unit scale (smoe.GPTConfig.emb_std, PyTorch's default), so the
   stream starts at the size the layers write, as in the middle of a deep model; and 8 layers
   instead of 4, since the score of a pre-LayerNorm model falls off over the first few layers
   whatever its depth (4 layers at unit scale: 45 to 73 % in the largest layer; 6: 45 %; 8: 27 %
   at the default base, 34 % when pretrained on two threads, 38 to 50 % at base seeds 1 to 4:
   the target holds at the defaults, not on every base; README, "The toy's base").
The answer of add comes least significant digit first, as the carry flows: each answer digit then
depends on the inputs and the carry of the digits before it, which a left-to-right decoder has
already seen. Written most significant digit first, the first digit needs the whole sum at once
and add was learned in some runs and not in others (experiments/README.md, the toy's history).
The loss covers only the answer (after "="); prompt and padding targets are -1.

Pretraining uses two other tasks: copy ("Cbdaf=bdaf.", "C27+08=27+08.") and sums of a digit,
or of a two-digit number, and a digit, also least significant digit first ("F7+8=51.",
"F27+8=53."). So the base can add a digit and carry once, but has never added two two-digit
numbers, reversed, sorted or shifted anything.

Held-out evaluation: an input whose CRC-32 is divisible by 10 is held out from all
training, pretraining included, whatever the task; evaluation draws only from those.
Everything is deterministic given a seed (random.Random(seed)).
"""

import functools
import itertools
import random
import zlib

import torch

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
    if task == "add" or (task == "copy" and rng.random() < 0.25):
        return f"{rng.randrange(100):02d}+{rng.randrange(100):02d}"  # fixed width keeps digits aligned
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
        return f"{int(a) + int(b):03d}"[::-1]  # least significant digit first: 27+48 = 075 -> "570"
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
    """n distinct held-out (prompt, answer) pairs of `task`, the same for the same seed."""
    rng, seen = random.Random(f"eval-{task}-{seed}"), {}
    while len(seen) < n:
        prompt, ans = sample(task, rng, "eval")
        seen[prompt] = ans
    return list(seen.items())


@functools.lru_cache(maxsize=None)
def heldout_size(task):
    """How many distinct held-out inputs `task` has: the most examples eval_set can return.
    add has the fewest (its 10,000 inputs are counted at once); the letter tasks draw from the
    111,000 strings of 3 to 5 letters; copy draws from both kinds; sums from the 100 pairs of
    digits and the 1,000 pairs of a two-digit number and a digit."""
    if task not in TAGS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TAGS)}")
    numbers = (f"{a:02d}+{b:02d}" for a in range(100) for b in range(100))
    words = ("".join(w) for n in range(MIN_LEN, MAX_LEN + 1) for w in itertools.product(LETTERS, repeat=n))
    if task == "sums":
        pairs = itertools.chain((f"{a}+{b}" for a in range(10) for b in range(10)),
                                (f"{a:02d}+{b}" for a in range(100) for b in range(10)))
        return sum(map(is_heldout, pairs))
    inputs = numbers if task == "add" else itertools.chain(numbers, words) if task == "copy" else words
    return sum(map(is_heldout, inputs))


def decode(ids):
    return "".join(VOCAB[i] for i in ids)
