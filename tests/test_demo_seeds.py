"""``python -m blip2_internlm.tools.demo``: --seeds runs every seed into its own directory and aggregates their
metrics; --seed keeps the one-run layout; the LLM is taken from the cache under its recipe digest;
the per-question VQA breakdown names the yes/no answers given."""

import argparse
import json

import pytest

from blip2_internlm.tools import demo


def fake_summary(seed):
    """Metrics that differ by seed, so mean, spread, minimum and maximum are all checked."""
    base = {metric: float(seed) for metric in demo.SEED_METRICS}
    return {**base, "vqa_yes_no": 50.0 + seed, "yes_no_answers": {"no": 100 - seed, "yes": seed}, "mean_load": 1.5}


@pytest.fixture
def fake_pipeline(monkeypatch, tmp_path):
    """The demo with its stages replaced: records which seeds ran where."""
    calls = []
    llm = tmp_path / "cache" / "llm"
    llm.mkdir(parents=True)
    (llm / "config.json").write_text("{}")

    def pretrained_llm(hidden, layers, log, use_cache=True):
        calls.append(("llm", hidden, layers, use_cache))
        return llm, {"seconds": 1.0, "cached": True, "cache_name": "demo-llm-test", "text_qa": {}, "curve": []}

    def run_seed(output, lang, seed, llm_dir, nproc):
        calls.append(("seed", seed, output, llm_dir))
        return {"lang": lang, "seed": seed, "stages": {}, "summary": fake_summary(seed)}

    monkeypatch.setattr(demo, "pretrained_llm", pretrained_llm)
    monkeypatch.setattr(demo, "run_seed", run_seed)
    monkeypatch.setattr(demo, "report_html", lambda result, output: f"<p>seed {result['seed']}</p>")
    return calls


def test_seeds_parse_as_a_comma_separated_list():
    assert demo.parse_seeds("42,1,2") == [42, 1, 2]
    assert demo.parse_seeds("7") == [7]
    for bad in ("42,x", "", "1,1", "-1,2"):
        with pytest.raises(argparse.ArgumentTypeError, match="--seeds"):
            demo.parse_seeds(bad)


