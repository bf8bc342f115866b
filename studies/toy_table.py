"""The paper's base-to-novel table in miniature, on the ToyWorld datasets.

Rows: the zero-shot student, the boosted student (zero-shot over the boosting prompts, "zeroshot+caspl"), each base
method alone and each base method +CasPL; columns: base / novel / HM per dataset and their average (HM of the
averaged base and novel accuracies). Two reference rows frame them: the zero-shot teacher (what boosting distils)
and a linear probe on the student's frozen image features of the same K-shot training images (base classes only;
its weight decay chosen on validation). One boosting run per dataset (seed 1), shared by every method and seed
(run_boost reuses it by key); adapting runs use seeds 1, 2, 3 and run in a pool of worker processes. Finished runs
are reused on a re-run (they live in the artefact store, keyed by their config).

    python studies/toy_table.py                    # full table (budget: 30 min on 2 cores, cold cache)
    python studies/toy_table.py --smoke-test       # 1 dataset, 1 seed, a few epochs (CI)

Writes table.md, results.json and hm.png into --out (default studies/results/toy_table/). Besides the table: each
row's seed spread of the average HM, CoOp's accuracy on its own K-shot training images against zero-shot's, the
mean pairwise cosine of the class text features per dataset, and the issue-12 acceptance checks.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CONFIGS = ROOT / "configs" / "adapt"
DATASETS = ("toy_faded", "toy_underwater", "toy_night")  # domains the student (almost) never saw; see README
ZEROSHOT = "zeroshot"
BOOSTED_ROW = "zeroshot+caspl"  # the boosted student: zero-shot over the boosting prompts, no adapting


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
        args.datasets, args.seeds = ["toy_night"], [1]
    return args


# --- configs --------------------------------------------------------------------------------------------------------


def method_config(args: argparse.Namespace, method: str, dataset: str):
    """The ToyWorld config of `method`, pointed at `dataset` (tiny budgets for the smoke test)."""
    from caspl.config import from_dict, load_yaml
    from caspl.train.adapt import AdaptRunConfig
    from caspl.train.toyworld_pretrain import with_smoke_weights

    data = load_yaml(Path(args.configs) / f"{method}_toy.yaml")
    data["method"] = init_from_template_of(data["method"], data["data"]["dataset"], dataset)
    data["data"] = {**data["data"], "dataset": dataset}
    if args.smoke_test:
        data["data"]["options"] = {**data["data"].get("options", {}), "n_train": 8, "n_val": 4, "n_test": 8}
        data["shots"], data["val_shots"] = 4, None
        data["optim"] = {**data["optim"], "epochs": 2}
        data["boost"] = {**data["boost"], "optim": {**data["boost"]["optim"], "epochs": 2}}
        data["student"] = with_smoke_weights(data["student"])  # ToyWorld weights from the smoke recipes
        data["boost"]["teacher"] = with_smoke_weights(data["boost"]["teacher"])
    return from_dict(AdaptRunConfig, data)


def template_prefix(dataset: str) -> str | None:
    """The words before the class name in a ToyWorld dataset's template ("a dark photo of a"); None otherwise."""
    from caspl.data.toyworld import TOY_DATASETS

    spec = TOY_DATASETS.get(dataset)
    return spec.template.split("{}")[0].strip() if spec is not None else None


def init_from_template_of(method: dict, own: str, dataset: str) -> dict:
    """A method initialised from its config dataset's template prefix starts from `dataset`'s instead.

    The toy configs initialise prompts from the template words, as the papers do from "a photo of a" (the
    template of most of their datasets); pointed at another dataset, the prompt should start from that one's.
    """
    if method.get("ctx_init") is not None and method["ctx_init"] == template_prefix(own):
        return {**method, "ctx_init": template_prefix(dataset)}
    return method


