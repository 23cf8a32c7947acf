"""Real servers on loopback for the tests: MLflow tracking servers (a SQLite one, and the team's server on
PostgreSQL with basic auth, started by the project's own ``stages.commands.server``) and PostgreSQL itself.

PostgreSQL comes from Debian's ``postgresql`` package (``/usr/lib/postgresql/<ver>/bin``): the same server
a team runs, installed by ``.ci/run``. It refuses to run as root, so as root initdb and the server run as
the package's ``postgres`` user, with a data directory that user owns and can reach (pytest's temporary
directories are root's, mode 0700). The driver is psycopg 3 (the ``[team]`` extra).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


class ServerStartError(RuntimeError):
    """A server did not come up; the message carries the tail of its log."""


def free_port() -> int:
    """A loopback port with nothing listening on it (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PG_INSTALL_HINT = "apt-get install -y postgresql"
TEAM_DATABASE = "mlflow"  # the team server's backend store (conftest's ``team`` fixture)
TEAM_HOST = "mlflow.internal"  # a name the team server answers to besides 127.0.0.1
PG_SYSTEM_USER = "postgres"


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"<could not read {path}: {e}>"
    return "\n".join(text.splitlines()[-lines:])


def _version_key(p: Path) -> tuple:
    return tuple(int(x) if x.isdigit() else 0 for x in re.split(r"[.]", p.parent.name))


def find_postgres_bindir() -> Path | None:
    """Directory holding initdb and postgres: $PG_BINDIR, else the newest
    /usr/lib/postgresql/<ver>/bin (Debian/Ubuntu), else initdb on PATH."""
    required = ("initdb", "postgres")
    candidates: list[Path] = []
    if env := os.environ.get("PG_BINDIR"):
        candidates.append(Path(env))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    if which := shutil.which("initdb"):
        candidates.append(Path(which).resolve().parent)
    for d in candidates:
        if all(os.access(d / b, os.X_OK) for b in required):
            return d
    return None


def postgres_missing_reason() -> str | None:
    """None when a PostgreSQL server can be started here, else a one-line reason/how-to-fix."""
    if find_postgres_bindir() is None:
        return f"PostgreSQL server binaries (initdb, postgres) not found: {PG_INSTALL_HINT}"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            return (
                f"running as root but there is no '{PG_SYSTEM_USER}' system user to run PostgreSQL as: "
                f"{PG_INSTALL_HINT}"
            )
    if _pg_driver() is None:
        return "no PostgreSQL driver for SQLAlchemy: pip install 'psycopg[binary]'"
    return None


@dataclass(frozen=True)
class _RunAs:
    """Who runs the PostgreSQL processes: None fields mean 'the current user'."""

    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] = ()
    name: str = ""

    def popen_kwargs(self) -> dict:
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}

    def can_traverse(self, path: Path) -> bool:
        """Whether this user can reach ``path`` (x on every ancestor directory)."""
        if self.uid is None:
            return True
        path = path.resolve()
        for p in [path, *path.parents]:
            st = p.stat()
            if st.st_uid == self.uid:
                ok = st.st_mode & stat.S_IXUSR
            elif st.st_gid == self.gid or st.st_gid in self.groups:
                ok = st.st_mode & stat.S_IXGRP
            else:
                ok = st.st_mode & stat.S_IXOTH
            if not ok:
                return False
        return True


def _run_as() -> _RunAs:
    if os.geteuid() != 0:
        return _RunAs()
    pw = pwd.getpwnam(PG_SYSTEM_USER)
    groups = tuple(g.gr_gid for g in grp.getgrall() if PG_SYSTEM_USER in g.gr_mem)
    return _RunAs(uid=pw.pw_uid, gid=pw.pw_gid, groups=groups, name=pw.pw_name)


# --------------------------------------------------------------------------- PostgreSQL


