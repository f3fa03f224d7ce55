"""Where shards live: a local directory, an ``http(s)://`` URL, an fsspec URL (``s3://``, ``gs://``, ... when fsspec
and its backend are installed) or a webdataset-style ``pipe:`` command.

A store reads whole files (the manifest, the per-shard record indexes) and byte ranges of files (the samples a
rank needs: shards hold fixed-size records). Remote reads are retried with exponential backoff on transient errors
(connection refused/reset/dropped mid-body, timeouts, HTTP 5xx/429, a short body); after ``attempts`` failures a
``ShardDataError`` names the URL. A missing file (HTTP 404, ``FileNotFoundError``) raises ``FileNotFoundError``
at once. No credentials are handled here: fsspec backends use their usual environment/config.
"""
from __future__ import annotations

import http.client
import os
import shlex
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict


class StoreError(OSError):
    """A remote read that failed ``attempts`` times (the message names the URL)."""


def is_url(location: str) -> bool:
    return "://" in location or location.startswith("pipe:")


class LocalStore:
    def __init__(self, root: str):
        self.root = root

    def url(self, name: str) -> str:
        return os.path.join(self.root, name)

    def read(self, name: str) -> bytes:
        with open(self.url(name), "rb") as f:
            return f.read()

    def read_range(self, name: str, start: int, length: int) -> bytes:
        fd = os.open(self.url(name), os.O_RDONLY)
        try:
            return os.pread(fd, length, start)
        finally:
            os.close(fd)

    def size(self, name: str) -> int | None:
        try:
            return os.path.getsize(self.url(name))
        except OSError:
            return None


