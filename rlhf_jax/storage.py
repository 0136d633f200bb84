"""Where a run's files live: local paths and `gs://` URIs alike, through `etils.epath`.

Every file a run reads or writes (``config.yaml``, ``metrics.jsonl``, TensorBoard events,
``summary.json``, reference tables, checkpoints, exports) is addressed as `epath.Path(str)`: a
local path keeps its name and behaviour, a ``gs://BUCKET/...`` URI goes to Cloud Storage (gcsfs
under epath, tensorstore under orbax).

Cloud Storage holds whole objects: there is no append and no rename, and an object written in
one request replaces the old one atomically. Hence:

- `TextLog` is a run's append-only text file (``metrics.jsonl``): locally an open file flushed
  after every record, as always; on a bucket the object is rewritten with everything written so
  far, at most once every `TextLog.sync_seconds` and always on `TextLog.close` (which the
  training loop reaches on SIGTERM, on errors and at the end); the loop also uploads it before
  every checkpoint (`MetricsLogger.sync`). A resumed run drops the lines after its checkpoint,
  so a hard kill loses only lines that the resume recomputes.
- `mirror_dir` copies a local directory to a bucket prefix: TensorBoard event files are written
  to a local staging directory and mirrored (`rlhf_jax.train.logging.MetricsLogger`).
- `write_text_atomic` writes a file so that a reader never sees half of it: a temporary file
  renamed over the target locally, one object upload on a bucket.
- `ensure_dir` creates a local directory; on a bucket it does nothing (prefixes need no
  directory, and creating one would create a missing *bucket* in gcsfs).

`check_storage(config)` is the start-up check every entry point runs before any model is
built: each remote path among the config's fields is probed, and a bucket that does not
exist, a path that is not there, missing credentials or an endpoint that does not answer
within `storage_timeout()` seconds (``RLHF_JAX_STORAGE_TIMEOUT``, default 60) raise one
`StorageError` line naming the field, the URI and the cause. Output directories (fields named
``output_dir``) are probed by writing and deleting a small object, so write permission is
checked too; every other remote field (model, data, run directories) must exist.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import urllib.parse
import uuid
from typing import Any

import fsspec
from etils import epath
from google.auth import exceptions as auth_errors

STORAGE_TIMEOUT_ENV = "RLHF_JAX_STORAGE_TIMEOUT"
"""Environment variable: seconds the start-up check waits for a storage endpoint's answer."""

DEFAULT_STORAGE_TIMEOUT = 60.0

OUTPUT_FIELD = "output_dir"
"""Config fields with this name are written to (probed with a write); others are read."""


