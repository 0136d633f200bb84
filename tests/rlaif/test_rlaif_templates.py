"""Labeler templates and constitution files."""

import json

import jax
import numpy as np
import pytest

from rlhf_jax.rlaif import (
    Constitution,
    CritiqueTemplate,
    Exemplar,
    PairwiseTemplate,
    Principle,
    ScoreTemplate,
    default_constitution,
    load_constitution,
    parse_constitution,
    placeholders,
)


class TestPlaceholders:
    def test_found_in_order(self):
        assert placeholders("{b} x {a} {b} {{literal}}") == ("b", "a")

    @pytest.mark.parametrize("text", ["{0}", "{}", "{a.b}", "{a[0]}", "{unclosed"])
    def test_rejected(self, text):
        with pytest.raises(ValueError):
            placeholders(text)


class TestPairwiseTemplate:
    def test_missing_required_placeholder(self):
        with pytest.raises(ValueError, match=r"PairwiseTemplate.query: missing required .*\{response_2\}"):
            PairwiseTemplate(preamble="p", query="{prompt} {response_1}", answer_prompt="A=")

    def test_unknown_placeholder(self):
        with pytest.raises(ValueError, match=r"unknown placeholder\(s\) \{summary\}.*allowed"):
            PairwiseTemplate(
                preamble="p",
                query="{prompt} {response_1} {response_2} {summary}",
                answer_prompt="A=",
            )
        with pytest.raises(ValueError, match="PairwiseTemplate.answer_prompt"):
            PairwiseTemplate(
                preamble="p", query="{prompt} {response_1} {response_2}", answer_prompt="{x}="
            )

    def test_bad_answer_tokens(self):
        with pytest.raises(ValueError, match="two non-empty strings"):
            PairwiseTemplate.default(answer_tokens=("1", "2", "3"))
        with pytest.raises(ValueError, match="are equal"):
            PairwiseTemplate.default(answer_tokens=("A", "A"))
        with pytest.raises(ValueError, match="Exemplar.preferred"):
            Exemplar("p", "a", "b", preferred=3)

    def test_render_without_cot(self):
        t = PairwiseTemplate(
            preamble="Pick one.",
            query="Q: {prompt}\n1: {response_1}\n2: {response_2}",
            answer_prompt="Best=",
            separator="\n",
        )
        ctx = t.render_context(prompt="hi", response_1="a", response_2="b")
        assert ctx == "Pick one.\nQ: hi\n1: a\n2: b"
        assert t.render_answer(ctx) == ctx + "\nBest="
        with pytest.raises(ValueError, match="no \\{principle\\} placeholder"):
            t.render_context(prompt="hi", response_1="a", response_2="b", principle="be nice")

    def test_render_few_shot_with_cot(self):
        t = PairwiseTemplate(
            preamble="Judge by: {principle}",
            query="Q: {prompt} | {response_1} | {response_2}",
            answer_prompt="Pref=",
            answer_tokens=("A", "B"),
            cot_prompt="Why:",
            exemplars=(Exemplar("x", "y", "z", preferred=2, rationale="z is kinder."),),
            separator="\n",
        )
        ctx = t.render_context(prompt="q", response_1="r1", response_2="r2", principle="kindness")
        assert ctx == (
            "Judge by: kindness\nQ: x | y | z\nWhy: z is kinder.\nPref=B\nQ: q | r1 | r2"
        )
        assert t.render_cot(ctx) == ctx + "\nWhy:"
        assert t.render_answer(ctx, " because.") == ctx + "\nWhy: because.\nPref="
        with pytest.raises(ValueError, match="rationale is required"):
            t.render_answer(ctx)
        with pytest.raises(ValueError, match="uses \\{principle\\} but no principle"):
            t.render_context(prompt="q", response_1="r1", response_2="r2")

    def test_presets_are_valid(self):
        assert PairwiseTemplate.default().cot_prompt is None
        assert PairwiseTemplate.default(chain_of_thought=True).cot_prompt
        c = PairwiseTemplate.constitutional()
        assert c.answer_tokens == ("A", "B") and c.uses_principle

    def test_braces_in_values_are_kept(self):
        t = PairwiseTemplate.default()
        ctx = t.render_context(prompt="{x}", response_1="{}", response_2="}{")
        assert "{x}" in ctx and "Response 1: {}" in ctx and "}{" in ctx


