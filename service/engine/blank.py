"""An engine that draws nothing: black images of the asked size, at no cost.

It stands in for the diffusion pipeline where only the serving path is measured (the overhead
benchmark, load tests of auth, ledger, storage and Ray Serve hops), selected with
`engine: service.engine.blank:BlankEngine` in the Serve config.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from service.engine.protocol import GenerationOutput, GenerationParams


class BlankEngine:
    def __init__(self, models: Mapping[str, str | Path], device: str = "cpu", dtype=None, **_):
        self.model_paths = dict(models)
        self._loaded: list[str] = []

    def load(self, model_id: str) -> None:
        if model_id not in self.model_paths:
            raise KeyError(model_id)
        if model_id not in self._loaded:
            self._loaded.append(model_id)

    def loaded_models(self) -> list[str]:
        return list(self._loaded)

    def unload(self, model_id: str) -> bool:
        if model_id in self._loaded:
            self._loaded.remove(model_id)
            return True
        return False

    def warmup(self, model_id: str) -> None:
        pass

    def generate(self, batch: list[GenerationParams]) -> list[GenerationOutput]:
        images = sum(params.samples for params in batch)
        return [
            GenerationOutput(
                images=[
                    np.zeros((params.height, params.width, 3), dtype=np.uint8)
                    for _ in range(params.samples)
                ],
                seed=params.seed,
                batch_size=images,
            )
            for params in batch
        ]