class StorageError(RuntimeError):
    """A remote path of a run cannot be used: missing, unreachable or not permitted."""


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is a URI with a scheme and a bucket or host (``gs://B/...``,
    ``s3://B/...``) rather than a local path (or a reference such as ``preset:NAME``)."""
    parts = urllib.parse.urlsplit(os.fspath(path))
    return parts.scheme not in ("", "file") and bool(parts.netloc)


def absolute(path: str | os.PathLike) -> str:
    """`path` as an absolute local path, or the URI unchanged."""
    return os.fspath(path) if is_remote(path) else os.path.abspath(os.fspath(path))


def ensure_dir(path: str | os.PathLike) -> epath.Path:
    """Creates the local directory `path` (and its parents); a remote prefix is left as is.
    Returns `path` as an `epath.Path`."""
    directory = epath.Path(path)
    if not is_remote(path):
        directory.mkdir(parents=True, exist_ok=True)
    return directory


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` so that a reader sees the old or the new file, never a part:
    locally through a temporary file renamed over `path`; remotely in one upload."""
    target = epath.Path(path)
    if is_remote(path):
        target.write_text(text)
        return
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(target)


class TextLog:
    """An append-only text file on a local disk or a bucket (see module docstring).

    Args:
      path: the file (replaced: its old content is not kept).
      initial: text it starts with (e.g. the lines of a previous run that a resume keeps).
      sync_seconds: on a bucket, the shortest time between two uploads of the object.
    """

    def __init__(self, path: str | os.PathLike, initial: str = "", *,
                 sync_seconds: float = 30.0):
        self.path = epath.Path(path)
        self.sync_seconds = sync_seconds
        self._remote = is_remote(path)
        self._chunks: list[str] = []
        self._dirty = False
        self._last_sync = -float("inf")
        self._file = None if self._remote else self.path.open("w")
        self.write(initial)
        self.flush(force=True)

    @property
    def closed(self) -> bool:
        return self._chunks is None

    def write(self, text: str) -> None:
        if self._file is not None:
            self._file.write(text)
        else:
            self._chunks.append(text)
            self._dirty = True

    def flush(self, *, force: bool = False) -> None:
        """Local: flushes the file. Bucket: uploads the whole text when `force` or when
        `sync_seconds` have passed since the last upload."""
        if self._file is not None:
            self._file.flush()
            return
        now = time.monotonic()
        if self._dirty and (force or now - self._last_sync >= self.sync_seconds):
            self.path.write_text("".join(self._chunks))
            self._dirty = False
            self._last_sync = now

    def close(self) -> None:
        if self.closed:
            return
        if self._file is not None:
            self._file.close()
        else:
            self.flush(force=True)
        self._chunks = None


def mirror_dir(local: str | os.PathLike, remote: str | os.PathLike) -> list[str]:
    """Copies every file under the local directory `local` to the same relative path under
    `remote` (a bucket prefix), replacing what is there; returns the relative paths copied."""
    source = epath.Path(local)
    target = epath.Path(remote)
    copied = []
    for root, _, files in os.walk(source):
        for name in sorted(files):
            path = epath.Path(root, name)
            relative = os.fspath(path.relative_to(source))
            (target / relative).write_bytes(path.read_bytes())
            copied.append(relative)
    return copied


# ---------------------------------------------------------------------------------------------
# start-up check
# ---------------------------------------------------------------------------------------------


def storage_timeout() -> float:
    """Seconds the start-up check waits for an endpoint (``RLHF_JAX_STORAGE_TIMEOUT``)."""
    value = os.environ.get(STORAGE_TIMEOUT_ENV)
    if not value:
        return DEFAULT_STORAGE_TIMEOUT
    try:
        timeout = float(value)
    except ValueError:
        raise StorageError(f"{STORAGE_TIMEOUT_ENV}={value!r} is not a number of seconds") from None
    if not timeout > 0:
        raise StorageError(f"{STORAGE_TIMEOUT_ENV}={value!r} must be > 0 seconds")
    return timeout


def remote_paths(config: Any, prefix: str = "") -> list[tuple[str, str]]:
    """`(dotted field, URI)` of every remote URI among the string fields of a config dataclass
    (nested dataclasses, lists and tuples included)."""
    found: list[tuple[str, str]] = []

    def visit(value, name):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            for field in dataclasses.fields(value):
                visit(getattr(value, field.name), f"{name}.{field.name}" if name else field.name)
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                visit(item, f"{name}[{i}]")
        elif isinstance(value, str | os.PathLike) and is_remote(value):
            found.append((name, os.fspath(value)))

    visit(config, prefix)
    return found


def _endpoint(uri: str) -> str:
    scheme = urllib.parse.urlsplit(uri).scheme
    if scheme == "gs":
        return os.environ.get("STORAGE_EMULATOR_HOST") or "https://storage.googleapis.com"
    return f"the {scheme}:// endpoint"


def _first_line(error: BaseException, limit: int = 300) -> str:
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else "")[:limit]


def _one_line(error: BaseException, limit: int = 300) -> str:
    """The error's message with its lines joined (gcsfs puts the server's reason on line 2)."""
    return " ".join(line.strip() for line in str(error).strip().splitlines() if line.strip())[:limit]


def _cause(error: BaseException, *, uri: str, bucket: str, write: bool, fs: Any) -> str:
    """One line saying why probing `uri` failed.

    What gcsfs raises: a 404 is `FileNotFoundError`; a 401 (no or anonymous credentials) a
    `gcsfs.retry.HttpError` with ``code`` 401; a 403 (the account lacks the permission) a plain
    `OSError` whose message starts with ``Forbidden``; credentials that cannot be found or
    refreshed raise google-auth's `DefaultCredentialsError` / `RefreshError`.
    """
    if isinstance(error, FileNotFoundError):
        if write:
            return f"bucket {bucket!r} does not exist"
        try:
            fs.info(bucket)
        except FileNotFoundError:
            return f"bucket {bucket!r} does not exist"
        except Exception:  # the bucket's metadata may need a permission the objects do not
            pass
        return "no such file or directory"
    text = f"{type(error).__name__}: {_one_line(error)}"
    code = getattr(error, "code", None)
    if isinstance(error, auth_errors.DefaultCredentialsError | auth_errors.RefreshError) or \
            code == 401:
        return (f"no valid credentials ({text}); run `gcloud auth application-default login`, "
                f"or check the VM's service account and its scopes")
    forbidden = type(error) is OSError and str(error).startswith("Forbidden")
    if isinstance(error, PermissionError) or code == 403 or forbidden:
        access = "write (storage.objects.create and .delete)" if write else "read"
        return (f"not permitted ({text}); the account of the credentials needs {access} access "
                f"to bucket {bucket!r}")
    return text


def check_remote_path(field: str, uri: str, *, write: bool, timeout: float | None = None
                      ) -> None:
    """Probes one remote URI (see module docstring); raises `StorageError` naming `field`,
    `uri` and the cause.

    Args:
      field: the config field holding `uri` (for the message).
      uri: e.g. ``gs://bucket/runs/r1``.
      write: probe by writing (and deleting) a small object under `uri`, instead of checking
        that `uri` exists.
      timeout: seconds to wait for the endpoint (default `storage_timeout()`).
    """
    timeout = storage_timeout() if timeout is None else timeout
    bucket = urllib.parse.urlsplit(uri).netloc
    try:
        # A fresh client: it reads the endpoint and the credentials from the environment now.
        fs, path = fsspec.core.url_to_fs(uri, skip_instance_cache=True)
    except (ImportError, ValueError) as e:
        raise StorageError(f"{field}={uri}: {type(e).__name__}: {_first_line(e)}") from None
    outcome: dict[str, BaseException] = {}

    def probe():
        try:
            if write:
                check = f"{path.rstrip('/')}/.write-check-{uuid.uuid4().hex}"
                fs.pipe_file(check, b"")
                fs.rm_file(check)
            else:
                fs.info(path)
        except BaseException as e:  # reported by the caller's thread
            outcome["error"] = e

    worker = threading.Thread(target=probe, name=f"storage-check {uri}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise StorageError(f"{field}={uri}: no answer from {_endpoint(uri)} within {timeout:g} s "
                           f"(set {STORAGE_TIMEOUT_ENV} to wait longer)")
    if "error" in outcome:
        cause = _cause(outcome["error"], uri=uri, bucket=bucket, write=write, fs=fs)
        raise StorageError(f"{field}={uri}: {cause}")


def check_storage(config: Any, *, timeout: float | None = None) -> None:
    """Probes every remote path of `config` (see module docstring); raises `StorageError` on
    the first that cannot be used. Local paths are not checked here."""
    for field, uri in remote_paths(config):
        write = field.rsplit(".", 1)[-1] == OUTPUT_FIELD
        check_remote_path(field, uri, write=write, timeout=timeout)


__all__ = [
    "DEFAULT_STORAGE_TIMEOUT",
    "STORAGE_TIMEOUT_ENV",
    "StorageError",
    "TextLog",
    "absolute",
    "check_remote_path",
    "check_storage",
    "ensure_dir",
    "is_remote",
    "mirror_dir",
    "remote_paths",
    "storage_timeout",
    "write_text_atomic",
]
