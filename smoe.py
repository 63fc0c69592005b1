"""
LoRA-SMoE in one file: a mixture of LoRA experts whose expert counts per weight
matrix are allocated from gradient sensitivity under a fixed budget.

Read top to bottom, smallest piece first:
  1. load_balancing_loss  the Switch-Transformer auxiliary loss, normalised per layer
                          (routing_counts: routing slots per expert, for reporting)
  2. LoRAMoELinear        a frozen nn.Linear plus E LoRA experts and a top-k router
                          (moe_layers, moe_aux_loss: a model's LoRA-MoE layers and their mean loss)
  3. GPT                  a tiny transformer with separate q, k, v, o projections
  4. candidate_names      pick the candidate nn.Linear modules of any model by name or pattern
                          (layer_name: the layer a matrix is in, for what works per layer)
  5. compute_sensitivity  S_t(W) = sum over sampled examples x of ||d l(x)/dW||_F^2 (per-example
                          Fisher; or the batch-gradient score), normalise_per_layer as an option
  6. allocate_experts     per-task votes that spend exactly `budget` experts
     allocate_uniform, allocate_mola, allocate_alpha, allocate_random: the peers' rules
  7. apply_lora_moe       swap the chosen nn.Linear modules for LoRAMoELinear
  8. adapter_state        the trained adapter on its own, with a fingerprint of its base matrices
                          (load_adapter checks the base and puts it back, set_adapter checks the weights)

Only GPT is specific to the toy: steps 4 to 8 take any nn.Module and a loss function.

Run `python train.py --budget 16` to watch every step, `pytest test_smoe.py` for the proof.

Shapes: B batch, T time, C channels, N = B*T tokens, E experts, k top-k, r rank.

References:
  [1] Xu, Diao. A Sensitivity-Driven Expert Allocation Method in LoRA-MoE for
      Efficient Fine-Tuning (LoRA-SMoE). arXiv 2505.06272, 2025.
  [2] Hu et al. LoRA: Low-Rank Adaptation of Large Language Models. arXiv 2106.09685.
  [3] Fedus, Zoph, Shazeer. Switch Transformers. arXiv 2101.03961.
  [4] Jiang et al. Mixtral of Experts. arXiv 2401.04088.
  [5] Gao et al. Higher Layers Need More LoRA Experts (MoLA). arXiv 2402.08562.
  [6] Qing et al. AlphaLoRA: Assigning LoRA Experts Based on Layer Training Quality. arXiv 2410.10054.
  [7] Goodfellow. Efficient Per-Example Gradient Computations. arXiv 1510.01799, 2015.
  [8] Li, Tramer, Liang, Hashimoto. Large Language Models Can Be Strong Differentially Private
      Learners. arXiv 2110.05679, 2021 (ghost clipping: per-example norms without per-example gradients).
"""

import fnmatch
import functools
import hashlib
import math
import random
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Routing statistics and the load-balancing loss


def routing_counts(top_idx, num_experts):
    """(E,) how many of the routing slots top_idx (N, k) chose each expert (for reporting; on CUDA
    bincount reads the largest index back to the host, so the training step does not call it)."""
    return torch.bincount(top_idx.flatten(), minlength=num_experts)


def load_balancing_loss(router_logits, top_k, top_idx=None, mask=None):
    """Switch Transformer [3] eq. (4), normalised so that uniform routing gives 1:

        f_i = (routing slots that chose expert i) / (N * k)
        P_i = mean over tokens of softmax(router_logits)_i
        L   = E * sum_i f_i * P_i

    router_logits: (N, E). top_idx: (N, k), the experts each token chose, if the caller
    has them already (saves a second top-k). mask: optional (N,) bool, the tokens to
    balance; the others count for neither f nor P (N is then the number of masked tokens,
    and no token masked gives 0). Uniform routing gives 1 for any E and k; every token on
    one expert (k = 1) gives E only if its router probability is all on that expert too
    (f = P = one-hot); in general it gives E * P_chosen. The gradient reaches the router
    through P only (f is a count). Hugging Face's Mixtral helper divides by N, not N*k,
    so its value is k times this one.
    Example by hand: E = 2, k = 1, two tokens both routed to expert 0 with
    P = (0.75, 0.25): f = (1, 0), L = 2 * (1 * 0.75 + 0 * 0.25) = 1.5.
    """
    N, E = router_logits.shape
    probs = F.softmax(router_logits.float(), dim=-1)                  # (N, E)
    if top_idx is None:
        top_idx = router_logits.topk(top_k, dim=-1).indices           # (N, k)
    w = torch.ones(N, device=probs.device) if mask is None else mask.reshape(N).to(probs)  # (N,) 1 = counted
    # the slots as an (N, E) 0/1 table rather than routing_counts: masked by a product, and no wait for
    # the device (a CUDA bincount or a boolean index reads a size back to the host)
    chosen = torch.zeros_like(probs).scatter_(-1, top_idx, 1.0)      # (N, E) 1 where a token chose expert i
    n = w.sum().clamp_min(1)                                          # tokens counted
    f = (w[:, None] * chosen).sum(0) / (n * top_k)                    # (E,) fraction of routing slots, no gradient
    P = (w[:, None] * probs).sum(0) / n                               # (E,) mean router probability
    return E * (f * P).sum()


# -----------------------------------------------------------------------------
# The LoRA-MoE linear layer


