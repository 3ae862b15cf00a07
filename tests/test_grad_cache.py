"""Cached (GradCache) encoding and activation checkpointing give the gradients of the plain step.

- with dropout on (Llama attention dropout / BERT hidden and attention dropout in the config, LoRA
  dropout), cached_step's parameter gradients equal those of the same chunks encoded with grad
  and back-propagated at once (the dropout masks replayed from the recorded RNG states), for chunk
  sizes that do and do not divide the batch; with a single unsorted full-width chunk they equal
  today's plain step exactly, dropout included;
- without dropout, padding-aware chunks (sorted, each cut to its own longest, left and right
  padding) give the gradients of today's plain step on the collated batch;
- activation checkpointing per block: same gradients, same parameter names, blocks recomputed;
- two ranks (torchrun, gloo, FSDP2) with cached encoding and gradient accumulation equal one
  process with the whole global batch on the plain path, reducing each gradient once per step.
Tolerance everywhere: max abs difference <= 1e-5 x the gradient's global norm (fp32, CPU).
"""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from grad_cache_fixture import (build_model, chunked_plain_step, grads, make_batch, max_rel_diff,
                                objective_for, plain_step, run_seeded)

from embedcore.train import grad_cache
from embedcore.train.activation_checkpointing import apply_activation_checkpointing, is_checkpointed
from embedcore.distributed import DistInfo
from embedcore.train.grad_cache import cached_step, plan_chunks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
TOL = 1e-5
INFO = DistInfo()
PAD = {"llama": 1, "bert": 0}  # the tiny Llama pads with EOS (id 1), BERT with [PAD] 0
SIDE = {"llama": "left", "bert": "right"}
B, N = 4, 3  # 4 queries x 3 passages (1 positive + 2 hard negatives): 4 query rows, 12 passage rows
CHUNKS = [1, 3, 5, 64]  # 3 divides the passages not the queries, 5 divides neither, 64 is one chunk
DROPOUT_CHUNKS = [3, 5, 64]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return str(tmp_path_factory.mktemp("grad_cache_models"))


def _batch(family, side=None, seed=0):
    return make_batch(B, N, side or SIDE[family], PAD[family], seed=seed)


def _step_grads(model, fn, seed=123):
    model.zero_grad(set_to_none=True)
    loss = run_seeded(fn, seed)
    loss = loss.loss if hasattr(loss, "loss") else loss
    return loss, grads(model)


def _assert_dropout_active(model, batch):
    """Two forwards in training mode differ (so the equal-gradient tests below test the replay)."""
    with torch.no_grad():
        a = model.encode(batch["p_input_ids"], batch["p_attention_mask"], "passage")
        b = model.encode(batch["p_input_ids"], batch["p_attention_mask"], "passage")
    assert (a - b).abs().max() > 1e-3


# ---------------------------------------------------------------------------- the chunk plan
@pytest.mark.parametrize("side", ["left", "right"])
def test_plan_chunks_sorted_and_cut_to_their_own_longest(side):
    batch = make_batch(B, N, side, pad_id=1, seed=3)
    mask = batch["p_attention_mask"]
    lengths = mask.sum(1)
    chunks = plan_chunks(mask, 5)
    assert [c.rows.numel() for c in chunks] == [5, 5, 2]
    rows = torch.cat([c.rows for c in chunks])
    assert sorted(rows.tolist()) == list(range(B * N))  # every row once
    assert torch.all(lengths[rows][:-1] >= lengths[rows][1:])  # longest first
    for c in chunks:
        longest = int(lengths[c.rows].max())
        assert c.end - c.start == longest  # the chunk's own longest, no more
        if side == "right":
            assert c.start == 0
        else:
            assert c.end == mask.shape[1]
        assert int(mask[c.rows, c.start:c.end].sum()) == int(lengths[c.rows].sum()) == c.real_tokens
    assert sum(c.padded_tokens for c in chunks) < mask.numel()
    # padding_aware=False: batch order, full width
    plain = plan_chunks(mask, 5, padding_aware=False)
    assert torch.equal(torch.cat([c.rows for c in plain]), torch.arange(B * N))
    assert all((c.start, c.end) == (0, mask.shape[1]) for c in plain)
    with pytest.raises(ValueError, match="chunk_size"):
        plan_chunks(mask, 0)


