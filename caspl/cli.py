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
    from caspl.methods import list_methods

    print("\n".join(list_methods()))
    return 0


def _models(args: argparse.Namespace) -> int:
    from caspl.models import list_architectures

    print("\n".join(list_architectures(caspl_only=not args.all)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="caspl", description="Cascade Prompt Learning studies on open_clip and Ray.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("version", help="print versions").set_defaults(func=_version)
    sub.add_parser("methods", help="list registered prompt methods").set_defaults(func=_methods)
    models = sub.add_parser("models", help="list CLIP architectures (caspl's own JSON configs by default)")
    models.add_argument("--all", action="store_true", help="include every open_clip architecture")
    models.set_defaults(func=_models)
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


if __name__ == "__main__":
    sys.exit(main())
