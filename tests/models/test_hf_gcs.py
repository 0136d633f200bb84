"""Hugging Face directories on Cloud Storage (the emulated bucket): save, load, tokenizer."""

import pathlib

import jax
import numpy as np
import pytest
from etils import epath
from flax import nnx

from rlhf_jax.models import (
    CheckpointError,
    from_pretrained,
    load_tokenizer,
    save_pretrained,
)

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hf"


def _params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


def _assert_same_params(a, b):
    for x, y in zip(_params(a), _params(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _upload(src: pathlib.Path, dst: epath.Path) -> epath.Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        epath.Path(f).copy(dst / f.name)
    return dst


def test_save_to_bucket_and_load_back(gcs_bucket):
    model = from_pretrained(FIXTURES / "gpt2")
    tokenizer = load_tokenizer(FIXTURES / "gpt2")
    out = save_pretrained(model, f"{gcs_bucket}/models/gpt2", tokenizer=tokenizer)
    assert str(out) == f"{gcs_bucket}/models/gpt2"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(n.startswith(".") for n in names)  # no staging leftovers
    _assert_same_params(model, from_pretrained(out))
    again = load_tokenizer(out)
    assert again("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]


def test_sharded_bucket_directory_loads(gcs_bucket):
    model = from_pretrained(FIXTURES / "llama")
    out = save_pretrained(model, epath.Path(gcs_bucket) / "llama", max_shard_bytes=30_000)
    shards = [p.name for p in out.glob("model-*.safetensors")]
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    _assert_same_params(model, from_pretrained(out))


def test_bucket_directory_written_elsewhere_loads(gcs_bucket):
    """A directory uploaded as is (transformers' own files) reads like the local one."""
    remote = _upload(FIXTURES / "qwen2", epath.Path(gcs_bucket) / "qwen2")
    _assert_same_params(from_pretrained(FIXTURES / "qwen2"), from_pretrained(remote))


def test_bucket_errors_name_the_remote_path(gcs_bucket):
    remote = epath.Path(gcs_bucket) / "empty"
    with pytest.raises(CheckpointError, match=f"{gcs_bucket}/empty: no config.json"):
        from_pretrained(remote)
    remote.mkdir(parents=True)
    (remote / "config.json").write_text((FIXTURES / "gpt2" / "config.json").read_text())
    with pytest.raises(CheckpointError, match=f"{gcs_bucket}/empty: no model.safetensors"):
        from_pretrained(remote)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_tokenizer(epath.Path(gcs_bucket) / "missing")



def test_saving_again_into_a_bucket_directory_replaces_only_its_own_weights(gcs_bucket):
    """Re-saving deletes the previous save's weight files on the bucket (single file -> shards ->
    single file) and keeps a file it did not write."""
    model = from_pretrained(FIXTURES / "llama")
    out = epath.Path(gcs_bucket) / "again"
    save_pretrained(model, out)
    (out / "model_original_backup.safetensors").write_bytes(b"the user's")
    save_pretrained(model, out, max_shard_bytes=30_000)
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names
    assert len([n for n in names if n.startswith("model-")]) > 1
    _assert_same_params(model, from_pretrained(out))
    save_pretrained(model, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.safetensors", "model_original_backup.safetensors"]
    assert (out / "model_original_backup.safetensors").read_bytes() == b"the user's"
    _assert_same_params(model, from_pretrained(out))
