"""`rlhf-jax label` from the command line and from YAML on tiny models and the synthetic task:
its outputs, counts and errors, and the reward-model and DPO trainers reading its labels."""

from __future__ import annotations

import json

import pytest
import yaml
from feedback_models import QUERY, TEMPLATE_ARGS, write_tiny_hf

from rlhf_jax import cli
from rlhf_jax.train.config import config_from_yaml
from rlhf_jax.train.label import LabelConfig

TRAIN_SMALL = ["--model.vocab-size", "64", "--model.hidden-size", "32", "--model.num-layers",
               "1", "--model.num-heads", "2", "--model.max-position-embeddings", "64",
               "--logging.progress", "none", "--logging.no-tensorboard",
               "--logging.every-steps", "1", "--data.synthetic", "topic", "--data.batch-size",
               "8", "--data.max-length", "48", "--data.num-eval", "0", "--num-steps", "2"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return write_tiny_hf(root / "judge_a", seed=1), write_tiny_hf(root / "judge_b", seed=2)


def _summary(capsys):
    printed = capsys.readouterr().out
    return json.loads(printed[printed.index("{"):])


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_label_pairs_then_train_a_reward_model(tmp_path, capsys, models):
    out = tmp_path / "labels"
    args = ["label", "--output-dir", str(out), "--input.synthetic", "topic",
            "--input.format", "preference", "--input.num-examples", "16",
            "--judge.sources", *models, *TEMPLATE_ARGS]
    assert cli.main(args) == 0
    summary = _summary(capsys)
    assert summary["num_read"] == summary["num_pairs"] == summary["num_judged"] == 16
    labels_skipped = sum(summary["skipped_by_stage"].get("labels", {}).values())
    assert summary["num_records"] + labels_skipped == 16
    assert summary["labelers"] == list(models)
    for kind in ("human", "gold"):  # simulated raters' labels and the task's gold
        report = summary[kind]["consensus"]
        assert 0.0 <= report["alignment"] <= 1.0 and report["num_compared"] >= 1
        assert set(summary[kind]["labelers"]) == set(models)
    kappa = summary["fleiss_kappa"]  # two labelers; None when every vote is in one category
    assert kappa is None or -1.0 <= kappa <= 1.0
    records = _jsonl(out / "preferences.jsonl")
    assert len(records) == summary["num_records"]
    assert all(set(r) == {"prompt", "chosen", "rejected", "label"} for r in records)
    assert all(0.5 <= r["label"] <= 1.0 for r in records)
    judgements = _jsonl(out / "judgements.jsonl")
    assert len(judgements) == 16 and all("human" in j and "gold" in j for j in judgements)
    assert sum(j["status"] == "record" for j in judgements) == len(records)
    assert json.loads((out / "summary.json").read_text()) == summary
    assert config_from_yaml(LabelConfig, out / "config.yaml").judge.sources == tuple(models)

    # the same output directory is refused without --overwrite: one line, exit 1
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "rlhf-jax label: error:" in err and "--overwrite" in err
    assert "Traceback" not in err

    rm_out = tmp_path / "rm"
    assert cli.main(["rm", "--output-dir", str(rm_out), *TRAIN_SMALL, "--no-normalize",
                     "--data.path", str(out / "preferences.jsonl")]) == 0
    rm_summary = _summary(capsys)
    assert rm_summary["step"] == 2 and rm_summary["skipped_records"] == {}


@pytest.mark.slow
def test_labels_train_dpo(tmp_path, capsys, models):
    out = tmp_path / "labels"
    assert cli.main(["label", "--output-dir", str(out), "--input.synthetic", "topic",
                     "--input.format", "preference", "--input.num-examples", "16",
                     "--judge.sources", models[0], *TEMPLATE_ARGS, "--hard-labels"]) == 0
    assert all(r["label"] == 1.0 for r in _jsonl(out / "preferences.jsonl"))
    capsys.readouterr()
    assert cli.main(["dpo", "--output-dir", str(tmp_path / "dpo"), *TRAIN_SMALL,
                     "--data.path", str(out / "preferences.jsonl")]) == 0
    assert _summary(capsys)["step"] == 2


def test_label_policy_samples_from_yaml(tmp_path, capsys, models):
    """Prompts + policy samples; chain of thought, one few-shot exemplar, two judges under two
    principles by majority, no position debiasing; from a YAML file plus an override."""
    shots = tmp_path / "shots.yaml"
    shots.write_text(yaml.safe_dump({"exemplars": [
        {"prompt": "ab>", "response_1": "abab", "response_2": "zz", "preferred": 1,
         "rationale": "on topic"},
        {"prompt": "cd>", "response_1": "q", "response_2": "cdc", "preferred": 2}]}))
    out = tmp_path / "labels"
    config = {
        "output_dir": str(out),
        "input": {"synthetic": "topic", "num_examples": 8},
        "policy": {"source": models[0]},
        "sampling": {"max_new_tokens": 6},
        "judge": {
            "sources": list(models),
            "position_debias": False,
            "rationale_tokens": 4,
            "template": {"preamble": "{principle}", "query": QUERY, "answer_prompt": "=",
                         "answer_tokens": ["a", "b"], "separator": "", "chain_of_thought": True,
                         "cot_prompt": "?", "exemplars": str(shots), "num_exemplars": 1},
        },
        "principles": ["on topic", "short"],
        "consensus": "majority",
    }
    path = tmp_path / "label.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["label", "--config", str(path), "--seed", "3"]) == 0
    summary = _summary(capsys)
    assert summary["num_pairs"] == 8 and summary["policy"]["source"] == models[0]
    assert len(summary["labelers"]) == 4 and summary["human"] is None
    assert summary["gold"] is not None and not summary["position_debias"]
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["seed"] == 3 and written["judge"]["template"]["num_exemplars"] == 1
    judgements = _jsonl(out / "judgements.jsonl")
    judged = [j for j in judgements if "labelers" in j]
    assert len(judged) == summary["num_judged"]
    for j in judged:
        for lab in j["labelers"].values():
            assert lab["preference"] == lab["forward"]  # no debiasing: the given order's
            assert len(lab["rationales"]) == 2  # chain of thought in both orders
        votes = [1.0 if p > 0.5 else 0.0 if p < 0.5 else 0.5
                 for p in (lab["preference"] for lab in j["labelers"].values())]
        assert j["preference"] == pytest.approx(sum(votes) / 4, abs=1e-12)  # majority
    counted = summary["num_records"] + sum(summary["skipped_by_stage"].get("labels",
                                                                           {}).values())
    assert counted == summary["num_judged"]


def test_too_long_pairs_are_counted_or_raise(tmp_path, capsys, models):
    base = ["label", "--input.synthetic", "topic", "--input.format", "preference",
            "--input.num-examples", "8", "--judge.sources", models[0], *TEMPLATE_ARGS,
            "--judge.max-length", "40"]
    with pytest.raises(ValueError, match=r"records:\d+: the judge prompt has \d+ tokens, more "
                                         r"than the judge's max_length=40"):
        cli.main([*base, "--output-dir", str(tmp_path / "a")])
    assert cli.main([*base, "--output-dir", str(tmp_path / "b"), "--input.on-error",
                     "skip"]) == 0
    summary = _summary(capsys)
    too_long = summary["skipped_by_stage"]["judging"]["judge_prompt_too_long"]
    assert 1 <= too_long < 8 and summary["num_judged"] == 8 - too_long
    assert all("judge prompt" in s for s in summary["first_skipped"][:too_long])
    statuses = [j["status"] for j in _jsonl(tmp_path / "b" / "judgements.jsonl")]
    assert statuses.count("judge_prompt_too_long") == too_long
    # nothing fits: an empty dataset, every pair accounted for
    base[-1] = "12"
    assert cli.main([*base, "--output-dir", str(tmp_path / "c"), "--input.on-error",
                     "skip"]) == 0
    summary = _summary(capsys)
    assert summary["num_judged"] == summary["num_records"] == 0
    assert summary["skipped"] == {"judge_prompt_too_long": 8}
    assert (tmp_path / "c" / "preferences.jsonl").read_text() == ""


def test_label_config_errors(tmp_path, models):
    with pytest.raises(ValueError, match="judge.sources is empty"):
        cli.main(["label", "--output-dir", str(tmp_path), "--input.synthetic", "topic"])
    with pytest.raises(ValueError, match="needs policy.source"):
        cli.main(["label", "--output-dir", str(tmp_path), "--input.synthetic", "topic",
                  "--judge.sources", models[0]])
    with pytest.raises(ValueError, match="is neither a training run directory"):
        cli.main(["label", "--output-dir", str(tmp_path / "x"), "--input.synthetic", "topic",
                  "--input.format", "preference", "--judge.sources", str(tmp_path)])
    with pytest.raises(ValueError, match=r"weights has 1 entries for 4 labelers \(2 judges x 2"):
        cli.main(["label", "--output-dir", str(tmp_path / "w"), "--input.synthetic", "topic",
                  "--input.format", "preference", "--judge.sources", *models,
                  "--principles", "p", "q", "--weights", "1"])
    with pytest.raises(ValueError, match="is a preset: set judge.tokenizer"):
        cli.main(["label", "--output-dir", str(tmp_path / "y"), "--input.synthetic", "topic",
                  "--input.format", "preference", "--judge.sources", "preset:tiny_gpt2"])


def test_label_help_lists_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["label", "--help"])
    out = capsys.readouterr().out
    for option in ("--input.path", "--input.format", "--policy.source", "--sampling.top-p",
                   "--judge.sources", "--judge.position-debias", "--judge.template.exemplars",
                   "--judge.template.chain-of-thought", "--principles", "--constitution",
                   "--consensus", "--weights", "--hard-labels", "--min-confidence",
                   "--overwrite", "--config"):
        assert option in out, option
