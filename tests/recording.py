"""Stand-ins that record what the code under test reports, shared by unit tests of one layer."""

from __future__ import annotations

# What code copied from the hosted API's docs sends for "not set" (README: null spellings).
HOSTED_API_NULLS = {
    "webhook": "null",
    "track_id": "null",
    "embeddings_model": "null",
    "lora_model": "null",
    "scheduler": "none",
    "algorithm_type": "null",
    "negative_prompt": "null",
    "vae": "null",
}


class RecordingMetrics:
    """The metrics calls the service makes, by name (a stand-in for the Ray-exported ones)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, *args))

    def of(self, name: str) -> list[tuple]:
        return [call[1:] for call in self.calls if call[0] == name]
