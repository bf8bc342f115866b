"""PromptSRC: IVLP prompts regularised toward the frozen zero-shot CLIP, plus Gaussian prompt aggregation (GPA).

L = CE + KL(z_zs ‖ z) (summed, divided by the number of logit entries)
      + w_text · mean|ĝ_t − ĝ_t^zs| + w_image · mean|ĝ_v − ĝ_v^zs|
with zero-shot text features averaged over a template bank. `anchor` names the frozen model behind the z^zs / ĝ^zs
terms: "boosted" (the default: under +CasPL the boosted student, CLIP with the frozen boosting prompts; plain CLIP
without them) or "clip" (the paper's and the reference code's: plain zero-shot CLIP, also under +CasPL). On ToyWorld
"clip" makes +CasPL lose to PromptSRC alone and "boosted" makes it win (README, docs/reference_differences.md).

GPA averages the prompts of every epoch e (1-based) with weight N(e; μ, σ) normalised over all epochs; its running
sum is training state and survives a resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from caspl.errors import CheckpointError
from caspl.methods.base import check_anchor, register_method
from caspl.methods.ivlp import IVLP, IVLPConfig


@dataclass
class PromptSRCConfig(IVLPConfig):
    name = "promptsrc"
    revision = 2  # 2: the anchor option
    text_loss_weight: float = 25.0
    image_loss_weight: float = 10.0
    gpa_mean: float = 15.0
    gpa_std: float = 1.0
    templates: list[str] = field(default_factory=list)  # template bank; empty: the dataset's bank
    anchor: str = "boosted"  # "boosted" | "clip" (the paper's): the frozen model the regularisers pull toward

    def __post_init__(self):
        super().__post_init__()
        check_anchor(self.anchor, self.name)


@register_method(PromptSRCConfig)
class PromptSRC(IVLP):
    def __init__(self, config: PromptSRCConfig, clip: nn.Module, tokenizer):
        super().__init__(config, clip, tokenizer)
        self.register_buffer("zs_text_features", torch.empty(0), persistent=False)
        self.gpa: GaussianPromptAggregator | None = None

    def on_classes(self, model) -> None:
        boosted = self.config.anchor == "boosted"
        self.zs_text_features = model.zeroshot_text_features(self.config.templates or model.templates, boosted)

    def loss(self, out, batch, model):
        cfg = self.config
        zs_image = model.zeroshot_image_features(batch["images"], cfg.anchor == "boosted")
        zs_logits = model.logit_scale() * zs_image @ self.zs_text_features.t()
        ce = F.cross_entropy(out.logits, batch["labels"])
        kl = F.kl_div(F.log_softmax(out.logits, dim=1), F.log_softmax(zs_logits, dim=1),
                      reduction="sum", log_target=True) / out.logits.numel()
        l1_text = F.l1_loss(out.text_features, self.zs_text_features) * cfg.text_loss_weight
        l1_image = F.l1_loss(out.image_features, zs_image) * cfg.image_loss_weight
        parts = {"ce": ce, "scl_logits": kl, "scl_text": l1_text, "scl_image": l1_image}
        return sum(parts.values()), {k: float(v.detach()) for k, v in parts.items()}

    # GPA: every epoch's prompts are folded into a Gaussian-weighted running sum, which training ends with.
    def on_train_begin(self, num_epochs: int) -> None:
        self.gpa = GaussianPromptAggregator(num_epochs, self.config.gpa_mean, self.config.gpa_std)

    def on_epoch_end(self, epoch: int) -> None:
        self.gpa.add_epoch(epoch, self.state_dict())

    def training_state(self) -> dict:
        return self.gpa.state_dict()

    def load_training_state(self, state: dict | None) -> None:
        if state is None:
            raise CheckpointError("this PromptSRC checkpoint holds no GPA state, so it cannot resume; "
                                  "delete it to restart")
        self.gpa.load_state_dict(state)

    def final_prompts(self) -> dict[str, torch.Tensor]:
        return self.gpa.aggregated(self.state_dict())


def gaussian_epoch_weights(num_epochs: int, mean: float, std: float) -> torch.Tensor:
    """GPA weights for epochs 1..N: N(e; mean, std) normalised to sum to one (float64)."""
    epochs = torch.arange(1, num_epochs + 1, dtype=torch.float64)
    density = torch.exp(-((epochs - mean) ** 2) / (2 * std**2)) / (std * math.sqrt(2 * math.pi))
    return density / density.sum()


class GaussianPromptAggregator:
    """Running GPA sum Σ_e w_e·θ_e over finished epochs; `state_dict()` goes into training checkpoints."""

    def __init__(self, num_epochs: int, mean: float, std: float):
        self.weights = gaussian_epoch_weights(num_epochs, mean, std)
        self.total: dict[str, torch.Tensor] = {}
        self.epochs_done: list[int] = []

    def add_epoch(self, epoch: int, prompt_state: dict[str, torch.Tensor]) -> None:
        """Fold in the prompts at the end of `epoch` (1-based)."""
        if epoch in self.epochs_done:
            raise ValueError(f"GPA already holds epoch {epoch}")
        weight = float(self.weights[epoch - 1])
        for key, value in prompt_state.items():
            if value.is_floating_point():
                start = self.total.get(key, torch.zeros_like(value, dtype=torch.float64))
                self.total[key] = start + weight * value.double()
        self.epochs_done.append(epoch)

    def aggregated(self, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The aggregated prompts, in the dtypes of `like` (keys GPA does not hold are taken from `like`)."""
        return {k: self.total[k].to(v.dtype) if k in self.total else v for k, v in like.items()}

    def state_dict(self) -> dict:
        return {"weights": self.weights.clone(), "total": dict(self.total), "epochs_done": list(self.epochs_done)}

    def load_state_dict(self, state: dict) -> None:
        if not torch.equal(state["weights"], self.weights):
            raise CheckpointError("GPA state was saved for another epoch count or Gaussian; it cannot resume this run")
        self.total, self.epochs_done = dict(state["total"]), list(state["epochs_done"])


