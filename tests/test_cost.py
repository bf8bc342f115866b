"""Study pricing: counts that follow the loops (teacher passes, cache bytes, epochs, per-image text), and the script."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from caspl.models import architecture_config
from caspl.models.flops import image_flops
from caspl.study.config import load_study_config
from caspl.study.cost import DatasetSize, price_study
from caspl.study.runner import check_study
from test_study import tiny_study

REPO = Path(__file__).resolve().parents[1]
SIZE = DatasetSize("toy_shapes", classes=40, train=400, val=80, test=120)


def _price(tmp_path, **changes):
    study = load_study_config(tiny_study(tmp_path, **changes))
    return study, price_study(study, check_study(study), SIZE)


def test_teacher_passes_and_cache_size_follow_images_views_and_classes(tmp_path):
    study, cost = _price(tmp_path)
    views = study.boost.cache.views
    assert cost.teacher.passes == SIZE.train * views
    assert cost.cache_bytes == SIZE.train * views * SIZE.classes * 4
    teacher = architecture_config(study.teacher.name)
    assert cost.teacher.flops > SIZE.train * views * image_flops(teacher).total  # plus the class names' text


def test_boosting_cost_scales_with_epochs_and_the_high_end_costs_more(tmp_path):
    _, short = _price(tmp_path)
    _, long = _price(tmp_path, **{"boost.optim.epochs": 4})
    assert long.boost["low"].flops == pytest.approx(2 * short.boost["low"].flops)  # tiny_study boosts 2 epochs
    assert short.boost["high"].flops > short.boost["low"].flops  # longer boosting prompts: more vision tokens


def test_image_dependent_text_makes_cocoop_cost_more_than_coop(tmp_path):
    space = {"boost.depth": {"type": "int", "low": 1, "high": "max"}}
    _, coop = _price(tmp_path, methods=["coop"], **{"search.space": space})
    _, cocoop = _price(tmp_path, methods=["cocoop"], **{"search.space": space})
    assert cocoop.adapt["low"].flops > 2 * coop.adapt["low"].flops


def test_estimate_cost_smoke_test_prints_a_table_and_json():
    done = subprocess.run([sys.executable, str(REPO / "studies" / "estimate_cost.py"), "--smoke-test"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["trials"] == 12 and summary["total"]["teacher_passes"] > 0
    assert summary["cpu_measured"]["gflops"] > 0 and "| dataset |" in done.stdout
