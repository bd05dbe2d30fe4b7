"""Hub repos for tests, as real files in huggingface_hub's cache layout; no server, no network.

A pytest plugin (``pytest_plugins`` in conftest.py): tests request its fixtures by name. ``cache_repo``
writes ``models--org--name/{blobs,snapshots/<commit>,refs/<branch>}`` the way a
download leaves it, so ``from_pretrained("org/name")`` runs huggingface_hub's own offline
lookup. Pushing needs a server, so the ``local_hub`` fixture patches the two ``HfApi`` calls
that ``push_to_hub`` makes (``create_repo``, ``upload_folder``) to commit the uploaded folder
into that cache instead.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from huggingface_hub import CommitInfo, HfApi, RepoUrl, constants


def commit_to_cache(cache_dir: str | Path, repo_id: str, files: dict[str, bytes], *, branch: str = "main") -> str:
    """Commit ``files`` (name -> bytes) on ``branch`` of ``repo_id`` in the cache; returns the commit hash.

    Files of the branch's previous commit are kept unless overwritten, as an upload does.
    """
    repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / branch
    if ref.exists():
        parent = ref.read_text()
        files = {**{p.name: p.read_bytes() for p in (repo / "snapshots" / parent).iterdir()}, **files}
    commit = hashlib.sha1(b"".join(n.encode() + hashlib.sha256(files[n]).digest() for n in sorted(files))).hexdigest()
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(os.path.relpath(blob, link.parent))
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)
    return commit


class LocalHub:
    """Repos in a local cache; ``user`` owns repo ids pushed without a namespace, as a token's user would."""

    user = "local-user"
    endpoint = constants.ENDPOINT  # only used to spell URLs; nothing is ever sent there

    def __init__(self, cache_dir: Path):
        self.cache_dir = Path(cache_dir)
        self.commits: list[tuple[str, str]] = []  # (repo_id, commit message)

    def head(self, repo_id: str) -> str:
        return (self.cache_dir / f"models--{repo_id.replace('/', '--')}" / "refs" / "main").read_text()

    def files(self, repo_id: str) -> dict[str, bytes]:
        snapshot = self.cache_dir / f"models--{repo_id.replace('/', '--')}" / "snapshots" / self.head(repo_id)
        return {p.name: p.read_bytes() for p in snapshot.iterdir()}

    def create_repo(self, repo_id: str) -> RepoUrl:
        repo_id = repo_id if "/" in repo_id else f"{self.user}/{repo_id}"
        return RepoUrl(f"{self.endpoint}/{repo_id}")

    def upload_folder(self, repo_id: str, folder_path: str | Path, commit_message: str, revision: str | None) -> CommitInfo:
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir() if p.is_file()}
        commit = commit_to_cache(self.cache_dir, repo_id, files, branch=revision or "main")
        self.commits.append((repo_id, commit_message))
        return CommitInfo(commit_url=f"{self.endpoint}/{repo_id}/commit/{commit}", commit_message=commit_message,
                          commit_description="", oid=commit)


@pytest.fixture(scope="session")
def cache_repo():
    """``cache_repo(cache_dir, repo_id, files, branch="main") -> commit``: :func:`commit_to_cache`."""
    return commit_to_cache


@pytest.fixture
def local_hub(tmp_path, monkeypatch) -> LocalHub:
    """A :class:`LocalHub` in ``tmp_path``, active as the offline Hub cache for the test.

    Per test, not per session: it patches ``HfApi`` and the Hub cache constants, and what one test pushes
    must not be there for the next; building it is only a folder and four patches."""
    hub = LocalHub(tmp_path / "hub_cache")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub.cache_dir))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: hub.create_repo(repo_id))
    monkeypatch.setattr(HfApi, "upload_folder", lambda api, *, repo_id, folder_path, commit_message="", revision=None,
                        **kw: hub.upload_folder(repo_id, folder_path, commit_message, revision))
    return hub
