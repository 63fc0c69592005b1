"""
Tests for LoRA-SMoE. Each one checks a fact against an independent reference: a naive per-token
loop, a formula worked by hand, a gradient computed another way, or a run done another way.

Run: pytest test_smoe.py   (tiny sizes, fixed seeds, under a minute on two CPU cores)
"""

import copy
import io
import itertools
import math
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import data
from smoe import (GPT, GPTConfig, LoRAMoELinear, adapter_state, allocate_experts, allocate_uniform, apply_lora_moe,
                  candidate_names, clear_routing, compute_sensitivity, layer_name, load_adapter, load_balancing_loss, moe_aux_loss,
                  moe_layers, normalise_per_layer, per_example_sq_norms, sensitivity_reference)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def assert_close(actual, expected, atol=1e-5, rtol=1e-5):
    actual, expected = actual.double(), expected.double()
    close = torch.allclose(actual, expected, atol=atol, rtol=rtol)
    assert close, f"max abs difference {(actual - expected).abs().max().item():.3e}"


def tiny_gpt(seed=0, n_embd=16):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=len(data.VOCAB), block_size=data.BLOCK_SIZE, n_layer=2, n_head=2, n_embd=n_embd))


def task_batches(tasks, n_batches, batch_size=8, seed=0):
    rng = random.Random(seed)
    return {t: [data.get_batch([t], batch_size, rng) for _ in range(n_batches)] for t in tasks}


def with_nonzero_B(model):
    """B = 0 at initialisation makes every expert contribute nothing; give them something to say."""
    for _, m in moe_layers(model):
        nn.init.normal_(m.lora_B)
    return model

# -----------------------------------------------------------------------------
# The LoRA-MoE layer


def naive_lora_moe(layer, x):
    """The layer's equation token by token and expert by expert, the slow obvious way."""
    W0, b0 = layer.base.weight, layer.base.bias
    out = []
    for token in x.reshape(-1, layer.base.in_features):
        y = W0 @ token + (0 if b0 is None else b0)
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
    return torch.stack(out).reshape(*x.shape[:-1], layer.base.out_features)


@pytest.mark.parametrize("E,top_k,r", [(1, 2, 4), (2, 1, 3), (4, 2, 4), (3, 5, 2), (8, 2, 8), (4, 3, 2)])
def test_fast_and_plain_forms_equal_a_naive_per_token_loop(E, top_k, r):
    torch.manual_seed(E * 10 + top_k)
    layer = LoRAMoELinear(nn.Linear(12, 10, bias=False), E, r=r, lora_alpha=6.0, top_k=top_k)
    nn.init.normal_(layer.lora_B)
    assert layer.top_k == min(top_k, E) and layer.scaling == 6.0 / r
    assert (layer.router is None) == (E == 1)
    for shape in [(12,), (5, 12), (2, 3, 12)]:  # any leading shape
        x = torch.randn(*shape)
        expected = naive_lora_moe(layer, x)
        assert_close(layer(x), expected)
        assert_close(layer.forward_plain(x), expected)


def test_layer_with_bias_and_rectangular_shape():
    torch.manual_seed(0)
    layer = LoRAMoELinear(nn.Linear(6, 9, bias=True), 3, r=2, top_k=2)
    assert layer.lora_A.shape == (3, 2, 6) and layer.lora_B.shape == (3, 9, 2)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 6)
    assert_close(layer(x), naive_lora_moe(layer, x))
    assert_close(layer.forward_plain(x), naive_lora_moe(layer, x))


def test_a_layer_without_an_expert_a_rank_or_a_choice_is_refused_with_one_line():
    for E, r, top_k in [(0, 4, 2), (2, 0, 2), (2, 4, 0)]:
        with pytest.raises(ValueError, match="needs num_experts, r and top_k of at least 1") as e:
            LoRAMoELinear(nn.Linear(6, 6), E, r=r, top_k=top_k)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("E,top_k", [(1, 2), (4, 2)])
def test_an_empty_batch_gives_an_empty_output(E, top_k):
    # e.g. an expert MLP of a base MoE that no token chose: zero tokens in, zero out, of the right width
    torch.manual_seed(0)
    layer = LoRAMoELinear(nn.Linear(6, 5), E, r=2, top_k=top_k)
    for shape in [(0, 6), (3, 0, 6)]:
        x = torch.randn(*shape)
        for form in (layer, layer.forward_plain):
            assert form(x).shape == shape[:-1] + (5,)
    assert moe_aux_loss(layer).item() == 0


@pytest.mark.parametrize("E,top_k", [(1, 2), (2, 1), (4, 1), (4, 2), (3, 3)])
def test_backward_of_both_forms_equals_the_naive_loop(E, top_k):
    torch.manual_seed(E + 10 * top_k)
    layer = LoRAMoELinear(nn.Linear(10, 7, bias=True), E, r=3, lora_alpha=6.0, top_k=top_k)
    nn.init.normal_(layer.lora_B)
    x, w = torch.randn(2, 5, 10), torch.randn(2, 5, 7)  # loss = sum(w * y): every output weighted differently
    params = [p for p in layer.parameters() if p.requires_grad]
    slow = torch.autograd.grad((w * naive_lora_moe(layer, x)).sum(), params)
    for form in (layer, layer.forward_plain):
        for g, h in zip(torch.autograd.grad((w * form(x)).sum(), params), slow):
            assert g.abs().max() > 0
            assert_close(g, h)


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


def test_top_1_gate_is_the_router_probability_so_the_router_learns_from_the_task_loss():
    # with softmax over the one chosen logit the gate is always 1 and the router's task-loss gradient is 0
    torch.manual_seed(0)
    layer = LoRAMoELinear(nn.Linear(8, 6, bias=False), 4, r=2, top_k=1)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(20, 8)
    probs = F.softmax(x @ layer.router.weight.t(), dim=-1)                    # (N, E)
    p, i = probs.max(dim=-1)                                                   # Switch: gate = p_i of the argmax
    delta = torch.stack([layer.lora_B[e] @ layer.lora_A[e] @ t for e, t in zip(i.tolist(), x)])  # (N, out)
    expected = x @ layer.base.weight.t() + layer.scaling * p[:, None] * delta
    assert_close(layer(x), expected)
    assert_close(layer.forward_plain(x), expected)
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
    expected = naive_lora_moe(reference, x.float())
    assert_close(y.float(), expected, atol=0.05, rtol=0.02)  # bf16 rounding of the output
    assert_close(layer.forward_plain(x).float(), expected, atol=0.05, rtol=0.02)
    y.float().pow(2).sum().backward()
    for name in ("lora_A", "lora_B", "router.weight"):
        grad = layer.get_parameter(name).grad
        assert grad.dtype == torch.float32 and grad.abs().max() > 0, name
    assert layer.base.weight.grad is None


