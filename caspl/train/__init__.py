"""Training: the boosting loop, the adapting loop, evaluation, protocols, checkpoints, ToyWorld pretraining.

Importing this package registers the "toyworld" weight source (`caspl.train.toyworld_pretrain`).
"""

from caspl.train import toyworld_pretrain  # noqa: F401  (registers pretrained: toyworld)
