"""A character-level Hugging Face tokenizer built locally (no download) for the synthetic tasks."""

from __future__ import annotations

import copy
import functools
from typing import TYPE_CHECKING

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
ROLE_TOKENS: tuple[str, ...] = ("<system>", "<user>", "<assistant>")
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, *ROLE_TOKENS)
LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
PUNCTUATION = " >=+-.,:;?"
SYMBOLS: tuple[str, ...] = tuple(LETTERS + DIGITS + PUNCTUATION + "\n")
VOCAB: tuple[str, ...] = SPECIAL_TOKENS + SYMBOLS
SEPARATOR = ">"

# One turn per message; an assistant turn ends with EOS, so the loss mask of a conversation
# covers the assistant's content and its closing EOS.
CHAT_TEMPLATE = (
    "{% for message in messages %}<{{ message['role'] }}>{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}<eos>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@functools.cache
def _tokenizer() -> PreTrainedTokenizerFast:
    # A heavy import needed by this path only: every trainer imports this module
    # (`rlhf_jax.train.builders`), and `transformers` (with torch, where installed) would add
    # 0.1-0.3 GiB to the resident set of every training process that never builds it.
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        padding_side="right",
        model_max_length=512,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level `PreTrainedTokenizerFast` over a 54-token vocabulary.

    Every symbol (`a-z`, `0-9`, space, newline and ``>=+-.,:;?``) is one token; special tokens are
    ``<pad>`` (id 0), ``<bos>`` (1), ``<eos>`` (2), ``<unk>`` (3) and the chat roles ``<system>``,
    ``<user>``, ``<assistant>``. Decoding concatenates characters. The tokenizer has a chat
    template, does not add BOS/EOS by itself, and round-trips through `save_pretrained` /
    `AutoTokenizer.from_pretrained`. Each call returns a fresh copy.
    """
    return copy.deepcopy(_tokenizer())


def symbol_ids() -> dict[str, int]:
    """Map from each symbol and special token to its id (the tokenizer's vocabulary)."""
    return {tok: i for i, tok in enumerate(VOCAB)}