def test_a_non_float_base_is_refused_with_one_line():
    # checks: an int8 (quantised) base is refused with one line naming its dtype, directly and through apply_lora_moe
    base = nn.Linear(4, 3)
    base.weight = nn.Parameter(torch.randint(-5, 5, (3, 4), dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError) as e:
        LoRAMoELinear(base, 2)
    assert "torch.int8" in str(e.value) and "\n" not in str(e.value), e.value
    model = nn.Sequential(nn.Linear(4, 4), base)
    with pytest.raises(TypeError, match="torch.int8"):
        apply_lora_moe(model, {"1": 2})


class CastsToWeightDtype(nn.Module):
    """A parent that reads its child's weight, as many Hugging Face models do (x.to(self.proj.weight.dtype))."""

    def __init__(self):
        super().__init__()
        self.proj, self.out = nn.Linear(6, 6, bias=True), nn.Linear(6, 3, bias=False)

    def forward(self, x):
        return self.out(torch.tanh(self.proj(x.to(self.proj.weight.dtype))))


def test_a_wrapped_layer_reads_weight_and_bias_through_to_its_base():
    # checks: a wrapped module's weight and bias are its base's, so a parent, the sensitivity and a parameter
    # count that read them see the same tensors as before the wrapping
    torch.manual_seed(0)
    model = CastsToWeightDtype()
    base = copy.deepcopy(model)
    proj, out = model.proj, model.out
    apply_lora_moe(model, {"proj": 2, "out": 1}, r=2)
    assert model.proj.weight is proj.weight and model.proj.bias is proj.bias
    assert model.out.weight is out.weight and model.out.bias is None
    x = torch.randn(5, 4, 6)
    assert torch.equal(model(x), base(x))
    loss_fn = lambda m, x: m(x).pow(2).sum(dim=(1, 2))  # noqa: E731  (b,)
    # the base weight's gradient does not depend on the adapter while B = 0: the same scores as the bare model
    wrapped = compute_sensitivity(model, {"t": [x]}, loss_fn, ["proj", "out"])["t"]
    bare = compute_sensitivity(base, {"t": [x]}, loss_fn, ["proj", "out"])["t"]
    for n in ("proj", "out"):
        assert math.isclose(wrapped[n], bare[n], rel_tol=1e-5) and bare[n] > 0, n
    assert sensitivity_reference(model, {"t": [x]}, loss_fn, ["proj"])["t"]["proj"] == pytest.approx(bare["proj"], rel=1e-4)


def test_a_copy_or_pickle_after_a_forward_works():
    # checks: copy.deepcopy and pickle leave out the forward's routing record (part of the autograd graph,
    # which deepcopy refuses), and the original keeps it
    model = tiny_gpt()
    names = candidate_names(model, TARGETS)
    apply_lora_moe(model, {names[0]: 3, names[5]: 1}, r=2)
    with_nonzero_B(model)
    x, y = data.get_batch(list(data.TASKS), 4, random.Random(0))
    logits, loss = model(x, y)  # the graph is alive: no backward yet
    twin = copy.deepcopy(model)
    assert twin.get_submodule(names[0]).routing == [] and twin.get_submodule(names[0]).top_idx is None
    assert model.get_submodule(names[0]).router_logits is not None  # the original keeps its routing
    assert torch.equal(twin(x)[0], logits)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(x)[0], logits)
    loss.backward()  # and the original still trains
    assert model.get_submodule(names[0]).router.weight.grad.abs().max() > 0


def test_wrapped_model_equals_base_model_at_initialisation():
    model = tiny_gpt()
    x, _ = data.get_batch(list(data.TASKS), 4, random.Random(0))
    expected, _ = model(x)
    names = candidate_names(model, TARGETS + ["up_proj"])
    apply_lora_moe(model, {name: i % 4 for i, name in enumerate(names)}, r=4, top_k=2)
    actual, _ = model(x)
    assert torch.equal(actual, expected)  # B = 0 makes every expert exactly zero

# -----------------------------------------------------------------------------
# Load-balancing loss


def balancing(logits, top_k, mask=None):
    return load_balancing_loss(logits, logits.topk(top_k, dim=-1).indices, mask)


def switch_loss_by_hand(logits, k, keep):
    """E sum_i f_i P_i token by token over the kept rows of logits (N, E): the Switch formula as a plain loop."""
    rows = [row for row, kept in zip(logits.tolist(), keep) if kept]
    E, f, P = len(rows[0]), [0.0] * len(rows[0]), [0.0] * len(rows[0])
    for row in rows:
        probs = [math.exp(z) / sum(math.exp(w) for w in row) for z in row]
        for i in sorted(range(E), key=lambda i: -row[i])[:k]:
            f[i] += 1 / (len(rows) * k)
        for i in range(E):
            P[i] += probs[i] / len(rows)
    return E * sum(a * b for a, b in zip(f, P))


@pytest.mark.parametrize("E,top_k", [(2, 1), (2, 2), (4, 1), (4, 2), (8, 2), (8, 3)])
def test_balancing_loss_is_one_at_uniform_routing(E, top_k):
    # equal logits: every router probability is 1/E, whatever topk picks
    assert abs(balancing(torch.zeros(30, E), top_k).item() - 1.0) < 1e-6
    # balanced slots, unbalanced probabilities: token n ranks experts n, n+1, ... (mod E), so every expert
    # fills k of the E*k slots (f = 1/E each), but tokens are sharper the larger n, so P is not uniform.
    # Then L = E * sum_i P_i / E = 1; any other f (e.g. all slots on one expert) gives E * P_0 != 1
    n = torch.arange(E)[:, None]
    logits = -((torch.arange(E) - n) % E).float() * (1.0 + n)            # (E, E) token n prefers expert n
    P = F.softmax(logits, dim=-1).mean(0)
    assert (P * E - 1).abs().max() > 0.1
    assert abs(balancing(logits, top_k).item() - 1.0) < 1e-6


@pytest.mark.parametrize("E,top_k", [(2, 1), (4, 1), (8, 1), (4, 2), (8, 2), (6, 3)])
def test_balancing_loss_is_at_most_E_over_k_and_reaches_it_at_collapse(E, top_k):
    # each token fills k different experts, so f_i <= 1/k and aux = E sum_i f_i P_i <= (E/k) sum_i P_i = E/k:
    # E at k = 1, every token on one expert
    torch.manual_seed(0)
    logits = torch.zeros(16, E)
    logits[:, :top_k] = 50.0  # every token on experts 0..k-1, with all its probability there
    assert abs(balancing(logits, top_k).item() - E / top_k) < 1e-5
    for scale in (1.0, 5.0, 50.0):
        assert balancing(scale * torch.randn(16, E), top_k).item() <= E / top_k + 1e-6


