"""Domain generalisation: ImageNet-V2/-Sketch/-A/-R loaders on fake trees in CoOp's layouts, their errors, and the
`dg` protocol end to end (fake ImageNet source, fake targets, the tiny random-weight CLIP)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import caspl.train.protocols as protocols
from caspl.config import DataConfig, from_dict
from caspl.data import ImageNetVariant, build_dataset, few_shot_split, load_image, subsample_classes
from caspl.data.views import eval_tensor, model_view_spec
from caspl.errors import ConfigError, DataError
from caspl.train.adapt import AdaptRunConfig, run_adapt

# CoOp's classnames.txt format ("<wnid> <name>"), sorted by wnid as ImageNet's class index is
CLASSES = [("n01440764", "tench"), ("n01443537", "goldfish"), ("n01484850", "great white shark"),
           ("n01491361", "tiger shark")]
WNIDS = [w for w, _ in CLASSES]
NAMES = [n for _, n in CLASSES]
A_WNIDS = ["n01443537", "n01491361"]  # ImageNet-A's fake 2-class subset: goldfish, tiger shark
R_WNIDS = ["n01440764", "n01443537", "n01484850"]
PER_CLASS = 2  # test images per class in every target


def write_png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value % 256, (37 * value) % 256, (91 * value) % 256)).save(path)


def write_classnames(folder: Path, classes=CLASSES) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in classes))


def make_imagenet(root: Path, train: int = 10, test: int = 2) -> Path:
    folder = root / "imagenet"
    for label, wnid in enumerate(WNIDS):
        for i in range(train):
            write_png(folder / "images" / "train" / wnid / f"{wnid}_{i}.png", 10 * label + i)
        for i in range(test):
            write_png(folder / "images" / "val" / wnid / f"val_{wnid}_{i}.png", 10 * label + i + 5)
    write_classnames(folder)
    return folder


def make_v2(root: Path) -> Path:
    folder = root / "imagenetv2"
    for index in range(len(CLASSES)):
        for i in range(PER_CLASS):
            write_png(folder / "imagenetv2-matched-frequency-format-val" / str(index) / f"{index}_{i}.png", 50 + index)
    write_classnames(folder)
    return folder


def make_wnid_tree(root: Path, folder_name: str, images: str, wnids: list[str], offset: int) -> Path:
    folder = root / folder_name
    for wnid in wnids:
        for i in range(PER_CLASS):
            write_png(folder / images / wnid / f"{wnid}_{i}.png", offset + WNIDS.index(wnid))
    write_classnames(folder)
    return folder


def make_sketch(root: Path) -> Path:
    return make_wnid_tree(root, "imagenet-sketch", "images", WNIDS, 100)


def make_a(root: Path) -> Path:
    folder = make_wnid_tree(root, "imagenet-adversarial", "imagenet-a", A_WNIDS, 150)
    (folder / "imagenet-a" / "README.txt").write_text("ImageNet-A\n")  # shipped beside the class folders
    return folder


def make_r(root: Path) -> Path:
    return make_wnid_tree(root, "imagenet-rendition", "imagenet-r", R_WNIDS, 200)


def make_all(root: Path) -> None:
    make_imagenet(root)
    make_v2(root)
    make_sketch(root)
    make_a(root)
    make_r(root)


# ------------------------------------------------------------------------------------------------------- loaders
def test_imagenet_v2_maps_index_folders_to_classnames_lines(tmp_path):
    folder = make_v2(tmp_path)
    ds = build_dataset("imagenet_v2", tmp_path)
    assert isinstance(ds, ImageNetVariant) and ds.name == "imagenet_v2" and ds.root == str(folder)
    assert ds.classnames == NAMES and ds.wnids == WNIDS and ds.imagenet_labels == [0, 1, 2, 3]
    assert ds.test_only and ds.train == [] and ds.val == [] and len(ds.test) == 4 * PER_CLASS
    for item in ds.test:  # folder k holds class k = line k of classnames.txt
        assert Path(item.path).parent.name == str(item.label) and item.classname == NAMES[item.label]
    assert ds.template == "a photo of a {}." and load_image(ds.test[0].path).size == (8, 8)
    for alias in ("ImageNetV2", "imagenetv2", "imagenet-v2"):
        assert build_dataset(alias, tmp_path).test == ds.test
    assert build_dataset("imagenet_v2", folder).test == ds.test  # the dataset folder itself as root


def test_imagenet_sketch_labels_follow_sorted_wnid_folders(tmp_path):
    make_sketch(tmp_path)
    ds = build_dataset("imagenet-sketch", tmp_path)
    assert ds.name == "imagenet_sketch" and ds.classnames == NAMES and ds.wnids == WNIDS
    assert [it.label for it in ds.test] == [label for label in range(4) for _ in range(PER_CLASS)]
    assert all(f"/imagenet-sketch/images/{WNIDS[it.label]}/" in it.path for it in ds.test)


@pytest.mark.parametrize("name, make, wnids", [("imagenet_a", make_a, A_WNIDS), ("imagenet_r", make_r, R_WNIDS)],
                         ids=["A", "R"])
def test_imagenet_a_and_r_are_subsets_mapped_to_imagenet(tmp_path, name, make, wnids):
    make(tmp_path)
    ds = build_dataset(name, tmp_path)
    expected_names = [NAMES[WNIDS.index(w)] for w in wnids]
    assert ds.classnames == expected_names and len(ds.test) == len(wnids) * PER_CLASS  # README.txt is no class
    assert ds.wnids == wnids and ds.imagenet_labels == [WNIDS.index(w) for w in wnids]
    for item in ds.test:  # own labels 0..C-1, each mapped back to its ImageNet class
        mapped = ds.imagenet_classes[item.classname]
        assert item.classname == expected_names[item.label] and f"/{mapped.wnid}/" in item.path
        assert NAMES[mapped.label] == item.classname
    novel = subsample_classes(ds, "novel")  # the mapping stays right for a subset of the classes
    assert novel.wnids == wnids[-(len(wnids) // 2):]


def test_aliases_of_a_and_r(tmp_path):
    make_a(tmp_path)
    make_r(tmp_path)
    assert build_dataset("ImageNetA", tmp_path).name == "imagenet_a"
    assert build_dataset("imagenet-adversarial", tmp_path).name == "imagenet_a"
    assert build_dataset("ImageNetR", tmp_path).name == "imagenet_r"
    assert build_dataset("imagenet_rendition", tmp_path).name == "imagenet_r"


def _one_line_error(match: str, name: str, root: Path, path_in_message: Path | None = None) -> None:
    with pytest.raises(DataError, match=match) as err:
        build_dataset(name, root)
    assert "\n" not in str(err.value)
    if path_in_message is not None:
        assert str(path_in_message) in str(err.value)


def test_layout_errors_name_the_path_and_the_fix(tmp_path):
    _one_line_error(r"imagenet-adversarial: dataset folder not found.*DATASETS.md", "imagenet_a", tmp_path)
    folder = make_a(tmp_path)
    (folder / "classnames.txt").unlink()
    _one_line_error(r"classnames.txt: file not found; copy \$DATA/imagenet/classnames.txt", "imagenet_a", tmp_path,
                    folder / "classnames.txt")
    write_classnames(folder, CLASSES[:1] + CLASSES[2:])  # goldfish's line missing
    _one_line_error(r"class n01443537 has no name in .*classnames.txt; copy", "imagenet_a", tmp_path,
                    folder / "imagenet-a" / "n01443537")
    write_classnames(folder, [(w, "" if w == "n01443537" else n) for w, n in CLASSES])  # a line with no name
    _one_line_error(r"class n01443537 has no name", "imagenet_a", tmp_path)
    write_classnames(folder)
    (folder / "imagenet-a" / "n01440764").mkdir()
    _one_line_error(r"n01440764: class folder has no images", "imagenet_a", tmp_path,
                    folder / "imagenet-a" / "n01440764")
    sketch = tmp_path / "imagenet-sketch"
    write_classnames(sketch)
    (sketch / "images").mkdir()
    _one_line_error(r"imagenet-sketch/images: no class folders; extract ImageNet-Sketch", "imagenet_sketch",
                    tmp_path)
    write_classnames(tmp_path / "imagenet-rendition")
    _one_line_error(r"imagenet-rendition/imagenet-r: folder not found; extract imagenet-r.tar", "imagenet_r", tmp_path)


def test_imagenet_v2_folder_errors(tmp_path):
    folder = make_v2(tmp_path)
    images = folder / "imagenetv2-matched-frequency-format-val"
    (images / "2").rename(images / "two")
    _one_line_error(r"two: not a class index; ImageNet-V2's class folders are named 0..999", "imagenet_v2", tmp_path,
                    images / "two")
    (images / "two").rename(images / "7")
    _one_line_error(r"7: class index 7 has no line in classnames.txt \(4 lines\)", "imagenet_v2", tmp_path)
    (images / "7").rename(images / "2")
    for png in (images / "3").iterdir():
        png.unlink()
    (images / "3").rmdir()
    _one_line_error(r"3: class folder missing \(n01491361 'tiger shark', \+0 more\)", "imagenet_v2", tmp_path,
                    images / "3")


def test_training_on_a_test_only_dataset_is_a_one_line_error(tmp_path, tiny):
    make_a(tmp_path)
    target = build_dataset("imagenet_a", tmp_path)
    with pytest.raises(DataError, match=r"imagenet_a .* is a test-only dataset with no train/val split") as err:
        few_shot_split(target, 2, seed=1)
    assert "\n" not in str(err.value) and "--protocol dg" in str(err.value)
    cfg = from_dict(AdaptRunConfig, {"student": {"name": "caspl-tiny"}, "subsample": "all",
                                     "method": {"method": "coop", "n_ctx": 2},
                                     "data": {"dataset": "imagenet_a", "root": str(tmp_path)}})
    with pytest.raises(DataError, match="test-only"):
        run_adapt(cfg, 1, student=tiny, log=lambda line: None)


def test_boosting_on_train_images_of_a_test_only_dataset_is_refused(tmp_path):
    from caspl.artifacts import ArtifactStore
    from caspl.train.boost import BoostRunConfig, prepare_boost

    make_r(tmp_path)
    cfg = from_dict(BoostRunConfig, {"student": {"name": "caspl-tiny"}, "teacher": {"name": "caspl-tiny"},
                                     "data": {"dataset": "imagenet_r", "root": str(tmp_path)}, "images": "train"})
    with pytest.raises(DataError, match="imagenet_r .* is a test-only dataset"):
        prepare_boost(cfg, ArtifactStore(tmp_path / "store"), progress=False)


# ------------------------------------------------------------------------------------------------------ protocol
def _cfg(root: Path, targets: list[str], **overrides) -> AdaptRunConfig:
    data = {"student": {"name": "caspl-tiny"}, "data": {"dataset": "imagenet", "root": str(root)},
            "targets": [{"dataset": t, "root": str(root)} for t in targets],
            "method": {"method": "coop", "n_ctx": 2}, "shots": 2, "seeds": [1, 2], "subsample": "all",
            "optim": {"lr": 0.01, "epochs": 1, "batch_size": 4, "warmup_epochs": 0}}
    return from_dict(AdaptRunConfig, {**data, **overrides})


def _spy(monkeypatch) -> tuple[list, list]:
    """Record every test evaluation (class list, items, logit width) and every trained model."""
    evaluations, models = [], []
    original_accuracy, original_run = protocols.accuracy, protocols.run_adapt

    def accuracy(model, items, spec, batch_size=256):
        widths = []
        hook = model.register_forward_hook(lambda module, args, out: widths.append(out.logits.shape[-1]))
        try:
            value = original_accuracy(model, items, spec, batch_size)
        finally:
            hook.remove()
        evaluations.append({"classes": list(model.classnames), "items": list(items), "widths": set(widths),
                            "accuracy": value})
        return value

    def run(cfg, seed, *args, **kwargs):
        outcome = original_run(cfg, seed, *args, **kwargs)
        models.append(outcome.model)
        return outcome

    monkeypatch.setattr(protocols, "accuracy", accuracy)
    monkeypatch.setattr(protocols, "run_adapt", run)
    return evaluations, models


@torch.no_grad()
def _hand_accuracy(model, dataset) -> float:
    """Top-1 over `dataset.test` against its own class list, one image at a time (independent of eval_batches)."""
    model.eval().set_classes(dataset.classnames, dataset.templates)
    spec = model_view_spec(model.clip)
    hits = 0
    for item in dataset.test:
        logits = model(eval_tensor(load_image(item.path), spec)[None]).logits
        assert logits.shape == (1, dataset.num_classes)
        hits += int(logits.argmax(-1).item() == item.label)
    return 100.0 * hits / len(dataset.test)


def test_dg_protocol_scores_each_target_on_its_own_classes(tmp_path, tiny, monkeypatch):
    make_all(tmp_path)
    evaluations, models = _spy(monkeypatch)
    targets = ["imagenet_v2", "imagenet-sketch", "imagenet_a", "imagenet_r"]
    result = protocols.domain_generalisation(_cfg(tmp_path, targets), student=tiny, log=lambda line: None)

    names = ["imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
    assert result.protocol == "dg" and result.dataset == "imagenet"
    assert result.extra == {"targets": names[1:], "classes": dict(zip(names, [4, 4, 4, 2, 3]))}
    assert [row["seed"] for row in result.per_seed] == [1, 2] and len(models) == 2
    datasets = {name: build_dataset(name, tmp_path) for name in names}
    for row, model in zip(result.per_seed, models):
        assert set(row) == {"seed", *names, "targets_mean", "val"} and 0 <= row["val"] <= 100
        for name, ds in datasets.items():
            assert row[name] == pytest.approx(_hand_accuracy(model, ds))
            assert row[name] * len(ds.test) / 100 == pytest.approx(round(row[name] * len(ds.test) / 100))
        assert row["targets_mean"] == pytest.approx(sum(row[n] for n in names[1:]) / 4)

    test_evals = [e for e in evaluations if e["items"] and all("/images/train/" not in i.path for i in e["items"])]
    assert len(test_evals) == 2 * 5  # source + 4 targets per seed; validation runs on train-folder images
    a_evals = [e for e in test_evals if "/imagenet-a/" in e["items"][0].path]
    assert len(a_evals) == 2
    for evaluation in a_evals:  # ImageNet-A's 2 classes (chance 50 %), not ImageNet's 4
        assert evaluation["classes"] == ["goldfish", "tiger shark"] and evaluation["widths"] == {2}
        assert sorted({i.label for i in evaluation["items"]}) == [0, 1]
    source_evals = [e for e in test_evals if "/imagenet/images/val/" in e["items"][0].path]
    assert all(e["classes"] == NAMES and e["widths"] == {4} for e in source_evals)

    summary = result.summary
    assert summary["seeds"] == 2
    for key in [*names, "targets_mean"]:
        values = [row[key] for row in result.per_seed]
        assert summary[key] == pytest.approx(sum(values) / 2)
        assert summary[f"{key}_std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    assert summary["targets_mean"] == pytest.approx(sum(summary[n] for n in names[1:]) / 4)
    json.dumps(result.to_dict())


def _never_train(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("trained although the protocol's checks should have failed first")

    monkeypatch.setattr(protocols, "run_adapt", refuse)
    monkeypatch.setattr(protocols, "resolve_boost_prompts", refuse)


def test_dg_checks_targets_before_any_training(tmp_path, tiny, monkeypatch):
    make_all(tmp_path)
    _never_train(monkeypatch)
    outsider = tmp_path / "outsider"
    make_wnid_tree(outsider, "imagenet-rendition", "imagenet-r", ["n01443537"], 0)
    write_classnames(outsider / "imagenet-rendition", [("n01443537", "axolotl")])
    cfg = replace(_cfg(tmp_path, ["imagenet_v2"]),
                  targets=[DataConfig("imagenet_v2", str(tmp_path)), DataConfig("imagenet_r", str(outsider))])
    with pytest.raises(ConfigError, match=r"target imagenet_r: class 'axolotl' \(\+0 more\) is not a class of the "
                                          r"source imagenet") as err:
        protocols.domain_generalisation(cfg, student=tiny, log=lambda line: None)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="needs targets"):
        protocols.domain_generalisation(_cfg(tmp_path, []), student=tiny)
    with pytest.raises(ConfigError, match="listed twice or is the source"):
        protocols.domain_generalisation(_cfg(tmp_path, ["imagenet_a", "ImageNetA"]), student=tiny)
    source_a = _cfg(tmp_path, ["imagenet_r"], data={"dataset": "imagenet_a", "root": str(tmp_path)})
    with pytest.raises(DataError, match="imagenet_a .* is a test-only dataset"):
        protocols.domain_generalisation(source_a, student=tiny)


def test_caspl_eval_protocol_dg(tmp_path, monkeypatch, capsys):
    from caspl.cli import main

    make_imagenet(tmp_path)
    make_a(tmp_path)
    config = tmp_path / "dg.yaml"
    body = {"student": {"name": "caspl-tiny"}, "data": {"dataset": "imagenet", "root": str(tmp_path)},
            "targets": [{"dataset": "imagenet_a", "root": str(tmp_path)}], "method": {"method": "coop", "n_ctx": 2},
            "shots": 1, "optim": {"lr": 0.01, "epochs": 1, "batch_size": 4, "warmup_epochs": 0},
            "runtime": {"threads": 1}}
    config.write_text(yaml.safe_dump(body))
    assert main(["eval", "-c", str(config), "--protocol", "dg", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{\n"):])
    assert result["protocol"] == "dg" and result["targets"] == ["imagenet_a"]
    assert result["classes"] == {"imagenet": 4, "imagenet_a": 2}
    assert set(result["per_seed"][0]) == {"seed", "imagenet", "imagenet_a", "targets_mean", "val"}
    assert result["summary"]["targets_mean"] == pytest.approx(result["per_seed"][0]["imagenet_a"])

    body["targets"].append({"dataset": "imagefolder", "root": str(tmp_path / "imagenet" / "images" / "train")})
    config.write_text(yaml.safe_dump(body))  # class names = wnids, not ImageNet's names: refused before training
    assert main(["eval", "-c", str(config), "--protocol", "dg"]) == 2
    assert "class 'n01440764' (+3 more) is not a class of the source imagenet" in capsys.readouterr().err


def test_dg_data_config_targets_default_to_the_config(tmp_path, tiny, monkeypatch):
    make_imagenet(tmp_path)
    make_a(tmp_path)
    _spy(monkeypatch)
    explicit = protocols.domain_generalisation(_cfg(tmp_path, ["imagenet_r"], seeds=[1]),
                                               targets=[DataConfig("imagenet_a", str(tmp_path))], student=tiny,
                                               log=lambda line: None)
    assert explicit.extra["targets"] == ["imagenet_a"]  # the argument wins over cfg.targets (no imagenet_r tree)
