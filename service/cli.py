"""`sdserve`: serve the API, build the tiny demo model, manage keys, read usage."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

import yaml

DEFAULT_SERVE_CONFIG = "serve_config.yaml"
TINY_MODEL_DIR = "models/tiny-sd2"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve_cmd = commands.add_parser("serve", help="serve the API on a local Ray cluster")
    serve_cmd.add_argument("--config", default=DEFAULT_SERVE_CONFIG, help="Serve config YAML")
    serve_cmd.add_argument(
        "--host", help="listen address (default: the config's http_options.host, else 127.0.0.1)"
    )
    serve_cmd.add_argument(
        "--port", type=int, help="listen port (default: the config's http_options.port, else 8000)"
    )
    serve_cmd.add_argument(
        "--metrics-port", type=int, default=8080, help="Ray's Prometheus metrics export port"
    )
    serve_cmd.set_defaults(run=_serve)

    tiny = commands.add_parser("tiny-model", help="write the tiny random-weight SD2 demo model")
    tiny.add_argument("directory", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty folder that is not an earlier tiny model",
    )
    tiny.set_defaults(run=_tiny_model)

    migrate_cmd = commands.add_parser("migrate", help="bring the database schema up to date")
    migrate_cmd.set_defaults(run=_migrate)

    from service.store.admin_cli import add_subcommands

    add_subcommands(commands)

    from service.models_cli import add_subcommands as add_models_subcommands

    add_models_subcommands(commands)

    args = parser.parse_args(argv)
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    try:
        return args.run(args) or 0
    except ValidationError as error:
        if error.title != "Settings":
            raise
        print(f"sdserve: invalid settings (SDSERVE_* or the Serve config's args.settings):\n"
              f"{_describe(error)}", file=sys.stderr)  # fmt: skip
        return 2
    except SettingsError as error:  # an SDSERVE_* value that is not the JSON it must be
        print(f"sdserve: invalid settings: {_settings_error(error)}", file=sys.stderr)
        return 2
    except CommandError as error:
        print(f"sdserve: {error}", file=sys.stderr)
        return 2


class CommandError(Exception):
    """Input a command cannot work with (for `serve`: what a replica would otherwise fail on,
    after Ray has started): one line naming the setting or argument, exit status 2."""


def _settings_error(error: Exception) -> str:
    """pydantic-settings' 'error parsing value for field "models" from source ...' as the
    variable's name and what it needs."""
    text = str(error)
    field = text.split('field "', 1)[1].split('"', 1)[0] if 'field "' in text else None
    if field is None:
        return text
    cause = f" ({error.__cause__})" if error.__cause__ else ""
    return f"SDSERVE_{field.upper()}: not valid JSON for this setting{cause}"


def _describe(error) -> str:
    lines = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"  {where}: {message}" if where else f"  {message}")
    return "\n".join(lines)


def _tiny_model(args) -> int:
    from service.engine.tiny_model import build_tiny_model, is_replaceable

    directory = args.directory
    if directory.exists() and not directory.is_dir():
        raise CommandError(f"tiny-model: {directory} is a file, not a folder")
    if not args.overwrite and not is_replaceable(directory):
        raise CommandError(
            f"tiny-model: {directory} holds other files (a real model's weights would be "
            "replaced by random ones); pick an empty folder, or pass --overwrite"
        )
    try:
        path = build_tiny_model(directory, seed=args.seed)
    except OSError as exc:
        raise CommandError(f"tiny-model: {directory} cannot be written: {exc}") from None
    print(f"tiny SD2-architecture model (random weights) written to {path}")
    return 0


def _migrate(_args) -> int:
    from service.config import load_settings
    from service.store.db import make_engine, migrate

    migrate(make_engine(load_settings().database_url))
    print("database schema is up to date")
    return 0