class LoRAMoELinear(nn.Module):
    """y = W0 x + sum_{i in TopK(x)} g_i(x) * scaling * B_i A_i x      ([1] eq. 1, [4])

    Gates: for k >= 2, g = softmax over the k chosen router logits (Mixtral [4]); for k = 1,
    g_i = p_i, the chosen expert's full-softmax probability (Switch Transformer [3]). The
    renormalised softmax over one logit is always exactly 1, so a top-1 router would get no
    gradient from the task loss and learn from the balancing loss alone (README.md, How it works).
    With E == 1 there is no router and the layer is plain LoRA [2].

    E experts of rank r stacked are one LoRA of rank E*r whose rank groups are gated per
    token, so the experts cost two matmuls: x -> (N, E*r) -> gate -> (N, out). No tensor op
    runs per expert or per token; the gates are put in place with one scatter (one gather at
    k = 1), and B_all is built by concatenating the E slices of lora_B (a Python loop over E
    views, one copy).

    The adapter (lora_A, lora_B, router) is kept in float32 when the base is float16 or
    bfloat16, as PEFT does: half-precision adapter weights lose small updates. The input is
    cast to the adapter's dtype and the sum comes back in the base output's dtype. Under
    autocast the matmuls run in autocast's dtype as usual.

    Each forward keeps router_logits (N, E) and top_idx (N, k) for the balancing loss and
    routing statistics (moe_aux_loss, routing_counts); both are None when E == 1.
    """

    def __init__(self, base: nn.Linear, num_experts: int, r: int = 8, lora_alpha: float = 16.0, top_k: int = 2):
        super().__init__()
        if num_experts < 1 or r < 1 or top_k < 1:
            raise ValueError(f"num_experts, r and top_k must be >= 1, got {num_experts}, {r}, {top_k}")
        self.base = base
        self.base.requires_grad_(False)  # the pretrained weight stays frozen
        self.in_features, self.out_features = base.in_features, base.out_features
        self.num_experts = num_experts
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / r
        self.top_k = min(top_k, num_experts)
        E, C, O = num_experts, self.in_features, self.out_features
        half = base.weight.dtype in (torch.float16, torch.bfloat16)
        # the adapter lives where its base does, in float32 on a half-precision base (PEFT's choice)
        like_base = {"device": base.weight.device, "dtype": torch.float32 if half else base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(E, r, C, **like_base))  # E stacked (r, in) down-projections
        self.lora_B = nn.Parameter(torch.empty(E, O, r, **like_base))  # E stacked (out, r) up-projections
        self.router = nn.Linear(C, E, bias=False, **like_base) if E > 1 else None
        self.reset_parameters()
        self.router_logits = None  # (N, E) router logits of the last forward (None when E == 1)
        self.top_idx = None  # (N, k) the experts each token chose in the last forward

    def reset_parameters(self):
        # PEFT's initialisation: A like an nn.Linear(in, r) weight, B = 0, so the layer starts equal to its base
        for i in range(self.num_experts):
            nn.init.kaiming_uniform_(self.lora_A.data[i], a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x):
        E, r, O = self.num_experts, self.r, self.out_features
        xs = x.reshape(-1, self.in_features)                          # (N, C)
        y = self.base(xs)                                             # (N, out) in the base's (or autocast's) dtype
        xs = xs.to(self.lora_A.dtype)                                 # (N, C) in the adapter's dtype
        h = xs @ self.lora_A.reshape(E * r, -1).t()                   # (N, E*r) every expert's A_i x at once
        if self.router is not None:
            logits = self.router(xs)                                  # (N, E)
            top_logits, top_idx = logits.topk(self.top_k, dim=-1)     # (N, k)
            if self.top_k == 1:  # Switch [3]: gate by the full-softmax probability p_i, so the router learns
                top_gates = F.softmax(logits, dim=-1).gather(-1, top_idx)  # (N, 1)
            else:  # softmax over the k chosen logits [4]
                top_gates = F.softmax(top_logits, dim=-1)             # (N, k) float32 under CUDA autocast
            # unchosen experts get gate 0
            gates = torch.zeros_like(logits, dtype=top_gates.dtype).scatter(-1, top_idx, top_gates)  # (N, E)
            h = (h.view(-1, E, r) * gates.unsqueeze(-1)).view(-1, E * r)  # (N, E*r) gate each rank group
            self.router_logits, self.top_idx = logits, top_idx
        # cat rather than permute + reshape: lora_B's gradient then comes back contiguous, as DDP's buckets expect
        B_all = torch.cat(list(self.lora_B), dim=1)                   # (out, E*r) = [B_1 | B_2 | ... | B_E]
        # base(x) + scaling * B(A(x)), with the B matmul adding into the base output: one GEMM and no
        # (N, out) temporaries for the scaled delta and the sum, forward or backward (bench/bench.py)
        y = torch.addmm(y.to(h.dtype), h, B_all.t(), alpha=self.scaling).to(y.dtype)  # (N, out)
        return y.view(*x.shape[:-1], O)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, r={self.r}, top_k={self.top_k}"


# -----------------------------------------------------------------------------
# The LoRA-MoE layers of a model