def _pg_driver() -> str | None:
    """The SQLAlchemy PostgreSQL driver to use: SQLAlchemy's default one if importable
    (psycopg 3 since SQLAlchemy 2.1, psycopg2 before), else the other one, else None."""
    import importlib.util

    from sqlalchemy.dialects import postgresql

    default = postgresql.dialect.driver
    for drv in dict.fromkeys((default, "psycopg", "psycopg2")):
        if importlib.util.find_spec(drv) is not None:
            return drv
    return None


@dataclass
class PgServer:
    host: str
    port: int
    superuser: str
    data_dir: Path
    log_path: Path
    app_user: str = "mlflow_app"
    app_password: str = field(default_factory=lambda: secrets.token_hex(16), repr=False)
    _app_role_created: bool = field(default=False, repr=False)

    @property
    def scheme(self) -> str:
        """``postgresql`` when the installed driver is SQLAlchemy's default, else ``postgresql+<driver>``."""
        from sqlalchemy.dialects import postgresql

        drv = _pg_driver()
        return "postgresql" if drv == postgresql.dialect.driver else f"postgresql+{drv}"

    def url(self, dbname: str, *, superuser: bool = False) -> str:
        """SQLAlchemy URL for ``dbname`` as the app role (password auth) or the superuser (trust)."""
        creds = self.superuser if superuser else f"{self.app_user}:{self.app_password}"
        return f"{self.scheme}://{creds}@{self.host}:{self.port}/{dbname}"

    def execute(self, *statements: str, dbname: str = "postgres") -> None:
        """Run SQL as the superuser, in autocommit mode (CREATE DATABASE needs that)."""
        import sqlalchemy as sa
        from sqlalchemy.pool import NullPool

        engine = sa.create_engine(self.url(dbname, superuser=True), isolation_level="AUTOCOMMIT", poolclass=NullPool)
        try:
            with engine.connect() as conn:
                for stmt in statements:
                    conn.exec_driver_sql(stmt)
        finally:
            engine.dispose()

    def create_database(self, name: str, *, template: str | None = None) -> str:
        """Create database ``name`` owned by the password-protected app role; return its URL.

        ``template``: copy an existing database (e.g. one already migrated by ``mlflow db
        upgrade``) instead of an empty one; takes milliseconds, but the template must have
        no open connections."""
        stmts = []
        if not self._app_role_created:
            pw = self.app_password.replace("'", "''")
            stmts.append(f"CREATE ROLE {_quote_ident(self.app_user)} LOGIN PASSWORD '{pw}'")
        tmpl = f" TEMPLATE {_quote_ident(template)}" if template else ""
        stmts.append(f"CREATE DATABASE {_quote_ident(name)} OWNER {_quote_ident(self.app_user)}{tmpl}")
        self.execute(*stmts)
        self._app_role_created = True
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self.execute(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


_HBA = """\
# written by tests/support/servers.py: loopback only; superuser trusted, everyone else needs a password
local   all   {su}   trust
host    all   {su}   127.0.0.1/32   trust
host    all   all    127.0.0.1/32   scram-sha-256
"""


def _pg_data_dir(base_dir: Path, run_as: _RunAs) -> Path:
    """A fresh, empty data directory owned by and reachable for the server's user."""
    if run_as.uid is None or run_as.can_traverse(base_dir):
        d = Path(tempfile.mkdtemp(prefix="pgdata-", dir=base_dir))
    else:
        # base_dir is often a pytest tmp dir (0700, root): postgres could not reach it.
        d = Path(tempfile.mkdtemp(prefix="pgdata-"))
        if not run_as.can_traverse(d.parent):
            shutil.rmtree(d)
            raise ServerStartError(
                f"neither {base_dir} nor {d.parent} is reachable by user {run_as.name!r}; "
                "set TMPDIR to a world-traversable directory"
            )
    if run_as.uid is not None:
        os.chown(d, run_as.uid, run_as.gid)
    d.chmod(0o700)
    return d


def _wait_pg_ready(pg: PgServer, proc: subprocess.Popen, timeout: float) -> None:
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    engine = sa.create_engine(
        pg.url("postgres", superuser=True), poolclass=NullPool, connect_args={"connect_timeout": 2}
    )
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServerStartError(
                    f"postgres exited with code {proc.returncode} during start-up; log {pg.log_path}:\n"
                    + _tail(pg.log_path)
                )
            try:
                with engine.connect() as conn:
                    conn.exec_driver_sql("SELECT 1")
                return
            except sa.exc.OperationalError as e:
                last = e.orig or e
                time.sleep(0.1)
    finally:
        engine.dispose()
    raise ServerStartError(
        f"postgres did not accept connections on {pg.host}:{pg.port} within {timeout:.0f}s "
        f"(last error: {str(last).strip()}); log {pg.log_path}:\n" + _tail(pg.log_path)
    )


def _stop_process(proc: subprocess.Popen, sig: int, timeout: float, *, group: bool = False) -> None:
    if proc.poll() is not None:
        return

    def send(s: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, s)
            else:
                proc.send_signal(s)

    send(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait(10)
    if group:  # reap stragglers (e.g. workers) that outlived the leader
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def postgres_server(
    base_dir: Path,
    *,
    timeout: float = 60.0,
    superuser: str = "postgres",
    settings: dict[str, str] | None = None,
) -> Iterator[PgServer]:
    """A throw-away PostgreSQL cluster on 127.0.0.1:<free port>, stopped (fast shutdown) on exit.

    ``base_dir`` receives the server log (``postgres.log``, kept) and, when reachable by the
    server's user, the data directory (else it goes to a fresh dir under $TMPDIR, chowned to
    that user); the data directory is deleted on exit.  Durability is switched off (fsync etc.): test use only.
    """
    if reason := postgres_missing_reason():
        raise ServerStartError(reason)
    bindir = find_postgres_bindir()
    assert bindir is not None
    base_dir = Path(base_dir)
    base_dir.mkdir(parents=True, exist_ok=True)
    run_as = _run_as()
    data_dir = _pg_data_dir(base_dir, run_as)
    log_path = base_dir / "postgres.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C")
    if run_as.uid is not None:
        env.update(HOME=str(data_dir), USER=run_as.name, LOGNAME=run_as.name)
    common = {"env": env, "cwd": data_dir, **run_as.popen_kwargs()}
    proc: subprocess.Popen | None = None
    try:
        res = subprocess.run(
            [str(bindir / "initdb"), "-D", str(data_dir), "-U", superuser, "-A", "trust",
             "-E", "UTF8", "--no-locale", "--no-sync"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, **common,
        )  # fmt: skip
        if res.returncode != 0:
            raise ServerStartError(f"initdb failed (exit {res.returncode}):\n{res.stdout[-4000:]}")
        (data_dir / "pg_hba.conf").write_text(_HBA.format(su=superuser))
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{data_dir}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "shared_buffers": "64MB",
            "log_min_messages": "warning",
            "log_connections": "off",
        } | (settings or {})
        with (data_dir / "postgresql.conf").open("a") as f:
            f.write("\n# tests/support/servers.py\n" + "".join(f"{k} = {v}\n" for k, v in conf.items()))

        for attempt in range(3):  # the free port may be taken between probe and bind
            port = free_port()
            pg = PgServer("127.0.0.1", port, superuser, data_dir, log_path)
            with log_path.open("ab") as log:
                proc = subprocess.Popen(
                    [str(bindir / "postgres"), "-D", str(data_dir), "-p", str(port)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True, **common,
                )  # fmt: skip
            try:
                _wait_pg_ready(pg, proc, timeout)
                break
            except ServerStartError:
                _stop_process(proc, signal.SIGQUIT, 10)
                if attempt < 2 and "already in use" in _tail(log_path, 10):
                    continue
                raise
        yield pg
    finally:
        if proc is not None:
            _stop_process(proc, signal.SIGINT, 30)  # SIGINT = "fast" shutdown
        shutil.rmtree(data_dir, ignore_errors=True)


# --------------------------------------------------------------------------- MLflow


@dataclass
class MlflowServer:
    """A running tracking server: its URI and, with basic auth, the admin's credentials."""

    uri: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def env(self) -> dict[str, str]:
        """The environment an MLflow client needs for this server."""
        env = {"MLFLOW_TRACKING_URI": self.uri}
        if self.username is not None:
            env |= {"MLFLOW_TRACKING_USERNAME": self.username, "MLFLOW_TRACKING_PASSWORD": self.password or ""}
        return env

    def auth_header(self) -> dict[str, str]:
        if self.username is None:
            return {}
        return {"Authorization": "Basic " + b64encode(f"{self.username}:{self.password}".encode()).decode()}


def http_status(url: str, headers: dict[str, str] | None = None, timeout: float = 10.0) -> int:
    """The HTTP status of a GET of ``url``."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@contextlib.contextmanager
def _serving(cmd: list[str], env: dict[str, str], server: MlflowServer, log_path: Path, timeout: float = 180):
    """Run ``cmd`` (an MLflow server on ``server.uri``) in its own process group until the block ends; ready when
    /health answers and an API call with the server's credentials succeeds."""
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=log_path.parent, start_new_session=True)  # fmt: skip
    try:
        deadline, last = time.monotonic() + timeout, "no answer"
        while True:
            if proc.poll() is not None:
                raise ServerStartError(
                    f"{cmd[:3]} exited with code {proc.returncode}; log {log_path}:\n" + _tail(log_path)
                )
            with contextlib.suppress(OSError):
                if http_status(f"{server.uri}/health", timeout=2) == 200:
                    api = f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=1"
                    status = http_status(api, server.auth_header())
                    if status == 200:
                        break
                    last = f"HTTP {status}"
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"MLflow server not ready in {timeout:.0f} s ({last}); log {log_path}:\n" + _tail(log_path)
                )
            time.sleep(0.25)
        yield server
    finally:
        _stop_process(proc, signal.SIGTERM, 20, group=True)


