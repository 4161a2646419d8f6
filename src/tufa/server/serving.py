"""How `tufa-server run` takes its port, logs and serves: the port check made before
anything is created, the log's format, and granian's embedded HTTP server."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import signal
import socket
from datetime import UTC, datetime
from typing import Any

import uvloop


class PortUnavailable(Exception):
    """The address and port the server was told to listen on cannot be had."""


def claim_port(host: str, port: int) -> None:
    """Refuse, naming the fix, an address the server could not listen on; called before
    the first start creates its database, master key and operator token, so a failed
    start leaves nothing behind and prints no token that never worked.

    The probe binds as a listener would and lets go at once: what holds the port then
    (another tufa-server, whose listeners share a port only among themselves, or
    anything else) is found, and the server binds it again a moment later.
    """
    where = f"{host}:{port}"
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        raise PortUnavailable(
            f"cannot listen on {where}: {host!r} is not an address of this machine ({e}); "
            "pass an address with --host (or TUFA_HOST), e.g. 127.0.0.1 or 0.0.0.0"
        ) from None
    with socket.socket(family, kind, proto) as probe:
        # As the server's own listener: a port left in TIME_WAIT by a stopped server is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise PortUnavailable(_bind_problem(where, e)) from None


def _bind_problem(where: str, error: OSError) -> str:
    if error.errno == errno.EADDRINUSE:
        return (
            f"port {where} is already in use (another tufa-server, or another program): "
            "stop it, or choose another port with --port (or TUFA_PORT)"
        )
    if error.errno == errno.EACCES:
        return (
            f"not allowed to listen on {where} (ports below 1024 need privileges): "
            "choose a port from 1024 up with --port (or TUFA_PORT)"
        )
    if error.errno == errno.EADDRNOTAVAIL:
        return (
            f"cannot listen on {where}: the address is not one of this machine's; "
            "pass one of its addresses with --host (or TUFA_HOST), e.g. 127.0.0.1 or 0.0.0.0"
        )
    return f"cannot listen on {where}: {error.strerror}; check --host and --port"


LOG_FORMATS = ("text", "json")
# The HTTP servers' own loggers, sent to the handler of every other line.
_SERVER_LOGGERS = {
    "loggers": {name: {"handlers": [], "propagate": True} for name in ("_granian", "uvicorn")}
}


class JsonLines(logging.Formatter):
    """One JSON object a line: time, level, logger and message, and an access line's
    fields (api/access_log.py) besides."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "access", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure_logging(log_level: str, log_format: str) -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonLines())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=log_level.upper(), handlers=[handler])
    # python-tuf logs every missing signature at INFO; that is routine while signing.
    logging.getLogger("tuf").setLevel(logging.WARNING)


def uvicorn_log_config() -> dict[str, Any]:
    """For `uvicorn.run(log_config=...)`: uvicorn's lines in the format of the others."""
    return {"version": 1, "disable_existing_loggers": False, **_SERVER_LOGGERS}


def serve(app: Any, host: str, port: int, log_level: str) -> None:
    """Serve `app` until SIGTERM or SIGINT: granian's HTTP server (in Rust), the app on a
    uvloop event loop in this process. Measured faster than uvicorn with httptools and
    uvloop on the poll path (bench/README.md, ADR 0014)."""
    from granian.constants import Interfaces
    from granian.log import LogLevels
    from granian.server.embed import Server

    async def main() -> None:
        server = Server(
            app,
            address=host,
            port=port,
            interface=Interfaces.ASGI,
            websockets=False,
            runtime_threads=1,
            backlog=1024,
            log_level=LogLevels(log_level),
            log_dictconfig=_SERVER_LOGGERS,
            log_access=False,
        )
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, server.stop)
        await server.serve()

    uvloop.run(main())
