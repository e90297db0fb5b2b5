"""A Hugging Face Hub on the loopback address, for the real `huggingface_hub` client in tests.

The Hub's server is not a package one can install, so this serves the few endpoints the client calls for what
sinktrace does, answering as the client expects (huggingface_hub 1.x in the test environment, and 2.x,
which tests/test_package.py installs from the registry):

- `GET /api/models/<repo>/refs`: `{"branches": [{"name", "ref", "targetCommit"}], "tags": [...], "converts": []}`,
  parsed by `HfApi.list_repo_refs` (hf_api.py);
- `GET /api/models/<repo>/tree/<revision>`: a JSON list of `{"type": "file", "path", "size", "oid", "lfs":
  {"oid", "size", "pointerSize"}}`, parsed into `RepoFile` by `HfApi.list_repo_tree` (hf_api.py; one page, no
  `Link` header);
- `HEAD` and `GET /<repo>/resolve/<revision>/<file>`: `get_hf_file_metadata` (file_download.py) reads the commit
  from `X-Repo-Commit`, the blob name from `ETag` (sha256 for LFS files, git's blob sha1 for the others) and the
  size from `Content-Length`; `http_get` resumes a dropped transfer with a `Range: bytes=<n>-` request (206).
- errors: a 404 with `X-Error-Code: RepoNotFound` or `RevisionNotFound` becomes RepositoryNotFoundError or
  RevisionNotFoundError (`hf_raise_for_status`, utils/_http.py).

It can also misbehave as a hostile or broken endpoint would: send another ETag or commit id than the file's, list
sizes smaller than the files, redirect a download to other bytes, and hang or trickle any answer. Every wait it
makes is bounded, and `stop` ends them all.

Point the client at it with HF_ENDPOINT (a subprocess) or `FakeHub.patch_client` (this process: the client reads
HF_ENDPOINT once, on import).
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Repositories: {repo_id: {revision name: {file name: bytes}}}; each revision gets its own commit."""

    def __init__(self):
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}
        self.commits: dict[tuple[str, str], str] = {}
        self.stall_on: tuple[str, str] | None = None  # (revision, file) whose GET sends half its bytes, then waits
        self.stalled = threading.Event()
        self.release_stall = threading.Event()
        self.fail_on: tuple[str, str] | None = None  # (revision, file) whose GET answers 500
        self.served: list[tuple[str, str]] = []  # (revision, file) for every GET of file data
        self.on_get = None  # called before each GET of file data, with (revision, file)
        # hostile answers
        self.etags: dict[tuple[str, str], str] = {}  # (revision, file) -> the ETag sent instead of its hash
        self.listed_size: int | None = None  # the size the listing gives every LFS file, whatever its length
        self.redirects: dict[tuple[str, str], bytes] = {}  # (revision, file) -> bytes served at a redirect's target
        # "refs", "tree", "resolve" (file headers) or "resolve/<revision>": answered only after `release` or 20 s
        self.hang: set[str] = set()
        self.trickle_on: tuple[str, str] | None = None  # (revision, file) whose GET sends a byte every 0.2 s for 20 s
        self.hanging = threading.Event()  # set when a request starts hanging
        self.release = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, repo_id: str, revision: str, files: dict[str, bytes]) -> str:
        """Publish `files` as revision `revision`; returns its commit hash."""
        self.repos.setdefault(repo_id, {})[revision] = dict(files)
        digest = hashlib.sha1(repo_id.encode() + revision.encode())
        for name in sorted(files):
            digest.update(name.encode() + hashlib.sha256(files[name]).digest())
        self.commits[(repo_id, revision)] = digest.hexdigest()
        return digest.hexdigest()

    def add_folder(self, repo_id: str, revision: str, folder: Path, names=None) -> str:
        folder = Path(folder)
        names = names or [p.name for p in folder.iterdir() if p.is_file()]
        return self.add(repo_id, revision, {n: (folder / n).read_bytes() for n in names})

    def start(self) -> FakeHub:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.release_stall.set()
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def patch_client(self, monkeypatch) -> None:
        """What HF_ENDPOINT set before import does: the client's endpoint and its file URL template."""
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "ENDPOINT", self.endpoint)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", self.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )

    def _find(self, repo_id: str, revision: str):
        """(revision name, files) by name or commit, or None."""
        for name, files in self.repos.get(repo_id, {}).items():
            if revision in (name, self.commits[(repo_id, name)]):
                return name, files
        return None

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _json(self, obj, status=200):
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _error(self, status, code):
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_HEAD(self):
                self._serve(head=True)

            def do_GET(self):
                self._serve(head=False)

            def _hang(self, *what: str) -> None:
                if hub.hang & {what[0], "/".join(what)}:
                    hub.hanging.set()
                    hub.release.wait(20)

            def _serve(self, head: bool):
                parts = [unquote(p) for p in urlparse(self.path).path.strip("/").split("/")]
                if parts[0] == "elsewhere":  # another location a download is redirected to
                    data = hub.redirects[(parts[1], "/".join(parts[2:]))]
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if not head:
                        self.wfile.write(data)
                    return
                if parts[:2] == ["api", "models"] and len(parts) >= 5:
                    self._hang(parts[4])
                    repo_id = "/".join(parts[2:4])
                    if repo_id not in hub.repos:
                        return self._error(404, "RepoNotFound")
                    if parts[4] == "refs":
                        branches = [
                            {"name": n, "ref": f"refs/heads/{n}", "targetCommit": hub.commits[(repo_id, n)]}
                            for n in hub.repos[repo_id]
                        ]
                        return self._json({"branches": branches, "tags": [], "converts": []})
                    if parts[4] == "tree" and len(parts) >= 6:
                        found = hub._find(repo_id, parts[5])
                        if found is None:
                            return self._error(404, "RevisionNotFound")
                        entries = []
                        for name, data in sorted(found[1].items()):
                            entry = {"type": "file", "path": name, "size": len(data), "oid": git_blob_id(data)}
                            if name.endswith(LFS_SUFFIXES):
                                if hub.listed_size is not None:
                                    entry["size"] = hub.listed_size
                                entry["lfs"] = {
                                    "oid": hashlib.sha256(data).hexdigest(),
                                    "size": entry["size"],
                                    "pointerSize": 134,
                                }
                            entries.append(entry)
                        return self._json(entries)
                    return self._error(404, "EntryNotFound")
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo_id, revision, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                    if repo_id not in hub.repos:
                        return self._error(404, "RepoNotFound")
                    found = hub._find(repo_id, revision)
                    if found is None:
                        return self._error(404, "RevisionNotFound")
                    rev_name, files = found
                    self._hang("resolve", rev_name)
                    if name not in files:
                        return self._error(404, "EntryNotFound")
                    return self._file(repo_id, rev_name, name, files[name], head)
                return self._error(404, "RepoNotFound")

            def _file(self, repo_id, rev_name, name, data, head):
                etag = hashlib.sha256(data).hexdigest() if name.endswith(LFS_SUFFIXES) else git_blob_id(data)
                etag = hub.etags.get((rev_name, name), etag)
                start = 0
                if not head:
                    if hub.on_get is not None:
                        hub.on_get(rev_name, name)
                    hub.served.append((rev_name, name))
                    if hub.fail_on == (rev_name, name):
                        return self._error(500, "InternalError")
                    if (rev_name, name) in hub.redirects:
                        self.send_response(302)
                        self.send_header("Location", f"{hub.endpoint}/elsewhere/{rev_name}/{name}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    rng = self.headers.get("Range")
                    if rng and rng.startswith("bytes="):
                        start = int(rng[len("bytes=") :].split("-")[0])
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", hub.commits[(repo_id, rev_name)])
                self.send_header("ETag", f'"{etag}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if head:
                    return
                body = data[start:]
                if hub.stall_on == (rev_name, name) and not start:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    hub.stalled.set()
                    hub.release_stall.wait(120)
                    return  # the connection closes short: the client sees a truncated transfer
                if hub.trickle_on == (rev_name, name) and not start:
                    for i in range(100):
                        if hub.release.wait(0.2):
                            return
                        self.wfile.write(body[i : i + 1])
                        self.wfile.flush()
                    self.close_connection = True
                    return  # closed short
                self.wfile.write(body)

        return Handler
