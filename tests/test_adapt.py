"""The adapting loop: every method trains, resume is exact (GPA included), boosting prompts stay frozen,
selection uses validation only, configs are strict and every shipped adapting YAML is valid."""

from pathlib import Path

import pytest
import torch

from caspl.config import from_dict
from caspl.errors import CheckpointError, ConfigError
from caspl.methods import build_prompted_clip
from caspl.methods.state import read_prompt_state, save_prompt_state
from caspl.train.adapt import AdaptRunConfig, boost_run_config, build_adapt_model, run_adapt
from caspl.train.boost import BoostSection
from caspl.train.checkpoint import load_training_state
from conftest import METHOD_CASES, TINY_BOOST, trainable_methods

DATA = {"dataset": "toy_sketch", "options": {"n_train": 6, "n_val": 5, "n_test": 2}}


class Interrupt(Exception):
    pass


def _cfg(method="coop", **overrides) -> AdaptRunConfig:
    data = {"student": {"name": "caspl-tiny"}, "data": DATA, "shots": 4, "seeds": [1],
            "method": METHOD_CASES[method] if isinstance(method, str) else method,
            "crop_scale": [0.5, 1.0], "optim": {"lr": 0.02, "epochs": 4, "batch_size": 8, "warmup_epochs": 1,
                                                "warmup_lr": 0.002}}
    return from_dict(AdaptRunConfig, {**data, **overrides})


def _run(tiny, cfg, folder, **kw):
    return run_adapt(cfg, 1, student=tiny, folder=folder, log=lambda line: None, **kw)


@pytest.mark.parametrize("method", trainable_methods())
def test_every_method_lowers_its_training_loss(tiny, tmp_path, method):
    cfg = _cfg(method, augment="none", optim={"lr": 0.05, "epochs": 4, "batch_size": 8, "warmup_epochs": 0})
    outcome = _run(tiny, cfg, tmp_path / method)
    losses = [h["loss"] for h in outcome.history]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.98 * losses[0], losses
    assert len(outcome.train.train) == 4 * 10  # 4 shots of the 10 base classes of toy_sketch
    assert outcome.train.classnames == outcome.model.classnames


def _resume_matches(tiny, tmp_path, method, stop_after=2):
    cfg = _cfg(method)
    whole = _run(tiny, cfg, tmp_path / "whole")

    def interrupt(metrics, model):
        if metrics["epoch"] == stop_after:
            raise Interrupt

    with pytest.raises(Interrupt):
        _run(tiny, cfg, tmp_path / "split", on_epoch=interrupt)
    state = load_training_state(tmp_path / "split")
    assert state["epoch"] == stop_after
    resumed = _run(tiny, cfg, tmp_path / "split")
    final_whole, final_resumed = whole.model.prompt_state_dict(), resumed.model.prompt_state_dict()
    assert final_whole.keys() == final_resumed.keys()
    assert all(torch.equal(final_whole[k], final_resumed[k]) for k in final_whole)
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in whole.history]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in resumed.history]
    return whole, resumed, state


@pytest.mark.parametrize("method", ["ivlp", "cocoop"])
def test_resumed_run_ends_where_an_uninterrupted_run_ends(tiny, tmp_path, method):
    whole, resumed, _ = _resume_matches(tiny, tmp_path, method)
    assert whole.selected_epoch == resumed.selected_epoch and whole.val_accuracy == resumed.val_accuracy


def test_promptsrc_gpa_state_survives_resume(tiny, tmp_path):
    whole, resumed, state = _resume_matches(tiny, tmp_path, "promptsrc")
    gpa = state["method_state"]  # PromptSRC's own training state, saved through the method hooks
    assert gpa["epochs_done"] == [1, 2] and gpa["total"]
    last_epoch_prompts = load_training_state(tmp_path / "whole")["prompts"]
    final = {k: v for k, v in whole.model.prompt_state_dict().items() if k.startswith("adapt.")}
    assert not torch.equal(final["adapt.text.tokens"], last_epoch_prompts["adapt.text.tokens"])  # GPA swapped in
    assert torch.equal(load_training_state(tmp_path / "whole")["method_state"]["total"]["text.tokens"],
                       load_training_state(tmp_path / "split")["method_state"]["total"]["text.tokens"])


def test_finished_run_reloads_instead_of_training_again(tiny, tmp_path):
    cfg = _cfg("ivlp", optim={"lr": 0.02, "epochs": 2, "batch_size": 8, "warmup_epochs": 0})
    first = _run(tiny, cfg, tmp_path / "run")
    lines = []
    again = run_adapt(cfg, 1, student=tiny, folder=tmp_path / "run", log=lines.append)
    assert not any("epoch" in line and "/2" in line for line in lines)
    assert torch.equal(first.model.adapt.text.tokens, again.model.adapt.text.tokens)
    with pytest.raises(CheckpointError, match="another run"):
        run_adapt(cfg, 2, student=tiny, folder=tmp_path / "run", log=lambda line: None)


def _boost_folder(tiny, tmp_path) -> Path:
    torch.manual_seed(5)
    model = build_prompted_clip(tiny.model, tiny.tokenizer, None, TINY_BOOST)
    return save_prompt_state(model, tmp_path / "boost_prompts")


