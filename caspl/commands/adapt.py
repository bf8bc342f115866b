"""`caspl adapt`: adapting runs (phase 2) from a YAML config, one per seed, with base/novel/HM at the end."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from caspl.commands.common import add_config_argument, load_config


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "adapt", help="adapting runs (phase 2: a base method, +CasPL when the config has boost) from a YAML config")
    add_config_argument(parser)
    parser.add_argument("--seed", type=int, action="append", dest="seeds",
                        help="run this seed (repeatable; default: the config's seeds)")
    parser.add_argument("--no-boost", action="store_true", help="the base method alone (drop the boost section)")
    parser.set_defaults(func=run_adapt_command)


def run_adapt_command(args: argparse.Namespace) -> int:
    from caspl.train.adapt import AdaptRunConfig
    from caspl.train.protocols import base_to_novel, few_shot

    cfg = load_config(AdaptRunConfig, args.config, {"seeds": args.seeds})
    if args.no_boost:
        cfg = replace(cfg, boost=None)
    if cfg.subsample == "base":
        results = [base_to_novel(cfg)]
    else:  # all classes: the few-shot protocol at the config's K
        results = few_shot(cfg, shots=[cfg.shots])
    for result in results:
        print(json.dumps(result.to_dict(), indent=1))
        summary = result.summary
        if "hm" in summary:
            print(f"{result.label} on {result.dataset} ({summary['seeds']} seed(s)): base {summary['base']:.2f} "
                  f"± {summary['base_std']:.2f}  novel {summary['novel']:.2f} ± {summary['novel_std']:.2f}  "
                  f"HM {summary['hm']:.2f}")
        else:
            print(f"{result.label} on {result.dataset} ({summary['seeds']} seed(s)): accuracy "
                  f"{summary['accuracy']:.2f} ± {summary['accuracy_std']:.2f}")
    return 0
