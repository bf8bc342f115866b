"""`caspl eval`: an evaluation protocol for a config (training what is missing), or for saved prompts."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from caspl.commands.common import add_config_argument, load_config

# The parser is built for every `caspl` call, `--help` included, so it names the protocols without importing
# caspl.train.protocols (torch, open_clip: seconds); tests/test_cli.py checks these equal the protocol module's.
PROTOCOLS = ("base2novel", "fewshot", "cross", "dg")
FEW_SHOTS = (1, 2, 4, 8, 16)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate a config by protocol (base2novel | fewshot | cross | dg), or saved prompts (--prompts)")
    add_config_argument(parser)
    parser.add_argument("--prompts", help="a saved prompt folder (adapt + boost) to evaluate instead of training")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="base2novel",
                        help="dg = domain generalisation: train on data (e.g. imagenet), test on data + `targets:` "
                             "(e.g. imagenet_v2, imagenet_sketch, imagenet_a, imagenet_r), each on its own classes")
    parser.add_argument("--method", help="replace the config's method by this one with its defaults (e.g. zeroshot)")
    parser.add_argument("--no-boost", action="store_true", help="drop the config's boosting prompts")
    parser.add_argument("--shots", type=int, nargs="+", default=list(FEW_SHOTS), help="K values for fewshot")
    parser.add_argument("--seed", type=int, action="append", dest="seeds", help="seed(s) to run (repeatable)")
    parser.set_defaults(func=run_eval_command)


def run_eval_command(args: argparse.Namespace) -> int:
    from caspl.train.adapt import AdaptRunConfig

    cfg = load_config(AdaptRunConfig, args.config, {"seeds": args.seeds})
    if args.method:
        cfg = replace(cfg, method={"method": args.method})
    if args.no_boost:
        cfg = replace(cfg, boost=None)
    results = _saved_prompts(cfg, args) if args.prompts else _protocol(cfg, args)
    for result in results:
        print(json.dumps(result, indent=1))
    return 0


def _protocol(cfg, args) -> list[dict]:
    from caspl.train.protocols import few_shot, run_protocol

    if args.protocol == "fewshot":
        return [r.to_dict() for r in few_shot(cfg, shots=args.shots)]
    return [r.to_dict() for r in run_protocol(args.protocol, cfg)]


def _saved_prompts(cfg, args) -> list[dict]:
    """Evaluate the prompts in `args.prompts` (built with the method configs saved next to them)."""
    from caspl.methods import build_prompted_clip
    from caspl.methods.state import load_prompt_state, read_prompt_state
    from caspl.models import load_clip
    from caspl.train.adapt import load_dataset
    from caspl.train.protocols import (
        evaluate_all_classes,
        evaluate_base_novel,
        evaluate_domain_generalisation,
        evaluate_targets,
        load_dg_datasets,
    )

    # datasets first: a bad layout or a target outside the source's classes fails before any model loads
    if args.protocol == "dg":
        dataset, targets = load_dg_datasets(cfg.data, cfg.targets)
    else:
        dataset = load_dataset(cfg.data)
        targets = {t.dataset: load_dataset(t) for t in cfg.targets} if args.protocol == "cross" else {}
    _, meta = read_prompt_state(args.prompts)
    student = load_clip(cfg.student.spec(cfg.runtime))
    model = build_prompted_clip(student.model, student.tokenizer, meta.get("adapt"), meta.get("boost"))
    load_prompt_state(model, args.prompts)
    batch = cfg.optim.eval_batch_size
    if args.protocol == "base2novel":
        metrics = evaluate_base_novel(model, dataset, batch)
    elif args.protocol == "fewshot":
        metrics = {"accuracy": evaluate_all_classes(model, dataset, batch)}
    elif args.protocol == "dg":
        metrics = evaluate_domain_generalisation(model, dataset, targets, batch)
    else:
        metrics = evaluate_targets(model, {cfg.data.dataset: dataset, **targets}, batch)
    return [{"protocol": args.protocol, "prompts": str(args.prompts), "dataset": cfg.data.dataset, **metrics}]
