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


@pytest.mark.parametrize("path", _files("study"), ids=lambda p: p.name)
def test_study_configs(path):
    from caspl.study.config import load_study_config
    from caspl.study.runner import check_study

    check_study(load_study_config(load_yaml(path)))


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
