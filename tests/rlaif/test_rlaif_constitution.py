"""Constitutional critique -> revision (SL-CAI) and principle-conditioned preferences (RL-CAI)."""

import jax
import numpy as np
import pytest
from conftest import char_score, sigmoid

from rlhf_jax.data import load_examples
from rlhf_jax.generation import SamplingParams
from rlhf_jax.rlaif import (
    Constitution,
    CritiqueRevision,
    CritiqueTemplate,
    PairwiseJudge,
    Principle,
    TextModel,
    constitutional_preferences,
    critique_revision,
    rl_cai_pairs,
    sl_cai_records,
)

# Short, character-tokenizer-friendly transcripts so everything fits 128 positions.
TEMPLATE = CritiqueTemplate(
    conversation="{prompt}",
    critique=" c:{critique_request}>",
    revision=" r:{revision_request}>",
    response_separator="",
    stop_strings=("?",),
)
CONSTITUTION = Constitution(
    principles=(
        Principle("less rude", "more polite", name="polite", preference="which is kinder"),
        Principle("any errors", "fix errors", name="correct", preference="which is right"),
        Principle("too long", "be brief", name="brief"),
    ),
    name="tiny",
)
WEIGHTS = {"c": 1.0, "d": -0.5, "e": 2.0}


@pytest.fixture(scope="module")
def policy(tokenizer, tiny_lm):
    # One length bucket (64) for every stage: one compilation of the sampler.
    return TextModel(tiny_lm, tokenizer, batch_size=4, min_bucket=64)


class TestCritiqueRevision:
    def test_rounds_principles_and_determinism(self, policy):
        prompts = ["abc>", "de>", "fgh>"]
        rng = jax.random.key(7)
        results = critique_revision(
            policy, prompts, constitution=CONSTITUTION, rng=rng, num_rounds=2,
            template=TEMPLATE, sampling=SamplingParams(max_new_tokens=4),
        )
        again = critique_revision(
            policy, prompts, constitution=CONSTITUTION, rng=rng, num_rounds=2,
            template=TEMPLATE, sampling=SamplingParams(max_new_tokens=4),
        )
        assert results == again
        drawn = CONSTITUTION.sample_indices(jax.random.split(rng, 3)[0], (3, 2))
        for i, r in enumerate(results):
            assert r.prompt == prompts[i] and r.conversation == prompts[i]
            assert r.principles == tuple(CONSTITUTION[int(j)].name for j in drawn[i])
            assert len(r.critiques) == len(r.revisions) == 2
            assert r.final_response == r.revisions[-1]
            for text in (r.initial_response, *r.critiques, *r.revisions):
                assert isinstance(text, str) and "?" not in text and text == text.strip()

    def test_zero_rounds_keeps_the_response(self, policy):
        (r,) = critique_revision(
            policy, ["ab>"], constitution=CONSTITUTION, rng=jax.random.key(0), num_rounds=0,
            template=TEMPLATE, sampling=SamplingParams(max_new_tokens=4),
        )
        assert r.revisions == () and r.final_response == r.initial_response

    def test_bad_input(self, policy):
        with pytest.raises(ValueError, match="num_rounds"):
            critique_revision(policy, ["a"], constitution=CONSTITUTION, rng=jax.random.key(0),
                              num_rounds=-1)
        with pytest.raises(TypeError, match="constitution must be a Constitution"):
            critique_revision(policy, ["a"], constitution=[], rng=jax.random.key(0))
        with pytest.raises(ValueError, match="is empty"):
            Constitution(principles=())


def _history(prompt, initial, revisions):
    return CritiqueRevision(
        prompt=prompt, conversation=f"H: {prompt} A:", initial_response=initial,
        principles=tuple("p" for _ in revisions), critiques=tuple("c" for _ in revisions),
        revisions=tuple(revisions),
    )


class TestSLCAIRecords:
    def test_records_load_as_sft(self, tmp_path):
        results = [_history("x", "bad", ["ok", "good"]), _history("y", "z", [""]),
                   _history("w", "fine", [])]
        path = tmp_path / "sl_cai.jsonl"
        records, skipped = sl_cai_records(results, path=path)
        assert skipped == {"empty_response": 1}
        assert records == [
            {"prompt": "H: x A:", "completion": " good"},
            {"prompt": "H: w A:", "completion": " fine"},
        ]
        examples, report = load_examples(str(path), format="sft")
        assert [e.completion for e in examples] == [" good", " fine"]
        assert report.num_skipped == 0


class _RecordingJudge(PairwiseJudge):
    """Delegates to a real judge and records the principles it was asked about."""

    def __init__(self, inner):
        self.inner, self.template, self.calls = inner, inner.template, []

    def judge(self, prompts, responses_1, responses_2, *, principles=None, rng=None):
        self.calls.append(list(principles))
        return self.inner.judge(prompts, responses_1, responses_2, principles=principles, rng=rng)


class TestRLCAI:
    def test_principle_draws_and_average(self, tokenizer, make_crafted, principle_template):
        judge = _RecordingJudge(
            PairwiseJudge(make_crafted(WEIGHTS, slot_bias=0.4), tokenizer,
                          template=principle_template, batch_size=8)
        )
        prompts, r1, r2 = ["a>", "b>", "k>", "m>"], ["c", "dd", "e", "c"], ["d", "e", "c", "cd"]
        rng = jax.random.key(3)
        out = constitutional_preferences(
            judge, prompts, r1, r2, constitution=CONSTITUTION, rng=rng, num_principles=3
        )
        drawn = CONSTITUTION.sample_indices(jax.random.split(rng)[0], (3, 4))
        assert judge.calls == [
            [CONSTITUTION[int(i)].preference_question for i in row] for row in drawn
        ]
        assert out.per_labeler.shape == (3, 4) and out.report.num_labelers == 3
        d = np.array([char_score(a, WEIGHTS) - char_score(b, WEIGHTS) for a, b in zip(r1, r2)])
        expected = 0.5 * (sigmoid(d + 0.4) + 1 - sigmoid(-d + 0.4))
        # The crafted judge ignores the principle text, so every draw agrees with the mean.
        np.testing.assert_allclose(out.preference, expected, atol=1e-6)
        assert out.report.labeler_kappa == pytest.approx(1.0)

    def test_rl_cai_pairs_from_revisions(self, tmp_path, tokenizer, make_crafted, principle_template):
        judge = PairwiseJudge(make_crafted(WEIGHTS), tokenizer, template=principle_template)
        results = [_history("x", "d", ["e"]), _history("y", "c", ["c"]), _history("z", "e", ["dd"])]
        path = tmp_path / "rl_cai.jsonl"
        out = rl_cai_pairs(judge, results, constitution=CONSTITUTION, rng=jax.random.key(0),
                           path=path)
        assert out.report.skipped == {"identical_responses": 1}
        assert [(r["chosen"], r["rejected"]) for r in out.records] == [("e", "d"), ("e", "dd")]
        examples, _ = load_examples(str(path), format="preference")
        assert [e.label for e in examples] == pytest.approx([r["label"] for r in out.records])

    def test_template_without_principle(self, tokenizer, make_crafted, judge_template):
        judge = PairwiseJudge(make_crafted(WEIGHTS), tokenizer, template=judge_template)
        with pytest.raises(ValueError, match="no \\{principle\\} placeholder"):
            constitutional_preferences(judge, ["p"], ["c"], ["d"], constitution=CONSTITUTION,
                                       rng=jax.random.key(0))
