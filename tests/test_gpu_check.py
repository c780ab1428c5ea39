"""`make gpu-check` (blip2_internlm/tools/gpu_check.py): the script prepared for a borrowed GPU runs nowhere else,
lists its checks without one, uses only commands, options and configs that exist, and records a check
that fails, raises or overruns while the others still run.

The checks themselves need a GPU; here the runner is driven with stand-in checks."""

import json
import re
import time

import pytest
from spec_helpers import run_python

#: The checks, in the order the GPU run takes them.
CHECK_ORDER = [
    "amp_fp16_nan",
    "bf16_step",
    "qlora_step",
    "compiled_decode",
    "feature_cache_gpu",
    "export_gpu",
    "plan_measure_real",
    "bench_real",
]


def test_without_cuda_the_command_exits_2_saying_so_and_writes_nothing(lavis_ready, tmp_path, capsys):
    import torch

    from blip2_internlm.tools.gpu_check import main

    out = tmp_path / "out"
    if torch.cuda.is_available():  # hide the GPU from a fresh interpreter
        result = run_python("-m", "blip2_internlm.tools.gpu_check", "--out", str(out), env={"CUDA_VISIBLE_DEVICES": ""})
        code, stderr = result.returncode, result.stderr
    else:
        code, stderr = main(["--out", str(out)]), capsys.readouterr().err
    assert code == 2
    assert "no CUDA device: make gpu-check needs a GPU; --dry-run lists the checks" in stderr
    assert not out.exists()


def test_dry_run_lists_every_check_in_order_with_its_budget_and_exits_0(lavis_ready, capsys):
    from blip2_internlm.tools.gpu_check import main

    assert main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    listed = re.findall(r"^ *\d+\. (\w+) \((\d+) s\)", out, re.M)
    assert [name for name, _ in listed] == ["prepare", *CHECK_ORDER]
    assert all(int(budget) > 0 for _, budget in listed)
    assert "MISSING" not in out and "0 problem(s)" in out
    # what the checks run is shown, the real sizes included
    assert "python -m blip2_internlm.tools.bench --size real --device cuda" in out
    assert "pretrain_stage2_internlm2_1.8b.yaml --measure --device cuda" in out


def test_the_budgets_fit_the_eight_minutes_of_one_gpu_run():
    from blip2_internlm.tools.gpu_check import CHECKS, PREPARE_BUDGET_S, STARTUP_ALLOWANCE_S, TOTAL_BUDGET_S

    assert [check.name for check in CHECKS] == CHECK_ORDER
    assert TOTAL_BUDGET_S <= 8 * 60
    assert STARTUP_ALLOWANCE_S + PREPARE_BUDGET_S + sum(check.budget_s for check in CHECKS) <= TOTAL_BUDGET_S


def test_every_command_option_config_and_function_the_checks_use_exists(lavis_ready):
    from blip2_internlm.tools.gpu_check import CHECKS, Command

    references = [reference for check in CHECKS for reference in check.uses("cuda")]
    problems = [problem for reference in references for problem in reference.problems()]
    assert problems == []
    # the command lines the GPU run starts are among them, so a renamed option of any of them fails above
    modules = {reference.module for reference in references if isinstance(reference, Command)}
    assert modules == {
        "blip2_internlm.train",
        "blip2_internlm.tools.export",
        "blip2_internlm.tools.plan",
        "blip2_internlm.tools.bench",
    }


def test_a_renamed_option_an_unknown_choice_and_a_missing_config_are_named(lavis_ready, tmp_path):
    from blip2_internlm.tools.gpu_check import Command, ConfigWithOptions, ModelOverrides, Uses

    renamed = Command("blip2_internlm.tools.bench", ("--size", "real", "--batchsize", "8"))
    assert renamed.problems() == [
        f"python -m blip2_internlm.tools.bench has no option --batchsize (its options: {_options_of(renamed)})"
    ]
    (problem,) = Command("blip2_internlm.tools.bench", ("--size", "huge")).problems()
    assert problem.startswith("python -m blip2_internlm.tools.bench --size huge: not one of [") and "'real'" in problem
    missing = tmp_path / "gone.yaml"
    assert Command("blip2_internlm.tools.plan", ("--cfg-path", str(missing))).problems() == [
        f"config file {missing} does not exist"
    ]
    assert ConfigWithOptions(missing, ()).problems() == [f"config file {missing} does not exist"]
    from blip2_internlm.tools.gpu_check import TINY_STAGE2

    (problem,) = ConfigWithOptions(TINY_STAGE2, ("run.amps=True",)).problems()
    assert "run.amps is not a known setting; did you mean run.amp?" in problem
    (problem,) = ModelOverrides((("decode_compiled", True),)).problems()
    assert "decode_compiled" in problem
    assert Uses("blip2_internlm.tools.bench.SECTIONS", ("ours", "everything")).problems() == [
        "blip2_internlm.tools.bench.SECTIONS has no everything"
    ]
    assert Uses("blip2_internlm.runner.guarded_step").problems() == [
        "blip2_internlm.runner.guarded_step does not exist"
    ]


def _options_of(command):
    from blip2_internlm.tools.gpu_check import cli_options

    return ", ".join(sorted(cli_options(command.module)))


# --- the runner, with stand-in checks -------------------------------------------------------------------


def passes(ctx):
    ctx.numbers["answer"] = 42
    return "as it should be"


def raises(ctx):
    ctx.numbers["before_the_error"] = 1.5
    raise RuntimeError("boom")