class _RetryingStore:
    """Retries ``_fetch`` with exponential backoff (``backoff * 2**k`` seconds, capped at 30 s)."""

    transient = (OSError, EOFError, TimeoutError, http.client.HTTPException)

    def __init__(self, root: str, attempts: int = 6, backoff: float = 0.2, timeout: float = 60.0):
        self.root = root.rstrip("/")
        self.attempts, self.backoff, self.timeout = attempts, backoff, timeout
        self.retries = 0  # transient failures survived (for logs and tests)

    def url(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _retry(self, name: str, fetch, expect: int | None = None) -> bytes:
        last = None
        for attempt in range(self.attempts):
            if attempt:
                self.retries += 1
                time.sleep(min(30.0, self.backoff * 2 ** (attempt - 1)))
            try:
                data = fetch()
            except FileNotFoundError:
                raise
            except self.transient as exc:
                last = exc
                continue
            if expect is not None and len(data) != expect:
                last = EOFError(f"got {len(data)} of {expect} bytes")
                continue
            return data
        raise StoreError(f"cannot read {self.url(name)}: {self.attempts} attempts failed (last: "
                         f"{type(last).__name__}: {last}); check that the server is up and the URL is right")

    def read(self, name: str) -> bytes:
        return self._retry(name, lambda: self._fetch(name, None, None))

    def read_range(self, name: str, start: int, length: int) -> bytes:
        return self._retry(name, lambda: self._fetch(name, start, length), expect=length)

    def size(self, name: str) -> int | None:
        return None  # not checked up front (one request per shard); problems surface when a shard is read


class HttpStore(_RetryingStore):
    """``http(s)://`` with Range requests. A server that ignores them (200 with the whole file, e.g.
    ``python -m http.server``) works too: the store then keeps the last few whole files it fetched."""

    def __init__(self, root: str, **kw):
        super().__init__(root, **kw)
        self.ranges = True
        self._lock = threading.Lock()
        self._whole: OrderedDict = OrderedDict()

    def __getstate__(self) -> dict:  # DataLoader workers under spawn: a fresh lock and cache there
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_whole")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock, self._whole = threading.Lock(), OrderedDict()

    def read_range(self, name: str, start: int, length: int) -> bytes:
        if self.ranges:
            return super().read_range(name, start, length)
        with self._lock:
            data = self._whole.get(name)
        if data is None:
            data = self.read(name)
            with self._lock:
                self._whole[name] = data
                while len(self._whole) > 4:
                    self._whole.popitem(last=False)
        return data[start:start + length]

    def _fetch(self, name: str, start: int | None, length: int | None) -> bytes:
        req = urllib.request.Request(self.url(name))
        if start is not None:
            req.add_header("Range", f"bytes={start}-{start + length - 1}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                data = resp.read()
                declared = resp.headers.get("Content-Length")
                if declared is not None and int(declared) != len(data):
                    raise EOFError(f"body cut short: {len(data)} of {declared} bytes")
                if start is not None and resp.status == 200:  # no range support: the whole file came
                    self.ranges = False
                    data = data[start:start + length]
                return data
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 410):
                raise FileNotFoundError(f"{self.url(name)}: HTTP {exc.code}") from exc
            if exc.code in (408, 429) or exc.code >= 500:
                raise OSError(f"HTTP {exc.code}") from exc
            raise StoreError(f"{self.url(name)}: HTTP {exc.code} {exc.reason}") from exc


class FsspecStore(_RetryingStore):
    def __init__(self, root: str, **kw):
        try:
            import fsspec
        except ImportError as exc:
            raise StoreError(f"data.dir={root} needs fsspec (and its backend, e.g. s3fs or gcsfs): "
                             "pip install fsspec s3fs") from exc
        super().__init__(root, **kw)
        self.fs, _ = fsspec.core.url_to_fs(root)

    def _fetch(self, name: str, start: int | None, length: int | None) -> bytes:
        if start is None:
            return self.fs.cat_file(self.url(name))
        return self.fs.cat_file(self.url(name), start=start, end=start + length)


class PipeStore(_RetryingStore):
    """``pipe:CMD`` where CMD holds ``{name}``, e.g. ``pipe:aws s3 cp s3://bucket/c4/{name} -``: each read runs the
    command and keeps the byte range it needs (whole files only: prefer fsspec for large shards)."""

    def url(self, name: str) -> str:
        return self.root.replace("{name}", name)

    def _fetch(self, name: str, start: int | None, length: int | None) -> bytes:
        cmd = self.url(name)[len("pipe:"):]
        proc = subprocess.run(shlex.split(cmd), capture_output=True, timeout=self.timeout)
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip().splitlines()
            raise OSError(f"exit {proc.returncode}: {err[-1] if err else ''}")
        data = proc.stdout
        return data if start is None else data[start:start + length]


def open_store(location: str, attempts: int = 6, backoff: float = 0.2, timeout: float = 60.0):
    if location.startswith("pipe:"):
        if "{name}" not in location:
            raise StoreError(f"data.dir={location}: a pipe: command must hold {{name}} (the file to fetch)")
        return PipeStore(location, attempts=attempts, backoff=backoff, timeout=timeout)
    if location.startswith(("http://", "https://")):
        return HttpStore(location, attempts=attempts, backoff=backoff, timeout=timeout)
    if "://" in location:
        return FsspecStore(location, attempts=attempts, backoff=backoff, timeout=timeout)
    return LocalStore(location)


def serve_directory(directory: str, drop_every: int = 0, delay_s: float = 0.0):
    """A threaded loopback HTTP server of ``directory`` with Range support, for tests and ``bench/loader.py``;
    ``drop_every=k`` cuts every k-th response off half-way through its body (a flaky server); ``delay_s`` is
    added before each response (an object store's latency). Returns
    ``(server, base_url)``; ``server.shutdown()`` stops it."""
    import functools
    import http.server

    counter = {"n": 0}
    lock = threading.Lock()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_GET(self):  # noqa: N802 - http.server's naming
            if delay_s:
                time.sleep(delay_s)
            path = self.translate_path(self.path)
            if not os.path.isfile(path):
                self.send_error(404)
                return
            status, rng = 200, self.headers.get("Range")
            with open(path, "rb") as f:
                if rng and rng.startswith("bytes="):
                    a, b = rng[len("bytes="):].split("-")
                    f.seek(int(a))
                    data, status = f.read(int(b) + 1 - int(a)), 206
                else:
                    data = f.read()
            with lock:
                counter["n"] += 1
                drop = drop_every and counter["n"] % drop_every == 0
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if drop:
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self.wfile.write(data)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Handler, directory=directory))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
