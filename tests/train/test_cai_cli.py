"""`rlhf-jax cai` from the command line on tiny models and the synthetic task: SL-CAI records
that `rlhf-jax sft` reads, RL-CAI pairs that `rlhf-jax rm` reads, transcripts, counts and
errors."""

from __future__ import annotations

import json

import pytest
import yaml
from feedback_models import TEMPLATE_ARGS, write_tiny_hf

from rlhf_jax import cli
from rlhf_jax.rlaif import default_constitution
from rlhf_jax.train.cai import CAIConfig
from rlhf_jax.train.config import config_from_yaml

TRAIN_SMALL = ["--model.vocab-size", "64", "--model.hidden-size", "32", "--model.num-layers",
               "1", "--model.num-heads", "2", "--model.max-position-embeddings", "64",
               "--logging.progress", "none", "--logging.no-tensorboard",
               "--logging.every-steps", "1", "--data.synthetic", "topic", "--data.batch-size",
               "8", "--data.max-length", "64", "--data.num-eval", "0", "--num-steps", "2"]
CONSTITUTION = {"name": "tiny", "principles": [
    {"name": "short", "critique_request": "say what is long", "revision_request": "be short",
     "preference": "which is shorter?"},
    {"name": "topic", "critique_request": "say what is off topic",
     "revision_request": "stay on topic"},
]}
JUDGE_ARGS = ["--judge.template.answer-tokens", "a", "b"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cai")
    path = root / "constitution.yaml"
    path.write_text(yaml.safe_dump(CONSTITUTION))
    return {"policy": write_tiny_hf(root / "policy", seed=3),
            "judge": write_tiny_hf(root / "judge", seed=4), "constitution": str(path)}


def _summary(capsys):
    printed = capsys.readouterr().out
    return json.loads(printed[printed.index("{"):])


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _base(setup, out, n=8):
    return ["cai", "--output-dir", str(out), "--input.synthetic", "topic",
            "--input.num-examples", str(n), "--policy.source", setup["policy"],
            "--constitution", setup["constitution"], "--max-new-tokens", "6",
            "--transcript.conversation", "{prompt}", *JUDGE_ARGS]


def test_cai_revisions_then_sft_and_label(tmp_path, capsys, setup):
    out = tmp_path / "cai"
    assert cli.main([*_base(setup, out), "--num-rounds", "2", "--num-principles", "2"]) == 0
    summary = _summary(capsys)
    assert summary["num_prompts"] == summary["num_transcripts"] == 8
    assert summary["constitution"]["principles"] == ["short", "topic"]
    stages = summary["skipped_by_stage"]
    assert summary["num_sl_records"] + sum(stages.get("sl_cai", {}).values()) == 8
    assert summary["num_rl_records"] + sum(stages.get("rl_cai", {}).values()) == 8
    assert summary["judge"]["source"] == setup["policy"]  # no judge given: the policy
    transcripts = _jsonl(out / "transcripts.jsonl")
    sl = _jsonl(out / "sl_cai.jsonl")
    rl = _jsonl(out / "rl_cai.jsonl")
    assert len(sl) == summary["num_sl_records"] and len(rl) == summary["num_rl_records"]
    sl_by_prompt = {r["prompt"]: r for r in sl}
    rl_by_prompt = {r["prompt"]: r for r in rl}
    for t in transcripts:
        assert len(t["principles"]) == len(t["critiques"]) == len(t["revisions"]) == 2
        assert set(t["principles"]) <= {"short", "topic"}
        if t["sl_status"] == "record":  # the completion is the final revision after " "
            assert sl_by_prompt[t["conversation"]]["completion"] == " " + t["revisions"][-1]
        assert t["rl_response_1"] == t["initial_response"]
        assert t["rl_response_2"] == t["revisions"][-1]
        if t["rl_status"] == "record":
            record = rl_by_prompt[t["conversation"]]
            assert {record["chosen"], record["rejected"]} == {" " + t["initial_response"],
                                                              " " + t["revisions"][-1]}
            first = t["rl_preference"] >= 0.5
            assert record["chosen"] == " " + (t["initial_response"] if first
                                              else t["revisions"][-1])
    assert config_from_yaml(CAIConfig, out / "config.yaml").num_rounds == 2

    assert cli.main(["sft", "--output-dir", str(tmp_path / "sft"), *TRAIN_SMALL,
                     "--data.path", str(out / "sl_cai.jsonl")]) == 0
    sft = _summary(capsys)
    assert sft["step"] == 2 and sft["skipped_records"] == {}

    # the SL-CAI policy (a run directory, at a step) samples pairs that a preset judge labels
    assert cli.main(["label", "--output-dir", str(tmp_path / "labels"), "--input.synthetic",
                     "topic", "--input.num-examples", "8", "--policy.source",
                     f"{tmp_path / 'sft'}@2", "--sampling.max-new-tokens", "6",
                     "--judge.sources", "preset:tiny_gpt2", "--judge.tokenizer", "synthetic",
                     *TEMPLATE_ARGS]) == 0
    labels = _summary(capsys)
    assert labels["policy"]["kind"] == "run" and labels["policy"]["step"] == 2
    assert labels["judges"][0]["kind"] == "preset" and labels["num_pairs"] == 8


@pytest.mark.slow
def test_rl_cai_pairs_train_a_reward_model(tmp_path, capsys, setup):
    out = tmp_path / "cai"
    assert cli.main([*_base(setup, out, n=16), "--judge.sources", setup["judge"]]) == 0
    capsys.readouterr()
    assert cli.main(["rm", "--output-dir", str(tmp_path / "rm"), *TRAIN_SMALL, "--no-normalize",
                     "--data.path", str(out / "rl_cai.jsonl")]) == 0
    assert _summary(capsys)["step"] == 2


def test_cai_samples_without_revisions(tmp_path, capsys, setup):
    out = tmp_path / "cai"
    assert cli.main([*_base(setup, out), "--num-rounds", "0", "--rl-pairs", "samples",
                     "--judge.sources", setup["judge"]]) == 0
    summary = _summary(capsys)
    assert summary["num_transcripts"] == 0 and summary["num_sl_records"] == 0
    assert not (out / "sl_cai.jsonl").exists()
    assert summary["judge"]["source"] == setup["judge"] and summary["num_rl_pairs"] == 8
    transcripts = _jsonl(out / "transcripts.jsonl")
    assert all("initial_response" not in t for t in transcripts)
    rl = _jsonl(out / "rl_cai.jsonl")
    assert len(rl) == summary["num_rl_records"]
    for record in rl:  # raw continuations of the conversation, judged under the constitution
        t = next(t for t in transcripts if t["conversation"] == record["prompt"])
        assert {record["chosen"], record["rejected"]} == {t["rl_response_1"],
                                                          t["rl_response_2"]}


def test_default_constitution_and_too_long_prompts(tmp_path, capsys, setup):
    base = ["cai", "--input.synthetic", "topic", "--input.num-examples", "4",
            "--policy.source", setup["policy"], "--policy.max-length", "64", *JUDGE_ARGS]
    with pytest.raises(ValueError, match=r"records:0: the transcript needs up to \d+ tokens"):
        cli.main([*base, "--output-dir", str(tmp_path / "a")])
    assert cli.main([*base, "--output-dir", str(tmp_path / "b"), "--input.on-error",
                     "skip"]) == 0
    summary = _summary(capsys)
    # the packaged constitution's requests alone are longer than 64 characters
    assert summary["constitution"]["principles"] == [p.name for p in default_constitution()]
    assert summary["skipped"] == {"prompt_too_long": 4} and summary["num_sl_records"] == 0
    assert len(summary["first_skipped"]) == 4


def test_cai_config_errors(tmp_path, setup):
    with pytest.raises(ValueError, match="needs num_rounds >= 1"):
        cli.main([*_base(setup, tmp_path / "a"), "--num-rounds", "0"])
    with pytest.raises(ValueError, match="one feedback model"):
        cli.main([*_base(setup, tmp_path / "b"), "--judge.sources", setup["judge"],
                  setup["policy"]])
    with pytest.raises(ValueError, match="the judge template needs {principle}"):
        cli.main([*_base(setup, tmp_path / "c"), "--judge.template.preset", "default"])
    with pytest.raises(ValueError, match="policy.source is unset"):
        cli.main(["cai", "--output-dir", str(tmp_path / "d"), "--input.synthetic", "topic"])


def test_cai_help_lists_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["cai", "--help"])
    out = capsys.readouterr().out
    for option in ("--constitution", "--policy.source", "--num-rounds", "--critique-tokens",
                   "--transcript.conversation", "--transcript.stop-strings", "--rl-pairs",
                   "--judge.sources", "--num-principles", "--hard-labels", "--config"):
        assert option in out, option
