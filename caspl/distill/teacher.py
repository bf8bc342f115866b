"""The teacher side of boosting: class text features (once) and image scoring.

Teacher outputs are stored as cosine similarities `norm(T.img(view)) @ norm(W_T)ᵀ`; the boosting loop multiplies
them by the *student's* logit scale (the reference does the same), so one cache serves any student and any
temperature.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from caspl.artifacts import ArtifactStore, content_key
from caspl.data.views import model_view_spec
from caspl.models import LoadedCLIP, ModelSpec, load_clip
from caspl.models.encoders import encode_image, encode_text

TEXT_KIND = "teacher_text"
FEATURES_FILE = "text_features.safetensors"
# Views per teacher forward pass when building the logits cache. Every pass has exactly this many rows (the last one
# padded): a matrix product's rounding depends on its row count, so a view's scores would otherwise depend on which
# views shared its batch (1.2e-7 measured on CPU with cache.batch_size 1 vs 40), and a resumed or differently batched
# cache would not equal an uninterrupted one bit for bit.
FORWARD_VIEWS = 64


def teacher_text_features(teacher: LoadedCLIP, classnames: Sequence[str], template: str,
                          store: ArtifactStore) -> torch.Tensor:
    """L2-normalised teacher text features [C, D_T] for one template, computed once and cached."""
    identity = teacher.identity
    key = content_key("teacher_text", identity, list(classnames), template)

    def build(folder: Path) -> dict:
        prompts = [template.replace("{}", name.replace("_", " ")) for name in classnames]
        with torch.no_grad():
            tokens = teacher.tokenizer(prompts).to(teacher.spec.device)
            features = encode_text(teacher.model, tokens, normalize=True).float().cpu()
        save_file({"features": features.contiguous()}, str(folder / FEATURES_FILE))
        (folder / "classes.json").write_text(json.dumps({"classnames": list(classnames), "template": template}))
        return {"teacher": identity}

    folder = store.get_or_build(TEXT_KIND, key, build, log=None)
    return load_file(str(folder / FEATURES_FILE))["features"]


class TeacherScorer:
    """Teacher image tower + fixed class text features: views [N, 3, S, S] -> cosine similarities [N, C].

    `pass_size`: None scores each call in one pass (the online teacher, whose batches are the training batches);
    an int scores in passes of exactly that many rows, the last one zero-padded, so that a view's scores do not
    depend on the batch it came in (the logits cache: bit for bit, whatever the order, batching or restarts).
    """

    def __init__(self, teacher: LoadedCLIP, text_features: torch.Tensor, crop_scale: Sequence[float] = (0.08, 1.0),
                 pass_size: int | None = None):
        self.teacher = teacher
        self.text = text_features.to(teacher.spec.device)
        self.view_spec = model_view_spec(teacher.model, crop_scale)
        self.pass_size = pass_size

    @torch.no_grad()
    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        if self.pass_size is None:
            return self._score(views)
        if len(views) == 0:
            return torch.empty(0, len(self.text))
        return torch.cat([self._score(chunk, self.pass_size) for chunk in views.split(self.pass_size)])

    def _score(self, views: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """Scores of `views`, computed on exactly `rows` rows (zero-padded) when given."""
        model, n = self.teacher.model, len(views)
        if rows is not None and n < rows:
            views = torch.cat([views, views.new_zeros(rows - n, *views.shape[1:])])
        features = encode_image(model, views.to(self.text.device, dtype=model.logit_scale.dtype), normalize=True)
        return (features.float() @ self.text.float().t())[:n].cpu()


def load_teacher(spec: ModelSpec, resolved: tuple[str | None, dict] | None = None) -> LoadedCLIP:
    teacher = load_clip(spec, resolved)
    teacher.model.requires_grad_(False)
    return teacher
