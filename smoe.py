"""
LoRA-SMoE in one file: a mixture of LoRA experts whose expert counts per weight matrix come from
gradient sensitivity under a fixed budget. Read top to bottom, smallest piece first:

  LoRAMoELinear        a frozen nn.Linear plus E LoRA experts and a top-k router
  load_balancing_loss  the Switch Transformer auxiliary loss, normalised per layer; moe_aux_loss
  sensitivity          S_t(W) = sum over sampled examples x of task t of ||d l(x)/dW||_F^2
  allocate_experts     per-task votes that spend exactly the budget; allocate_uniform
  apply_lora_moe       wrap the allocated nn.Linear modules of any model
  adapter_state        the trained adapter alone, and load_adapter to put it back
  GPT                  the tiny transformer of the toy (train.py)

Everything above GPT takes any nn.Module and a loss function; only GPT is specific to the toy.
Each idea comes first in its plain form (forward_plain, sensitivity_reference), then in the
fast form that train.py uses; test_smoe.py checks that the two agree.

Shapes: b examples in a batch, L positions, N = b*L tokens, C input features, O output
features, E experts, k experts chosen per token, r LoRA rank, V vocabulary.

References:
  [1] Xu, Diao. A Sensitivity-Driven Expert Allocation Method in LoRA-MoE (LoRA-SMoE). arXiv 2505.06272.
  [2] Hu et al. LoRA. arXiv 2106.09685.      [3] Fedus et al. Switch Transformers. arXiv 2101.03961.
  [4] Jiang et al. Mixtral of Experts. arXiv 2401.04088.
  [5] Goodfellow. Efficient Per-Example Gradient Computations. arXiv 1510.01799.
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# The LoRA-MoE layer


class LoRAMoELinear(nn.Module):
    """y = W0 x + sum over the chosen experts i in TopK(x) of g_i(x) * scaling * B_i A_i x   ([1] eq. 1)

    Gates: for k >= 2 a softmax over the k chosen router logits (Mixtral [4]). For k = 1 that
    softmax is always exactly 1 and the router would learn from the balancing loss alone, so the
    chosen expert is gated by its full-softmax probability p_i instead (Switch Transformer [3]).
    With E <= k every token uses every expert (a dense soft mixture); with E = 1 there is no
    router and the layer is plain LoRA [2]. k is min(top_k, E).
    Initialisation as PEFT's: A_i like an nn.Linear weight, B_i = 0, so the layer starts equal to
    its base. On a float16 or bfloat16 base the adapter is kept in float32, as PEFT does.
    Each call's router logits (N, E) and choices (N, k) go into self.routing for moe_aux_loss;
    clear_routing empties it, and apply_lora_moe makes that happen as each forward of the model begins.
    """

    def __init__(self, base: nn.Linear, num_experts: int, r: int = 8, lora_alpha: float = 16.0, top_k: int = 2):
        super().__init__()
        if min(num_experts, r, top_k) < 1:
            raise ValueError(f"LoRA-MoE needs num_experts, r and top_k of at least 1, got {num_experts}, {r} and {top_k}")
        self.base = base.requires_grad_(False)  # the pretrained weight stays frozen
        self.num_experts, self.r, self.lora_alpha, self.scaling = num_experts, r, lora_alpha, lora_alpha / r
        self.top_k = min(top_k, num_experts)
        like = {"device": base.weight.device, "dtype": torch.promote_types(base.weight.dtype, torch.float32)}
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, base.in_features, **like))   # E stacked (r, C)
        self.lora_B = nn.Parameter(torch.zeros(num_experts, base.out_features, r, **like))  # E stacked (O, r)
        for A in self.lora_A.data:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.router = nn.Linear(base.in_features, num_experts, bias=False, **like) if num_experts > 1 else None
        self.routing = []  # (router logits, choices) of each call since the model's forward began
        if not base.weight.is_floating_point():
            raise TypeError(f"the base weight is {base.weight.dtype}: LoRA-MoE wraps floating-point nn.Linear "
                            "layers only (quantised bases are not supported)")

    def route(self, x):
        """(N, E) gates: g_i(x) for each token's k chosen experts, 0 for the others."""
        logits = self.router(x)                                      # (N, E)
        top_logits, top_idx = logits.topk(self.top_k, dim=-1)        # (N, k)
        if self.top_k == 1:  # Switch [3]: the full-softmax probability, so that the task loss reaches the router
            top_gates = logits.softmax(-1).gather(-1, top_idx)       # (N, 1)
        else:  # Mixtral [4]: softmax over the k chosen logits
            top_gates = top_logits.softmax(-1)                       # (N, k)
        self.routing.append((logits, top_idx))
        return torch.zeros_like(logits, dtype=top_gates.dtype).scatter(-1, top_idx, top_gates)  # (N, E)

    def forward_plain(self, x):
        """The definition: the base output plus, for each expert, its gated output on the tokens that chose it."""
        xs = x.reshape(-1, x.shape[-1])                              # (N, C)
        y = self.base(xs).to(self.lora_A.dtype)                      # (N, O)
        xs = xs.to(self.lora_A.dtype)
        gates = self.route(xs) if self.router is not None else xs.new_ones(len(xs), 1)  # (N, E)
        for i in range(self.num_experts):
            rows = torch.where(gates[:, i] > 0)[0]                   # (N_i,) the tokens that chose expert i
            delta = xs[rows] @ self.lora_A[i].t() @ self.lora_B[i].t()  # (N_i, O)  B_i A_i x
            y = y.index_add(0, rows, gates[rows, i, None] * self.scaling * delta)
        return y.view(*x.shape[:-1], self.base.out_features)

    def forward(self, x):
        """The same sum as two matmuls: E experts of rank r are one LoRA of rank E*r whose rank groups
        are gated per token. No loop over experts or tokens."""
        E, r = self.num_experts, self.r
        xs = x.reshape(-1, x.shape[-1])                              # (N, C)
        y = self.base(xs)                                            # (N, O)
        xs = xs.to(self.lora_A.dtype)
        h = xs @ self.lora_A.reshape(E * r, -1).t()                  # (N, E*r) every expert's A_i x at once
        if self.router is not None:
            gates = self.route(xs)                                   # (N, E)
            h = (h.view(-1, E, r) * gates.unsqueeze(-1)).view(-1, E * r)  # (N, E*r) each rank group times its gate
        B_all = torch.cat(list(self.lora_B), dim=1)                  # (O, E*r) = [B_1 | ... | B_E], contiguous grads for DDP
        out = torch.addmm(y.to(h.dtype), h, B_all.t(), alpha=self.scaling)  # (N, O) y + scaling * h B_all^T in one GEMM
        return out.to(y.dtype).view(*x.shape[:-1], self.base.out_features)

    @property
    def router_logits(self):  # (N, E) every call's rows since the model's forward began, in call order
        return torch.cat([logits for logits, _ in self.routing]) if self.routing else None

    @property
    def top_idx(self):  # (N, k) the same calls' chosen experts
        return torch.cat([idx for _, idx in self.routing]) if self.routing else None

    @property
    def weight(self):  # code that reads a wrapped module's weight or bias gets the base's, as with PEFT
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def __getstate__(self):  # copies and pickles leave out the routing, which holds the forward's autograd graph
        return {**self.__dict__, "routing": []}

    def extra_repr(self):
        return f"experts={self.num_experts}, r={self.r}, top_k={self.top_k}"