def load_serve_config(path: str) -> tuple[dict, dict]:
    """The first application's `args` and the `http_options` of a Serve config file (none:
    the defaults, unless the file was asked for by name)."""
    config_path = Path(path)
    if not config_path.exists():
        if path != DEFAULT_SERVE_CONFIG:
            raise CommandError(f"--config: {path} does not exist")
        return {}, {}
    try:
        config = yaml.safe_load(config_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CommandError(f"--config: {path} is not a readable YAML file: {exc}") from None
    if not isinstance(config, dict):
        raise CommandError(f"--config: {path} must hold a mapping (a Serve config)")
    apps = config.get("applications") or [{}]
    return apps[0].get("args") or {}, config.get("http_options") or {}


def listen_options(http_options: dict, host: str | None, port: int | None) -> dict:
    """The Serve config's `http_options` with the command line's host and port, where given."""
    return {
        **http_options,
        "host": host if host is not None else http_options.get("host", "127.0.0.1"),
        "port": port if port is not None else http_options.get("port", 8000),
    }


def _ensure_models(settings_overrides: dict) -> None:
    """Build the tiny demo model when the configured default is the (missing) demo folder."""
    from service.config import load_settings

    settings = load_settings(**settings_overrides)
    for model_id, path in settings.model_paths().items():
        if path.exists():
            continue
        if path == Path(TINY_MODEL_DIR):
            from service.engine.tiny_model import build_tiny_model

            print(f"no model at {path}: building the tiny demo model (it draws noise)")
            build_tiny_model(path)
        else:
            raise CommandError(f"SDSERVE_MODELS: model '{model_id}': folder {path} does not exist")


def preflight(settings, app_args: dict, config_path: str) -> None:
    """Open what the replicas will open, before Ray starts: a wrong database URL, image store,
    model folder or Serve config then stops `serve` at once with the setting's name, instead of
    a failed deployment a minute later whose reason is only in a replica's log."""
    from pydantic import ValidationError

    from service.registry import ModelRegistry
    from service.serving.app import AppConfig
    from service.store.images import ImageStore

    try:
        AppConfig.model_validate({**app_args, "settings": {}})
    except ValidationError as error:
        raise CommandError(
            f"invalid Serve config args ({config_path}, applications[0].args):\n{_describe(error)}"
        ) from None
    try:
        ModelRegistry(settings)
    except ValueError as exc:
        raise CommandError(f"SDSERVE_MODELS: {exc}") from None
    try:
        settings.check_folders()
    except ValueError as exc:
        raise CommandError(f"SDSERVE_{str(exc).split()[0].upper()}: {exc}") from None
    migrated_engine(settings.database_url).dispose()
    try:
        ImageStore(settings.image_store_url).check_writable()
    except Exception as exc:
        raise CommandError(
            f"SDSERVE_IMAGE_STORE_URL: {settings.image_store_url} cannot be written: "
            f"{first_line(exc)}"
        ) from None


def migrated_engine(database_url: str):
    """An engine on the database with its schema brought up to date; CommandError naming
    SDSERVE_DATABASE_URL when it cannot be opened."""
    from service.store.db import make_engine, migrate

    try:
        engine = make_engine(database_url)
        migrate(engine)
    except Exception as exc:  # any driver's error: its first line says what went wrong
        raise CommandError(
            f"SDSERVE_DATABASE_URL: the database cannot be opened: {first_line(exc)}"
        ) from None
    return engine


def first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _serve(args) -> int:
    import ray
    from ray import serve

    from service.config import load_settings
    from service.serving.app import apply_ray_env, build_app, start_serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app_args, http_options = load_serve_config(args.config)
    http_options = listen_options(http_options, args.host, args.port)
    host, port = http_options["host"], http_options["port"]
    overrides = dict(app_args.get("settings") or {})
    if "public_base_url" not in load_settings(**overrides).model_fields_set:
        # Neither SDSERVE_PUBLIC_BASE_URL nor the Serve config says: use where we listen.
        overrides["public_base_url"] = f"http://{host}:{port}"
    app_args = {**app_args, "settings": overrides}
    _ensure_models(overrides)
    settings = load_settings(**overrides)
    preflight(settings, app_args, args.config)

    apply_ray_env()
    ray.init(
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=True,
        _metrics_export_port=args.metrics_port,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        start_serve(http_options)
        serve.run(build_app(app_args), name="sdserve", route_prefix="/")
        base = settings.public_base_url.rstrip("/")
        listening = f"http://{host}:{port}"
        print(f"\nsdserve is serving on {base}")
        if base != listening:  # SDSERVE_PUBLIC_BASE_URL: what clients use, not this socket
            print(f"  listening on {listening}")
        print(f"  POST {base}/api/v6/images/text2img")
        print(f"  API docs: {base}/docs")
        print(f"  Prometheus metrics: http://{host}:{args.metrics_port}/metrics")
        if settings.demo_key:
            print(f"  demo API key: {settings.demo_key}")
        # Ray's high-throughput mode (RAY_ENV) keeps replica logs off stderr
        logs_dir = ray._private.worker._global_node.get_logs_dir_path()
        print(f"  replica logs: {logs_dir}/serve/")
        print("Press Ctrl-C to stop.\n", flush=True)
        stop.wait()
    finally:
        print("stopping…", flush=True)
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
