"""
Where the toy's base model puts each task's sensitivity, layer by layer, and how far pretraining moved
each layer's weights from their initialisation: the two measurements the toy's base is judged by
(README, "The toy's base"). No fine-tuning, no allocation: nothing here depends on which rule wins.

  per-layer share   each task's raw score (train.py's defaults: per-example Fisher, 4 batches of 64,
                    q, k, v, o) summed over the layer's candidates, as % of the task's total
  weight change     ||W - W_init||_F / ||W_init||_F for each matrix of each layer (W_init: the same
                    GPT(cfg) under the same --base-seed, rebuilt, as train.py builds it before pretraining)
  stream norm       mean norm of the residual stream entering each layer and the final LayerNorm, over
                    a batch of the four tasks

Run (from the repository root):  python experiments/toy_profile.py            (the default base)
                                 python experiments/toy_profile.py --base-seeds 0,1,2,3,4
Flags it does not know go to train.py's parser (--cache, --pretrain-steps, --targets, ...); a base not in
--cache (default out/) is pretrained and cached there, as train.py does.
"""

import os
import random
import sys
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import train  # noqa: E402
from smoe import GPT, candidate_names, compute_sensitivity  # noqa: E402

MATRICES = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.up_proj", "mlp.down_proj")


def layer_shares(model, args, device):
    """{task: [share of the task's total in layer 0, 1, ...]}, from the batches train.py --seed draws."""
    candidates = candidate_names(model, args.targets)
    rng = random.Random(f"sensitivity-{args.seed}")  # as train.measure_sensitivity
    shares = {}
    for t in args.tasks:
        batches = [data.get_batch([t], args.batch_size, rng) for _ in range(args.sens_batches)]
        s = compute_sensitivity(model, {t: batches}, partial(train.example_losses, device=device), candidates,
                                args.sens_estimator, args.sens_reduction)[t]
        total = sum(s.values())
        shares[t] = [sum(v for name, v in s.items() if name.startswith(f"layers.{i}.")) / total
                     for i in range(model.cfg.n_layer)]
    return shares


def weight_change(model, cfg, base_seed):
    """[[||W - W_init|| / ||W_init|| for each of MATRICES] for each layer]."""
    torch.manual_seed(base_seed)
    init = GPT(cfg).state_dict()  # train.pretrained_base seeds and builds the model exactly so
    state = model.state_dict()
    return [[((state[k] - init[k]).norm() / init[k].norm()).item()
             for k in (f"layers.{i}.{m}.weight" for m in MATRICES)] for i in range(cfg.n_layer)]


@torch.no_grad()
def stream_norms(model, args, device):
    norms = []
    hooks = [m.register_forward_pre_hook(lambda m, a: norms.append(a[0].norm(dim=-1).mean().item()))
             for m in (*model.layers, model.ln_f)]
    x, _ = data.get_batch(list(args.tasks), 256, random.Random("stream-norms"))
    model(x.to(device))
    for h in hooks:
        h.remove()
    return norms


def main():
    p = train.Parser(prog="toy_profile.py", description="Per-layer sensitivity shares and weight change of the toy's base.")
    p.add_argument("--base-seeds", default="0", help="comma-separated base seeds to profile (default 0, train.py's default)")
    args, rest = p.parse_known_args()
    try:
        base_seeds = [int(s) for s in args.base_seeds.split(",")]
        assert all(s >= 0 for s in base_seeds)
    except (ValueError, AssertionError):
        p.error(f"--base-seeds must be comma-separated integers >= 0, got {args.base_seeds!r}")
    for flag in ("--base-seed", "--out"):
        if any(a == flag or a.startswith(flag + "=") for a in rest):
            p.error(f"{flag} is not used here; give --base-seeds, and --cache for where the bases are")
    cfg = train.toy_config()
    for base_seed in base_seeds:
        targs = train.parse_args(["--base-seed", str(base_seed), *rest])
        device = torch.device(targs.device)
        model = train.pretrained_base(targs, cfg, device).eval()
        shares, change = layer_shares(model, targs, device), weight_change(model.cpu(), cfg, base_seed)
        norms = stream_norms(model.to(device), targs, device)
        print(f"base seed {base_seed}: each task's {targs.sens_estimator} score per layer, % of its total "
              f"({targs.sens_batches} batches of {targs.batch_size}, {','.join(targs.targets)}); "
              f"weight change ||W - W_init|| / ||W_init||; residual stream norm entering the layer")
        print("layer " + " ".join(f"{t:>7}" for t in targs.tasks) + "   " + " ".join(f"{m.split('.')[1][:-5]:>5}" for m in MATRICES)
              + "  stream")
        for i in range(cfg.n_layer):
            print(f"{i:>5} " + " ".join(f"{100 * shares[t][i]:>7.0f}" for t in targs.tasks) + "   "
                  + " ".join(f"{v:>5.1f}" for v in change[i]) + f"  {norms[i]:>6.1f}")
        print(f"  largest layer share {100 * max(max(v) for v in shares.values()):.0f} %; stream entering ln_f {norms[-1]:.1f}")


if __name__ == "__main__":
    main()