def test_token_counts():
    model = build_model("bert", "avg", True, None, 0.0)
    batch = _batch("bert")
    r = cached_step(model, objective_for("avg"), batch, 5, INFO)
    q_mask, p_mask = batch["q_attention_mask"], batch["p_attention_mask"]
    assert r.real_tokens == int(q_mask.sum() + p_mask.sum())
    assert r.collated_tokens == q_mask.numel() + p_mask.numel()
    assert r.real_tokens <= r.padded_tokens < r.collated_tokens
    want = sum(c.padded_tokens for m in (q_mask, p_mask) for c in plan_chunks(m, 5))
    assert r.padded_tokens == want and r.chunks == 1 + 3


# ---------------------------------------------------------------------------- dropout replay
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_restoring_the_rng_replays_hf_and_lora_dropout(base, family):
    """The masks of HF dropout (Llama attention dropout via SDPA; BERT hidden + attention dropout)
    and of LoRA dropout (its seed drawn from torch's CPU generator) come back with the RNG state,
    also from a no-grad forward to a grad one."""
    batch = _batch(family)
    ids, mask = batch["p_input_ids"], batch["p_attention_mask"]
    for dropout, lora in ((0.2, None), (0.0, 0.3)):  # each source of randomness alone
        model = build_model(family, "avg", True, lora, dropout, base)
        _assert_dropout_active(model, batch)
        state = torch.get_rng_state()
        with torch.no_grad():
            a = model.encode(ids, mask, "passage")
        torch.set_rng_state(state)
        b = model.encode(ids, mask, "passage")
        assert b.requires_grad and torch.equal(a, b)


# (pooling, shared encoder, LoRA): every pair of values of two of them appears once per family
PAIRWISE = [("avg", True, False), ("avg", False, True), ("colbert", True, True), ("colbert", False, False)]


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("pooling,shared,lora", PAIRWISE,
                         ids=["avg-shared-full", "avg-separate-lora", "colbert-shared-lora", "colbert-separate-full"])
def test_cached_equals_uncached_with_dropout(base, family, pooling, shared, lora):
    model = build_model(family, pooling, shared, 0.2 if lora else None, 0.2, base)
    objective, batch = objective_for(pooling), _batch(family)
    _assert_dropout_active(model, batch)
    for chunk in DROPOUT_CHUNKS:
        want_loss, want = _step_grads(model, lambda: chunked_plain_step(model, objective, batch, chunk, INFO))
        got_loss, got = _step_grads(model, lambda: cached_step(model, objective, batch, chunk, INFO))
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=0)
        assert max_rel_diff(got, want) <= TOL, f"chunk {chunk}"
    # the global RNG is where pass 1 left it, as after the uncached encoding
    run_seeded(lambda: cached_step(model, objective, batch, 5, INFO))
    after_cached = torch.get_rng_state()
    run_seeded(lambda: chunked_plain_step(model, objective, batch, 5, INFO))
    assert torch.equal(after_cached, torch.get_rng_state())
    # different dropout masks give clearly different gradients: the comparison above can fail
    _, other = _step_grads(model, lambda: chunked_plain_step(model, objective, batch, 3, INFO), seed=999)
    _, same = _step_grads(model, lambda: chunked_plain_step(model, objective, batch, 3, INFO))
    assert max_rel_diff(other, same) > 1e-3


