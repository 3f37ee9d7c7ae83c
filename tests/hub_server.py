"""A loopback Hugging Face Hub peer for push tests: the endpoints huggingface_hub 2.4 calls to create a repo and commit.

Endpoints (model repos, ``namespace/name`` ids):
  POST /api/repos/create                          create repo; 409 if it exists (exist_ok treats 409 as success)
  GET  /api/models/{repo}[/revision/{rev}]        repo info (create_repo exist_ok on 403; empty-commit path)
  POST /api/models/{repo}/branch/{branch}         create branch (409 if it exists)
  POST /api/validate-yaml                         README.md metadata check done before any commit with a README
  POST /api/models/{repo}/preupload/{rev}         upload mode per file ("lfs" / "regular") and the oid at head
  POST /{repo}.git/info/lfs/objects/batch         LFS batch: upload + verify actions (basic transfer)
  PUT  /_lfs/{repo}/{oid}                         LFS object upload (unauthenticated, like a presigned S3 URL)
  POST /{repo}.git/info/lfs/objects/verify        LFS verify
  POST /api/models/{repo}/commit/{rev}            NDJSON commit: header, file (base64), lfsFile, deletedFile/Folder

Faults: ``fail(status, ...)`` answers the next N matching requests with an error (JSON body, optional
Retry-After), ``hold(endpoint)`` parks matching requests until an event is set, ``refuse_for(seconds)`` closes
the listening socket and reopens it on the same port. HTTP/1.0 (one connection per request), so refusal is real.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import re
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

MAX_BODY = 64 * 1024 * 1024  # bounded: the tests push a few MB at most
HOLD_LIMIT_S = 20.0  # a held request is released after this even if the test forgets

_ROUTES = [
    ("POST", "create", re.compile(r"^/api/repos/create$")),
    ("POST", "validate_yaml", re.compile(r"^/api/validate-yaml$")),
    ("POST", "preupload", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)$")),
    ("POST", "commit", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)$")),
    ("POST", "branch", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<rev>[^/]+)$")),
    ("GET", "repo_info", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")),
    ("POST", "lfs_batch", re.compile(r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$")),
    ("POST", "lfs_verify", re.compile(r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/verify$")),
    ("PUT", "lfs_upload", re.compile(r"^/_lfs/(?P<repo>[^/]+/[^/]+)/(?P<oid>[0-9a-f]{64})$")),
]
_AUTH_FREE = {"lfs_upload"}  # presigned-style URL: the client sends no Authorization there


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Request:
    method: str
    path: str
    endpoint: str | None
    headers: dict[str, str]  # names lower-cased
    body_len: int
    status: int = 0
    t: float = field(default_factory=time.monotonic)


@dataclass
class Commit:
    oid: str
    message: str
    description: str
    revision: str
    files: dict[str, bytes]  # full tree after this commit
    changed: list[str]  # paths added or updated by this commit
    lfs_paths: list[str]  # paths whose content arrived through LFS


@dataclass
class Fault:
    endpoint: str | None  # None matches every endpoint
    count: int
    status: int = 503
    retry_after: int | None = None
    echo_auth: bool = False  # put the Authorization header in the error body (tests token scrubbing)
    hold: threading.Event | None = None


@dataclass
class _Repo:
    branches: dict[str, list[Commit]] = field(default_factory=lambda: {"main": []})
    lfs: dict[str, bytes] = field(default_factory=dict)

    def tree(self, rev: str) -> dict[str, bytes]:
        commits = self.branches.get(rev) or []
        return dict(commits[-1].files) if commits else {}


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "loopback-hub/1.0"
    protocol_version = "HTTP/1.0"  # one request per connection: a closed listener really refuses the next one
    timeout = 10  # socket timeout: a stuck client cannot pin a thread

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                total += size
                if total > MAX_BODY:
                    raise ValueError("body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(length) if length else b""

    def _dispatch(self) -> None:
        hub: HubServer = self.server.hub  # type: ignore[attr-defined]
        path = urlsplit(self.path).path
        endpoint, match = None, None
        for method, name, regex in _ROUTES:
            if method == self.command and (m := regex.match(path)):
                endpoint, match = name, m
                break
        try:
            body = self._read_body()
        except ValueError:
            return self._send(413, {"error": "payload too large"})
        record = Request(self.command, self.path, endpoint, {k.lower(): v for k, v in self.headers.items()}, len(body))
        hub._record(record)
        fault = hub._take_fault(endpoint)
        if fault is not None and fault.hold is not None:
            fault.hold.wait(HOLD_LIMIT_S)
        elif fault is not None:
            message = f"injected {fault.status}"
            if fault.echo_auth:
                message += f" for {self.headers.get('Authorization')}"
            headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
            return self._send(fault.status, {"error": message}, record, headers)
        if endpoint is None:
            return self._send(404, {"error": f"no route for {self.command} {path}"}, record)
        if endpoint not in _AUTH_FREE and self.headers.get("Authorization") != f"Bearer {hub.token}":
            return self._send(
                401,
                {"error": "Invalid credentials in Authorization header"},
                record,
                {"X-Error-Message": "Invalid credentials in Authorization header"},
            )
        params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
        status, payload = getattr(hub, f"_on_{endpoint}")(body=body, **params)
        self._send(status, payload, record)

    def _send(self, status: int, payload, record: Request | None = None, headers: dict | None = None) -> None:
        if record is not None:
            record.status = status
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # rebind the same port after refuse_for()


class HubServer:
    """Context manager: ``with HubServer(token) as hub: ... hub.url``; loopback only, stops on exit."""

    def __init__(self, token: str, lfs_patterns=(".safetensors", ".bin", ".pt"), lfs_min_size=10 * 1024 * 1024):
        self.token = token
        self.lfs_patterns = tuple(lfs_patterns)
        self.lfs_min_size = lfs_min_size
        self.requests: list[Request] = []
        self._repos: dict[str, _Repo] = {}
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._reopen: threading.Timer | None = None
        self.port = 0

    # ----- lifecycle -----

    def __enter__(self) -> HubServer:
        self._listen()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _listen(self) -> None:
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.hub = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def _stop_listening(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def close(self) -> None:
        if self._reopen is not None:
            self._reopen.cancel()
        with self._lock:
            for fault in self._faults:  # free any parked handler thread
                if fault.hold is not None:
                    fault.hold.set()
            self._faults.clear()
        self._stop_listening()

    # ----- faults -----

    def fail(
        self,
        status: int,
        count: int = 1,
        endpoint: str | None = None,
        retry_after: int | None = None,
        echo_auth: bool = False,
    ) -> None:
        """Answer the next ``count`` requests to ``endpoint`` (any if None) with ``status``."""
        with self._lock:
            self._faults.append(Fault(endpoint, count, status, retry_after, echo_auth))

    def hold(self, endpoint: str | None, count: int = 1) -> threading.Event:
        """Park the next ``count`` matching requests until the returned event is set, then serve them normally."""
        event = threading.Event()
        with self._lock:
            self._faults.append(Fault(endpoint, count, hold=event))
        return event

    def refuse_for(self, seconds: float) -> None:
        """Close the listening socket now (connections are refused) and reopen it on the same port later."""
        self._stop_listening()
        self._reopen = threading.Timer(seconds, self._listen)
        self._reopen.daemon = True
        self._reopen.start()

    def _take_fault(self, endpoint: str | None) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.count > 0 and fault.endpoint in (None, endpoint):
                    fault.count -= 1
                    return fault
        return None

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    # ----- inspection -----

    def seen(self, endpoint: str) -> int:
        with self._lock:
            return sum(1 for r in self.requests if r.endpoint == endpoint)

    def commits(self, repo_id: str, revision: str = "main") -> list[Commit]:
        with self._lock:
            return list(self._repos[repo_id].branches.get(revision, []))

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self._lock:
            return self._repos[repo_id].tree(revision)

    # ----- endpoints: each returns (status, json payload); called with the lock NOT held -----

    def _on_create(self, body: bytes):
        payload = json.loads(body)
        if payload.get("type", "model") != "model" or not payload.get("organization"):
            return 400, {"error": "this loopback hub serves namespace/name model repos only"}
        repo_id = f"{payload['organization']}/{payload['name']}"
        with self._lock:
            if repo_id in self._repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
            self._repos[repo_id] = _Repo()
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def _on_validate_yaml(self, body: bytes):
        return 200, {"errors": [], "warnings": []}

    def _on_repo_info(self, body: bytes, repo: str, rev: str = "main"):
        with self._lock:
            if repo not in self._repos:
                return 404, {"error": "Repository not found"}
            commits = self._repos[repo].branches.get(rev)
            if commits is None:
                return 404, {"error": f"Revision {rev} not found"}
            sha = commits[-1].oid if commits else "0" * 40
            siblings = [{"rfilename": p} for p in self._repos[repo].tree(rev)]
        return 200, {"id": repo, "sha": sha, "private": False, "siblings": siblings}

    def _on_branch(self, body: bytes, repo: str, rev: str):
        with self._lock:
            if repo not in self._repos:
                return 404, {"error": "Repository not found"}
            branches = self._repos[repo].branches
            if rev in branches:
                return 409, {"error": f"Branch {rev} already exists"}
            branches[rev] = list(branches["main"])
        return 200, {}

    def _mode(self, path: str, size: int) -> str:
        return "lfs" if size > 0 and (path.endswith(self.lfs_patterns) or size >= self.lfs_min_size) else "regular"

    def _on_preupload(self, body: bytes, repo: str, rev: str):
        files = json.loads(body)["files"]
        with self._lock:
            if repo not in self._repos:
                return 404, {"error": "Repository not found"}
            tree = self._repos[repo].tree(rev)
        answer = []
        for f in files:
            mode = self._mode(f["path"], f["size"])
            entry = {"path": f["path"], "uploadMode": mode, "shouldIgnore": False}
            if f["path"] in tree:  # lets the client skip unchanged files, as the Hub does
                data = tree[f["path"]]
                entry["oid"] = hashlib.sha256(data).hexdigest() if mode == "lfs" else git_blob_sha1(data)
            answer.append(entry)
        return 200, {"files": answer, "commitOid": "0" * 40}

    def _on_lfs_batch(self, body: bytes, repo: str):
        payload = json.loads(body)
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            return 422, {"message": "only basic uploads are served here"}
        with self._lock:
            if repo not in self._repos:
                return 404, {"error": "Repository not found"}
            stored = set(self._repos[repo].lfs)
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in stored:
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/_lfs/{repo}/{obj['oid']}", "header": {}},
                    "verify": {"href": f"{self.url}/{repo}.git/info/lfs/objects/verify", "header": {}},
                }
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}

    def _on_lfs_upload(self, body: bytes, repo: str, oid: str):
        if hashlib.sha256(body).hexdigest() != oid:
            return 400, {"error": "sha256 mismatch"}
        with self._lock:
            if repo not in self._repos:
                return 404, {"error": "Repository not found"}
            self._repos[repo].lfs[oid] = body
        return 200, {}

    def _on_lfs_verify(self, body: bytes, repo: str):
        obj = json.loads(body)
        with self._lock:
            data = self._repos.get(repo, _Repo()).lfs.get(obj["oid"])
        if data is None or len(data) != obj["size"]:
            return 404, {"error": "object not found"}
        return 200, {}

    def _on_commit(self, body: bytes, repo: str, rev: str):
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return 400, {"error": "commit payload must start with a header line"}
        header = lines[0]["value"]
        with self._lock:
            if repo not in self._repos:
                return 404, {"error": "Repository not found"}
            r = self._repos[repo]
            if rev not in r.branches:
                return 404, {"error": f"Revision {rev} not found"}
            tree = r.tree(rev)
            head = r.branches[rev][-1].oid if r.branches[rev] else None
            if header.get("parentCommit") not in (None, head):
                return 412, {"error": "parent commit is not the head of the branch"}
            changed, lfs_paths = [], []
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    if value.get("encoding") != "base64":
                        return 400, {"error": "unsupported encoding"}
                    tree[value["path"]] = base64.b64decode(value["content"])
                    changed.append(value["path"])
                elif key == "lfsFile":
                    data = r.lfs.get(value["oid"])
                    if data is None:
                        return 422, {"error": f"LFS object {value['oid']} was not uploaded"}
                    tree[value["path"]] = data
                    changed.append(value["path"])
                    lfs_paths.append(value["path"])
                elif key == "deletedFile":
                    tree.pop(value["path"], None)
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    tree = {p: d for p, d in tree.items() if not p.startswith(prefix)}
                else:
                    return 400, {"error": f"unknown commit line {key!r}"}
            oid = hashlib.sha1(f"{head}{time.time_ns()}{sorted(changed)}".encode()).hexdigest()
            r.branches[rev].append(
                Commit(oid, header.get("summary", ""), header.get("description", ""), rev, tree, changed, lfs_paths)
            )
        return 200, {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{repo}/commit/{oid}"}
