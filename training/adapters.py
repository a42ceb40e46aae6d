"""Adapter versions from the command line, and the smoke test every promoted adapter passes.

    chime adapters add runs/cpu-lora/adapter --promote     copy, smoke-test on a few dev conversations, serve
    chime adapters list [--json]
    chime adapters promote NAME
    chime adapters rollback

The registry itself (atomic add and promote, the watcher a running bot uses) is
`model/adapter_registry.py`; the smoke test replays conversations with `training.evaluate`, so it
lives here, on the training side of the imports.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from model.adapter_registry import (
    AdapterRegistry,
    AdapterRegistryError,
    AdapterVersion,
    default_adapters_dir,
)
from model.config import EngineConfig
from model.conversation import Conversation
from model.errors import ChimeError

log = logging.getLogger(__name__)

SMOKE_CONVERSATIONS = Path(__file__).resolve().parent.parent / "conversations" / "dev" / "batch_A.jsonl"


# ---------------------------------------------------------------------------- validation


def smoke_validate(
    path: str | Path, config: EngineConfig, conversations: Iterable[Conversation], limit: int = 3
) -> dict[str, Any]:
    """Load the adapter as the engine would and decide the first `limit` conversations; returns the metrics.

    Raises AdapterRegistryError when the adapter does not load, its weights are not finite, or any
    P(respond) is NaN or outside [0, 1].
    """
    from model.engine import Engine
    from model.loading import release_memory
    from training.evaluate import evaluate

    path = Path(path)
    _check_finite_weights(path)
    try:
        engine = Engine.from_config(dataclasses.replace(config, adapter=str(path)))
    except Exception as e:
        raise AdapterRegistryError(f"adapter {path} does not load: {e}") from e
    try:
        metrics, rows = evaluate(engine, list(conversations)[:limit])
    finally:
        del engine
        release_memory()
    bad = [r for r in rows if not (isinstance(r.p_respond, float) and math.isfinite(r.p_respond) and 0.0 <= r.p_respond <= 1.0)]
    if bad:
        raise AdapterRegistryError(
            f"adapter {path}: P(respond) is NaN or outside [0, 1] for {len(bad)} of {len(rows)} messages "
            f"(first: {bad[0].conversation_id} #{bad[0].index}: {bad[0].p_respond})"
        )
    return metrics


def _check_finite_weights(path: Path) -> None:
    """The engine turns a NaN P(respond) into 0, so NaN weights are caught where they are: in the file."""
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        return
    import torch
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights))
    except Exception as e:
        raise AdapterRegistryError(f"adapter {path}: unreadable weights: {e}") from e
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise AdapterRegistryError(f"adapter {path}: non-finite values in {key}")


# ---------------------------------------------------------------------------- command line


def add_arguments(sub: argparse._SubParsersAction) -> None:
    """Register `chime adapters list|add|promote|rollback`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", help="the registry (default $CHIME_ADAPTERS_DIR, else $CHIME_HOME/adapters)")

    p = sub.add_parser("adapters", help="versioned adapters: list, add, promote, roll back")
    actions = p.add_subparsers(dest="adapters_command", required=True)
    a = actions.add_parser("list", parents=[common], help="every version, oldest first; the serving one marked")
    a.add_argument("--json", action="store_true", help="one JSON list")
    a = actions.add_parser("add", parents=[common], help="copy an adapter directory in as a new version")
    a.add_argument("src", metavar="DIR", help="a PEFT adapter directory (e.g. runs/cpu-lora/adapter)")
    a.add_argument("--name", help="version name (default vYYYYmmdd-HHMMSS, UTC)")
    a.add_argument("--promote", action="store_true", help="serve it right away")
    a.add_argument("--no-validate", action="store_true",
                   help=f"skip the smoke test (loading it and deciding the first 3 conversations of {SMOKE_CONVERSATIONS})")
    a.add_argument("--model", help="base model for the smoke test (default: the embedded default)")
    a = actions.add_parser("promote", parents=[common], help="serve a version (a running bot picks it up)")
    a.add_argument("name")
    actions.add_parser("rollback", parents=[common], help="serve the previously serving version again")
    p.set_defaults(func=run)


def _smoke_validator(model: str | None) -> Callable[[Path], Any]:
    if not SMOKE_CONVERSATIONS.is_file():  # never skip the check silently
        raise AdapterRegistryError(f"the smoke test's conversations are missing ({SMOKE_CONVERSATIONS}); "
                                   "restore them, or add with --no-validate to skip the smoke test")
    from model.conversation import read_conversations

    conversations = read_conversations(SMOKE_CONVERSATIONS)[:3]
    config = EngineConfig(model=model) if model else EngineConfig()

    def validate(path: Path) -> None:
        metrics = smoke_validate(path, config, conversations, limit=3)
        log.info("smoke test of %s: %d messages decided, macro-F1 %s", path, metrics.get("n_scored", 0),
                 metrics.get("macro_f1"))

    return validate


def _print_versions(registry: AdapterRegistry, versions: list[AdapterVersion]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"adapters · {registry.root}")
    for column in ("", "name", "created (UTC)", "threshold", "named", "dev macro-F1", "recipe"):
        table.add_column(column)

    def num(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, (int, float)) else "-"

    for v in versions:
        dev = v.meta.get("dev_metrics")
        metrics: dict[str, Any] = dev if isinstance(dev, dict) else {}
        table.add_row("●" if v.serving else "", v.name, v.created_at[:19].replace("T", " "), num(v.meta.get("threshold")),
                      num(v.meta.get("named_threshold")), num(metrics.get("macro_f1")), str(v.meta.get("recipe", "-")))
    console = Console()
    console.print(table)
    if not versions:
        console.print("no versions yet: `chime adapters add DIR`")


def run(args: argparse.Namespace) -> int:
    """Run a `chime adapters` sub-command; errors are AdapterRegistryError (the CLI prints them)."""
    registry = AdapterRegistry(args.dir or default_adapters_dir())
    command = args.adapters_command
    if command == "list":
        versions = registry.versions()
        if args.json:
            print(json.dumps([v.to_json() for v in versions], indent=1, ensure_ascii=False))
        else:
            _print_versions(registry, versions)
        return 0
    if command == "add":
        validate = None if args.no_validate else _smoke_validator(args.model)
        version = registry.add(args.src, name=args.name, validate=validate)
        print(f"added {version.name}: {version.path}")
        if args.promote:
            registry.promote(version.name)
            print(f"serving {version.name}")
        return 0
    if command == "promote":
        version = registry.promote(args.name)
        print(f"serving {version.name}")
        return 0
    if command == "rollback":
        version = registry.rollback()
        print(f"serving {version.name}")
        return 0
    raise AdapterRegistryError(f"unknown adapters command {command!r}")


def main(argv: list[str] | None = None) -> int:
    """`python -m training.adapters list|add|promote|rollback` (the same as `chime adapters ...`)."""
    parser = argparse.ArgumentParser(prog="chime")
    add_arguments(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["adapters", *(argv if argv is not None else sys.argv[1:])])
    try:
        return run(args)
    except ChimeError as e:
        print(f"chime: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
