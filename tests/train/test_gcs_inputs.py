"""Model directories and data files read from Cloud Storage (the emulated bucket) by the CLI and
model sources."""

import json
import pathlib

import numpy as np
from etils import epath

from rlhf_jax import cli
from rlhf_jax.models import from_pretrained
from rlhf_jax.train.logging import read_metrics
from rlhf_jax.train.model_source import load_lm, parse_source

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hf"


def _upload(src: pathlib.Path, dst: epath.Path) -> str:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        epath.Path(f).copy(dst / f.name)
    return str(dst)


def _write_sft(path: pathlib.Path, n: int = 16) -> None:
    rows = [{"prompt": "hello world ", "completion": "the reward " * (1 + i % 3)}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_sft_cli_reads_model_tokenizer_and_data_from_the_bucket(gcs_bucket, tmp_path):
    model_dir = _upload(FIXTURES / "gpt2", epath.Path(gcs_bucket) / "models" / "gpt2")
    _write_sft(tmp_path / "sft.jsonl")
    remote_data = epath.Path(gcs_bucket) / "data" / "train.jsonl"
    remote_data.parent.mkdir(parents=True, exist_ok=True)
    epath.Path(tmp_path / "sft.jsonl").copy(remote_data)
    args = ["--num-steps", "1", "--data.batch-size", "8", "--data.num-eval", "0",
            "--data.max-length", "32", "--logging.progress", "none"]
    assert cli.main(["sft", "--model.path", model_dir, "--data.path", str(remote_data),
                     "--output-dir", str(tmp_path / "remote"), *args]) == 0
    assert cli.main(["sft", "--model.path", str(FIXTURES / "gpt2"),
                     "--data.path", str(tmp_path / "sft.jsonl"),
                     "--output-dir", str(tmp_path / "local"), *args]) == 0
    remote, local = read_metrics(tmp_path / "remote"), read_metrics(tmp_path / "local")
    assert len(remote) == 1
    assert remote[0]["sft/loss"] == local[0]["sft/loss"]
    assert remote[0]["sft/num_tokens"] == local[0]["sft/num_tokens"] > 0


def test_model_source_names_a_bucket_directory(gcs_bucket):
    model_dir = _upload(FIXTURES / "gpt2", epath.Path(gcs_bucket) / "gpt2")
    assert parse_source(model_dir) == ("hf", model_dir, None)
    loaded = load_lm(model_dir)
    assert loaded.kind == "hf" and len(loaded.tokenizer) <= loaded.model.config.vocab_size
    np.testing.assert_array_equal(
        np.asarray(loaded.model.backbone.embed.embedding[...]),
        np.asarray(from_pretrained(FIXTURES / "gpt2").backbone.embed.embedding[...]))
