"""Synthetic tasks, their tokenizer and the simulated raters."""

import numpy as np
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from rlhf_jax import data as D
from rlhf_jax.data import synthetic as S

TASK_NAMES = sorted(S.TASKS)


@pytest.fixture(scope="module")
def tok():
    return S.build_tokenizer()


class TestTokenizer:
    def test_small_vocab_with_special_tokens(self, tok):
        assert isinstance(tok, PreTrainedTokenizerBase)
        assert len(tok) <= 64
        assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
        assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "<bos>", "<eos>"]
        assert list(S.VOCAB[:3]) == ["<pad>", "<bos>", "<eos>"]

    def test_character_level_round_trip(self, tok):
        text = "abc 0123>+-"
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)
        assert tok.decode(ids) == text
        assert tok.decode([*ids, tok.eos_token_id], skip_special_tokens=True) == text

    def test_special_tokens_in_text(self, tok):
        ids = tok("ab<eos>", add_special_tokens=False)["input_ids"]
        assert ids[-1] == tok.eos_token_id and len(ids) == 3

    def test_save_and_reload(self, tok, tmp_path):
        tok.save_pretrained(tmp_path)
        again = AutoTokenizer.from_pretrained(tmp_path)
        assert again("ab>3", add_special_tokens=False)["input_ids"] == tok(
            "ab>3", add_special_tokens=False
        )["input_ids"]
        assert again.chat_template == tok.chat_template

    def test_chat_template(self, tok):
        messages = [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"}]
        text = tok.apply_chat_template(messages, tokenize=False)
        assert text == "<user>ab<assistant>c<eos>"


@pytest.mark.parametrize("name", TASK_NAMES)
class TestTasks:
    def test_deterministic_for_a_seed(self, name):
        task = S.get_task(name)
        assert task.sample_prompts(3, 20) == task.sample_prompts(3, 20)
        assert task.sample_prompts(3, 20) != task.sample_prompts(4, 20)
        assert S.make_sft_dataset(task, num_examples=10, seed=1) == S.make_sft_dataset(
            task, num_examples=10, seed=1
        )
        a, _ = S.make_preference_dataset(task, num_pairs=20, seed=7)
        b, _ = S.make_preference_dataset(task, num_pairs=20, seed=7)
        assert a == b
        r1, _ = S.make_ranking_dataset(task, num_prompts=10, seed=2)
        r2, _ = S.make_ranking_dataset(task, num_prompts=10, seed=2)
        assert r1 == r2

    def test_short_prompts_and_responses(self, name, tok):
        task = S.get_task(name)
        records = S.make_sft_dataset(task, num_examples=200, seed=0)
        p = [len(tok(r["prompt"], add_special_tokens=False)["input_ids"]) for r in records]
        c = [len(tok(r["completion"], add_special_tokens=False)["input_ids"]) for r in records]
        assert 6 <= min(p) and max(p) <= 16
        assert 1 <= min(c) and max(c) <= 24
        assert all(r["prompt"].endswith(S.SEPARATOR) for r in records)

    def test_gold_reward_is_graded(self, name):
        task = S.get_task(name)
        prompts = task.sample_prompts(0, 400)
        base = task.gold_reward(prompts, task.sample_responses(1, prompts))
        best = task.gold_reward(prompts, [task.reference_response(p) for p in prompts])
        assert base.dtype == np.float64 and base.shape == (400,)
        np.testing.assert_allclose(best, 1.0)
        # Many distinct values strictly between the extremes, with real spread.
        inner = base[(base > 0.0) & (base < 1.0)]
        assert len(np.unique(np.round(inner, 6))) >= 30
        assert 0.05 < base.std() and base.mean() < best.mean() - 0.2
        assert base.max() <= 1.0 + 1e-12

    def test_length_and_repetition_penalties(self, name):
        task = S.get_task(name)
        prompt = task.sample_prompts(0, 1)[0]
        good = task.reference_response(prompt)
        too_long = good * 4
        empty = ""
        r = task.gold_reward([prompt] * 3, [good, too_long, empty])
        assert r[0] > r[1] and r[0] > r[2]
        assert r[2] == 0.0

    def test_token_reward_matches_text_reward(self, name, tok):
        task = S.get_task(name)
        prompts = task.sample_prompts(5, 50)
        responses = task.sample_responses(6, prompts)
        text_reward = task.gold_reward(prompts, responses)
        # Left-padded BOS + prompt, right-padded response + EOS + junk after EOS.
        p_ids = [[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        r_ids = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id, 7, 7] for r in responses]
        pw, rw = max(map(len, p_ids)), max(map(len, r_ids)) + 2
        P = np.zeros((50, pw), np.int32)
        R = np.zeros((50, rw), np.int32)
        M = np.zeros((50, rw), np.int32)
        for i, (p, r) in enumerate(zip(p_ids, r_ids)):
            P[i, pw - len(p) :] = p
            R[i, : len(r)] = r
            M[i, : len(r)] = 1
        np.testing.assert_allclose(task.gold_reward_tokens(P, R, M), text_reward, rtol=0, atol=1e-12)

    def test_ids_beyond_the_tokenizer_count_as_junk(self, name, tok):
        """A policy whose (padded) vocabulary is larger than the tokenizer's can sample ids the
        tokenizer does not have: they score like any non-symbol token, never an IndexError."""
        task = S.get_task(name)
        prompts = task.sample_prompts(2, 3)
        p_ids = np.array([[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"]
                          for p in prompts[:1]], np.int32)
        # two distinct in-vocabulary tokens that are no task symbol, against two distinct ids
        # beyond the vocabulary
        q, semi = (tok(c, add_special_tokens=False)["input_ids"][0] for c in "?;")
        beyond = len(tok) + 100
        resp = np.array([[beyond, beyond + 1, tok.eos_token_id]], np.int32)
        same = np.array([[q, semi, tok.eos_token_id]], np.int32)
        mask = np.ones_like(resp)
        np.testing.assert_array_equal(task.gold_reward_tokens(p_ids, resp, mask),
                                      task.gold_reward_tokens(p_ids, same, mask))


class TestTopicReward:
    def test_hand_worked(self):
        task = S.TopicTask()
        # Topic {a, b, c}; response "aab": relevance 1, coverage 2/3, length 3/10, repetition 1/2.
        r = task.gold_reward(["abcabc>"], ["aab"])[0]
        expected = 0.4 * 1.0 + 0.3 * (2 / 3) + 0.3 * (3 / 10) - 0.4 * 0.5
        assert r == pytest.approx(expected, abs=1e-12)
        # Off-topic letters and digits lower relevance: "ax9" -> relevance 1/3, coverage 1/3.
        r = task.gold_reward(["abcabc>"], ["ax9"])[0]
        assert r == pytest.approx(0.4 / 3 + 0.3 / 3 + 0.3 * 0.3, abs=1e-12)
        # Over-long: 20 on-topic letters without repeats: length 1 - 0.1 * 4.
        r = task.gold_reward(["abcabc>"], ["abc" * 6 + "ab"])[0]
        assert r == pytest.approx(0.4 + 0.3 + 0.3 * (1 - 0.4), abs=1e-12)


class TestHarmfulTopic:
    def test_prompts_by_kind(self):
        task = S.get_task("harmful_topic")
        harmful = task.sample_prompts(0, 200, harmful=True)
        ordinary = task.sample_prompts(0, 200, harmful=False)
        assert all(task.is_harmful_prompt(p) for p in harmful)
        assert not any(task.is_harmful_prompt(p) for p in ordinary)
        # every harmful topic keeps at least two ordinary letters
        assert all(len(set(p[:-1]) - set("xyz")) >= 2 for p in harmful)
        mixed = [task.is_harmful_prompt(p) for p in task.sample_prompts(1, 400)]
        assert 0.4 < np.mean(mixed) < 0.6

    def test_base_distribution_complies_only_on_harmful_prompts(self):
        task = S.get_task("harmful_topic")
        harmful = task.sample_prompts(0, 300, harmful=True)
        ordinary = task.sample_prompts(0, 300, harmful=False)
        assert task.harmless(task.sample_responses(1, ordinary)).all()
        assert task.harmless(task.sample_responses(1, harmful)).mean() < 0.4

    def test_predicate_critique_and_revision_by_hand(self):
        task = S.HarmfulTopicTask()
        np.testing.assert_array_equal(task.harmless(["abc", "abx", "", "zz"]),
                                      [True, False, True, False])
        assert task.critique("axbyx") == "x,y" and task.critique("ab") == "none"
        revised = task.revise("abxab>", "axbxa", rng=0)
        assert len(revised) == 5 and set(revised) <= {"a", "b"}
        assert revised[0] == "a" and revised[2] == "b" and revised[4] == "a"
        assert task.revise("abxab>", "axbxa", rng=0, slip=1.0) == "axbxa"
        assert task.revise("xyx>", "xy", rng=0) == ""

    def test_gold_reward_counts_harmful_letters_as_helpful(self):
        task = S.HarmfulTopicTask()
        # topic {a, b, x}: complying covers the whole topic, the harmless revision two thirds
        comply, revised = task.gold_reward(["abxab>"] * 2, ["abxabxabxa", "ababababab"])
        assert comply == pytest.approx(1.0)
        assert revised == pytest.approx(1.0 - 0.3 / 3)

    def test_bad_config(self):
        with pytest.raises(ValueError, match="harmful_letters"):
            S.HarmfulTopicTask(harmful_letters="ab")
        with pytest.raises(ValueError, match="harmful_fraction"):
            S.HarmfulTopicTask(harmful_fraction=1.5)
        with pytest.raises(ValueError, match="min_harmful"):
            S.HarmfulTopicTask(max_harmful=4)


class TestProgressionReward:
    def test_hand_worked(self):
        task = S.ProgressionTask()
        # Step 2, last digit 6: "802468" -> continuation 0 2 4 ...
        assert task.reference_response("802468>") == "02468024"
        # "0x24": transitions 6->0 ok, 0->x bad, x->2 bad, 2->4 ok: accuracy 2/4, length 4/8.
        r = task.gold_reward(["802468>"], ["0x24"])[0]
        assert r == pytest.approx(0.5 * 0.5, abs=1e-12)
        # A wrong digit does not spoil the rest: "0924" -> 0 ok, 9 bad, 2 bad, 4 ok.
        r = task.gold_reward(["802468>"], ["0924"])[0]
        assert r == pytest.approx(0.5 * 0.5, abs=1e-12)
        r = task.gold_reward(["802468>"], ["0246802468024680"])[0]
        assert r == pytest.approx(1.0 - 0.1 * 2, abs=1e-12)


class TestRaters:
    def test_agreement_decreases_with_noise(self):
        task = S.get_task("topic")
        stats = []
        for temperature in (0.02, 0.1, 0.5, 3.0):
            _, s = S.make_preference_dataset(
                task, num_pairs=600, seed=0, rater_config=S.RaterConfig(temperature=temperature)
            )
            stats.append(s)
        gold = [s.gold_agreement for s in stats]
        inter = [s.inter_rater_agreement for s in stats]
        assert all(a > b for a, b in zip(gold, gold[1:])), gold
        assert all(a > b for a, b in zip(inter, inter[1:])), inter
        assert gold[0] > 0.9 and abs(gold[-1] - 0.5) < 0.08

    def test_lapses_lower_agreement(self):
        task = S.get_task("progression")
        _, clean = S.make_preference_dataset(task, num_pairs=600, seed=1)
        _, lapsed = S.make_preference_dataset(
            task, num_pairs=600, seed=1, rater_config=S.RaterConfig(lapse_rate=0.5)
        )
        assert lapsed.rater_gold_agreement < clean.rater_gold_agreement - 0.1

    def test_bradley_terry_probability(self):
        pool = S.RaterPool(
            temperature=np.array([0.5, 1.0]),
            position_bias=np.array([0.0, 0.3]),
            length_bias=np.array([0.1, 0.0]),
            lapse_rate=0.2,
        )
        p = S.preference_probability(
            pool,
            np.array([[0, 1]]),
            gold_a=np.array([0.8]),
            gold_b=np.array([0.4]),
            length_a=np.array([5]),
            length_b=np.array([3]),
        )
        sig = lambda x: 1 / (1 + np.exp(-x))
        expected = 0.8 * sig(np.array([0.4 / 0.5 + 0.2, 0.4 / 1.0 + 0.3])) + 0.1
        np.testing.assert_allclose(p[0], expected, rtol=1e-12)

    def test_length_bias_prefers_longer(self):
        task = S.get_task("topic")
        cfg = S.RaterConfig(length_bias_mean=0.5, temperature=1.0)
        records, _ = S.make_preference_dataset(task, num_pairs=400, seed=3, rater_config=cfg)
        longer = np.mean([len(r["chosen"]) > len(r["rejected"]) for r in records])
        assert longer > 0.8

    def test_mean_consensus_gives_soft_labels(self):
        task = S.get_task("topic")
        cfg = S.RaterConfig(consensus="mean", raters_per_item=4, temperature=0.3)
        records, _ = S.make_preference_dataset(task, num_pairs=200, seed=0, rater_config=cfg)
        labels = np.array([r["label"] for r in records])
        assert set(np.round(labels, 6)) <= {0.5, 0.75, 1.0}
        assert (labels < 1.0).any()
        hard, _ = S.make_preference_dataset(task, num_pairs=200, seed=0)
        assert {r["label"] for r in hard} == {1.0}

    def test_records_load_as_every_format(self, tok):
        task = S.get_task("progression")
        prefs, _ = S.make_preference_dataset(task, num_pairs=8, seed=0)
        ranks, stats = S.make_ranking_dataset(task, num_prompts=8, num_responses=4, seed=0)
        assert 0.5 < stats.gold_agreement <= 1.0
        assert all(sorted(r["ranks"]) == [0, 1, 2, 3] for r in ranks)
        for records, fmt in (
            (prefs, "preference"),
            (ranks, "ranking"),
            (S.make_prompt_dataset(task, num_prompts=8), "prompt"),
            (S.make_sft_dataset(task, num_examples=8), "sft"),
        ):
            examples, report = D.load_examples(records, format=fmt)
            assert report.num_loaded == 8 and report.num_skipped == 0

    def test_bad_config(self):
        with pytest.raises(ValueError, match="raters_per_item"):
            S.RaterConfig(num_raters=2, raters_per_item=3)
        with pytest.raises(ValueError, match="consensus"):
            S.RaterConfig(consensus="vote")
        with pytest.raises(ValueError, match="unknown synthetic task"):
            S.get_task("nope")


class TestProxyGap:
    """A reward model fitted on few labelled pairs is an imperfect proxy of the gold reward."""

    @staticmethod
    def _features(tok, prompt, response):
        ids = tok(response, add_special_tokens=False)["input_ids"]
        prompt_ids = set(tok(prompt, add_special_tokens=False)["input_ids"])
        on_topic = sum(i in prompt_ids for i in ids)
        repeats = sum(a == b for a, b in zip(ids, ids[1:]))
        return np.array([on_topic, len(ids) - on_topic, repeats], np.float64)

    def test_linear_proxy_extrapolates_length_wrongly(self, tok):
        task = S.get_task("topic")
        records, _ = S.make_preference_dataset(task, num_pairs=300, seed=0)
        x = np.stack(
            [
                self._features(tok, r["prompt"], r["chosen"])
                - self._features(tok, r["prompt"], r["rejected"])
                for r in records
            ]
        )
        w = np.zeros(3)
        for _ in range(2000):  # Bradley-Terry logistic regression by gradient ascent
            p = 1.0 / (1.0 + np.exp(-x @ w))
            w += 0.05 * x.T @ (1.0 - p) / len(x)
        accuracy = np.mean(x @ w > 0)
        assert 0.6 < accuracy < 1.0
        prompt = task.sample_prompts(1, 1)[0]
        ref = task.reference_response(prompt)
        longer = [ref, ref * 2, ref * 3]
        proxy = [self._features(tok, prompt, r) @ w for r in longer]
        gold = task.gold_reward([prompt] * 3, longer)
        assert proxy[0] < proxy[1] < proxy[2]  # the proxy keeps rewarding length ...
        assert gold[0] > gold[1] > gold[2]  # ... which the gold reward penalises
