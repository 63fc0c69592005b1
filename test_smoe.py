"""
Tests for LoRA-SMoE. Each one checks a fact against an independent reference: a naive
per-token loop, a formula worked by hand, or a gradient computed another way.

Run: pytest test_smoe.py   (tiny sizes, fixed seeds, well under a minute on two CPU cores)
"""

import itertools
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import data
import train
from smoe import (GPT, GPTConfig, LoRAMoELinear, adapter_state_dict, allocate_experts, apply_lora_moe,
                  candidate_names, compute_sensitivity, load_balancing_loss, moe_aux_loss)

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def assert_close(actual, expected, atol=1e-5, rtol=1e-5):
    diff = (actual - expected).abs().max().item()
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), f"max abs difference {diff:.3e}"


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=len(data.VOCAB), block_size=data.BLOCK_SIZE, n_layer=2, n_head=2, n_embd=16))


def task_batches(tasks, n_batches, batch_size=8, seed=0):
    rng = random.Random(seed)
    return {t: [data.get_batch([t], batch_size, rng) for _ in range(n_batches)] for t in tasks}


def lm_loss(model, batch):
    x, y = batch
    return model(x, y)[1]

# -----------------------------------------------------------------------------
# The LoRA-MoE layer


def naive_lora_moe(layer, x):
    """The layer's equation token by token and expert by expert, the slow obvious way."""
    W0 = layer.base.weight
    out = []
    for token in x.reshape(-1, layer.in_features):
        y = W0 @ token
        if layer.router is None:
            chosen, gates = [0], [1.0]
        else:
            logits = layer.router.weight @ token
            chosen = sorted(range(layer.num_experts), key=lambda i: -logits[i].item())[:layer.top_k]
            z = torch.stack([logits[i] for i in chosen])
            gates = torch.exp(z - z.max()) / torch.exp(z - z.max()).sum()  # softmax over the chosen logits
        for g, i in zip(gates, chosen):
            y = y + g * layer.scaling * (layer.lora_B[i] @ (layer.lora_A[i] @ token))
        out.append(y)
    return torch.stack(out).reshape(*x.shape[:-1], layer.out_features)


@pytest.mark.parametrize("E,top_k,r", [(1, 2, 4), (2, 1, 3), (4, 2, 4), (3, 5, 2), (8, 2, 8)])
def test_stacked_experts_equal_naive_per_token_loop(E, top_k, r):
    torch.manual_seed(E * 10 + top_k)
    layer = LoRAMoELinear(nn.Linear(12, 10, bias=False), E, r=r, lora_alpha=6.0, top_k=top_k)
    nn.init.normal_(layer.lora_B)  # nonzero B, otherwise the experts contribute nothing
    assert layer.top_k == min(top_k, E)
    assert layer.scaling == 6.0 / r
    assert (layer.router is None) == (E == 1)
    for shape in [(12,), (5, 12), (2, 3, 12)]:  # any leading shape
        x = torch.randn(*shape)
        assert_close(layer(x), naive_lora_moe(layer, x))


def test_layer_with_bias_and_rectangular_shape():
    torch.manual_seed(0)
    base = nn.Linear(6, 9, bias=True)
    layer = LoRAMoELinear(base, 3, r=2, top_k=2)
    assert layer.lora_A.shape == (3, 2, 6) and layer.lora_B.shape == (3, 9, 2)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 6)
    assert_close(layer(x), naive_lora_moe(layer, x) + base.bias)


