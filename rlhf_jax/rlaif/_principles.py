"""Constitutions: principles as (critique request, revision request, preference question).

A constitution file is YAML (``principles:`` list, optional ``name:``) or JSONL (one principle
per line), each principle a mapping with ``critique_request`` and ``revision_request`` (required,
non-empty strings) and optionally ``name`` and ``preference`` (the question the preference judge
answers when comparing two responses under this principle, as in Bai et al. 2022, sec. 4.1).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import yaml
from etils import epath

_REQUIRED = ("critique_request", "revision_request")
_OPTIONAL = ("name", "preference")


@dataclasses.dataclass(frozen=True)
class Principle:
    """One constitutional principle.

    Attributes:
      critique_request: asks the model to critique its last response.
      revision_request: asks the model to revise the response given the critique.
      name: short identifier (defaults to ``"principle_<index>"`` when loaded).
      preference: question for the pairwise judge; defaults to one built from the critique
        request.
    """

    critique_request: str
    revision_request: str
    name: str = ""
    preference: str | None = None

    def __post_init__(self):
        for field in _REQUIRED:
            value = getattr(self, field)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"Principle {self.name!r}: {field} must be a non-empty string")

    @property
    def preference_question(self) -> str:
        """The question the preference judge answers under this principle."""
        if self.preference:
            return self.preference
        return (
            "Which of these assistant responses better addresses the following concern? "
            + self.critique_request
        )


@dataclasses.dataclass(frozen=True)
class Constitution:
    """An ordered, non-empty set of principles.

    Attributes:
      principles: the principles.
      name: the constitution's name.
    """

    principles: tuple[Principle, ...]
    name: str = "constitution"

    def __post_init__(self):
        object.__setattr__(self, "principles", tuple(self.principles))
        if not self.principles:
            raise ValueError(f"constitution {self.name!r} is empty: it needs at least one principle")
        names = [p.name for p in self.principles]
        duplicates = sorted({n for n in names if n and names.count(n) > 1})
        if duplicates:
            raise ValueError(f"constitution {self.name!r} has duplicate principle names {duplicates}")

    def __len__(self) -> int:
        return len(self.principles)

    def __getitem__(self, index: int) -> Principle:
        return self.principles[index]

    def sample_indices(self, rng: jax.Array, shape: Sequence[int]) -> np.ndarray:
        """Uniformly drawn principle indices (with replacement), from an explicit PRNG key.

        Args:
          rng: a ``jax.random`` key.
          shape: the output shape, e.g. ``(num_prompts, num_rounds)``.

        Returns:
          int64 NumPy array of ``shape`` with values in ``[0, len(self))``.
        """
        return np.asarray(jax.random.randint(rng, tuple(shape), 0, len(self.principles)))


def _principle_from_mapping(entry: Any, where: str, index: int) -> Principle:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: a principle must be a mapping, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise ValueError(
            f"{where}: unknown field(s) {unknown}; allowed: {list(_REQUIRED + _OPTIONAL)}"
        )
    for field in _REQUIRED:
        value = entry.get(field)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}: field {field!r} is missing or not a non-empty string")
    for field in _OPTIONAL:
        value = entry.get(field)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{where}: field {field!r} must be a string")
    return Principle(
        critique_request=entry["critique_request"].strip(),
        revision_request=entry["revision_request"].strip(),
        name=(entry.get("name") or f"principle_{index}").strip(),
        preference=(entry.get("preference") or None),
    )


def parse_constitution(data: Any, *, source: str = "<constitution>") -> Constitution:
    """Builds a :class:`Constitution` from parsed YAML/JSON data.

    Args:
      data: a mapping with a ``principles`` list (and optional ``name``), or a bare list of
        principle mappings.
      source: the file name used in error messages.
    """
    name = os.path.splitext(os.path.basename(source))[0] or "constitution"
    if isinstance(data, dict):
        unknown = sorted(set(data) - {"name", "principles"})
        if unknown:
            raise ValueError(f"{source}: unknown top-level field(s) {unknown}; allowed: name, principles")
        name = data.get("name") or name
        entries = data.get("principles")
        if entries is None:
            raise ValueError(f"{source}: no 'principles' list")
    elif isinstance(data, list):
        entries = data
    elif data is None:
        raise ValueError(f"{source}: the constitution is empty: it needs at least one principle")
    else:
        raise ValueError(f"{source}: expected a mapping with 'principles' or a list")
    if not isinstance(entries, list):
        raise ValueError(f"{source}: 'principles' must be a list")
    if not entries:
        raise ValueError(f"{source}: the constitution is empty: it needs at least one principle")
    principles = [
        _principle_from_mapping(e, f"{source}: principle {i}", i) for i, e in enumerate(entries)
    ]
    return Constitution(principles=tuple(principles), name=str(name))


def load_constitution(path: str | os.PathLike) -> Constitution:
    """Loads a constitution from a ``.yaml``/``.yml``, ``.json`` or ``.jsonl`` file (local or
    ``gs://``).

    Raises:
      ValueError: naming the file (and line, for JSONL) on an empty constitution, malformed
        content, a missing or empty field, or an unknown field.
    """
    file = epath.Path(path)
    path = os.fspath(file)
    text = file.read_text(encoding="utf-8")
    ext = file.suffix.lower()
    if ext == ".jsonl":
        entries = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {e}") from None
            entries.append(_principle_from_mapping(entry, f"{path}:{lineno}", len(entries)))
        if not entries:
            raise ValueError(f"{path}: the constitution is empty: it needs at least one principle")
        name = file.stem
        return Constitution(principles=tuple(entries), name=name)
    if ext in (".yaml", ".yml", ".json"):
        try:
            data = json.loads(text) if ext == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ValueError(f"{path}: cannot parse: {e}") from None
        return parse_constitution(data, source=path)
    raise ValueError(f"{path}: unsupported constitution format {ext!r}; use .yaml, .yml, .json or .jsonl")


def default_constitution() -> Constitution:
    """The constitution shipped with the package (``rlhf_jax/rlaif/constitutions/default.yaml``)."""
    resource = importlib.resources.files("rlhf_jax.rlaif").joinpath("constitutions/default.yaml")
    with importlib.resources.as_file(resource) as path:
        return load_constitution(path)
