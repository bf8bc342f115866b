"""Inference cost of CasPL: images/s of each base method alone and with boosting prompts, same model, same batch.

    python studies/bench_inference.py                         # tiny ToyWorld student architecture, toy configs
    python studies/bench_inference.py --model ViT-B-16        # ViT-B/16 (random weights), paper configs
    python studies/bench_inference.py --smoke-test            # a few seconds

Weights do not change the cost, so models use random weights unless --pretrained is given. Text features are
computed once per class set before timing (CoCoOp's depend on the image, so its text tower runs per batch, which is
its real inference cost). Variants are timed interleaved (every repeat times every variant once, in a rotating
order) and reported as the median over repeats. The JSON summary is the LAST line of stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
CONFIGS = ROOT / "configs" / "adapt"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="caspl-toy-student", help="open_clip architecture or caspl-* config")
    parser.add_argument("--pretrained", default=None, help="weights (default: random init; cost is the same)")
    parser.add_argument("--configs", choices=("toy", "paper"), help="method settings (default: toy for caspl-toy-*)")
    parser.add_argument("--methods", nargs="+", default=base_methods(), choices=base_methods())
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--batches", type=int, default=3, help="batches per timed pass")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed passes per variant")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--smoke-test", action="store_true", help="tiny budget (seconds): correctness, not numbers")
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.batch_size, args.classes, args.batches, args.repeats = 8, 10, 1, 2
    args.configs = args.configs or ("toy" if args.model.startswith("caspl-toy") else "paper")
    return args


def base_methods() -> list[str]:
    from caspl.methods import BASE, list_methods

    return list_methods(BASE)


def method_settings(method: str, kind: str, text_layers: int, vision_layers: int):
    """(adapting, boosting) method configs from the shipped `<method>_<kind>.yaml`, depths capped at the model's."""
    from caspl.config import from_dict, load_yaml
    from caspl.methods.boost import BoostConfig
    from caspl.train.adapt import AdaptRunConfig
    from caspl.train.boost import BoostSection

    cfg = from_dict(AdaptRunConfig, load_yaml(CONFIGS / f"{method}_{kind}.yaml"))
    boost = cfg.boost.method if isinstance(cfg.boost, BoostSection) else BoostConfig()
    return cfg.method.fit_depths(text_layers, vision_layers), boost.fit_depths(text_layers, vision_layers)


def build_variants(loaded, method: str, kind: str, n_classes: int) -> dict:
    from caspl.methods import build_prompted_clip

    clip = loaded.model
    layers = len(clip.transformer.resblocks), len(clip.visual.transformer.resblocks)
    adapt, boost = method_settings(method, kind, *layers)
    classnames = [f"object number {i}" for i in range(n_classes)]
    variants = {}
    for name, boost_cfg in ((method, None), (f"{method}+caspl", boost)):
        torch.manual_seed(0)
        model = build_prompted_clip(clip, loaded.tokenizer, adapt, boost_cfg).set_classes(classnames).eval()
        variants[name] = model
    return variants


@torch.no_grad()
def timed_pass(model, images: torch.Tensor, batches: int) -> float:
    """Seconds for `batches` forward passes, text features computed once per class set (not for CoCoOp)."""
    start = time.perf_counter()
    text = None if model.adapt.per_image_text else model.encode_text()
    for _ in range(batches):
        model(images, text_features=text).logits.argmax(-1)
    if images.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(args: argparse.Namespace) -> dict:
    from caspl.models import ModelSpec, load_clip

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_clip(ModelSpec(args.model, args.pretrained, precision=args.precision, device=args.device))
    size = loaded.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    images = images.to(args.device, dtype=loaded.model.logit_scale.dtype)
    variants = {}
    for method in args.methods:
        variants.update(build_variants(loaded, method, args.configs, args.classes))
    names = list(variants)
    for name in names:  # warm-up
        timed_pass(variants[name], images, 1)
    seconds = {name: [] for name in names}
    for repeat in range(args.repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            seconds[name].append(timed_pass(variants[name], images, args.batches))
    n_images = args.batch_size * args.batches
    rate = {name: n_images / statistics.median(values) for name, values in seconds.items()}
    rows = []
    for method in args.methods:
        alone, cascaded = rate[method], rate[f"{method}+caspl"]
        boost = variants[f"{method}+caspl"].boost
        paired = sorted(round(100 * (c / a - 1), 1) for a, c in zip(seconds[method], seconds[f"{method}+caspl"]))
        rows.append({"method": method, "images_per_s": round(alone, 1), "caspl_images_per_s": round(cascaded, 1),
                     "slowdown_pct": round(100 * (alone / cascaded - 1), 1),
                     "slowdown_pct_per_repeat": paired,  # the two passes of one repeat ran back to back
                     "extra_vision_tokens": boost.vision_length, "extra_text_tokens": boost.text_length})
    return {"model": args.model, "configs": args.configs, "device": args.device, "precision": args.precision,
            "threads": torch.get_num_threads(), "batch_size": args.batch_size, "classes": args.classes,
            "batches_per_pass": args.batches, "repeats": args.repeats, "results": rows}


def main(argv=None) -> int:
    args = parse_args(argv)
    result = bench(args)
    for row in result["results"]:
        print(f"{row['method']:>10}: {row['images_per_s']:9.1f} img/s alone, {row['caspl_images_per_s']:9.1f} img/s "
              f"+CasPL ({row['slowdown_pct']:+.1f} %, per repeat {row['slowdown_pct_per_repeat'][0]:+.1f} to "
              f"{row['slowdown_pct_per_repeat'][-1]:+.1f} %; +{row['extra_vision_tokens']} vision tokens per layer)")
    sys.stdout.flush()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    from caspl.startup import exit_with

    exit_with(main())
