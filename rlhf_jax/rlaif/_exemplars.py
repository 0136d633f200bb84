"""Few-shot exemplar files for the pairwise judge.

An exemplar file is JSON Lines (one exemplar per line), YAML or JSON (a list of exemplars, or a
mapping with an ``exemplars`` list). Each exemplar is a mapping with ``prompt``, ``response_1``,
``response_2`` (strings) and ``preferred`` (1 or 2), and optionally ``rationale`` (shown when the
judge uses chain of thought) and ``principle``: the fields of :class:`Exemplar`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import yaml
from etils import epath

from rlhf_jax.rlaif._templates import Exemplar

_REQUIRED = ("prompt", "response_1", "response_2", "preferred")
_OPTIONAL = ("rationale", "principle")


def exemplar_from_mapping(entry: Any, where: str) -> Exemplar:
    """One :class:`Exemplar` from a parsed mapping; errors start with ``where``."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: an exemplar must be a mapping, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; allowed: "
                         f"{list(_REQUIRED + _OPTIONAL)}")
    for field in _REQUIRED[:3]:
        if not isinstance(entry.get(field), str):
            raise ValueError(f"{where}: field {field!r} is missing or not a string")
    preferred = entry.get("preferred")
    if isinstance(preferred, bool) or preferred not in (1, 2):
        raise ValueError(f"{where}: field 'preferred' must be 1 or 2, got {preferred!r}")
    for field in _OPTIONAL:
        if entry.get(field) is not None and not isinstance(entry[field], str):
            raise ValueError(f"{where}: field {field!r} must be a string")
    return Exemplar(prompt=entry["prompt"], response_1=entry["response_1"],
                    response_2=entry["response_2"], preferred=int(preferred),
                    rationale=entry.get("rationale"), principle=entry.get("principle"))


def load_exemplars(path: str | os.PathLike) -> tuple[Exemplar, ...]:
    """Reads few-shot exemplars from a ``.jsonl``, ``.yaml``/``.yml`` or ``.json`` file (local
    or ``gs://``).

    Raises:
      ValueError: naming the file (and line, for JSON Lines) on malformed content, a missing or
        mistyped field, an unknown field, or a file with no exemplar.
    """
    file = epath.Path(path)
    path = os.fspath(file)
    text = file.read_text(encoding="utf-8")
    ext = file.suffix.lower()
    if ext == ".jsonl":
        out = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {e}") from None
            out.append(exemplar_from_mapping(entry, f"{path}:{lineno}"))
    elif ext in (".yaml", ".yml", ".json"):
        try:
            data = json.loads(text) if ext == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ValueError(f"{path}: cannot parse: {e}") from None
        if isinstance(data, dict):
            unknown = sorted(set(data) - {"exemplars"})
            if unknown:
                raise ValueError(f"{path}: unknown top-level field(s) {unknown}; allowed: "
                                 "exemplars")
            data = data.get("exemplars")
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a list of exemplars (or a mapping with an "
                             "'exemplars' list)")
        out = [exemplar_from_mapping(e, f"{path}: exemplar {i}") for i, e in enumerate(data)]
    else:
        raise ValueError(f"{path}: unsupported exemplar file format {ext!r}; use .jsonl, .yaml, "
                         ".yml or .json")
    if not out:
        raise ValueError(f"{path}: no exemplar in the file")
    return tuple(out)


__all__ = ["exemplar_from_mapping", "load_exemplars"]
