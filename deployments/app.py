"""The application builder named by serve_config.yaml: `import_path: deployments.app:build_app`.

`args` in the YAML are validated by `AppArgs`; the model and decoding settings stay in the model config file it
names, which is validated here, once, and handed to the Decoder replicas. Replicas, autoscaling and batching are
set per deployment in the serve config, not here.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from deployments.decoder import Decoder
from deployments.ingress import Ingress
from medusa_core.config import DEFAULT_CONFIG, REPO_ROOT, load_config, resolve_repo_path


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    config: str = Field(str(DEFAULT_CONFIG.relative_to(REPO_ROOT)),
                        description="Model config YAML (relative paths resolve against the repository root).")


def build_app(args: dict) -> Application:
    app_args = AppArgs.model_validate(args)
    config = load_config(resolve_repo_path(app_args.config))  # fail here, with the field named, not in a replica
    return Ingress.bind(Decoder.bind(config), config.name, config.base_model.backend)
