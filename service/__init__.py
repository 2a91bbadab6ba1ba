"""sdserve: a self-hosted Stable Diffusion 2.0 service that speaks the ModelsLab API."""

__version__ = "0.1.0"
