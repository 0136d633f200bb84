"""A text far longer than a row: cut before tokenizing, with the rows of the whole-text path."""

import copy
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
from rlhf_jax.train.data import DataSpec, build_data

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


@pytest.fixture(scope="module")
def bpe_chat(bpe):
    """`bpe` with ChatML turns (Qwen's layout: a newline, its own pre-token, after the role), so
    a conversation's prefixes render as token prefixes."""
    tok = copy.deepcopy(bpe)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


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


@pytest.mark.parametrize("which", TOKENIZERS)
@pytest.mark.parametrize("from_end", [False, True])
def test_a_text_without_whitespace_is_cut_where_a_pre_token_starts(which, from_end, bpe):
    """No whitespace: the cut falls where the tokenizer's pre-tokenizer starts a piece (between
    letters, digits and punctuation for the BPE's; between any two characters for the
    character tokenizer), and the kept ids are those of the whole text."""
    tok = S.build_tokenizer() if which == "chars" else bpe
    for text in ("".join(_text(60_000, 3).split()), ("x" * 60_001 if which == "chars" else "")):
        if not text:
            continue
        whole = tok(text, add_special_tokens=False)["input_ids"]
        kept = _tokenize._encode_kept(tok, text, special=False, keep=100, from_end=from_end)
        assert isinstance(kept, _tokenize._Head)
        assert kept == (whole[-101:] if from_end else whole[:101])


def test_one_long_pre_token_is_tokenized_whole(bpe):
    """A run of letters is one GPT-2 pre-token: a merge may cross any cut in it (the last ids of
    ``"x" * n`` depend on n's parity), so it has no exact window."""
    text = "x" * 100_001
    kept = _tokenize._encode_kept(bpe, text, special=False, keep=10, from_end=True)
    assert kept == bpe(text)["input_ids"] and not isinstance(kept, _tokenize._Head)
    assert _tokenize._cut(bpe, text, 10, 1000, last=False) is None


