"""Validated examples -> token ids (outside any jitted step), with truncation.

String prompts are encoded with the tokenizer's own special-token convention
(``add_special_tokens=True``: e.g. Llama adds BOS, GPT-2 and Qwen add nothing), completions
without special tokens and followed by EOS (`add_eos`). Conversations are rendered with the
tokenizer's chat template (or `DEFAULT_CHAT_TEMPLATE` when it has none): the prompt with the
generation prompt, and the completion as the extra tokens of the full conversation, so the
template must render a conversation's prefix as a prefix of its tokens (checked). For a
``messages`` SFT example the loss mask covers exactly the tokens each assistant turn adds.

Truncation: prompts longer than `max_prompt_length` keep their end (``"keep_end"``, TRL's
default, so the text next to the response survives) or start (``"keep_start"``); completions
longer than `max_completion_length` keep their start; a sequence longer than `max_length` loses
completion tokens from its end. With ``overlong="error"`` or ``"skip"`` an over-long example is an
error (naming its origin) or a counted skip instead. Every cut is counted: `tokenize_examples`
reports the truncated prompts, responses and conversations in `LoadReport.truncated`.

A preference pair whose chosen and rejected responses tokenise to the same ids (for example both
cut to the same first `max_length - P` tokens) carries no preference any more; such a pair, and a
ranking with two responses that tokenise alike, is skipped and counted under the reason
``"identical_after_tokenization"`` (whatever `on_error` says: the record itself is valid).

A text far longer than any row can hold is cut before it is tokenized, so one 10 MB line costs
tens of MB rather than gigabytes of tokenizer state (a 10 MB chat message and a 10 MB
whitespace-free completion: +3.8 GiB of peak memory tokenized whole, +45 MiB cut first;
tests/data/test_tokenize_long.py).

- A string prompt or completion is tokenized through windows of its first (or, for
  ``"keep_end"`` prompts, last) characters, and a window is accepted only when two windows of
  different sizes give the same kept ids (`_encode_kept`).
- A conversation's over-long message contents are cut in their middle: each keeps a window of
  its first and of its last characters, each holding more ids than the row keeps of either end
  of a rendering, and the example is tokenized from that copy when copies cut at two window
  sizes give the same rows, counts and error reasons (`_tokenize_shortened`). The ids next to the
  joint are never kept, and every rendering that holds a cut content stays longer than any limit
  applied to it, so every length test is that of the whole conversation. What is checked
  differs in one place: that the template renders a conversation's prefixes as token prefixes
  is checked on the cut copy, not on the ids beyond the row.
- Windows are cut where the tokenizer's pre-tokenizer starts a piece (`_cut`): at whitespace,
  or, in a text with none there, between two pieces (letters / digits / punctuation for
  GPT-2's, any two characters for a character-level tokenizer). No BPE merge crosses a piece
  boundary, so the ids away from the cut are those of the whole text.

The rows, the counts of cut texts, the skips and the error reasons are those of tokenizing the
whole text; only an error's message may differ (it counts "at least N tokens", and may name the
sequence rather than the completion). A text with no piece boundary near the cut (one 10 MB run
of letters is a single GPT-2 pre-token, inside which a merge can reach across any cut) is
tokenized whole, as is a conversation with such a message. A text is cut before tokenizing only
when its row then cuts or refuses it, so every such cut is counted with the truncations
(`LoadReport.truncated`, and so the run's ``summary.json``) or the ``overlong`` skips.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from rlhf_jax.data._examples import (
    KTOExample,
    PreferenceExample,
    PromptExample,
    RankingExample,
    SFTExample,
    Text,
    TokenizedKTO,
    TokenizedPreference,
    TokenizedPrompt,
    TokenizedRanking,
    TokenizedSFT,
)
from rlhf_jax.data._records import LoadReport, OnError, RecordError, ReportBuilder

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
    """How examples become token ids. Lengths are in tokens; None means unlimited."""

    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    max_length: int | None = None
    prompt_truncation: Literal["keep_end", "keep_start"] = "keep_end"
    overlong: Literal["truncate", "error", "skip"] = "truncate"
    add_eos: bool = True

    def __post_init__(self):
        for name in ("max_prompt_length", "max_completion_length", "max_length"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {v}")
        if self.prompt_truncation not in ("keep_end", "keep_start"):
            raise ValueError(
                f"prompt_truncation must be 'keep_end' or 'keep_start', got {self.prompt_truncation!r}"
            )
        if self.overlong not in ("truncate", "error", "skip"):
            raise ValueError(
                f"overlong must be 'truncate', 'error' or 'skip', got {self.overlong!r}"
            )


# Windows for `_encode_kept`: the first one spans this many characters per token wanted, and
# must yield this many tokens beyond the kept ones (the ids nearest its cut are never kept).
_WINDOW_CHARS_PER_TOKEN = 8
_WINDOW_SPARE_TOKENS = 32
_WHITESPACE = (" ", "\n", "\t", "\r")


class _Head(list):
    """The first (or last) ids of a text that has more tokens than these."""


def _ids(x) -> np.ndarray:
    return np.asarray(x, dtype=np.int32).reshape(-1)


def _chat(tokenizer, messages, *, add_generation_prompt: bool) -> list[int]:
    kwargs: dict[str, Any] = {}
    if getattr(tokenizer, "chat_template", None) is None:
        kwargs["chat_template"] = DEFAULT_CHAT_TEMPLATE
    out = tokenizer.apply_chat_template(
        [dict(m) for m in messages],
        tokenize=True,
        add_generation_prompt=add_generation_prompt,
        **kwargs,
    )
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    return list(out)


def _encode(tokenizer, text: str, *, special: bool) -> list[int]:
    """`tokenizer(text, add_special_tokens=special)["input_ids"]` as a list. A Hugging Face fast
    tokenizer whose backend has no truncation or padding set (what its `__call__` sets for this
    call) and that does not split special tokens is asked through its Rust backend directly:
    the same ids, without about 50 us of Python per call."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (backend is not None and backend.truncation is None and backend.padding is None
            and not getattr(tokenizer, "split_special_tokens", False)):
        return list(backend.encode(text, add_special_tokens=special).ids)
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _cut(tokenizer, text: str, lo: int, hi: int, *, last: bool) -> int | None:
    """The first (`last`: the last) position in ``[lo, hi)`` where a pre-token of `text` starts,
    or None.

    A BPE (or WordPiece, Unigram) model tokenizes each pre-token on its own, so no merge crosses
    a pre-token start: the ids of ``text[:cut]`` and ``text[cut:]`` away from the cut are those
    of the whole text. A whitespace character is taken first (every common pre-tokenizer starts
    a pre-token at or next to one); a text with none there is split by the tokenizer's own
    pre-tokenizer (``backend_tokenizer.pre_tokenizer``) over ``text[lo:hi]``, whose first and
    last pieces are ignored (the slice may have cut them). Inside one pre-token (a run of
    letters for GPT-2's) there is no such position: a merge can reach across any cut there, and
    the ids at one end can depend on the other (leftmost-first merges of ``"x" * n`` end
    differently for odd and even n), so no window of it is exact.
    """
    if last:
        cut = max(text.rfind(ch, lo, hi) for ch in _WHITESPACE)
        if cut >= 0:
            return cut
    else:
        found = [i for i in (text.find(ch, lo, hi) for ch in _WHITESPACE) if i >= 0]
        if found:
            return min(found)
    pre = getattr(getattr(tokenizer, "backend_tokenizer", None), "pre_tokenizer", None)
    if pre is None:
        return None
    starts = [lo + start for _, (start, _) in pre.pre_tokenize_str(text[lo:hi])[1:-1]]
    return (starts[-1] if last else starts[0]) if starts else None


