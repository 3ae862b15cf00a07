"""Two ranks (torchrun, gloo, FSDP2) equal one rank with the same global batch: same final
weights, same validation metrics (each validation query counted once), the export works
from the sharded model, and the end-of-training retrieval evaluation (collective on every rank)
gives the numbers of evaluating the export directly."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from train_fixture import base_config, make_model, write_beir, write_dataset

from embedcore.train import loop as loop_mod
from embedcore.train.config import config_from_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")


def _train_on_two_ranks(cfg_path):
    """`torchrun --nproc-per-node=2 train.py cfg` (gloo, one thread per rank); must succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node=2", os.path.join(ROOT, "train.py"),
                           str(cfg_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not found")
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_ranks_equal_one_rank(tmp_path, lora):
    model = make_model(str(tmp_path / "model"))
    train = write_dataset(str(tmp_path / "train.jsonl"), 24)
    val = write_dataset(str(tmp_path / "val.jsonl"), 7, seed=1)
    beir = write_beir(str(tmp_path / "beir"), n_queries=7)  # 7 queries: the ranks encode unequal shares
    metrics = ["ndcg@10", "mrr@10", "recall@5"]

    def config(name, local):
        data = base_config(model, train, val, str(tmp_path / name), global_batch_size=8, local_batch_size=local,
                           max_steps=3, val_every_steps=3, ckpt_every_steps=3)
        data["checkpoint"]["save_consolidated"] = True
        data["model"]["share_encoder"] = False
        data["evaluation"] = {"data": beir, "metrics": metrics, "batch_size": 4}
        if lora:
            data["peft"] = {"target_modules": ["q_proj", "v_proj"], "dim": 4, "alpha": 8}
            data["checkpoint"]["export_merged_lora"] = True
        return data

    # 2 ranks x 2 queries x 2 accumulation steps vs 1 rank x 4 queries x 2 accumulation steps
    cfg_path = tmp_path / "two.yaml"
    cfg_path.write_text(yaml.safe_dump(config("two", 2)))
    proc = _train_on_two_ranks(cfg_path)
    assert "step 3 | epoch 0 | loss" in proc.stdout

    one = loop_mod.train(config_from_dict(config("one", 4)))
    want = load_file(os.path.join(one.checkpoint, "model", "model.safetensors"))
    got = load_file(str(tmp_path / "two" / "step_3" / "model" / "model.safetensors"))
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)
    first = load_file(os.path.join(tmp_path / "two" / "step_3" / "model" / "model.safetensors"))
    assert first  # non-empty

    def records(name, file):
        return [json.loads(x) for x in open(tmp_path / name / file)]

    for a, b in zip(records("one", "training.jsonl"), records("two", "training.jsonl")):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    (va, ea), (vb, eb) = records("one", "validation.jsonl"), records("two", "validation.jsonl")
    assert va["val_queries"] == vb["val_queries"] == 7
    for key in ("val_loss", "val_acc1", "val_mrr"):
        assert va[key] == pytest.approx(vb[key], rel=1e-4, abs=1e-6), key
    # the retrieval evaluation at the end: logged once (rank 0), the same as evaluating the export here
    from embedcore.evaluate import evaluate_model

    assert proc.stdout.count(" | eval ndcg@10 ") == 1
    assert eb["step"] == 3 and eb["num_queries"] == 7 and eb["num_corpus"] == 18 and ea == one.evaluation
    direct = evaluate_model(eb["model"], beir, "test", metrics=metrics, batch_size=4)
    for key in metrics:
        assert eb[key] == pytest.approx(direct[key], abs=1e-6), key
        assert eb[key] == pytest.approx(ea[key], abs=1e-6), key
    # the export from the sharded run holds the same query and passage encoders
    exp = tmp_path / "two" / "step_3" / "model" / "consolidated"
    q = load_file(str(exp / "model.safetensors"))
    p = load_file(str(exp / "passage_encoder" / "model.safetensors"))
    if lora:  # the checkpoints hold the adapters; the sharded run exported them and a merged model
        assert all("lora_" in k for k in want)
        ad = tmp_path / "two" / "step_3" / "model" / "adapter"
        assert (ad / "adapter_model.safetensors").exists() and (ad / "passage_encoder" / "adapter_config.json").exists()
        a = load_file(str(ad / "adapter_model.safetensors"))
        mine = {k: v for k, v in got.items() if k.startswith("query_encoder.")}  # the 2-rank run's own factors
        assert len(a) == len(mine) > 0
        for k, v in mine.items():
            peft_key = "base_model.model." + k[len("query_encoder."):]
            assert torch.equal(a[peft_key], v), k
        assert set(q) and not any("lora" in k for k in q)
        return
    for k, v in q.items():
        torch.testing.assert_close(v, want[f"query_encoder.{k}"], rtol=1e-4, atol=1e-5)
    for k, v in p.items():
        torch.testing.assert_close(v, want[f"passage_encoder.{k}"], rtol=1e-4, atol=1e-5)


