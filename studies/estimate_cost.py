"""Price a study before running it: teacher passes, teacher-cache size, FLOPs per phase, CPU- and GPU-hours.

    python studies/estimate_cost.py --config studies/configs/study/paper_b2n.yaml --measure
    python studies/estimate_cost.py --config studies/configs/study/toy_default.yaml
    python studies/estimate_cost.py --smoke-test

FLOPs come from `caspl.study.cost` (analytic, per the code's own loops; searched ranges priced at both ends).
Dataset sizes come from the data on disk when it loads, else from CoOp's published split sizes. Hours: FLOPs divided
by a rate. `--measure` times the student's forward + backward here (median of interleaved repeats) to give the
achieved CPU rate; the GPU rate is stated, not measured: `--gpu-tflops` (default: an H200's dense bf16 peak) times
`--utilization`. The JSON summary is the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# CoOp's split sizes (classes, train, val, test), as its papers list them; ImageNet's test split is its val set.
COOP_SIZES = {
    "imagenet": (1000, 1_281_167, 0, 50_000), "caltech101": (100, 4128, 1649, 2465),
    "oxford_pets": (37, 2944, 736, 3669), "stanford_cars": (196, 6509, 1635, 8041),
    "oxford_flowers": (102, 4093, 1633, 2463), "food101": (101, 50_500, 20_200, 30_300),
    "fgvc_aircraft": (100, 3334, 3333, 3333), "sun397": (397, 15_880, 3970, 19_850),
    "dtd": (47, 2820, 1128, 1692), "eurosat": (10, 13_500, 5400, 8100), "ucf101": (101, 7639, 1898, 3783),
}
H200_BF16_DENSE_TFLOPS = 989.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "studies" / "configs" / "study" / "toy_default.yaml"))
    parser.add_argument("--datasets", nargs="+", help="price these datasets (default: the study's own)")
    parser.add_argument("--measure", action="store_true", help="time the student's forward+backward on this CPU")
    parser.add_argument("--batch-size", type=int, default=8, help="images per timed step (--measure)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps (--measure)")
    parser.add_argument("--cpu-gflops", type=float, help="CPU rate to price with (default: measured, else none)")
    parser.add_argument("--gpu-tflops", type=float, default=H200_BF16_DENSE_TFLOPS, help="GPU peak (stated)")
    parser.add_argument("--utilization", type=float, default=0.3, help="fraction of the GPU peak achieved (stated)")
    parser.add_argument("--smoke-test", action="store_true", help="the toy study, one timed step")
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.measure, args.repeats, args.batch_size = True, 2, 2
    return args


def dataset_sizes(study, names: list[str]):
    """Sizes from the data itself when it loads (ToyWorld, or real data under its root), else CoOp's table."""
    from caspl.data import build_dataset
    from caspl.errors import CasplError
    from caspl.study.cost import DatasetSize

    sizes, sections = [], {d.dataset: d for d in study.datasets}
    for name in names:
        section = sections.get(name)
        try:
            ds = build_dataset(name, section.root if section else None, **(section.options if section else {}))
            sizes.append(DatasetSize(name, ds.num_classes, len(ds.train), len(ds.val), len(ds.test)))
        except CasplError:
            if name not in COOP_SIZES:
                raise
            sizes.append(DatasetSize(name, *COOP_SIZES[name]))
    return sizes


def measure_cpu_gflops(student_name: str, batch: int, repeats: int) -> dict:
    """Achieved FLOP/s of the student's image tower, forward + backward to the input (frozen weights)."""
    import torch

    from caspl.models import ModelSpec, architecture_config, load_clip
    from caspl.models.flops import image_flops

    model = load_clip(ModelSpec(student_name)).model.requires_grad_(False)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(batch, 3, size, size)
    seconds = []
    for repeat in range(repeats + 1):
        x = images.clone().requires_grad_(True)
        began = time.perf_counter()
        model.encode_image(x).sum().backward()
        if repeat:  # the first step warms up
            seconds.append(time.perf_counter() - began)
    flops = 2.0 * batch * image_flops(architecture_config(student_name)).total
    return {"gflops": flops / statistics.median(seconds) / 1e9, "step_seconds_median": statistics.median(seconds),
            "step_seconds_spread": max(seconds) - min(seconds), "threads": torch.get_num_threads(), "batch": batch}


