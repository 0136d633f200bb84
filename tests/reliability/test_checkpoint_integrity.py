"""Checkpoint integrity: a CRC32C manifest beside each step, verified on restore (flipped,
truncated and deleted bytes are named), and rotation that never deletes the newest finite step."""

from __future__ import annotations

import json
import subprocess
import sys

import google_crc32c
import numpy as np
import pytest
from etils import epath

from rlhf_jax.train.checkpoint import (
    CHECKSUM_FILE,
    CheckpointDamagedError,
    Checkpointer,
    all_finite,
    file_crc32c,
    step_files,
    verify_share,
)


def _save(root, steps, *, values=None, keep_last=None):
    with Checkpointer(root, keep_last=keep_last) as ckpt:
        for step in steps:
            value = float(step) if values is None else values[step]
            assert ckpt.save(step, {"w": np.full(256, value, np.float32)}, config={"seed": 0})
        return ckpt.all_steps()


def _array_files(step_dir):
    return sorted(f for f in (step_dir / "state").rglob("*") if f.is_file()
                  and "/d/" in f.as_posix() and f.stat().st_size > 0)


def test_manifest_lists_every_file_with_size_and_crc32c(tmp_path):
    _save(tmp_path, [1])
    manifest = json.loads((tmp_path / "1" / CHECKSUM_FILE).read_text())
    on_disk = {f.relative_to(tmp_path / "1").as_posix(): f.stat().st_size
               for f in (tmp_path / "1").rglob("*") if f.is_file() and f.name != CHECKSUM_FILE}
    assert manifest["algorithm"] == "crc32c" and manifest["finite"] is True
    assert {k: v["size"] for k, v in manifest["files"].items()} == on_disk


def test_flipped_bytes_are_found_and_the_newest_intact_step_restores(tmp_path, caplog):
    _save(tmp_path, [1, 2])
    victim = _array_files(tmp_path / "2")[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, inside the array's bytes
    victim.write_bytes(bytes(data))
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointDamagedError, match="fails its checksum"):
            ckpt.restore({"w": np.zeros(256, np.float32)}, step=2)
        restored = ckpt.restore_newest_intact({"w": np.zeros(256, np.float32)})
    assert restored.step == 1
    np.testing.assert_array_equal(np.asarray(restored.state["w"]), np.full(256, 1.0))
    assert victim.name in caplog.text and "fails its checksum" in caplog.text


def test_every_step_damaged_is_one_error_naming_each_file(tmp_path):
    _save(tmp_path, [1, 2])
    for step in (1, 2):
        _array_files(tmp_path / str(step))[0].unlink()
    with Checkpointer(tmp_path) as ckpt, pytest.raises(CheckpointDamagedError,
                                                       match=r"step 2: .* is missing.*step 1: "):
        ckpt.restore_newest_intact({"w": np.zeros(256, np.float32)})


def test_a_step_without_manifest_restores_unverified_with_a_warning(tmp_path, caplog):
    _save(tmp_path, [1])
    (tmp_path / "1" / CHECKSUM_FILE).unlink()  # e.g. killed between orbax's commit and it
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore({"w": np.zeros(256, np.float32)}).step == 1
    assert "restored unverified" in caplog.text


def test_the_stored_config_comes_from_a_verified_step(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"w": np.zeros(4)}, config={"seed": 1})
        ckpt.save(2, {"w": np.zeros(4)}, config={"seed": 2})
    config = tmp_path / "2" / "config" / "metadata"
    config.write_text(config.read_text().replace("2", "3"))
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.stored_config() == {"seed": 1}


def test_rotation_never_deletes_the_newest_finite_step(tmp_path):
    values = {1: 1.0, 2: 2.0, 3: np.nan, 4: np.inf, 5: np.nan}
    steps = _save(tmp_path, [1, 2, 3, 4, 5], values=values, keep_last=2)
    assert steps == [2, 4, 5]  # 2 is the newest finite state; 1 and 3 rotate out
    with Checkpointer(tmp_path, keep_last=2) as ckpt:
        assert [ckpt.finite(s) for s in steps] == [True, False, False]
        assert ckpt.save(6, {"w": np.full(256, 6.0, np.float32)})
        assert ckpt.all_steps() == [5, 6]


