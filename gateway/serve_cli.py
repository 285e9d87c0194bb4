"""``roadlabel serve`` (the HTTP gateway with its labelling workers) and ``roadlabel keys`` (API keys)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from gateway.cli import EXIT_INPUT_ERRORS, EXIT_OK, EXIT_USAGE
from gateway.detect_cli import _say

__all__ = ["add_commands"]


def _store_options(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--data-dir", type=Path, metavar="DIR", help="recordings, label files, SQLite database (default: ./data)"
    )
    cmd.add_argument(
        "--database-url",
        metavar="URL",
        help="sqlite:///PATH (default: DATA_DIR/roadlabel.db) or postgresql+psycopg://USER@HOST/DB",
    )


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``serve`` and ``keys``."""
    serve = commands.add_parser(
        "serve",
        help="run the HTTP gateway (uploads, jobs, label files, exports) with its labelling workers",
        description="Run the gateway on one machine: SQLite metadata in DATA_DIR, files under DATA_DIR, labelling "
        "in worker processes. Settings also come from ROADLABEL_* environment variables.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    serve.add_argument("--workers", type=int, metavar="N", help="labelling worker processes (default: 1)")
    serve.add_argument(
        "--engine", choices=["local", "ray"], help="local: models in each worker; ray: models as shared Ray actors"
    )
    serve.add_argument("--address", metavar="ADDR", help="Ray cluster for --engine ray (default: start a local one)")
    serve.add_argument(
        "--registry",
        type=Path,
        metavar="DIR",
        help="model registry: new jobs use its promoted versions (default: $ROADLABEL_REGISTRY, else DATA_DIR/models, "
        "seeded from deploy/models on first use)",
    )
    _store_options(serve)
    serve.set_defaults(run=_run_serve)

    keys = commands.add_parser("keys", help="create, list or revoke API keys")
    sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = sub.add_parser("create", help="create a key and print it once")
    create.add_argument("name", help="who uses the key (recorded with every action)")
    create.add_argument("--role", choices=["uploader", "reviewer", "admin"], required=True)
    _store_options(create)
    create.set_defaults(run=_run_keys_create)
    lst = sub.add_parser("list", help="list keys (never their secrets)")
    _store_options(lst)
    lst.set_defaults(run=_run_keys_list)
    revoke = sub.add_parser("revoke", help="revoke a key by name")
    revoke.add_argument("name")
    _store_options(revoke)
    revoke.set_defaults(run=_run_keys_revoke)


def _settings(args: argparse.Namespace, **extra: object) -> object:
    from gateway.app import GatewaySettings

    values = {"data_dir": args.data_dir, "database_url": args.database_url, **extra}
    return GatewaySettings(**{k: v for k, v in values.items() if v is not None})


def _run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import GatewaySettings, create_app

    try:
        settings = _settings(
            args,
            workers=args.workers,
            log_level=args.log_level,
            engine=args.engine,
            ray_address=args.address,
            registry=args.registry,
        )
    except ValidationError as exc:
        _say(f"roadlabel: settings: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}")
        return EXIT_USAGE
    assert isinstance(settings, GatewaySettings)  # noqa: S101 - built just above
    app = create_app(settings)
    _say(f"roadlabel gateway on http://{args.host}:{args.port} (data in {settings.data_dir.resolve()})")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower(), access_log=False)
    return EXIT_OK


def _store(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from gateway.app import GatewaySettings
    from gateway.store import open_store

    settings = _settings(args)
    assert isinstance(settings, GatewaySettings)  # noqa: S101 - built just above
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return open_store(settings.resolved_database_url())


def _run_keys_create(args: argparse.Namespace) -> int:
    from services.common.errors import InputError

    store = _store(args)
    try:
        secret = store.create_api_key(args.name, args.role)
    except InputError as exc:
        _say(f"roadlabel: {exc}")
        return EXIT_INPUT_ERRORS
    finally:
        store.close()
    sys.stdout.write(secret + "\n")
    _say(f"created {args.role} key {args.name!r}; it is shown only now")
    return EXIT_OK


def _run_keys_list(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        for key in store.list_api_keys():
            sys.stdout.write(json.dumps(key, default=str) + "\n")
    finally:
        store.close()
    return EXIT_OK


def _run_keys_revoke(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        done = store.revoke_api_key(args.name)
    finally:
        store.close()
    if not done:
        _say(f"roadlabel: key {args.name!r}: expected a live key, got none by that name")
        return EXIT_INPUT_ERRORS
    return EXIT_OK
