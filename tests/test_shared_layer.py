"""The layer the trainer and the CLIs share: dtype names, mining parameters checked when built,
JSON Lines reading, atomic folders, and the collectives in one process (several ranks:
test_train_distributed.py, test_mine.py)."""
import os

import pytest
import torch

from embedcore import distributed as D
from embedcore.dtypes import parse_dtype
from embedcore.errors import ConfigError, DataError
from embedcore.files import atomic_folder, read_jsonl


def test_dtype_names():
    assert parse_dtype("bfloat16") is torch.bfloat16 and parse_dtype("torch.float64") is torch.float64
    assert parse_dtype(torch.float16) is torch.float16
    with pytest.raises(ConfigError, match=r"^--dtype: unknown dtype 'int8'; expected one of float32, "):
        parse_dtype("int8", "--dtype")


def test_mining_parameters_are_checked_when_built():
    from embedcore.mine import MiningConfig
    from embedcore.retrieval.hard_negatives import MiningParams

    with pytest.raises(ConfigError, match=r"^mining.hard_negatives_to_mine must be >= 1, got 0$"):
        MiningParams(hard_negatives_to_mine=0)
    with pytest.raises(ConfigError, match=r"^mining.hard_neg_margin: must be a finite number"):
        MiningParams(hard_neg_margin=float("nan"))
    with pytest.raises(ConfigError, match=r"^mining.model_name_or_path is required$"):
        MiningConfig()
    paths = dict(model_name_or_path="m", train_qa_file_path="i", train_file_output_path="o")
    with pytest.raises(ConfigError, match=r"^mining.hard_neg_skip_top_k must be >= 0, got -1$"):
        MiningConfig(**paths, hard_neg_skip_top_k=-1)
    assert isinstance(MiningConfig(**paths), MiningParams)  # what mine_corpus takes


def test_read_jsonl_names_the_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": \n')
    rows = read_jsonl(str(path), reason="bad_table")
    assert next(rows) == (f"{path}:1", {"a": 1}) and next(rows) == (f"{path}:3", {"a": 2})
    with pytest.raises(DataError, match=rf"^{path}:4: malformed JSON line") as e:
        next(rows)
    assert e.value.reason == "bad_table"


def test_atomic_folder_replaces_and_clears_stale_staging(tmp_path):
    final = str(tmp_path / "out")
    os.makedirs(tmp_path / ".tmp_out" / "junk")  # the remains of a crashed write
    os.makedirs(final)
    (tmp_path / "out" / "old.txt").write_text("old")

    def write(folder):
        assert not os.path.exists(folder)
        os.makedirs(folder)
        with open(os.path.join(folder, "new.txt"), "w") as f:
            f.write("new")

    assert atomic_folder(final, write) == final
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(final) == ["new.txt"]


def test_one_process_is_a_world_of_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = D.init_distributed(device="cpu")
    assert (info.rank, info.world_size, info.initialized, info.started) == (0, 1, False, False)
    assert D.is_main() and D.is_main(info) and not D.is_distributed()
    x = torch.arange(3.0)
    for reduce in (D.all_reduce_sum, D.all_reduce_max, D.all_reduce_min):
        assert reduce(x) is x and reduce(x, info) is x
    assert D.gather_no_grad(x, info) is x and D.gather_with_grad(x) is x and D.broadcast_object({"a": 1}) == {"a": 1}
    rows = D.gather_rows(torch.tensor([2, 0]), torch.tensor([[5.0], [7.0]]), 3)
    assert rows.tolist() == [[7.0], [0.0], [5.0]]
    D.barrier(info)
    D.destroy_distributed(info)