@pytest.mark.parametrize("method", ["coop", "maple"])
def test_boosting_prompts_stay_frozen_during_adapting(tiny, tmp_path, method):
    folder = _boost_folder(tiny, tmp_path)
    saved, _ = read_prompt_state(folder)
    cfg = _cfg(method, boost=str(folder))
    assert cfg.label == f"{method}+caspl"
    outcome = _run(tiny, cfg, tmp_path / "run")
    state = outcome.model.prompt_state_dict()
    for key in ("boost.text.tokens", "boost.vision.tokens"):
        assert torch.equal(state[key], saved[key])
    assert not any(p.requires_grad for p in outcome.model.boost.parameters())
    final, meta = read_prompt_state(outcome.prompts)  # the run's prompt checkpoint carries both roles
    assert meta["boost"]["method"] == "boost" and torch.equal(final["boost.text.tokens"], saved["boost.text.tokens"])
    initial = build_adapt_model(tiny, cfg.method, folder, seed=1)
    assert not torch.equal(initial.adapt.text.tokens, outcome.model.adapt.text.tokens)  # while adapt prompts train


def test_selection_uses_validation_and_never_reads_test_images(tiny, tmp_path, monkeypatch):
    import caspl.data.base
    import caspl.train.adapt
    import caspl.train.evaluate

    loaded = []
    original = caspl.data.base.load_image

    def spy(path):
        loaded.append(str(path))
        return original(path)

    monkeypatch.setattr(caspl.train.adapt, "load_image", spy)
    monkeypatch.setattr(caspl.train.evaluate, "load_image", spy)
    outcome = _run(tiny, _cfg("ivlp"), tmp_path / "run")
    test_paths = {i.path for i in outcome.train.test}
    assert loaded and not test_paths & set(loaded)
    vals = [h["val_acc"] for h in outcome.history]
    assert outcome.selected_epoch == 1 + vals.index(max(vals)) and outcome.val_accuracy == max(vals)
    assert len(outcome.train.val) == 4 * 10  # min(K, 4) val shots of the 10 base classes (of 5 available)


def test_config_is_strict_and_boost_takes_a_section_or_a_folder(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key optim.lrr"):
        _cfg(optim={"lrr": 1})
    with pytest.raises(ConfigError, match="unknown config key method.n_ctxx"):
        _cfg(method={"method": "coop", "n_ctxx": 3})
    with pytest.raises(ConfigError, match=r"config key augment is 'mixup'; choose one of \['crop', 'none'\]"):
        _cfg(augment="mixup")
    cfg = _cfg(boost={"teacher": {"name": "caspl-tiny-teacher"}, "method": {"text_length": 2, "text_depth": 3}})
    assert isinstance(cfg.boost, BoostSection) and cfg.method.name == "coop"  # parsed once, at load time
    boost = boost_run_config(cfg)
    assert boost.student == cfg.student and boost.data == cfg.data and boost.runtime == cfg.runtime
    assert (boost.method.text_length, boost.method.text_depth, boost.method.vision_length) == (2, 3, 8)
    with pytest.raises(ConfigError, match="boost.teacher"):
        _cfg(boost={"method": {}})
    with pytest.raises(ConfigError, match="boost.method.text_length must be an integer >= 1, got 0"):
        _cfg(boost={"teacher": {"name": "caspl-tiny-teacher"}, "method": {"text_length": 0}})
    assert _cfg(boost="/some/folder").boost == "/some/folder"


def test_val_shots_sizes_the_validation_split(tiny, tmp_path):
    cfg = _cfg("coop", val_shots=5, optim={"lr": 0.02, "epochs": 1, "batch_size": 8, "warmup_epochs": 0})
    outcome = _run(tiny, cfg, tmp_path / "run")
    assert len(outcome.train.val) == 5 * 10  # 5 of the 5 validation images of each of the 10 base classes
    assert len(outcome.train.train) == 4 * 10


def _json_block(out: str) -> dict:
    """The JSON object the command printed between its log lines."""
    import json

    return json.loads(out[out.index("{\n"):out.rindex("}") + 1])


def test_cli_adapt_prints_results_and_saved_prompts_reproduce_them(tmp_path, capsys):
    import yaml

    from caspl.cli import main

    config = {"student": {"name": "caspl-tiny"}, "data": DATA, "method": METHOD_CASES["ivlp"], "shots": 2, "seeds": [1],
              "optim": {"lr": 0.02, "epochs": 2, "batch_size": 8, "warmup_epochs": 0},
              "runtime": {"store": str(tmp_path / "store")}}
    path = tmp_path / "ivlp.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["adapt", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert "epoch 2/2" in out and "HM" in out
    row = _json_block(out)["per_seed"][0]
    [prompts] = (tmp_path / "store" / "runs" / "adapt").glob("*/prompts")
    assert main(["eval", "-c", str(path), "--prompts", str(prompts)]) == 0
    again = _json_block(capsys.readouterr().out)
    assert (again["base"], again["novel"], again["hm"]) == pytest.approx((row["base"], row["novel"], row["hm"]))
    assert main(["eval", "-c", str(path), "--method", "zeroshot"]) == 0
    zeroshot = _json_block(capsys.readouterr().out)
    assert zeroshot["label"] == "zeroshot" and len(zeroshot["per_seed"]) == 1
