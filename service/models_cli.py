"""`sdserve models list` and `sdserve models import`: the served models and LoRAs, and turning a
single-file checkpoint into a diffusers folder the server can serve.

Both read settings from the environment (`SDSERVE_MODELS`, `SDSERVE_LORA_DIR`, prices) like the
server does. `import` writes the model folder only: it prints the `SDSERVE_MODELS` value that
registers it, because settings are the operator's environment, not a file this tool edits.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shlex
import struct
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from service.config import ModelSpec, Settings, load_settings
from service.pricing import PriceList, format_usd
from service.registry import ModelConfigError, ModelInfo, ModelRegistry

MODELS_DIR = Path("models")
MODEL_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
DTYPES = ("float32", "float16", "bfloat16")
OK = "ok"


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register `models list` and `models import` on the `sdserve` parser."""
    models = subparsers.add_parser("models", help="list served models and LoRAs, import one")
    commands = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")

    models_list = commands.add_parser(
        "list",
        help="configured models (size, steps, prediction type, price, status) and LoRAs; "
        "exits 1 when a model folder is missing or invalid",
    )
    models_list.add_argument("--json", action="store_true", help="print JSON instead of tables")
    models_list.set_defaults(run=models_list_command)

    models_import = commands.add_parser(
        "import",
        help="convert a single-file SD checkpoint (.safetensors, LDM layout) into a diffusers "
        "folder, offline",
    )
    models_import.add_argument("checkpoint", type=Path, help="the .safetensors checkpoint")
    models_import.add_argument(
        "--id", required=True, dest="model_id", type=_model_id, help="model_id to serve it as"
    )
    models_import.add_argument(
        "--base-model",
        help="configured model id or diffusers folder that gives the architecture, tokenizer "
        "and scheduler (prediction type); default: the default model",
    )
    models_import.add_argument("--out", type=Path, help="output folder; default: models/<ID>")
    models_import.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty output folder"
    )
    models_import.add_argument(
        "--dtype", choices=DTYPES, help="weights dtype of the folder; default: the file's own"
    )
    models_import.set_defaults(run=models_import_command)


def models_list_command(args: argparse.Namespace, settings: Settings | None = None) -> int:
    """Print every configured model with its defaults, price and status, then the LoRAs,
    embeddings and VAEs."""
    settings = settings or load_settings()
    try:
        prices = PriceList.from_settings(settings)
    except ValueError as exc:
        return _fail(exc)
    models = [
        _model_entry(settings, model_id, spec, prices)
        for model_id, spec in settings.model_specs().items()
    ]
    loras = [
        {"id": lora_id, "path": str(path), "status": _safetensors_problem(path) or OK}
        for lora_id, path in settings.lora_paths().items()
    ]
    embeddings = [_embedding_entry(name, path) for name, path in settings.embedding_paths().items()]
    vaes = [_vae_entry(vae_id, path) for vae_id, path in settings.vae_paths().items()]
    if args.json:
        document = {
            "default_model_id": settings.default_model_id,
            "models": models,
            "lora_dir": settings.lora_dir,
            "loras": loras,
            "embeddings_dir": settings.embeddings_dir,
            "embeddings": embeddings,
            "vae_dir": settings.vae_dir,
            "vaes": vaes,
        }
        print(json.dumps(document, indent=2))
    else:
        _print_models(models)
        print()
        _print_loras(settings, loras)
        if settings.embeddings_dir:
            print()
            _print_embeddings(settings, embeddings)
        if settings.vae_dir:
            print()
            _print_vaes(settings, vaes)
    return 0 if all(model["status"] == OK for model in models) else 1


def models_import_command(args: argparse.Namespace, settings: Settings | None = None) -> int:
    """Convert the checkpoint, then print the SDSERVE_MODELS value that serves it."""
    settings = settings or load_settings()
    try:
        base = _base_model_folder(args.base_model, settings)
    except ValueError as exc:
        return _fail(exc)
    out = args.out or MODELS_DIR / args.model_id

    import torch

    from service.engine.checkpoint import import_single_file

    start = time.perf_counter()
    try:
        with _quiet_progress_bars():
            import_single_file(
                args.checkpoint,
                out,
                base,
                overwrite=args.overwrite,
                dtype=getattr(torch, args.dtype) if args.dtype else None,
            )
    except ValueError as exc:
        return _fail(exc)
    seconds = time.perf_counter() - start

    entry = _registered_entry(settings, args.model_id, out)
    info = _model_info(settings, args.model_id, entry)
    print(f"Imported {args.checkpoint} into {out} in {seconds:.1f} s.")
    print(
        f"Architecture, tokenizer and scheduler from {base}: {info.width}x{info.height}, "
        f"{info.prediction_type}."
    )
    if args.model_id in settings.models:
        print(f"Model {args.model_id!r} is configured already; this value points it to {out}.")
    models = {model_id: _json_spec(spec) for model_id, spec in settings.models.items()}
    models[args.model_id] = _json_spec(entry)
    print("Settings come from the environment: serve it by setting")
    print(f"  SDSERVE_MODELS={shlex.quote(json.dumps(models))}")
    print(f"(the entry alone: {json.dumps({args.model_id: _json_spec(entry)})})")
    return 0