def main(argv=None) -> int:
    args = parse_args(argv)
    from caspl.config import load_yaml
    from caspl.errors import CasplError
    from caspl.models import architecture_config
    from caspl.study.config import load_study_config
    from caspl.study.cost import price_study
    from caspl.study.space import build_space

    try:  # priced before data or weights exist: only the config and the architectures are read
        study = load_study_config(load_yaml(args.config))
        cfg = architecture_config(study.student.name)
        space = build_space(study, min(cfg["vision_cfg"]["layers"], cfg["text_cfg"]["layers"]))
    except CasplError as exc:
        print(f"estimate_cost: error: {exc}", file=sys.stderr)
        return 2
    names = args.datasets or [d.dataset for d in study.datasets]
    costs = [price_study(study, space, size) for size in dataset_sizes(study, names)]
    measured = measure_cpu_gflops(study.student.name, args.batch_size, args.repeats) if args.measure else None
    cpu_rate = (args.cpu_gflops or (measured or {}).get("gflops") or 0) * 1e9
    gpu_rate = args.gpu_tflops * 1e12 * args.utilization
    rows = [_row(c, cpu_rate, gpu_rate) for c in costs]
    total = {k: None if rows[0][k] is None else sum(r[k] for r in rows) for k in rows[0] if k != "dataset"}
    print(_table(rows + ([{"dataset": "**total**", **total}] if len(rows) > 1 else []), study, args))
    summary = {"config": args.config, "trials": costs[0].trials, "datasets": rows, "total": total,
               "cpu_measured": measured, "gpu_rate_tflops": gpu_rate / 1e12}
    print(json.dumps(summary))
    return 0


def _row(cost, cpu_rate: float, gpu_rate: float) -> dict:
    row = {"dataset": cost.dataset, "teacher_passes": cost.teacher.passes, "cache_gb": cost.cache_bytes / 1e9,
           "teacher_pflop": cost.teacher.flops / 1e15}
    for end in ("low", "high"):
        row[f"boost_pflop_{end}"] = cost.boost[end].flops / 1e15
        row[f"adapt_pflop_{end}"] = cost.adapt[end].flops / 1e15
        row[f"gpu_hours_{end}"] = cost.total(end) / gpu_rate / 3600
        row[f"cpu_hours_{end}"] = cost.total(end) / cpu_rate / 3600 if cpu_rate else None
    return row


def _table(rows: list[dict], study, args) -> str:
    head = ("| dataset | teacher passes | cache GB | teacher PFLOP | boosting PFLOP | adapting PFLOP | GPU-hours |"
            " CPU-hours |")
    lines = [f"{study.name}: {study.search.num_samples} configurations x {len(study.search.seeds)} seed(s) over "
             f"{', '.join(study.methods)}; ranges low-high; GPU at {args.gpu_tflops:g} TFLOP/s x "
             f"{args.utilization:g}", "", head, "|---|" + "---:|" * 7]
    for r in rows:
        span = lambda key, fmt: ("–" if r[key + "_low"] is None  # noqa: E731
                                 else f"{r[key + '_low']:{fmt}}-{r[key + '_high']:{fmt}}")
        lines.append(f"| {r['dataset']} | {r['teacher_passes']:,} | {r['cache_gb']:.2f} | {r['teacher_pflop']:.3g} | "
                     f"{span('boost_pflop', '.3g')} | {span('adapt_pflop', '.3g')} | {span('gpu_hours', '.3g')} | "
                     f"{span('cpu_hours', '.3g')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    from caspl.startup import exit_with

    exit_with(main())