def test_seed_and_seeds_cannot_be_given_together(fake_pipeline, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--seed", "1", "--seeds", "1,2", "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert fake_pipeline == []


def test_seeds_run_one_directory_each_with_one_llm_and_aggregate(fake_pipeline, tmp_path):
    out = tmp_path / "out"
    result = demo.main(["--lang", "en", "--seeds", "42,1,2", "--output", str(out)])

    assert [c for c in fake_pipeline if c[0] == "llm"] == [("llm", 128, 3, True)]  # pretrained once
    seeds = [c for c in fake_pipeline if c[0] == "seed"]
    assert [(seed, path) for _, seed, path, _ in seeds] == [(s, out / f"seed-{s}") for s in (42, 1, 2)]
    for _, seed, path, llm_dir in seeds:
        assert llm_dir == path / "llm" and (llm_dir / "config.json").is_file()  # where make app looks
        assert json.loads((path / "result.json").read_text())["seed"] == seed
        assert (path / "report.html").read_text() == f"<p>seed {seed}</p>"

    on_disk = json.loads((out / "result.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert on_disk["seeds"] == [42, 1, 2] and on_disk["lang"] == "en"
    assert set(on_disk["per_seed"]) == {"42", "1", "2"}
    yes_no = on_disk["aggregate"]["vqa_yes_no"]
    assert yes_no == {"mean": 65.0, "std": pytest.approx(23.39, abs=0.01), "min": 51.0, "max": 92.0}

    report = (out / "report.html").read_text()
    for seed in (42, 1, 2):
        assert f'href="seed-{seed}/report.html"' in report
    for row in ("<th>mean</th>", "<th>std</th>", "<th>min</th>", "<th>max</th>"):
        assert row in report
    assert "vqa_yes_no" in report and "&quot;no&quot;: 58" in report


def test_one_seed_keeps_the_one_run_layout(fake_pipeline, tmp_path):
    out = tmp_path / "out"
    demo.main(["--seed", "7", "--output", str(out), "--rebuild-llm"])
    assert [c[:2] for c in fake_pipeline] == [("llm", 128), ("seed", 7)]
    assert fake_pipeline[0][3] is False  # --rebuild-llm bypasses the cache
    _, _, path, llm_dir = fake_pipeline[1]
    assert path == out and llm_dir == out / "llm"
    result = json.loads((out / "result.json").read_text())
    assert result["seed"] == 7 and "llm_pretraining" in result["stages"] and "total_seconds" in result["summary"]
    assert not list(out.glob("seed-*"))


def test_a_bad_llm_size_is_a_usage_error(fake_pipeline, tmp_path, capsys):
    with pytest.raises(SystemExit):
        demo.main(["--llm", "128", "--output", str(tmp_path)])
    assert "--llm '128'" in capsys.readouterr().err


def test_aggregate_gives_mean_sample_std_min_and_max():
    runs = {seed: {"summary": {"caption_exact_match": value}} for seed, value in ((1, 90.0), (2, 96.0), (3, 99.0))}
    stats = demo.aggregate(runs)["caption_exact_match"]
    assert stats == {"mean": 95.0, "std": pytest.approx(4.58, abs=0.01), "min": 90.0, "max": 99.0}
    assert demo.aggregate({1: {"summary": {"caption_exact_match": 90.0}}})["caption_exact_match"]["std"] == 0.0


def test_the_llm_comes_from_the_cache_named_by_its_recipe(monkeypatch, tmp_path):
    from blip2_internlm.tiny.pretrain_text import recipe_digest

    monkeypatch.setenv("BLIP2_INTERNLM_CACHE", str(tmp_path / "cache"))
    builds = []

    def fake_build(command, log):
        out = command[command.index("--out") + 1]
        builds.append(out)
        (demo.Path(out) / "pretraining.json").write_text(
            json.dumps({"losses": [2.0, 1.0], "text_qa": {"en": {"exist_yes": 100.0}}, "settings": {}})
        )
        return ""

    monkeypatch.setattr(demo, "run_logged", fake_build)
    first, record = demo.pretrained_llm(64, 2, tmp_path / "logs" / "llm.log")
    again, record_again = demo.pretrained_llm(64, 2, tmp_path / "logs" / "llm.log")
    assert first == again == tmp_path / "cache" / f"demo-llm-64x2-{recipe_digest(64, 2)}"
    assert len(builds) == 1 and (record["cached"], record_again["cached"]) == (False, True)
    assert record["text_qa"] == {"en": {"exist_yes": 100.0}}
    demo.pretrained_llm(128, 3, tmp_path / "logs" / "llm.log")
    assert len(builds) == 2  # another size, another recipe


def test_vqa_breakdown_names_the_answers_given_to_yes_no_questions(monkeypatch, tmp_path):
    from blip2_internlm.datasets.shapes import generate_shapes

    generator = {"seed": 0, "train": 2, "val": 0, "test": 6, "image_size": 32, "max_objects": 1}
    monkeypatch.setattr(demo, "GENERATOR", generator)
    monkeypatch.setenv("BLIP2_INTERNLM_CACHE", str(tmp_path / "cache"))
    root = demo.default_data_root(demo.generator_args(generator))
    generate_shapes(root, **demo.generator_args(generator))
    questions = json.loads((demo.Path(root) / "annotations" / "vqa_en_test.json").read_text())
    # every answer right except the yes/no ones, all answered "no"
    answers = [
        {"question_id": q["question_id"], "answer": "no" if q["answer"][0] in ("yes", "no") else q["answer"][0]}
        for q in questions
    ]
    job = tmp_path / "job"
    (job / "result").mkdir(parents=True)
    (job / "result" / "test_vqa_result.json").write_text(json.dumps(answers))

    accuracy, yes_no = demo.vqa_by_question(job, "en")
    assert accuracy == {"color": 100.0, "shape": 100.0, "position": 100.0, "exist": 50.0, "count": 100.0}
    assert yes_no == {"no": 6}