def moe_layers(model):
    """(name, layer) for every LoRAMoELinear in the model, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRAMoELinear)]


def moe_aux_loss(model, mask=None):
    """Mean over the layers that route (E >= 2) of load_balancing_loss on the last forward's tokens.

    mask: optional bool tensor, one entry per token of that forward (e.g. (B, T) for a (B, T)
    batch), True for the tokens the loss should balance. train.py passes the non-padding tokens
    (prompt and answer): every real token is routed and its adapter output feeds the answer
    through attention, while padding is not part of any example. Without a mask every token counts.
    Example: a batch of two sequences of 3 tokens, the second one padded after its first token:
    mask = [[1, 1, 1], [1, 0, 0]] balances the 4 real tokens of each layer's 6.
    """
    losses = []
    for name, m in moe_layers(model):
        if m.router_logits is None:
            continue
        if mask is not None and mask.numel() != m.router_logits.size(0):
            raise ValueError(f"mask has {mask.numel()} entries but {name} routed {m.router_logits.size(0)} tokens")
        losses.append(load_balancing_loss(m.router_logits, m.top_k, m.top_idx, mask))
    if not losses:
        return torch.zeros((), device=next(model.parameters()).device)
    return torch.stack(losses).mean()

# -----------------------------------------------------------------------------
# A tiny transformer (nanoGPT-sized) with separate q, k, v, o projections


@dataclass
class GPTConfig:
    vocab_size: int = 32   # set from data.VOCAB by train.py
    block_size: int = 16   # longest input sequence
    n_layer: int = 8       # 8 layers x (q, k, v, o) = 32 candidate matrices: budget 32 is plain LoRA's count
    n_head: int = 4
    n_embd: int = 64
    emb_std: float = 1.0   # token and position embeddings start at unit scale; GPT-2's 0.02 put 89-94 % of every
    # task's sensitivity in layer 0 (README, "The toy's base")


class Attention(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        # separate projections so that each one can receive its own number of experts
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v_proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)                   # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)                                          # (B, T, C)
        return self.o_proj(y)


class MLP(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.up_proj = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.down_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.up_proj(x)))


class Block(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)  # GPT-2's initialisation
        if isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=self.cfg.emb_std)  # 1.0: PyTorch's default for nn.Embedding

    def forward(self, idx, targets=None):
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)          # (B, T, C)
        for block in self.layers:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))                # (B, T, vocab)
        if targets is None:
            return logits, None
        # targets == -1 marks prompt and padding positions, left out of the loss
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

# -----------------------------------------------------------------------------
# Candidate matrices: the nn.Linear modules of any model, picked by name


def candidate_names(model, targets):
    """Qualified names of the nn.Linear modules that match any of `targets`, in module order.

    A target matches a module whose qualified name equals it or ends with "." + target
    (PEFT's rule for target_modules), and may use fnmatch wildcards: * (which also
    spans dots), ? and [...]. So for the tiny GPT "q_proj" matches every
    "layers.{i}.attn.q_proj", "layers.0.attn.*" the four projections of layer 0 and
    "layers.[01].mlp.up_proj" the first two up-projections; for PyTorch's
    nn.TransformerEncoder "linear1" matches "layers.{i}.linear1". A target that matches
    no nn.Linear is an error, so a typo never silently picks nothing. (Matching is not
    wrapping: apply_lora_moe refuses modules whose parent never calls them.)
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ValueError("no targets given; name the nn.Linear modules to adapt, e.g. ['q_proj', 'v_proj']")
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    matches = {t: {n for n in linears if fnmatch.fnmatchcase(n, t) or fnmatch.fnmatchcase(n, "*." + t)} for t in targets}
    unmatched = [t for t, names in matches.items() if not names]
    if unmatched:
        raise ValueError(f"target(s) {', '.join(unmatched)} match no nn.Linear module; this model's nn.Linear modules "
                         f"are {', '.join(linears[:6])}{', ...' if len(linears) > 6 else ''}")
    return [n for n in linears if any(n in names for names in matches.values())]


def layer_name(name):
    """The layer a module belongs to: its name up to and including the last all-digit part.
    "layers.3.attn.q_proj" -> "layers.3"; in a stack nested in a container, "0.layers.1.linear2"
    -> "0.layers.1"; "encoder.layers.1.linear1" and "decoder.layers.1.linear1" are two layers.
    (A block whose sub-layers are numbered too, like T5's "block.3.layer.0", counts each sub-layer.)"""
    parts = name.split(".")
    last = max((i for i, part in enumerate(parts) if part.isdigit()), default=None)
    if last is None:
        raise ValueError(f"cannot tell which layer {name!r} is in: its name has no numeric part")
    return ".".join(parts[:last + 1])


def layers_in_order(module_names):
    """{layer: [module names]} with the layers in the order their first module comes (module order)."""
    layers = {}
    for m in module_names:
        layers.setdefault(layer_name(m), []).append(m)
    return layers

# -----------------------------------------------------------------------------
# Sensitivity: S_t(W_m) = sum over sampled examples x of task t of ||d l(x)/dW_m||_F^2   ([1] sec. 3.1)


def per_example_sq_norms(g, x, gram=None):
    """(B,) ||G_b||_F^2 of each example's weight gradient G_b = sum over its tokens t of g_bt x_bt^T,
    from g (B, T, out), the loss's gradient at the output, and x (B, T, in), the input, of y = x W^T.

    Two ways, equal up to rounding:
      outer: form G (B, out, in) by one einsum and square it: B*T*out*in multiply-adds, B*out*in floats.
      Gram:  ||G_b||^2 = sum over t, t' of (g_bt . g_bt') (x_bt . x_bt'), two (B, T, T) Gram matrices
             (Goodfellow 2015 [7]; the "ghost norm" of [8]): B*T*T*(out + in) multiply-adds.
    gram=None picks the cheaper by that count: the Gram way when T * (out + in) < out * in, i.e. for
    texts shorter than out * in / (out + in) tokens (144 for a 576 x 192 matrix, 288 for 576 x 576).
    Example by hand, one example, two tokens: g = [[1, 0], [0, 1]], x = [[1, 2], [3, 4]] gives
    G = [[1, 2], [3, 4]] and 1 + 4 + 9 + 16 = 30; the Gram way: g g^T = I, so 1*(x1.x1) + 1*(x2.x2) = 5 + 25.
    """
    T, out, inp = g.shape[1], g.shape[2], x.shape[2]
    if gram is None:
        gram = T * (out + inp) < out * inp
    if gram:
        return ((g @ g.transpose(1, 2)) * (x @ x.transpose(1, 2))).sum(dim=(1, 2))   # (B, T, T) * (B, T, T) -> (B,)
    return torch.einsum("bto,bti->boi", g, x).pow(2).sum(dim=(1, 2))                  # (B, out, in) -> (B,)