def test_balancing_loss_worked_by_hand():
    # the docstring: E = 2, k = 1, both tokens on expert 0 with P = (0.75, 0.25): 2 * (1 * 0.75 + 0 * 0.25) = 1.5
    logits = torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), 0.0]])
    assert abs(load_balancing_loss(logits, torch.tensor([[0], [0]])).item() - 1.5) < 1e-6
    # E = 3, k = 2, one token with probabilities (0.5, 0.3, 0.2): f = (1/2, 1/2, 0), L = 3 * (0.25 + 0.15) = 1.2
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    assert abs(load_balancing_loss(logits, torch.tensor([[0, 1]])).item() - 1.2) < 1e-6


def test_balancing_loss_gradient_trains_the_router():
    # dL/dz_nj = (E / N) * p_nj * (f_j - sum_i f_i p_ni), f held fixed (a count): the gradient by hand
    torch.manual_seed(0)
    N, E, k = 6, 4, 2
    z = torch.randn(N, E, requires_grad=True)
    balancing(z, k).backward()
    p = F.softmax(z.detach(), dim=-1)
    f = torch.zeros(E)
    for row in z.detach().topk(k, dim=-1).indices.tolist():
        for i in row:
            f[i] += 1 / (N * k)
    assert_close(z.grad, E / N * p * (f - (p * f).sum(-1, keepdim=True)))
    # and on a layer: the balancing loss alone moves a collapsed router towards balance
    model = apply_lora_moe(nn.Sequential(nn.Linear(8, 8, bias=False)), {"0": 4}, r=2, top_k=1)
    layer = model[0]
    with torch.no_grad():
        layer.router.weight[0] += 0.5  # expert 0 wins for most tokens
    x = torch.rand(64, 8)
    optimizer = torch.optim.SGD(layer.router.parameters(), lr=1.0)
    losses = []
    for _ in range(30):
        model(x)
        aux = moe_aux_loss(model)
        losses.append(aux.item())
        optimizer.zero_grad()
        aux.backward()
        optimizer.step()
    assert losses[-1] < losses[0] - 0.5, losses


def test_balancing_loss_counts_only_the_masked_tokens():
    torch.manual_seed(0)
    N, E, k = 12, 4, 2
    logits, mask = torch.randn(N, E), torch.rand(N) > 0.4
    assert abs(balancing(logits, k, mask=mask).item() - switch_loss_by_hand(logits, k, mask.tolist())) < 1e-6
    assert balancing(logits, k, mask=torch.zeros(N, dtype=torch.bool)).item() == 0  # nothing to balance

    # moe_aux_loss with the padding of a real batch masked equals each layer's loss on its real tokens
    model = tiny_gpt()
    names = candidate_names(model, TARGETS)
    apply_lora_moe(model, {names[0]: 3, names[5]: 4}, r=2, top_k=2)
    x, _ = data.get_batch(list(data.TASKS), 6, random.Random(0))
    real = x != data.STOI[data.PAD]
    assert not real.all()  # the batch is padded
    model(x)
    layers = [model.get_submodule(n) for n in (names[0], names[5])]
    by_hand = [balancing(m.router_logits[real.flatten()], m.top_k) for m in layers]
    assert_close(moe_aux_loss(model, mask=real), sum(by_hand) / 2)


class SharedBlock(nn.Module):
    """One projection applied twice per forward, as a weight-shared (looped) layer is."""

    def __init__(self):
        super().__init__()
        self.emb, self.proj = nn.Embedding(5, 6), nn.Linear(6, 6)

    def forward(self, idx):                                  # (b, L) token ids
        h = self.emb(idx)
        return self.proj(torch.tanh(self.proj(h)))           # (b, L, 6)


def test_aux_loss_covers_every_call_of_a_module_in_the_latest_forward():
    torch.manual_seed(0)
    model = apply_lora_moe(SharedBlock(), {"proj": 4}, r=2, top_k=2)
    with_nonzero_B(model)
    proj = model.proj
    for _ in range(2):  # a second forward starts a new record: its loss covers its own two calls only
        idx = torch.randint(0, 5, (3, 4))
        mask = torch.rand(3, 4) > 0.3
        model(idx)
        # by hand: the router on the first call's input and on the second call's input, 2 x 12 tokens
        h = model.emb(idx).reshape(-1, 6)
        second = torch.tanh(naive_lora_moe(proj, h))                    # (12, 6) the second call's input
        logits = torch.cat([h @ proj.router.weight.t(), second @ proj.router.weight.t()]).detach()  # (24, E)
        assert len(proj.routing) == 2
        keep = mask.flatten().tolist() * 2  # the mask applies to each call
        assert math.isclose(moe_aux_loss(model, mask=mask).item(), switch_loss_by_hand(logits, 2, keep), rel_tol=1e-5)
        assert math.isclose(moe_aux_loss(model).item(), switch_loss_by_hand(logits, 2, [True] * 24), rel_tol=1e-5)
    with pytest.raises(ValueError, match=r"the mask has 6 tokens and proj routed \[12, 12\] in its calls"):
        moe_aux_loss(model, mask=mask[:2, :3])
    assert copy.deepcopy(model).proj.routing == []  # and a copy after the forward still works