def _client_env() -> dict[str, str]:
    """This environment without any MLflow client or server settings of the test process."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "MLFLOW_AUTH_"))}


@contextlib.contextmanager
def mlflow_server(root: Path) -> Iterator[str]:
    """``mlflow server`` with a SQLite store and an artifact root under ``root``; yield its URI."""
    root.mkdir(parents=True, exist_ok=True)
    mlflow = Path(sys.executable).parent / "mlflow"
    server = MlflowServer(f"http://127.0.0.1:{free_port()}")
    cmd = [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "mlartifacts"), "--host", "127.0.0.1",
           "--port", server.uri.rsplit(":", 1)[1], "--workers", "1"]  # fmt: skip
    env = {**_client_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with _serving(cmd, env, server, root / "mlflow-server.log"):
        yield server.uri


@contextlib.contextmanager
def team_server(backend_uri: str, root: Path) -> Iterator[MlflowServer]:
    """The team's server as ``make team-server`` runs it (``python -m stages.commands.server``): the backend
    store ``backend_uri``, artifacts under ``root``, basic auth with a random admin password."""
    root.mkdir(parents=True, exist_ok=True)
    server = MlflowServer(f"http://127.0.0.1:{free_port()}", "admin", secrets.token_urlsafe(18))
    env = {
        **_client_env(),
        "MLFLOW_BACKEND_STORE_URI": backend_uri,
        "MLFLOW_ARTIFACTS_DESTINATION": str(root / "mlartifacts"),
        "MLFLOW_AUTH_ADMIN_USERNAME": server.username,
        "MLFLOW_AUTH_ADMIN_PASSWORD": server.password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
        "MLFLOW_PORT": server.uri.rsplit(":", 1)[1],
        "MLFLOW_SERVER_ALLOWED_HOSTS": f"127.0.0.1:*,{TEAM_HOST}",  # as docs/team.md says: the names clients use
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),  # this checkout's stages package
    }
    with _serving([sys.executable, "-m", "stages.commands.server"], env, server, root / "mlflow-server.log"):
        yield server