def _window(tokenizer, text: str, chars: int, *, special: bool, from_end: bool) -> list[int] | None:
    """Ids of about the first (`from_end`: last) `chars` characters of `text`, cut at the first
    pre-token start (`_cut`) in the next `chars` characters (the last one in the `chars` before
    them), or None when there is none."""
    if from_end:
        hi = len(text) - chars
        cut = _cut(tokenizer, text, hi - chars, hi, last=True)
        return None if cut is None else _encode(tokenizer, text[cut:], special=special)
    cut = _cut(tokenizer, text, chars, 2 * chars, last=False)
    return None if cut is None else _encode(tokenizer, text[:cut], special=special)


def _encode_kept(tokenizer, text: str, *, special: bool, keep: int | None,
                 from_end: bool = False) -> list[int]:
    """`_encode(text)`, or only the ids a row can keep of a text with more than `keep` tokens.

    With F = `_encode(tokenizer, text)`: returns F when ``len(F) <= keep`` (or `keep` is None),
    else a `_Head` of ``keep + 1`` ids equal to ``F[:keep + 1]`` (`from_end`: ``F[-(keep + 1):]``),
    so every length test against a limit <= `keep`, and every cut to it, is that of F. A long text
    is tokenized in windows of its start (end) cut where a pre-token starts (`_cut`), ~8
    characters per wanted token first and 4x larger while a window yields too few ids or two
    windows (c and 2c characters) disagree on the kept ones; a text at most 4x the window, or
    with no pre-token start to cut at (one long word of letters), is tokenized whole.
    """
    if keep is None:
        return _encode(tokenizer, text, special=special)
    need = keep + 1
    chars = _WINDOW_CHARS_PER_TOKEN * (need + _WINDOW_SPARE_TOKENS)
    while 4 * chars < len(text):
        a = _window(tokenizer, text, chars, special=special, from_end=from_end)
        b = _window(tokenizer, text, 2 * chars, special=special, from_end=from_end)
        if (a is not None and b is not None
                and min(len(a), len(b)) >= need + _WINDOW_SPARE_TOKENS):
            a, b = (a[-need:], b[-need:]) if from_end else (a[:need], b[:need])
            if a == b:
                return _Head(a)
        chars *= 4
    return _encode(tokenizer, text, special=special)


