"""The run: section is checked, key by key, as soon as the config is built."""

import re
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from spec_helpers import REPO, installed_lavis_dir, run_python

CONFIGS = sorted((REPO / "configs").glob("**/*.yaml"))

# the start of LAVIS 1.0.2's repo-root train.py: it knows nothing of blip2_internlm
LAVIS_STYLE_TRAIN_PY = """
import argparse

import lavis.tasks as tasks
from lavis.common.config import Config
from lavis.runners import *  # noqa: F401,F403

parser = argparse.ArgumentParser(description="Training")
parser.add_argument("--cfg-path", required=True)
parser.add_argument("--options", nargs="+")
cfg = Config(parser.parse_args())
print("config built", flush=True)
task = tasks.setup_task(cfg)
model = task.build_model(cfg)
"""


def problems_of(run: dict) -> list[str]:
    from blip2_internlm.run_config import RunConfigError, validate_run_config

    try:
        validate_run_config(OmegaConf.create(run))
    except RunConfigError as error:
        return error.problems
    return []


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_project_config_has_a_valid_run_section(lavis_ready, path):
    assert problems_of(OmegaConf.to_container(OmegaConf.load(path).run)) == []


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("batch_size_train", "abc", "an integer >= 1"),
        ("batch_size_eval", 0, "an integer >= 1"),
        ("num_workers", -1, "an integer >= 0"),
        ("max_epoch", 0, "an integer >= 1"),
        ("max_iters", "2e4", "an integer >= 1"),  # LAVIS calls int() on it, which refuses "2e4"
        ("seed", "42", "an integer >= 0"),  # LAVIS's train.py adds the rank to it unconverted
        ("init_lr", "fast", "a number >= 0"),
        ("min_lr", -1e-5, "a number >= 0"),
        ("warmup_lr", "1e-5", "unquoted"),  # LAVIS compares it to 0 without float()
        ("amp", "false", "true or false"),  # a quoted "false" is truthy
        ("device", "gpu", "'cpu', 'cuda' or 'cuda:N'"),
        ("train_splits", "train", "a list of split names"),
        ("task", "captionig", "a registered LAVIS task"),
        ("lr_sched", "cosine", "a registered LAVIS LR scheduler"),
        ("runner", "runner_epoch", "a registered LAVIS runner"),
        ("resume", "yes", "null or one of false, 'auto'"),
        ("resume", True, "null or one of false, 'auto'"),
        ("save_every_iters", -5, "null or an integer >= 0"),
        ("keep_last_n", 0, "null or an integer >= 1"),
        ("max_nonfinite_steps", 0, "an integer >= 1"),
        ("nonfinite_check", 1, "true or false"),
        ("grad_clip_norm", 0, "null or a number > 0"),
        ("bad_samples", "ignore", "one of 'skip', 'error'"),
        ("max_bad_sample_fraction", 1.5, "a number in [0, 1]"),
        ("dist_timeout_minutes", 0, "a number > 0"),
        ("epoch_transition_sleep", -1, "a number >= 0"),
        ("caption_tokenizer", "spaces", "one of 'char', 'jieba', 'words'"),
        ("feature_cache", "on", "a mapping with keys among"),
    ],
)
def test_a_bad_value_is_reported_with_its_key_the_value_and_what_is_expected(lavis_ready, key, value, expected):
    (problem,) = problems_of({key: value})
    assert problem.startswith(f"run.{key} = {value!r}: expected ") and expected in problem


def test_entries_of_a_nested_setting_are_named_by_their_full_key(lavis_ready):
    problems = problems_of({"feature_cache": {"enabled": True, "views": 0, "dtype": "fp64"}})
    assert [p.split(" = ")[0] for p in problems] == ["run.feature_cache.views", "run.feature_cache.dtype"]
    (problem,) = problems_of({"caption_metrics": ["Bleu", "BLEURT"]})
    assert "run.caption_metrics" in problem and "'BLEURT'" in problem


def test_dataset_ratios_which_lavis_ignores_or_fails_on_are_an_error_saying_so(lavis_ready):
    (problem,) = problems_of({"train_dataset_ratios": {"coco_caption": 2, "vg_caption": 1}})
    assert problem.startswith("run.train_dataset_ratios = {") and "runner_base" in problem and "NameError" in problem
    assert problems_of({"train_dataset_ratios": None}) == []


