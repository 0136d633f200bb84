"""The Constitutional AI pipeline file (SL-CAI -> RM on AI labels -> RL-CAI with PPO): its stages
chain through each other's outputs and validate against their commands' configs; shrunk to
tiny models and the synthetic task, it runs every stage end to end on CPU (slow)."""

import json
import pathlib

import numpy as np
import pytest
import yaml

from experiments import pipeline

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = REPO / "experiments" / "configs" / "gpt2_small_cai_v4-8.yaml"
STAGES = ["sft", "sft_hf", "sl_cai_data", "sl_cai", "sl_cai_hf", "rl_cai_data", "rm", "ppo"]
CONSTITUTION = {"name": "tiny", "principles": [
    {"name": "short", "critique_request": "say what is long", "revision_request": "be short",
     "preference": "which is shorter?"},
    {"name": "topic", "critique_request": "say what is off topic",
     "revision_request": "stay on topic", "preference": "which is on topic?"},
]}


def test_stages_chain_sl_cai_then_rm_on_ai_labels_then_rl_cai():
    p = pipeline.load_pipeline(CONFIG, output_dir="out")
    pipeline.validate(p)
    stages = {s.name: s.config for s in p.stages}
    assert list(stages) == STAGES
    # SL-CAI: the helpful model critiques and revises; the revisions fine-tune it
    assert stages["sl_cai_data"]["policy"]["source"] == "out/sft"
    assert stages["sl_cai_data"]["num_rounds"] >= 1
    assert stages["sl_cai"]["data"]["path"] == "out/sl_cai_data/sl_cai.jsonl"
    assert stages["sl_cai"]["model"]["path"] == "out/sft_hf"
    assert stages["sl_cai_hf"]["run_dir"] == "out/sl_cai"
    # RL-CAI data: samples of the SL-CAI model labelled by a feedback model under principles
    rl = stages["rl_cai_data"]
    assert rl["policy"]["source"] == "out/sl_cai" and rl["rl_pairs"] == "samples"
    assert rl["num_rounds"] == 0 and rl["judge"]["sources"] == ["out/sft"]
    assert rl["judge"]["template"]["preset"] == "constitutional"
    # the preference model on the AI labels, then PPO of the SL-CAI model against it
    assert stages["rm"]["data"]["path"] == "out/rl_cai_data/rl_cai.jsonl"
    assert stages["rm"]["model"]["path"] == "out/sl_cai_hf"
    assert stages["ppo"]["model"]["path"] == "out/sl_cai_hf"
    assert stages["ppo"]["reward"] == {"source": "model", "path": "out/rm"}
    # the data-making stages take no training defaults
    for name in ("sl_cai_data", "rl_cai_data"):
        assert "optimizer" not in stages[name] and "model" not in stages[name]


def _shrink(config: dict, constitution: str) -> dict:
    """The same stages with CPU sizes: a tiny GPT-2 on the synthetic task's character tokenizer,
    a two-principle constitution, 2 steps per training stage."""
    config["defaults"] = {
        "seed": 0,
        "model": {"preset": "tiny_gpt2", "vocab_size": 64, "hidden_size": 32, "num_layers": 1,
                  "num_heads": 2, "max_position_embeddings": 256, "dtype": "float32",
                  "param_dtype": "float32"},
        "optimizer": {"learning_rate": 1.0e-3, "warmup_steps": 1},
        "checkpoint": {"every_steps": 2, "keep_last": 1},
        "logging": {"every_steps": 1, "tensorboard": False, "progress": "none"},
    }
    small = {"batch_size": 8, "max_length": 64, "max_prompt_length": 32}
    for stage in config["stages"]:
        c = stage["config"]
        if stage["command"] == "export":
            continue
        if stage["command"] == "cai":
            c.update(constitution=constitution, max_new_tokens=6, mesh={})
            c["input"] = {"synthetic": "topic", "num_examples": 32}
            c["policy"] = {"source": c["policy"]["source"], "batch_size": 8}
            if "judge" in c:
                c["judge"].update(batch_size=8)
                c["judge"]["template"]["answer_tokens"] = ["a", "b"]
                c["num_principles"] = 2
            continue
        c["num_steps"] = 2
        data = c["data"]
        if stage["name"] == "sft":
            c["data"] = {"synthetic": "topic", "num_eval": 0, **small}
        elif stage["command"] == "ppo":
            c["data"] = {"synthetic": "topic", "format": "prompt", "num_eval": 0, **small}
            c["rollout"]["max_new_tokens"] = 8
            c.update(num_minibatches=1, num_epochs=1)
        else:
            data.update(small)
            data.pop("buckets", None)
        c.get("model", {}).update(dtype="float32")
    return config


@pytest.mark.slow
def test_cai_pipeline_runs_every_stage_at_tiny_size(tmp_path):
    constitution = tmp_path / "constitution.yaml"
    constitution.write_text(yaml.safe_dump(CONSTITUTION))
    config = _shrink(yaml.safe_load(CONFIG.read_text()), str(constitution))
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"

    assert pipeline.main(["--config", str(path), "--output-dir", str(out)]) == 0

    sl = [json.loads(line) for line in (out / "sl_cai_data" / "sl_cai.jsonl").open()]
    rl = [json.loads(line) for line in (out / "rl_cai_data" / "rl_cai.jsonl").open()]
    assert sl and all({"prompt", "completion"} <= set(r) for r in sl)
    assert rl and all(0.5 <= r["label"] <= 1.0 and r["chosen"] != r["rejected"] for r in rl)
    sl_summary = json.loads((out / "sl_cai_data" / "summary.json").read_text())
    rl_summary = json.loads((out / "rl_cai_data" / "summary.json").read_text())
    assert sl_summary["num_prompts"] == 32 and sl_summary["num_sl_records"] == len(sl)
    assert rl_summary["num_rl_pairs"] == 32 and rl_summary["num_rl_records"] == len(rl)
    for stage in ("sft", "sl_cai", "rm", "ppo"):
        rows = [json.loads(line) for line in (out / stage / "metrics.jsonl").open()]
        assert [r["step"] for r in rows if "step" in r][-1] == 2, stage
    assert (out / "sl_cai_hf" / "config.json").is_file()
    ppo = yaml.safe_load((out / "ppo" / "config.yaml").read_text())
    assert ppo["model"]["path"] == str(out / "sl_cai_hf")
    assert ppo["reward"]["source"] == "model" and ppo["reward"]["path"] == str(out / "rm")
    last = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").open()][-1]
    for name in ("ppo/score_mean", "ppo/kl_ref", "ppo/gold_reward"):
        assert np.isfinite(last[name]), name
