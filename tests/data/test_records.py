"""Record validation and bad input: errors name file, line and problem; skips are counted."""

import json
import logging

import pytest

from rlhf_jax import data as D
from rlhf_jax.data import synthetic as S

CONV_PROMPT = [{"role": "user", "content": "hi"}]


def _conv(text):
    return [{"role": "assistant", "content": text}]


class TestParse:
    def test_preference_strings_and_options(self):
        ex = D.parse_record(
            {"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2, "label": 0.8, "extra": 1},
            format="preference",
            origin="o",
        )
        assert ex == D.PreferenceExample("p", "a", "b", margin=2.0, label=0.8, origin="o")

    def test_preference_scores_give_margin(self):
        ex = D.parse_record(
            {"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 8, "score_rejected": 5.5},
            format="preference",
            origin="o",
        )
        assert ex.margin == 2.5

    def test_preference_conversations(self):
        ex = D.parse_record(
            {"prompt": CONV_PROMPT, "chosen": _conv("yes"), "rejected": _conv("no")},
            format="preference",
            origin="o",
        )
        assert ex.prompt == tuple(CONV_PROMPT) and ex.chosen == tuple(_conv("yes"))

    def test_implicit_prompt(self):
        ex = D.parse_record(
            {"chosen": CONV_PROMPT + _conv("yes"), "rejected": CONV_PROMPT + _conv("no")},
            format="preference",
            origin="o",
        )
        assert ex.prompt == tuple(CONV_PROMPT) and ex.rejected == tuple(_conv("no"))
        ex = D.parse_record(
            {"chosen": "The sky is blue.", "rejected": "The sky is green."},
            format="preference",
            origin="o",
        )
        assert (ex.prompt, ex.chosen, ex.rejected) == ("The sky is ", "blue.", "green.")

    def test_sft_variants(self):
        a = D.parse_record({"prompt": "p", "completion": "c"}, format="sft", origin="o")
        assert (a.prompt, a.completion, a.messages) == ("p", "c", None)
        b = D.parse_record({"messages": CONV_PROMPT + _conv("x")}, format="sft", origin="o")
        assert b.messages == tuple(CONV_PROMPT + _conv("x"))
        c = D.parse_record({"text": "all of it"}, format="sft", origin="o")
        assert (c.prompt, c.completion) == ("", "all of it")

    def test_ranking_kto_prompt(self):
        r = D.parse_record(
            {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [2, 0, 1]}, format="ranking", origin="o"
        )
        assert r.ranks == (2, 0, 1) and r.responses == ("a", "b", "c")
        k = D.parse_record({"prompt": "p", "completion": "c", "label": 0}, format="kto", origin="o")
        assert k.label is False
        p = D.parse_record({"prompt": "p", "target": 3}, format="prompt", origin="o")
        assert p.fields == {"target": 3}


BAD = [
    ("preference", {"prompt": "p", "chosen": "a"}, "missing_field", "missing field 'rejected'"),
    ("preference", {"prompt": "p", "chosen": " ", "rejected": "b"}, "empty_response", "'chosen' is empty"),
    ("preference", {"prompt": "p", "chosen": "a", "rejected": "a"}, "identical_responses", "identical"),
    ("preference", {"prompt": "p", "chosen": 3, "rejected": "a"}, "bad_type", "'chosen' must be"),
    ("preference", {"prompt": "p", "chosen": "a", "rejected": "b", "label": 1.5}, "bad_value", "'label'"),
    ("preference", {"prompt": "p", "chosen": "a", "rejected": "b", "margin": float("nan")}, "bad_value", "'margin'"),
    ("preference", {"prompt": "p", "chosen": _conv("a"), "rejected": "b"}, "bad_type", "all be strings"),
    ("preference", {"chosen": "same prefix", "rejected": "same prefix and more"}, "empty_response", "implicit prompt"),
    ("sft", {"prompt": "p"}, "missing_field", "missing field 'completion'"),
    ("sft", {"foo": 1}, "missing_field", "'prompt' and 'completion', 'messages' or 'text'"),
    ("sft", {"messages": CONV_PROMPT}, "missing_assistant_turn", "no assistant turn"),
    ("sft", {"messages": [{"role": "robot", "content": "x"}]}, "bad_value", "allowed roles"),
    ("ranking", {"prompt": "p", "responses": ["a", "b"], "ranks": [0]}, "bad_value", "'ranks' has 1"),
    ("ranking", {"prompt": "p", "responses": ["a", "b"], "ranks": [0, 2]}, "bad_value", r"ranks\[1\]=2"),
    ("ranking", {"prompt": "p", "responses": ["a", "b"], "ranks": [0, "x"]}, "bad_value", r"ranks\[1\]='x'"),
    ("ranking", {"prompt": "p", "responses": ["a", "a"], "ranks": [0, 1]}, "identical_responses", "duplicates"),
    ("ranking", {"prompt": "p", "responses": ["a", ""], "ranks": [0, 1]}, "empty_response", r"responses\[1\]"),
    ("kto", {"prompt": "p", "completion": "c", "label": "yes"}, "bad_value", "'label' must be a boolean"),
    ("prompt", {"prompt": ""}, "empty_response", "'prompt' is empty"),
    ("prompt", ["not", "a", "dict"], "bad_type", "must be a JSON object"),
]


@pytest.mark.parametrize(("fmt", "record", "reason", "message"), BAD)
def test_bad_record_names_origin_problem_and_reason(fmt, record, reason, message):
    with pytest.raises(D.RecordError, match=message) as e:
        D.parse_record(record, format=fmt, origin="data.jsonl:42")
    assert e.value.reason == reason
    assert str(e.value).startswith("data.jsonl:42: ")


def test_unknown_format():
    with pytest.raises(ValueError, match="unknown format 'dpo'; choose one of"):
        D.parse_record({}, format="dpo", origin="o")


def _write_bad_jsonl(path):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    lines = [
        json.dumps(good).encode(),  # 1
        b'{"prompt": "p", "chosen": "a"',  # 2 undecodable JSON
        json.dumps({"prompt": "p", "chosen": "a"}).encode(),  # 3 missing rejected
        b"",  # 4 blank line: not a row
        json.dumps({"prompt": "p", "chosen": "", "rejected": "b"}).encode(),  # 5 empty
        json.dumps({"prompt": "p", "chosen": "a", "rejected": "a"}).encode(),  # 6 identical
        b'{"prompt": "\xff\xfe", "chosen": "a", "rejected": "b"}',  # 7 not UTF-8
        json.dumps({**good, "chosen": "x" * 300}).encode(),  # 8 over-long once tokenized
        json.dumps(good).encode(),  # 9
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")


class TestBadFiles:
    def test_raise_names_file_and_line(self, tmp_path):
        path = tmp_path / "prefs.jsonl"
        _write_bad_jsonl(path)
        with pytest.raises(D.RecordError, match=rf"^{path}:2: invalid JSON") as e:
            D.load_examples(path, format="preference")
        assert e.value.reason == "undecodable"

    def test_each_problem_names_its_line(self, tmp_path):
        path = tmp_path / "prefs.jsonl"
        _write_bad_jsonl(path)
        _, report = D.load_examples(path, format="preference", on_error="skip")
        joined = "\n".join(report.first_skipped)
        for line, problem in [
            (2, "invalid JSON"),
            (3, "missing field 'rejected'"),
            (5, "field 'chosen' is empty"),
            (6, "chosen and rejected are identical"),
            (7, "line is not valid UTF-8"),
        ]:
            assert f"{path}:{line}: {problem}" in joined

    def test_skip_counts_every_row(self, tmp_path, caplog):
        path = tmp_path / "prefs.jsonl"
        _write_bad_jsonl(path)
        tok = S.build_tokenizer()
        with caplog.at_level(logging.WARNING, logger="rlhf_jax.data"):
            loader, report = D.make_loader(
                path,
                format="preference",
                tokenizer=tok,
                batch_config=D.BatchConfig(batch_size=1),
                tokenize_config=D.TokenizeConfig(max_completion_length=100, overlong="skip"),
                on_error="skip",
                shard_index=0,
                shard_count=1,
            )
        assert report.num_read == 8  # the blank line is not a row
        assert report.skipped == {
            "undecodable": 2,
            "missing_field": 1,
            "empty_response": 1,
            "identical_responses": 1,
            "overlong": 1,
        }
        assert report.num_loaded == 2 == report.num_read - report.num_skipped
        assert loader.num_examples == 2
        assert "skipped 6" in caplog.text and str(path) in caplog.text
        assert any(f"{path}:8: the completion has 301 tokens" in s for s in report.first_skipped)

    def test_overlong_error_names_line(self, tmp_path):
        path = tmp_path / "prefs.jsonl"
        _write_bad_jsonl(path)
        examples, _ = D.load_examples(path, format="preference", on_error="skip")
        with pytest.raises(D.RecordError, match=rf"^{path}:8: the completion has 301 tokens, more than 100"):
            D.tokenize_examples(
                examples,
                S.build_tokenizer(),
                config=D.TokenizeConfig(max_completion_length=100, overlong="error"),
            )

    def test_missing_file(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="no such file"):
            D.load_examples(tmp_path / "nope.txt", format="sft")