def test_an_unknown_key_is_an_error_that_suggests_the_closest_known_key(lavis_ready):
    assert problems_of({"batch_size_trian": 8}) == [
        "run.batch_size_trian is not a known setting; did you mean run.batch_size_train?"
    ]
    assert problems_of({"feature_cache": {"enabled": True, "veiws": 2}}) == [
        "run.feature_cache.veiws is not a known setting; did you mean run.feature_cache.views?"
    ]
    (problem,) = problems_of({"zzzz": 1})
    assert problem.startswith("run.zzzz is not a known setting") and "did you mean" not in problem


def test_each_key_has_one_owner_and_each_field_a_default_a_kind_and_a_doc(lavis_ready):
    import dataclasses

    from blip2_internlm.run_config import RUN_KEYS, RUN_OWNERS
    from blip2_internlm.settings import Kind

    owned = [f.name for owner in RUN_OWNERS for f in dataclasses.fields(owner)]
    assert len(owned) == len(set(owned)) == len(RUN_KEYS)
    for owner in RUN_OWNERS:
        assert dataclasses.is_dataclass(owner) and owner.__dataclass_params__.frozen
        for field in dataclasses.fields(owner):
            assert isinstance(field.metadata["kind"], Kind) and field.metadata["doc"], field.name
            assert field.default is not dataclasses.MISSING, field.name


def test_a_missing_or_null_key_reads_as_its_default_and_a_value_as_its_reader_takes_it(lavis_ready):
    from blip2_internlm.run_config import RunSettings

    run = RunSettings.read(
        OmegaConf.create({"init_lr": "3e-3", "max_iters": 2e4, "keep_last_n": None, "feature_cache": {"enabled": True}})
    )
    assert run.optimizer.init_lr == 3e-3 and run.runner.max_iters == 20000 and isinstance(run.runner.max_iters, int)
    assert run.checkpoints.keep_last_n is None and run.checkpoints.save_every_iters == 0
    assert run.runner.seed == 42 and run.runner.train_splits == () and run.data.bad_samples == "skip"
    assert run.feature_cache.enabled and run.feature_cache.views == 1 and run.feature_cache.dtype == "fp16"
    assert RunSettings.read({}).feature_cache is None


def test_docs_list_every_run_key_as_the_classes_define_it(lavis_ready):
    from blip2_internlm.run_config import RUN_KEYS, markdown

    page = (REPO / "docs" / "run_config.md").read_text()
    assert page == markdown(), "regenerate: python -m blip2_internlm.run_config > docs/run_config.md"
    assert all(f"| `{key}` |" in page for key in RUN_KEYS)


def test_values_are_accepted_in_the_forms_their_readers_take(lavis_ready):
    assert (
        problems_of(
            {
                "init_lr": "3e-3",  # a string to YAML 1.1; LAVIS reads it with float()
                "weight_decay": 0,
                "max_iters": 2e4,  # a float to OmegaConf; LAVIS reads it with int()
                "accum_grad_iters": "2",  # LAVIS reads it with int()
                "batch_size_train": 8,  # what --options run.batch_size_train=8 gives
                "grad_clip_norm": "1.0",
                "max_bad_sample_fraction": 0,
                "resume": False,
                "save_every_iters": None,
            }
        )
        == []
    )
    assert problems_of({"resume": "auto", "keep_last_n": None, "device": "cuda:1", "prompt": ""}) == []


def test_every_problem_is_reported_at_once(lavis_ready):
    from blip2_internlm.run_config import RunConfigError, validate_run_config

    with pytest.raises(RunConfigError) as raised:
        validate_run_config({"batch_size_train": "abc", "amp": "yes", "max_epochs": 2})
    assert isinstance(raised.value, ValueError)
    assert [p.split(" ")[0] for p in raised.value.problems] == ["run.batch_size_train", "run.amp", "run.max_epochs"]
    assert str(raised.value).splitlines() == raised.value.problems


def test_a_resume_checkpoint_must_exist_unless_it_is_a_url(lavis_ready, tmp_path):
    missing = tmp_path / "checkpoint_3.pth"
    (problem,) = problems_of({"resume_ckpt_path": str(missing)})
    assert problem.startswith(f"run.resume_ckpt_path = '{missing}'") and "an existing checkpoint file" in problem
    missing.write_bytes(b"")
    assert problems_of({"resume_ckpt_path": str(missing)}) == []
    assert problems_of({"resume_ckpt_path": "https://example.com/checkpoint.pth", "resume": None}) == []