def plan_jobs(args: argparse.Namespace, boost_folders: dict[str, Path]) -> list[tuple[str, str, int, object]]:
    """(dataset, row label, seed, config) for every run of the table."""
    jobs = []
    for dataset in args.datasets:
        for method in args.methods:
            cfg = method_config(args, method, dataset)
            if method == args.methods[0]:  # zero-shot is deterministic: one evaluation, no seeds
                zeroshot = replace(cfg, method={"method": ZEROSHOT}, boost=None)
                jobs.append((dataset, ZEROSHOT, args.seeds[0], zeroshot))  # the student
                jobs.append((dataset, BOOSTED_ROW, args.seeds[0], replace(zeroshot, boost=str(boost_folders[dataset]))))
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
    train, train_last, zeroshot_train = train_accuracy(replace(cfg, seeds=[seed]), seed, _STUDENTS[spec])
    return {"dataset": dataset, "label": label, **result.per_seed[0], "train": train, "train_last_epoch": train_last,
            "zeroshot_train": zeroshot_train, "seconds": time.perf_counter() - started}


def train_accuracy(cfg, seed: int, student) -> tuple[float, float, float]:
    """Accuracy (%) on the run's K-shot training images of its final model (the epoch validation selected), of its
    last epoch's prompts (what training fits by its end: the method's leverage, whatever early stopping picks) and of
    the zero-shot student. The run is the one base_to_novel just finished; run_adapt reloads it from the artefact
    store (no training), its last epoch's prompts come from the run's training checkpoint."""
    from caspl.artifacts import ArtifactStore
    from caspl.data.views import model_view_spec
    from caspl.methods import build_prompted_clip
    from caspl.train.adapt import load_adapt_state, run_adapt
    from caspl.train.checkpoint import read_training_state
    from caspl.train.evaluate import accuracy

    outcome = run_adapt(cfg, seed, ArtifactStore(cfg.runtime.store), student=student, log=lambda line: None)
    spec = model_view_spec(student.model)
    selected = last_epoch = accuracy(outcome.model, outcome.train.train, spec)
    if outcome.folder is not None:  # a trained run (zero-shot trains nothing and keeps no folder)
        load_adapt_state(outcome.model, read_training_state(outcome.folder)["prompts"])
        last_epoch = accuracy(outcome.model, outcome.train.train, spec)
    zeroshot = build_prompted_clip(student.model, student.tokenizer, {"method": ZEROSHOT})
    zeroshot.set_classes(outcome.train.classnames, outcome.train.templates)
    return selected, last_epoch, accuracy(zeroshot, outcome.train.train, spec)


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """The worker processes of every run and reference row (started once: each start imports torch and caspl)."""
    context = multiprocessing.get_context("spawn")  # no fork after Ray or torch threads started
    return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_load_worker_modules)


def _load_worker_modules() -> None:
    """What every job imports, loaded once per worker with the garbage collector paused (caspl.startup)."""
    from caspl.startup import loading_modules

    with loading_modules():
        import caspl.train.adapt  # noqa: F401  (torch, open_clip, the methods)


def run_all(jobs: list, pool: ProcessPoolExecutor) -> list[dict]:
    rows = []
    for n, row in enumerate(pool.map(run_job, jobs), 1):
        rows.append(row)
        print(f"[toy_table] {n}/{len(jobs)} {row['dataset']} {row['label']} seed {row['seed']}: "
              f"base {row['base']:.1f} novel {row['novel']:.1f} HM {row['hm']:.1f} ({row['seconds']:.0f}s)",
              flush=True)
    return rows


# --- reference rows: zero-shot teacher, linear probe ----------------------------------------------------------------

TEACHER_ROW, PROBE_ROW = "zeroshot teacher", "linear probe"


def reference_jobs(args: argparse.Namespace) -> list[tuple[str, str, int, object]]:
    """The zero-shot teacher once per dataset, the linear probe per dataset and seed (its K-shot images)."""
    jobs = []
    for dataset in args.datasets:
        cfg = method_config(args, args.methods[0], dataset)
        jobs.append((dataset, TEACHER_ROW, args.seeds[0], cfg))
        jobs += [(dataset, PROBE_ROW, seed, cfg) for seed in args.seeds]
    return jobs


