"""
Where the toy's base model puts each task's sensitivity, layer by layer, and how far pretraining moved
each layer's weights from their initialisation: the two measurements the toy's base is judged by
(experiments/README.md, "The toy"). Nothing here depends on which allocation rule wins.

  per-layer share   each task's raw score as train.py computes it (per-example Fisher, --sens-batches
                    batches of --batch-size, the --targets) summed over the layer's candidates, as %
                    of the task's total
  weight change     ||W - W_init||_F / ||W_init||_F for each matrix of each layer (W_init: GPT(cfg)
                    built right after torch.manual_seed(--base-seed), as train.py builds it before pretraining)
  stream norm       mean norm of the residual stream entering each layer and the final LayerNorm, over
                    a batch of the four tasks

Each base comes from a one-step `python train.py` run (its output in --cache/toy_profile-base<seed>/):
a base already in --cache is loaded, any other is pretrained and cached there, as train.py does.

Run (from the repository root):  python experiments/toy_profile.py            (the default base)
                                 python experiments/toy_profile.py --base-seeds 0,1,2,3,4
Flags it does not know go to train.py (--pretrain-steps, --targets, --sens-batches, ...).
"""

import argparse
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # smoe.py, data.py
import data  # noqa: E402
from runs import load_base, run_train  # noqa: E402
from smoe import GPT  # noqa: E402

MATRICES = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.up_proj", "mlp.down_proj")


def layer_shares(sensitivity, n_layer):
    """{task: [share of the task's total in layer 0, 1, ...]} from {task: {name: score}}."""
    return {t: [sum(v for name, v in s.items() if name.startswith(f"layers.{i}.")) / sum(s.values()) for i in range(n_layer)]
            for t, s in sensitivity.items()}


def weight_change(model, cfg, base_seed):
    """[[||W - W_init|| / ||W_init|| for each of MATRICES] for each layer]."""
    torch.manual_seed(base_seed)
    init = GPT(cfg).state_dict()
    state = model.state_dict()
    return [[((state[k] - init[k]).norm() / init[k].norm()).item()
             for k in (f"layers.{i}.{m}.weight" for m in MATRICES)] for i in range(cfg.n_layer)]


@torch.no_grad()
def stream_norms(model, tasks):
    norms = []
    hooks = [m.register_forward_pre_hook(lambda m, a: norms.append(a[0].norm(dim=-1).mean().item()))
             for m in (*model.layers, model.ln_f)]
    x, _ = data.get_batch(tasks, 256, random.Random("stream-norms"))
    model(x)
    for h in hooks:
        h.remove()
    return norms


def main(argv=None):
    p = argparse.ArgumentParser(prog="toy_profile.py", allow_abbrev=False,
                                description="Per-layer sensitivity shares and weight change of the toy's base.")
    p.add_argument("--base-seeds", default="0", help="comma-separated base seeds to profile (default 0, train.py's default)")
    p.add_argument("--cache", default="out", help="where the pretrained bases are cached (default out)")
    args, rest = p.parse_known_args(argv)
    for flag in ("--base-seed", "--out", "--sens-norm", "--alloc", "--allocation"):
        if any(a == flag or a.startswith(flag + "=") for a in rest):
            p.error(f"{flag} is set by toy_profile.py; give --base-seeds, and --cache for where the bases are")
    for base_seed in map(int, args.base_seeds.split(",")):
        run = run_train(["--base-seed", str(base_seed), "--cache", args.cache, "--steps", "1", "--eval-examples", "1", *rest],
                        os.path.join(args.cache, f"toy_profile-base{base_seed}"))
        model, config = load_base(run).eval(), run["config"]
        shares, change = layer_shares(run["sensitivity"], model.cfg.n_layer), weight_change(model, model.cfg, base_seed)
        norms = stream_norms(model, config["tasks"])
        print(f"base seed {base_seed}: each task's sensitivity per layer, % of its total ({config['sens_batches']} batches "
              f"of {config['batch_size']}, {','.join(config['targets'])}); weight change ||W - W_init|| / ||W_init||; "
              "residual stream norm entering the layer")
        print("layer " + " ".join(f"{t:>7}" for t in shares) + "   " + " ".join(f"{m.split('.')[1][:-5]:>5}" for m in MATRICES)
              + "  stream")
        for i in range(model.cfg.n_layer):
            print(f"{i:>5} " + " ".join(f"{100 * s[i]:>7.0f}" for s in shares.values()) + "   "
                  + " ".join(f"{v:>5.1f}" for v in change[i]) + f"  {norms[i]:>6.1f}")
        print(f"  largest layer share {100 * max(max(s) for s in shares.values()):.0f} %; stream entering ln_f {norms[-1]:.1f}")


if __name__ == "__main__":
    main()
