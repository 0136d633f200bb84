"""Turn Anthropic HH-RLHF files into the record files the real-model pipelines read.

    python -m experiments.prepare_hh --input hh-rlhf/helpful-base/train.jsonl.gz \
        --output-dir data/hh-rlhf --split train [--limit N]

Reads raw transcript pairs ``{"chosen", "rejected"}`` (`.jsonl` or `.jsonl.gz`, as distributed
by Anthropic, from local disk) and writes, with `rlhf_jax.data.split_hh_transcripts`:

- `sft_<split>.jsonl`: ``{"prompt", "completion"}`` with the chosen response (SFT on the
  preferred responses, as the DPO paper's "Preferred-FT" baseline and SFT stage);
- `preference_<split>.jsonl`: ``{"prompt", "chosen", "rejected"}`` (reward model, DPO);
- `prompt_<split>.jsonl`: ``{"prompt"}``, one per distinct prompt (PPO rollouts).

Pairs that cannot be split are counted by reason and reported, never dropped silently.
"""

from __future__ import annotations

import argparse
import gzip
import json
import pathlib
import sys
from collections import Counter
from collections.abc import Iterator, Sequence

from rlhf_jax.data import HHParseError, split_hh_transcripts


def _lines(path: pathlib.Path) -> Iterator[tuple[int, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                yield i, line


def convert(inputs: Sequence[pathlib.Path], output_dir: pathlib.Path, *, split: str,
            limit: int | None = None) -> dict[str, int]:
    """Writes the three files; returns counts (`written`, `prompts` and `skipped/<reason>`)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    counts: Counter[str] = Counter()
    seen_prompts: set[str] = set()
    files = {k: open(output_dir / f"{k}_{split}.jsonl", "w", encoding="utf-8")
             for k in ("sft", "preference", "prompt")}
    try:
        for path in inputs:
            for line_no, line in _lines(path):
                if limit is not None and counts["written"] >= limit:
                    break
                try:
                    record = json.loads(line)
                    pair = split_hh_transcripts(record["chosen"], record["rejected"])
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
                except KeyError as e:
                    raise ValueError(f"{path}:{line_no}: missing field {e.args[0]!r} "
                                     "(HH-RLHF records have 'chosen' and 'rejected')") from None
                except HHParseError as e:
                    counts[f"skipped/{e.reason}"] += 1
                    continue
                if pair.chosen == pair.rejected:
                    counts["skipped/identical_responses"] += 1
                    continue
                files["sft"].write(json.dumps(
                    {"prompt": pair.prompt, "completion": pair.chosen}) + "\n")
                files["preference"].write(json.dumps(
                    {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected})
                    + "\n")
                if pair.prompt not in seen_prompts:
                    seen_prompts.add(pair.prompt)
                    files["prompt"].write(json.dumps({"prompt": pair.prompt}) + "\n")
                counts["written"] += 1
    finally:
        for f in files.values():
            f.close()
    counts["prompts"] = len(seen_prompts)
    return dict(counts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.prepare_hh",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, type=pathlib.Path,
                        help="HH-RLHF .jsonl or .jsonl.gz files (local)")
    parser.add_argument("--output-dir", required=True, type=pathlib.Path)
    parser.add_argument("--split", default="train", help="suffix of the output files")
    parser.add_argument("--limit", type=int, default=None, help="stop after N pairs")
    args = parser.parse_args(argv)
    for path in args.input:
        if not path.is_file():
            parser.error(f"--input {str(path)!r} does not exist")
    try:
        counts = convert(args.input, args.output_dir, split=args.split, limit=args.limit)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(counts, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