class Body(nn.Module):
    """A model whose part is also run alone, as model.body(x) for features."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Sequential(nn.Linear(6, 6), nn.Tanh()), nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.body(x))


def test_the_routing_record_restarts_with_the_models_forward_or_by_hand_before_a_part_runs_alone():
    # a container is never called, so nothing would restart its record: refused
    with pytest.raises(TypeError, match="a ModuleList has no forward.*give apply_lora_moe the model that is called"):
        apply_lora_moe(nn.ModuleList([nn.Linear(6, 6)]), {"0": 4}, r=2)
    torch.manual_seed(0)
    model = with_nonzero_B(apply_lora_moe(Body(), {"body.0": 4}, r=2, top_k=2))
    model(torch.randn(5, 6))
    x = torch.randn(7, 6)
    clear_routing(model)  # by hand: the part's forward does not begin the model's
    model.body(x)
    logits = (x @ model.body[0].router.weight.t()).detach()  # (7, E) the router on this call's input alone
    assert math.isclose(moe_aux_loss(model).item(), switch_loss_by_hand(logits, 2, [True] * 7), rel_tol=1e-5)


def test_under_torch_compile_each_forward_restarts_the_record_and_the_loss_is_eagers():
    torch.manual_seed(0)
    model = with_nonzero_B(apply_lora_moe(SharedBlock(), {"proj": 4}, r=2, top_k=2))
    compiled = torch.compile(model, backend="eager")  # the compile path without a compiler: cheap
    idx = torch.randint(0, 5, (3, 4))
    model(idx)
    eager = moe_aux_loss(model).item()
    for _ in range(2):
        compiled(idx)
        assert len(model.proj.routing) == 2  # the two calls of one forward
        assert math.isclose(moe_aux_loss(compiled).item(), eager, rel_tol=1e-6)


def test_aux_loss_leaves_out_layers_that_use_every_expert():
    # checks: a layer with E <= k (here E = 2 at k = 2) stays out of the mean, so the E = 4 router gets the
    # whole gradient the coefficient asks for, not half of it
    model = tiny_gpt()
    names = candidate_names(model, TARGETS)
    apply_lora_moe(model, {names[0]: 2, names[1]: 4, names[2]: 1}, r=2, top_k=2)
    dense, routed = model.get_submodule(names[0]), model.get_submodule(names[1])
    x, _ = data.get_batch(list(data.TASKS), 4, random.Random(0))
    model(x)
    # why: a dense layer's loss is 1 whatever its router does, so it has no gradient to give
    dense_loss = load_balancing_loss(dense.router_logits, dense.top_idx)
    assert abs(dense_loss.item() - 1) < 1e-6
    assert torch.autograd.grad(dense_loss, dense.router.weight, retain_graph=True)[0].abs().max() < 1e-6
    alone = load_balancing_loss(routed.router_logits, routed.top_idx)  # the E = 4 layer by itself
    aux = moe_aux_loss(model)
    assert_close(aux, alone)
    full = torch.autograd.grad(alone, routed.router.weight, retain_graph=True)[0]
    got = torch.autograd.grad(aux, routed.router.weight)[0]
    assert full.abs().max() > 0
    assert_close(got, full)
    # a model whose layers all use every expert has no balancing loss at all
    only_dense = apply_lora_moe(tiny_gpt(), {names[0]: 2, names[3]: 1}, r=2, top_k=2)
    only_dense(x)
    assert moe_aux_loss(only_dense).item() == 0


def gpt_logits(model, idx, use_reentrant=None):
    """GPT.forward, each block under activation checkpointing (use_reentrant True or False) or not (None)."""
    clear_routing(model)  # a new forward: what the model's own forward pre-hook does
    x = model.tok_emb(idx) + model.pos_emb(torch.arange(idx.shape[1]))
    if use_reentrant:
        x.requires_grad_(True)  # the reentrant form needs an input that requires grad to backpropagate at all
    for block in model.layers:
        x = block(x) if use_reentrant is None else checkpoint(block, x, use_reentrant=use_reentrant)
    return model.lm_head(model.ln_f(x))


def test_aux_loss_under_activation_checkpointing_trains_or_raises_one_clear_error():
    # checks: non-reentrant checkpointing gives the plain gradients; under reentrant checkpointing the forward
    # runs without grad, so the router logits have none, and moe_aux_loss says so instead of training nothing
    model = tiny_gpt()
    names = candidate_names(model, TARGETS)
    apply_lora_moe(model, {names[0]: 4, names[4]: 3, names[6]: 1}, r=2, top_k=2)
    with_nonzero_B(model)
    x, y = data.get_batch(list(data.TASKS), 4, random.Random(0))
    params = [p for p in model.parameters() if p.requires_grad]

    def loss(use_reentrant):
        ce = F.cross_entropy(gpt_logits(model, x, use_reentrant).flatten(0, 1), y.flatten(), ignore_index=-1)
        return ce + 0.5 * moe_aux_loss(model, mask=x != data.STOI[data.PAD])

    plain = torch.autograd.grad(loss(None), params)
    for g, h in zip(torch.autograd.grad(loss(False), params), plain):
        assert_close(g, h, atol=1e-6)
    router = model.get_submodule(names[0]).router.weight
    assert next(g for g, p in zip(plain, params) if p is router).abs().max() > 0
    with pytest.raises(RuntimeError, match="no gradient.*use_reentrant=False"):
        loss(True)
    # the same for a forward under no_grad; under no_grad the loss can still be read
    with torch.no_grad():
        model(x)
        value = moe_aux_loss(model)
    m0, m4 = model.get_submodule(names[0]), model.get_submodule(names[4])
    assert_close(value, (load_balancing_loss(m0.router_logits, m0.top_idx) + load_balancing_loss(m4.router_logits, m4.top_idx)) / 2)
    with pytest.raises(RuntimeError, match="no gradient"):
        moe_aux_loss(model)

# -----------------------------------------------------------------------------
# Sensitivity


def per_example_loop(model, task_batches_, loss_fn, names, unpad=False):
    """The definition with plain autograd: each example alone (without its padding when unpad),
    its weight gradients squared and summed."""
    model = copy.deepcopy(model)
    weights = [model.get_submodule(n).weight.requires_grad_(True) for n in names]
    scores = {}
    for task, batches in task_batches_.items():
        scores[task] = dict.fromkeys(names, 0.0)
        for batch in batches:  # a tensor, or a tuple of tensors with the batch first
            parts = batch if isinstance(batch, tuple) else (batch,)
            for i in range(len(parts[0])):
                example = tuple(t[i:i + 1] for t in parts)
                if unpad:  # the line up to its own length
                    n = int((example[0] != data.STOI[data.PAD]).sum())
                    example = tuple(t[:, :n] for t in example)
                loss = loss_fn(model, example if isinstance(batch, tuple) else example[0]).sum()
                for name, g in zip(names, torch.autograd.grad(loss, weights, allow_unused=True)):
                    scores[task][name] += 0.0 if g is None else g.double().pow(2).sum().item()
    return scores


def assert_scores_close(actual, expected, rel=1e-4):
    assert actual.keys() == expected.keys()
    for task in expected:
        assert actual[task].keys() == expected[task].keys()
        for name, e in expected[task].items():
            assert math.isclose(actual[task][name], e, rel_tol=rel, abs_tol=1e-12), (task, name, actual[task][name], e)


def test_sensitivity_equals_one_backward_per_example_and_each_example_alone_without_padding():
    model = tiny_gpt()
    names = candidate_names(model, TARGETS + ["up_proj", "down_proj"])
    batches = task_batches(["reverse", "add"], n_batches=2)
    assert all((x == data.STOI[data.PAD]).any() for bs in batches.values() for x, _ in bs)  # padded batches
    fast = compute_sensitivity(model, batches, data.example_losses, names)
    assert all(s > 0 for scores in fast.values() for s in scores.values())
    assert_scores_close(fast, sensitivity_reference(model, batches, data.example_losses, names))
    assert_scores_close(fast, per_example_loop(model, batches, data.example_losses, names, unpad=True))


class Bilinear(nn.Module):
    """y = x W^T; example b's loss is sum_t c_bt . y_bt, so its gradient is d l_b / dW = sum_t c_bt x_bt^T,
    which the test sets to any matrix it likes."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(2, 2, bias=False)


def test_sensitivity_worked_by_hand():
    # the docstring's example: G_1 = [[1, -2], [0, 2]], G_2 = [[1, 0], [0, 0]]: (1 + 4 + 0 + 4) + 1 = 10;
    # with x_b1 = e1, x_b2 = e2 the columns of G_b are the coefficients c_b1, c_b2
    G = torch.tensor([[[1., -2.], [0., 2.]], [[1., 0.], [0., 0.]]])   # (b, O, C)
    x = torch.eye(2).expand(2, 2, 2)                                   # (b, L, C): token l is e_l
    c = G.transpose(1, 2)                                              # (b, L, O): c_bl = column l of G_b
    loss_fn = lambda model, batch: (model.proj(batch[0]) * batch[1]).sum(dim=(1, 2))  # noqa: E731  (b,)
    model = Bilinear()
    assert compute_sensitivity(model, {"t": [(x, c)]}, loss_fn, ["proj"])["t"]["proj"] == pytest.approx(10.0)
    assert sensitivity_reference(model, {"t": [(x, c)]}, loss_fn, ["proj"])["t"]["proj"] == pytest.approx(10.0)