def misses(ctx):
    from blip2_internlm.tools.gpu_check import CheckFailed

    raise CheckFailed("measured 2, expected 1")


def overruns(ctx):
    time.sleep(10)
    return "finished anyway"


def run_stand_ins(tmp_path, checks):
    from blip2_internlm.tools.gpu_check import Check, Context, describe_machine, run_checks

    table = [Check(name, budget, f"stand-in {name}", fn) for name, budget, fn in checks]
    ctx = Context("cpu", tmp_path / "work", tmp_path / "artifacts")
    return run_checks(table, ctx, tmp_path / "out", describe_machine("cpu"))


@pytest.fixture(scope="module")
def failing_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("gpu_check")
    checks = [("first", 5, passes), ("raising", 5, raises), ("missing", 5, misses), ("slow", 0.3, overruns)]
    checks.append(("last", 5, passes))
    return run_stand_ins(tmp_path, checks)


def test_a_check_that_raises_fails_or_overruns_is_recorded_and_the_later_ones_still_run(failing_run):
    code, report, _, _ = failing_run
    assert code == 1 and report["exit_code"] == 1
    entries = report["checks"]
    assert [(e["name"], e["status"]) for e in entries] == [
        ("first", "passed"),
        ("raising", "failed"),
        ("missing", "failed"),
        ("slow", "timeout"),
        ("last", "passed"),
    ]
    raising = entries[1]
    assert raising["error"] == "RuntimeError: boom" and "raise RuntimeError" in raising["traceback"]
    assert raising["numbers"] == {"before_the_error": 1.5}  # what it measured before failing is kept
    assert entries[2]["summary"] == "measured 2, expected 1"
    assert entries[3]["seconds"] < 5  # stopped at its budget, not after its 10 s
    assert entries[4]["numbers"] == {"answer": 42} and report["passed"] == 2


def test_the_report_is_json_and_markdown_named_by_card_and_time(failing_run):
    _, report, json_path, md_path = failing_run
    assert re.fullmatch(r"cpu-rehearsal-\d{8}-\d{6}\.json", json_path.name)
    assert md_path == json_path.with_suffix(".md")
    written = json.loads(json_path.read_text(encoding="utf-8"))
    assert written["machine"]["card"].startswith("CPU rehearsal")
    assert {"torch", "cuda", "python"} <= written["machine"].keys()
    assert written["started"] and written["finished"] and written["exit_code"] == 1
    for entry in written["checks"]:
        assert {"name", "description", "budget_s", "status", "seconds", "numbers", "summary"} <= entry.keys()
    assert written["readme_lines"][-1].startswith("GPU checks on CPU rehearsal")
    markdown = md_path.read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d) \| (\w+) \| (\w+) \|", markdown, re.M)
    assert rows == [("1", "first", "passed"), ("2", "raising", "failed"), ("3", "missing", "failed")] + [
        ("4", "slow", "timeout"),
        ("5", "last", "passed"),
    ]
    assert "RuntimeError: boom" in markdown and "Lines for the README" in markdown


def test_exit_code_0_only_when_every_check_passed(tmp_path):
    code, report, _, _ = run_stand_ins(tmp_path, [("one", 5, passes), ("two", 5, passes)])
    assert code == 0 and report["passed"] == 2


def test_readme_lines_carry_the_cards_headline_numbers(tmp_path):
    def bench_real(ctx):
        ctx.numbers.update(
            size="real",
            batch=71,
            train_step=dict(
                ours_ms=120.0,
                lavis_ms=100.0,
                ours_time_vs_lavis=1.2,
                ours_peak_memory_growth_gb=9.5,
                lavis_peak_memory_growth_gb=8.0,
            ),
            vqa=dict(ours_ms=50.0, lavis_ms=100.0, ours_time_vs_lavis=0.5),
        )

    def plan_measure_real(ctx):
        ctx.numbers.update(
            config="configs/blip2_internlm/pretrain_stage2_internlm2_1.8b.yaml",
            **{"config batch": dict(batch=32, measured_gib=12.6, reserved_gib=13.0, predicted_gib=13.15, error=0.044)},
        )

    _, report, _, _ = run_stand_ins(
        tmp_path, [("bench_real", 5, bench_real), ("plan_measure_real", 5, plan_measure_real)]
    )
    bench_line, plan_line, summary = report["readme_lines"]
    assert "real size, batch 71 (planner's for 24 GiB)" in bench_line
    assert "| 100.0 | 120.0 (1.20x) | 2.00x | 9.5 GB (LAVIS 8.0 GB) |" in bench_line
    assert plan_line.startswith("| pretrain_stage2_internlm2_1.8b, the config's precision, config batch, CPU rehearsal")
    assert plan_line.endswith("| 32 | 12.60 | 13.00 | 13.15 | +4.4% |")
    assert "2/2 passed" in summary


def test_only_runs_the_named_checks_in_the_tables_order_and_refuses_unknown_names(lavis_ready, capsys):
    from blip2_internlm.tools.gpu_check import main

    assert main(["--dry-run", "--only", "bench_real,bf16_step"]) == 0
    listed = re.findall(r"^ *\d+\. (\w+) \(", capsys.readouterr().out, re.M)
    assert listed == ["prepare", "bf16_step", "bench_real"]
    with pytest.raises(SystemExit) as exit_info:
        main(["--only", "bench_fake"])
    assert exit_info.value.code == 2
    assert "unknown check(s) bench_fake" in capsys.readouterr().err