class TestScoreTemplate:
    def test_default_scores(self):
        t = ScoreTemplate.default()
        assert t.score_tokens == tuple(str(i) for i in range(1, 11))
        assert t.score_values == tuple(float(i) for i in range(1, 11))

    def test_missing_placeholder_and_values(self):
        with pytest.raises(ValueError, match=r"ScoreTemplate.query: missing .*\{response\}"):
            ScoreTemplate(preamble="", query="{prompt}", answer_prompt="=")
        with pytest.raises(ValueError, match="score_values is required"):
            ScoreTemplate.default(score_tokens=("bad", "good"))
        with pytest.raises(ValueError, match="2 values for 3"):
            ScoreTemplate.default(score_tokens=("a", "b", "c"), score_values=(0, 1))
        with pytest.raises(ValueError, match="duplicates"):
            ScoreTemplate.default(score_tokens=("1", "1"))

    def test_render(self):
        t = ScoreTemplate(
            preamble="Rate.", query="{prompt} -> {response}", answer_prompt="Score=",
            separator=" ",
        )
        assert t.render_answer(t.render_context(prompt="p", response="r")) == "Rate. p -> r Score="


class TestCritiqueTemplate:
    def test_render_chain(self):
        t = CritiqueTemplate()
        conv = t.render_conversation("How do I X?")
        assert conv == "Human: How do I X?\n\nAssistant:"
        c = t.render_critique_request(conv, "Like this.", "Is it harmful?")
        assert c == conv + " Like this.\n\nCritiqueRequest: Is it harmful?\n\nCritique:"
        r = t.render_revision_request(c, "It is.", "Fix it.")
        assert r == c + " It is.\n\nRevisionRequest: Fix it.\n\nRevision:"

    def test_missing_placeholder(self):
        with pytest.raises(ValueError, match=r"CritiqueTemplate.critique: missing .*critique_request"):
            CritiqueTemplate(critique="Critique:")


class TestConstitutionFiles:
    def test_default_constitution(self):
        c = default_constitution()
        assert len(c) >= 4 and c.name == "default"
        for p in c.principles:
            assert p.critique_request and p.revision_request and p.preference_question

    def test_yaml_jsonl_json_round_trip(self, tmp_path):
        entries = [
            {"name": "a", "critique_request": "crit a", "revision_request": "rev a"},
            {"critique_request": "crit b", "revision_request": "rev b", "preference": "Which?"},
        ]
        (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(e) for e in entries) + "\n\n")
        (tmp_path / "c.json").write_text(json.dumps({"name": "mine", "principles": entries}))
        import yaml

        (tmp_path / "c.yaml").write_text(yaml.safe_dump({"principles": entries}))
        for name in ("c.jsonl", "c.json", "c.yaml"):
            c = load_constitution(tmp_path / name)
            assert [p.name for p in c.principles] == ["a", "principle_1"]
            assert c[1].preference_question == "Which?"
            assert "crit a" in c[0].preference_question
        assert load_constitution(tmp_path / "c.json").name == "mine"

    @pytest.mark.parametrize(
        "name, text, message",
        [
            ("e.yaml", "", "empty"),
            ("e.yaml", "principles: []\n", "empty"),
            ("e.jsonl", "\n\n", "empty"),
            ("m.jsonl", '{"critique_request": "c"}\n', r"m.jsonl:1: field 'revision_request'"),
            (
                "u.jsonl",
                '{"critique_request": "c", "revision_request": "r"}\n'
                '{"critique_request": "c", "revision_request": "r", "foo": 1}\n',
                r"u.jsonl:2: unknown field\(s\) \['foo'\]",
            ),
            ("b.jsonl", "{not json\n", r"b.jsonl:1: invalid JSON"),
            ("w.yaml", "principles:\n  - critique_request: ''\n    revision_request: r\n",
             "principle 0: field 'critique_request'"),
            ("x.txt", "hello", "unsupported constitution format"),
        ],
    )
    def test_bad_files(self, tmp_path, name, text, message):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ValueError, match=message) as info:
            load_constitution(path)
        assert name in str(info.value)

    def test_in_memory_validation(self):
        with pytest.raises(ValueError, match="empty"):
            Constitution(principles=())
        with pytest.raises(ValueError, match="duplicate principle names"):
            Constitution(principles=(Principle("c", "r", name="x"), Principle("c", "r", name="x")))
        with pytest.raises(ValueError, match="revision_request must be a non-empty"):
            Principle("c", " ")
        with pytest.raises(ValueError, match="unknown top-level"):
            parse_constitution({"rules": []})

    def test_seeded_principle_draws(self):
        c = default_constitution()
        a = c.sample_indices(jax.random.key(0), (50, 3))
        b = c.sample_indices(jax.random.key(0), (50, 3))
        np.testing.assert_array_equal(a, b)
        assert a.shape == (50, 3) and a.min() >= 0 and a.max() < len(c)
        assert len(np.unique(a)) > 1
