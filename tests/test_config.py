"""Config loading: the reference config parses, overrides coerce types, bad keys/types/targets
are errors naming the key, and every field has a docstring."""
import dataclasses
import os

import pytest
import yaml

from embedcore.train import config as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, "examples", "reference_llama3_2_1b.yaml")


def _minimal(**extra):
    data = {"model": {"pretrained_model_name_or_path": "m"}, "dataloader": {"dataset": {"data_dir_list": ["a.jsonl"]}}}
    data.update(extra)
    return data


def _write(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_reference_config_parses_with_its_values():
    cfg = C.load_config(REFERENCE)
    assert cfg.seed == 42 and cfg.train_n_passages == 5 and cfg.eval_negative_size == 4
    assert cfg.temperature == pytest.approx(0.02)
    assert cfg.step_scheduler.global_batch_size == 128 and cfg.step_scheduler.local_batch_size == 4
    assert cfg.model.torch_dtype == "bfloat16" and cfg.model.use_liger_kernel is True
    assert cfg.optimizer.lr == pytest.approx(5e-6) and cfg.optimizer.adam_w_mode is True
    assert cfg.dataloader.collate_fn.query_prefix == "query:"
    assert cfg.distributed.dp_size == "none" and cfg.dist_env.backend == "nccl"
    assert C.resolve_target("optimizer", cfg.optimizer._target_) == "adam"
    assert C.resolve_target("model", cfg.model._target_) == "biencoder"


def test_reference_config_is_the_guides_verbatim():
    """The example holds the guide's full reference config (comments aside)."""
    # shared/ lies beside the checkout (CI clones elsewhere and copies it beside the clone)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    seed_dir = os.path.join(os.path.dirname(repo), "shared", "seed")
    if not os.path.isdir(seed_dir):
        pytest.skip(f"the guide is not beside this checkout ({seed_dir})")
    text = open(os.path.join(seed_dir, sorted(os.listdir(seed_dir))[0])).read()
    block = text.split("## Full Example Config")[1].split("```yaml")[1].split("```")[0]
    assert yaml.safe_load(block) == yaml.safe_load(open(REFERENCE))


def test_dotted_overrides_coerce_types(tmp_path):
    path = _write(tmp_path, _minimal())
    cfg = C.load_config(path, ["--step_scheduler.max_steps", "20", "--optimizer.lr=3e-4", "--model.share_encoder",
                               "false", "--dataloader.collate_fn.query_prefix", "123", "--checkpoint.restore_from",
                               "LATEST", "--dataloader.dataset.data_dir_list", "[x.jsonl, y.jsonl]"])
    assert cfg.step_scheduler.max_steps == 20 and isinstance(cfg.step_scheduler.max_steps, int)
    assert cfg.optimizer.lr == pytest.approx(3e-4)
    assert cfg.model.share_encoder is False
    assert cfg.dataloader.collate_fn.query_prefix == "123"  # a string field keeps the text as typed
    assert cfg.checkpoint.restore_from == "LATEST"
    assert cfg.dataloader.dataset.data_dir_list == ["x.jsonl", "y.jsonl"]
    cfg = C.load_config(path, ["--step_scheduler.max_steps", "null"])
    assert cfg.step_scheduler.max_steps is None


def test_override_creates_an_optional_section(tmp_path):
    cfg = C.load_config(_write(tmp_path, _minimal()), ["--peft.dim", "4"])
    assert cfg.peft is not None and cfg.peft.dim == 4 and cfg.peft.target_modules


@pytest.mark.parametrize("overrides, key", [
    (["--step_scheduler.max_step", "3"], "step_scheduler.max_step"),
    (["--nope", "1"], "nope"),
    (["--step_scheduler.max_steps", "three"], "step_scheduler.max_steps"),
    (["--optimizer.lr", "fast"], "optimizer.lr"),
    (["--model.share_encoder", "maybe"], "model.share_encoder"),
    (["--model.pooling", "max"], "model.pooling"),
    (["--step_scheduler.max_steps"], "step_scheduler.max_steps"),
])
def test_bad_overrides_name_the_key(tmp_path, overrides, key):
    with pytest.raises(C.ConfigError, match=key.replace(".", r"\.")):
        C.load_config(_write(tmp_path, _minimal()), overrides)


@pytest.mark.parametrize("data, key", [
    (_minimal(optimizer={"lr": 1e-4, "momentum": 0.9}), "optimizer.momentum"),
    (_minimal(step_scheduler={"global_batch_size": "big"}), "step_scheduler.global_batch_size"),
    (_minimal(step_scheduler={"num_epochs": 1.5}), "step_scheduler.num_epochs"),
    (_minimal(step_scheduler={"local_batch_size": True}), "step_scheduler.local_batch_size"),
    (_minimal(model={"pretrained_model_name_or_path": "m", "l2_normalize": "yes"}), "model.l2_normalize"),
    (_minimal(unknown_section={}), "unknown_section"),
    (_minimal(temperature=0), "temperature"),
    (_minimal(distributed={"tp_size": 2}), "distributed.tp_size"),
    (_minimal(distributed={"strategy": "megatron"}), "distributed.strategy"),
    (_minimal(checkpoint={"model_save_format": "torch_save"}), "checkpoint.model_save_format"),
    (_minimal(dataloader={"dataset": {"data_dir_list": ["a"], "train_n_passages": 3}}),
     "dataloader.dataset.train_n_passages"),
    (_minimal(dataloader={"dataset": {"data_dir_list": []}}), "dataloader.dataset.data_dir_list"),
    ({"dataloader": {"dataset": {"data_dir_list": ["a"]}}}, "model.pretrained_model_name_or_path"),
    (_minimal(validation_dataloader={"dataset": {"data_dir_list": ["v"], "data_type": "train"}}),
     "validation_dataloader.dataset.data_type"),
    # inside an optional section the error names the inner key, not just the section
    (_minimal(peft={"dim": "eight"}), "peft.dim: expected an integer"),
    (_minimal(validation_dataloader={"dataset": {"data_dir_list": ["v"]}, "batch_size": "x"}),
     "validation_dataloader.batch_size: expected an integer"),
])
def test_bad_values_name_the_key(tmp_path, data, key):
    with pytest.raises(C.ConfigError, match=key.replace(".", r"\.")):
        C.load_config(_write(tmp_path, data))


@pytest.mark.parametrize("section, data", [
    ("model", {"pretrained_model_name_or_path": "m", "_target_": "os.system"}),
    ("optimizer", {"_target_": "torch.optim.SGD"}),
    ("tokenizer", {"_target_": "builtins.eval"}),
    ("peft", {"_target_": "evil.module.Thing"}),
])
def test_unknown_targets_are_refused(tmp_path, section, data):
    with pytest.raises(C.ConfigError, match=rf"{section}\._target_.*never imports code"):
        C.load_config(_write(tmp_path, _minimal(**{section: data})))


def test_collate_and_dataset_targets_are_checked(tmp_path):
    data = _minimal()
    data["dataloader"]["collate_fn"] = {"_target_": "my.Collator"}
    with pytest.raises(C.ConfigError, match=r"dataloader\.collate_fn\._target_"):
        C.load_config(_write(tmp_path, data))


def test_reference_targets_map_to_ours():
    assert C.resolve_target("optimizer", "torch.optim.AdamW") == "adamw"
    assert C.resolve_target("dataloader", "torchdata.stateful_dataloader.StatefulDataLoader", "dataloader")
    assert C.resolve_target("peft", "nemo_automodel.components._peft.lora.PeftConfig") == "lora"
    assert C.resolve_target("tokenizer", "nemo_automodel.NeMoAutoTokenizer.from_pretrained") == "auto_tokenizer"


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(C.ConfigError, match="not found"):
        C.load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(C.ConfigError, match="not valid YAML"):
        C.load_config(str(bad))


def _sections(cls, seen=None):
    import typing

    seen = seen if seen is not None else set()
    if cls in seen:
        return seen
    seen.add(cls)
    for tp in typing.get_type_hints(cls).values():
        for arg in (tp, *typing.get_args(tp)):
            if dataclasses.is_dataclass(arg):
                _sections(arg, seen)
    return seen


def _field_docs(cls) -> dict[str, str]:
    """{field name: docstring} of a config dataclass, read from the string under each field."""
    import ast
    import inspect

    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {node.target.id: nxt.value.value for node, nxt in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)}