def test_layer_under_bf16_autocast_matches_float32_loop():
    torch.manual_seed(0)
    layer = LoRAMoELinear(nn.Linear(16, 12, bias=False), 4, r=4, lora_alpha=8.0, top_k=2)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(64, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.aux_loss.dtype == torch.float32
    # bf16 may swap the 2nd and 3rd expert of a token whose router logits nearly tie; compare the others
    third = (x @ layer.router.weight.t()).topk(3, dim=-1).values  # (N, 3)
    clear = third[:, 1] - third[:, 2] > 0.05
    assert clear.sum() >= 48, clear.sum()
    assert_close(y.float()[clear], naive_lora_moe(layer, x)[clear], atol=0.05, rtol=0.02)


def test_routing_counts_match_top_k_choices():
    torch.manual_seed(0)
    layer = LoRAMoELinear(nn.Linear(8, 8, bias=False), 4, r=2, top_k=2)
    x = torch.randn(50, 8)
    layer(x)
    chosen = (x @ layer.router.weight.t()).topk(2, dim=-1).indices.flatten().tolist()
    expected = torch.tensor([chosen.count(i) for i in range(4)], dtype=torch.float)
    assert torch.equal(layer.expert_counts, expected)
    assert layer.expert_counts.sum().item() == 50 * 2


def test_wrapped_model_equals_base_model_at_initialisation():
    model = tiny_gpt()
    x, _ = data.get_batch(list(data.TASKS), 4, random.Random(0))
    expected, _ = model(x)
    names = candidate_names(model, TARGETS + ("up_proj",))
    allocation = {name: i % 4 for i, name in enumerate(names)}
    apply_lora_moe(model, allocation, r=4, top_k=2)
    actual, _ = model(x)
    assert torch.equal(actual, expected)  # B = 0 makes every expert exactly zero

# -----------------------------------------------------------------------------
# Load-balancing loss


@pytest.mark.parametrize("E,top_k", [(2, 1), (2, 2), (4, 1), (4, 2), (8, 2), (8, 3)])
def test_balancing_loss_is_one_at_uniform_routing(E, top_k):
    # equal logits: every router probability is 1/E, whatever topk picks
    assert abs(load_balancing_loss(torch.zeros(30, E), top_k).item() - 1.0) < 1e-6
    # perfectly balanced assignment with unequal logits: token n prefers expert n mod E
    logits = torch.eye(E).repeat(5, 1) * 3.0
    if top_k == 1:
        assert abs(load_balancing_loss(logits, top_k).item() - 1.0) < 1e-6


@pytest.mark.parametrize("E", [2, 4, 8])
def test_balancing_loss_is_E_when_every_token_picks_one_expert(E):
    logits = torch.zeros(16, E)
    logits[:, 1] = 50.0  # all tokens, all probability on expert 1
    assert abs(load_balancing_loss(logits, 1).item() - E) < 1e-5


def test_balancing_loss_worked_by_hand():
    # E = 2, k = 1, both tokens routed to expert 0 with P = (0.75, 0.25): 2 * (1 * 0.75 + 0 * 0.25) = 1.5
    logits = torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), 0.0]])
    assert abs(load_balancing_loss(logits, 1).item() - 1.5) < 1e-6
    # E = 3, k = 2, one token with probabilities (0.5, 0.3, 0.2): f = (1/2, 1/2, 0), L = 3 * (0.25 + 0.15) = 1.2
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    assert abs(load_balancing_loss(logits, 2).item() - 1.2) < 1e-6


def test_model_aux_loss_averages_routing_layers_only():
    model = tiny_gpt()
    names = candidate_names(model, TARGETS)
    apply_lora_moe(model, {names[0]: 1, names[1]: 2, names[2]: 4}, r=2, top_k=1)
    x, _ = data.get_batch(list(data.TASKS), 4, random.Random(0))
    model(x)
    layers = [model.get_submodule(n) for n in names[1:3]]
    assert model.get_submodule(names[0]).aux_loss is None  # one expert: no router, no balancing loss
    assert_close(moe_aux_loss(model), (layers[0].aux_loss + layers[1].aux_loss) / 2)

# -----------------------------------------------------------------------------
# Sensitivity


def sensitivity_by_hooks(model, batches_by_task, names):
    """Reference: for a bias-free linear y = x W^T, dL/dW = sum over tokens of g x^T, where x is
    the layer's input and g the gradient at its output, captured with hooks on a copy."""
    import copy
    model = copy.deepcopy(model)
    model.requires_grad_(True)
    inputs, grads, handles = {}, {}, []
    for name in names:
        m = model.get_submodule(name)
        handles.append(m.register_forward_hook(lambda mod, inp, out, name=name: inputs.__setitem__(name, inp[0])))
        handles.append(m.register_full_backward_hook(lambda mod, gin, gout, name=name: grads.__setitem__(name, gout[0])))
    scores = {}
    for task, batches in batches_by_task.items():
        scores[task] = {name: 0.0 for name in names}
        for batch in batches:
            model.zero_grad()
            lm_loss(model, batch).backward()
            for name in names:
                m = model.get_submodule(name)
                dW = grads[name].reshape(-1, m.out_features).t() @ inputs[name].reshape(-1, m.in_features)  # (out, in)
                scores[task][name] += (dW.double() ** 2).sum().item()
    for h in handles:
        h.remove()
    return scores