def run_reference(job: tuple[str, str, int, object]) -> dict:
    """One reference row entry; the probe has no novel accuracy (it only knows the base classes)."""
    import torch

    from caspl.artifacts import ArtifactStore
    from caspl.data.views import model_view_spec
    from caspl.methods import build_prompted_clip
    from caspl.models import load_clip
    from caspl.train.adapt import load_dataset
    from caspl.train.evaluate import base_novel_accuracy
    from caspl.train.linear_probe import base_linear_probe

    dataset, label, seed, cfg = job
    torch.set_num_threads(cfg.runtime.threads or 1)
    started = time.perf_counter()
    data = load_dataset(cfg.data)
    if label == TEACHER_ROW:
        teacher = load_clip(cfg.boost.teacher.spec(cfg.runtime))
        model = build_prompted_clip(teacher.model, teacher.tokenizer, {"method": ZEROSHOT})
        result = base_novel_accuracy(model, data, model_view_spec(teacher.model), "test")
    else:
        probe = base_linear_probe(load_clip(cfg.student.spec(cfg.runtime)), data, cfg.shots, seed,
                                  ArtifactStore(cfg.runtime.store), val_shots=cfg.val_shots)
        result = {"base": probe.test_accuracy, "novel": float("nan"), "hm": float("nan"),
                  "train": probe.train_accuracy, "weight_decay": probe.weight_decay}
    return {"dataset": dataset, "label": label, "seed": seed, **result, "seconds": time.perf_counter() - started}


def run_references(jobs: list, pool: ProcessPoolExecutor) -> list[dict]:
    rows = list(pool.map(run_reference, jobs))
    for row in rows:
        print(f"[toy_table] {row['dataset']} {row['label']} seed {row['seed']}: base {row['base']:.1f} "
              f"novel {row['novel']:.1f} ({row['seconds']:.0f}s)", flush=True)
    return rows


# --- the table ------------------------------------------------------------------------------------------------------


def summarise(rows: list[dict], datasets: list[str], labels: list[str]) -> dict:
    """{label: {dataset | "average": aggregate}}; the average is the HM of the base and novel averages."""
    from caspl.train.metrics import aggregate_seeds, harmonic_mean

    nan = float("nan")
    table = {}
    for label in labels:
        keys = ("base",) if label == PROBE_ROW else ("base", "novel")  # the probe has no novel accuracy
        per_dataset = {d: {"novel": nan, "hm": nan,
                           **aggregate_seeds([r for r in rows if r["label"] == label and r["dataset"] == d], keys)}
                       for d in datasets}
        base = sum(v["base"] for v in per_dataset.values()) / len(datasets)
        novel = sum(v["novel"] for v in per_dataset.values()) / len(datasets)
        hm = nan if novel != novel else harmonic_mean(base, novel)
        table[label] = {**per_dataset, "average": {"base": base, "novel": novel, "hm": hm}}
    return table


def markdown(table: dict, datasets: list[str], seeds: list[int]) -> str:
    columns = [*datasets, "average"]
    head = "| method | " + " | ".join(f"{c} base | {c} novel | {c} HM" for c in columns) + " |"
    rule = "|---|" + "---:|" * (3 * len(columns))
    lines = [f"Base-to-novel on ToyWorld, {len(seeds)} seed(s) ({', '.join(map(str, seeds))}); mean test accuracy "
             "(%); average = HM of the averaged base and novel accuracies.", "", head, rule]
    for label, cells in table.items():
        values = " | ".join(" | ".join(_cell(cells[c][k]) for k in ("base", "novel", "hm")) for c in columns)
        lines.append(f"| {label} | {values} |")
    return "\n".join(lines) + "\n"


def _cell(value: float) -> str:
    return "-" if value != value else f"{value:.1f}"  # NaN: the linear probe has no novel accuracy


