"""The GPT-2 TPU pipeline file, shrunk to a tiny committed GPT-2 checkpoint and a few HH-format
rows, runs every stage end to end on CPU: SFT -> export -> reward model (from the SFT export)
-> DPO -> PPO against the trained reward model, with the value model initialised from it."""

import gzip
import json
import pathlib
import random

import numpy as np
import pytest
import yaml

from experiments import pipeline, prepare_hh

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = REPO / "experiments" / "configs" / "gpt2_small_hh_v4-8.yaml"
TINY_GPT2 = REPO / "tests" / "fixtures" / "hf" / "gpt2"


def _hh_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = ["cat", "dog", "sun", "sea", "tree", "map", "red", "blue"]
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.sample(words, 2))
        rows.append({"chosen": f"\n\nHuman: {prompt}?\n\nAssistant: {rng.choice(words)} yes",
                     "rejected": f"\n\nHuman: {prompt}?\n\nAssistant: no"})
    return rows


def _shrink(config: dict, data_dir: pathlib.Path) -> dict:
    """The same stages and options with CPU sizes: the tiny checkpoint, 2 steps per stage."""
    defaults = config["defaults"]
    defaults["model"] = {"path": str(TINY_GPT2), "dtype": "float32", "param_dtype": "float32"}
    defaults["logging"] = {"every_steps": 1, "tensorboard": False, "progress": "none"}
    defaults["checkpoint"] = {"every_steps": 2, "keep_last": 1}
    defaults["optimizer"]["warmup_steps"] = 1
    for stage in config["stages"]:
        c = stage["config"]
        if stage["command"] == "export":
            continue
        c["num_steps"] = 2
        c.pop("eval_every", None)
        data = c["data"]
        for key in ("path", "eval_path"):
            if key in data:
                data[key] = str(data_dir / pathlib.Path(data[key]).name)
        data.update(batch_size=8, max_length=48, max_prompt_length=24)
        data.pop("buckets", None)
        c.get("model", {}).update(dtype="float32")
        if stage["command"] == "ppo":
            c["rollout"]["max_new_tokens"] = 8
            c.update(num_minibatches=1, num_epochs=1)
    return config


# Every stage of the chain: test-slow. test_pipeline.py keeps a stage run through the CLI, and tests/multihost runs the whole chain on 2 processes on the emulated bucket in test-slow too.
@pytest.mark.slow
def test_gpt2_pipeline_runs_every_stage_on_a_tiny_checkpoint(tmp_path):
    src = tmp_path / "train.jsonl.gz"
    with gzip.open(src, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in _hh_rows(48, seed=0)) + "\n")
    data_dir = tmp_path / "data"
    for split in ("train", "test"):
        assert prepare_hh.convert([src], data_dir, split=split)["written"] == 48
    config = _shrink(yaml.safe_load(CONFIG.read_text()), data_dir)
    stages = [s["name"] for s in config["stages"]]
    assert stages == ["sft", "sft_hf", "rm", "dpo", "ppo"]
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"

    assert pipeline.main(["--config", str(path), "--output-dir", str(out)]) == 0

    assert (out / "sft_hf" / "config.json").is_file()
    assert (out / "sft_hf" / "tokenizer.json").is_file()
    for stage in ("sft", "rm", "dpo", "ppo"):
        rows = [json.loads(line) for line in (out / stage / "metrics.jsonl").open()]
        assert [r["step"] for r in rows if "step" in r][-1] == 2, stage
        written = yaml.safe_load((out / stage / "config.yaml").read_text())
        if stage != "sft":
            assert written["model"]["path"] == str(out / "sft_hf"), stage
    ppo = yaml.safe_load((out / "ppo" / "config.yaml").read_text())
    reward = ppo["reward"]
    assert (reward["source"], reward["path"], reward["head"]) == ("model", str(out / "rm"), None)
    last = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").open()][-1]
    for name in ("ppo/score_mean", "ppo/kl_ref", "ppo/value_loss", "ppo/kl_coef"):
        assert np.isfinite(last[name]), name
    # the reward model's scores vary across responses (a trained head, not a constant)
    assert last["ppo/score_std"] > 0