def _count(*parts: list[int], shortened: bool = False) -> str:
    """The number of ids in `parts`, as "at least N" when one is a `_Head` or they come from
    `shortened` messages."""
    n = sum(len(p) for p in parts)
    return f"at least {n}" if shortened or any(isinstance(p, _Head) for p in parts) else str(n)


class _Uncut(Exception):
    """A message too long to tokenize whole cannot be shortened at this window size."""


def _shorten(tokenizer, text: Text, *, keep: int | None, chars: int, need: int) -> Text:
    """`text`, with each message content longer than ``4 * chars`` characters cut in its middle:
    the content becomes its first ~`chars` characters and its last ~`chars`, each cut where a
    pre-token starts (`_cut`) and each holding at least `need` ids on its own.

    A string, or a conversation whose row keeps everything (`keep` None), is returned as is.

    Raises:
      _Uncut: when a long content has no pre-token start near a cut or too few ids in a window.
    """
    if isinstance(text, str) or keep is None:
        return text
    out = []
    for m in text:
        c = m["content"]
        if len(c) > 4 * chars:
            a = _cut(tokenizer, c, chars, 2 * chars, last=False)
            b = _cut(tokenizer, c, len(c) - 2 * chars, len(c) - chars, last=True)
            if a is None or b is None or min(len(_encode(tokenizer, c[:a], special=False)),
                                             len(_encode(tokenizer, c[b:], special=False))) < need:
                raise _Uncut
            m = {**m, "content": c[:a] + c[b:]}
        out.append(m)
    return tuple(out)


def _longest_message(*texts) -> int:
    return max((len(m["content"]) for t in texts if not isinstance(t, str) for m in t), default=0)


