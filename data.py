"""
A tiny synthetic, character-level multi-task dataset.

Every example is one line: a task tag, the input, "=", the answer, ".".

    Rbdaf=fadb.     reverse   the letters in reverse order
    Sbdaf=abdf.     sort      the letters in alphabetical order
    Hbdaf=cebg.     shift     each letter to the next one in the alphabet (j wraps to a)
    A27+48=075.     add       the sum of two numbers below 100, digits aligned

The four tasks need different skills: attending by position (reverse), comparing
content (sort), remapping each token (shift) and carrying digits (add). The loss
covers only the answer (after "="); prompt and padding targets are -1.

Pretraining uses two other tasks: copy ("Cbdaf=bdaf.", "C27+08=27+08.") and single-digit
sums ("F7+8=15."). The base model learns the alphabet, the digits, the line format and the
sums of two digits (as a pretrained language model knows arithmetic facts), but none of the
four tasks: two-digit addition still needs the digits aligned and the carry passed on. Without
the sums, a base pretrained on copy alone learned add in one run out of four: attention-only
adapters over a frozen MLP can hardly make up an addition table (README.md, "The toy").

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
MIN_LEN, MAX_LEN = 3, 6  # letters per input
BLOCK_SIZE = 1 + 2 * MAX_LEN + 1  # tag + input + "=" + answer + "." minus the last token, for the longest line
EVAL_MOD = 10  # one input in EVAL_MOD is held out


def is_heldout(inp):
    return zlib.crc32(inp.encode()) % EVAL_MOD == 0


def random_input(task, rng):
    if task == "sums":
        return f"{rng.randrange(10)}+{rng.randrange(10)}"
    if task == "add" or (task == "copy" and rng.random() < 0.25):
        return f"{rng.randrange(100):02d}+{rng.randrange(100):02d}"  # fixed width keeps digits aligned
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))


def answer(task, inp):
    if task == "copy":
        return inp
    if task == "sums":
        a, b = inp.split("+")
        return str(int(a) + int(b))
    if task == "reverse":
        return inp[::-1]
    if task == "sort":
        return "".join(sorted(inp))
    if task == "shift":
        return "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in inp)
    if task == "add":
        a, b = inp.split("+")
        return f"{int(a) + int(b):03d}"
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
    1,111,000 strings of 3 to 6 letters (about a second to count); copy draws from both kinds;
    sums has only 100 inputs."""
    if task not in TAGS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TAGS)}")
    numbers = (f"{a:02d}+{b:02d}" for a in range(100) for b in range(100))
    words = ("".join(w) for n in range(MIN_LEN, MAX_LEN + 1) for w in itertools.product(LETTERS, repeat=n))
    if task == "sums":
        return sum(is_heldout(f"{a}+{b}") for a in range(10) for b in range(10))
    inputs = numbers if task == "add" else itertools.chain(numbers, words) if task == "copy" else words
    return sum(map(is_heldout, inputs))


def decode(ids):
    return "".join(VOCAB[i] for i in ids)