def test_cuda_is_refused_only_where_the_machine_has_none(lavis_ready):
    from blip2_internlm.run_config import RunConfigError, check_device_available

    check_device_available({"device": "cpu"})
    if torch.cuda.is_available():
        with pytest.raises(RunConfigError, match=r"run.device = 'cuda:\d+' but this machine has \d+ CUDA devices"):
            check_device_available({"device": f"cuda:{torch.cuda.device_count()}"})
    else:
        with pytest.raises(RunConfigError, match="no CUDA device; pass --options run.device=cpu"):
            check_device_available({"device": "cuda"})
    # a GPU config still validates here: the planner reads them on machines without one
    assert problems_of({"device": "cuda"}) == []


def _keys_read(path, patterns) -> set:
    text = path.read_text()
    return {m.group(1) for pattern in patterns for m in re.finditer(pattern, text)} - {"get"}


def test_every_run_setting_that_lavis_or_this_package_reads_is_in_the_table(lavis_ready):
    from blip2_internlm.run_config import RUN_KEYS

    run_cfg = [r"run_cfg\.get\(\s*[\"'](\w+)[\"']", r"run_cfg\.(\w+)"]
    run_alias = [  # `run = cfg.run_cfg`, and the planner's _run_value(run, key, default)
        r"(?<![\w.])run\.get\(\s*[\"'](\w+)[\"']",
        r"(?<![\w.])run\.(\w+)",
        r"_run_value\(\s*run,\s*\"(\w+)\"",
    ]
    dist_args = [r"(?<![\w.])args\.get\(\s*[\"'](\w+)[\"']", r"(?<![\w.])args\.(\w+)"]
    lavis = installed_lavis_dir()
    read = set()
    for path in [*lavis.glob("runners/*.py"), *lavis.glob("tasks/*.py"), *lavis.glob("common/*.py")]:
        read |= _keys_read(path, run_cfg)
    read |= _keys_read(lavis / "tasks" / "vqa_reading_comprehension.py", [r"self\.config\[[\"'](\w+)[\"']\]"])
    read |= _keys_read(lavis / "common" / "dist_utils.py", dist_args)
    for path in (REPO / "blip2_internlm").rglob("*.py"):
        if "cfg.run" in path.read_text():  # `run` is the run: section there
            read |= _keys_read(path, run_cfg + run_alias)
    read |= _keys_read(REPO / "blip2_internlm" / "compat" / "distributed.py", dist_args)
    assert {"batch_size_train", "resume_ckpt_path", "dist_url", "feature_cache", "internal_bsz_fid"} <= read
    assert read - set(RUN_KEYS) == set()


def test_lavis_config_refuses_a_bad_run_section_as_it_is_built(lavis_ready):
    from lavis.common.config import Config

    from blip2_internlm.compat.config import run_config_validated_at_start
    from blip2_internlm.run_config import RunConfigError

    run_config_validated_at_start()  # in force after `import blip2_internlm`; applying it again is a no-op
    config = str(REPO / "configs/tiny/pretrain_stage2.yaml")
    args = SimpleNamespace(cfg_path=config, options=["run.batch_size_train=abc"])
    with pytest.raises(RunConfigError, match=r"^run.batch_size_train = 'abc': expected an integer >= 1$"):
        Config(args)
    args.options = ["run.batch_size_train=8", "run.init_lr=3e-3"]
    assert Config(args).run_cfg.batch_size_train == 8


def test_training_with_a_bad_run_setting_stops_before_anything_is_built(tmp_path):
    result = run_python(
        "-m",
        "blip2_internlm.train",
        "--cfg-path",
        str(REPO / "configs/tiny/pretrain_stage2.yaml"),
        "--options",
        "run.batch_size_train=abc",
        cwd=tmp_path,
        timeout=180,
    )
    assert result.returncode != 0
    config = REPO / "configs/tiny/pretrain_stage2.yaml"
    expected = f"{config} with --options: run.batch_size_train = 'abc': expected an integer >= 1"
    assert result.stderr.strip().splitlines()[-1] == expected
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # no output/ job directory, no feature cache
    assert "Running Parameters" not in result.stdout + result.stderr  # the config was never even printed


def test_lavis_own_train_script_stops_at_the_config_too(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(LAVIS_STYLE_TRAIN_PY)
    result = run_python(
        str(script),
        "--cfg-path",
        str(REPO / "configs/tiny/pretrain_stage2.yaml"),
        "--options",
        "run.batch_size_train=abc",
        env={"BLIP2_INTERNLM_AUTOLOAD": "1"},
        cwd=tmp_path,
        timeout=180,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].endswith("run.batch_size_train = 'abc': expected an integer >= 1")
    assert "config built" not in result.stdout