class Twice(nn.Module):
    """One matrix used twice in a forward pass, as tied or shared weights are."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4, bias=False)

    def forward(self, x):
        return self.proj(torch.tanh(self.proj(x)))


def test_a_matrix_used_twice_adds_its_gradients_before_squaring():
    torch.manual_seed(0)
    model, x = Twice(), torch.randn(6, 3, 4)  # (b, L, C)
    loss_fn = lambda model, batch: model(batch).pow(2).sum(dim=(1, 2))  # noqa: E731  (b,)
    actual = compute_sensitivity(model, {"t": [x]}, loss_fn, ["proj"])["t"]["proj"]
    expected = sum(torch.autograd.grad(loss_fn(model, x[i:i + 1]).sum(), model.proj.weight)[0].double().pow(2).sum().item()
                   for i in range(len(x)))  # one example at a time, plain autograd
    # by hand: call 1 gives G1 = g1^T x, call 2 gives G2 = g2^T tanh(x W^T); the score squares G1 + G2, and
    # squaring each call apart (||G1||^2 + ||G2||^2) would be another number
    W, together, apart = model.proj.weight.detach().double(), 0.0, 0.0
    for xi in x.double():                                # (L, C)
        a = torch.tanh(xi @ W.t())                       # (L, C) the second call's input
        g2 = 2 * (a @ W.t())                             # (L, O) dl/dy of the second call
        g1 = (g2 @ W) * (1 - a ** 2)                     # (L, O) dl/dy of the first call
        G1, G2 = g1.t() @ xi, g2.t() @ a
        together += (G1 + G2).pow(2).sum().item()
        apart += G1.pow(2).sum().item() + G2.pow(2).sum().item()
    assert math.isclose(together, expected, rel_tol=1e-6) and not math.isclose(apart, expected, rel_tol=1e-2)
    assert math.isclose(actual, expected, rel_tol=1e-5), (actual, expected)
    assert math.isclose(sensitivity_reference(model, {"t": [x]}, loss_fn, ["proj"])["t"]["proj"], expected, rel_tol=1e-5)


class SideBranches(nn.Module):
    """One linear that reaches the loss, one that runs but whose output is dropped, one never called."""

    def __init__(self):
        super().__init__()
        self.used, self.dropped, self.never = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        self.dropped(x)
        return self.used(x)


def test_a_candidate_the_loss_never_uses_scores_zero():
    torch.manual_seed(0)
    model, x = SideBranches(), torch.randn(8, 4)
    loss_fn = lambda model, batch: model(batch).pow(2).sum(dim=1)  # noqa: E731  (b,)
    scores = compute_sensitivity(model, {"t": [x]}, loss_fn, ["used", "dropped", "never"])["t"]
    assert scores["dropped"] == 0.0 and scores["never"] == 0.0
    expected = sum(torch.autograd.grad(loss_fn(model, x[i:i + 1]).sum(), model.used.weight)[0].double().pow(2).sum().item()
                   for i in range(len(x)))
    assert math.isclose(scores["used"], expected, rel_tol=1e-5)


def test_sensitivity_leaves_the_model_as_found():
    for training in (True, False):
        model = tiny_gpt()
        model.train(training)
        model.lm_head.weight.requires_grad_(False)
        model.tok_emb.weight.grad = torch.ones_like(model.tok_emb.weight)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        compute_sensitivity(model, task_batches(["shift"], 1), data.example_losses, candidate_names(model, TARGETS))
        assert model.training == training
        assert all(m.training == training for m in model.modules())
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]) and p.requires_grad == flags[n], n
            assert torch.equal(p.grad, torch.ones_like(p)) if n == "tok_emb.weight" else p.grad is None, n
        assert not any(m._forward_hooks for m in model.modules())  # its hooks are removed


class DropoutAndBatchNorm(nn.Module):
    """A training model with a BatchNorm its user keeps in eval (frozen statistics) and a Dropout."""

    def __init__(self):
        super().__init__()
        self.up, self.norm, self.drop, self.down = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3)
        self.norm.running_mean.normal_()
        self.norm.eval()

    def forward(self, x):                                    # (b, 4)
        return self.down(self.drop(torch.relu(self.norm(self.up(x)))))


def test_both_forms_measure_the_model_in_eval_mode_and_leave_each_module_in_its_own_mode():
    # one definition for both: dropout off, the pretrained model as it is; a BatchNorm left in eval stays in eval
    torch.manual_seed(0)
    model, x = DropoutAndBatchNorm(), torch.randn(6, 4)
    loss_fn = lambda model, batch: model(batch).pow(2).sum(dim=1)  # noqa: E731  (b,)
    modes = [m.training for m in model.modules()]
    assert modes == [True, True, False, True, True]
    expected = per_example_loop(model.eval(), {"t": [x]}, loss_fn, ["up", "down"])  # each example alone, in eval
    model.train().norm.eval()
    for form in (compute_sensitivity, sensitivity_reference):
        torch.manual_seed(1)  # were dropout on, each form would drop other units
        assert_scores_close(form(model, {"t": [x]}, loss_fn, ["up", "down"]), expected, rel=1e-5)
        assert [m.training for m in model.modules()] == modes, form.__name__


class Merging(nn.Linear):
    """A loralib-style layer: train(False) merges its delta into the weight, train(True) takes it out."""

    def __init__(self):
        super().__init__(4, 4)
        self.delta, self.merged = nn.Parameter(torch.ones(4, 4)), False

    def train(self, mode=True):
        super().train(mode)
        if mode == self.merged:
            with torch.no_grad():
                self.weight += -self.delta if mode else self.delta
            self.merged = not mode
        return self

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + (0 if self.merged else x @ self.delta.t())


def test_both_forms_restore_each_mode_through_the_modules_own_train():
    # a module whose train() does more than set the flag is put back by calling it: unmerged, its delta learns again
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    for form in (compute_sensitivity, sensitivity_reference):
        model = nn.Sequential(Merging(), nn.Linear(4, 4)).train()
        weight = model[0].weight.detach().clone()
        form(model, {"t": [x]}, lambda m, b: m(b).pow(2).sum(1), ["1"])
        assert model[0].training and not model[0].merged, form.__name__
        assert_close(model[0].weight, weight)  # merged and taken out again
        assert torch.autograd.grad(model(x).sum(), model[0].delta)[0].abs().max() > 0, form.__name__


def test_a_loss_that_is_not_one_per_example_is_one_clear_error():
    # a batch's mean, or losses for some of the examples, would score other gradients than the examples'
    torch.manual_seed(0)
    model, x = Twice(), torch.randn(4, 3, 4)
    for loss_fn, shape in [(lambda m, b: m(b).pow(2).mean(), "shape ()"), (lambda m, b: m(b).pow(2).sum(dim=(1, 2))[:2], "shape (2,)")]:
        with pytest.raises(ValueError, match="one loss per example") as e:
            compute_sensitivity(model, {"t": [x]}, loss_fn, ["proj"])
        assert shape in str(e.value) and "\n" not in str(e.value)


class Flattens(nn.Module):
    """Tokens flattened to (b*L, C) before the candidate, as the expert MLPs of an MoE model get them."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):                                    # (b, L, C)
        return self.proj(x.reshape(-1, x.shape[-1])).view(x.shape)


