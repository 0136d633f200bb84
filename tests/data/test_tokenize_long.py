"""A text far longer than a row: cut before tokenizing, with the rows of the whole-text path."""

import json
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rlhf_jax import data as D
from rlhf_jax.data import _tokenize
from rlhf_jax.data import synthetic as S

WORDS = ("the reward model is good bad policy aligned preference chosen rejected a an of to "
         "12 345 6789 ; : . , ? - + = xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx").split()


def _text(n_chars: int, seed: int) -> str:
    rng = random.Random(seed)
    out, n = [], 0
    while n < n_chars:
        w = rng.choice(WORDS) + rng.choice((" ", " ", " ", "  ", "\n", ""))
        out.append(w)
        n += len(w)
    return "".join(out)[:n_chars]


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE (GPT-2's pre-tokenizer and byte alphabet), trained here in < 1 s."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_text(20_000, s) for s in range(3)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


TOKENIZERS = ("chars", "bpe")
CONFIGS = [
    dict(max_prompt_length=40, max_completion_length=30, max_length=64),
    dict(max_prompt_length=40, prompt_truncation="keep_start", max_length=64),
    dict(max_length=50),
    dict(max_completion_length=25),
    dict(max_prompt_length=120, max_completion_length=100, max_length=200),
    dict(max_prompt_length=40, max_length=64, overlong="skip"),
    dict(max_prompt_length=40, max_length=64, overlong="error"),
]
LENGTHS = (30, 3_000, 12_000)


def _records(fmt, lengths, seed):
    p, c, r = (_text(n, seed + i) for i, n in enumerate(lengths))
    return {
        "preference": {"prompt": p, "chosen": c, "rejected": r},
        "sft": {"prompt": p, "completion": c},
        "kto": {"prompt": p, "completion": c, "label": True},
        "prompt": {"prompt": p},
    }[fmt]


def _tokenized(examples, tok, config):
    rows, report = D.tokenize_examples(examples, tok, config=D.TokenizeConfig(**config),
                                       on_error="skip", log=False)
    return rows, report.skipped, report.truncated


@pytest.mark.parametrize("which", TOKENIZERS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_rows_counts_and_skips_equal_the_whole_text_path(which, config, bpe, monkeypatch):
    tok = S.build_tokenizer() if which == "chars" else bpe
    examples = [
        D.parse_record(_records(fmt, lengths, seed), format=fmt, origin=f"t:{seed}")
        for seed, (fmt, lengths) in enumerate(
            (fmt, (a, b, c)) for fmt in ("preference", "sft", "kto", "prompt")
            for a in LENGTHS for b, c in ((LENGTHS[0], LENGTHS[2]), (LENGTHS[2], LENGTHS[1])))
    ]
    heads = []
    kept = _tokenize._encode_kept
    monkeypatch.setattr(_tokenize, "_encode_kept", lambda *a, **k: heads.append(
        isinstance(ids := kept(*a, **k), _tokenize._Head)) or ids)
    windowed = _tokenized(examples, tok, config)
    assert any(heads)  # the long texts went through windows
    monkeypatch.setattr(_tokenize, "_encode_kept", kept)
    monkeypatch.setattr(_tokenize, "_WINDOW_CHARS_PER_TOKEN", 10**9)  # never a window: whole texts
    whole = _tokenized(examples, tok, config)
    assert windowed[1:] == whole[1:]
    assert len(windowed[0]) == len(whole[0]) > 0
    for a, b in zip(windowed[0], whole[0], strict=True):
        assert type(a) is type(b)
        for x, y in zip(a, b, strict=True):
            for u, v in zip(*((z if isinstance(z, tuple) else (z,)) for z in (x, y)), strict=True):
                np.testing.assert_array_equal(u, v, err_msg=a.origin)


@pytest.mark.parametrize("from_end", [False, True])
def test_kept_ids_of_a_long_text_come_from_a_window(bpe, from_end):
    text = _text(200_000, 7)
    whole = bpe(text, add_special_tokens=False)["input_ids"]
    kept = _tokenize._encode_kept(bpe, text, special=False, keep=100, from_end=from_end)
    assert isinstance(kept, _tokenize._Head)
    assert kept == (whole[-101:] if from_end else whole[:101])
    short = _text(500, 7)
    assert _tokenize._encode_kept(bpe, short, special=False, keep=100) == bpe(short)["input_ids"]


def test_a_text_without_whitespace_is_tokenized_whole(bpe):
    text = "x" * 100_001
    kept = _tokenize._encode_kept(bpe, text, special=False, keep=10, from_end=True)
    assert kept == bpe(text)["input_ids"] and not isinstance(kept, _tokenize._Head)


def test_overlong_error_on_a_window_says_at_least():
    ex = D.parse_record({"prompt": "ab " * 50_000}, format="prompt", origin="t:1")
    with pytest.raises(D.RecordError, match=r"^t:1: the prompt has at least 5 tokens, more than 4"):
        D.tokenize_example(ex, S.build_tokenizer(),
                           config=D.TokenizeConfig(max_prompt_length=4, overlong="error"))


_MEMORY_PROBE = textwrap.dedent("""
    import json, resource, sys
    from rlhf_jax import data as D
    from rlhf_jax.data import synthetic as S
    tok = S.build_tokenizer()
    D.make_loader(sys.argv[2], format="preference", tokenizer=tok,  # warm every code path
                  batch_config=D.BatchConfig(batch_size=1),
                  tokenize_config=D.TokenizeConfig(max_prompt_length=32, max_length=64))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loader, report = D.make_loader(
        sys.argv[1], format="preference", tokenizer=tok,
        batch_config=D.BatchConfig(batch_size=1),
        tokenize_config=D.TokenizeConfig(max_prompt_length=32, max_length=64))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"kib": after - before, "truncated": dict(report.truncated)}))
""")


def test_one_10mb_line_costs_about_its_size(tmp_path):
    """ru_maxrss of a fresh process: reading and tokenizing one 10 MB line adds < 200 MB (the
    whole-text path added ~3.7 GB with this tokenizer)."""
    words = ("the reward model is good ; 12 + 3 = 15 . " * 250_000)[:10_000_000]
    big, small = tmp_path / "big.jsonl", tmp_path / "small.jsonl"
    big.write_text(json.dumps({"prompt": words, "chosen": "ab " + words, "rejected": "cd"}) + "\n")
    small.write_text(json.dumps({"prompt": "abc", "chosen": "ab", "rejected": "cd"}) + "\n")
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(big), str(small)],
                         capture_output=True, text=True, check=True, timeout=600)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["truncated"] == {"prompt": 1, "response": 1}
    assert got["kib"] < 200 * 1024, got