def test_every_field_has_a_docstring():
    for cls in _sections(C.TrainConfig):
        docs = _field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__}: fields without a docstring: {missing}"


def test_top_level_mirrors_the_guides_sections():
    names = {f.name for f in dataclasses.fields(C.TrainConfig)}
    assert {"seed", "train_n_passages", "eval_negative_size", "temperature", "step_scheduler", "dist_env", "model",
            "tokenizer", "dataloader", "validation_dataloader", "optimizer", "lr_scheduler", "checkpoint",
            "distributed", "peft"} <= names


# ------------------------------------------------------------------ the compatibility table
def test_every_compat_key_is_a_field_and_the_reference_runs_with_two_notices():
    from embedcore.train.config.loading import _field_type

    for c in C.COMPAT:  # a row naming no field raises here
        _field_type(C.TrainConfig, c.key.split("."), c.key)
        if c.same_as:
            _field_type(C.TrainConfig, c.same_as.split("."), c.same_as)
    cfg = C.load_config(REFERENCE)
    notices = C.compat_notices(cfg)
    assert [n.split(":")[0] for n in notices] == ["model.use_liger_kernel", "model.use_sdpa_patching"], notices
    assert all("\n" not in n for n in notices)


@pytest.mark.parametrize("data, key", [
    (_minimal(distributed={"cp_size": 2}), "distributed.cp_size: only 1 is supported, got 2"),
    (_minimal(distributed={"sequence_parallel": True}), "distributed.sequence_parallel: only false"),
    (_minimal(distributed={"dp_size": "auto"}), "distributed.dp_size"),
    (_minimal(optimizer={"bias_correction": False}), "optimizer.bias_correction"),
    (_minimal(dataloader={"dataset": {"data_dir_list": ["a"], "data_type": "eval"}}), "dataloader.dataset.data_type"),
])
def test_compat_values_that_cannot_be_honoured_are_errors(tmp_path, data, key):
    with pytest.raises(C.ConfigError, match=key.replace(".", r"\.")):
        C.load_config(_write(tmp_path, data))


