"""
Tests of the toy (data.py) and of train.py run as a program: tiny runs against each other and
against plain references. Run: pytest test_smoe.py test_train.py experiments/   (the README's test command)
"""

import ast
import contextlib
import hashlib
import io
import json
import math
import os
import random
import runpy
import shutil
import signal
import subprocess
import sys
import time
import zlib

import pytest
import torch
import torch.nn as nn

import data
from smoe import (GPT, GPTConfig, adapter_state, allocate_experts, apply_lora_moe,
                  candidate_names, compute_sensitivity, load_adapter, moe_aux_loss,
                  moe_layers)
from test_smoe import assert_close, assert_scores_close, tiny_gpt  # the method's test helpers

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, "train.py")
SAMPLE = os.path.join(HERE, "sample.py")


# -----------------------------------------------------------------------------
# Data


def test_tasks_answer_correctly_and_heldout_inputs_never_train():
    rng = random.Random(0)
    for task in data.TASKS + data.PRETRAIN_TASKS:
        for _ in range(300):
            prompt, ans = data.sample(task, rng, "train")
            assert prompt[0] == data.TAGS[task] and prompt[-1] == "=" and ans[-1] == "."
            inp = prompt[1:-1]
            assert not data.is_heldout(inp)
            if task in ("add", "sums"):
                a, b = inp.split("+")
                total, digits = int(a) + int(b), ans[:-1]  # least significant digit first: digit i is (total // 10^i) % 10
                assert all(int(d) == total // 10 ** i % 10 for i, d in enumerate(digits)), (prompt, ans)
                assert len(digits) == (3 if task == "add" else len(str(total)))
                assert task == "sums" or (len(a), len(b)) == (1, 2)  # add: a digit plus a two-digit number
            elif task == "reverse":
                assert [ans[i] for i in range(len(inp))] == [inp[len(inp) - 1 - i] for i in range(len(inp))]
            elif task == "shift":
                assert all(ord(o) - ord(i) in (1, 1 - len(data.LETTERS)) for i, o in zip(inp, ans[:-1]))
            elif task == "copy":
                assert ans[:-1] == inp
    pairs = data.eval_set("sort", 50, seed=3)
    assert pairs == data.eval_set("sort", 50, seed=3) and len(set(pairs)) == 50
    assert all(data.is_heldout(p[1:-1]) and a[:-1] == "".join(sorted(p[1:-1])) for p, a in pairs)
    # add has 1,000 inputs, those whose CRC-32 is divisible by 10 held out; asked for more, eval_set gives them all
    heldout = {f"A{a}+{b:02d}=" for a in range(10) for b in range(100) if zlib.crc32(f"{a}+{b:02d}".encode()) % 10 == 0}
    assert len(heldout) == data.heldout_size("add") == 88 and {p for p, _ in data.eval_set("add", 200)} == heldout


def test_targets_are_the_next_answer_characters_and_the_prompt_is_masked():
    # by hand: line "Rabc=cba.", input x = the line without its last character, padded; the target at
    # position i is the character at i + 1, kept only where that character belongs to the answer "cba."
    x, y = data.encode([("Rabc=", "cba.")])
    ids = lambda text: [data.STOI[c] for c in text]  # noqa: E731
    pad = data.BLOCK_SIZE - 8
    assert x[0].tolist() == ids("Rabc=cba") + ids(data.PAD) * pad
    assert y[0].tolist() == [-1, -1, -1, -1] + ids("cba.") + [-1] * pad  # "=" (position 4) predicts "c"
    assert data.decode([t for t in y[0].tolist() if t >= 0]) == "cba."


def test_example_losses_are_each_lines_mean_answer_cross_entropy():
    model = tiny_gpt()
    x, y = data.get_batch(list(data.TASKS), 6, random.Random(0))
    losses = data.example_losses(model, (x, y))
    for i in range(len(x)):  # the line alone, through GPT's own mean cross-entropy over the answer
        assert math.isclose(losses[i].item(), model(x[i:i + 1], y[i:i + 1])[1].item(), rel_tol=1e-5)


def naive_greedy(model, prompt, n):
    """n characters after `prompt`, one forward pass per character on the unpadded line."""
    ids = [data.STOI[c] for c in prompt]
    with torch.no_grad():
        for _ in range(n):
            ids.append(model(torch.tensor([ids]))[0][0, -1].argmax().item())
    return data.decode(ids[len(prompt):])


def test_batched_greedy_decoding_equals_one_line_at_a_time():
    model = tiny_gpt()
    for p in model.parameters():  # a random base whose argmax is not the same character everywhere
        if p.dim() == 2:
            nn.init.normal_(p, std=0.3)
    prompts = ["Rabc=", "A12+34=", "Sbdafj="]
    n = data.BLOCK_SIZE + 1 - len(prompts[0])  # as far as the block goes: the longer prompts get fewer
    model.train()
    got = data.generate(model, prompts, n)
    assert model.training  # the mode is put back
    assert got == [naive_greedy(model, p, min(n, data.BLOCK_SIZE + 1 - len(p))) for p in prompts]
    assert len(set(got[0])) > 1
    eval_sets = {"t": [("Rabc=", "xy."), ("A12+34=", "zzzz.")]}
    answers = data.answers(model, eval_sets)
    assert answers == {"t": [got[0][:3], got[1][:5]]}
    assert data.exact_match({"t": ["xy.", "zzzq."]}, eval_sets) == {"t": 0.5}


def test_exact_match_counts_the_final_dot():
    # by hand: of "cba." (right), "cbaa" (no end: the model wrote on), "cba" and "cba_", only the first matches "cba."
    eval_sets = {"reverse": [("Rabc=", "cba.")] * 4}
    assert data.exact_match({"reverse": ["cba.", "cbaa", "cba", "cba_"]}, eval_sets) == {"reverse": 0.25}


def test_smoe_data_and_train_never_import_transformers():
    for file in ("smoe.py", "data.py", "train.py"):  # transformers is the Hugging Face example's dependency only
        tree = ast.parse(open(os.path.join(HERE, file)).read())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(m.split(".")[0] == "transformers" for m in imported), file

# -----------------------------------------------------------------------------
# train.py, run as a program. One tiny run is the reference; its pretrained base is cached once per session.
# A process that fine-tunes spends about 5 s starting (importing torch, then torch._dynamo at the first
# optimizer), so the runs that need no process of their own (bad flags, --allocation) run train.py in this
# one, exactly as `python train.py ...` runs it (runpy, as __main__).

TINY = ["--pretrain-steps", "10", "--steps", "40", "--batch-size", "8", "--sens-batches", "1", "--eval-every", "20",
        "--eval-examples", "8", "--checkpoint-every", "5", "--budget", "16", "--device", "cpu"]


def run_train(*argv, timeout=180):
    return subprocess.run([sys.executable, TRAIN, *argv], cwd=HERE, capture_output=True, text=True, errors="replace",
                          timeout=timeout)


def run_in_process(*argv, script=TRAIN):
    """train.py (or `script`) run in this process as `python train.py ARGV` runs it -> (exit status, stdout, stderr).
    SystemExit is handled as the interpreter does (a message to stderr, status 1); any other exception
    propagates, as a traceback would end the real process. Its signal handlers are put back."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    out, err, saved = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = [script, *argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(script, run_name="__main__")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) or e.code is None else 1
                if code == 1 and not isinstance(e.code, int):
                    print(e.code, file=sys.stderr)
    finally:
        sys.argv = saved
        for s, h in handlers.items():
            signal.signal(s, h)
    return code or 0, out.getvalue(), err.getvalue()


def without(flags, name):
    """flags less `name` and its value."""
    i = flags.index(name)
    return flags[:i] + flags[i + 2:]


def numbers(results):
    """Everything in results.json that a run computes: all but its settings (the output folder) and timings."""
    return {k: v for k, v in results.items() if k not in ("config", "times_s")}


def read_results(folder):
    with open(os.path.join(folder, "results.json")) as f:
        return json.load(f)


def assert_same_adapter(folder, other):
    a, b = (torch.load(os.path.join(d, "adapter.pt"), weights_only=True) for d in (folder, other))
    assert a["allocation"] == b["allocation"] and a["lora"] == b["lora"] and a["adapter"].keys() == b["adapter"].keys()
    for k in a["adapter"]:
        diff = (a["adapter"][k] - b["adapter"][k]).abs().max().item()
        assert torch.equal(a["adapter"][k], b["adapter"][k]), f"{k}: max abs difference {diff:.3e}"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    out = str(tmp_path_factory.mktemp("reference"))
    proc = run_train(*TINY, "--cache", cache, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "proc": proc, "results": read_results(out), "flags": [*TINY, "--cache", cache]}


def test_train_py_end_to_end_with_tiny_settings(reference, cache):
    out, results, proc = reference["out"], reference["results"], reference["proc"]
    assert "1. pretraining the base model" in proc.stdout  # the session's first run pretrains, later ones load
    assert sorted(os.listdir(out)) == ["adapter.pt", "allocation.json", "checkpoint.pt", "results.json"]
    (base_file,) = os.listdir(cache)
    assert base_file.startswith("base-") and results["base"] == os.path.join(cache, base_file)
    assert set(results) == {"config", "model_config", "base", "base_fingerprint", "allocation", "parameters", "sensitivity", "history",
                            "base_accuracy", "accuracy", "mean", "routing", "times_s", "examples"}
    with open(os.path.join(out, "allocation.json")) as f:
        allocation = json.load(f)
    assert sum(allocation.values()) == 16 and all(n > 0 for n in allocation.values())  # the budget, spent exactly
    assert results["allocation"] == allocation
    assert {n: c for n, c in allocate_experts(results["sensitivity"], 16).items() if c > 0} == allocation
    assert list(results["accuracy"]) == list(data.TASKS) and [h["step"] for h in results["history"]] == [20, 40]
    assert results["mean"] == pytest.approx(sum(results["accuracy"].values()) / 4)
    assert set(results["routing"]) == {n for n, c in allocation.items() if c > 2}  # top-2: layers with 3 or more experts
    for shares in results["routing"].values():
        assert sum(shares) == pytest.approx(1.0)
    # parameters by hand: each expert A and B, r (64 + 64) on v_proj (64 -> 64) and r (64 + 128) on up_proj
    # (64 -> 128); a router 64 x E where E > 1; the base as built
    by_hand = sum(n * 8 * (128 if name.endswith("v_proj") else 192) + (64 * n if n > 1 else 0) for name, n in allocation.items())
    base = sum(p.numel() for p in GPT(GPTConfig(**results["model_config"])).parameters())
    assert results["parameters"] == {"total": base + by_hand, "trainable": by_hand, "plain_lora": 8 * (8 * 128 + 8 * 192)}
    assert (f"   to compare, plain LoRA: the same 16 experts spread evenly, 20,480 trainable parameters against these "
            f"{by_hand:,}: python train.py --alloc uniform --budget 16 ") in proc.stdout
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["step"] == 40
    state = torch.load(os.path.join(out, "adapter.pt"), weights_only=True)
    assert state["allocation"] == allocation and state["lora"] == {"r": 8, "lora_alpha": 16.0, "top_k": 2}

    # the scores are compute_sensitivity's on the cached base, from the batches train.py draws for seed 0
    model = GPT(GPTConfig(**results["model_config"]))
    model.load_state_dict(torch.load(results["base"], weights_only=True)["model"])
    rng = random.Random("sensitivity-0-0")
    batches = {t: [data.get_batch([t], 8, rng)] for t in data.TASKS}
    assert_scores_close(results["sensitivity"], compute_sensitivity(model, batches, data.example_losses,
                                                                    candidate_names(model, results["config"]["targets"])))


def test_the_comparator_line_runs_plain_lora_on_the_same_base_into_its_own_folder(reference, cache):
    line = next(line for line in reference["proc"].stdout.splitlines() if "to compare, plain LoRA" in line)
    argv = line.split(": python train.py ")[1].split()
    assert argv[argv.index("--out") + 1] == reference["out"] + "-uniform" and argv[argv.index("--cache") + 1] == cache
    files = lambda folder: {f: open(os.path.join(folder, f), "rb").read() for f in os.listdir(folder)}  # noqa: E731
    before = files(reference["out"])
    code, stdout, stderr = run_in_process(*argv)
    assert code == 0, stderr[-3000:]
    assert files(reference["out"]) == before  # the run it compares with is left as it was
    results = read_results(reference["out"] + "-uniform")
    assert results["base"] == reference["results"]["base"] and results["allocation"] == {
        n: 1 for n in candidate_names(GPT(GPTConfig(**results["model_config"])), ["v_proj", "up_proj"])}
    assert results["parameters"]["trainable"] == 20480  # plain LoRA r=8 on the 16 candidates, by hand in the test above
    same = ("alloc", "out")  # every other setting is the reference run's
    assert {k: v for k, v in results["config"].items() if k not in same} == \
           {k: v for k, v in reference["results"]["config"].items() if k not in same}
    numbered = [line.split(".")[0] for line in stdout.splitlines() if line[:1].isdigit()]
    assert numbered == ["1", "2", "3", "4", "5", "6"]  # every step has its line, the skipped sensitivity too


def test_the_default_base_is_the_one_kept_in_the_repository(tmp_path):
    """The flags of the default base (base seed 0, the default pretraining) load base/'s file: nothing is pretrained or
    cached, and the printed fingerprint is the sha256 of the file's weights in name order, computed here."""
    (kept_file,) = os.listdir(os.path.join(HERE, "base"))
    kept = torch.load(os.path.join(HERE, "base", kept_file), weights_only=True)
    recipe = json.loads(kept["key"])
    assert (recipe["seed"], recipe["steps"], recipe["batch"], recipe["lr"]) == (0, 2000, 32, 1e-3)
    by_hand = hashlib.sha256(b"".join(kept["model"][k].numpy().tobytes() for k in sorted(kept["model"]))).hexdigest()[:12]
    out = tmp_path / "out"
    code, stdout, stderr = run_in_process("--steps", "2", "--batch-size", "4", "--sens-batches", "1", "--eval-examples", "2",
                                          "--device", "cpu", "--out", str(out))
    assert code == 0, stderr[-3000:]
    assert f"1. loaded the pretrained base model kept in {os.path.relpath(os.path.join(HERE, 'base', kept_file))}" in stdout
    assert f"   fingerprint {by_hand}; held-out exact match" in stdout
    assert read_results(out)["base"] == os.path.join(HERE, "base", kept_file) and read_results(out)["base_fingerprint"] == by_hand
    assert not [f for f in os.listdir(out) if f.startswith("base-")]


def test_fine_tuning_is_the_plain_loop_with_loss_ce_plus_aux_coef_times_the_masked_balancing_loss(reference, tmp_path):
    """train.py's adapter after a few steps equals this loop's: loss = ce + aux_coef * aux, aux the balancing loss written
    out here from each router's logits (E * sum_i f_i P_i over the real tokens, padding left out, averaged over the
    routers that choose), with a gradient. aux_coef 3 makes the balancing loss move every router."""
    out, steps, aux_coef = str(tmp_path / "out"), 4, 3.0
    code, _, stderr = run_in_process(*without(reference["flags"], "--steps"), "--steps", str(steps), "--aux-coef", str(aux_coef),
                                     "--out", out)
    assert code == 0, stderr[-3000:]
    results = read_results(out)
    model = GPT(GPTConfig(**results["model_config"]))
    model.load_state_dict(torch.load(results["base"], weights_only=True)["model"])
    torch.manual_seed(0)
    apply_lora_moe(model, results["allocation"], r=8, lora_alpha=16.0, top_k=2)
    routers = [m for _, m in moe_layers(model) if m.top_k < m.num_experts]
    assert routers
    inputs = {}
    for m in routers:
        m.register_forward_hook(lambda m, args, _: inputs.__setitem__(m, args[0].reshape(-1, args[0].shape[-1])))
    params = [p for p in model.parameters() if p.requires_grad]
    lr = results["config"]["lr"]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random("finetune-0-0")
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        x, y = data.get_batch(list(data.TASKS), 8, rng)
        _, ce = model(x, y)
        real = (x != data.STOI[data.PAD]).flatten()
        aux = []
        for m in routers:
            probs = m.router(inputs[m][real]).softmax(-1)                         # (n, E) the real tokens only
            chosen = torch.zeros_like(probs).scatter(-1, probs.topk(m.top_k, dim=-1).indices, 1.0)
            f, P = chosen.mean(0) / m.top_k, probs.mean(0)                         # (E,) share of slots, mean probability
            aux.append(m.num_experts * (f * P).sum())
        loss = ce + aux_coef * sum(aux) / len(aux)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    saved = torch.load(os.path.join(out, "adapter.pt"), weights_only=True)["adapter"]
    for name, t in adapter_state(model)["adapter"].items():
        assert_close(saved[name], t, atol=1e-5, rtol=1e-4)


def test_same_seed_gives_the_same_run_even_when_stopped_by_sigint_and_resumed(reference, tmp_path):
    out = tmp_path / "out"
    logs = [open(tmp_path / name, "w+", errors="replace") for name in ("stdout", "stderr")]
    proc = subprocess.Popen([sys.executable, TRAIN, *reference["flags"], "--out", str(out)], cwd=HERE,
                            stdout=logs[0], stderr=logs[1], env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 120
        while True:  # Ctrl-C once fine-tuning has started
            logs[0].seek(0)
            if "5. fine-tuning" in logs[0].read():
                break
            assert proc.poll() is None and time.time() < deadline, "train.py ended before fine-tuning began"
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 128 + signal.SIGINT, "train.py finished before the SIGINT arrived"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    logs[1].seek(0)
    last = logs[1].read().strip().splitlines()[-1].split("\r")[-1]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert 1 <= ckpt["step"] < 40
    assert last == f"train.py: stopped after step {ckpt['step']}; continue with: python train.py --out {out} --resume"
    assert not (out / "adapter.pt").exists() and not (out / "results.json").exists()
    # the same seed: the same scores and allocation as the reference run, computed afresh by this process
    assert ckpt["sensitivity"] == reference["results"]["sensitivity"]
    assert ckpt["adapter"]["allocation"] == reference["results"]["allocation"]

    proc = run_train("--out", str(out), "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {out / 'checkpoint.pt'} after step {ckpt['step']}" in proc.stdout
    assert_same_adapter(out, reference["out"])
    assert numbers(read_results(out)) == numbers(reference["results"])


def step_6(stdout):
    """The lines of train.py's step 6, from its title to the mean, without their indent and the "6. "."""
    lines = [line.removeprefix("6. ").strip() for line in stdout.splitlines()]
    first = next(i for i, line in enumerate(lines) if line.startswith("held-out exact match"))
    last = next(i for i, line in enumerate(lines) if line.startswith("mean "))
    return lines[first:last + 1]


def test_sample_py_asks_a_finished_run_and_prints_its_table_again(reference):
    results, out = reference["results"], reference["out"]
    examples = [rows[0] for rows in results["examples"].values()]
    code, stdout, stderr = run_in_process("--out", out, *[a for e in examples for a in ("--prompt", e["prompt"])], "--evaluate",
                                          script=SAMPLE)
    assert code == 0, stderr[-3000:]
    lines = stdout.splitlines()
    # the answers: the base plus the saved adapter, decoded here one character at a time, up to the first "."
    model = GPT(GPTConfig(**results["model_config"]))
    model.load_state_dict(torch.load(results["base"], weights_only=True)["model"])
    load_adapter(model, torch.load(os.path.join(out, "adapter.pt"), weights_only=True))
    for line, e in zip(lines, examples):
        written = naive_greedy(model, e["prompt"], data.BLOCK_SIZE + 1 - len(e["prompt"]))
        head, dot, _ = written.partition(".")
        assert line == e["prompt"] + head + dot
        assert written[:len(e["expected"])] == e["tuned"]  # as the trained model answered in memory
    # then step 6's table, line for line as train.py printed it, and nothing else: nothing trains
    table = [line.strip() for line in lines[len(examples):]]
    assert table == step_6(reference["proc"].stdout)
    for t, a in results["accuracy"].items():
        assert any(row.split()[:3] == [t, f"{results['base_accuracy'][t]:.2f}", f"{a:.2f}"] for row in table)


@pytest.mark.parametrize("argv,message", [
    (["--prompt", "A7+48"], "argument --prompt: expected a line up to its '=', like A7+48=, got 'A7+48'"),
    (["--prompt", "Z12="], "argument --prompt: 'Z12=' starts with 'Z', not a task's tag (C copy, F sums, R reverse, S sort, "
                           "H shift, A add)"),
    (["--prompt", "Rhello="], "argument --prompt: 'Rhello=' holds 'lo': the toy's letters are a to j, its digits 0 to 9"),
    (["--prompt", "Rabcdefghijkl="], "argument --prompt: 'Rabcdefghijkl=' is too long: the model reads 12 characters, "
                                     "prompt and answer together (the tasks' inputs have 3 to 5 letters)"),
    ([], "nothing to do: give --prompt TEXT or --evaluate"),
    (["--evaluate"], "--out {tmp} holds no finished run to load ([Errno 2] No such file or directory: '{tmp}/results.json')"),
])
def test_sample_py_bad_flags_give_one_error_line(argv, message, tmp_path):
    code, _, err = run_in_process("--out", str(tmp_path), *argv, script=SAMPLE)
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "sample.py: error: " + message.replace("{tmp}", str(tmp_path))


@pytest.fixture(scope="module")
def from_file(reference, tmp_path_factory):
    """The reference run's allocation.json passed back with --allocation (no --budget: the file's own 16)."""
    out = str(tmp_path_factory.mktemp("from_file"))
    code, stdout, stderr = run_in_process(*without(reference["flags"], "--budget"), "--out", out,
                                          "--allocation", os.path.join(reference["out"], "allocation.json"))
    return {"out": out, "code": code, "stdout": stdout, "stderr": stderr}


def test_an_allocation_file_written_by_a_run_reproduces_that_run(reference, from_file):
    assert from_file["code"] == 0, from_file["stderr"][-3000:]
    assert "2. sensitivity: not measured, --allocation does not use it" in from_file["stdout"]  # the file replaces steps 2 and 3
    results = read_results(from_file["out"])
    assert results["config"]["budget"] == 16 and results["sensitivity"] is None
    # the same allocation, seed and batches: the same adapter, tensor for tensor, and the same results
    assert_same_adapter(from_file["out"], reference["out"])
    assert {k: v for k, v in numbers(results).items() if k != "sensitivity"} == \
           {k: v for k, v in numbers(reference["results"]).items() if k != "sensitivity"}


def test_resume_refuses_a_checkpoint_made_on_another_base(reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference["out"], out)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert json.loads(ckpt["base_key"])["seed"] == 0  # the base's recipe, as train.py keys its cache
    ckpt["base_key"] = ckpt["base_key"].replace('"batch": 32', '"batch": 64')  # as a checkpoint of an older toy
    torch.save(ckpt, out / "checkpoint.pt")
    code, _, err = run_in_process("--out", str(out), "--resume")
    assert code == 2 and err.strip().splitlines()[-1] == (f"train.py: error: --resume: {out / 'checkpoint.pt'} was made on "
                                                         "another pretrained base (another version of the toy); start a new run")


def test_a_run_with_an_allocation_file_resumes(reference, from_file):
    # the checkpoint's settings hold the allocation itself, a dict, not the file's name; --resume of a
    # finished run writes its results again, the same adapter
    assert from_file["code"] == 0
    code, stdout, stderr = run_in_process("--out", from_file["out"], "--resume")
    assert code == 0, stderr[-3000:]
    assert_same_adapter(from_file["out"], reference["out"])


ALLOCATION_FILES = {"bad JSON": "{not json", "a list": "[1, 2]", "a fraction": '{"layers.0.attn.v_proj": 1.5}',
                    "unknown module": '{"layers.9.attn.q_proj": 1}', "no experts": '{"layers.0.attn.v_proj": 0}', "empty": "{}",
                    "7 experts": '{"layers.0.attn.v_proj": 3, "layers.1.mlp.up_proj": 4}'}


@pytest.mark.parametrize("argv,message", [
    (["--budget", "0"], "argument --budget: expected a whole number >= 1, got '0'"),
    (["--budget", "sixteen"], "argument --budget: expected a whole number >= 1, got 'sixteen'"),
    (["--budget", "65"], "--budget: at most tasks x candidate matrices = 4 x 16 = 64, got 65"),
    (["--tasks", "add", "--budget", "17"], "--budget: at most tasks x candidate matrices = 1 x 16 = 16, got 17"),
    (["--alloc", "uniform", "--budget", "40"], "--budget: a uniform allocation needs a multiple of the 16 candidate matrices, got 40"),
    (["--alloc", "greedy"], "argument --alloc: invalid choice: 'greedy' (choose from "),  # the list's quotes vary with Python
    (["--tasks", "reverse,copy"], "argument --tasks: expected distinct names from reverse,sort,shift,add, got 'reverse,copy'"),
    (["--tasks", "add,add"], "argument --tasks: expected distinct names from reverse,sort,shift,add, got 'add,add'"),
    (["--targets", "q_proj,x_proj"], "argument --targets: expected distinct names from q_proj,k_proj,v_proj,o_proj,up_proj,"
                                     "down_proj, got 'q_proj,x_proj'"),
    (["--lr", "0"], "argument --lr: expected a number > 0, got '0'"),
    (["--lr", "nan"], "argument --lr: expected a number > 0, got 'nan'"),
    (["--top-k", "0"], "argument --top-k: expected a whole number >= 1, got '0'"),
    (["--allocation", "{tmp}/missing.json"], "--allocation: [Errno 2] No such file or directory: '{tmp}/missing.json'"),
    (["--allocation", "bad JSON"], "--allocation: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    (["--allocation", "a list"], "--allocation: expected a JSON object {matrix name: whole number of experts >= 0}"),
    (["--allocation", "a fraction"], "--allocation: expected a JSON object {matrix name: whole number of experts >= 0}"),
    (["--allocation", "unknown module"], "--allocation names layers.9.attn.q_proj, not one of the candidate matrices (--targets)"),
    (["--allocation", "no experts"], "the allocation spends no experts: nothing would train"),
    (["--allocation", "empty"], "the allocation spends no experts: nothing would train"),
    (["--allocation", "7 experts", "--budget", "16"], "--budget 16 differs from the 7 experts of --allocation"),
    (["--cache", "/dev/null"], "--out or --cache: [Errno 17] File exists: '/dev/null'"),
    (["--resume"], "--resume: {tmp}/out/checkpoint.pt does not exist"),
    (["--resume", "--out", "{ref}", "--lr", "0.001"], "--resume: --lr 0.001 differs from the checkpoint's 0.01"),
    (["--device", "tpu"], f"argument --device: expected auto, cpu, cuda, cuda:N or mps that this PyTorch build "
                          f"({torch.__version__}) can use here, got 'tpu'"),
    pytest.param(["--device", "cuda"], f"argument --device: expected auto, cpu, cuda, cuda:N or mps that this PyTorch build "
                                       f"({torch.__version__}) can use here, got 'cuda'",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine can use cuda")),
    (["--prompt", "A7+48="], "unrecognized arguments: --prompt A7+48="),  # the usage line above it names sample.py
])
def test_bad_flags_give_one_error_line_and_no_traceback(argv, message, tmp_path, request):
    """Files named in ALLOCATION_FILES are written first, and those runs load the cached base (their checks
    need the candidate matrices); {ref} is the reference run's folder."""
    ref = request.getfixturevalue("reference")["out"] if "{ref}" in argv else ""
    if argv[0] == "--allocation" and argv[1] in ALLOCATION_FILES:
        (tmp_path / "allocation.json").write_text(ALLOCATION_FILES[argv[1]])
        argv = [*without(request.getfixturevalue("reference")["flags"], "--budget"),
                "--allocation", str(tmp_path / "allocation.json"), *argv[2:]]
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{ref}", ref) for a in ["--out", "{tmp}/out", *argv]]
    code, out, err = run_in_process(*argv)
    lines = err.strip().splitlines()
    assert code != 0 and "Traceback" not in err, err
    assert lines[-1].startswith("train.py: error: " + message.replace("{tmp}", str(tmp_path))), err
    assert len(lines) == (2 if code == 2 else 1), err  # argparse: its usage line, then the error


def test_a_bad_flag_in_a_real_process_exits_2_with_usage_and_one_error_line(tmp_path):
    proc = run_train("--budget", "0", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == ["usage: python train.py [flags]; python train.py --help lists them; "
                                        "python sample.py asks a finished run",
                                        "train.py: error: argument --budget: expected a whole number >= 1, got '0'"]
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(os.environ.get("SMOE_TEST_TORCHRUN") != "1",
                    reason="three processes each importing torch take about 13 s on two CPU cores, over this suite's "
                           "time; SMOE_TEST_TORCHRUN=1 runs it")
def test_train_py_under_torchrun_with_two_processes(reference, tmp_path):
    """Two CPU processes (gloo): rank 0 alone writes; the sensitivity is both ranks' scores summed, and the
    adapter follows the mean of both ranks' gradients, recomputed here by hand."""
    flags = [f for f in reference["flags"]]
    flags[flags.index("--steps") + 1] = "6"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN,
                           *flags, "--out", str(tmp_path)], capture_output=True, text=True, errors="replace", cwd=HERE,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.count("wrote allocation.json, results.json, adapter.pt and checkpoint.pt") == 1
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    model = GPT(GPTConfig(**results["model_config"]))
    model.load_state_dict(torch.load(results["base"], weights_only=True)["model"])
    names = candidate_names(model, results["config"]["targets"])
    per_rank = []
    for r in range(2):  # rank r draws its batches from its own generator
        rng = random.Random(f"sensitivity-0-{r}")
        per_rank.append(compute_sensitivity(model, {t: [data.get_batch([t], 8, rng)] for t in data.TASKS},
                                            data.example_losses, names))
    summed = {t: {n: per_rank[0][t][n] + per_rank[1][t][n] for n in names} for t in data.TASKS}
    assert_scores_close(results["sensitivity"], summed)
    allocation = {n: c for n, c in allocate_experts(results["sensitivity"], 16).items() if c > 0}
    assert results["allocation"] == allocation
    torch.manual_seed(0)
    apply_lora_moe(model, allocation, r=8, lora_alpha=16.0, top_k=2)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = results["config"]["lr"]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rngs = [random.Random(f"finetune-0-{r}") for r in range(2)]
    for step in range(6):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / 6))
        grads = []
        for rng in rngs:
            x, y = data.get_batch(list(data.TASKS), 8, rng)
            _, ce = model(x, y)
            grads.append(torch.autograd.grad(ce + 0.01 * moe_aux_loss(model, mask=x != data.STOI[data.PAD]), params))
        for p, g0, g1 in zip(params, *grads):
            p.grad = (g0 + g1) / 2
        optimizer.step()
    saved = torch.load(tmp_path / "adapter.pt", weights_only=True)["adapter"]
    for name, t in adapter_state(model)["adapter"].items():
        assert_close(saved[name], t, atol=1e-4, rtol=1e-3)