class _Tokenizer:
    """Per-call helper binding a tokenizer and a config; `cut` counts the truncations."""

    def __init__(self, tokenizer, config: TokenizeConfig):
        self.tok = tokenizer
        self.cfg = config
        self.eos = tokenizer.eos_token_id
        self.cut: Counter[str] = Counter()
        self._response_cut = False
        self.shortened = False  # messages were cut in their middle (`_tokenize_shortened`)

    def _count(self, *parts: list[int]) -> str:
        return _count(*parts, shortened=self.shortened)

    def _overlong(self, origin: str, what: str, n: str, limit: int) -> None:
        if self.cfg.overlong != "truncate":
            raise RecordError(origin, "overlong", f"{what} has {n} tokens, more than {limit}")

    def prompt(self, prompt: Text, origin: str, *, completion_follows: bool = True) -> list[int]:
        """Prompt ids cut to `max_prompt_length`. Without that limit a prompt followed by a
        completion still never keeps more than `max_length` ids (`fit` refuses it)."""
        limit = self.cfg.max_prompt_length
        if isinstance(prompt, str):
            keep = limit if limit is not None or not completion_follows else self.cfg.max_length
            from_end = limit is not None and self.cfg.prompt_truncation == "keep_end"
            ids = _encode_kept(self.tok, prompt, special=True, keep=keep, from_end=from_end)
        else:
            ids = _chat(self.tok, prompt, add_generation_prompt=True)
        if limit is not None and len(ids) > limit:
            self._overlong(origin, "the prompt", self._count(ids), limit)
            ids = ids[-limit:] if self.cfg.prompt_truncation == "keep_end" else ids[:limit]
            self.cut["prompt"] += 1
        return ids

    def response(self, prompt_ids: list[int], prompt: Text, completion: Text,
                 origin: str) -> list[int]:
        """Completion ids cut to `max_completion_length` and to fit `max_length` after the
        prompt, counted once in `cut["response"]` if either cut them."""
        self._response_cut = False
        ids = self.fit(prompt_ids, self.completion(prompt, completion, origin), origin)
        if self._response_cut:
            self.cut["response"] += 1
        return ids

    def completion(self, prompt: Text, completion: Text, origin: str) -> list[int]:
        limit = self.cfg.max_completion_length
        if isinstance(completion, str):
            keep = min((n for n in (limit, self.cfg.max_length) if n is not None), default=None)
            ids = _encode_kept(self.tok, completion, special=False, keep=keep)
            if self.cfg.add_eos and self.eos is not None:
                ids.append(self.eos)
        else:
            prompt_ids = _chat(self.tok, prompt, add_generation_prompt=True)
            full = _chat(self.tok, tuple(prompt) + tuple(completion), add_generation_prompt=False)
            if full[: len(prompt_ids)] != prompt_ids:
                raise RecordError(
                    origin,
                    "bad_value",
                    "the chat template does not render the prompt as a prefix of the full "
                    "conversation; cannot separate completion tokens",
                )
            ids = full[len(prompt_ids) :]
        if limit is not None and len(ids) > limit:
            self._overlong(origin, "the completion", self._count(ids), limit)
            ids = ids[:limit]
            self._response_cut = True
        return ids

    def fit(self, prompt_ids: list[int], completion_ids: list[int], origin: str) -> list[int]:
        """Shortens the completion so prompt + completion fits `max_length`."""
        limit = self.cfg.max_length
        if limit is None or len(prompt_ids) + len(completion_ids) <= limit:
            return completion_ids
        self._overlong(origin, "the sequence", self._count(prompt_ids, completion_ids), limit)
        keep = limit - len(prompt_ids)
        if keep < 1:
            raise RecordError(
                origin,
                "overlong",
                f"the prompt alone has {self._count(prompt_ids)} tokens, leaving no room for a "
                f"completion within max_length={limit}",
            )
        self._response_cut = True
        return completion_ids[:keep]

    def messages(self, messages, origin: str) -> TokenizedSFT:
        full = _chat(self.tok, messages, add_generation_prompt=False)
        loss = np.zeros(len(full), np.int32)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = _chat(self.tok, messages[:i], add_generation_prompt=True) if i else []
            upto = _chat(self.tok, messages[: i + 1], add_generation_prompt=False)
            if upto[: len(before)] != before or full[: len(upto)] != upto:
                raise RecordError(
                    origin,
                    "bad_value",
                    "the chat template does not render conversation prefixes as token prefixes; "
                    "cannot mask assistant turns",
                )
            loss[len(before) : len(upto)] = 1
        limit = self.cfg.max_length
        if limit is not None and len(full) > limit:
            self._overlong(origin, "the conversation", self._count(full), limit)
            full, loss = full[:limit], loss[:limit]
            self.cut["conversation"] += 1
        if not loss.any():
            raise RecordError(origin, "overlong", "truncation removed every assistant token")
        return TokenizedSFT(_ids(full), loss, origin)


