"""An endless, seeded stream of (images, captions) batches for contrastive pretraining of tiny CLIPs."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from caspl.data.toyworld.render import DOMAINS, captions, render, sample_attributes


def pretraining_stream(
    seed: int,
    domains: Sequence[str] = DOMAINS,
    batch_size: int = 256,
    num_batches: int | None = None,
    image_size: int = 32,
    domain_weights: Sequence[float] | None = None,
    **choices: Sequence[str],
) -> Iterator[tuple[np.ndarray, list[str]]]:
    """Yield (uint8 [B, H, W, 3] images, B captions); endless unless num_batches is given.

    `domain_weights` (one per domain; None = uniform) sets how often each domain is drawn; `choices` restricts
    attributes as in `sample_attributes` (shapes=, colors=, textures=, sizes=). The same seed gives the same
    batches in the same order.
    """
    rng = np.random.default_rng(seed)
    produced = 0
    while num_batches is None or produced < num_batches:
        attrs = sample_attributes(rng, batch_size, domains=domains, image_size=image_size,
                                  domain_weights=domain_weights, **choices)
        yield render(attrs), captions(attrs, rng)
        produced += 1