def _chat_records(fmt, lengths, seed, spaces):
    p, c, r = (_text(n, seed + i) for i, n in enumerate(lengths))
    if not spaces:
        p, c, r = ("".join(t.split()) or "x" for t in (p, c, r))
    user = [{"role": "system", "content": "be brief"}, {"role": "user", "content": p},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": "go on"}]
    said = lambda t: [{"role": "assistant", "content": t}]  # noqa: E731
    return {
        "messages": {"messages": [{"role": "user", "content": p},
                                  {"role": "assistant", "content": c},
                                  {"role": "user", "content": "more"},
                                  {"role": "assistant", "content": r}]},
        "preference": {"prompt": user, "chosen": said(c), "rejected": said(r)},
        "sft": {"prompt": user, "completion": said(c)},
        "kto": {"prompt": user, "completion": said(c), "label": False},
        "prompt": {"prompt": user},
    }[fmt]


CHAT_CONFIGS = [
    dict(max_prompt_length=40, max_completion_length=30, max_length=64),
    dict(max_prompt_length=40, prompt_truncation="keep_start", max_length=64),
    dict(max_length=50),
    dict(max_length=64, overlong="skip"),
]


@pytest.mark.parametrize("which", TOKENIZERS)
@pytest.mark.parametrize("config", CHAT_CONFIGS,
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_chat_rows_counts_and_skips_equal_the_whole_conversation_path(which, config, bpe_chat,
                                                                      monkeypatch):
    """Conversations whose messages are far longer than a row (with and without whitespace) give
    the rows, truncation counts and skips of rendering and tokenizing them whole."""
    tok = S.build_tokenizer() if which == "chars" else bpe_chat
    fmts = (("messages", "sft"), ("preference", "preference"), ("sft", "sft"), ("kto", "kto"),
            ("prompt", "prompt"))
    examples = [
        D.parse_record(_chat_records(key, lengths, seed, spaces), format=fmt,
                       origin=f"t:{seed}:{key}")
        for seed, (key, fmt) in enumerate(fmts)
        for lengths in ((12_000, 30, 12_000), (30, 12_000, 3_000))
        for spaces in (True, False)
    ]
    used = []

    def shortened(*args, _shortened=_tokenize._tokenize_shortened):
        used.append(True)
        if (out := _shortened(*args)) is None:
            used[-1] = False
        return out

    monkeypatch.setattr(_tokenize, "_tokenize_shortened", shortened)
    windowed = _tokenized(examples, tok, config)
    assert sum(used) >= len(examples) // 2, used  # the long conversations were cut first
    monkeypatch.setattr(_tokenize, "_tokenize_shortened", lambda *a: None)
    whole = _tokenized(examples, tok, config)
    assert windowed[1:] == whole[1:]
    assert len(windowed[0]) == len(whole[0]) > 0 and sum(whole[2].values()) + sum(whole[1].values()) > 0
    for a, b in zip(windowed[0], whole[0], strict=True):
        assert _tokenize._same(a, b), a.origin


def test_overlong_error_on_a_shortened_conversation_says_at_least():
    ex = D.parse_record({"messages": [{"role": "user", "content": "hi"},
                                      {"role": "assistant", "content": "ab " * 50_000}]},
                        format="sft", origin="t:2")
    with pytest.raises(D.RecordError, match=r"^t:2: the conversation has at least \d+ tokens, "
                                            r"more than 8"):
        D.tokenize_example(ex, S.build_tokenizer(),
                           config=D.TokenizeConfig(max_length=8, overlong="error"))


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


def test_a_10mb_message_and_a_10mb_word_cost_about_their_size(tmp_path):
    """ru_maxrss of a fresh process: a 10 MB message in a conversation and a 10 MB completion
    without whitespace add < 200 MB together (+45 MiB and 6 s measured on a shared 2-core host;
    tokenizing them whole added +3.8 GiB and took 172 s)."""
    words = ("the reward model is good ; 12 + 3 = 15 . " * 250_000)[:10_000_000]
    word = "".join(words.split())[:10_000_000]
    big, small = tmp_path / "big.jsonl", tmp_path / "small.jsonl"
    big.write_text(
        json.dumps({"prompt": [{"role": "user", "content": words}],
                    "chosen": [{"role": "assistant", "content": "ab"}],
                    "rejected": [{"role": "assistant", "content": "cd"}]}) + "\n"
        + json.dumps({"prompt": "abc", "chosen": "ab" + word, "rejected": "cd"}) + "\n")
    small.write_text(json.dumps({"prompt": "abc", "chosen": "ab", "rejected": "cd"}) + "\n")
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(big), str(small)],
                         capture_output=True, text=True, check=True, timeout=600)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["truncated"] == {"prompt": 1, "response": 1}
    assert got["kib"] < 200 * 1024, got


def test_the_cuts_reach_the_run_summary(monkeypatch):
    """The reports `build_data` hands to the run summary (``summary.json["data"]``) count every
    long message and whitespace-free completion cut before tokenizing, as the whole path does."""
    word = "".join(_text(30_000, 5).split())
    said = lambda t: [{"role": "user", "content": "hi"}, {"role": "assistant", "content": t}]  # noqa: E731
    records = [{"messages": said(word)}, {"messages": said("ok")}] * 4
    evals = [{"prompt": "ab", "completion": "c" + word}, {"prompt": "ab", "completion": "cd"}] * 4
    spec = DataSpec(synthetic="topic", batch_size=4, eval_batch_size=4, max_length=48)
    cut = []
    shortened = _tokenize._tokenize_shortened
    monkeypatch.setattr(_tokenize, "_tokenize_shortened",
                        lambda *a: (out := shortened(*a)) and cut.append(1) or out)
    bundle = build_data(spec, format="sft", tokenizer=S.build_tokenizer(), seed=0,
                        records=records, eval_records=evals)
    summary = {role: report.to_dict() for role, report in bundle.reports.items()}
    assert len(cut) == 4
    assert summary["train"]["truncated"] == {"prompt": 0, "response": 0, "conversation": 4}
    assert summary["eval"]["truncated"] == {"prompt": 0, "response": 4, "conversation": 0}