def test_a_candidate_whose_input_is_not_batch_first_is_one_clear_error():
    torch.manual_seed(0)
    loss_fn = lambda model, x: model(x).pow(2).sum(dim=(1, 2))  # noqa: E731  (b,)
    with pytest.raises(ValueError, match=r"input with the batch first: loss_fn returned shape \(4,\), the candidates got \{'proj': \[\(12, 4\)\]\}"):
        compute_sensitivity(Flattens(), {"t": [torch.randn(4, 3, 4)]}, loss_fn, ["proj"])
    # PyTorch's default batch_first=False: (L, b, C) inputs. With L == b no shape can tell, so the layer is named
    layer = nn.TransformerEncoderLayer(8, nhead=2, dim_feedforward=16, dropout=0.0)
    for L in (5, 3):
        with pytest.raises(ValueError, match="linear1 is in a TransformerEncoderLayer built with batch_first=False"):
            compute_sensitivity(layer, {"t": [torch.randn(L, 3, 8)]}, lambda m, x: m(x).pow(2).sum(dim=(0, 2)), ["linear1"])


class TiedPair(nn.Module):
    """Two linears that share one weight tensor, as tied or looped weights do."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_candidates_sharing_one_weight_each_get_the_score_of_its_gradient():
    # the definition is the weight's: ||d l(x)/dW||^2 with both modules' calls in dl/dW, the same for both names
    torch.manual_seed(0)
    model, x = TiedPair(), torch.randn(5, 3, 4)
    loss_fn = lambda model, batch: model(batch).pow(2).sum(dim=(1, 2))  # noqa: E731  (b,)
    fast = compute_sensitivity(model, {"t": [x]}, loss_fn, ["a", "b"])
    assert fast["t"]["a"] == fast["t"]["b"]
    assert_scores_close(fast, per_example_loop(model, {"t": [x]}, loss_fn, ["a", "b"]))
    assert_scores_close(fast, sensitivity_reference(model, {"t": [x]}, loss_fn, ["a", "b"]))


def test_sensitivity_saves_nothing_for_backward_after_the_forward_pass():
    """Squaring per-example gradients must build no graph: on a large model the (b, O, C) tensors it
    kept alive ran the process out of memory."""
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

    gpt, twice = tiny_gpt(), Twice()  # a matrix called twice takes the path that folds after the backward pass
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        compute_sensitivity(gpt, task_batches(["reverse"], 1), forward_only(data.example_losses),
                            candidate_names(gpt, TARGETS + ["up_proj", "down_proj"]))
        compute_sensitivity(twice, {"t": [torch.randn(4, 3, 4)]},
                            forward_only(lambda m, b: m(b).pow(2).sum(dim=(1, 2))), ["proj"])
    assert saved_after == [], f"{len(saved_after)} tensors saved for backward after the forward pass, e.g. {saved_after[:3]}"


def test_per_example_squared_norms_both_ways_against_a_naive_loop(monkeypatch):
    einsum_calls = []
    real_einsum = torch.einsum
    monkeypatch.setattr(torch, "einsum", lambda *a: einsum_calls.append(1) or real_einsum(*a))
    torch.manual_seed(0)
    for L, O, C in [(3, 16, 16), (10, 4, 6)]:  # L (O + C) < O C: the Gram way; otherwise the weight gradient itself
        g, x = torch.randn(3, L, O, dtype=torch.float64), torch.randn(3, L, C, dtype=torch.float64)
        naive = torch.stack([sum(torch.outer(g[b, t], x[b, t]) for t in range(L)).pow(2).sum() for b in range(3)])
        einsum_calls.clear()
        assert_close(per_example_sq_norms(g, x), naive, atol=1e-10, rtol=1e-10)
        assert len(einsum_calls) == (L * (O + C) >= O * C), (L, O, C)
    # the docstring's example by hand: G = [[1, 2], [3, 4]], 1 + 4 + 9 + 16 = 30; the Gram way 5 + 25
    g1, x1 = torch.eye(2)[None], torch.tensor([[[1., 2.], [3., 4.]]])
    einsum_calls.clear()
    assert per_example_sq_norms(g1, x1).item() == 30.0 and einsum_calls == [1]
    wide = lambda t: F.pad(t, (0, 6))  # noqa: E731  zero features change no norm, and make the Gram way cheaper
    einsum_calls.clear()
    assert per_example_sq_norms(wide(g1), wide(x1)).item() == 30.0 and einsum_calls == []


def test_per_layer_normalisation_and_layer_names_worked_examples():
    scores = {"t": {"layers.0.q": 6.0, "layers.0.k": 2.0, "layers.1.q": 1.0, "layers.1.k": 3.0}}
    assert normalise_per_layer(scores) == {"t": {"layers.0.q": 0.75, "layers.0.k": 0.25, "layers.1.q": 0.25, "layers.1.k": 0.75}}
    assert normalise_per_layer({"t": {"layers.0.q": 0.0, "layers.0.k": 0.0}}) == {"t": {"layers.0.q": 0.0, "layers.0.k": 0.0}}
    assert layer_name("layers.3.attn.q_proj") == "layers.3"
    assert layer_name("encoder.layers.10.linear1") == "encoder.layers.10"
    assert layer_name("encoder.layers.1.linear1") != layer_name("decoder.layers.1.linear1")
    assert layer_name("encoder.block.0.layer.1.DenseReluDense.wi") == "encoder.block.0"  # T5: layer.1 is block 0's MLP
    assert layer_name("model.layers.3.mlp.experts.7.w1") == "model.layers.3"              # an MoE's expert 7 of layer 3
    assert layer_name("lm_head") == "lm_head"

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


def test_allocation_spends_exactly_the_budget_deterministically():
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
    for seed in range(5):
        scores = random_scores(3, 5, seed=seed)
        for budget, q in [(8, [3, 3, 2]), (7, [3, 2, 2]), (3, [1, 1, 1])]:  # budget // 3 each, the rest to the first tasks
            expected = {m: 0 for m in scores["t0"]}
            for t, q_t in zip(["t0", "t1", "t2"], q):
                for m in sorted(scores[t], key=lambda m: (-scores[t][m], int(m[1:])))[:q_t]:
                    expected[m] += 1
            assert allocate_experts(scores, budget) == expected


@pytest.mark.parametrize("budget", [0, -1, 3 * 2 + 1])
def test_allocation_rejects_budgets_out_of_range(budget):
    scores = {"a": {"q": 1.0, "k": 2.0, "v": 0.5}, "b": {"q": 1.0, "k": 2.0, "v": 0.5}}
    with pytest.raises(ValueError, match=r"budget must be from 1 to 6 \(tasks x candidate matrices = 2 x 3\)"):
        allocate_experts(scores, budget)


def test_allocation_refuses_scores_it_cannot_vote_from_with_one_line():
    scores = {"a": {"q": 1.0, "k": 2.0}, "b": {"q": 3.0, "k": 0.5}}
    for sensitivity, budget, message in [
            ({"a": {"q": 1.0, "k": float("nan")}}, 1, "not finite"),
            ({}, 1, "no scores to allocate from"),
            ({"a": {"q": 1.0, "k": 2.0}, "b": {"q": 3.0}}, 2, "task 'b' scores other modules than task 'a'"),
            ({"b": {"q": 1.0, "k": 2.0}, "a": {"q": 3.0}}, 2, "task 'b' scores other modules than task 'a'"),
            ({**scores, "c": {"q": 0.0, "k": 0.0}}, 3, "task 'c' scores every module 0"),  # its votes would go by module order
            (scores, 2.5, "a whole number, got 2.5")]:
        with pytest.raises(ValueError, match=message) as e:
            allocate_experts(sensitivity, budget)
        assert "\n" not in str(e.value)
    assert allocate_experts({**scores, "c": {"q": 0.0, "k": 1.0}}, 3) == {"q": 1, "k": 2}  # zeros beside a score are fine


def test_uniform_allocation_and_its_budget_error():
    names = [f"layers.{i}.attn.{m}" for i in range(4) for m in ("q_proj", "v_proj")]
    assert allocate_uniform(names, 8) == {n: 1 for n in names}  # budget = M: plain LoRA
    assert allocate_uniform(names, 24) == {n: 3 for n in names}
    for budget in (20, 0, -8):
        with pytest.raises(ValueError, match=rf"needs a multiple of the 8 candidate matrices \(at least 8\), got {budget}"):
            allocate_uniform(names, budget)

# -----------------------------------------------------------------------------
# Wrapping a model, and training


def test_candidate_names_match_by_suffix_in_module_order():
    model = tiny_gpt()  # 2 layers
    q, up = ["layers.0.attn.q_proj", "layers.1.attn.q_proj"], ["layers.0.mlp.up_proj", "layers.1.mlp.up_proj"]
    assert candidate_names(model, ["q_proj"]) == q
    assert candidate_names(model, ["attn.q_proj", "layers.1.attn.q_proj"]) == q  # suffixes, overlaps counted once
    assert candidate_names(model, ["up_proj", "q_proj"]) == [q[0], up[0], q[1], up[1]]  # module order
    assert candidate_names(model, ["lm_head"]) == ["lm_head"]  # a whole name
    for targets, bad in [(["q_proj", "w_proj"], "w_proj"), (["proj"], "proj"), (["ln_1"], "ln_1")]:
        with pytest.raises(ValueError, match=f"target '{bad}' matches no nn.Linear of the model"):
            candidate_names(model, targets)


def test_apply_wraps_only_allocated_modules_and_freezes_the_rest():
    model = tiny_gpt()
    names = candidate_names(model, TARGETS)
    apply_lora_moe(model, {names[0]: 3, names[1]: 0, names[5]: 1}, r=2, top_k=2)
    assert isinstance(model.get_submodule(names[0]), LoRAMoELinear) and model.get_submodule(names[0]).num_experts == 3
    assert type(model.get_submodule(names[1])) is nn.Linear  # zero experts: no adapter at all
    assert model.get_submodule(names[5]).router is None  # one expert: plain LoRA
    assert [n for n, _ in moe_layers(model)] == [names[0], names[5]]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{names[0]}.lora_A", f"{names[0]}.lora_B", f"{names[0]}.router.weight",
                         f"{names[5]}.lora_A", f"{names[5]}.lora_B"}
    assert set(adapter_state(model)["adapter"]) == trainable
    with pytest.raises(TypeError, match="layers.0.ln_1 is a LayerNorm, not an nn.Linear"):
        apply_lora_moe(tiny_gpt(), {"layers.0.ln_1": 1})
    for name in ("nope", "layers.9.attn.q_proj", "layers.0.attn.w_proj"):
        with pytest.raises(ValueError, match=f"'{name}' is not a module of the model"):
            apply_lora_moe(tiny_gpt(), {name: 2})


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 projection, y = x W + b with W (in, out): not an nn.Linear."""

    def __init__(self, nf, nx):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(nx, nf)), nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


