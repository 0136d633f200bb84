"""Llama 2 rating -> margin mapping: the scales, the record path into the batch's `margin`, the
reward-model loss that reads it, and `rlhf-jax rm --use-margin --data.margin-field ...`."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from rlhf_jax import cli
from rlhf_jax.data import RATING_SCALES, RatingMargins, RecordError, load_examples
from rlhf_jax.data.synthetic import build_tokenizer, get_task
from rlhf_jax.models import RewardModel
from rlhf_jax.train.builders import model_config
from rlhf_jax.train.config import DataSpec, ModelSpec
from rlhf_jax.train.data import build_data
from rlhf_jax.train.rm import RMHyperParams, rm_loss

RATINGS = ("significantly better", "better", "slightly better", "negligibly better / unsure")


def _write_pairs(path, ratings, *, field="rating", seed=0):
    task = get_task("topic")
    rng = np.random.default_rng(seed)
    prompts = task.sample_prompts(rng, len(ratings))
    rejected = task.sample_responses(rng, prompts)
    with open(path, "w") as f:
        for prompt, bad, rating in zip(prompts, rejected, ratings):
            record = {"prompt": prompt, "chosen": task.reference_response(prompt),
                      "rejected": bad}
            if rating is not None:
                record[field] = rating
            f.write(json.dumps(record) + "\n")
    return path


class TestScales:
    def test_llama2_table_27(self):
        small = [RATING_SCALES["llama2_small"][r] for r in RATINGS]
        large = [RATING_SCALES["llama2_large"][r] for r in RATINGS]
        np.testing.assert_allclose(small, [1.0, 2 / 3, 1 / 3, 0.0], rtol=0, atol=1e-15)
        assert large == [3.0, 2.0, 1.0, 0.0]
        for scale in RATING_SCALES.values():  # either half of the combined rating
            assert scale["negligibly better"] == scale["unsure"] == 0.0

    def test_spellings_and_integer_codes(self):
        margins = RatingMargins.from_scale("r", scale="llama2_large")
        for spelling in ("Significantly Better", "significantly_better", "  significantly-better",
                         "SIGNIFICANTLY\tbetter"):
            assert margins.margin({"r": spelling}, "x:1") == 3.0
        coded = RatingMargins.from_scale("r", table={"3": 1.5, "0": 0.0})
        assert coded.margin({"r": 3}, "x:1") == 1.5
        assert coded.margin({"r": np.int64(0)}, "x:1") == 0.0

    def test_user_table_replaces_the_scale(self):
        margins = RatingMargins.from_scale("r", scale="llama2_large", table={"much better": 2.5})
        assert dict(margins.table) == {"much better": 2.5}
        with pytest.raises(RecordError, match="not one of the known ratings"):
            margins.margin({"r": "better"}, "x:1")

    @pytest.mark.parametrize(
        "record, reason, message",
        [
            ({"r": "way better"}, "bad_value", "has rating 'way better'"),
            ({"other": "better"}, "missing_field", "missing rating field 'r'"),
            ({"r": None}, "missing_field", "missing rating field 'r'"),
            ({"r": 0.5}, "bad_type", "must hold a rating string"),
            ({"r": True}, "bad_type", "must hold a rating string"),
        ],
    )
    def test_bad_ratings_name_origin_and_field(self, record, reason, message):
        with pytest.raises(RecordError, match=message) as info:
            RatingMargins.from_scale("r").margin(record, "pairs.jsonl:7")
        assert info.value.reason == reason
        assert str(info.value).startswith("pairs.jsonl:7: ")

    def test_invalid_tables(self):
        with pytest.raises(ValueError, match="unknown rating scale 'llama3'"):
            RatingMargins.from_scale("r", scale="llama3")
        with pytest.raises(ValueError, match="map to different margins"):
            RatingMargins("r", {"Better": 1.0, "better": 2.0})
        with pytest.raises(ValueError, match="must be finite"):
            RatingMargins("r", {"better": float("nan")})
        with pytest.raises(ValueError, match="non-empty string"):
            RatingMargins("", {"better": 1.0})


class TestRecords:
    def test_ratings_become_margins(self, tmp_path):
        path = _write_pairs(tmp_path / "p.jsonl", RATINGS)
        margins = RatingMargins.from_scale("rating", scale="llama2_large")
        examples, report = load_examples(str(path), format="preference", rating_margins=margins)
        assert report.num_loaded == 4
        assert [e.margin for e in examples] == [3.0, 2.0, 1.0, 0.0]
        plain, _ = load_examples(str(path), format="preference")
        assert [e.margin for e in plain] == [0.0] * 4  # without the mapping: the margin field

    def test_rating_replaces_a_numeric_margin(self, tmp_path):
        path = tmp_path / "p.jsonl"
        path.write_text(json.dumps({"prompt": "a>", "chosen": "ab", "rejected": "cd",
                                    "margin": 7.0, "rating": "better"}) + "\n")
        (example,), _ = load_examples(str(path), format="preference",
                                      rating_margins=RatingMargins.from_scale("rating"))
        assert example.margin == pytest.approx(2 / 3)

    def test_unknown_rating_raises_with_file_line_and_field(self, tmp_path):
        path = _write_pairs(tmp_path / "p.jsonl", ["better", "slightly better", "meh"])
        with pytest.raises(RecordError, match=r"p\.jsonl:3: field 'rating' has rating 'meh'"):
            load_examples(str(path), format="preference",
                          rating_margins=RatingMargins.from_scale("rating"))

    def test_skip_counts_unknown_and_missing_ratings(self, tmp_path):
        path = _write_pairs(tmp_path / "p.jsonl", ["better", "meh", None, "unsure", "??"])
        examples, report = load_examples(str(path), format="preference", on_error="skip",
                                         rating_margins=RatingMargins.from_scale("rating"))
        assert [e.margin for e in examples] == pytest.approx([2 / 3, 0.0])
        assert report.skipped == {"bad_value": 2, "missing_field": 1}
        assert report.first_skipped[0].startswith(f"{path}:2: field 'rating'")

    def test_hh_transcripts(self, tmp_path):
        path = tmp_path / "hh.jsonl"
        path.write_text(json.dumps({
            "chosen": "\n\nHuman: hi\n\nAssistant: hello there",
            "rejected": "\n\nHuman: hi\n\nAssistant: go away",
            "strength": "Slightly Better"}) + "\n")
        (example,), _ = load_examples(str(path), format="hh",
                                      rating_margins=RatingMargins.from_scale("strength"))
        assert example.margin == pytest.approx(1 / 3)


class TestTrainingPath:
    def test_batch_margin_and_rm_loss(self, tmp_path):
        ratings = RATINGS * 2
        path = _write_pairs(tmp_path / "p.jsonl", ratings)
        tokenizer = build_tokenizer()
        spec = DataSpec(path=str(path), synthetic="topic", batch_size=8, shuffle=False,
                        max_length=48, num_eval=0, margin_field="rating",
                        rating_scale="llama2_large")
        data = build_data(spec, format="preference", tokenizer=tokenizer, seed=0)
        batch = next(iter(data.train))
        expected = [RATING_SCALES["llama2_large"][r] for r in ratings]
        np.testing.assert_array_equal(np.sort(batch["margin"]), np.sort(expected))

        model = RewardModel(model_config(ModelSpec(preset="tiny_gpt2", vocab_size=64,
                                                   hidden_size=32, num_layers=1, num_heads=2)),
                            rngs=nnx.Rngs(0))
        @nnx.jit
        def loss_and_rewards(model, batch):
            loss, _ = rm_loss(model, batch, hp=RMHyperParams(use_margin=True, margin_scale=0.5,
                                                         soft_labels=False))
            rewards = [model(batch[f"{p}input_ids"], attention_mask=batch[f"{p}attention_mask"],
                             positions=batch[f"{p}positions"])[:, 0]
                       for p in ("chosen_", "rejected_")]
            return loss, *rewards

        loss, chosen, rejected = loss_and_rewards(model, {k: jnp.asarray(v)
                                                          for k, v in batch.items()})
        z = (np.asarray(chosen, np.float64) - np.asarray(rejected, np.float64)
             - 0.5 * np.asarray(batch["margin"], np.float64))
        np.testing.assert_allclose(float(loss), np.mean(np.log1p(np.exp(-z))), rtol=2e-5)

    def test_margin_field_needs_preference_records(self):
        spec = DataSpec(synthetic="topic", margin_field="rating", num_eval=0)
        with pytest.raises(ValueError, match="does not apply to 'ranking' records"):
            build_data(spec, format="ranking", tokenizer=build_tokenizer(), seed=0)


SMALL = ["--model.vocab-size", "64", "--model.hidden-size", "32", "--model.num-layers", "1",
         "--model.num-heads", "2", "--model.max-position-embeddings", "64",
         "--logging.progress", "none", "--logging.no-tensorboard", "--logging.every-steps", "1",
         "--data.synthetic", "topic", "--data.batch-size", "8", "--data.max-length", "48",
         "--data.num-eval", "0", "--no-normalize"]


def test_rm_cli_reads_rating_margins(tmp_path, capsys):
    path = _write_pairs(tmp_path / "p.jsonl", RATINGS * 4)
    out = tmp_path / "rm"
    args = ["rm", "--output-dir", str(out), "--num-steps", "2", *SMALL, "--data.path", str(path),
            "--data.margin-field", "rating", "--data.rating-margins", "significantly better",
            "4", "better", "3", "slightly better", "2", "negligibly better / unsure", "0"]
    with pytest.raises(ValueError, match="set --use-margin"):
        cli.main(args)
    assert cli.main([*args, "--use-margin"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{"):])
    assert summary["step"] == 2
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["data"]["margin_field"] == "rating"
    assert written["data"]["rating_margins"]["better"] == 3.0
