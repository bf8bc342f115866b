"""Every config shipped in the repository is validated (strictly: an unknown key is an error)."""

from pathlib import Path

import pytest
import yaml

from caspl.config import from_dict, load_yaml
from caspl.data.registry import resolve_name
from caspl.models import architecture_config, list_architectures

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "studies" / "configs"


def _files(sub: str) -> list[Path]:
    return sorted((CONFIGS / sub).glob("*.yaml"))


def test_every_shipped_yaml_is_covered_by_a_check():
    shipped = sorted(CONFIGS.rglob("*.yaml"))
    covered = _files("boost") + _files("adapt") + _files("study")
    assert shipped and sorted(covered) == shipped


@pytest.mark.parametrize("path", _files("boost"), ids=lambda p: p.name)
def test_boost_configs(path):
    from caspl.train.boost import BoostRunConfig

    cfg = from_dict(BoostRunConfig, load_yaml(path))
    architecture_config(cfg.student.name)
    architecture_config(cfg.teacher.name)


@pytest.mark.parametrize("path", _files("adapt"), ids=lambda p: p.name)
def test_adapt_configs(path):
    from caspl.train.adapt import AdaptRunConfig, boost_run_config
    from caspl.train.boost import BoostSection

    cfg = from_dict(AdaptRunConfig, load_yaml(path))
    architecture_config(cfg.student.name)
    if isinstance(cfg.boost, BoostSection):
        boost_run_config(cfg)  # the boosting section makes a valid boosting run with the run's student and data
    if cfg.method.kind == "base":
        assert path.stem.startswith(cfg.method.name + "_")  # <method>_<setting>.yaml
    boost_data = [cfg.boost.data] if isinstance(cfg.boost, BoostSection) and cfg.boost.data else []
    for data in [cfg.data, *cfg.targets, *boost_data]:
        resolve_name(data.dataset)  # a registered dataset (or alias)


def test_every_base_method_ships_a_toy_and_a_paper_config():
    from caspl.methods import BASE, list_methods

    stems = {p.stem for p in _files("adapt")}
    wanted = [f"{m}_{kind}" for m in list_methods(BASE) for kind in ("toy", "paper")]
    missing = [f"{stem}.yaml" for stem in wanted if stem not in stems]
    assert not missing, f"add studies/configs/adapt/{missing[0]} (and the others: {missing})"


DG_TARGETS = ["imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
DG_CONFIGS = [p for p in _files("adapt") if p.name.endswith("_dg.yaml")]


def test_dg_configs_exist_for_the_paper_methods():
    assert {p.name for p in DG_CONFIGS} >= {f"{m}_dg.yaml" for m in ("cocoop", "coop", "ivlp", "maple", "promptsrc")}


@pytest.mark.parametrize("path", DG_CONFIGS, ids=lambda p: p.name)
def test_dg_configs_follow_the_paper_setting(path):
    """Source ImageNet (16 shots, all classes), the four variants as targets, 4+4 boosting tokens at depth 1."""
    from caspl.train.adapt import AdaptRunConfig

    cfg = from_dict(AdaptRunConfig, load_yaml(path))
    assert cfg.data.dataset == "imagenet" and cfg.shots == 16 and cfg.subsample == "all"
    assert [resolve_name(t.dataset) for t in cfg.targets] == DG_TARGETS
    boost = cfg.boost.method
    assert (boost.text_length, boost.vision_length, boost.text_depth, boost.vision_depth) == (4, 4, 1, 1)
    assert cfg.boost.optim.batch_size == 128 and cfg.boost.data is None  # boosting on the source, ImageNet
    paper = from_dict(AdaptRunConfig, load_yaml(path.with_name(path.name.replace("_dg", "_paper"))))
    assert (cfg.method, cfg.optim) == (paper.method, paper.optim)  # the method's own paper hyperparameters


def write_weights_like(name: str, path: Path) -> Path:
    """A safetensors file with every key, shape and dtype of architecture `name` and zero values, written sparse
    (the header, then a hole): a weights file of the right architecture in milliseconds, even for ViT-L/14."""
    import json
    import struct

    from caspl.models import meta_clip

    header, offset = {}, 0
    for key, tensor in meta_clip(name)[0].state_dict().items():
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": {4: "F32", 2: "F16", 8: "I64"}[tensor.element_size()], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        handle.truncate(8 + len(text) + offset)
    return path


def offline(data: dict, tmp: Path) -> dict:
    """A shipped study config pointed at this machine: weight files of the right architectures, data roots, storage,
    store and tracking in `tmp` (what a user's cluster paths would be)."""
    for role in ("student", "teacher"):
        model = data[role]
        if model.get("pretrained") and Path(model["pretrained"]).suffix:
            model["pretrained"] = str(write_weights_like(model["name"], tmp / f"{role}.safetensors"))
    for section in data["data"] if isinstance(data["data"], list) else [data["data"]]:
        if section.get("root"):
            section["root"] = str(tmp / "data")
            (tmp / "data").mkdir(exist_ok=True)
    data.update(storage=str(tmp / "runs"), tracking={"env_file": None, "tracking_uri": f"sqlite:///{tmp}/mlflow.db",
                                                      "experiment": "shipped"})
    data.setdefault("runtime", {})["store"] = str(tmp / "store")
    return data


@pytest.mark.parametrize("path", _files("study"), ids=lambda p: p.name)
def test_study_configs(path, tmp_path):
    from caspl.study.config import load_study_config
    from caspl.study.runner import check_study

    check_study(load_study_config(offline(load_yaml(path), tmp_path)))


def test_the_paper_study_passes_every_pre_ray_check_with_local_weight_files(tmp_path, monkeypatch):
    """The 11-dataset paper study, weights given as local files of the real architectures: everything a driver
    checks before Ray starts passes (on a cluster, whose resources are its own: RAY_ADDRESS is set)."""
    from caspl.methods import BASE, list_methods
    from caspl.models import check_weights
    from caspl.study.config import load_study_config
    from caspl.study.runner import prepare_study

    monkeypatch.setenv("RAY_ADDRESS", "ray://head.invalid:10001")  # not contacted: the checks run before Ray
    study = load_study_config(offline(load_yaml(CONFIGS / "study" / "paper_b2n.yaml"), tmp_path))
    prepared = prepare_study(study, REPO, log=lambda line: None)
    assert len(study.datasets) == 11 and set(study.methods) <= set(list_methods(BASE))
    assert (study.student.name, study.teacher.name) == ("ViT-B-16", "ViT-L-14")
    assert {"boost.depth", "boost.length", "boost.temperature"} <= set(prepared.space.params)
    for model in (study.student, study.teacher):
        check_weights(model.spec(study.runtime))  # every key and shape fits the architecture
    assert (tmp_path / "teacher.safetensors").stat().st_size > 1_000_000_000  # ViT-L/14 in fp32, as a sparse file


@pytest.mark.parametrize("path", sorted((REPO / "ray_jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_ray_job_files_parse(path):
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    if path.name == "runtime_env.yaml":
        assert data["working_dir"] == "." and ".venv/" in data["excludes"]
    if path.name == "kuberay.yaml":
        assert data["kind"] == "RayJob" and "studies/boost_sweep.py" in data["spec"]["entrypoint"]
    if path.name == "cluster.yaml":
        assert data["head_node_type"] in data["available_node_types"]


@pytest.mark.parametrize("name", list_architectures(caspl_only=True))
def test_model_configs_build(name):
    cfg = architecture_config(name)
    assert {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg)
