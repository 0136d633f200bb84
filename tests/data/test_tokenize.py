"""Tokenization: special tokens, chat templates and loss masks, truncation strategies."""

import pathlib

import numpy as np
import pytest
import transformers

from rlhf_jax import data as D
from rlhf_jax.data import synthetic as S
from rlhf_jax.data._tokenize import _encode


@pytest.fixture(scope="module")
def tok():
    return S.build_tokenizer()


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _example(fmt, record):
    return D.parse_record(record, format=fmt, origin="t:1")


class TestStrings:
    def test_prompt_completion_eos(self, tok):
        t = D.tokenize_example(_example("sft", {"prompt": "ab>", "completion": "cd"}), tok)
        np.testing.assert_array_equal(t.input_ids, _ids(tok, "ab>cd") + [tok.eos_token_id])
        np.testing.assert_array_equal(t.loss_mask, [0, 0, 0, 1, 1, 1])

    def test_no_eos(self, tok):
        t = D.tokenize_example(
            _example("sft", {"prompt": "a", "completion": "b"}), tok, config=D.TokenizeConfig(add_eos=False)
        )
        np.testing.assert_array_equal(t.input_ids, _ids(tok, "ab"))

    def test_text_format_trains_on_everything(self, tok):
        t = D.tokenize_example(_example("sft", {"text": "abc"}), tok)
        np.testing.assert_array_equal(t.loss_mask, [1, 1, 1, 1])

    def test_preference_shares_prompt(self, tok):
        t = D.tokenize_example(
            _example("preference", {"prompt": "ab>", "chosen": "1", "rejected": "23"}), tok
        )
        np.testing.assert_array_equal(t.prompt_ids, _ids(tok, "ab>"))
        np.testing.assert_array_equal(t.chosen_ids, _ids(tok, "1") + [tok.eos_token_id])
        np.testing.assert_array_equal(t.rejected_ids, _ids(tok, "23") + [tok.eos_token_id])


@pytest.mark.parametrize("name", ["synthetic", "gpt2", "qwen2"])
def test_fast_tokenizers_encode_through_their_backend_with_the_same_ids(name, tok):
    """`_encode` asks a fast tokenizer's Rust backend directly: the ids of its `__call__`."""
    fixture = pathlib.Path(__file__).parents[1] / "fixtures" / "hf" / name
    t = tok if name == "synthetic" else transformers.AutoTokenizer.from_pretrained(fixture)
    texts = ["hello world", "  spaces\tand\nlines ", "ünïcödé ✓ 🙂", "", "a" * 300,
             "<|endoftext|> special", "The quick brown fox. " * 5]
    for special in (False, True):
        for text in texts:
            assert _encode(t, text, special=special) == list(
                t(text, add_special_tokens=special)["input_ids"]), (name, special, text)


class TestTruncation:
    def test_prompt_keep_end_and_keep_start(self, tok):
        ex = _example("preference", {"prompt": "abcdef", "chosen": "1", "rejected": "2"})
        end = D.tokenize_example(ex, tok, config=D.TokenizeConfig(max_prompt_length=3))
        start = D.tokenize_example(
            ex, tok, config=D.TokenizeConfig(max_prompt_length=3, prompt_truncation="keep_start")
        )
        np.testing.assert_array_equal(end.prompt_ids, _ids(tok, "def"))
        np.testing.assert_array_equal(start.prompt_ids, _ids(tok, "abc"))

    def test_completion_keeps_start(self, tok):
        ex = _example("kto", {"prompt": "a", "completion": "12345", "label": True})
        t = D.tokenize_example(ex, tok, config=D.TokenizeConfig(max_completion_length=2))
        np.testing.assert_array_equal(t.completion_ids, _ids(tok, "12"))

    def test_max_length_cuts_completion(self, tok):
        ex = _example("sft", {"prompt": "abc", "completion": "12345"})
        t = D.tokenize_example(ex, tok, config=D.TokenizeConfig(max_length=5))
        np.testing.assert_array_equal(t.input_ids, _ids(tok, "abc12"))
        np.testing.assert_array_equal(t.loss_mask, [0, 0, 0, 1, 1])

    def test_prompt_fills_max_length(self, tok):
        ex = _example("sft", {"prompt": "abcdef", "completion": "1"})
        with pytest.raises(D.RecordError, match="leaving no room for a completion"):
            D.tokenize_example(ex, tok, config=D.TokenizeConfig(max_length=6))

    def test_overlong_error(self, tok):
        ex = _example("prompt", {"prompt": "abcdef"})
        with pytest.raises(D.RecordError, match=r"^t:1: the prompt has 6 tokens, more than 4"):
            D.tokenize_example(ex, tok, config=D.TokenizeConfig(max_prompt_length=4, overlong="error"))

    def test_bad_config(self):
        with pytest.raises(ValueError, match="prompt_truncation"):
            D.TokenizeConfig(prompt_truncation="middle")
        with pytest.raises(ValueError, match="max_length must be >= 1"):
            D.TokenizeConfig(max_length=0)


class TestConversations:
    MESSAGES = [
        {"role": "system", "content": "be"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "12"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "3"},
    ]

    def test_messages_mask_only_assistant_turns(self, tok):
        t = D.tokenize_example(_example("sft", {"messages": self.MESSAGES}), tok)
        rendered = tok.apply_chat_template(self.MESSAGES, tokenize=False)
        assert tok.decode(t.input_ids) == rendered
        masked = tok.decode(t.input_ids[t.loss_mask == 1])
        # Assistant content and the EOS closing each assistant turn.
        assert masked == "12<eos>3<eos>"

    def test_conversational_preference(self, tok):
        prompt = self.MESSAGES[:2]
        ex = _example(
            "preference",
            {"prompt": prompt, "chosen": [{"role": "assistant", "content": "1"}],
             "rejected": [{"role": "assistant", "content": "22"}]},
        )
        t = D.tokenize_example(ex, tok)
        assert tok.decode(t.prompt_ids) == "<system>be<user>ab<assistant>"
        assert tok.decode(t.chosen_ids) == "1<eos>"
        assert tok.decode(t.rejected_ids) == "22<eos>"

    def test_default_template_without_chat_template(self, tok):
        plain = S.build_tokenizer()
        plain.chat_template = None
        t = D.tokenize_example(_example("sft", {"messages": self.MESSAGES[1:3]}), plain)
        text = plain.decode(t.input_ids)
        assert text == "user: ab\nassistant: 12<eos>\n"
        assert plain.decode(t.input_ids[t.loss_mask == 1]) == "12<eos>\n"