def _identical(origin: str, what: str, t: _Tokenizer) -> RecordError:
    how = (f"after truncation to max_length={t.cfg.max_length} / max_completion_length="
           f"{t.cfg.max_completion_length}" if t.cut["response"] else "after tokenisation")
    return RecordError(origin, "identical_after_tokenization",
                       f"{what} are identical {how}, so the example states no preference")


def tokenize_example(example, tokenizer, *, config: TokenizeConfig = TokenizeConfig(),
                     index: int = 0, truncated: Counter | None = None):
    """Tokenizes one validated example into its `Tokenized*` counterpart.

    `truncated`, if given, is incremented per cut text (keys ``"prompt"``, ``"response"``,
    ``"conversation"``); a skipped example adds nothing.

    Raises:
      RecordError: for over-long examples when `config.overlong` is not ``"truncate"``, for chat
        templates that cannot separate completion tokens, and (reason
        ``"identical_after_tokenization"``) for a pair or ranking whose responses tokenise alike.
    """
    shortened = _tokenize_shortened(example, tokenizer, config, index)
    if shortened is None:
        t = _Tokenizer(tokenizer, config)
        out, cut = _tokenize(example, t, index), t.cut
    else:
        out, cut = shortened
    if truncated is not None:
        truncated.update(cut)
    return out


def _texts(example, config: TokenizeConfig) -> dict[str, tuple[Text | tuple[Text, ...], int | None]]:
    """The example's text fields, each with the most ids its row keeps of one of its texts (None:
    all of them), as `_Tokenizer` applies the limits."""
    c = config
    completion = min((n for n in (c.max_completion_length, c.max_length) if n is not None),
                     default=None)
    prompt = c.max_prompt_length if c.max_prompt_length is not None else (
        None if isinstance(example, PromptExample) else c.max_length)
    if isinstance(example, SFTExample) and example.messages is not None:
        return {"messages": (example.messages, c.max_length)}
    if isinstance(example, PreferenceExample):
        return {"prompt": (example.prompt, prompt), "chosen": (example.chosen, completion),
                "rejected": (example.rejected, completion)}
    if isinstance(example, RankingExample):
        return {"prompt": (example.prompt, prompt), "responses": (example.responses, completion)}
    if isinstance(example, (SFTExample, KTOExample)):
        return {"prompt": (example.prompt, prompt), "completion": (example.completion, completion)}
    if isinstance(example, PromptExample):
        return {"prompt": (example.prompt, prompt)}
    return {}


def _attempt(example, tokenizer, config: TokenizeConfig, index: int):
    """``(row, cuts)`` of a shortened example, or the `RecordError` it raised."""
    t = _Tokenizer(tokenizer, config)
    t.shortened = True
    try:
        return _tokenize(example, t, index), t.cut
    except RecordError as e:
        return e


def _same(a, b) -> bool:
    """Whether two `_attempt` outcomes agree: the same rows and cuts, or errors of one reason."""
    if isinstance(a, RecordError) or isinstance(b, RecordError):
        return isinstance(a, RecordError) and isinstance(b, RecordError) and a.reason == b.reason
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.asarray(a).shape == np.asarray(b).shape and np.array_equal(a, b)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a is b or a == b