def test_a_gpt2_conv1d_target_is_refused_with_the_way_to_an_nn_linear():
    model = nn.Sequential()
    model.add_module("c_attn", Conv1D(12, 4))
    with pytest.raises(ValueError, match="target 'c_attn' matches no nn.Linear.* but a Conv1D; .*linear_from_conv1d"):
        candidate_names(model, ["c_attn"])


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


def test_a_few_steps_on_one_batch_lower_the_loss_and_the_adapter_alone_rebuilds_the_tuned_model():
    model = tiny_gpt()
    for p in model.parameters():  # GPT-2's std 0.02 leaves a random base's logits flat; give the adapters
        if p.dim() == 2:          # a base whose output they can steer
            nn.init.normal_(p, std=0.2)
    base = copy.deepcopy(model)
    names = candidate_names(model, TARGETS)
    allocation = {n: [2, 0, 1, 3][i % 4] for i, n in enumerate(names)}
    apply_lora_moe(model, allocation, r=4, lora_alpha=8.0, top_k=2)
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

    # adapter_state -> torch.save -> torch.load(weights_only=True) -> load_adapter on a fresh copy of the base
    state = adapter_state(model)
    assert state["allocation"] == {n: c for n, c in allocation.items() if c > 0}
    assert state["lora"] == {"r": 4, "lora_alpha": 8.0, "top_k": 2}
    assert not any(".base." in k for k in state["adapter"])  # nothing of the base
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = load_adapter(copy.deepcopy(base), torch.load(buffer, weights_only=True))
    assert torch.equal(restored(x)[0], model(x)[0])
    assert not torch.equal(restored(x)[0], base(x)[0])  # and it is not the base


def test_adapter_state_of_a_model_without_adapters_is_one_clear_error():
    with pytest.raises(ValueError, match="no LoRA-MoE layer: apply_lora_moe or load_adapter adds them"):
        adapter_state(tiny_gpt())


