"""Real-model pipeline files resolve and validate; the runner runs a stage; HH conversion."""

import gzip
import json
import pathlib

import pytest
import yaml

from experiments import pipeline, prepare_hh

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "experiments" / "configs").glob("*.yaml"))
SWEEPS = [p for p in CONFIGS if "_sweeps" in p.stem]
# SFT -> RM -> DPO and PPO, one run per stage
SINGLE_RUNS = [p for p in CONFIGS if "_hh_" in p.stem and p not in SWEEPS]


def test_every_model_and_slice_has_a_config():
    names = {p.stem for p in CONFIGS}
    assert {"gpt2_small_hh_v4-8", "gpt2_small_hh_v5e-8", "llama3.2-1b_hh_v4-8",
            "llama3.2-1b_hh_v5e-8", "llama3.2-1b_hh_v4-32"} <= names


def _strings(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _strings(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _strings(v)
    elif isinstance(tree, str):
        yield tree


@pytest.mark.parametrize("path", SINGLE_RUNS, ids=lambda p: p.stem)
def test_config_resolves(path):
    p = pipeline.load_pipeline(path, output_dir="out")
    stages = {s.name: s for s in p.stages}
    assert list(stages) == ["sft", "sft_hf", "rm", "dpo", "ppo"]
    for s in p.stages:
        assert s.config["output_dir"] == f"out/{s.name}"
        assert not any("{" in x for x in _strings(s.config)), s.name
    assert stages["sft_hf"].config == {"run_dir": "out/sft", "output_dir": "out/sft_hf"}
    for name in ("rm", "dpo", "ppo"):
        assert stages[name].config["model"]["path"] == "out/sft_hf"
        # Defaults are merged under the stage's own values.
        assert stages[name].config["model"]["dtype"] == "bfloat16"
        assert "mesh" in stages[name].config
    assert stages["ppo"].config["reward"] == {"source": "model", "path": "out/rm"}
    assert p.meta["hardware"].startswith("TPU ")


def test_sweep_config_runs_the_three_figures_sweeps():
    path = REPO / "experiments" / "configs" / "gpt2_small_hh_sweeps_v4-8.yaml"
    assert path in SWEEPS
    p = pipeline.load_pipeline(path, output_dir="out")
    stages = {s.name: s for s in p.stages}
    by_command = {}
    for s in p.stages:
        by_command.setdefault(s.command, []).append(s)
        assert s.config["output_dir"] == f"out/{s.name}"
        assert not any("{" in x for x in _strings(s.config)), s.name
    # Figure 1: reward models on nested subsets of the pairs, all scored on one held-out set.
    rm_files = [s.config["data"]["path"] for s in by_command["rm"]]
    assert len(set(rm_files)) == len(rm_files) >= 3
    assert {s.config["data"]["eval_path"] for s in by_command["rm"]} == {
        "data/hh-rlhf/preference_test.jsonl"}
    # Figure 2: DPO over several betas and PPO over several KL coefficients, on one proxy.
    assert len({s.config["beta"] for s in by_command["dpo"]}) >= 3
    ppo_kls = [s.config["kl_coef"] for s in by_command["ppo"]]
    assert len(set(ppo_kls)) == len(ppo_kls) >= 4
    assert {s.config["reward"]["path"] for s in by_command["ppo"]} == {"out/rm_16000"}
    # Figure 3: the over-optimisation run has the smallest KL penalty and runs longest.
    overopt = stages["ppo_overopt"].config
    assert overopt["kl_coef"] == min(ppo_kls)
    assert overopt["num_steps"] == max(s.config["num_steps"] for s in by_command["ppo"])
    for s in by_command["rm"] + by_command["dpo"] + by_command["ppo"]:
        assert s.config["model"]["path"] == "out/sft_hf"
        assert s.config["model"]["dtype"] == "bfloat16"
    pipeline.validate(p)


STAGES = [(path, stage.name) for path in CONFIGS
          for stage in pipeline.load_pipeline(path).stages]


@pytest.mark.parametrize("path,stage", STAGES, ids=lambda x: getattr(x, "stem", x))
def test_stage_validates_against_its_trainer_config(path, stage):
    p = pipeline.load_pipeline(path)
    pipeline.validate(p._replace(stages=[s for s in p.stages if s.name == stage]))


def _write(tmp_path, data, name="p.yaml"):
    f = tmp_path / name
    f.write_text(yaml.safe_dump(data))
    return f


@pytest.mark.parametrize("data,needle", [
    ({"stages": []}, "'stages' must be a non-empty list"),
    ({"stages": [{"name": "a", "command": "sft"}], "extra": 1}, "unknown top-level keys"),
    ({"stages": [{"name": "a"}]}, "'name' and 'command'"),
    ({"stages": [{"name": "a", "command": "sft", "cfg": {}}]}, "unknown keys ['cfg']"),
    ({"stages": [{"name": "a", "command": "sft"}, {"name": "a", "command": "rm"}]}, "unique"),
    ({"stages": [{"name": "a", "command": "sft", "config": {"x": "{stage:b}"}}]},
     "{stage:b} names no earlier stage"),
])
def test_bad_pipeline_files(tmp_path, data, needle):
    with pytest.raises(pipeline.PipelineError) as e:
        pipeline.load_pipeline(_write(tmp_path, data))
    assert needle in str(e.value)


def test_validate_names_stage_and_field(tmp_path):
    f = _write(tmp_path, {"stages": [{"name": "s1", "command": "sft",
                                      "config": {"num_stepz": 3}}]})
    with pytest.raises(pipeline.PipelineError, match="stage 's1' \\(sft\\)") as e:
        pipeline.validate(pipeline.load_pipeline(f))
    assert "num_stepz" in str(e.value)


def test_cli_errors_and_dry_run(tmp_path, capsys):
    assert pipeline.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    f = _write(tmp_path, {"defaults": {"seed": 3},
                          "stages": [{"name": "s1", "command": "sft",
                                      "config": {"num_steps": 2}}]})
    assert pipeline.main(["--config", str(f), "--stages", "nope"]) == 2
    assert "unknown stages ['nope']" in capsys.readouterr().err
    assert pipeline.main(["--config", str(f), "--output-dir", "o", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# stage s1: rlhf-jax sft --config o/pipeline/s1.yaml")
    assert yaml.safe_load(out.split("\n", 1)[1]) == {"seed": 3, "num_steps": 2,
                                                       "output_dir": "o/s1"}


def test_runs_a_stage_through_the_cli(tmp_path):
    f = _write(tmp_path, {
        "defaults": {"seed": 0, "model": {"preset": "tiny_gpt2"},
                     "logging": {"tensorboard": False, "progress": "none"}},
        "stages": [{"name": "sft", "command": "sft", "config": {
            "num_steps": 2,
            "data": {"synthetic": "topic", "num_train": 16, "num_eval": 8, "batch_size": 8,
                     "max_length": 48}}}]})
    out = tmp_path / "run"
    assert pipeline.main(["--config", str(f), "--output-dir", str(out)]) == 0
    assert yaml.safe_load((out / "pipeline" / "sft.yaml").read_text())["num_steps"] == 2
    assert (out / "sft" / "config.yaml").is_file()
    assert (out / "sft" / "metrics.jsonl").is_file()


def _hh(prompt, chosen, rejected):
    return {"chosen": f"\n\nHuman: {prompt}\n\nAssistant: {chosen}",
            "rejected": f"\n\nHuman: {prompt}\n\nAssistant: {rejected}"}


def test_prepare_hh(tmp_path):
    src = tmp_path / "train.jsonl.gz"
    rows = [_hh("hi?", "hello", "go away"), _hh("hi?", "hey there", "no"),
            {"chosen": "no turns", "rejected": "no turns"}, _hh("q", "same", "same")]
    with gzip.open(src, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    counts = prepare_hh.convert([src], tmp_path / "out", split="train")
    assert counts["written"] == 2 and counts["prompts"] == 1
    assert counts["skipped/identical_responses"] == 1
    assert sum(v for k, v in counts.items() if k.startswith("skipped/")) == 2
    read = lambda k: [json.loads(x) for x in (tmp_path / "out" / f"{k}_train.jsonl").open()]
    prompt = "\n\nHuman: hi?\n\nAssistant:"
    assert read("sft") == [{"prompt": prompt, "completion": " hello"},
                           {"prompt": prompt, "completion": " hey there"}]
    assert read("preference")[1] == {"prompt": prompt, "chosen": " hey there", "rejected": " no"}
    assert read("prompt") == [{"prompt": prompt}]


def test_prepare_hh_bad_json_names_the_line(tmp_path):
    src = tmp_path / "x.jsonl"
    src.write_text(json.dumps(_hh("a", "b", "c")) + "\n{oops\n")
    with pytest.raises(ValueError, match="x.jsonl:2: not valid JSON"):
        prepare_hh.convert([src], tmp_path / "o", split="train")
    with pytest.raises(SystemExit) as e:
        prepare_hh.main(["--input", str(tmp_path / "nope.jsonl"), "--output-dir", "o"])
    assert e.value.code == 2


@pytest.mark.slow
def test_tiny_pipeline_chains_every_stage(tmp_path):
    """The stage chain of the real-model files (sft -> export -> rm -> dpo -> ppo) on a tiny
    randomly initialised model and the synthetic topic task."""
    data = {"synthetic": "topic", "num_train": 16, "num_eval": 8, "batch_size": 8,
            "max_length": 48}
    f = _write(tmp_path, {
        "defaults": {"seed": 0, "num_steps": 2, "model": {"preset": "tiny_gpt2"},
                     "logging": {"tensorboard": False, "progress": "none"}, "data": data},
        "stages": [
            {"name": "sft", "command": "sft"},
            {"name": "sft_hf", "command": "export", "inherit_defaults": False,
             "config": {"run_dir": "{stage:sft}"}},
            {"name": "rm", "command": "rm", "config": {"model": {"path": "{stage:sft_hf}"}}},
            {"name": "dpo", "command": "dpo", "config": {"model": {"path": "{stage:sft_hf}"},
                                                          "beta": 0.1}},
            {"name": "ppo", "command": "ppo", "config": {
                "num_steps": 1, "model": {"path": "{stage:sft_hf}"},
                "rollout": {"max_new_tokens": 8},
                "reward": {"source": "model", "path": "{stage:rm}"}}},
        ]})
    out = tmp_path / "run"
    assert pipeline.main(["--config", str(f), "--output-dir", str(out)]) == 0
    assert (out / "sft_hf" / "config.json").is_file()
    for stage in ("sft", "rm", "dpo", "ppo"):
        assert (out / stage / "metrics.jsonl").is_file(), stage