def moe_layers(model):
    """(name, layer) for every LoRAMoELinear of the model, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRAMoELinear)]


def clear_routing(model, args=None):  # args: the forward's inputs, which a forward pre-hook is given
    """Empty the routing record of every LoRA-MoE layer of the model. apply_lora_moe registers it as a
    forward pre-hook of the model, so the record holds the calls of the model's latest forward; a model
    built with LoRAMoELinear by hand needs the same: model.register_forward_pre_hook(clear_routing)."""
    for _, m in moe_layers(model):
        m.routing.clear()

# -----------------------------------------------------------------------------
# The load-balancing loss


def load_balancing_loss(router_logits, top_idx, mask=None):
    """Switch Transformer [3] eq. 4, normalised so that uniform routing gives 1 for any E and k:

        f_i = (routing slots that chose expert i) / (N * k)
        P_i = mean over tokens of softmax(router_logits)_i
        aux = E * sum_i f_i * P_i

    router_logits (N, E), top_idx (N, k); mask: optional, one bool per token, the tokens to count.
    Its maximum is E / k: every token's k slots on the same k experts, all the probability there
    (E at k = 1). The gradient reaches the router through P (f is a count).
    Example by hand: E = 2, k = 1, two tokens both on expert 0 with P = (0.75, 0.25):
    f = (1, 0), aux = 2 * (1 * 0.75 + 0 * 0.25) = 1.5.
    """
    N, E = router_logits.shape
    probs = router_logits.float().softmax(-1)                        # (N, E)
    chosen = torch.zeros_like(probs).scatter(-1, top_idx, 1.0)       # (N, E) 1 where a token chose expert i
    w = probs.new_ones(N) if mask is None else mask.reshape(N).to(probs)  # (N,) 1 for a counted token
    counted = w.sum().clamp_min(1)
    f = (w @ chosen) / (counted * top_idx.shape[1])                  # (E,) share of the routing slots
    P = (w @ probs) / counted                                        # (E,) mean router probability
    return E * (f * P).sum()


def moe_aux_loss(model, mask=None):
    """The mean load_balancing_loss over the layers that choose (k < E), each over every call in the
    model's latest forward: a layer called twice on N tokens is balanced over its 2N tokens.

    A layer with E <= k uses every expert for every token: its loss would be 1 with no gradient,
    and averaging it in would give the other routers less than the coefficient asks, so it is
    left out, as is a layer the forward did not call. mask: one bool per token of the model's
    input, e.g. x != pad for a (b, L) batch; it applies to each call. Hugging Face's Mixtral
    helper gives k times one layer's loss, and pools all layers' tokens before multiplying f and P.
    """
    losses = []
    for name, m in moe_layers(model):
        if m.top_k < m.num_experts and m.routing:
            rows = [len(logits) for logits, _ in m.routing]  # tokens routed in each call
            if mask is not None and set(rows) != {mask.numel()}:
                raise ValueError(f"the mask has {mask.numel()} tokens and {name} routed {rows} in its calls: "
                                 "give one bool per token of each call")
            if m.router.weight.requires_grad and torch.is_grad_enabled() and not m.routing[0][0].requires_grad:
                raise RuntimeError(f"{name}'s router logits have no gradient, so the balancing loss would train nothing: "
                                   "the forward ran under no_grad, or under reentrant activation checkpointing "
                                   "(use use_reentrant=False)")
            losses.append(load_balancing_loss(m.router_logits, m.top_idx,
                                              None if mask is None else mask.reshape(-1).repeat(len(rows))))
    return torch.stack(losses).mean() if losses else torch.zeros(())

# -----------------------------------------------------------------------------
# Sensitivity: S_t(W) = sum over sampled examples x of task t of ||d l(x)/dW||_F^2   ([1] sec. 3.1)
# loss_fn(model, batch) returns (b,), each example's loss l(x); W is a candidate nn.Linear's base weight.
# Both forms measure the model in eval mode (dropout off) and update nothing.


def sensitivity_reference(model, task_batches, loss_fn, names):
    """The definition, one backward pass per example. {task: [batch, ...]} -> {task: {name: score}}.
    Slow (b backward passes per batch); the tests use it to check compute_sensitivity."""
    weights = [model.get_submodule(name).weight for name in names]
    scores = {}
    with measuring(model):
        for w in weights:
            w.requires_grad_(True)
        for task, batches in task_batches.items():
            scores[task] = dict.fromkeys(names, 0.0)
            for batch in batches:
                for loss in loss_fn(model, batch):                   # one example's loss
                    grads = torch.autograd.grad(loss, weights, retain_graph=True, allow_unused=True)
                    for name, g in zip(names, grads):
                        scores[task][name] += 0.0 if g is None else g.float().pow(2).sum().item()
    return scores


def per_example_sq_norms(g, x):
    """(b,) ||G||_F^2 of each example's weight gradient G = sum over its tokens j of g_j x_j^T, for
    y = x W^T with g = dl/dy (b, L, O) and x (b, L, C), without forming G when the Gram way is cheaper:
    ||G||^2 = sum over j, j' of (g_j . g_j') (x_j . x_j'), two (L, L) Gram matrices [5].
    Example by hand, one example of two tokens: g = [[1, 0], [0, 1]], x = [[1, 2], [3, 4]]:
    G = [[1, 2], [3, 4]], 1 + 4 + 9 + 16 = 30; the Gram way: g g^T = I, so x1.x1 + x2.x2 = 5 + 25."""
    L, O, C = g.shape[1], g.shape[2], x.shape[2]
    if L * (O + C) < O * C:  # fewer multiply-adds than forming G
        return ((g @ g.transpose(1, 2)) * (x @ x.transpose(1, 2))).sum(dim=(1, 2))  # (b, L, L) -> (b,)
    return torch.einsum("blo,blc->boc", g, x).pow(2).sum(dim=(1, 2))                 # (b, O, C) -> (b,)


def compute_sensitivity(model, task_batches, loss_fn, names):
    """The same scores as sensitivity_reference from one backward pass per batch, at about the cost
    of a LoRA step: a forward hook keeps each candidate's input x and adds a zero probe to its output;
    the backward pass is taken to the probes only (no weight gradient is computed), and a hook on
    each output turns its gradient g and the kept x into per-example squared norms as the pass
    reaches it. A weight called more than once, or shared by several candidates, sums its calls'
    gradients before squaring, as the definition does; a use outside the candidates' calls (an lm_head
    tied to the embedding) is not seen, where sensitivity_reference counts it. Needs each candidate's
    input with the batch first, (b, ..., C), and examples that do not interact (true of transformers).
    A matrix that gets a varying number of routed tokens (an MoE's expert) is refused, except when that
    number happens to equal b: no shape can tell, and its score is wrong. Leave such matrices out of
    `names`, or use sensitivity_reference.
    Example by hand, one matrix and one batch of two examples with weight gradients
    G_1 = [[1, -2], [0, 2]] and G_2 = [[1, 0], [0, 0]]: (1 + 4 + 0 + 4) + 1 = 10.
    """
    modules = {name: model.get_submodule(name) for name in names}
    first = {}  # candidates that share a weight are scored once, under the first one's name
    owner = {name: first.setdefault(id(m.weight), name) for name, m in modules.items()}
    calls = {name: [] for name in first.values()}  # this batch's [x, g] per call of each weight
    probes, acc = [], {}

    def on_forward(module, inputs, out, name):
        probe = torch.zeros((), dtype=out.dtype, device=out.device, requires_grad=True)
        probes.append(probe)
        call = [inputs[0].detach(), None]
        calls[name].append(call)
        out = out + probe                                            # the backward pass now reaches this output
        out.register_hook(lambda g: on_grad(name, call, g))
        return out

    def on_grad(name, call, g):
        call[1] = g
        if all(g is not None for _, g in calls[name]):  # the weight's last call: fold now and free the tensors
            fold(name)

    def fold(name):  # every call's tokens joined per example, then squared: the calls' gradients add first
        pairs = [(x, g) for x, g in calls[name] if g is not None]  # a call whose output never reached the loss has none
        if pairs:
            x = torch.cat([x.float().reshape(len(x), -1, x.shape[-1]) for x, _ in pairs], 1)  # (b, L, C)
            g = torch.cat([g.float().reshape(len(g), -1, g.shape[-1]) for _, g in pairs], 1)  # (b, L, O)
            acc[name] += per_example_sq_norms(g, x).sum()
        calls[name].clear()

    scores = {}
    with measuring(model):
        model.requires_grad_(False)  # the probes alone carry the backward pass: no graph below the first candidate
        hooks = [m.register_forward_hook(lambda m, i, o, name=owner[n]: on_forward(m, i, o, name)) for n, m in modules.items()]
        try:
            for task, batches in task_batches.items():
                acc.update({name: torch.zeros((), device=modules[name].weight.device) for name in calls})
                for batch in batches:
                    losses = loss_fn(model, batch)                   # (b,)
                    check_batch_first(model, losses, calls)
                    torch.autograd.grad(losses.float().sum(), probes, allow_unused=True)
                    for name in calls:  # the calls the backward pass did not reach
                        fold(name)
                    probes.clear()
                scores[task] = {name: acc[owner[name]].item() for name in names}
        finally:
            for h in hooks:
                h.remove()
    return scores


@contextmanager
def measuring(model):
    """The model in eval mode while it is measured, then each module's mode and each parameter's
    requires_grad as they were."""
    modes = [(m, m.training) for m in model.modules()]  # in module order: a parent before its children
    nested = [m for m in model.modules() if isinstance(m, nn.TransformerEncoder) and m.use_nested_tensor]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for m in nested:  # in eval it turns a padded batch into nested tensors, which hooks cannot go through
        m.use_nested_tensor = False
    try:
        yield
    finally:
        for m, training in modes:
            if m.training != training:  # train(), not the flag: a module may act on it (merge its LoRA in eval)
                m.train(training)  # which sets the children too, each restored in its own turn after
        for m in nested:
            m.use_nested_tensor = True
        for p, flag in flags:
            p.requires_grad_(flag)


def check_batch_first(model, losses, calls):
    """One loss per example, and each candidate's input with that many rows first: a loss for the batch,
    or tokens flattened or put first (as by PyTorch's transformer layers built with batch_first=False)
    before a candidate, would give other scores."""
    for name in calls:
        parent = model.get_submodule(name.rpartition(".")[0])
        if isinstance(parent, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) and not parent.self_attn.batch_first:
            raise ValueError(f"{name} is in a {type(parent).__name__} built with batch_first=False: sensitivity needs batch_first=True")
    if losses.dim() != 1 or any(len(x) != len(losses) for pairs in calls.values() for x, _ in pairs):
        inputs = {name: [tuple(x.shape) for x, _ in pairs] for name, pairs in calls.items()}
        raise ValueError(f"compute_sensitivity needs one loss per example and each candidate's input with the batch first: "
                         f"loss_fn returned shape {tuple(losses.shape)}, the candidates got {inputs}")


def layer_name(name):
    """The layer a module is in: its name up to its first all-digit part, "layers.3.attn.q_proj" -> "layers.3",
    T5's "encoder.block.0.layer.1.DenseReluDense.wi" -> "encoder.block.0", "layers.3.mlp.experts.7.w1" -> "layers.3"."""
    parts = name.split(".")
    return ".".join(parts[:next((i for i, p in enumerate(parts) if p.isdigit()), len(parts) - 1) + 1])


def normalise_per_layer(sensitivity):
    """Each score as a share of its task's total within its layer. The released code does about this
    without saying so (it clips each layer's gradient to norm 1 before reading the score), and then
    depth no longer decides the votes. Example: {"t": {"layers.0.q": 6, "layers.0.k": 2, "layers.1.q": 1,
    "layers.1.k": 3}} -> {"t": {"layers.0.q": 0.75, "layers.0.k": 0.25, "layers.1.q": 0.25, "layers.1.k": 0.75}}."""
    shares = {}
    for task, scores in sensitivity.items():
        totals = {}
        for m, s in scores.items():
            totals[layer_name(m)] = totals.get(layer_name(m), 0.0) + s
        shares[task] = {m: s / totals[layer_name(m)] if totals[layer_name(m)] > 0 else 0.0 for m, s in scores.items()}
    return shares

# -----------------------------------------------------------------------------
# Budgeted allocation by per-task votes   ([1] sec. 3.2, with an exact budget)


def allocate_experts(sensitivity, budget):
    """Spend exactly `budget` experts: {task: {module: score}} -> {module: experts}, in module order.

    Task t casts budget // T votes, plus one for the first budget % T tasks in name order, one vote
    each for its most sensitive modules; a module gets as many experts as votes, 0 to T. Ties go
    to the module that comes first. Valid budgets: 1 to T * M (T tasks, M modules). Every task
    scores the same modules, and a task whose scores are all 0 (its loss reaches no candidate) is an error.
    Example: {"a": {"q": 3, "k": 1, "v": 2}, "b": {"q": 1, "k": 5, "v": 4}}, budget 3: task a votes
    twice (q, v), task b once (k): {"q": 1, "k": 1, "v": 1}. Budget 4: a for q and v, b for k and v:
    {"q": 1, "k": 1, "v": 2}.
    """
    tasks = sorted(sensitivity)
    modules = list(sensitivity[tasks[0]]) if tasks else []
    T, M = len(tasks), len(modules)
    if T * M == 0:
        raise ValueError(f"no scores to allocate from: sensitivity is {{task: {{module: score}}}}, got {sensitivity}")
    if budget != int(budget) or not 1 <= budget <= T * M:
        raise ValueError(f"budget must be from 1 to {T * M} (tasks x candidate matrices = {T} x {M}), a whole number, got {budget}")
    for t in tasks:
        if set(sensitivity[t]) != set(modules):
            raise ValueError(f"task {t!r} scores other modules than task {tasks[0]!r}: every task must score the same ones")
        if not all(math.isfinite(s) for s in sensitivity[t].values()):
            raise ValueError("a sensitivity score is not finite (the loss or its gradient overflowed); no allocation from it")
        if not any(sensitivity[t].values()):
            raise ValueError(f"task {t!r} scores every module 0: its loss reaches no candidate matrix, so it has nothing to vote for")
    counts = dict.fromkeys(modules, 0)
    for i, t in enumerate(tasks):
        votes = int(budget) // T + (i < budget % T)
        for m in sorted(modules, key=lambda m: -sensitivity[t][m])[:votes]:  # a stable sort: ties in module order
            counts[m] += 1
    return counts


def allocate_uniform(names, budget):
    """The same count on every module; budget == M is plain LoRA, budget == T * M uniform LoRA-MoE x T."""
    if budget % len(names) or budget < len(names):
        raise ValueError(f"a uniform allocation needs a multiple of the {len(names)} candidate matrices "
                         f"(at least {len(names)}), got {budget}")
    return dict.fromkeys(names, budget // len(names))

# -----------------------------------------------------------------------------
# Wrapping a model


def candidate_names(model, targets):
    """The nn.Linear modules named by `targets`, in module order. A target matches a module whose name
    equals it or ends in "." + target, as PEFT's target_modules: "q_proj" matches "layers.0.attn.q_proj"."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in linears):
            kinds = ", ".join(sorted({type(m).__name__ for n, m in model.named_modules() if n == t or n.endswith("." + t)}))
            raise ValueError(f"target {t!r} matches no nn.Linear of the model (such as {', '.join(linears[:3])})"
                             f"{' but a ' + kinds if kinds else ''}; GPT-2's Conv1D: make each an nn.Linear first, "
                             "as experiments/hf_model.py's linear_from_conv1d does")
    return [n for n in linears if any(n == t or n.endswith("." + t) for t in targets)]


def apply_lora_moe(model, allocation, r=8, lora_alpha=16.0, top_k=2):
    """Freeze the model and replace each module of {name: experts} with count >= 1 by a LoRAMoELinear
    (count 0: no adapter). Changes the model in place and returns it; its trainable parameters are then
    the adapters' and routers' alone. The module must be called by its parent, self.proj(x):
    nn.MultiheadAttention reads its out_proj's weight itself, so an adapter there would never run.
    The routing record that moe_aux_loss reads restarts as each forward of `model` begins (a forward
    pre-hook), so `model` must be what is called, not a container such as nn.ModuleList; where its
    parts run alone (model.body(x)), clear_routing(model) before each such forward does it by hand."""
    inner = unwrapped(model)
    if type(inner).forward is nn.Module.forward:
        raise TypeError(f"a {type(inner).__name__} has no forward, so nothing would restart its routing record "
                        "each forward: give apply_lora_moe the model that is called")
    inner.requires_grad_(False)
    modules = dict(inner.named_modules())
    for name, experts in allocation.items():
        if experts > 0:
            if name not in modules:
                raise ValueError(f"{name!r} is not a module of the model")
            parent_name, _, child = name.rpartition(".")
            parent, base = modules[parent_name], modules[name]
            if not isinstance(base, nn.Linear) or isinstance(parent, nn.MultiheadAttention):
                raise TypeError(f"{name} is a {type(base).__name__}, not an nn.Linear that its parent calls")
            setattr(parent, child, LoRAMoELinear(base, experts, r, lora_alpha, top_k))
            if isinstance(parent, nn.TransformerEncoderLayer):  # its fused inference path reads linear1/2.weight itself;
                getattr(parent, child).register_forward_pre_hook(no_op)  # a submodule with a hook turns that path off
    for m in inner.modules():  # in eval, nn.TransformerEncoder turns a padded batch into nested tensors a layer cannot take
        if isinstance(m, nn.TransformerEncoder) and moe_layers(m):
            m.use_nested_tensor = False
    inner.register_forward_pre_hook(clear_routing)
    return model


def no_op(module, args):
    return None


def unwrapped(model):
    """The model inside torch.compile's and DDP's wrappers, whose names carry no "_orig_mod." or "module."."""
    while hasattr(model, "_orig_mod") or isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model._orig_mod if hasattr(model, "_orig_mod") else model.module
    return model

# -----------------------------------------------------------------------------
# The adapter's state: plain data for torch.save and torch.load(..., weights_only=True)


def adapter_state(model):
    """{"allocation": {name: experts}, "lora": {"r", "lora_alpha", "top_k"}, "adapter": {name: tensor}}:
    the LoRA and router weights with what it takes to rebuild them, and nothing of the base."""
    layers = moe_layers(unwrapped(model))
    if not layers:
        raise ValueError("the model has no LoRA-MoE layer: apply_lora_moe or load_adapter adds them")
    return {"allocation": {n: m.num_experts for n, m in layers},
            "lora": {"r": layers[0][1].r, "lora_alpha": layers[0][1].lora_alpha, "top_k": max(m.top_k for _, m in layers)},
            "adapter": {f"{n}.{key}": p.detach().clone() for n, m in layers for key, p in m.named_parameters()
                        if not key.startswith("base.")}}


def load_adapter(model, state):
    """Wrap `model`, a fresh copy of the base, in place as the state says, load its weights and return it.
    Another model shows as a module it lacks, a shape that differs or a tensor that does not fit, each a clear error."""
    inner = unwrapped(apply_lora_moe(model, state["allocation"], **state["lora"]))
    expected = set(adapter_state(inner)["adapter"])
    if set(state["adapter"]) != expected:
        raise ValueError(f"the adapter's tensors do not fit this model ({len(set(state['adapter']) ^ expected)} names differ)")
    inner.load_state_dict(state["adapter"], strict=False)  # a shape that differs raises, naming the tensor
    return model

# -----------------------------------------------------------------------------
# The tiny GPT of the toy, with separate q, k, v, o projections so that each can get its own experts


@dataclass
class GPTConfig:
    vocab_size: int = 32
    block_size: int = 16
    n_layer: int = 8
    n_head: int = 4
    n_embd: int = 64
    emb_std: float = 1.0  # embeddings at unit scale (PyTorch's default), so no single layer holds most of the sensitivity


class Attention(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(cfg.n_embd, cfg.n_embd, bias=False) for _ in range(4))

    def forward(self, x):
        b, L, C = x.shape
        q, k, v = (p(x).view(b, L, self.n_head, C // self.n_head).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, heads, L, C / heads)
        return self.o_proj(y.transpose(1, 2).reshape(b, L, C))        # (b, L, C)


class MLP(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.up_proj = nn.Linear(cfg.n_embd, 2 * cfg.n_embd, bias=False)  # 2x, not GPT-2's 4x: the toy's step is
        self.down_proj = nn.Linear(2 * cfg.n_embd, cfg.n_embd, bias=False)  # mostly these matmuls on a CPU

    def forward(self, x):
        return self.down_proj(F.gelu(self.up_proj(x)))


class Block(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)  # GPT-2's initialisation
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=cfg.emb_std)

    def forward(self, idx, targets=None):
        """Logits (b, L, V) and, with targets (-1 where no loss), the mean cross-entropy."""
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))  # (b, L, C)
        for block in self.layers:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))                          # (b, L, V)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss
