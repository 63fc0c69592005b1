"""
The peers' allocation rules, the baselines LoRA-SMoE is compared with at the same budget. Each maps
candidate matrices to expert counts, {module name: experts}, like smoe.allocate_experts, so that
its result can be written as an allocation file and passed to train.py --allocation.

  apportion        whole counts proportional to weights, spending the budget exactly
  allocate_mola    MoLA [1]: counts fixed per layer, rising with depth
  powerlaw_alpha   the heavy-tail exponent of a weight matrix's spectrum; allocate_alpha: AlphaLoRA [2]
  allocate_random  the sensitivity allocation's counts shuffled across matrices (a control)

A matrix's layer is smoe.layer_name's: its name up to the last all-digit part, so an encoder's and
a decoder's "layers.1" are two layers, taken in the order their first matrix comes.

References:
  [1] Gao et al. Higher Layers Need More LoRA Experts (MoLA). arXiv 2402.08562.
  [2] Qing et al. AlphaLoRA: Assigning LoRA Experts Based on Layer Training Quality. arXiv 2410.10054.
"""

import math
import random
import warnings

import torch

from smoe import layer_name


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


def allocate_mola(names, budget):
    """MoLA [1]: "higher layers need more LoRA experts". MoLA's 2, 4, 6, 8 experts for the four
    quarters of the layers, every matrix in a layer sharing its layer's count, scaled to the budget:
    each matrix gets weight 2 * (quarter + 1), and `apportion` spends the budget exactly, so the
    counts never decrease with depth. Example: 4 layers x (q, k, v, o), budget 16: quotas per matrix
    0.4, 0.8, 1.2, 1.6 by layer, floors 0, 0, 1, 1 (8 experts), the 8 left go to the largest
    remainders (layer 1's 0.8, layer 3's 0.6): 0, 1, 1, 2 experts per matrix by layer."""
    layers = list(dict.fromkeys(layer_name(m) for m in names))  # by depth: module order
    quarter = {layer: 4 * i // len(layers) for i, layer in enumerate(layers)}  # 0..3
    return apportion({m: 2 * (quarter[layer_name(m)] + 1) for m in names}, budget)


def powerlaw_alpha(weight):
    """Heavy-tail exponent of a weight matrix's eigenvalue spectrum (AlphaLoRA [2], after
    Martin & Mahoney's heavy-tailed self-regularisation and Clauset et al.'s power-law fit).

    lambda = sigma(W)^2 sorted ascending. For each candidate x_min = lambda_i (all but the largest)
    the Hill estimator gives alpha_i = 1 + n / sum_{j >= i} ln(lambda_j / lambda_i), n = tail size,
    and the Kolmogorov-Smirnov distance D_i = max_j |F_fit(lambda_j) - j / n| compares the fitted
    power-law CDF F_fit(x) = 1 - (x / x_min)^(1 - alpha_i) with the tail's empirical CDF.
    Returns the alpha_i with the smallest D_i. A smaller alpha means a heavier tail: a better-trained matrix.

    A spectrum with no tail to fit gives NaN: a zero matrix, or one whose eigenvalues all agree to
    within the rounding of the weight's dtype, tol = 4 sqrt(n) eps (an orthogonal matrix, where
    float32 rounding alone would give alpha ~ 1e6). Tails whose largest / smallest eigenvalue is
    1 + tol or less are skipped.
    """
    eigs = torch.linalg.svdvals(weight.detach().double()).pow(2).sort().values  # (n,) ascending
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
        alpha = 1 + n / torch.log(tail / eigs[i]).sum()
        fit_cdf = 1 - (tail / eigs[i]).pow(1 - alpha)                # (n,)
        D = (fit_cdf - torch.arange(n, dtype=tail.dtype) / n).abs().max().item()
        if D < best_D:
            best_D, best_alpha = D, alpha.item()
    return best_alpha


def allocate_alpha(model, names, budget, beta=2.5):
    """AlphaLoRA [2], training-free: a layer's score is the mean powerlaw_alpha of its candidate
    matrices; each matrix gets weight alpha_layer ** beta (beta = 2.5, the paper's default), and
    `apportion` spends the budget exactly. A larger alpha (a less well-trained layer) gets more experts.
    A matrix whose alpha is undefined (NaN: zero or flat spectrum) is left out of its layer's mean,
    with a warning; a layer with no defined alpha gets the mean of the other layers', so it is neither
    favoured nor starved. Returns (allocation, {layer: alpha}).
    Example: layers.0 with alphas 2 and 4 scores 3, layers.1 with 5 and NaN scores 5, so every matrix of
    layers.0 weighs 3 ** 2.5 = 15.6 and every matrix of layers.1 weighs 5 ** 2.5 = 55.9."""
    alphas = {m: powerlaw_alpha(model.get_submodule(m).weight) for m in names}
    undefined = [m for m in names if math.isnan(alphas[m])]
    if len(undefined) == len(names):
        raise ValueError("no candidate matrix has a power-law spectrum to fit (all are zero or have equal "
                         "singular values): AlphaLoRA cannot rank them")
    if undefined:
        warnings.warn(f"{', '.join(undefined)}: zero or flat spectrum, no power-law alpha; left out of "
                      "their layers' mean alpha", stacklevel=2)
    layer_alpha = {}
    for layer in dict.fromkeys(layer_name(m) for m in names):
        defined = [alphas[m] for m in names if layer_name(m) == layer and not math.isnan(alphas[m])]
        layer_alpha[layer] = sum(defined) / len(defined) if defined else math.nan
    known = [a for a in layer_alpha.values() if not math.isnan(a)]
    layer_alpha = {layer: sum(known) / len(known) if math.isnan(a) else a for layer, a in layer_alpha.items()}
    return apportion({m: layer_alpha[layer_name(m)] ** beta for m in names}, budget), layer_alpha


def allocate_random(allocation, seed):
    """A control: the same counts as `allocation`, shuffled across its modules with random.Random(seed).
    Is the sensitivity signal better than chance? `allocation` names every candidate, zeros included,
    so that a count can move to a matrix the sensitivity left out.
    Example: {"q": 2, "k": 0, "v": 1} with seed 0 gives {"q": 2, "k": 1, "v": 0}, with seed 1 {"q": 0, "k": 1, "v": 2}."""
    counts = list(allocation.values())
    random.Random(seed).shuffle(counts)
    return dict(zip(allocation, counts))