@pytest.mark.parametrize("pooling", ["avg", "colbert"])
def test_without_the_rng_replay_the_gradients_differ(base, pooling, monkeypatch):
    """The equal-gradient test fails when pass 2 does not replay pass 1's RNG states."""
    model = build_model("llama", pooling, True, 0.2, 0.2, base)
    objective, batch = objective_for(pooling), _batch("llama")
    _, want = _step_grads(model, lambda: chunked_plain_step(model, objective, batch, 3, INFO))
    monkeypatch.setattr(grad_cache, "_set_rng_state", lambda state, device: None)
    _, got = _step_grads(model, lambda: cached_step(model, objective, batch, 3, INFO))
    assert max_rel_diff(got, want) > 1e-3


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("pooling", ["avg", "colbert"])
def test_one_unsorted_chunk_equals_todays_step_with_dropout(base, family, pooling):
    """A single full-width chunk in batch order draws exactly today's dropout masks."""
    model = build_model(family, pooling, False, 0.2, 0.2, base)
    objective, batch = objective_for(pooling), _batch(family)
    want_loss, want = _step_grads(model, lambda: plain_step(model, objective, batch, INFO))
    got_loss, got = _step_grads(model, lambda: cached_step(model, objective, batch, 64, INFO,
                                                           padding_aware=False))
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=0)
    assert max_rel_diff(got, want) <= TOL
    # sorted and cut chunks draw other masks: not today's gradients (the check above can fail)
    _, moved = _step_grads(model, lambda: cached_step(model, objective, batch, 64, INFO))
    assert max_rel_diff(moved, want) > 1e-3


# ---------------------------------------------------------------------------- padding-aware chunks
PADDING_CASES = [  # (family, padding side, pooling, shared encoder, LoRA)
    ("llama", "left", "avg", True, False), ("llama", "left", "last", False, True),
    ("llama", "left", "colbert", True, True), ("llama", "left", "colbert", False, False),
    ("llama", "right", "avg", False, True), ("llama", "right", "colbert", True, False),
    ("bert", "right", "avg", True, True), ("bert", "right", "colbert", False, True),
    ("bert", "right", "cls", False, False),
]


@pytest.mark.parametrize("family,side,pooling,shared,lora", PADDING_CASES,
                         ids=["-".join(map(str, c)) for c in PADDING_CASES])
def test_padding_aware_chunks_equal_todays_step(base, family, side, pooling, shared, lora):
    """No dropout: sorted chunks cut to their own longest (left or right padding, pooled and
    ColBERT token embeddings scattered back) give today's loss and gradients on the collated batch."""
    model = build_model(family, pooling, shared, 0.0 if lora else None, 0.0, base)
    objective, batch = objective_for(pooling), _batch(family, side)
    want_loss, want = _step_grads(model, lambda: plain_step(model, objective, batch, INFO))
    for chunk in CHUNKS:
        plan = plan_chunks(batch["p_attention_mask"], chunk)
        assert sum(c.padded_tokens for c in plan) < batch["p_attention_mask"].numel()  # columns were dropped
        got_loss, got = _step_grads(model, lambda: cached_step(model, objective, batch, chunk, INFO))
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=0)
        assert max_rel_diff(got, want) <= TOL, f"chunk {chunk}"
    # a wrong scatter (rows not put back in place) would show: the plain step on a shuffled batch differs
    perm = torch.randperm(B * N, generator=torch.Generator().manual_seed(0))
    shuffled = {**batch, "p_input_ids": batch["p_input_ids"][perm], "p_attention_mask": batch["p_attention_mask"][perm]}
    _, wrong = _step_grads(model, lambda: plain_step(model, objective, shuffled, INFO))
    assert max_rel_diff(wrong, want) > 1e-3