def test_all_finite():
    assert all_finite({"a": np.ones(3), "b": np.arange(3), "c": np.zeros((), np.float16)})
    assert not all_finite({"a": np.ones(3), "b": np.array([1.0, np.inf])})
    assert all_finite({"i": np.array([2**31 - 1], np.int32)})


def test_checksums_work_on_a_bucket(gcs_bucket):
    root = epath.Path(gcs_bucket) / "step"
    (root / "state" / "d").mkdir(parents=True)
    (root / "state" / "d" / "a").write_bytes(b"abc" * 1000)
    (root / "config").write_text("{}")
    files = [p.relative_to(root).as_posix() for p in step_files(root)]
    assert files == ["config", "state/d/a"]
    assert file_crc32c(root / "state" / "d" / "a") == (3000, google_crc32c.value(b"abc" * 1000)
                                                       .to_bytes(4, "big").hex())


class TestVerifyShare:
    SIZES = {"a": 10, "b": 700, "c": 5, "d": 300, "e": 300, "f": 1, "g": 90}

    @pytest.mark.parametrize("count", [1, 2, 3, 7, 9])
    def test_shares_are_disjoint_cover_every_file_and_balance_bytes(self, count):
        shares = [verify_share(self.SIZES, process_index=i, process_count=count)
                  for i in range(count)]
        names = [n for share in shares for n in share]
        assert sorted(names) == sorted(self.SIZES)  # each file once, none left out
        loads = [sum(self.SIZES[n] for n in share) for share in shares]
        total = sum(self.SIZES.values())
        assert max(loads) <= total / count + max(self.SIZES.values())
        assert all(share == sorted(share) for share in shares)

    def test_two_processes_split_the_bytes_evenly_here(self):
        assert verify_share(self.SIZES, process_index=0, process_count=2) == ["b", "c"]  # 705 bytes
        assert verify_share(self.SIZES, process_index=1, process_count=2) == ["a", "d", "e", "f", "g"]  # 701

    def test_bad_index(self):
        with pytest.raises(ValueError, match=r"process_index=2 is not in \[0, 2\)"):
            verify_share(self.SIZES, process_index=2, process_count=2)


_VERIFY_ON_EACH_PROCESS = """
import json, sys
from rlhf_jax.sharding import initialize_distributed
initialize_distributed()
import jax
from rlhf_jax.train import checkpoint as C
read, crc = [], C.file_crc32c
C.file_crc32c = lambda path: read.append(path.as_posix()) or crc(path)
with C.Checkpointer(sys.argv[1], keep_last=None) as ckpt:
    intact = ckpt.verify(1)
    try:
        ckpt.verify(2)
        damaged = None
    except C.CheckpointDamagedError as e:
        damaged = str(e)
print("RESULT", json.dumps({"intact": intact, "damaged": damaged, "read": read}), flush=True)
"""


def test_two_processes_read_disjoint_shares_and_agree(tmp_path):
    """Two real processes (`rlhf_jax.launch`, gloo): each reads its share of step 1's files, the
    shares cover them, and both name the same flipped file of step 2, which one of them read."""
    _save(tmp_path, [1, 2])
    victim = _array_files(tmp_path / "2")[-1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    out = subprocess.run(
        [sys.executable, "-m", "rlhf_jax.launch", "--num-processes", "2",
         "--devices-per-process", "1", "--", sys.executable, "-c", _VERIFY_ON_EACH_PROCESS,
         str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert out.returncode == 0, out.stdout
    results = {line.split()[0]: json.loads(line.split(" RESULT ", 1)[1])
               for line in out.stdout.splitlines() if " RESULT " in line}
    assert sorted(results) == ["[0]", "[1]"], out.stdout
    step1 = {f.as_posix() for f in step_files(epath.Path(tmp_path / "1"))}
    reads = [{p for p in r["read"] if "/1/" in p} for r in results.values()]
    assert reads[0] and reads[1] and not reads[0] & reads[1]
    assert reads[0] | reads[1] == step1
    assert all(r["intact"] for r in results.values())
    [message] = {r["damaged"] for r in results.values()}  # the same error on both
    assert message.startswith(f"{victim} fails its checksum (crc32c ")
    assert sum(victim.as_posix() in r["read"] for r in results.values()) == 1
