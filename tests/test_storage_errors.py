"""`check_remote_path`: every way a gs:// path fails at start-up is one line naming the field,
the URI and the cause. Missing buckets and objects come from the emulator; 401 and 403 answers
from a local HTTP server speaking the JSON API's error format to the real gcsfs client; errors
no local server can provoke (credentials that cannot be found or refreshed) are the real
google-auth exception types, raised where gcsfs raises them."""

from __future__ import annotations

import http.server
import json
import threading

import gcsfs
import pytest
from google.auth import exceptions as auth_errors

from rlhf_jax.storage import StorageError, check_remote_path


@pytest.mark.parametrize("write", [False, True])
def test_a_missing_bucket_is_named(gcs_emulator, write):
    field = "output_dir" if write else "model.path"
    with pytest.raises(StorageError) as e:
        check_remote_path(field, "gs://no-such-bucket-here/runs/r", write=write, timeout=30)
    assert str(e.value) == (f"{field}=gs://no-such-bucket-here/runs/r: bucket "
                            "'no-such-bucket-here' does not exist")


def test_a_missing_object_in_a_bucket(gcs_bucket):
    with pytest.raises(StorageError) as e:
        check_remote_path("data.path", f"{gcs_bucket}/none.jsonl", write=False, timeout=30)
    assert str(e.value) == f"data.path={gcs_bucket}/none.jsonl: no such file or directory"
    check_remote_path("output_dir", f"{gcs_bucket}/runs/r", write=True, timeout=30)  # writable


class _Refusing(http.server.BaseHTTPRequestHandler):
    """Answers every request with `status` and the JSON API's error body."""

    status, reason = 403, ""

    def _answer(self):
        body = json.dumps({"error": {"code": self.status, "message": self.reason,
                                     "errors": [{"message": self.reason}]}}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def refusing_endpoint(monkeypatch):
    """Starts a 127.0.0.1 endpoint and points gcsfs at it; yields a setter of its answer."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{server.server_address[1]}")

    def answer(status: int, reason: str):
        monkeypatch.setattr(_Refusing, "status", status)
        monkeypatch.setattr(_Refusing, "reason", reason)

    yield answer
    server.shutdown()
    server.server_close()


ANONYMOUS = ("Anonymous caller does not have storage.objects.get access to the Google Cloud "
             "Storage object.")
FORBIDDEN = "sa@p.iam.gserviceaccount.com does not have storage.objects.create access"
LOGIN = "run `gcloud auth application-default login`, or check the VM's service account and its scopes"


@pytest.mark.parametrize("write", [False, True])
def test_a_401_answer_asks_for_credentials(refusing_endpoint, write):
    refusing_endpoint(401, ANONYMOUS)
    with pytest.raises(StorageError) as e:
        check_remote_path("model.path", "gs://b/m", write=write, timeout=30)
    assert str(e.value) == (f"model.path=gs://b/m: no valid credentials (HttpError: {ANONYMOUS}, "
                            f"401); {LOGIN}")


@pytest.mark.parametrize("write, access", [
    (False, "read"), (True, "write (storage.objects.create and .delete)")])
def test_a_403_answer_says_which_access_the_account_lacks(refusing_endpoint, write, access):
    refusing_endpoint(403, FORBIDDEN)
    with pytest.raises(StorageError) as e:
        check_remote_path("output_dir", "gs://b/runs/r", write=write, timeout=30)
    message = str(e.value)
    assert message.startswith("output_dir=gs://b/runs/r: not permitted (OSError: Forbidden: ")
    assert message.endswith(f"{FORBIDDEN}); the account of the credentials needs {access} "
                            "access to bucket 'b'")
    assert "\n" not in message


@pytest.mark.parametrize("error", [
    auth_errors.DefaultCredentialsError("Your default credentials were not found."),
    auth_errors.RefreshError("Reauthentication is needed.", {"error": "invalid_grant"}),
], ids=["no-credentials", "refresh"])
@pytest.mark.parametrize("write", [False, True])
def test_credentials_that_cannot_be_found_or_refreshed(gcs_emulator, monkeypatch, error, write):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(gcsfs.GCSFileSystem, "pipe_file" if write else "info", fail)
    with pytest.raises(StorageError) as e:
        check_remote_path("run_dir", "gs://b/runs/r", write=write, timeout=30)
    assert str(e.value).startswith(f"run_dir=gs://b/runs/r: no valid credentials "
                                   f"({type(error).__name__}: ")
    assert str(e.value).endswith(LOGIN)