def test_ignored_compat_values_give_one_notice_each(tmp_path):
    cfg = C.load_config(_write(tmp_path, _minimal(optimizer={"master_weights": False}, validation_dataloader={
        "dataset": {"data_dir_list": ["v"], "data_type": "eval"}, "num_workers": 2})))
    keys = [n.split(":")[0] for n in C.compat_notices(cfg)]
    assert keys == ["optimizer.master_weights", "validation_dataloader.num_workers"]
    assert C.compat_notices(C.load_config(_write(tmp_path, _minimal()))) == []


def test_world_size_checks():
    cfg = C.config_from_dict(_minimal(step_scheduler={"global_batch_size": 16, "local_batch_size": 4}))
    assert C.validate_world(cfg, 2) == 2 and C.validate_world(cfg, 4) == 1
    with pytest.raises(C.ConfigError, match=r"global_batch_size: 16 is not a multiple of local_batch_size 4 x 3"):
        C.validate_world(cfg, 3)
    cfg = C.config_from_dict(_minimal(distributed={"dp_size": 2}))
    assert C.validate_world(cfg, 2) == 16
    with pytest.raises(C.ConfigError, match=r"distributed\.dp_size: 2 differs from the 4 rank"):
        C.validate_world(cfg, 4)


def test_one_section_loader_names_the_file_and_the_key(tmp_path):
    """The loader the mining CLI uses: a file holding one section, keys spelt section.key."""
    from embedcore.train.config.schema import LRSchedulerConfig

    path = tmp_path / "s.yaml"
    path.write_text("lr:\n  min_lr: 0.5\n")
    cfg = C.load_yaml_with_overrides(str(path), ["--lr.lr_warmup_steps", "3"], LRSchedulerConfig, section="lr")
    assert cfg.min_lr == 0.5 and cfg.lr_warmup_steps == 3
    assert C.load_yaml_with_overrides(None, [], LRSchedulerConfig, section="lr") == LRSchedulerConfig()
    with pytest.raises(C.ConfigError, match=r"lr\.nope: unknown key"):
        C.load_yaml_with_overrides(str(path), ["--lr.nope", "1"], LRSchedulerConfig, section="lr")
    with pytest.raises(C.ConfigError, match=r"lr\.min_lr: expected a number"):
        C.load_yaml_with_overrides(str(path), ["--lr.min_lr", "low"], LRSchedulerConfig, section="lr")
    path.write_text("other: {}\n")
    with pytest.raises(C.ConfigError, match=r"s\.yaml: expected a single top-level section 'lr'"):
        C.load_yaml_with_overrides(str(path), [], LRSchedulerConfig, section="lr")
