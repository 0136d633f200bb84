"""Every record format from every source (JSONL, parquet, HF datasets, TFDS) into batches."""

import json
import subprocess
import sys

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_jax import data as D
from rlhf_jax.data import synthetic as S

H, A = "\n\nHuman:", "\n\nAssistant:"
N = 8


def _records() -> dict[str, tuple[str, list[dict]]]:
    """name -> (format, records)."""
    task = S.get_task("topic")
    sft = S.make_sft_dataset(task, num_examples=N, seed=0)
    prefs, _ = S.make_preference_dataset(
        task, num_pairs=N, seed=1, rater_config=S.RaterConfig(consensus="mean", raters_per_item=4)
    )
    ranks, _ = S.make_ranking_dataset(task, num_prompts=N, num_responses=3, seed=2)
    prompts = [{**r, "difficulty": i % 3} for i, r in enumerate(S.make_prompt_dataset(task, num_prompts=N))]
    kto = [{**r, "label": i % 2 == 0} for i, r in enumerate(sft)]
    messages = [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
        for r in sft
    ]
    conv_prefs = [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
            "label": r["label"],
        }
        for r in prefs
    ]
    hh = [
        {"chosen": f"{H} ab {i}{A} cd {i}", "rejected": f"{H} ab {i}{A} ef"} for i in range(N)
    ]
    return {
        "sft": ("sft", sft),
        "sft_messages": ("sft", messages),
        "preference": ("preference", prefs),
        "preference_conversations": ("preference", conv_prefs),
        "hh": ("hh", hh),
        "ranking": ("ranking", ranks),
        "kto": ("kto", kto),
        "prompt": ("prompt", prompts),
    }


RECORDS = _records()
SOURCES = ["records", "jsonl", "parquet", "hf_disk", "hf_files", "tfds"]
EXPECTED_KEYS = {
    "sft": set(D.TOKEN_KEYS),
    "preference": {p + k for p in ("chosen_", "rejected_") for k in D.TOKEN_KEYS} | {"margin", "label"},
    "hh": {p + k for p in ("chosen_", "rejected_") for k in D.TOKEN_KEYS} | {"margin", "label"},
    "ranking": set(D.TOKEN_KEYS) | {"ranks", "response_mask"},
    "kto": set(D.TOKEN_KEYS) | {"kl_" + k for k in D.TOKEN_KEYS} | {"label"},
    "prompt": {"prompt_ids", "prompt_mask", "prompt_positions", "prompt_segment_ids", "prompt_index", "difficulty"},
}


def _write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """name -> {source_type: (source, extra kwargs)}."""
    root = tmp_path_factory.mktemp("sources")
    out = {}
    for name, (fmt, records) in RECORDS.items():
        jsonl = root / f"{name}.jsonl"
        _write_jsonl(jsonl, records)
        parquet = root / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(records), parquet)
        hf_dir = root / f"{name}_hf"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(str(hf_dir))
        tfds_dir, reports = D.build_tfds_dataset(
            {"train": jsonl}, name=name, data_dir=root / "tfds", format=fmt
        )
        assert reports["train"].num_loaded == N
        out[name] = {
            "records": (records, {}),
            "jsonl": (jsonl, {}),
            "parquet": (parquet, {}),
            "hf_disk": (hf_dir, {}),
            "hf_files": ([jsonl], {"source_type": "hf_files"}),
            "tfds": (name, {"source_type": "tfds", "data_dir": root / "tfds"}),
        }
    return out


def _batches(source, fmt, kwargs, n=2):
    loader, report = D.make_loader(
        source,
        format=fmt,
        tokenizer=S.build_tokenizer(),
        batch_config=D.BatchConfig(batch_size=4, length_buckets=(32, 64, 128)),
        shuffle=False,
        shard_index=0,
        shard_count=1,
        **kwargs,
    )
    assert report.num_read == N and report.num_loaded == N and report.num_skipped == 0
    return [next(loader) for _ in range(n)]


@pytest.mark.parametrize("name", sorted(RECORDS))
@pytest.mark.parametrize("source_type", SOURCES)
def test_format_from_source_into_batches(sources, name, source_type):
    fmt, _ = RECORDS[name]
    source, kwargs = sources[name][source_type]
    got = _batches(source, fmt, kwargs)
    want = _batches(RECORDS[name][1], fmt, {}) if source_type != "records" else got
    for g, w in zip(got, want):
        assert set(g) == EXPECTED_KEYS[fmt]
        for key in w:
            np.testing.assert_array_equal(g[key], w[key], err_msg=f"{name}/{source_type}/{key}")
    leading = got[0]["prompt_ids" if fmt == "prompt" else sorted(got[0])[0]].shape[0]
    assert leading == 4


def test_tfds_reads_without_tensorflow(sources, tmp_path):
    """A fresh interpreter reads the array_record data through tfds and never imports TF."""
    data_dir = sources["preference"]["tfds"][1]["data_dir"]
    code = (
        "import sys, tensorflow_datasets as tfds\n"
        f"ds = tfds.data_source('preference', data_dir={str(data_dir)!r}, split='train')\n"
        f"b = tfds.builder('preference', data_dir={str(data_dir)!r}).as_data_source()['train']\n"
        "assert len(ds) == len(b) == 8, len(ds)\n"
        "assert ds[0]['record'] == b[0]['record']\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
        "try:\n    import tensorflow\nexcept ImportError:\n    print('NO_TF')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "NO_TF" in out.stdout


def test_tfds_origin_names_source_line(sources):
    examples, _ = D.load_examples(
        "hh", format="hh", source_type="tfds", data_dir=sources["hh"]["tfds"][1]["data_dir"]
    )
    assert examples[2].origin.startswith("tfds:hh/train:row 2 (")
    assert examples[2].origin.endswith("hh.jsonl:3)")


def test_tfds_builder_validates_rows(tmp_path):
    path = tmp_path / "bad.jsonl"
    _write_jsonl(path, [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}])
    with pytest.raises(D.RecordError, match=rf"{path}:2: missing field 'rejected'"):
        D.build_tfds_dataset(path, name="bad_rows", data_dir=tmp_path / "tfds", format="preference")
    _, reports = D.build_tfds_dataset(
        path, name="bad_rows_skipped", data_dir=tmp_path / "tfds", format="preference", on_error="skip"
    )
    assert reports["train"].skipped == {"missing_field": 1} and reports["train"].num_loaded == 1


def test_parquet_rows_are_named(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": " "}]), path)
    with pytest.raises(D.RecordError, match=rf"^{path}:row 1: field 'completion' is empty"):
        D.load_examples(path, format="sft")


def test_hf_dataset_rows_are_named(tmp_path):
    ds = datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "b"}])
    ds.save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(D.RecordError, match=r"ds:row 0: chosen and rejected are identical"):
        D.load_examples(tmp_path / "ds", format="preference")
    with pytest.raises(ValueError, match="split 'test' not found"):
        datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
        D.load_examples(tmp_path / "dd", format="preference", split="test")


def test_detect_source_type(tmp_path):
    assert D.detect_source_type([{"a": 1}]) == "records"
    assert D.detect_source_type(tmp_path / "x.jsonl") == "jsonl"
    assert D.detect_source_type(tmp_path / "x.parquet") == "parquet"
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(ValueError, match="pass source_type"):
        D.detect_source_type(tmp_path / "x.csv")