def _tokenize_shortened(example, tokenizer, config: TokenizeConfig, index: int):
    """``(row, cuts)`` of an example whose messages are far longer than its row, computed on
    copies whose long message contents are cut in their middle (`_shorten`); None when no
    message is that long (or none can be cut), for `_tokenize` on the whole example.

    A row keeps at most K ids of either end of a rendered conversation (K: the largest limit that
    applies to one of its texts), and each end window of a cut content holds more than K ids, so
    the kept ids, every length test against a limit and every count are those of the whole
    conversation. The windows are ~8 characters per kept id first, and 4x larger while a long
    content cannot be cut or the copies cut at c and 2c characters give different rows, counts or
    error reasons; only an error's message may differ ("at least N tokens").
    """
    texts = _texts(example, config)
    keeps = [k for _, k in texts.values() if k is not None]
    if not keeps:
        return None
    need = max(keeps) + 1 + _WINDOW_SPARE_TOKENS
    longest = _longest_message(*(x for name, (v, keep) in texts.items() if keep is not None
                                 for x in (v if name == "responses" else (v,))))
    chars = _WINDOW_CHARS_PER_TOKEN * need
    while 8 * chars < longest:
        try:
            a, b = (example._replace(**{
                name: (tuple(_shorten(tokenizer, x, keep=keep, chars=n, need=need) for x in v)
                       if name == "responses" else
                       _shorten(tokenizer, v, keep=keep, chars=n, need=need))
                for name, (v, keep) in texts.items()}) for n in (chars, 2 * chars))
        except _Uncut:
            chars *= 4
            continue
        ra = _attempt(a, tokenizer, config, index)
        if _same(ra, _attempt(b, tokenizer, config, index)):
            if isinstance(ra, RecordError):
                raise ra
            return ra
        chars *= 4
    return None


def _tokenize(example, t: _Tokenizer, index: int):
    o = example.origin
    if isinstance(example, SFTExample):
        if example.messages is not None:
            return t.messages(example.messages, o)
        p = t.prompt(example.prompt, o)
        c = t.response(p, example.prompt, example.completion, o)
        ids = np.concatenate([_ids(p), _ids(c)])
        loss = np.concatenate([np.zeros(len(p), np.int32), np.ones(len(c), np.int32)])
        return TokenizedSFT(ids, loss, o)
    if isinstance(example, PreferenceExample):
        p = t.prompt(example.prompt, o)
        c = t.response(p, example.prompt, example.chosen, o)
        r = t.response(p, example.prompt, example.rejected, o)
        if c == r:
            raise _identical(o, "chosen and rejected", t)
        return TokenizedPreference(_ids(p), _ids(c), _ids(r), example.margin, example.label, o)
    if isinstance(example, RankingExample):
        p = t.prompt(example.prompt, o)
        rs = [t.response(p, example.prompt, r, o) for r in example.responses]
        if len({tuple(r) for r in rs}) < len(rs):
            raise _identical(o, "two of the ranked responses", t)
        return TokenizedRanking(_ids(p), tuple(_ids(r) for r in rs),
                                np.asarray(example.ranks, np.int32), o)
    if isinstance(example, KTOExample):
        p = t.prompt(example.prompt, o)
        c = t.response(p, example.prompt, example.completion, o)
        return TokenizedKTO(_ids(p), _ids(c), example.label, o)
    if isinstance(example, PromptExample):
        ids = t.prompt(example.prompt, o, completion_follows=False)
        return TokenizedPrompt(_ids(ids), dict(example.fields), o, index)
    raise TypeError(f"cannot tokenize {type(example).__name__}")


def tokenize_examples(
    examples: Sequence,
    tokenizer,
    *,
    config: TokenizeConfig = TokenizeConfig(),
    on_error: OnError = "raise",
    source: str = "examples",
    log: bool = True,
) -> tuple[list, LoadReport]:
    """Tokenizes validated examples; over-long rows are truncated, raise or are counted skips
    (`config.overlong`).

    The report (logged unless `log` is False) is named `source`. Pairs and rankings whose
    responses tokenise alike are always skipped and counted (module docstring).

    Returns:
      `(tokenized, report)` where `report.skipped` counts dropped examples per reason and
      `report.truncated` the cut prompts, responses and conversations of the kept ones.
    """
    builder = ReportBuilder(source, on_error)
    out = []
    for i, ex in enumerate(examples):
        builder.num_read += 1
        cut: Counter[str] = Counter()
        try:
            out.append(tokenize_example(ex, tokenizer, config=config, index=i, truncated=cut))
        except RecordError as e:
            skip = ((e.reason == "overlong" and config.overlong == "skip")
                    or e.reason == "identical_after_tokenization")
            builder.error(e, skip=skip)
            continue
        builder.truncated.update(cut)
        builder.num_loaded += 1
    return out, builder.build(log=log)