def test_adapter_state_through_torch_compile_and_ddp_has_the_models_own_names(tmp_path):
    # the wrappers' "_orig_mod." and "module." are not the model's names: a state with them fits no fresh base
    import torch.distributed as dist
    torch.manual_seed(0)
    base = tiny_gpt()
    names = candidate_names(base, TARGETS)
    model = with_nonzero_B(apply_lora_moe(copy.deepcopy(base), {names[0]: 3, names[5]: 1}, r=2))
    x, _ = data.get_batch(list(data.TASKS), 4, random.Random(0))
    expected = model(x)[0]
    compiled = torch.compile(model, backend="eager")  # the wrapper without a compiler: the names are the same
    state = adapter_state(compiled)
    assert set(state["adapter"]) == set(adapter_state(model)["adapter"])
    restored = load_adapter(torch.compile(copy.deepcopy(base), backend="eager"), state)  # onto a wrapper as well
    assert torch.equal(restored(x)[0], expected)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        state = adapter_state(nn.parallel.DistributedDataParallel(model))
    finally:
        dist.destroy_process_group()
    assert set(state["adapter"]) == set(adapter_state(model)["adapter"])
    assert torch.equal(load_adapter(copy.deepcopy(base), state)(x)[0], expected)


def test_load_adapter_refuses_a_mismatched_state():
    model = tiny_gpt()
    names = candidate_names(model, TARGETS)
    state = adapter_state(apply_lora_moe(model, {names[0]: 2, names[3]: 1}, r=2))
    missing = {**state, "adapter": {k: v for k, v in state["adapter"].items() if not k.endswith("router.weight")}}
    with pytest.raises(ValueError, match=r"do not fit this model \(1 names differ\)"):
        load_adapter(tiny_gpt(), missing)
    with pytest.raises(RuntimeError, match=f"size mismatch for {names[0]}.lora_A"):
        load_adapter(tiny_gpt(n_embd=32), state)  # another model size

# -----------------------------------------------------------------------------
# Any model: the method on PyTorch's own nn.TransformerEncoder


class EncoderClassifier(nn.Module):
    """Not this project's model: an embedding, PyTorch's nn.TransformerEncoder and a linear head."""

    def __init__(self, vocab=10, classes=8, C=16, T=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, C)
        self.pos = nn.Parameter(0.1 * torch.randn(T, C))
        layer = nn.TransformerEncoderLayer(C, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(C, classes)

    def forward(self, x):                                   # (b, T) token ids
        h = self.encoder(self.emb(x) + self.pos)            # (b, T, C)
        return self.head(h.mean(dim=1))                     # (b, classes)


def toy_batch(task, n, gen):
    """A task token (8 or 9), then 5 digits 0..7; "max" answers the largest digit, "last" the last one."""
    digits = torch.randint(0, 8, (n, 5), generator=gen)
    x = torch.cat([torch.full((n, 1), 8 if task == "max" else 9), digits], dim=1)
    return x, digits.max(dim=1).values if task == "max" else digits[:, -1]


def classify_losses(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")  # (b,)


def test_whole_method_on_a_pytorch_transformer_encoder():
    torch.manual_seed(0)
    base = EncoderClassifier()
    model = copy.deepcopy(base)
    names = candidate_names(model, ["linear1", "linear2"])
    assert names == ["encoder.layers.0.linear1", "encoder.layers.0.linear2", "encoder.layers.1.linear1", "encoder.layers.1.linear2"]
    gen = torch.Generator().manual_seed(0)
    batches = {t: [toy_batch(t, 8, gen) for _ in range(2)] for t in ("max", "last")}

    sensitivity = compute_sensitivity(model, batches, classify_losses, names)
    assert_scores_close(sensitivity, sensitivity_reference(model, batches, classify_losses, names))
    assert_scores_close(sensitivity, per_example_loop(model, batches, classify_losses, names))

    # allocate 6 experts over 4 matrices and 2 tasks, wrap; the wrapped model starts equal to the base
    allocation = allocate_experts(sensitivity, 6)
    assert sum(allocation.values()) == 6 and max(allocation.values()) <= 2
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
    buffer = io.BytesIO()
    torch.save(adapter_state(model), buffer)
    buffer.seek(0)
    restored = load_adapter(copy.deepcopy(base), torch.load(buffer, weights_only=True))
    assert torch.equal(restored(x), model(x))


def test_a_wrapped_transformer_encoder_runs_its_adapter_in_eval_mode():
    # In eval mode nn.TransformerEncoderLayer takes a fused fast path that reads linear1.weight and
    # linear2.weight itself instead of calling the modules; with weight and bias read through to the base,
    # that path runs and the adapter is silently left out: the tuned model evaluates as its base.
    torch.manual_seed(0)
    base = EncoderClassifier()
    model = with_nonzero_B(apply_lora_moe(copy.deepcopy(base), {"encoder.layers.0.linear1": 2, "encoder.layers.1.linear2": 1}, r=4))
    x = torch.randint(0, 10, (4, 6))
    trained = model.train()(x)  # dropout is 0: train and eval mode compute the same function
    assert not torch.allclose(trained, base(x))
    with torch.no_grad():
        assert_close(model.eval()(x), trained, atol=1e-5)
    assert_close(model.eval()(x), trained, atol=1e-5)  # with grad enabled too: the base weights are frozen


class PaddedEncoder(nn.Module):
    """nn.TransformerEncoder as PyTorch builds it by default (enable_nested_tensor=True), fed a padding mask."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 8)                        # token 0 is padding
        layer = nn.TransformerEncoderLayer(8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2)
        self.head = nn.Linear(8, 3)

    def forward(self, x):                                    # (b, L) token ids, padded on the right
        real = x != 0
        h = self.encoder(self.emb(x), src_key_padding_mask=~real)  # (b, L, C)
        return self.head((h * real[..., None]).sum(1) / real.sum(1, keepdim=True))


def test_a_padded_batch_through_a_default_transformer_encoder_in_eval_mode():
    # in eval, nn.TransformerEncoder turns a padded batch into nested tensors, which neither the sensitivity's
    # hooks nor a LoRA-MoE layer can take: both run it without them, and its flag comes back as it was
    torch.manual_seed(0)
    model = PaddedEncoder().eval()
    x = torch.tensor([[1, 2, 3, 4], [5, 1, 0, 0], [2, 2, 2, 0]])
    loss_fn = lambda model, x: model(x).pow(2).sum(dim=1)  # noqa: E731  (b,)
    names = ["encoder.layers.0.linear1", "encoder.layers.1.linear2"]
    scores = compute_sensitivity(model, {"t": [x]}, loss_fn, names)
    assert model.encoder.use_nested_tensor and not model.training
    assert_scores_close(scores, per_example_loop(model, {"t": [x]}, loss_fn, names))
    with_nonzero_B(apply_lora_moe(model, dict.fromkeys(names, 2), r=2))
    with torch.no_grad():
        assert_close(model.eval()(x), model.train()(x))  # dropout is 0: the same function in both modes

