"""The paper's base-to-novel table in miniature, on the ToyWorld datasets.

Rows: the zero-shot student, each base method alone and each base method +CasPL; columns: base / novel / HM per
dataset and their average (HM of the averaged base and novel accuracies). One boosting run per dataset (seed 1),
shared by every method and seed (run_boost reuses it by key); adapting runs use seeds 1, 2, 3 and run in a pool of
worker processes. Finished runs are reused on a re-run (they live in the artefact store, keyed by their config).

    python studies/toy_table.py                    # full table (<= 30 min on 2 cores, cold cache)
    python studies/toy_table.py --smoke-test       # 1 dataset, 1 seed, a few epochs (CI)

Writes table.md, results.json and hm.png into --out (default studies/results/toy_table/).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CONFIGS = ROOT / "configs" / "adapt"
DATASETS = ("toy_shapes", "toy_sketch", "toy_textures")
ZEROSHOT = "zeroshot"


def base_methods() -> list[str]:
    """Every registered base method (a new method file joins the table by existing)."""
    from caspl.methods import BASE, list_methods

    return list_methods(BASE)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="ToyWorld base-to-novel table: methods alone and +CasPL")
    parser.add_argument("--out", default=str(ROOT / "results" / "toy_table"))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--methods", nargs="+", default=base_methods(), choices=base_methods())
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--workers", type=int, default=2, help="adapting runs in parallel (one thread each)")
    parser.add_argument("--configs", default=str(CONFIGS), help="folder with <method>_toy.yaml configs")
    parser.add_argument("--smoke-test", action="store_true", help="1 dataset, 1 seed, tiny budgets (CI)")
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.datasets, args.seeds = ["toy_sketch"], [1]
    return args


# --- configs --------------------------------------------------------------------------------------------------------


def method_config(args: argparse.Namespace, method: str, dataset: str):
    """The ToyWorld config of `method`, pointed at `dataset` (tiny budgets for the smoke test)."""
    from caspl.config import from_dict, load_yaml
    from caspl.train.adapt import AdaptRunConfig

    data = load_yaml(Path(args.configs) / f"{method}_toy.yaml")
    data["data"] = {**data["data"], "dataset": dataset}
    if args.smoke_test:
        data["data"]["options"] = {**data["data"].get("options", {}), "n_train": 8, "n_val": 4, "n_test": 8}
        data["shots"] = 4
        data["optim"] = {**data["optim"], "epochs": 2}
        data["boost"] = {**data["boost"], "optim": {**data["boost"]["optim"], "epochs": 2}}
        for model in (data["student"], data["boost"]["teacher"]):  # ToyWorld weights from the smoke recipes
            if model.get("pretrained") == "toyworld":
                model["pretrained"] = "toyworld-smoke"
    return from_dict(AdaptRunConfig, data)


def plan_jobs(args: argparse.Namespace, boost_folders: dict[str, Path]) -> list[tuple[str, str, int, object]]:
    """(dataset, row label, seed, config) for every run of the table."""
    jobs = []
    for dataset in args.datasets:
        for method in args.methods:
            cfg = method_config(args, method, dataset)
            if method == args.methods[0]:  # zero-shot is deterministic: one evaluation, no seeds
                jobs.append((dataset, ZEROSHOT, args.seeds[0], replace(cfg, method={"method": ZEROSHOT}, boost=None)))
            for seed in args.seeds:
                jobs.append((dataset, method, seed, replace(cfg, boost=None)))
                jobs.append((dataset, f"{method}+caspl", seed, replace(cfg, boost=str(boost_folders[dataset]))))
    return jobs


def boost_all(args: argparse.Namespace) -> dict[str, Path]:
    """One boosting run per dataset (the boost section is the same in every method's config)."""
    from caspl.artifacts import ArtifactStore
    from caspl.train.adapt import resolve_boost_prompts

    folders = {}
    for dataset in args.datasets:
        cfg = method_config(args, args.methods[0], dataset)
        started = time.perf_counter()
        folders[dataset] = resolve_boost_prompts(cfg, ArtifactStore(cfg.runtime.store), log=_quiet)
        print(f"[toy_table] boosting prompts for {dataset}: {time.perf_counter() - started:.0f}s", flush=True)
    _stop_ray()
    return folders


def _stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()  # frees the cores for the adapting pool


def _quiet(line: str) -> None:
    if "epoch" not in line:
        print(line, flush=True)


# --- running --------------------------------------------------------------------------------------------------------

_STUDENTS: dict = {}


def run_job(job: tuple[str, str, int, object]) -> dict:
    """One adapting run + base/novel evaluation (in a worker process; the student is loaded once per process)."""
    import torch

    from caspl.train.protocols import base_to_novel

    dataset, label, seed, cfg = job
    torch.set_num_threads(cfg.runtime.threads or 1)
    spec = cfg.student.spec(cfg.runtime)
    if spec not in _STUDENTS:
        from caspl.models import load_clip

        _STUDENTS[spec] = load_clip(spec)
    started = time.perf_counter()
    result = base_to_novel(replace(cfg, seeds=[seed]), student=_STUDENTS[spec], log=lambda line: None)
    return {"dataset": dataset, "label": label, **result.per_seed[0], "seconds": time.perf_counter() - started}


def run_all(jobs: list, workers: int) -> list[dict]:
    rows = []
    context = multiprocessing.get_context("spawn")  # no fork after Ray or torch threads started
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        for n, row in enumerate(pool.map(run_job, jobs), 1):
            rows.append(row)
            print(f"[toy_table] {n}/{len(jobs)} {row['dataset']} {row['label']} seed {row['seed']}: "
                  f"base {row['base']:.1f} novel {row['novel']:.1f} HM {row['hm']:.1f} ({row['seconds']:.0f}s)",
                  flush=True)
    return rows


# --- the table ------------------------------------------------------------------------------------------------------


def summarise(rows: list[dict], datasets: list[str], labels: list[str]) -> dict:
    """{label: {dataset | "average": aggregate}}; the average is the HM of the base and novel averages."""
    from caspl.train.metrics import aggregate_seeds, harmonic_mean

    table = {}
    for label in labels:
        per_dataset = {d: aggregate_seeds([r for r in rows if r["label"] == label and r["dataset"] == d])
                       for d in datasets}
        base = sum(v["base"] for v in per_dataset.values()) / len(datasets)
        novel = sum(v["novel"] for v in per_dataset.values()) / len(datasets)
        table[label] = {**per_dataset, "average": {"base": base, "novel": novel, "hm": harmonic_mean(base, novel)}}
    return table


def markdown(table: dict, datasets: list[str], seeds: list[int]) -> str:
    columns = [*datasets, "average"]
    head = "| method | " + " | ".join(f"{c} base | {c} novel | {c} HM" for c in columns) + " |"
    rule = "|---|" + "---:|" * (3 * len(columns))
    lines = [f"Base-to-novel on ToyWorld, {len(seeds)} seed(s) ({', '.join(map(str, seeds))}); mean test accuracy "
             "(%); average = HM of the averaged base and novel accuracies.", "", head, rule]
    for label, cells in table.items():
        values = " | ".join(f"{cells[c]['base']:.1f} | {cells[c]['novel']:.1f} | {cells[c]['hm']:.1f}" for c in columns)
        lines.append(f"| {label} | {values} |")
    return "\n".join(lines) + "\n"


def acceptance(table: dict, methods: list[str]) -> dict:
    """The two claims the table should show: CasPL raises each method's average HM; CoOp loses novel accuracy."""
    checks = {f"{m}+caspl HM > {m} HM": table[f"{m}+caspl"]["average"]["hm"] > table[m]["average"]["hm"]
              for m in methods}
    if "coop" in methods:
        checks["coop novel < zeroshot novel"] = table["coop"]["average"]["novel"] < table[ZEROSHOT]["average"]["novel"]
    return checks


def plot(table: dict, datasets: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [*datasets, "average"]
    methods = [label for label in table if label != ZEROSHOT and "+caspl" not in label]
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 3.4), sharey=True, squeeze=False)
    for ax, column in zip(axes[0], columns):
        xs = range(len(methods))
        ax.bar([x - 0.2 for x in xs], [table[m][column]["hm"] for m in methods], 0.4, label="alone")
        ax.bar([x + 0.2 for x in xs], [table[f"{m}+caspl"][column]["hm"] for m in methods], 0.4, label="+CasPL")
        ax.axhline(table[ZEROSHOT][column]["hm"], color="gray", linestyle="--", label="zero-shot")
        ax.set_xticks(list(xs), methods, rotation=45)
        ax.set_title(column)
    axes[0][0].set_ylabel("HM (%)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    boost_folders = boost_all(args)
    jobs = plan_jobs(args, boost_folders)
    rows = run_all(jobs, args.workers)
    labels = [ZEROSHOT] + [label for m in args.methods for label in (m, f"{m}+caspl")]
    table = summarise(rows, args.datasets, labels)
    checks = acceptance(table, args.methods)
    text = markdown(table, args.datasets, args.seeds)
    text += "\n" + "\n".join(f"- {claim}: {'yes' if ok else 'NO'}" for claim, ok in checks.items()) + "\n"
    (out / "table.md").write_text(text)
    seconds = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps({"rows": rows, "table": table, "checks": checks,
                                                   "smoke_test": args.smoke_test, "seconds": seconds}, indent=1))
    plot(table, args.datasets, out / "hm.png")
    print(text)
    print(f"[toy_table] wrote {out}/table.md, results.json, hm.png in {seconds:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