def compute_sensitivity(model, task_batches, loss_fn, module_names, estimator="fisher", reduction="sum"):
    """Per-task sensitivity of each candidate base weight (an nn.Linear's weight W, y = x W^T + b).

    task_batches: {task: [batch, ...]}, a few sampled batches per task.
    loss_fn(model, batch) -> (B,) the loss of each example of the batch, e.g. each line's mean
      cross-entropy over its answer tokens. ("batch" also takes a scalar batch loss.)
    module_names: qualified names of the candidate nn.Linear modules.
    estimator:
      "fisher" (default; the paper's quantity, which the released code sums at batch size 1):
          S = sum over examples x of ||d l(x)/dW||_F^2, the trace of the diagonal empirical Fisher.
      "batch": S = sum over batches b of ||d L(b)/dW||_F^2 with L(b) the mean of the batch's
          per-example losses (or loss_fn's scalar, if it returns one). Since
          ||mean_x g(x)||^2 ~ ||E g||^2 + tr Cov(g) / |b|, it rewards gradients that agree across
          examples: a different quantity, which can rank matrices differently.
    reduction: "sum" (the paper's score) or "mean" (divided by the weight's number of entries, so
      that matrices of different shapes compete fairly).
    Returns {task: {module_name: score}}, from unclipped gradients squared in float32 (the released
    code squares fp16 gradients after clipping each layer's gradient to norm 1). The backward pass
    itself runs in the model's dtype: on a bf16 model the gradients at each output are bf16.

    How it costs about one LoRA fine-tuning step per batch: the batch's examples do not interact in
    the forward pass (true of transformers; not of batch norm), so the gradient of sum_x l(x) at a
    candidate's output y, restricted to example x's tokens, is d l(x)/dy, and x's weight gradient is
    G_x = sum over its tokens of (dl/dy)^T x_in. per_example_sq_norms turns that into ||G_x||^2
    without forming G_x. A forward hook keeps each candidate's input (detached: nothing outside the
    one backward pass builds a graph) and adds a zero scalar that requires grad to its output: the
    backward pass then reaches every candidate's output without computing any weight gradient (the
    weights stay frozen, as in LoRA), and a hook on that output folds its gradient into the score
    as the backward pass reaches it, so each gradient is freed at once. A matrix called more than
    once keeps its calls until the backward pass ends and sums their tokens together (its
    gradients add before squaring). One backward pass per example gives the same numbers with B
    times the passes (test_smoe.py checks that they agree).
    A candidate the loss never uses scores 0, with a warning naming it. Nothing is updated, and
    the model's weights, requires_grad flags, .grad fields and train/eval mode are left as found.
    A score that is not finite (NaN or inf) raises ValueError naming the task and matrix.

    Example by hand, one matrix and one batch of two examples with per-example gradients
    G_1 = [[1, -2], [0, 2]] and G_2 = [[1, 0], [0, 0]]: "fisher" gives (1 + 4 + 0 + 4) + 1 = 10;
    "batch" squares their mean [[1, -1], [0, 1]] and gives 1 + 1 + 0 + 1 = 3.
    """
    if estimator not in ("fisher", "batch"):
        raise ValueError(f"estimator must be 'fisher' or 'batch', got {estimator!r}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    modules = {name: model.get_submodule(name) for name in module_names}
    not_linear = [name for name, m in modules.items() if not isinstance(m, nn.Linear)]
    if not_linear:
        raise ValueError(f"{not_linear[0]} is a {type(modules[not_linear[0]]).__name__}; sensitivity is measured on nn.Linear weights")
    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    saved_grads = [p.grad for p in params]
    was_training = model.training
    model.eval()
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    probes = {}  # one zero scalar per device that requires grad: y + probe joins the graph, no weight needs a gradient
    inputs = {name: [] for name in modules}   # (input, its version) of each call in this forward pass; input (B, ..., in), detached
    joined = {name: [] for name in modules}   # (x, g) of each call of a matrix called more than once
    acc, step = {}, {}                        # acc: this task's scores; step: the batch's size and estimator's view

    def flat(t):  # (B, ..., C) -> (B, T, C) float32 for "fisher"; the whole batch as one example for "batch"
        return t.float().reshape(step["B"], -1, t.shape[-1])

    def fold(name, x, g):  # add this matrix's per-example squared gradient norms to its score
        with torch.no_grad():  # nothing here may join a graph: it would keep (B, ...) tensors alive
            acc[name] += per_example_sq_norms(flat(g), flat(x)).sum()

    def on_output(name, i, g):  # runs as the backward pass reaches call i's output; g: (B, ..., out)
        (x, version), inputs[name][i] = inputs[name][i], None  # the input is freed with the gradient
        if x._version != version:  # detached, it shares its storage: an in-place change would go unseen
            raise ValueError(f"the input of {name} was changed in place after the call; the sensitivity needs it as it was")
        if estimator == "fisher" and (x.dim() < 2 or x.shape[0] != step["B"]):
            raise ValueError(f"{name} sees inputs of shape {tuple(x.shape)}, not (B, ..., in) with the "
                             f"batch's {step['B']} examples first; per-example gradients need the batch dimension first")
        unused.discard(name)
        if len(inputs[name]) == 1:
            fold(name, x, g)
        else:
            joined[name].append((x, g))

    def on_forward(module, inp, out, name):
        if not torch.is_grad_enabled():  # a call under no_grad cannot reach the loss's gradient
            return out
        x = inp[0].detach()
        inputs[name].append((x, x._version))
        if out.device not in probes:
            probes[out.device] = torch.zeros((), device=out.device, requires_grad=True)
        out = out + probes[out.device]
        out.register_hook(functools.partial(on_output, name, len(inputs[name]) - 1))
        return out

    hooks = [m.register_forward_hook(functools.partial(on_forward, name=name)) for name, m in modules.items()]
    scores, unused = {}, set(modules)
    try:
        for task, batches in task_batches.items():
            acc.update({name: torch.zeros((), dtype=torch.float32, device=m.weight.device) for name, m in modules.items()})
            for batch in batches:
                for name in modules:
                    inputs[name].clear()
                    joined[name].clear()
                losses = loss_fn(model, batch).float()                        # (B,) or () for "batch"
                if losses.dim() != 1 and not (estimator == "batch" and losses.dim() == 0):
                    raise ValueError(f"loss_fn must return one loss per example, shape (B,), got shape {tuple(losses.shape)}"
                                     + (" (a scalar batch loss works only with estimator='batch')" if losses.dim() == 0 else ""))
                total = losses.sum() if estimator == "fisher" else losses.mean()
                step["B"] = losses.shape[0] if estimator == "fisher" else 1
                if total.requires_grad:  # False when no candidate reaches the loss
                    torch.autograd.grad(total, list(probes.values()), allow_unused=True)  # the one backward pass; the hooks fold
                for name, pairs in joined.items():  # a matrix called more than once: one token sum over its calls
                    if pairs:
                        fold(name, torch.cat([flat(x) for x, _ in pairs], 1), torch.cat([flat(g) for _, g in pairs], 1))
            scores[task] = {name: (acc[name] / (m.weight.numel() if reduction == "mean" else 1)).item()
                            for name, m in modules.items()}
            bad = [name for name, s in scores[task].items() if not math.isfinite(s)]
            if bad:  # a NaN or inf would be sorted arbitrarily by the allocation: refuse instead
                raise ValueError(f"sensitivity of {bad[0]} to task {task!r} is {scores[task][bad[0]]} ({len(bad)} of "
                                 f"{len(modules)} matrices not finite): the loss or its gradient overflowed, so no "
                                 f"allocation can be made from these scores")
    finally:
        for h in hooks:
            h.remove()
        for p, flag, grad in zip(params, saved_flags, saved_grads):
            p.requires_grad_(flag)
            p.grad = grad
        model.train(was_training)
    if unused and task_batches:
        warnings.warn(f"{len(unused)} candidate matrices never reach the loss and score 0: {', '.join(sorted(unused)[:4])}"
                      f"{', ...' if len(unused) > 4 else ''}", stacklevel=2)
    return scores


def normalise_per_layer(sensitivity):
    """Each task's scores as shares of that task's total within the same layer (layer_name), so
    every layer's candidates sum to 1 per task. This is roughly what the released code does without
    saying so: it clips each layer's gradient to norm 1 before reading the score (README.md),
    so a layer's matrices compete only with each other, and depth no longer decides the votes.
    Example: {"t": {"layers.0.q": 6, "layers.0.k": 2, "layers.1.q": 1, "layers.1.k": 3}}
    -> {"t": {"layers.0.q": 0.75, "layers.0.k": 0.25, "layers.1.q": 0.25, "layers.1.k": 0.75}}."""
    shares = {}
    for task, scores in sensitivity.items():
        shares[task] = {}
        for names in layers_in_order(scores).values():
            total = sum(scores[m] for m in names)
            for m in names:
                shares[task][m] = scores[m] / total if total > 0 else 0.0
    return shares

# -----------------------------------------------------------------------------
# Budgeted allocation by per-task votes   ([1] sec. 3.2, with an exact budget)


def allocate_experts(sensitivity, budget):
    """Spend exactly `budget` experts by per-task votes.

    sensitivity: {task: {module_name: score}}, every task scoring the same modules.
    Task t casts q_t votes, one each for its q_t most sensitive modules, with
    q_t = budget // T, plus one more for the first budget % T tasks in sorted name
    order. A module's expert count is the number of votes it got, so 0 <= n <= T
    and the counts sum to the budget. Ties go to the module that comes first in the
    model. Valid budgets: 1 <= budget <= T * M.
    Returns {module_name: count} for every module, zeros included, in module order.

    Example: scores {"a": {"q": 3, "k": 1, "v": 2}, "b": {"q": 1, "k": 5, "v": 4}},
    budget 3: task a gets 2 votes (3 // 2 + 1), task b gets 1. Task a votes for q and
    v, task b for k, so the result is {"q": 1, "k": 1, "v": 1}. With budget 4 both
    tasks vote twice: a for q and v, b for k and v: {"q": 1, "k": 1, "v": 2}.
    """
    tasks = sorted(sensitivity)
    if not tasks:
        raise ValueError("sensitivity has no tasks")
    modules = list(sensitivity[tasks[0]])
    for t in tasks:
        if set(sensitivity[t]) != set(modules):
            raise ValueError(f"task {t!r} scores different modules than task {tasks[0]!r}")
    T, M = len(tasks), len(modules)
    if not isinstance(budget, int) or not 1 <= budget <= T * M:
        raise ValueError(f"budget must be an integer from 1 to {T * M} (tasks x candidate matrices = {T} x {M}), got {budget}")
    order = {m: i for i, m in enumerate(modules)}
    counts = {m: 0 for m in modules}
    for i, t in enumerate(tasks):
        votes = budget // T + (1 if i < budget % T else 0)
        ranked = sorted(modules, key=lambda m: (-sensitivity[t][m], order[m]))  # most sensitive first
        for m in ranked[:votes]:
            counts[m] += 1
    return counts

# -----------------------------------------------------------------------------
# Baseline allocations (the peers), each spending the same budget


def allocate_uniform(module_names, budget):
    """The same count on every module: budget / M each. budget == M is plain LoRA.
    Example: 8 modules, budget 16 -> 2 experts each; budget 12 is an error (valid: 8, 16)."""
    M = len(module_names)
    if budget < 1 or budget % M:
        lower, upper = max(M, budget // M * M), (budget // M + 1) * M
        nearest = f"{lower} or {upper}" if lower != upper else f"{upper}"
        raise ValueError(f"uniform allocation needs a budget that is a multiple of the {M} candidate matrices, "
                         f"got {budget}; nearest valid budgets: {nearest}")
    return {m: budget // M for m in module_names}


def apportion(weights, budget):
    """Split `budget` into whole counts proportional to `weights` ({name: weight > 0}), summing exactly
    to the budget (largest remainder method). Leftover units go to the largest remainders; ties to
    the larger weight, then to the later name, so deeper layers win ties.
    Example: weights {"a": 1, "b": 2, "c": 3}, budget 4: quotas 0.67, 1.33, 2.0 -> floors 0, 1, 2,
    one unit left for the largest remainder (a, 0.67): {"a": 1, "b": 1, "c": 2}."""
    names = list(weights)
    total = sum(weights.values())
    quotas = {m: budget * weights[m] / total for m in names}
    counts = {m: math.floor(quotas[m]) for m in names}
    order = sorted(range(len(names)), key=lambda i: (-(quotas[names[i]] - counts[names[i]]), -weights[names[i]], -i))
    for i in order[:budget - sum(counts.values())]:
        counts[names[i]] += 1
    return counts


def allocate_mola(module_names, budget):
    """MoLA [5]: "higher layers need more LoRA experts". MoLA's 2, 4, 6, 8 experts for the four
    quarters of the layers, every matrix in a layer sharing its layer's count, scaled to the budget:
    each module gets weight 2 * (quarter + 1), and `apportion` spends the budget exactly, so the
    counts never decrease with depth. Example: 4 layers x (q, k, v, o), budget 16: quotas per matrix
    0.4, 0.8, 1.2, 1.6 by layer, floors 0, 0, 1, 1 (8 experts), the 8 left go to the largest
    remainders (layer 1's 0.8, layer 3's 0.6): 0, 1, 1, 2 experts per matrix by layer."""
    layers = list(layers_in_order(module_names))  # by depth: module order
    quarter = {layer: 4 * i // len(layers) for i, layer in enumerate(layers)}  # 0..3, by depth
    return apportion({m: 2 * (quarter[layer_name(m)] + 1) for m in module_names}, budget)


def powerlaw_alpha(weight):
    """Heavy-tail exponent of a weight matrix's eigenvalue spectrum (AlphaLoRA [6], after
    Martin & Mahoney's heavy-tailed self-regularisation and Clauset et al.'s power-law fit).

    lambda = sigma(W)^2 sorted ascending. For each candidate x_min = lambda_i (all but the largest)
    the Hill estimator gives alpha_i = 1 + n / sum_{j >= i} ln(lambda_j / lambda_i), n = tail size,
    and the Kolmogorov-Smirnov distance D_i = max_j |F_fit(lambda_j) - j / n| compares the fitted
    power-law CDF F_fit(x) = 1 - (x / x_min)^(1 - alpha_i) with the tail's empirical CDF.
    Returns the alpha_i with the smallest D_i. A smaller alpha means a heavier tail: a better-trained matrix.

    A spectrum with no tail to fit gives NaN (undefined), never a number made of rounding noise:
    a zero matrix, or one whose eigenvalues all agree to within the rounding of the weight's dtype,
    tol = 4 sqrt(n) eps (an orthogonal matrix: float32 rounding alone would give alpha ~ 1e6;
    4 sqrt(n) eps bounds the spread measured on orthogonal matrices stored in float32, bfloat16 and
    float16). Candidate tails whose largest / smallest eigenvalue is 1 + tol or less are skipped.
    """
    eigs = torch.linalg.svdvals(weight.detach().double()).pow(2).sort().values  # (n_eigs,) ascending
    if len(eigs) == 0 or eigs[-1] == 0:
        return math.nan  # zero matrix: no spectrum at all
    eigs = eigs[eigs > eigs[-1] * 1e-12]  # drop numerically zero eigenvalues
    flat = 4 * math.sqrt(min(weight.shape)) * torch.finfo(weight.dtype).eps  # relative spread of rounding noise
    best_D, best_alpha = math.inf, math.nan
    for i in range(len(eigs) - 1):
        tail = eigs[i:]                                              # (n,)
        n = len(tail)
        if tail[-1] <= tail[0] * (1 + flat):
            break  # the rest of the spectrum is flat to rounding: no power law to fit
        log_sum = torch.log(tail / eigs[i]).sum()
        alpha = 1 + n / log_sum
        fit_cdf = 1 - (tail / eigs[i]).pow(1 - alpha)                # (n,)
        D = (fit_cdf - torch.arange(n, dtype=tail.dtype) / n).abs().max().item()
        if D < best_D:
            best_D, best_alpha = D, alpha.item()
    return best_alpha


def allocate_alpha(model, module_names, budget, beta=2.5):
    """AlphaLoRA [6], training-free: a layer's score is the mean powerlaw_alpha of its candidate
    matrices; each matrix gets weight alpha_layer ** beta (beta = 2.5, the paper's default), and
    `apportion` spends the budget exactly. A larger alpha (a less well-trained layer) gets more experts.
    Layers are grouped by layer_name. A matrix whose alpha is undefined (NaN: zero or flat spectrum)
    is left out of its layer's mean, with a warning; a layer with no defined alpha gets the mean of
    the other layers' alphas, so it is neither favoured nor starved. No defined alpha at all is a ValueError.
    Returns (allocation, {layer: alpha}).
    Example: layers.0 with alphas 2 and 4 scores 3, layers.1 with 5 and NaN scores 5, so every matrix of
    layers.0 weighs 3 ** 2.5 = 15.6 and every matrix of layers.1 weighs 5 ** 2.5 = 55.9."""
    alphas = {m: powerlaw_alpha(model.get_submodule(m).weight) for m in module_names}
    undefined = [m for m in module_names if math.isnan(alphas[m])]
    if len(undefined) == len(module_names):
        raise ValueError(f"no candidate matrix has a power-law spectrum to fit ({', '.join(undefined[:3])}"
                         f"{', ...' if len(undefined) > 3 else ''} are zero or have all singular values equal); "
                         "AlphaLoRA cannot rank them")
    if undefined:
        warnings.warn(f"{', '.join(undefined)}: zero or flat spectrum, no power-law alpha; left out of "
                      "their layers' mean alpha", stacklevel=2)
    layer_alpha = {}
    for layer, names in layers_in_order(module_names).items():
        defined = [alphas[m] for m in names if not math.isnan(alphas[m])]
        layer_alpha[layer] = sum(defined) / len(defined) if defined else math.nan
    known = [a for a in layer_alpha.values() if not math.isnan(a)]
    layer_alpha = {layer: sum(known) / len(known) if math.isnan(a) else a for layer, a in layer_alpha.items()}
    return apportion({m: layer_alpha[layer_name(m)] ** beta for m in module_names}, budget), layer_alpha


def allocate_random(allocation, seed):
    """A control: the same counts as `allocation`, shuffled across its modules with random.Random(seed).
    Is the sensitivity signal better than chance?"""
    counts = list(allocation.values())
    random.Random(seed).shuffle(counts)
    return dict(zip(allocation, counts))

# -----------------------------------------------------------------------------
# Applying an allocation to a model


def apply_lora_moe(model, allocation, r=8, lora_alpha=16.0, top_k=2):
    """Replace each nn.Linear named in `allocation` with count >= 1 by a LoRAMoELinear
    with that many experts; freeze every other parameter. Modifies and returns `model`.
    A module with count 0 gets no adapter at all and stays frozen.

    The wrapper works only where the parent calls the module, `self.proj(x)`. PyTorch's
    nn.MultiheadAttention does not: it hands out_proj.weight to F.multi_head_attention_forward
    (and keeps q, k, v in one in_proj_weight, not in nn.Linear modules), so an adapter on
    its out_proj would never run; that is refused. nn.TransformerEncoderLayer calls
    linear1 and linear2 in training, but its inference fast path (eval mode, no
    gradients) reads their weights directly and fails on a wrapped layer; that gives a
    warning saying how to turn the fast path off.
    """
    for name, n in allocation.items():
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"expert count for {name!r} must be a whole number >= 0, got {n!r}")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"allocation names {name!r}, which is not a module of this model") from None
        if not isinstance(module, nn.Linear) or not name:
            raise ValueError(f"allocation names {name!r}, a {type(module).__name__}; "
                             "only nn.Linear modules inside the model can take experts")
        if n >= 1 and isinstance(model.get_submodule(name.rpartition(".")[0]), nn.MultiheadAttention):
            raise ValueError(f"allocation names {name!r}, the out_proj of an nn.MultiheadAttention, which reads "
                             "out_proj.weight directly instead of calling it, so an adapter there would never run; "
                             "pick nn.Linear modules the model calls (e.g. linear1, linear2 of nn.TransformerEncoderLayer)")
    model.requires_grad_(False)
    fast_path = []  # wrapped modules that nn.TransformerEncoderLayer's inference fast path would read directly
    for name, n in allocation.items():
        if n >= 1:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, LoRAMoELinear(getattr(parent, child), n, r=r, lora_alpha=lora_alpha, top_k=top_k))
            if isinstance(parent, nn.TransformerEncoderLayer):
                fast_path.append(name)
    if fast_path and torch.backends.mha.get_fastpath_enabled():
        warnings.warn(f"{', '.join(fast_path)} sit in nn.TransformerEncoderLayer, whose inference fast path (eval mode, "
                      "no gradients) reads their weights directly and fails on adapted layers; call "
                      "torch.backends.mha.set_fastpath_enabled(False) before evaluating", stacklevel=2)
    return model


def adapter_state_dict(model):
    """The trainable adapter tensors (LoRA A and B, routers) of every LoRAMoELinear, keyed by
    their names in the model, e.g. "layers.0.attn.v_proj.lora_A", "layers.0.attn.v_proj.router.weight"."""
    return {f"{name}.{key}": p.detach().clone() for name, m in moe_layers(model)
            for key, p in m.named_parameters() if not key.startswith("base.")}


def base_fingerprint(model, module_names):
    """{module name: sha256 of its frozen weight and bias bytes} for the named nn.Linear modules (or
    the base inside their LoRAMoELinear): ties a saved adapter to the exact base it was trained on.
    The bytes are hashed as stored, so the same weights in another dtype give another fingerprint."""
    prints = {}
    for name in module_names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{name!r} is not a module of this model") from None
        module = module.base if isinstance(module, LoRAMoELinear) else module
        h = hashlib.sha256()
        for t in (module.weight, module.bias):
            if t is not None:
                h.update(str((t.dtype, tuple(t.shape))).encode())
                h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        prints[name] = h.hexdigest()
    return prints


def adapter_state(model):
    """Everything needed to rebuild a trained adapter on a fresh copy of its base model,
    and nothing of the base model itself, as plain data that torch.save and
    torch.load(..., weights_only=True) handle:

        {"allocation": {module name: experts}  (zero counts left out, as allocation.json),
         "lora": {"r": r, "lora_alpha": alpha, "top_k": k},
         "adapter": adapter_state_dict(model)  (keys follow the wrapped module names),
         "base": base_fingerprint(model, allocated names)  (sha256 of each adapted base matrix)}

    top_k is the largest k any layer uses: each layer keeps min(top_k, E), and
    rebuilding with that value gives every layer the same k again.
    """
    layers = [m for _, m in moe_layers(model)]
    if not layers:
        raise ValueError("the model has no LoRA-MoE layers; wrap it with apply_lora_moe first")
    if len({(m.r, m.lora_alpha) for m in layers}) > 1:
        raise ValueError("the LoRA-MoE layers differ in r or lora_alpha; adapter_state keeps one setting for all")
    return {"allocation": {name: m.num_experts for name, m in moe_layers(model)},
            "lora": {"r": layers[0].r, "lora_alpha": layers[0].lora_alpha, "top_k": max(m.top_k for m in layers)},
            "adapter": adapter_state_dict(model),
            "base": base_fingerprint(model, [name for name, _ in moe_layers(model)])}


def set_adapter(model, tensors):
    """Copy saved LoRA and router tensors ({name: tensor}, as adapter_state_dict gives them) into a
    model already wrapped by apply_lora_moe. Every adapter parameter must be given, with its shape
    and finite values, and nothing else: all is checked before anything is copied, so a mismatch
    raises ValueError and never loads part of the tensors."""
    expected = {name: p.shape for name, p in adapter_state_dict(model).items()}
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise ValueError("the adapter weights are not a {name: tensor} mapping")
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"the adapter weights do not match the model: {len(missing)} missing {missing[:2]}, "
                         f"{len(unexpected)} unexpected {unexpected[:2]}")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise ValueError(f"adapter weight {name} has shape {tuple(tensors[name].shape)}, the model's is "
                             f"{tuple(shape)}; was the adapter trained on another base model?")
        if not torch.isfinite(tensors[name]).all():
            raise ValueError(f"adapter weight {name} holds values that are not finite")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in expected:
            params[name].copy_(tensors[name])