def _model_entry(settings: Settings, model_id: str, spec: ModelSpec, prices: PriceList) -> dict:
    """One model's row: defaults from the registry, and whether its folder can be served."""
    path = Path(spec.path)
    entry: dict = {
        "id": model_id,
        "default": model_id == settings.default_model_id,
        "path": str(path),
        "width": None,
        "height": None,
        "native_width": None,
        "native_height": None,
        "default_steps": None,
        "prediction_type": None,
        "price_per_image_usd": format_usd(prices.price_per_image(model_id)),
        "status": OK,
    }
    if not path.is_dir():
        entry["status"] = "missing: no such folder"
        return entry
    try:
        info = _model_info(settings, model_id, spec)
        native = _model_info(settings, model_id, ModelSpec(path=spec.path))  # no size override
    except ModelConfigError as exc:  # a config file missing, not JSON, or of the wrong shape
        entry["status"] = f"invalid: {exc.file}: {exc.problem}"
        return entry
    except Exception as exc:  # anything else: this folder's row says so, the others still show
        entry["status"] = f"invalid: {path}: {type(exc).__name__}: {exc}"
        return entry
    entry.update(
        width=info.width,
        height=info.height,
        native_width=native.width,
        native_height=native.height,
        default_steps=info.default_steps,
        prediction_type=info.prediction_type,
    )
    problems = _model_folder_problems(path)
    if problems:
        entry["status"] = "invalid: " + "; ".join(problems)
    return entry


def _model_folder_problems(path: Path) -> list[str]:
    """What keeps a diffusers SD folder from loading, judged from its files (no weights read),
    each naming its file; the configs the registry reads are checked there."""
    problems = []
    index = path / "model_index.json"
    try:
        config = json.loads(index.read_bytes())
    except FileNotFoundError:
        problems.append(f"{index}: missing")
    except OSError as exc:
        problems.append(f"{index}: cannot be read ({exc.strerror or exc})")
    except (ValueError, RecursionError) as exc:
        problems.append(f"{index}: not valid JSON ({exc})")
    else:
        if not isinstance(config, dict):
            problems.append(f"{index}: must be a JSON object")
    scheduler = path / "scheduler" / "scheduler_config.json"
    if not scheduler.is_file():
        problems.append(f"{scheduler}: missing")
    if not (path / "tokenizer").is_dir():
        problems.append(f"{path / 'tokenizer'}: no such folder")
    for component in ("unet", "vae", "text_encoder"):
        folder = path / component
        weights = sorted(folder.glob("*.safetensors"))
        if not weights and not any(folder.glob("*.bin")):
            problems.append(f"{folder}: no weights (*.safetensors or *.bin)")
        for file in weights:
            problem = _safetensors_problem(file)
            if problem:
                problems.append(f"{file}: {problem}")
    text_encoder = path / "text_encoder" / "config.json"
    if not text_encoder.is_file():
        problems.append(f"{text_encoder}: missing")
    return problems


def _safetensors_problem(file: Path) -> str | None:
    """None when `file` is a complete safetensors file, else why not; reads the header only
    (the 8-byte length, the JSON header, and whether the data it describes is all there)."""
    try:
        size = file.stat().st_size
        with file.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size - 8:
                return "not a safetensors file (corrupt or truncated)"
            header = json.loads(handle.read(length))
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    except (OSError, struct.error, ValueError, TypeError, KeyError, IndexError):
        return "not a safetensors file (corrupt or truncated)"
    if 8 + length + max(ends, default=0) != size:
        return "truncated or padded safetensors file"
    return None


def _base_model_folder(base: str | None, settings: Settings) -> Path:
    """--base-model as a configured model id, else as a folder; default: the default model."""
    paths = settings.model_paths()
    if base is None:
        if settings.default_model_id not in paths:
            raise ValueError(
                f"the default model {settings.default_model_id!r} is not configured: "
                "pass --base-model"
            )
        return paths[settings.default_model_id]
    if base in paths:
        return paths[base]
    if Path(base).is_dir():
        return Path(base)
    raise ValueError(
        f"--base-model {base!r} is neither a configured model id "
        f"({', '.join(sorted(paths)) or 'none'}) nor a folder"
    )