GATHER_SCRIPT = r'''
import sys, torch, torch.distributed as dist
from embedcore.distributed import init_distributed
from embedcore.train.objective import PooledObjective
info = init_distributed("gloo")
g = torch.Generator().manual_seed(0)
q_all = torch.nn.functional.normalize(torch.randn(2 * 3, 8, generator=g, dtype=torch.float64), dim=-1)
p_all = torch.nn.functional.normalize(torch.randn(2 * 6, 8, generator=g, dtype=torch.float64), dim=-1)
ids_all = torch.arange(12)
ids_all[7] = ids_all[0]  # a copy of rank 0's first positive on rank 1
r = info.rank
q = q_all[3 * r:3 * r + 3].clone().requires_grad_()
p = p_all[6 * r:6 * r + 6].clone().requires_grad_()
loss = PooledObjective(0.1, backend="torch").train_loss(q, None, p, None, ids_all[6 * r:6 * r + 6], info)
loss.backward()
torch.save({"loss": loss.detach(), "dq": q.grad, "dp": p.grad}, sys.argv[1] + f"/rank{r}.pt")
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_gathered_passages_send_gradients_back_to_their_owners(tmp_path):
    """Rank r's passage gradient is the sum over ranks of d loss_s / d p_r (FSDP then averages
    parameter gradients over the ranks), i.e. world x the gradient of the mean loss."""
    script = tmp_path / "gather.py"
    script.write_text(GATHER_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node=2", str(script), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from embedcore.ops.contrastive import contrastive_loss

    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    p = torch.nn.functional.normalize(torch.randn(12, 8, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    ids = torch.arange(12)
    ids[7] = ids[0]
    ref = contrastive_loss(q, p, 0.1, passage_ids=ids, backend="torch")  # one process, the whole global batch
    ref.backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, ref.detach())
    torch.testing.assert_close(torch.cat([ranks[0]["dq"], ranks[1]["dq"]]), 2 * q.grad)
    torch.testing.assert_close(torch.cat([ranks[0]["dp"], ranks[1]["dp"]]), 2 * p.grad)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not found")
def test_colbert_two_ranks_equal_one_rank(tmp_path):
    """colbert gathers every rank's passage token vectors (padded to the collator's longest
    possible passage, so no rank has to ask the others) and trains as one rank would."""
    model = make_model(str(tmp_path / "model"))
    train = write_dataset(str(tmp_path / "train.jsonl"), 16)

    def config(name, local):
        data = base_config(model, train, None, str(tmp_path / name), global_batch_size=4, local_batch_size=local,
                           max_steps=2, ckpt_every_steps=2)
        data["model"]["pooling"] = "colbert"
        return data

    cfg_path = tmp_path / "two.yaml"
    cfg_path.write_text(yaml.safe_dump(config("two", 2)))
    proc = _train_on_two_ranks(cfg_path)
    one = loop_mod.train(config_from_dict(config("one", 4)))
    want = load_file(os.path.join(one.checkpoint, "model", "model.safetensors"))
    got = load_file(str(tmp_path / "two" / "step_2" / "model" / "model.safetensors"))
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)