def load_adapter(model, state, check_base=True):
    """Rebuild an adapter saved with adapter_state on `model`, a fresh copy of the base model
    it was trained on: wrap the allocated modules with the saved settings (apply_lora_moe),
    then copy the saved LoRA and router weights in (set_adapter). Modifies and returns `model`.
    First the base weights of the allocated modules are checked against the state's "base"
    fingerprint: another base of the same shape (or the same weights in another dtype) raises
    ValueError naming the first matrix that differs, before anything is changed. check_base=False
    skips the check (for a base you know to be the same, e.g. re-quantised on purpose)."""
    if check_base:
        if "base" not in state:
            raise ValueError("the adapter state records no base fingerprint (saved by an older version); "
                             "pass check_base=False to load it without checking the base")
        found = base_fingerprint(model, list(state["allocation"]))
        differ = [name for name in state["allocation"] if state["base"].get(name) != found[name]]
        if differ:
            raise ValueError(f"the base weights of {differ[0]} ({len(differ)} of {len(found)} adapted matrices) differ "
                             "from those the adapter was trained on: this is another base model; load the adapter "
                             "onto its own base (or pass check_base=False if the difference is intended)")
    model = apply_lora_moe(model, state["allocation"], **state["lora"])
    set_adapter(model, state["adapter"])
    return model
