"""Record sources on Cloud Storage (the emulated bucket), empty sources, and streamed JSONL."""

import json
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from etils import epath

from rlhf_jax.data import load_examples, read_jsonl
from rlhf_jax.rlaif import load_constitution

ROWS = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]


def test_jsonl_and_parquet_from_the_bucket(gcs_bucket, tmp_path):
    jsonl = epath.Path(gcs_bucket) / "data" / "train.jsonl"
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "not json\n")
    examples, report = load_examples(str(jsonl), format="sft", on_error="skip", log=False)
    assert [e.prompt for e in examples] == [r["prompt"] for r in ROWS]
    assert report.skipped == {"undecodable": 1}
    assert report.first_skipped[0].startswith(f"{jsonl}:6: invalid JSON")

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "train.parquet")
    parquet = epath.Path(gcs_bucket) / "data" / "train.parquet"
    epath.Path(tmp_path / "train.parquet").copy(parquet)
    examples, _ = load_examples(str(parquet), format="sft", log=False)
    assert [e.completion for e in examples] == [r["completion"] for r in ROWS]


def test_constitution_from_the_bucket(gcs_bucket):
    path = epath.Path(gcs_bucket) / "c.jsonl"
    path.write_text(json.dumps({"critique_request": "Is it kind?",
                                "revision_request": "Make it kind."}) + "\n")
    constitution = load_constitution(str(path))
    assert constitution.name == "c" and len(constitution.principles) == 1


@pytest.mark.parametrize("text", ["", "\n  \n\t\n"])
def test_empty_or_blank_jsonl_names_the_file(tmp_path, text):
    path = tmp_path / "empty.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"{path}: no rows to read .*blank lines"):
        load_examples(path, format="sft", log=False)


def test_a_long_line_is_read_whole_in_memory_of_the_order_of_the_line(tmp_path):
    big = "x" * 10_000_000
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completion": big}) + "\n"
                    + json.dumps({"prompt": "q", "completion": "y"}) + "\n")
    tracemalloc.start()
    try:
        rows = [record for _, record in read_jsonl(path)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rows[0]["completion"] == big and rows[1] == {"prompt": "q", "completion": "y"}
    # The line's bytes, its decoded text and the parsed string (plus the kept result): a few
    # times 10 MB, never the gigabytes of a per-character representation.
    assert peak < 60_000_000, peak
