"""Loading configs: defaults <- YAML file <- dotted overrides (OmegaConf structured configs do
the merging and type checks), validation, YAML / flat views, the ``--help`` reference and the
command line every job shares."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from wsss_ray.config.base import ConfigError

T = TypeVar("T")

#: the checkout holding configs/ (jobs' default configs are found from any folder)
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _explain(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError) or "not in" in str(err):
        return f"config error: unknown key '{key}'"
    msg = str(err).splitlines()[0].strip()
    return f"config error: {key}: {msg}"


_BOOLS = {"true": "true", "false": "false"}


def _check_bool(base: Any, item: str) -> None:
    """A boolean key takes true or false only: OmegaConf would read yes/on/1 as true."""
    key, _, value = item.partition("=")
    try:
        current = OmegaConf.select(base, key.strip(), throw_on_missing=False)
    except OmegaConfBaseException:
        return
    if isinstance(current, bool) and value.strip().lower() not in _BOOLS:
        raise ConfigError(
            f"config error: {key.strip()}: '{value}' is not a boolean (true or false)"
        )


def load_config(
    schema: type[T], config_file: str | None, overrides: list[str], check: bool = True
) -> T:
    """Merge defaults <- YAML file <- dotted overrides, check types and paths, return a typed
    dataclass instance. Raises :class:`ConfigError` with a one-line message naming the key.
    ``check=False``: the types only (``--print-config`` of a job whose inputs do not exist
    yet)."""
    base = OmegaConf.structured(schema)
    try:
        if config_file:
            if not os.path.isfile(config_file):
                raise ConfigError(f"config error: --config file not found: {config_file}")
            base = OmegaConf.merge(base, OmegaConf.load(config_file))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"config error: override '{item}' is not of the form key=value")
            _check_bool(base, item)
            base = OmegaConf.merge(base, OmegaConf.from_dotlist([item]))
        missing = sorted(OmegaConf.missing_keys(base))
        if missing:
            raise ConfigError(f"config error: required key '{missing[0]}' has no value")
        cfg = OmegaConf.to_object(base)
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err)) from None
    if check:
        validate(cfg)
    return cfg  # type: ignore[return-value]


def validate(cfg: Any) -> None:
    """Semantic checks the type system cannot express: the job schema's ``check``, which runs
    the ``check`` of each of its sections (beside the section it validates). Raises
    ConfigError."""
    check = getattr(cfg, "check", None)
    if check is not None:
        check()


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_flat_dict(cfg: Any) -> dict[str, Any]:
    """``{"train.max_steps": 100, ...}`` for MLflow params."""
    out: dict[str, Any] = {}

    def walk(prefix: str, obj: Any) -> None:
        if dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                walk(f"{prefix}{f.name}.", getattr(obj, f.name))
        else:
            out[prefix[:-1]] = obj

    walk("", cfg)
    return out


def save_resolved(cfg: Any, folder: str | Path) -> Path:
    path = Path(folder) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))
    return path


def reference(schema: type) -> str:
    """Every key with its default and help, for ``--help`` and docs/CONFIG.md (defaults are read
    from an instance, so sections built with non-default values show those)."""
    lines: list[str] = []

    def walk(prefix: str, cls: type, obj: Any) -> None:
        for f in dataclasses.fields(cls):
            if obj is not None:
                default = getattr(obj, f.name)
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = f.default
            if dataclasses.is_dataclass(default):
                walk(f"{prefix}{f.name}.", type(default), default)
                continue
            shown = "???" if default is MISSING or default is dataclasses.MISSING else repr(default)
            lines.append(f"  {prefix}{f.name} = {shown}    {f.metadata.get('help', '')}".rstrip())

    walk("", schema, None)
    return "\n".join(lines)


def parse_job_args(
    schema: type[T],
    description: str,
    argv: list[str] | None = None,
    default_config: str | None = None,
) -> T:
    """The command line every job shares: ``--config FILE`` plus ``key.sub=value`` overrides,
    ``--print-config`` and ``--verbose``. Config errors exit with status 2 and one line on
    stderr. Sets up the job's console (:mod:`wsss_ray.console`): without ``--verbose``, Ray's
    and the libraries' output goes to ``<run.output_dir>/<run.name>/console.log``."""
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (override with key.sub=value):\n" + reference(schema),
    )
    parser.add_argument(
        "--config",
        default=default_config,
        help=f"YAML file of overrides over the defaults (default: {default_config})",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    add_verbose_flag(parser)
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args(argv)
    config_file = args.config
    if config_file and config_file == default_config and not os.path.isfile(config_file):
        config_file = str(PROJECT_ROOT / config_file)  # a job started from another folder
    try:
        cfg = load_config(schema, config_file, args.overrides)
    except ConfigError as err:
        if args.print_config:  # show it anyway: e.g. a later phase's inputs do not exist yet
            try:
                unchecked = load_config(schema, config_file, args.overrides, check=False)
            except ConfigError:
                unchecked = None
            if unchecked is not None:
                print(to_yaml(unchecked))
                print(f"note: not runnable yet: {err}", file=sys.stderr)
                raise SystemExit(0) from None
        print(str(err), file=sys.stderr)
        raise SystemExit(2) from None
    if args.print_config:
        print(to_yaml(cfg))
        raise SystemExit(0)
    from wsss_ray.console import configure, run_log_path

    configure(args.verbose, run_log_path(cfg))
    return cfg


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    """``--verbose``, the same on every job (its own parser or :func:`parse_job_args`)."""
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's, DeepSpeed's and the libraries' output on the console, as Ray prints "
        "it (default: only the job's own [wsss_ray] lines, warnings and errors; the rest goes "
        "to console.log in the run's folder)",
    )


def run_job(schema: type, description: str, run: str, argv: list[str] | None = None) -> int:
    """A job's whole ``main``: :func:`parse_job_args`, then ``run`` (``"module:function"``,
    imported only now, so ``--help`` and config errors import no torch) called with the config.
    Returns the exit status, 0."""
    import importlib

    from wsss_ray.errors import user_errors

    cfg = parse_job_args(schema, description, argv)
    module, _, name = run.partition(":")
    with user_errors():  # a dataset or checkpoint file that cannot be used: one line, exit 2
        getattr(importlib.import_module(module), name)(cfg)
    return 0