def test_sensitivity_equals_gradient_computed_from_hooks():
    model = tiny_gpt()
    names = candidate_names(model, TARGETS + ("up_proj", "down_proj"))
    batches = task_batches(["reverse", "add"], n_batches=3)
    actual = compute_sensitivity(model, batches, lm_loss, names)
    expected = sensitivity_by_hooks(model, batches, names)
    for task in batches:
        for name in names:
            assert math.isclose(actual[task][name], expected[task][name], rel_tol=1e-4), (task, name)
    # the per-entry mean divides each score by the matrix's size
    mean = compute_sensitivity(model, batches, lm_loss, names, reduction="mean")
    w = model.get_submodule(names[-1]).weight
    assert math.isclose(mean["add"][names[-1]], actual["add"][names[-1]] / w.numel(), rel_tol=1e-6)


def test_sensitivity_sums_over_batches():
    model = tiny_gpt()
    names = candidate_names(model, TARGETS)
    batches = task_batches(["sort"], n_batches=2)
    both = compute_sensitivity(model, batches, lm_loss, names)["sort"]
    first = compute_sensitivity(model, {"sort": batches["sort"][:1]}, lm_loss, names)["sort"]
    second = compute_sensitivity(model, {"sort": batches["sort"][1:]}, lm_loss, names)["sort"]
    for name in names:
        assert math.isclose(both[name], first[name] + second[name], rel_tol=1e-5)


def test_sensitivity_leaves_the_model_as_found():
    model = tiny_gpt()
    model.train()
    model.lm_head.weight.requires_grad_(False)
    model.tok_emb.weight.grad = torch.ones_like(model.tok_emb.weight)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    compute_sensitivity(model, task_batches(["shift"], 1), lm_loss, candidate_names(model, TARGETS))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n], n
        if n == "tok_emb.weight":
            assert torch.equal(p.grad, torch.ones_like(p))
        else:
            assert p.grad is None, n
    assert model.training

# -----------------------------------------------------------------------------
# Allocation


def test_allocation_worked_example_from_docstring():
    scores = {"a": {"q": 3, "k": 1, "v": 2}, "b": {"q": 1, "k": 5, "v": 4}}
    assert allocate_experts(scores, 3) == {"q": 1, "k": 1, "v": 1}
    assert allocate_experts(scores, 4) == {"q": 1, "k": 1, "v": 2}
    assert allocate_experts(scores, 6) == {"q": 2, "k": 2, "v": 2}
    assert allocate_experts(scores, 1) == {"q": 1, "k": 0, "v": 0}  # one vote: task "a" comes first


def random_scores(n_tasks, n_modules, seed):
    rng = random.Random(seed)
    modules = [f"m{i}" for i in range(n_modules)]
    return {f"t{t}": {m: rng.choice([rng.random(), 0.5]) for m in modules} for t in range(n_tasks)}  # with ties


def test_allocation_budget_bounds_and_determinism():
    for seed in range(5):
        scores = random_scores(4, 16, seed)
        shuffled = {t: dict(scores[t]) for t in reversed(list(scores))}  # another task order
        for budget in range(1, 4 * 16 + 1):
            counts = allocate_experts(scores, budget)
            assert list(counts) == list(scores["t0"])  # every module, zeros included, in module order
            assert sum(counts.values()) == budget
            assert all(0 <= n <= 4 for n in counts.values())  # at most T experts
            assert counts == allocate_experts(scores, budget) == allocate_experts(shuffled, budget)


def test_allocation_never_favours_a_module_less_sensitive_in_every_task():
    for seed in range(5):
        scores = random_scores(3, 12, seed)
        for budget in range(1, 3 * 12 + 1):
            counts = allocate_experts(scores, budget)
            for a, b in itertools.permutations(scores["t0"], 2):
                if all(scores[t][a] > scores[t][b] for t in scores):
                    assert counts[a] >= counts[b], (budget, a, b)


