"""CLI subcommands: each module here exposes `register(subparsers)`; `caspl.cli` discovers them."""