def seed_average_hm(rows: list[dict], label: str, datasets: list[str]) -> dict:
    """Mean and sample std over seeds of the per-seed average HM (HM of the seed's base and novel averages)."""
    import statistics

    from caspl.train.metrics import harmonic_mean

    seeds = sorted({r["seed"] for r in rows if r["label"] == label})
    values = []
    for seed in seeds:
        cells = [r for r in rows if r["label"] == label and r["seed"] == seed and r["dataset"] in datasets]
        values.append(harmonic_mean(statistics.fmean(r["base"] for r in cells),
                                    statistics.fmean(r["novel"] for r in cells)))
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "seeds": len(values)}


def fit_summary(rows: list[dict], datasets: list[str], label: str = "coop") -> dict:
    """{dataset: {label's mean/std accuracy at its last epoch and at the selected one, zero-shot's mean accuracy}} on
    the same K-shot training images."""
    import statistics

    def spread(values: list[float]) -> float:
        return statistics.stdev(values) if len(values) > 1 else 0.0

    out = {}
    for dataset in datasets:
        cells = [r for r in rows if r["label"] == label and r["dataset"] == dataset and "train" in r]
        if cells:
            last, selected = [r["train_last_epoch"] for r in cells], [r["train"] for r in cells]
            out[dataset] = {"train_last_epoch": statistics.fmean(last), "train_last_epoch_std": spread(last),
                            "train": statistics.fmean(selected), "train_std": spread(selected),
                            "zeroshot_train": statistics.fmean(r["zeroshot_train"] for r in cells)}
    return out


def acceptance(table: dict, methods: list[str], rows: list[dict] | None = None,
               datasets: list[str] | None = None) -> dict:
    """The claims the table should show (issue 12): every method alone beats zero-shot base by >= 5 points on
    average; CoOp loses novel accuracy; CasPL raises each method's average HM, by more than the larger seed std of
    the two average HMs (with `rows`); CoOp fits its K-shot training images >= 20 points above zero-shot."""
    zero = table[ZEROSHOT]["average"]
    checks = {f"{m} base >= zeroshot base + 5": table[m]["average"]["base"] >= zero["base"] + 5 for m in methods}
    if "coop" in methods:
        checks["coop novel < zeroshot novel"] = table["coop"]["average"]["novel"] < zero["novel"]
    for m in methods:
        gain = table[f"{m}+caspl"]["average"]["hm"] - table[m]["average"]["hm"]
        if rows is None or datasets is None:
            checks[f"{m}+caspl HM > {m} HM"] = gain > 0
            continue
        spread = max(seed_average_hm(rows, label, datasets)["std"] for label in (m, f"{m}+caspl"))
        checks[f"{m}+caspl HM - {m} HM ({gain:+.1f}) > larger seed std ({spread:.1f})"] = gain > spread
    if rows is not None and datasets is not None and "coop" in methods:
        for dataset, fit in fit_summary(rows, datasets).items():
            claim = (f"coop fits {dataset} train by its last epoch ({fit['train_last_epoch']:.1f}) "
                     f">= zeroshot ({fit['zeroshot_train']:.1f}) + 20")
            checks[claim] = fit["train_last_epoch"] >= fit["zeroshot_train"] + 20
    return checks


def class_text_cosines(args: argparse.Namespace) -> dict:
    """{dataset: {student, teacher}}: mean pairwise cosine of the class text features (dataset template, all
    classes); near 1 means the classes' text features nearly coincide and prompts have little to separate."""
    import torch

    from caspl.methods import build_prompted_clip
    from caspl.models import load_clip
    from caspl.train.adapt import load_dataset

    out = {}
    for dataset in args.datasets:
        cfg = method_config(args, args.methods[0], dataset)
        data = load_dataset(cfg.data)
        out[dataset] = {}
        for role, model_cfg in (("student", cfg.student), ("teacher", cfg.boost.teacher)):
            loaded = load_clip(model_cfg.spec(cfg.runtime))
            model = build_prompted_clip(loaded.model, loaded.tokenizer, {"method": ZEROSHOT})
            model.set_classes(data.classnames, data.templates)
            with torch.no_grad():
                features = model.encode_text()  # [C, E], L2-normalised
            n = len(features)
            sim = features @ features.T
            out[dataset][role] = float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))
    return out