def test_allocation_matches_naive_vote_count():
    # reference: each task lists modules by score, ties by module position, and votes for the top q_t
    scores = random_scores(3, 5, seed=7)
    budget = 8  # q = (3, 3, 2): 8 // 3 = 2 each, remainder 2 to the first two tasks by name
    expected = {m: 0 for m in scores["t0"]}
    for t, q in zip(["t0", "t1", "t2"], [3, 3, 2]):
        for m in sorted(scores[t], key=lambda m: (-scores[t][m], int(m[1:])))[:q]:
            expected[m] += 1
    assert allocate_experts(scores, budget) == expected


@pytest.mark.parametrize("budget", [0, -1, 3 * 2 + 1, 2.5])
def test_allocation_rejects_budgets_out_of_range(budget):
    scores = {"a": {"q": 1.0, "k": 2.0, "v": 0.5}, "b": {"q": 1.0, "k": 2.0, "v": 0.5}}
    with pytest.raises(ValueError, match="from 1 to 6"):
        allocate_experts(scores, budget)

# -----------------------------------------------------------------------------
# Applying an allocation, and training


def test_apply_wraps_only_allocated_modules_and_freezes_the_rest():
    model = tiny_gpt()
    names = candidate_names(model, TARGETS)
    allocation = {names[0]: 3, names[1]: 0, names[5]: 1}
    apply_lora_moe(model, allocation, r=2, top_k=2)
    assert isinstance(model.get_submodule(names[0]), LoRAMoELinear)
    assert model.get_submodule(names[0]).num_experts == 3
    assert type(model.get_submodule(names[1])) is nn.Linear  # zero experts: no adapter at all
    assert model.get_submodule(names[5]).router is None  # one expert: plain LoRA
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{names[0]}.lora_A", f"{names[0]}.lora_B", f"{names[0]}.router.weight",
                         f"{names[5]}.lora_A", f"{names[5]}.lora_B"}
    assert set(adapter_state_dict(model)) == trainable


@pytest.mark.parametrize("allocation,message", [
    ({"layers.9.attn.q_proj": 1}, "not a module"),
    ({"layers.0.ln_1": 1}, "only nn.Linear"),
    ({"layers.0.attn.q_proj": -1}, "whole number >= 0"),
    ({"layers.0.attn.q_proj": 1.5}, "whole number >= 0"),
])
def test_apply_rejects_bad_allocations(allocation, message):
    with pytest.raises(ValueError, match=message):
        apply_lora_moe(tiny_gpt(), allocation)


def test_training_step_moves_only_adapter_parameters():
    model = tiny_gpt()
    names = candidate_names(model, TARGETS)
    apply_lora_moe(model, {names[0]: 2, names[3]: 1, names[6]: 3}, r=2, top_k=1)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = data.get_batch(list(data.TASKS), 8, random.Random(0))
    for _ in range(2):  # two steps: at step one B = 0, so only B and the routers move
        _, ce = model(x, y)
        loss = ce + 0.01 * moe_aux_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p, frozen[n]), n
        else:
            assert p.grad is not None and not torch.equal(p, adapters[n]), n