def test_gradient_accumulation_and_loss_scale(base):
    """Two micro-batches at loss_scale 1/2 accumulate as two plain micro steps do."""
    model = build_model("llama", "avg", True, None, 0.0, base)
    objective = objective_for("avg")
    batches = [_batch("llama", seed=s) for s in (0, 1)]
    model.zero_grad(set_to_none=True)
    want_losses = [plain_step(model, objective, b, INFO, loss_scale=0.5) for b in batches]
    want = grads(model)
    model.zero_grad(set_to_none=True)
    got_losses = [cached_step(model, objective, b, 3, INFO, loss_scale=0.5, last_micro_batch=k == 1).loss
                  for k, b in enumerate(batches)]
    torch.testing.assert_close(torch.stack(got_losses), torch.stack(want_losses), rtol=1e-5, atol=0)
    assert max_rel_diff(grads(model), want) <= TOL


def test_autocast_is_used_for_the_encoder(base):
    model = build_model("llama", "avg", True, None, 0.0, base)
    batch, seen = _batch("llama"), []

    class Recording:
        def __enter__(self):
            seen.append(torch.is_grad_enabled())

        def __exit__(self, *exc):
            return False

    cached_step(model, objective_for("avg"), batch, 3, INFO, autocast=Recording)
    n_chunks = 2 + 4  # queries: ceil(4 / 3), passages: ceil(12 / 3)
    assert seen == [False] * n_chunks + [True] * n_chunks


# ---------------------------------------------------------------------------- activation checkpointing
def test_activation_checkpointing_keeps_names_and_blocks(base):
    model = build_model("llama", "avg", False, 0.1, 0.0, base)
    names = list(model.state_dict())
    params = [n for n, _ in model.named_parameters()]
    blocks = model.transformer_blocks()
    assert apply_activation_checkpointing(model) == len(blocks) == 4  # 2 layers x 2 encoders
    assert list(model.state_dict()) == names and [n for n, _ in model.named_parameters()] == params
    assert model.transformer_blocks() == blocks and all(is_checkpointed(b) for b in blocks)
    with pytest.raises(ValueError, match="already applied"):
        apply_activation_checkpointing(model)