def plot(table: dict, datasets: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [*datasets, "average"]
    methods = [label for label in table if label not in (ZEROSHOT, TEACHER_ROW, PROBE_ROW) and "+caspl" not in label]
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 3.4), sharey=True, squeeze=False)
    for ax, column in zip(axes[0], columns):
        xs = range(len(methods))
        ax.bar([x - 0.2 for x in xs], [table[m][column]["hm"] for m in methods], 0.4, label="alone")
        ax.bar([x + 0.2 for x in xs], [table[f"{m}+caspl"][column]["hm"] for m in methods], 0.4, label="+CasPL")
        ax.axhline(table[ZEROSHOT][column]["hm"], color="gray", linestyle="--", label="zero-shot")
        ax.axhline(table[BOOSTED_ROW][column]["hm"], color="black", linestyle=":", label="boosted zero-shot")
        ax.set_xticks(list(xs), methods, rotation=45)
        ax.set_title(column)
    axes[0][0].set_ylabel("HM (%)")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=len(names), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))  # room for the legend above the panels
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    boost_folders = boost_all(args)
    jobs = plan_jobs(args, boost_folders)
    with worker_pool(args.workers) as pool:
        rows = run_all(jobs, pool)
        rows += run_references(reference_jobs(args), pool)
    references = [TEACHER_ROW, ZEROSHOT, BOOSTED_ROW, PROBE_ROW]
    labels = references + [label for m in args.methods for label in (m, f"{m}+caspl")]
    table = summarise(rows, args.datasets, labels)
    checks = acceptance(table, args.methods, rows, args.datasets)
    spreads = {label: seed_average_hm(rows, label, args.datasets) for label in labels
               if label not in (TEACHER_ROW, PROBE_ROW)}
    fits = fit_summary(rows, args.datasets)
    cosines = class_text_cosines(args)
    text = markdown(table, args.datasets, args.seeds)
    text += "\nAverage HM, mean ± sample std over seeds of each seed's average: " + "; ".join(
        f"{label} {s['mean']:.1f} ± {s['std']:.1f}" for label, s in spreads.items()) + ".\n"
    text += ("\nCoOp on its own K-shot training images (accuracy %, mean ± std over seeds; last epoch / the epoch "
             "validation selected) against zero-shot: " + "; ".join(
                 f"{d} {f['train_last_epoch']:.1f} ± {f['train_last_epoch_std']:.1f} / {f['train']:.1f} ± "
                 f"{f['train_std']:.1f} vs {f['zeroshot_train']:.1f}" for d, f in fits.items()) + ".\n")
    text += "\nMean pairwise cosine of the class text features (template, all classes): " + "; ".join(
        f"{d} student {c['student']:.3f}, teacher {c['teacher']:.3f}" for d, c in cosines.items()) + ".\n"
    text += "\n" + "\n".join(f"- {claim}: {'yes' if ok else 'NO'}" for claim, ok in checks.items()) + "\n"
    (out / "table.md").write_text(text)
    seconds = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps({"rows": rows, "table": table, "checks": checks,
                                                   "average_hm_over_seeds": spreads, "coop_fit": fits,
                                                   "class_text_cosine": cosines,
                                                   "smoke_test": args.smoke_test, "seconds": seconds}, indent=1))
    plot(table, args.datasets, out / "hm.png")
    print(text)
    print(f"[toy_table] wrote {out}/table.md, results.json, hm.png in {seconds:.0f}s")
    return 0


if __name__ == "__main__":
    from caspl.startup import exit_with

    exit_with(main())
