"""Background push of checkpoint folders to the Hugging Face Hub.

The training loop calls ``push_folder`` (the folder is snapshotted, copied, now) or ``push_built`` (the worker thread
writes the folder itself, so the caller does no file work) and goes on; each push is uploaded as ONE commit by a
single worker thread, retried with exponential backoff on 5xx, 408, 429 (honouring Retry-After) and
network errors; other 4xx fail fast. ``wait`` awaits everything and raises ``HubPushError`` if the latest push
of a folder failed; ``check`` lets the loop stop early on a permanent failure (bad token, no write access).

Public API
    HubPusher(model_id, private=False, max_retries=8, backoff_s=2.0, tmp_dir=None)   # also a context manager
        push_folder(local_dir, commit_message, step=None); push_built(build, commit_message, step=None, key="built",
        discard=None); status() -> dict; check(); wait(timeout=None); close(cancel=False); tmp_root
    HubPushError(RuntimeError)

What huggingface_hub 2.4 does, and why this module works around it:
- Token: ``HfApi(token=None)`` resolves it per request (``HF_TOKEN`` env, then the login cache file). We never
  accept it as an argument; we read it once only to scrub it from every message we log or raise.
- ``HF_ENDPOINT`` is frozen into ``constants.ENDPOINT`` at import, so we read the env var when a pusher is built
  and pass it to ``HfApi(endpoint=...)``.
- Xet: ``hf_xet`` is a hard dependency on x86_64/arm64. When importable, LFS-mode files go through the Xet CAS
  protocol (and ``upload_folder`` switches to a multi-commit pipeline, hence ``create_commit`` here: one push is
  one commit). ``HF_HUB_DISABLE_XET=1`` forces the plain LFS batch API, but the library freezes it at import too;
  we re-read the env var when a pusher is built. The loopback test server speaks LFS, not Xet.
- The library retries preupload, LFS batch/upload/verify itself (``http_backoff``: 5 tries, 1 s base, 429 sleeps
  Retry-After + 1 s); repo create, validate-yaml and the commit POST are not retried. Our retry loop wraps the
  whole commit, so the inner retries only delay; they cannot commit twice (only the commit POST commits, and a
  retried commit of unchanged files is skipped by the preupload oid check).
- Progress bars (tqdm on stderr for LFS uploads) are turned off unless ``HF_HUB_DISABLE_PROGRESS_BARS=0``:
  a training log has no terminal to draw them on.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

log = logging.getLogger(__name__)

# Network failures worth retrying: the same set huggingface_hub's own http_backoff retries.
_NETWORK_ERRORS = (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError)
# A Retry-After beyond this is treated as this (a background push must still end within a run's lifetime).
_MAX_RETRY_AFTER_S = 900.0
# Our own exponential backoff (hub.backoff_s, doubling per retry) stops growing here.
_MAX_BACKOFF_S = 120.0
# Snapshot noise that must never reach the Hub.
_IGNORED = shutil.ignore_patterns(".git", ".cache", "__pycache__", "*.pyc", ".DS_Store")


class HubPushError(RuntimeError):
    """A push failed for good; the message names repo, step and HTTP status, never the token."""


@dataclass
class _Job:
    key: str  # the folder pushed, or "<built:KEY>"
    snapshot: Path
    message: str
    step: int | None
    state: str = "pending"  # pending -> running -> done, or pending -> dropped
    future: cf.Future | None = field(default=None, repr=False)
    build: Callable[[Path], None] | None = field(default=None, repr=False)  # fills the snapshot, in the worker
    discard: Callable[[], None] | None = field(default=None, repr=False)  # called once the job is over or dropped


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _error_chain(err: BaseException):
    # huggingface_hub wraps LFS upload errors in RuntimeError(...) from the real cause.
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _http_status(err: BaseException) -> int | None:
    for e in _error_chain(err):
        if isinstance(e, HfHubHTTPError) and e.response is not None:
            return e.response.status_code
    return None


def _retry_hint(err: BaseException) -> tuple[bool, float | None]:
    """(transient?, server-requested wait in seconds) for an exception raised by a push attempt."""
    for e in _error_chain(err):
        # HfHubHTTPError is checked first: it is an httpx2.HTTPError and an OSError, like network errors.
        if isinstance(e, HfHubHTTPError) and e.response is not None:
            status = e.response.status_code
            if status in (408, 429) or status >= 500:
                after = e.response.headers.get("Retry-After", "").strip()
                return True, float(after) if after.isdigit() else None
            return False, None
        if isinstance(e, _NETWORK_ERRORS):
            return True, None
    return False, None


def _token(model_id: str) -> str:
    if constants.is_offline_mode():
        raise HubPushError(f"hub push to {model_id}: HF_HUB_OFFLINE is set; unset it or turn hub.push off")
    token = get_token()
    if not token:
        raise HubPushError(f"hub push to {model_id}: no Hugging Face token; set HF_TOKEN or run `hf auth login`")
    return token


def check_access(model_id: str, private: bool = False, max_retries: int = 8, backoff_s: float = 2.0) -> None:
    """Before a run writes anything: a token is there and may write `model_id` — the repo is created now
    (exist_ok: an existing one is kept), at HF_ENDPOINT. Transient failures (5xx, 408, 429, network) are retried
    like a push; HubPushError (naming the repo and the HTTP status, never the token) on anything else or when the
    retries run out."""
    token = _token(model_id)
    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    api = HfApi(endpoint=endpoint, library_name="speedplm")
    attempt = 0
    while True:
        try:
            api.create_repo(model_id, private=private, exist_ok=True, repo_type="model")
            return
        except (HfHubHTTPError, httpx2.HTTPError) as err:
            transient, server_wait = _retry_hint(err)
            status = _http_status(err)
            what = f"HTTP {status}" if status is not None else type(err).__name__
            detail = " ".join(str(err).replace(token, "<token>").split())
            message = f"hub access check for {model_id} at {endpoint}: {what}: {detail}"
            if not transient or attempt >= max_retries:
                hint = (
                    " (the token cannot write there: a new HF_TOKEN, or another hub.model_id)"
                    if status in (401, 403)
                    else ""
                )
                raise HubPushError(message + hint) from None
            log.warning("%s; retry %d/%d", message, attempt + 1, max_retries)
            time.sleep(max(min(_MAX_BACKOFF_S, backoff_s * 2**attempt), min(server_wait or 0.0, _MAX_RETRY_AFTER_S)))
            attempt += 1


class HubPusher:
    """Pushes folders to ``model_id`` in the background, one commit per push, newest pending push per folder wins.

    The token comes from ``HF_TOKEN`` or the login cache (huggingface_hub's resolution); it is not a parameter.
    """

    def __init__(
        self,
        model_id: str,
        private: bool = False,
        max_retries: int = 8,
        backoff_s: float = 2.0,
        tmp_dir: str | os.PathLike | None = None,
    ):
        token = _token(model_id)
        self._secret = token  # kept only to scrub messages; never passed on, logged or stored on disk
        self.model_id = model_id
        self.private = private
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        # Read at call time: huggingface_hub froze both env vars when it was imported.
        self.endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
        if _env_true("HF_HUB_DISABLE_XET"):
            constants.HF_HUB_DISABLE_XET = True
        if constants.HF_HUB_DISABLE_PROGRESS_BARS is None and not are_progress_bars_disabled():
            disable_progress_bars()
        self._api = HfApi(endpoint=self.endpoint, library_name="speedplm")
        self.tmp_root = Path(tempfile.mkdtemp(prefix="speedplm-hub-", dir=tmp_dir))
        self._lock = threading.Lock()
        self._stop = threading.Event()  # interrupts backoff sleeps on close(cancel=True)
        self._executor = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="speedplm-hub-push")
        self._latest: dict[str, _Job] = {}  # newest job per key
        self._repo_ready = False
        self._counts = {"queued": 0, "done": 0, "failed": 0, "retries": 0, "dropped": 0}
        self._last_error: str | None = None
        self._last_commit: str | None = None
        self._fatal: str | None = None  # a non-retryable failure: pushes cannot succeed in this run

    # ----- public API -----

    def push_folder(self, local_dir: str | os.PathLike, commit_message: str, step: int | None = None) -> None:
        """Snapshot ``local_dir`` now and upload it in the background as one commit; returns at once."""
        src = Path(local_dir).resolve()
        if not src.is_dir():
            raise HubPushError(f"hub push to {self.model_id}: {src} is not a directory")
        snapshot = Path(tempfile.mkdtemp(prefix="push-", dir=self.tmp_root))
        # Copy before returning so the caller may overwrite the folder while the upload runs.
        shutil.copytree(src, snapshot, ignore=_IGNORED, dirs_exist_ok=True)
        if not any(p.is_file() for p in snapshot.rglob("*")):
            shutil.rmtree(snapshot, ignore_errors=True)
            raise HubPushError(f"hub push to {self.model_id}: {src} has no files to push")
        self._submit(_Job(key=str(src), snapshot=snapshot, message=commit_message, step=step))

    def push_built(
        self,
        build: Callable[[Path], None],
        commit_message: str,
        step: int | None = None,
        key: str = "built",
        discard: Callable[[], None] | None = None,
    ) -> None:
        """Queue a push whose folder `build(folder)` writes in the background thread, just before the upload
        (nothing is written or copied now); returns at once. The newest pending push of a `key` wins; `discard()`
        runs once the job is over or dropped (to free what `build` reads)."""
        snapshot = Path(tempfile.mkdtemp(prefix="push-", dir=self.tmp_root))
        self._submit(_Job(f"<built:{key}>", snapshot, commit_message, step, build=build, discard=discard))

    def _submit(self, job: _Job) -> None:
        with self._lock:
            if self._executor is None:
                shutil.rmtree(job.snapshot, ignore_errors=True)
                if job.discard is not None:
                    job.discard()
                raise HubPushError(f"hub push to {self.model_id}: pusher is closed")
            older = self._latest.get(job.key)
            if older is not None and older.state == "pending":
                # Still queued behind another push: the newer snapshot supersedes it.
                older.state = "dropped"
                self._counts["dropped"] += 1
                shutil.rmtree(older.snapshot, ignore_errors=True)
                if older.discard is not None:
                    older.discard()
            self._latest[job.key] = job
            self._counts["queued"] += 1
            job.future = self._executor.submit(self._run, job)

    def status(self) -> dict:
        """Counts for the training log: queued, done, failed, retries, dropped, pending, last_error, last_commit."""
        with self._lock:
            c = self._counts
            pending = c["queued"] - c["done"] - c["failed"] - c["dropped"]
            return {**c, "pending": pending, "last_error": self._last_error, "last_commit": self._last_commit}

    def idle(self) -> bool:
        """No push is queued or running."""
        with self._lock:
            return all(j.state == "dropped" or j.future.done() for j in self._latest.values())

    def fatal(self) -> str | None:
        """The message of a failure no retry can fix (401/403: no later push can succeed), or None."""
        return self._fatal

    def check(self) -> None:
        """Raise ``HubPushError`` now if a push failed in a way no retry can fix (e.g. 401/403)."""
        if self._fatal is not None:
            raise HubPushError(self._fatal)

    def wait(self, timeout: float | None = None) -> None:
        """Await all queued pushes; raise ``HubPushError`` if the latest push of any folder failed."""
        with self._lock:
            jobs = [j for j in self._latest.values() if j.state != "dropped"]
        _, not_done = cf.wait([j.future for j in jobs], timeout=timeout)
        if not_done:
            raise HubPushError(f"hub push to {self.model_id}: {len(not_done)} push(es) still running after {timeout}s")
        failures = [j.future.exception() for j in jobs if j.future.exception() is not None]
        if failures:
            err = failures[-1]
            if isinstance(err, HubPushError):
                raise HubPushError(str(err)) from None
            # Unexpected error type (bug or malformed server answer): surface it, scrubbed, without its chain.
            raise HubPushError(
                f"hub push to {self.model_id} failed: {type(err).__name__}: {self._scrub(str(err))}"
            ) from None

    def close(self, cancel: bool = False) -> None:
        """Stop the worker. ``cancel=True`` drops queued pushes and cuts backoff sleeps short (crash path)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is None:
            return
        if cancel:
            self._stop.set()
        executor.shutdown(wait=True, cancel_futures=cancel)
        shutil.rmtree(self.tmp_root, ignore_errors=True)

    def __enter__(self) -> HubPusher:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.wait()
            finally:
                self.close()
        else:
            self.close(cancel=True)

    def __repr__(self) -> str:
        return f"HubPusher({self.model_id!r}, endpoint={self.endpoint!r})"

    # ----- worker side -----

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "<token>")

    def _describe(self, job: _Job, err: BaseException) -> str:
        status = _http_status(err)
        what = f"HTTP {status}" if status is not None else type(err).__name__
        at = f" (step {job.step})" if job.step is not None else ""
        detail = " ".join(self._scrub(str(err)).split())  # one line; hub messages span several
        return f"hub push to {self.model_id}{at}: {what}: {detail}"

    def _run(self, job: _Job) -> str | None:
        with self._lock:
            if job.state == "dropped":
                return None
            job.state = "running"
        try:
            if job.build is not None:
                job.build(job.snapshot)
                if not any(p.is_file() for p in job.snapshot.rglob("*")):
                    raise HubPushError(f"hub push to {self.model_id} (step {job.step}): nothing was staged")
            oid = self._push_with_retries(job)
        except HubPushError:
            with self._lock:
                self._counts["failed"] += 1
            raise
        except Exception as err:
            # Not swallowed: counted, logged scrubbed, and re-raised into the future that wait() reads.
            message = self._describe(job, err)
            with self._lock:
                self._counts["failed"] += 1
                self._last_error = message
            log.error("%s (unexpected error, not retryable)", message)
            raise
        finally:
            with self._lock:
                job.state = "done"
            shutil.rmtree(job.snapshot, ignore_errors=True)
            if job.discard is not None:
                job.discard()
        with self._lock:
            self._counts["done"] += 1
            self._last_commit = oid
        log.info("hub push to %s landed: step %s, commit %s", self.model_id, job.step, oid)
        return oid

    def _push_with_retries(self, job: _Job) -> str:
        attempt = 0
        while True:
            try:
                return self._push_once(job)
            except (HfHubHTTPError, httpx2.HTTPError, RuntimeError) as err:
                # RuntimeError: huggingface_hub's wrapper around LFS upload failures; classified by its cause.
                transient, server_wait = _retry_hint(err)
                message = self._describe(job, err)
                if not transient:
                    with self._lock:
                        self._last_error = message
                        if _http_status(err) in (401, 403):  # no later push can succeed either
                            self._fatal = self._fatal or message
                    log.error("%s (not retryable)", message)
                    raise HubPushError(f"{message} (not retryable)") from None
                if attempt >= self.max_retries:
                    with self._lock:
                        self._last_error = message
                    log.error("%s (gave up after %d retries)", message, attempt)
                    raise HubPushError(f"{message} (gave up after {attempt} retries)") from None
                # Our backoff is capped; a server's Retry-After is obeyed (up to a sanity bound) even above the cap.
                backoff = min(_MAX_BACKOFF_S, self.backoff_s * 2**attempt)
                delay = max(backoff, min(server_wait or 0.0, _MAX_RETRY_AFTER_S))
                attempt += 1
                with self._lock:
                    self._counts["retries"] += 1
                    self._last_error = message
                log.warning("%s; retry %d/%d in %.2fs", message, attempt, self.max_retries, delay)
                if self._stop.wait(delay):
                    raise HubPushError(f"{message} (cancelled during backoff)") from None

    def _push_once(self, job: _Job) -> str:
        if not self._repo_ready:
            self._api.create_repo(self.model_id, private=self.private, exist_ok=True, repo_type="model")
            self._repo_ready = True
        # Fresh operations every attempt: huggingface_hub mutates them and refuses to reuse committed ones.
        operations = [
            CommitOperationAdd(path.relative_to(job.snapshot).as_posix(), str(path))
            for path in sorted(job.snapshot.rglob("*"))
            if path.is_file()
        ]
        info = self._api.create_commit(self.model_id, operations, commit_message=job.message, repo_type="model")
        return info.oid