def _saved_numel(fn) -> int:
    """Elements autograd saves for backward outside checkpointed regions while fn() runs."""
    total = [0]

    def pack(t):
        total[0] += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("cached", [False, True], ids=["plain", "cached"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_activation_checkpointing_equal_gradients(base, family, cached, lora):
    pooling = "colbert" if family == "bert" else "avg"
    make = lambda: build_model(family, pooling, True, 0.2 if lora else None, 0.2, base)  # noqa: E731
    ref, model = make(), make()
    apply_activation_checkpointing(model)
    objective, batch = objective_for(pooling), _batch(family)
    _assert_dropout_active(model, batch)
    calls = [0]
    for block in model.transformer_blocks():
        # a pre-hook: the recompute stops early, before a block's forward hooks would run
        block.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    if cached:
        step = lambda m: cached_step(m, objective, batch, 5, INFO)  # noqa: E731
        encodes = 2 * (1 + 3)  # pass 1 + pass 2, query and passage chunks
        forwards_with_grad = 1 + 3
    else:
        step = lambda m: plain_step(m, objective, batch, INFO)  # noqa: E731
        encodes = forwards_with_grad = 2
    want_loss, want = _step_grads(ref, lambda: step(ref))
    got_loss, got = _step_grads(model, lambda: step(model))
    torch.testing.assert_close(getattr(got_loss, "loss", got_loss), want_loss, rtol=1e-6, atol=0)
    assert max_rel_diff(got, want) <= TOL
    n_blocks = len(model.transformer_blocks())
    assert calls[0] == n_blocks * (encodes + forwards_with_grad)  # every block recomputed in the backward
    # and it saves less for the backward
    ref.zero_grad(), model.zero_grad()
    enc = lambda m: m.encode(batch["p_input_ids"], batch["p_attention_mask"], "passage").sum().backward()  # noqa: E731
    assert _saved_numel(lambda: enc(model)) < 0.5 * _saved_numel(lambda: enc(ref))


# ---------------------------------------------------------------------------- two ranks
TWO_RANK_SCRIPT = r'''
import sys
import torch
sys.path.insert(0, sys.argv[1])
from grad_cache_fixture import build_model, grads, make_batch, objective_for, rank_slice
from embedcore.train.activation_checkpointing import apply_activation_checkpointing
from embedcore.distributed import all_reduce_sum, destroy_distributed, init_distributed
from embedcore.train.distributed import shard_model
from embedcore.train.grad_cache import cached_step
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard import _fsdp_param_group

reduces = [0]
_orig = _fsdp_param_group.foreach_reduce
def counting(*args, **kwargs):
    reduces[0] += 1
    return _orig(*args, **kwargs)
_fsdp_param_group.foreach_reduce = counting

base, out, cases = sys.argv[2], sys.argv[3], eval(sys.argv[4])
info = init_distributed("gloo", device="cpu")
results = []
for pooling, shared, lora, ac in cases:
    model = build_model("llama", pooling, shared, 0.0 if lora else None, 0.0, base)
    if ac:
        apply_activation_checkpointing(model)
    shard_model(model, model.transformer_blocks(), info, torch.float32)
    groups = 0  # FSDP parameter groups holding trainable parameters
    for m in model.modules():
        if isinstance(m, FSDPModule):
            group = m._get_fsdp_state()._fsdp_param_group
            groups += bool(group and any(fp.sharded_param.requires_grad for fp in group.fsdp_params))
    objective = objective_for(pooling)
    reduces[0] = 0
    losses = []
    for k in range(2):  # two micro-batches of 4 global queries: gradient accumulation
        batch = rank_slice(make_batch(4, 3, "left", 1, seed=k), info.rank, info.world_size)
        r = cached_step(model, objective, batch, 3, info, loss_scale=0.5, last_micro_batch=k == 1)
        losses.append(all_reduce_sum(r.loss.clone(), info) / info.world_size)
    g = grads(model)
    results.append({"grads": g, "losses": torch.stack(losses), "reduces": reduces[0], "groups": groups})
if info.rank == 0:
    torch.save(results, out)
destroy_distributed(info)
'''

TWO_RANK_CASES = [("avg", True, False, False), ("colbert", False, True, False), ("avg", False, False, True),
                  ("avg", True, True, True)]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not found")
def test_two_ranks_cached_equal_one_process_plain(base, tmp_path):
    """2 ranks (gloo, FSDP2 as the trainer shards), cached encoding, chunk 3, two accumulated
    micro-batches == 1 process, plain path, the whole global micro-batches. Cases: (pooling,
    shared, LoRA, activation checkpointing)."""
    from grad_cache_fixture import llama_folder

    llama_folder(base, 0.0)  # built here, read by both ranks
    script, out = tmp_path / "two_ranks.py", tmp_path / "grads.pt"
    script.write_text(TWO_RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node=2", str(script), os.path.dirname(__file__),
                           base, str(out), repr(TWO_RANK_CASES)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = torch.load(out)
    for (pooling, shared, lora, ac), got in zip(TWO_RANK_CASES, results, strict=True):
        model = build_model("llama", pooling, shared, 0.0 if lora else None, 0.0, base)
        objective = objective_for(pooling)
        model.zero_grad(set_to_none=True)
        losses = [plain_step(model, objective, make_batch(4, 3, "left", 1, seed=k), INFO, loss_scale=0.5)
                  for k in range(2)]
        want = grads(model)
        case = f"{pooling} shared={shared} lora={lora} ac={ac}"
        torch.testing.assert_close(got["losses"], torch.stack(losses), rtol=1e-5, atol=0, msg=case)
        assert max_rel_diff(got["grads"], want) <= TOL, case
        # reduce-scatter once per optimizer step: each group with gradients once, not once per chunk
        assert got["reduces"] == got["groups"] > 0, case
