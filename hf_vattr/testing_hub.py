"""A local HTTP server that speaks enough of the Hugging Face Hub protocol for tests.

Tests never download (DESIGN.md), but code that loads from or pushes to the Hub must
still be exercised through ``huggingface_hub``'s real HTTP code paths. ``LocalHub`` is
a small in-memory Hub (stdlib ``http.server`` on ``127.0.0.1``, a free port) that
``huggingface_hub`` 2.x talks to exactly as it talks to huggingface.co::

    from hf_vattr.testing_hub import LocalHub

    with LocalHub() as hub, hub.activate(tmp_path / "hf_home"):
        hub.add_file("org/repo", "config.json", b"{}")
        path = huggingface_hub.hf_hub_download("org/repo", "config.json")  # real HEAD + GET
        model.push_to_hub("org/other")                                      # real create/preupload/commit
        assert hub.files("org/other")["config.json"] == ...

or, in a test module, ``from hf_vattr.testing_hub import local_hub  # noqa: F401`` and use
the ``local_hub`` pytest fixture (a running hub, already activated, temporary HF_HOME).

What it serves (``{type}`` is ``models``/``datasets``/``spaces``; dataset and space
repos are also reachable under ``/datasets/...`` and ``/spaces/...`` for downloads):

- ``HEAD``/``GET /{repo_id}/resolve/{revision}/{path}``: ``ETag`` (git blob sha1),
  ``X-Repo-Commit``, ``Content-Length``, ``Range`` requests; never Xet headers, so the
  client takes its plain-HTTP download path. 404s carry ``X-Error-Code``
  ``RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound`` as the Hub does.
- ``GET /api/{type}/{repo_id}`` and ``.../revision/{rev}`` (repo info, ``?blobs=true``),
  ``GET .../tree/{rev}[/{path}]`` (``?recursive=true``), ``POST .../paths-info/{rev}``,
  ``GET .../refs``, ``GET .../commits/{rev}``, ``POST .../branch/{name}``.
- ``POST /api/repos/create``, ``DELETE /api/repos/delete``, ``POST /api/validate-yaml``,
  ``GET /api/whoami-v2``.
- ``POST /api/{type}/{repo_id}/preupload/{rev}`` (every file is ``uploadMode: regular``, so
  no LFS/Xet storage is ever needed) and ``POST .../commit/{rev}`` (NDJSON: header, base64
  ``file``, ``deletedFile``, ``deletedFolder``; ``parentCommit`` checked; ``?create_pr=1``
  commits to a new ``refs/pr/N`` branch).

Anything else is answered ``501`` with the method and path in the body and in
``X-Error-Message``, logged, and recorded in :attr:`LocalHub.unhandled`. (501 rather than
500: ``huggingface_hub`` retries 500/502/503/504 with exponential backoff, which would
turn an unsupported route into a slow, confusing failure.)

Writes require ``Authorization: Bearer <hub.token>`` (``activate`` exports it as
``HF_TOKEN``); a wrong token gets the Hub's ``401 Invalid credentials``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

logger = logging.getLogger(__name__)

__all__ = ["LocalHub", "RequestRecord", "LocalHubError", "local_hub"]

_TYPE_PREFIXES = {"models": "model", "datasets": "dataset", "spaces": "space", "kernels": "kernel"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/", "kernel": "kernels/"}
_REPO_OPS = {"revision", "preupload", "commit", "tree", "paths-info", "refs", "commits", "branch"}
_REPO_NAME_RE = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}$")


class LocalHubError(Exception):
    """Misuse of the LocalHub Python API (not an HTTP error)."""


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.body = body or {}


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob, which is what the Hub uses as ETag / oid of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass
class _Commit:
    sha: str
    parent: str | None
    title: str
    message: str
    files: dict[str, bytes]
    date: str


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, _Commit] = field(default_factory=dict)
    created_at: str = field(default_factory=_now_iso)

    def resolve(self, revision: str) -> _Commit:
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if re.fullmatch(r"[0-9a-f]{7,40}", revision):
            matches = [c for sha, c in self.commits.items() if sha.startswith(revision)]
            if len(matches) == 1:
                return matches[0]
        raise _HTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


@dataclass
class RequestRecord:
    """One request the hub answered: ``method``, decoded ``path``, ``query``, ``status``."""

    method: str
    path: str
    query: dict[str, list[str]]
    status: int
    headers: dict[str, str]

    def __repr__(self) -> str:
        return f"<{self.method} {self.path} -> {self.status}>"


class LocalHub:
    """An in-memory Hugging Face Hub on ``http://127.0.0.1:<free port>``.

    Args:
        token: the one write token the hub accepts (exported as ``HF_TOKEN`` by :meth:`activate`);
            ``None`` accepts writes without authentication.
        user: the namespace of the token's user (repos created without an organization go there).
        host, port: where to bind; ``port=0`` picks a free port.
    """

    def __init__(self, *, token: str | None = "hf_localhub_test_token", user: str = "local-user",
                 host: str = "127.0.0.1", port: int = 0):
        self.token = token
        self.user = user
        self._host, self._port = host, port
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._lock = threading.RLock()
        self._counter = 0
        self.requests: list[RequestRecord] = []
        self.unhandled: list[RequestRecord] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> LocalHub:
        if self._server is not None:
            return self
        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer((self._host, self._port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="LocalHub", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def endpoint(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321`` (what ``HF_ENDPOINT`` should be)."""
        if self._server is None:
            raise LocalHubError("LocalHub is not running: use `with LocalHub() as hub:` or hub.start().")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ------------------------------------------------------------ python API

    def create_repo(self, repo_id: str, *, repo_type: str = "model", private: bool = False,
                    exist_ok: bool = True) -> str:
        """Create a repo (with the initial ``.gitattributes`` commit the Hub makes). Returns its id."""
        with self._lock:
            key = (repo_type, repo_id)
            if key in self._repos:
                if not exist_ok:
                    raise LocalHubError(f"{repo_type} repo {repo_id!r} already exists")
                return repo_id
            repo = _Repo(repo_type=repo_type, repo_id=repo_id, private=private)
            self._repos[key] = repo
            self._commit(repo, "main", {".gitattributes": _GITATTRIBUTES}, [], "initial commit", "", None)
            return repo_id

    def add_file(self, repo_id: str, path: str, data: bytes | str, *, repo_type: str = "model",
                 revision: str = "main", commit_message: str | None = None) -> str:
        """Commit one file (creating the repo / branch if needed). Returns the new commit sha."""
        return self.add_files(repo_id, {path: data}, repo_type=repo_type, revision=revision,
                              commit_message=commit_message or f"Upload {path}")

    def add_files(self, repo_id: str, files: dict[str, bytes | str], *, repo_type: str = "model",
                  revision: str = "main", commit_message: str = "Upload files") -> str:
        """Commit several files at once. Returns the new commit sha."""
        with self._lock:
            self.create_repo(repo_id, repo_type=repo_type)
            repo = self._repos[(repo_type, repo_id)]
            if revision not in repo.branches:
                repo.branches[revision] = repo.branches["main"]
            encoded = {p.strip("/"): (d.encode() if isinstance(d, str) else bytes(d)) for p, d in files.items()}
            return self._commit(repo, revision, encoded, [], commit_message, "", None).sha

    def add_folder(self, repo_id: str, folder: str | os.PathLike, *, path_in_repo: str = "",
                   repo_type: str = "model", revision: str = "main",
                   commit_message: str = "Upload folder") -> str:
        """Commit every file under ``folder`` (e.g. a ``save_pretrained`` output). Returns the sha."""
        folder = Path(folder)
        files = {}
        for p in sorted(folder.rglob("*")):
            if p.is_file() and ".cache" not in p.relative_to(folder).parts:
                rel = p.relative_to(folder).as_posix()
                files[f"{path_in_repo.strip('/')}/{rel}".strip("/")] = p.read_bytes()
        if not files:
            raise LocalHubError(f"No files under {folder}")
        return self.add_files(repo_id, files, repo_type=repo_type, revision=revision, commit_message=commit_message)

    def files(self, repo_id: str, *, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        """``{path: content}`` of the repo at ``revision``."""
        with self._lock:
            repo = self._get_repo_py(repo_id, repo_type)
            try:
                return dict(repo.resolve(revision).files)
            except _HTTPError as e:
                raise LocalHubError(e.message) from None

    def head(self, repo_id: str, *, repo_type: str = "model", revision: str = "main") -> str:
        """Commit sha that ``revision`` points to."""
        with self._lock:
            try:
                return self._get_repo_py(repo_id, repo_type).resolve(revision).sha
            except _HTTPError as e:
                raise LocalHubError(e.message) from None

    def commits(self, repo_id: str, *, repo_type: str = "model", revision: str = "main") -> list[dict[str, Any]]:
        """History of ``revision``, newest first: ``{"sha", "title", "message", "files"}``."""
        with self._lock:
            repo = self._get_repo_py(repo_id, repo_type)
            out, commit = [], repo.resolve(revision)
            while commit is not None:
                out.append({"sha": commit.sha, "title": commit.title, "message": commit.message,
                            "files": sorted(commit.files)})
                commit = repo.commits.get(commit.parent) if commit.parent else None
            return out

    def repo_exists(self, repo_id: str, *, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def requests_matching(self, method: str | None = None, path_contains: str | None = None) -> list[RequestRecord]:
        """Recorded requests filtered by method and a substring of the decoded path."""
        with self._lock:
            return [r for r in self.requests
                    if (method is None or r.method == method) and (path_contains is None or path_contains in r.path)]

    def downloads(self, repo_id: str | None = None) -> list[str]:
        """Files served by successful ``GET .../resolve/...`` requests, as ``"repo_id/revision/path"``."""
        out = []
        for r in self.requests_matching("GET", "/resolve/"):
            if r.status in (200, 206) and (repo_id is None or r.path.lstrip("/").startswith(repo_id + "/")):
                out.append(r.path.lstrip("/").replace("/resolve/", "/", 1))
        return out

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()
            self.unhandled.clear()

    def _get_repo_py(self, repo_id: str, repo_type: str) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise LocalHubError(f"No {repo_type} repo {repo_id!r} on this LocalHub")
        return repo

    # --------------------------------------------------------- client setup

    @contextlib.contextmanager
    def activate(self, home: str | os.PathLike | None = None, *, token: bool = True) -> Iterator[LocalHub]:
        """Point ``huggingface_hub`` (and transformers, which uses it) at this hub for the block.

        ``huggingface_hub`` reads its environment once, at import, into
        ``huggingface_hub.constants``; changing ``os.environ`` afterwards does nothing. So this
        sets both the environment (for subprocesses and late readers) and the module constants
        the download/upload code reads at call time: ``ENDPOINT``,
        ``HUGGINGFACE_CO_URL_TEMPLATE`` (``hf_hub_url`` formats it, it is *derived* from
        ENDPOINT at import), ``HF_HUB_OFFLINE`` (``is_offline_mode()``), ``HF_HOME`` /
        ``HF_HUB_CACHE`` / ``HF_ASSETS_CACHE`` / ``HF_XET_CACHE`` / ``HF_TOKEN_PATH`` (into
        ``home``, a temporary folder by default), ``HF_HUB_DISABLE_XET``, telemetry off.
        ``HF_TOKEN`` is set to the hub's token unless ``token=False``. The shared httpx client
        is closed on entry and exit so no connection or proxy setting leaks across. Everything
        is restored afterwards. Process-global: do not use from parallel threads.
        """
        import huggingface_hub
        from huggingface_hub import constants
        from huggingface_hub.utils import _http

        endpoint = self.endpoint
        tmp = None
        if home is None:
            tmp = tempfile.TemporaryDirectory(prefix="localhub-home-")
            home = tmp.name
        home = Path(home).absolute()
        home.mkdir(parents=True, exist_ok=True)
        hub_cache = str(home / "hub")
        no_proxy = ",".join(x for x in ("127.0.0.1", "localhost", os.environ.get("NO_PROXY", "")) if x)

        env_set = {
            "HF_ENDPOINT": endpoint,
            "HF_HOME": str(home),
            "HF_HUB_CACHE": hub_cache,
            "HF_ASSETS_CACHE": str(home / "assets"),
            "HF_XET_CACHE": str(home / "xet"),
            "HF_TOKEN_PATH": str(home / "token"),
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_UPDATE_CHECK": "1",
            "NO_PROXY": no_proxy,
            "no_proxy": no_proxy,
        }
        if token and self.token is not None:
            env_set["HF_TOKEN"] = self.token
        env_unset = ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_OIDC_RESOURCE",
                     "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_CACHE", "HUGGINGFACE_CO_STAGING"]
        if not token:
            env_unset.append("HF_TOKEN")

        const_set = {
            "ENDPOINT": endpoint,
            "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_HUB_OFFLINE": False,
            "HF_HOME": str(home),
            "HF_HUB_CACHE": hub_cache,
            "HUGGINGFACE_HUB_CACHE": hub_cache,
            "HF_ASSETS_CACHE": str(home / "assets"),
            "HUGGINGFACE_ASSETS_CACHE": str(home / "assets"),
            "HF_XET_CACHE": str(home / "xet"),
            "HF_TOKEN_PATH": str(home / "token"),
            "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
            "HF_HUB_DISABLE_XET": True,
            "HF_HUB_DISABLE_TELEMETRY": True,
            "HF_HUB_DISABLE_UPDATE_CHECK": True,
            "CHECK_FOR_UPDATE_DONE_PATH": str(home / ".check_for_update_done"),
            "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(home / ".check_for_skill_update_done"),
            "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        }
        if hasattr(constants, "HF_URL_HOSTS"):
            const_set["HF_URL_HOSTS"] = frozenset(constants.HF_URL_HOSTS) | {"127.0.0.1", "localhost",
                                                                           urlsplit(endpoint).hostname}
        patches: list[tuple[Any, str, Any]] = [(constants, k, v) for k, v in const_set.items() if hasattr(constants, k)]
        if hasattr(_http, "_HUB_ORIGINS") and hasattr(_http, "_url_origin"):
            patches.append((_http, "_HUB_ORIGINS", frozenset(_http._HUB_ORIGINS) | {_http._url_origin(endpoint)}))

        saved_env = {k: os.environ.get(k) for k in [*env_set, *env_unset]}
        saved_attrs = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
        huggingface_hub.close_session()
        try:
            for k in env_unset:
                os.environ.pop(k, None)
            os.environ.update(env_set)
            for obj, name, value in patches:
                setattr(obj, name, value)
            yield self
        finally:
            huggingface_hub.close_session()
            for obj, name, value in reversed(saved_attrs):
                setattr(obj, name, value)
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            if tmp is not None:
                tmp.cleanup()

    # ------------------------------------------------------------ internals

    def _commit(self, repo: _Repo, branch: str, add: dict[str, bytes], delete: list[tuple[str, bool]],
                title: str, description: str, parent_check: str | None) -> _Commit:
        head = repo.commits[repo.branches[branch]] if branch in repo.branches else None
        if parent_check is not None and head is not None and not head.sha.startswith(parent_check):
            raise _HTTPError(412, f"A commit has happened since. Parent commit {parent_check} is not the head "
                                  f"of {branch} ({head.sha}).")
        files = dict(head.files) if head is not None else {}
        for path, is_folder in delete:
            if is_folder:
                prefix = path.rstrip("/") + "/"
                gone = [p for p in files if p.startswith(prefix)]
                if not gone:
                    raise _HTTPError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in gone:
                    del files[p]
            else:
                if path not in files:
                    raise _HTTPError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
        files.update(add)
        self._counter += 1
        material = json.dumps([repo.repo_type, repo.repo_id, head.sha if head else None, title, self._counter,
                               time.time_ns(), sorted((p, git_blob_sha1(d)) for p, d in files.items())])
        sha = hashlib.sha1(material.encode()).hexdigest()
        commit = _Commit(sha=sha, parent=head.sha if head else None, title=title,
                         message=f"{title}\n\n{description}".strip(), files=files, date=_now_iso())
        repo.commits[sha] = commit
        repo.branches[branch] = sha
        return commit


_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


class _Handler(BaseHTTPRequestHandler):
    hub: LocalHub  # bound by LocalHub.start
    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1.0"

    # ---------------------------------------------------------------- plumbing

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        logger.debug("LocalHub %s - " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        raw_segments = [s for s in split.path.split("/") if s != ""]
        segments = [unquote(s) for s in raw_segments]
        query = parse_qs(split.query, keep_blank_values=True)
        self._method, self._query = method, query
        self._split, self._logged = split, False
        self._status = 500
        self._extra_headers: dict[str, str] = {}
        try:
            self._body = self._read_body() if method in ("POST", "PUT", "DELETE") else b""
            with self.hub._lock:
                self._route(method, segments)
        except _HTTPError as e:
            self._send_error(e)
        except (BrokenPipeError, ConnectionResetError):  # the client went away mid-response
            self.close_connection = True
        except Exception as e:  # a bug in LocalHub: say so loudly, never hang the client
            logger.exception("LocalHub crashed on %s %s", method, self.path)
            self._send_error(_HTTPError(501, f"LocalHub internal error on {method} {self.path}: {e!r}"))
        finally:
            if not self._logged:
                self._log_request()

    def _log_request(self) -> None:
        """Record the request *before* its response is written, so a client that asserts on
        ``hub.requests`` / ``hub.unhandled`` right after its call never races the server thread."""
        self._logged = True
        record = RequestRecord(self._method, unquote(self._split.path), self._query, self._status,
                               {k: v for k, v in self.headers.items()})
        self.hub.requests.append(record)  # list.append is atomic; the hub lock may be held by _route
        if self._status == 501:
            self.hub.unhandled.append(record)

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json",
              headers: dict[str, str] | None = None, content_length: int | None = None) -> None:
        self._status = status
        if not self._logged:
            self._log_request()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        self.send_header("Connection", "close")
        for k, v in {**self._extra_headers, **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.close_connection = True
        if self._method != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers=headers)

    def _send_error(self, e: _HTTPError) -> None:
        headers = {"X-Error-Message": e.message.encode("ascii", "replace").decode(), **e.headers}
        if e.code:
            headers["X-Error-Code"] = e.code
        if e.status == 501:
            logger.warning("LocalHub: %s", e.message)
        self._json({"error": e.message, **e.body}, status=e.status, headers=headers)

    # ------------------------------------------------------------------ auth

    def _authorized(self) -> bool:
        if self.hub.token is None:
            return True
        return self.headers.get("Authorization", "") == f"Bearer {self.hub.token}"

    def _require_write(self) -> None:
        if not self._authorized():
            raise _HTTPError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self.hub._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self._authorized()):
            raise _HTTPError(404, "Repository not found", "RepoNotFound")
        return repo

    # ---------------------------------------------------------------- routing

    def _unsupported(self) -> None:
        raise _HTTPError(501, f"LocalHub does not implement {self._method} {self.path}")

    def _route(self, method: str, seg: list[str]) -> None:
        if seg and seg[0] == "api":
            return self._route_api(method, seg[1:])
        repo_type = "model"
        if seg and seg[0] in ("datasets", "spaces", "kernels"):
            repo_type, seg = _TYPE_PREFIXES[seg[0]], seg[1:]
        # /{repo_id}/resolve/{revision}/{path}: repo ids have one or two segments.
        for i in (2, 1):
            if len(seg) > i + 2 and seg[i] == "resolve" and method in ("GET", "HEAD"):
                return self._resolve(repo_type, "/".join(seg[:i]), seg[i + 1], "/".join(seg[i + 2:]))
        self._unsupported()

    def _route_api(self, method: str, seg: list[str]) -> None:
        if seg == ["whoami-v2"] and method == "GET":
            return self._whoami()
        if seg == ["repos", "create"] and method == "POST":
            return self._create_repo()
        if seg == ["repos", "delete"] and method == "DELETE":
            return self._delete_repo()
        if seg == ["validate-yaml"] and method == "POST":
            return self._validate_yaml()
        if len(seg) >= 2 and seg[0] in _TYPE_PREFIXES:
            repo_type, rest = _TYPE_PREFIXES[seg[0]], seg[1:]
            if len(rest) >= 2 and rest[1] in _REPO_OPS:
                repo_id, op = rest[0], rest[1:]
            else:
                repo_id, op = "/".join(rest[:2]), rest[2:]
            return self._route_repo(method, repo_type, repo_id, op)
        self._unsupported()

    def _route_repo(self, method: str, repo_type: str, repo_id: str, op: list[str]) -> None:
        if method == "GET" and not op:
            return self._info(repo_type, repo_id, "main")
        name = op[0] if op else ""
        if method == "GET" and name == "revision" and len(op) == 2:
            return self._info(repo_type, repo_id, op[1])
        if method == "GET" and name == "tree" and len(op) >= 2:
            return self._tree(repo_type, repo_id, op[1], "/".join(op[2:]))
        if method == "POST" and name == "paths-info" and len(op) == 2:
            return self._paths_info(repo_type, repo_id, op[1])
        if method == "POST" and name == "preupload" and len(op) == 2:
            return self._preupload(repo_type, repo_id, op[1])
        if method == "POST" and name == "commit" and len(op) == 2:
            return self._commit(repo_type, repo_id, op[1])
        if method == "GET" and op == ["refs"]:
            return self._refs(repo_type, repo_id)
        if method == "GET" and name == "commits" and len(op) == 2:
            return self._list_commits(repo_type, repo_id, op[1])
        if method == "POST" and name == "branch" and len(op) == 2:
            return self._create_branch(repo_type, repo_id, op[1])
        self._unsupported()

    # --------------------------------------------------------------- handlers

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo(repo_type, repo_id)
        commit = repo.resolve(revision)
        if path not in commit.files:
            raise _HTTPError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        data = commit.files[path]
        headers = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{git_blob_sha1(data)}"',
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{quote(path.rsplit("/", 1)[-1])}"',
        }
        rng = self.headers.get("Range")
        if rng and self._method == "GET":
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            start = int(m[1]) if m else -1
            end = (int(m[2]) if m and m[2] else len(data) - 1) if m else -1
            if not m or start >= len(data) or end < start:
                raise _HTTPError(416, f"Invalid range {rng!r} for a {len(data)}-byte file",
                                 headers={"Content-Range": f"bytes */{len(data)}"})
            end = min(end, len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._send(206, data[start:end + 1], "application/octet-stream", headers)
        self._send(200, data, "application/octet-stream", headers, content_length=len(data))

    def _info(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_type, repo_id)
        commit = repo.resolve(revision)
        blobs = self._query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path in sorted(commit.files):
            entry: dict[str, Any] = {"rfilename": path}
            if blobs:
                entry.update(size=len(commit.files[path]), blobId=git_blob_sha1(commit.files[path]))
            siblings.append(entry)
        info = {
            "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0] if "/" in repo_id else None,
            "sha": commit.sha,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        if repo_type == "space":
            info.update(sdk="static", runtime=None)
        self._json(info)

    def _file_entry(self, path: str, data: bytes) -> dict[str, Any]:
        return {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}

    def _dir_entry(self, path: str, commit: _Commit) -> dict[str, Any]:
        return {"type": "directory", "oid": hashlib.sha1(f"{commit.sha}:{path}".encode()).hexdigest(),
                "size": 0, "path": path}

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo(repo_type, repo_id)
        commit = repo.resolve(revision)
        recursive = self._query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        entries, dirs = [], set()
        for p in sorted(commit.files):
            if not p.startswith(prefix):
                continue
            rel = p[len(prefix):]
            parts = rel.split("/")
            for depth in range(1, len(parts)):
                if recursive or depth == 1:
                    dirs.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                entries.append(self._file_entry(p, commit.files[p]))
        if prefix and not entries and not dirs:
            raise _HTTPError(404, f"{path} does not exist on {revision}", "EntryNotFound",
                             {"X-Repo-Commit": commit.sha})
        self._json([self._dir_entry(d, commit) for d in sorted(dirs)] + entries)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_type, repo_id)
        commit = repo.resolve(revision)
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            paths = json.loads(self._body or b"{}").get("paths", [])
        else:
            paths = parse_qs(self._body.decode(), keep_blank_values=True).get("paths", [])
        out = []
        for p in paths if isinstance(paths, list) else [paths]:
            p = p.strip("/")
            if p in commit.files:
                out.append(self._file_entry(p, commit.files[p]))
            elif any(f.startswith(p + "/") for f in commit.files):
                out.append(self._dir_entry(p, commit))
        self._json(out)

    def _refs(self, repo_type: str, repo_id: str) -> None:
        repo = self._repo(repo_type, repo_id)
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": sha}
                    for b, sha in sorted(repo.branches.items()) if not b.startswith("refs/pr/")]
        self._json({"branches": branches, "converts": [], "tags": []})

    def _list_commits(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_type, repo_id)
        commit: _Commit | None = repo.resolve(revision)
        out = []
        while commit is not None:
            out.append({"id": commit.sha, "title": commit.title, "message": commit.message,
                        "authors": [{"user": self.hub.user}], "date": commit.date})
            commit = repo.commits.get(commit.parent) if commit.parent else None
        self._json(out)

    def _whoami(self) -> None:
        if self.hub.token is not None and not self._authorized():
            raise _HTTPError(401, "Invalid credentials in Authorization header")
        self._json({
            "type": "user", "id": hashlib.sha1(self.hub.user.encode()).hexdigest()[:24], "name": self.hub.user,
            "fullname": "LocalHub user", "email": None, "emailVerified": False, "isPro": False, "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "localhub", "role": "write"}},
        })

    def _body_json(self) -> Any:
        try:
            return json.loads(self._body or b"{}")
        except json.JSONDecodeError as e:
            raise _HTTPError(400, f"Invalid JSON body: {e}") from None

    def _create_repo(self) -> None:
        self._require_write()
        payload = self._body_json()
        name, org = payload.get("name"), payload.get("organization")
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise _HTTPError(400, f"Invalid repo type {repo_type!r}")
        if not isinstance(name, str) or not _REPO_NAME_RE.match(name) or "--" in name or name.endswith(".git"):
            raise _HTTPError(400, f"Invalid repo name {name!r}")
        repo_id = f"{org or self.hub.user}/{name}"
        url = f"{self.hub.endpoint}/{_URL_PREFIX[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self.hub._repos:
            # The Hub's 409 body carries the url: create_repo(exist_ok=True) reads it.
            raise _HTTPError(409, f"You already created this {repo_type} repo", body={"url": url})
        self.hub.create_repo(repo_id, repo_type=repo_type, private=payload.get("visibility") == "private"
                             or bool(payload.get("private")))
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> None:
        self._require_write()
        payload = self._body_json()
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.hub.user}/{payload.get('name')}"
        if self.hub._repos.pop((repo_type, repo_id), None) is None:
            raise _HTTPError(404, "Repository not found", "RepoNotFound")
        self._json({})

    def _validate_yaml(self) -> None:
        content = self._body_json().get("content", "")
        errors = []
        m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
        if m:
            try:
                import yaml

                meta = yaml.safe_load(m[1])
                if meta is not None and not isinstance(meta, dict):
                    errors.append({"message": "metadata must be a YAML mapping"})
            except ImportError:
                pass
            except Exception as e:  # yaml.YAMLError
                errors.append({"message": f"Invalid YAML: {e}"})
        if errors:
            return self._json({"errors": errors, "warnings": []}, status=400)
        self._json({"errors": [], "warnings": []})

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        self._require_write()
        repo = self._repo(repo_type, repo_id)
        commit = repo.resolve(revision)
        files = []
        for f in self._body_json().get("files", []):
            path = f.get("path")
            existing = commit.files.get(path)
            files.append({"path": path, "uploadMode": "regular", "shouldIgnore": False,
                          "oid": git_blob_sha1(existing) if existing is not None else None})
        self._json({"files": files, "commitOid": commit.sha})

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        self._require_write()
        repo = self._repo(repo_type, repo_id)
        base = repo.resolve(revision)
        header: dict[str, Any] | None = None
        add: dict[str, bytes] = {}
        delete: list[tuple[str, bool]] = []
        for n, line in enumerate(self._body.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise _HTTPError(400, f"Invalid NDJSON commit line {n}: {e!r}") from None
            if key == "header":
                header = value
            elif key == "file":
                content = value.get("content", "")
                if value.get("encoding", "utf-8") == "base64":
                    add[value["path"]] = base64.b64decode(content)
                else:
                    add[value["path"]] = content.encode()
            elif key == "deletedFile":
                delete.append((value["path"], False))
            elif key == "deletedFolder":
                delete.append((value["path"], True))
            elif key == "lfsFile":
                raise _HTTPError(400, f"LocalHub stores no LFS objects (preupload always answers uploadMode "
                                      f"'regular'); got an lfsFile for {value.get('path')!r}")
            else:
                raise _HTTPError(400, f"Unknown commit operation {key!r} on line {n}")
        if header is None:
            raise _HTTPError(400, "Commit payload has no header line")
        create_pr = self._query.get("create_pr", ["0"])[0] in ("1", "true")
        branch = revision if revision in repo.branches else None
        pr_url = None
        if create_pr:
            num = 1 + sum(1 for b in repo.branches if b.startswith("refs/pr/"))
            branch = f"refs/pr/{num}"
            repo.branches[branch] = base.sha
            pr_url = f"{self.hub.endpoint}/{_URL_PREFIX[repo_type]}{repo_id}/discussions/{num}"
        elif branch is None:
            raise _HTTPError(400, f"Cannot commit to {revision!r}: not a branch (commit to a branch name)")
        commit = self.hub._commit(repo, branch, add, delete, header.get("summary") or "Update",
                                  header.get("description") or "",
                                  header.get("parentCommit") if not create_pr else None)
        self._json({
            "success": True,
            "commitOid": commit.sha,
            "commitUrl": f"{self.hub.endpoint}/{_URL_PREFIX[repo_type]}{repo_id}/commit/{commit.sha}",
            "pullRequestUrl": pr_url,
        })

    def _create_branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        self._require_write()
        repo = self._repo(repo_type, repo_id)
        payload = self._body_json()
        if branch in repo.branches:
            if payload.get("exist_ok") or self._query.get("exist_ok"):
                return self._json({})
            raise _HTTPError(409, f"Reference already exists: refs/heads/{branch}")
        start = repo.resolve(payload.get("startingPoint") or "main")
        repo.branches[branch] = start.sha
        self._json({})


try:  # a ready-made pytest fixture: `from hf_vattr.testing_hub import local_hub  # noqa: F401`
    import pytest
except ImportError:  # pragma: no cover - pytest is a test-only dependency
    pytest = None

if pytest is not None:

    @pytest.fixture
    def local_hub(tmp_path):
        """A running, activated :class:`LocalHub` with a temporary ``HF_HOME`` under ``tmp_path``."""
        with LocalHub() as hub, hub.activate(tmp_path / "hf_home"):
            yield hub


def main(argv: list[str] | None = None) -> None:
    """``python -m hf_vattr.testing_hub [--port N] [--repo ID=FOLDER ...]``: serve until Ctrl-C."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", default="hf_localhub_test_token", help="write token ('' = no auth)")
    parser.add_argument("--repo", action="append", default=[], metavar="ID=FOLDER")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    with LocalHub(token=args.token or None, port=args.port) as hub:
        for spec in args.repo:
            repo_id, _, folder = spec.partition("=")
            hub.add_folder(repo_id, folder)
        print(f"LocalHub serving on {hub.endpoint}  (HF_ENDPOINT={hub.endpoint} HF_TOKEN={hub.token})", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":  # pragma: no cover
    main()
