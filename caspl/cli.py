"""The `caspl` command. Subcommands grow with the project; `caspl --help` lists them."""

from __future__ import annotations

import argparse
import sys

from caspl import __version__
from caspl.errors import CasplError


def _version(args: argparse.Namespace) -> int:
    import open_clip
    import torch

    print(f"caspl {__version__} (torch {torch.__version__}, open_clip {open_clip.__version__})")
    return 0


def _methods(args: argparse.Namespace) -> int:
    from caspl.methods import list_methods, method_class

    for name in list_methods():
        print(f"{name:12s} {method_class(name).config_cls.kind}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from caspl.models import list_architectures

    print("\n".join(list_architectures(caspl_only=not args.all)))
    return 0


def _toyworld_build(args: argparse.Namespace) -> int:
    """Build (or load) the ToyWorld teacher and student; print their zero-shot base/novel/HM per dataset."""
    import time

    from caspl.train.toyworld_pretrain import build_toyworld_models, format_zeroshot_table

    start = time.perf_counter()
    results = build_toyworld_models(force=args.force, progress=True)
    print(format_zeroshot_table(results))
    state = "built" if any(r["built"] for r in results.values()) else "loaded from cache"
    print(f"{state} in {time.perf_counter() - start:.1f} s")
    for name, result in results.items():
        print(f"  {name}: {result['weights']}")
    return 0


def _add_toyworld(sub) -> None:
    toyworld = sub.add_parser("toyworld", help="the offline ToyWorld: pretrained tiny teacher and student CLIPs")
    actions = toyworld.add_subparsers(dest="toyworld_command", metavar="ACTION", required=True)
    build = actions.add_parser("build", help="pretrain (or load) the ToyWorld teacher and student; print zero-shot HM")
    build.add_argument("--force", action="store_true", help="rebuild even when cached")
    build.set_defaults(func=_toyworld_build)


def _command_modules() -> list:
    """Every `caspl.commands.<name>` module with a `register(subparsers)` function, in name order."""
    import importlib
    import pkgutil

    import caspl.commands

    names = [m.name for m in pkgutil.iter_modules(caspl.commands.__path__)]
    modules = [importlib.import_module(f"caspl.commands.{name}") for name in names]
    return [m for m in modules if hasattr(m, "register")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="caspl", description="Cascade Prompt Learning studies on open_clip and Ray.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _command_modules():
        module.register(sub)
    sub.add_parser("version", help="print versions").set_defaults(func=_version)
    sub.add_parser("methods", help="list registered prompt methods").set_defaults(func=_methods)
    models = sub.add_parser("models", help="list CLIP architectures (caspl's own JSON configs by default)")
    models.add_argument("--all", action="store_true", help="include every open_clip architecture")
    models.set_defaults(func=_models)
    _add_toyworld(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except CasplError as exc:
        print(f"caspl: error: {exc}", file=sys.stderr)
        return 2


def run() -> None:
    """The `caspl` console script: main(), then an exit that skips the shutdown's collections (caspl.startup).
    main() alone is for callers in a longer-lived process (tests), whose objects must stay collectable."""
    from caspl.startup import exit_with

    exit_with(main())


if __name__ == "__main__":
    run()