def test_a_few_steps_on_one_batch_lower_the_loss():
    model = tiny_gpt()
    for p in model.parameters():  # GPT-2's std 0.02 leaves a random base's logits flat; give the adapters
        if p.dim() == 2:          # a base whose output they can steer
            nn.init.normal_(p, std=0.2)
    names = candidate_names(model, TARGETS)
    apply_lora_moe(model, {n: 2 for n in names}, r=4, top_k=1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = data.get_batch(list(data.TASKS), 16, random.Random(0))
    losses = []
    for _ in range(30):
        _, ce = model(x, y)
        losses.append(ce.item())
        optimizer.zero_grad()
        (ce + 0.01 * moe_aux_loss(model)).backward()
        optimizer.step()
    assert losses[-1] < 0.7 * losses[0], losses

# -----------------------------------------------------------------------------
# Data


def test_tasks_answer_correctly_and_heldout_inputs_never_train():
    rng = random.Random(0)
    for task in data.TASKS + ("copy",):
        for _ in range(300):
            prompt, ans = data.sample(task, rng, "train")
            inp = prompt[1:-1]
            assert not data.is_heldout(inp)
            if task == "add":
                a, b = inp.split("+")
                assert int(ans[:-1]) == int(a) + int(b)
            elif task == "reverse":
                assert [ans[i] for i in range(len(inp))] == [inp[len(inp) - 1 - i] for i in range(len(inp))]
            elif task == "shift":
                assert all(ord(o) - ord(i) in (1, 1 - len(data.LETTERS)) for i, o in zip(inp, ans[:-1]))
    pairs = data.eval_set("sort", 50, seed=3)
    assert pairs == data.eval_set("sort", 50, seed=3) and len(set(pairs)) == 50
    assert all(data.is_heldout(p[1:-1]) and a[:-1] == "".join(sorted(p[1:-1])) for p, a in pairs)


def test_batch_masks_the_prompt():
    x, y = data.encode([("Rabc=", "cba.")])
    assert data.decode(x[0].tolist()).startswith("Rabc=cba")
    assert data.decode([t for t in y[0].tolist() if t >= 0]) == "cba."
    assert y[0].tolist()[:4] == [-1, -1, -1, -1]  # positions of "R", "a", "b", "c" predict nothing

# -----------------------------------------------------------------------------
# train.py: bad arguments and an end-to-end run


@pytest.mark.parametrize("argv,message", [
    (["--budget", "0"], "--budget: expected a whole number >= 1, got '0'"),
    (["--budget", "65"], "--budget must be from 1 to 64"),
    (["--budget", "sixteen"], "expected a whole number >= 1, got 'sixteen'"),
    (["--rank", "0"], "--rank: expected a whole number >= 1"),
    (["--top-k", "0"], "--top-k: expected a whole number >= 1"),
    (["--lr", "nan"], "--lr: expected a number > 0"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda, cuda:N or mps"),
    (["--targets", "q_proj,w_proj"], "--targets must name distinct matrices"),
    (["--dtype", "fp16"], "argument --dtype: invalid choice: 'fp16'"),
])
def test_bad_arguments_give_one_clear_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert message in str(e.value.code)


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match="is a file"):
        train.parse_args(["--out", str(blocker)])
    with pytest.raises(SystemExit, match="cannot be created"):
        train.parse_args(["--out", str(blocker / "sub")])


def run_train(*argv):
    return subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *argv],
                          capture_output=True, text=True, cwd=HERE, timeout=300)


def test_train_py_bad_input_prints_no_traceback_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    proc = run_train("--budget", "100", "--out", str(out))
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "--budget must be from 1 to 64" in proc.stderr
    assert not out.exists()


def test_train_py_end_to_end_with_tiny_settings(tmp_path):
    tiny = ["--pretrain-steps", "20", "--steps", "10", "--batch-size", "8", "--sens-batches", "1",
            "--eval-examples", "5", "--eval-every", "5", "--budget", "7", "--device", "cpu", "--out", str(tmp_path)]
    proc = run_train(*tiny)
    assert proc.returncode == 0, proc.stderr
    assert "pretraining the base model" in proc.stdout + proc.stderr
    allocation = json.loads((tmp_path / "allocation.json").read_text())
    assert sum(allocation.values()) == 7 and all(n > 0 for n in allocation.values())
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["accuracy"]) == set(data.TASKS) and len(results["history"]) == 2
    assert results["config"]["dtype"] == "fp32"  # auto means fp32 on a CPU
    assert results["parameters"]["trainable"] < results["parameters"]["total"]
    adapter = torch.load(tmp_path / "adapter.pt", weights_only=True)
    assert adapter["allocation"] == allocation
    assert {k.rsplit(".", 1)[0].removesuffix(".router") for k in adapter["adapter"]} == set(allocation)
    proc = run_train(*tiny, "--dtype", "bf16")  # finds the pretrained base in the cache; bf16 leaves sensitivity alone
    assert proc.returncode == 0 and "loaded the pretrained base model" in proc.stdout + proc.stderr
    assert "(bf16 autocast)" in proc.stdout + proc.stderr
    assert json.loads((tmp_path / "allocation.json").read_text()) == allocation
    assert not list(tmp_path.glob("*.tmp"))
