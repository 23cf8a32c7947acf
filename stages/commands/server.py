"""server: the team's MLflow tracking server: a PostgreSQL backend store, an artifact store, basic auth.

``make team-server`` (``python -m stages.commands.server``) runs ``mlflow server`` with MLflow's basic-auth
app, configured from the environment (or the options of the same names):

- ``MLFLOW_BACKEND_STORE_URI``: the runs and the model registry, e.g.
  ``postgresql://mlflow:PASSWORD@db.internal:5432/mlflow`` (the driver is the ``[team]`` extra);
- ``MLFLOW_ARTIFACTS_DESTINATION``: where models and files go (a local path, or ``s3://...``), served
  through the server so clients need no store credentials;
- ``MLFLOW_AUTH_DATABASE_URI``: the users and permissions (default: the backend store's database);
- ``MLFLOW_AUTH_ADMIN_USERNAME`` (default ``admin``) and ``MLFLOW_AUTH_ADMIN_PASSWORD`` (at least 12
  characters): the first admin, created when the auth database is new;
- ``MLFLOW_FLASK_SERVER_SECRET_KEY``: signs the UI's forms; set it so every worker and restart agree;
- ``MLFLOW_HOST`` (default ``127.0.0.1``), ``MLFLOW_PORT`` (default 5000), ``MLFLOW_WORKERS`` (default 2);
- ``MLFLOW_SERVER_ALLOWED_HOSTS``: the host names clients address the server by, e.g.
  ``mlflow.internal,mlflow.internal:*`` (MLflow's own check: without it, only localhost and private IP
  addresses are answered, and a request naming the server otherwise gets 403).

Clients set ``MLFLOW_TRACKING_URI``, ``MLFLOW_TRACKING_USERNAME`` and ``MLFLOW_TRACKING_PASSWORD``; a request
without credentials gets 401. New users are created by the admin (MLflow's auth REST API or UI). After an
MLflow upgrade, stop the server and run ``mlflow db upgrade "$MLFLOW_BACKEND_STORE_URI"`` once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

from stages.lib.errors import UserError

log = logging.getLogger(__name__)

MIN_PASSWORD = 12  # MLflow's basic-auth app refuses a shorter admin password
LOOPBACK = ("127.0.0.1", "localhost", "::1")
AUTH_FUNCTION = "mlflow.server.auth:authenticate_request_basic_auth"


def auth_config(database_uri: str, default_permission: str = "READ") -> str:
    """The basic-auth app's ini: where users and permissions live, what a new user may do by default, and
    HTTP basic authentication. The admin's name and password come from the environment, not from here."""
    if "%" in database_uri:  # the ini is read with interpolation
        database_uri = database_uri.replace("%", "%%")
    return (
        "[mlflow]\n"
        f"default_permission = {default_permission}\n"
        f"database_uri = {database_uri}\n"
        f"authorization_function = {AUTH_FUNCTION}\n"
        "auth_cache_ttl_seconds = 60\n"  # otherwise every request pays a deliberately slow password check
    )


def command(backend: str, artifacts: str, host: str, port: int, workers: int) -> list[str]:
    """The ``mlflow server`` command line (the basic-auth app; jobs off: the pipeline submits none)."""
    mlflow = Path(sys.executable).parent / "mlflow"
    return [
        str(mlflow) if mlflow.exists() else "mlflow", "server", "--app-name", "basic-auth",
        "--backend-store-uri", backend, "--artifacts-destination", artifacts,
        "--host", host, "--port", str(port), "--workers", str(workers),
    ]  # fmt: skip


def allowed_hosts_warning(host: str, allowed_hosts: str) -> str | None:
    """What to tell the admin when the server listens beyond loopback but no host names are allowed: MLflow then
    answers only requests addressed to localhost or a private IP address, so clients that use its name get 403."""
    if allowed_hosts or host in LOOPBACK:
        return None
    return (
        f"MLFLOW_SERVER_ALLOWED_HOSTS is not set: the server listens on {host}, but MLflow answers 403 to requests "
        "that address it by a name rather than localhost or a private IP address; set it to the names clients "
        "use, e.g. MLFLOW_SERVER_ALLOWED_HOSTS='mlflow.internal,mlflow.internal:*'"
    )


def check(backend: str, artifacts: str, password: str) -> None:
    """Refuse settings the server would fail on later with a less clear message."""
    if not backend:
        raise UserError("no backend store: set MLFLOW_BACKEND_STORE_URI (e.g. postgresql://user:pw@host/mlflow)")
    if not artifacts:
        raise UserError("no artifact store: set MLFLOW_ARTIFACTS_DESTINATION (a directory or s3://bucket/path)")
    if len(password) < MIN_PASSWORD:
        raise UserError(
            f"MLFLOW_AUTH_ADMIN_PASSWORD must have at least {MIN_PASSWORD} characters (MLflow's basic-auth app "
            "refuses a shorter one); set it before the first start: it creates the admin user"
        )


def main(argv: list[str] | None = None) -> None:
    env = os.environ
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend-store-uri", default=env.get("MLFLOW_BACKEND_STORE_URI", ""))
    parser.add_argument("--artifacts-destination", default=env.get("MLFLOW_ARTIFACTS_DESTINATION", ""))
    parser.add_argument("--auth-database-uri", default=env.get("MLFLOW_AUTH_DATABASE_URI", ""))
    parser.add_argument("--host", default=env.get("MLFLOW_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env.get("MLFLOW_PORT", "5000")))
    parser.add_argument("--workers", type=int, default=int(env.get("MLFLOW_WORKERS", "2")))
    args = parser.parse_args(argv)
    from stages.lib.runtime import configure_logging

    configure_logging()
    try:
        check(args.backend_store_uri, args.artifacts_destination, env.get("MLFLOW_AUTH_ADMIN_PASSWORD", ""))
    except UserError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None
    if warning := allowed_hosts_warning(args.host, env.get("MLFLOW_SERVER_ALLOWED_HOSTS", "")):
        log.warning("%s", warning)
    artifacts = args.artifacts_destination
    if "://" not in artifacts:
        artifacts = str(Path(artifacts).resolve())
        Path(artifacts).mkdir(parents=True, exist_ok=True)
    config = Path(tempfile.mkdtemp(prefix="mlflow-auth-")) / "basic_auth.ini"
    config.write_text(auth_config(args.auth_database_uri or args.backend_store_uri))
    config.chmod(0o600)
    server_env = {**env, "MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server_env.setdefault("MLFLOW_AUTH_ADMIN_USERNAME", "admin")
    if "MLFLOW_FLASK_SERVER_SECRET_KEY" not in server_env:
        log.warning("MLFLOW_FLASK_SERVER_SECRET_KEY is not set: a random one is used until the server stops")
        server_env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = os.urandom(32).hex()
    cmd = command(args.backend_store_uri, artifacts, args.host, args.port, args.workers)
    log.info("MLflow server with basic auth on http://%s:%d, artifacts in %s", args.host, args.port, artifacts)
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, server_env)  # the server is this process: signals reach it directly


if __name__ == "__main__":
    main()