def _registered_entry(settings: Settings, model_id: str, out: Path) -> str | ModelSpec:
    """The new SDSERVE_MODELS entry: a configured id keeps its own defaults and price."""
    current = settings.models.get(model_id)
    if isinstance(current, ModelSpec):
        return current.model_copy(update={"path": str(out)})
    return str(out)


def _json_spec(spec: str | ModelSpec) -> str | dict:
    return spec if isinstance(spec, str) else spec.model_dump(mode="json", exclude_none=True)


def _model_info(settings: Settings, model_id: str, spec: str | ModelSpec) -> ModelInfo:
    """One model's registry entry, read alone: one broken folder does not hide the others."""
    only = settings.model_copy(update={"models": {model_id: spec}})
    return ModelRegistry(only).get(model_id)


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """diffusers' and transformers' per-component progress bars, off for one import."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    restore = []
    for library in (diffusers_logging, transformers_logging):
        if library.is_progress_bar_enabled():
            library.disable_progress_bar()
            restore.append(library)
    try:
        yield
    finally:
        for library in restore:
            library.enable_progress_bar()


def _model_id(text: str) -> str:
    if not MODEL_ID_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a model id: letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return text


def _print_models(models: list[dict]) -> None:
    rows = []
    for model in models:
        size = native = "-"
        if model["width"] is not None:
            size = f"{model['width']}x{model['height']}"
            native = f"{model['native_width']}x{model['native_height']}"
        rows.append(
            [
                model["id"] + (" *" if model["default"] else ""),
                size,
                native,
                model["default_steps"] or "-",
                model["prediction_type"] or "-",
                model["price_per_image_usd"],
                model["status"],
                model["path"],
            ]
        )
    headers = ["MODEL_ID", "SIZE", "NATIVE", "STEPS", "PREDICTION", "PRICE_USD", "STATUS", "PATH"]
    _print_table(headers, rows)
    print("* default model")


def _print_loras(settings: Settings, loras: list[dict]) -> None:
    if not settings.lora_dir:
        print("LoRAs: no lora_dir configured (SDSERVE_LORA_DIR)")
    elif not Path(settings.lora_dir).is_dir():
        print(f"LoRAs: lora_dir {settings.lora_dir} does not exist")
    elif not loras:
        print(f"LoRAs: none in {settings.lora_dir}")
    else:
        print(f"LoRAs in {settings.lora_dir}:")
        _print_table(
            ["LORA_ID", "STATUS", "PATH"],
            [[lora["id"], lora["status"], lora["path"]] for lora in loras],
        )


def _embedding_entry(name: str, path: Path) -> dict:
    """An embedding file's vectors, or why it cannot be read (its width is checked against a
    model when a request uses it)."""
    from service.engine.pipeline import EmbeddingError, read_embedding

    entry = {"id": name, "path": str(path), "vectors": None, "width": None, "status": OK}
    try:
        vectors = read_embedding(path, name)
    except EmbeddingError as exc:
        entry["status"] = str(exc)
    else:
        entry["vectors"], entry["width"] = vectors.shape
    return entry


def _print_embeddings(settings: Settings, embeddings: list[dict]) -> None:
    if not embeddings:
        print(f"Embeddings: none in {settings.embeddings_dir}")
        return
    print(f"Embeddings in {settings.embeddings_dir}:")
    _print_table(
        ["EMBEDDING_ID", "VECTORS", "WIDTH", "STATUS", "PATH"],
        [
            [item["id"], item["vectors"] or "-", item["width"] or "-", item["status"], item["path"]]
            for item in embeddings
        ],
    )


def _vae_entry(vae_id: str, path: Path) -> dict:
    """A VAE folder or file and whether its weights are readable (whether they fit a model is
    checked when a request names it)."""
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        problem = _safetensors_problem(files[0]) if files else "no .safetensors weights in it"
        kind = "folder"
    else:
        problem, kind = _safetensors_problem(path), "file"
    return {"id": vae_id, "kind": kind, "path": str(path), "status": problem or OK}


def _print_vaes(settings: Settings, vaes: list[dict]) -> None:
    if not vaes:
        print(f"VAEs: none in {settings.vae_dir}")
        return
    print(f"VAEs in {settings.vae_dir}:")
    _print_table(
        ["VAE_ID", "KIND", "STATUS", "PATH"],
        [[vae["id"], vae["kind"], vae["status"], vae["path"]] for vae in vaes],
    )


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(cell) for cell in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 1
