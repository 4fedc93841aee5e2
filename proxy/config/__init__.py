"""Configuration: YAML -> frozen dataclasses, validated once, every problem reported at once.

`model` is the typed configuration (what the gateway reads); `parse` turns YAML
into it. The names below are the package's public interface.
"""

from proxy.config.model import (
    Config,
    ConfigError,
    ImageFetchConfig,
    KeyConfig,
    LimitsConfig,
    ModelOverride,
    ModelPrice,
    OpenAIConfig,
    PriceTier,
    PricingConfig,
    ServerConfig,
    StateConfig,
    StorageConfig,
    TasksConfig,
    UpstreamConfig,
    sha256_hex,
)
from proxy.config.parse import Signature, file_signature, load_config, parse_config

__all__ = [
    "Config",
    "ConfigError",
    "ImageFetchConfig",
    "KeyConfig",
    "LimitsConfig",
    "ModelOverride",
    "ModelPrice",
    "OpenAIConfig",
    "PriceTier",
    "PricingConfig",
    "ServerConfig",
    "StateConfig",
    "StorageConfig",
    "TasksConfig",
    "UpstreamConfig",
    "load_config",
    "parse_config",
    "Signature",
    "file_signature",
    "sha256_hex",
]
