"""A causal LM behind a text interface: batched, jitted next-token log-probs and sampling.

``TextModel`` splits an NNX ``CausalLM`` once with ``nnx.split`` and keeps ``(graphdef,
state)``. Texts are tokenized on the host, left-padded (so the next-token position is the last
column of every row) to a power-of-two length bucket, and run in fixed-size batches, so the
jitted forward compiles once per bucket. With a mesh, each batch is placed with
``rlhf_jax.sharding.shard_batch`` (split over ``("data", "fsdp")``), so a model whose state is
sharded on the mesh is scored in place.

Tokenizers are Hugging Face tokenizers (``PreTrainedTokenizerBase``: ``encode(text,
add_special_tokens=...)``, ``decode(ids, skip_special_tokens=...)``) or ``tokenizers.Tokenizer``
objects (whose ``encode`` returns an ``Encoding``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.generation import SamplingParams, generate_with_state
from rlhf_jax.models import positions_from_mask
from rlhf_jax.sharding import BATCH_AXES, shard_batch


def encode(tokenizer: Any, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """Token ids of ``text`` (HF tokenizer or ``tokenizers.Tokenizer``)."""
    try:
        ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    except TypeError:
        ids = tokenizer.encode(text)
    if hasattr(ids, "ids"):
        ids = ids.ids
    return [int(i) for i in ids]


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """Text of ``ids`` without special tokens."""
    try:
        return tokenizer.decode(list(ids), skip_special_tokens=True)
    except TypeError:
        return tokenizer.decode(list(ids))


def _special_id(tokenizer: Any, name: str) -> int | None:
    value = getattr(tokenizer, name, None)
    return None if value is None else int(value)


def single_token_id(tokenizer: Any, token: str, *, field: str) -> int:
    """The id of ``token``, which must encode to exactly one known token.

    Raises:
      ValueError: naming ``field`` and the token when it encodes to zero or several tokens, or to
        the tokenizer's unknown token.
    """
    ids = encode(tokenizer, token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"{field}: {token!r} is not a single token for this tokenizer (it encodes to "
            f"{len(ids)} tokens {ids}); use strings that are one token each"
        )
    unk = _special_id(tokenizer, "unk_token_id")
    if unk is not None and ids[0] == unk and token != getattr(tokenizer, "unk_token", None):
        raise ValueError(
            f"{field}: {token!r} is not in the tokenizer's vocabulary (it encodes to the unknown "
            f"token id {unk})"
        )
    return ids[0]


def bucket(length: int, *, minimum: int = 16) -> int:
    """Smallest power of two ``>= max(length, minimum)``."""
    n = max(int(length), int(minimum), 1)
    return 1 << (n - 1).bit_length()


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _next_token_logps(graphdef, state, input_ids, attention_mask, token_ids):
    """``log_softmax(model(...)[:, -1])[:, token_ids]`` for left-padded rows, ``[B, K]``.

    A model with ``hidden_states`` / ``logits_from_hidden`` (``rlhf_jax.models.CausalLM``) runs
    its LM head on the last position only (``[B, V]`` logits, never ``[B, T, V]``)."""
    model = nnx.merge(graphdef, state)
    kwargs = {"attention_mask": attention_mask, "positions": positions_from_mask(attention_mask)}
    if hasattr(model, "hidden_states") and hasattr(model, "logits_from_hidden"):
        logits = model.logits_from_hidden(model.hidden_states(input_ids, **kwargs)[:, -1:])
    else:
        logits = model(input_ids, **kwargs)
    last = jax.nn.log_softmax(logits[:, -1, :].astype(jnp.float32), axis=-1)
    return last[:, token_ids]


TEXT_MODEL_OPTIONS = ("batch_size", "mesh", "max_length", "min_bucket")
"""`TextModel` constructor options that labelers pass through."""


class TextModel:
    """A causal LM and its tokenizer, for scoring next tokens and sampling continuations of text.

    Args:
      model: an NNX causal LM, ``model(input_ids, attention_mask=..., positions=...) -> logits
        [B, T, V]`` (and ``init_cache``/``decode`` for :meth:`generate`). Split once here.
      tokenizer: its tokenizer.
      batch_size: rows per jitted call; the last batch is padded to it. With a mesh it must be
        divisible by the mesh's ``data * fsdp`` size.
      mesh: optional mesh the model state lives on; batches are sharded over its batch axes.
      max_length: longest tokenized text accepted (default: the model config's
        ``max_position_embeddings`` when available); longer texts raise.
      min_bucket: smallest padded length.
    """

    def __init__(
        self,
        model: nnx.Module | None,
        tokenizer: Any,
        *,
        batch_size: int = 8,
        mesh: jax.sharding.Mesh | None = None,
        max_length: int | None = None,
        min_bucket: int = 16,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if mesh is not None:
            shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.shape]))
            if batch_size % shards:
                raise ValueError(
                    f"batch_size={batch_size} is not divisible by the {shards} batch shards of "
                    "the mesh (data x fsdp)"
                )
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.mesh = mesh
        self.min_bucket = min_bucket
        if max_length is None and model is not None:
            config = getattr(model, "config", None)
            max_length = getattr(config, "max_position_embeddings", None)
        self.max_length = max_length
        pad = _special_id(tokenizer, "pad_token_id")
        eos = _special_id(tokenizer, "eos_token_id")
        self.eos_token_id = eos
        self.pad_token_id = pad if pad is not None else (eos if eos is not None else 0)
        if model is not None:
            self.graphdef, self.state = nnx.split(model)

    @classmethod
    def from_state(cls, graphdef: Any, state: Any, tokenizer: Any, **kwargs: Any) -> TextModel:
        """Wraps an already split model (e.g. a trainer's current parameters)."""
        text_model = cls(None, tokenizer, **kwargs)
        text_model.graphdef, text_model.state = graphdef, state
        return text_model

    # ------------------------------------------------------------------ tokenization

    def encode_texts(
        self, texts: Sequence[str], *, names: Sequence[str] | None = None
    ) -> list[list[int]]:
        """Token ids of each text; raises naming an over-long or empty text.

        Args:
          texts: the texts.
          names: how errors name each text (default ``"text[i]"``).
        """
        out = []
        for i, text in enumerate(texts):
            name = names[i] if names is not None else f"text[{i}]"
            if not isinstance(text, str):
                raise TypeError(f"{name} must be a string, got {type(text).__name__}")
            ids = encode(self.tokenizer, text)
            if not ids:
                raise ValueError(f"{name} tokenizes to no tokens: {text[:60]!r}")
            if self.max_length is not None and len(ids) > self.max_length:
                raise ValueError(
                    f"{name} has {len(ids)} tokens, more than max_length={self.max_length}; "
                    "shorten the template/texts or raise max_length"
                )
            out.append(ids)
        return out

    def _left_pad(self, rows: Sequence[Sequence[int]], *, extra: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``[batch_size, L]`` left-padded ids and mask; missing rows get one real pad token."""
        longest = max(len(r) for r in rows)
        length = bucket(longest, minimum=self.min_bucket)
        if self.max_length is not None:
            length = min(length, max(self.max_length - extra, longest))
        ids = np.full((self.batch_size, length), self.pad_token_id, np.int32)
        mask = np.zeros((self.batch_size, length), np.int32)
        for b, row in enumerate(rows):
            ids[b, length - len(row):] = row
            mask[b, length - len(row):] = 1
        mask[len(rows):, -1] = 1  # filler rows: one real token so no row is fully masked
        return ids, mask

    def _batches(self, rows: list[list[int]]):
        for start in range(0, len(rows), self.batch_size):
            yield start, rows[start : start + self.batch_size]

    # ------------------------------------------------------------------ scoring

    def next_token_logps(
        self,
        texts: Sequence[str],
        token_ids: Sequence[int],
        *,
        names: Sequence[str] | None = None,
    ) -> np.ndarray:
        """Log-probabilities of ``token_ids`` as the next token after each text.

        Args:
          texts: ``N`` strings.
          token_ids: ``K`` token ids.
          names: how errors name each text (default ``"text[i]"``).

        Returns:
          ``[N, K]`` float32 ``log p(token_ids[k] | text_n)`` under the full-vocabulary softmax.
        """
        token_ids = jnp.asarray(np.asarray(token_ids, np.int32))
        rows = self.encode_texts(texts, names=names)
        out = np.zeros((len(rows), token_ids.shape[0]), np.float32)
        for start, chunk in self._batches(rows):
            ids, mask = self._left_pad(chunk)
            if self.mesh is not None:
                ids, mask = shard_batch((ids, mask), self.mesh)
            logps = _next_token_logps(self.graphdef, self.state, ids, mask, token_ids)
            out[start : start + len(chunk)] = np.asarray(logps)[: len(chunk)]
        return out

    # ------------------------------------------------------------------ sampling

    def generate(
        self,
        texts: Sequence[str],
        sampling: SamplingParams,
        *,
        rng: jax.Array | None = None,
        stop_strings: Sequence[str] = (),
        names: Sequence[str] | None = None,
    ) -> list[str]:
        """Samples a continuation of each text with ``rlhf_jax.generation``.

        Batch ``i`` draws with ``fold_in(rng, i)``. Each continuation ends at the model's EOS
        token, after ``sampling.max_new_tokens`` tokens, or before the first of
        ``stop_strings``.

        Args:
          texts: ``N`` strings.
          sampling: response width, temperature, filters, greedy (`SamplingParams`).
          rng: PRNG key (not needed with ``sampling.greedy``).
          stop_strings: a continuation is cut before the first of these.
          names: how errors name each text (default ``"text[i]"``).

        Returns:
          ``N`` decoded continuations (special tokens removed).
        """
        if rng is None and not sampling.greedy:
            raise ValueError("rng is required unless sampling.greedy is set")
        max_new_tokens = sampling.max_new_tokens
        rows = self.encode_texts(texts, names=names)
        out: list[str] = []
        for index, (_, chunk) in enumerate(self._batches(rows)):
            ids, mask = self._left_pad(chunk, extra=max_new_tokens)
            if self.max_length is not None and ids.shape[1] + max_new_tokens > self.max_length:
                raise ValueError(
                    f"a prompt of {max(len(r) for r in chunk)} tokens plus max_new_tokens="
                    f"{max_new_tokens} exceeds max_length={self.max_length}"
                )
            result = generate_with_state(
                self.graphdef,
                self.state,
                ids,
                mask,
                sampling,
                rng=None if rng is None else jax.random.fold_in(rng, index),
                eos_token_id=self.eos_token_id,
                pad_token_id=self.pad_token_id,
                mesh=self.mesh,
            )
            tokens = np.asarray(result.tokens)[: len(chunk)]
            masks = np.asarray(result.mask)[: len(chunk)].astype(bool)
            for row, m in zip(tokens, masks):
                ids_kept = [int(t) for t in row[m] if t != self.eos_token_id]
                out.append(_cut(decode(self.tokenizer, ids_kept), stop_strings))
        return out


def _cut(text: str, stop_strings: Sequence[str]) -> str:
    cut = len(text)
    for s in stop_strings:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


class TextModelLabeler:
    """What the LM labelers (`PairwiseJudge`, `DirectScorer`) share: the `TextModel` over the
    labeler LM, the chain-of-thought settings, and construction from a split model."""

    def _init_text_model(
        self,
        model: nnx.Module | None,
        tokenizer: Any,
        *,
        batch_size: int,
        mesh: jax.sharding.Mesh | None,
        max_length: int | None,
        min_bucket: int,
        rationale_tokens: int,
        rationale_temperature: float,
        text_model: TextModel | None,
    ) -> None:
        if rationale_temperature < 0:
            raise ValueError(f"rationale_temperature must be >= 0, got {rationale_temperature}")
        self.rationale_tokens = rationale_tokens
        self.rationale_temperature = rationale_temperature
        greedy = rationale_temperature == 0
        self.rationale_sampling = SamplingParams(
            max_new_tokens=rationale_tokens,
            temperature=1.0 if greedy else rationale_temperature,
            greedy=greedy,
        )
        """How chain-of-thought rationales are sampled (greedy when the temperature is 0)."""
        self.lm = text_model or TextModel(
            model,
            tokenizer,
            batch_size=batch_size,
            mesh=mesh,
            max_length=max_length,
            min_bucket=min_bucket,
        )

    @classmethod
    def from_state(cls, graphdef: Any, state: Any, tokenizer: Any, **kwargs: Any):
        """A labeler over an already split model ``(graphdef, state)`` (e.g. a trainer's
        current parameters); ``kwargs`` are the labeler's constructor options."""
        lm_kwargs = {k: kwargs.pop(k) for k in TEXT_MODEL_OPTIONS if k in kwargs}
        lm = TextModel.from_state(graphdef, state, tokenizer, **lm_kwargs)
        return cls(None, tokenizer, _text_model=lm, **kwargs)
