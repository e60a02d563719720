"""Shared utilities with no model code: strict dataclass configs and crash-safe file writes.

Every package may import `common`; `common` imports none of the project's packages.
"""
from common.config import ConfigError, config_from_dict, config_to_dict, load_config, apply_overrides
from common.io import atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file

__all__ = [
    "ConfigError", "config_from_dict", "config_to_dict", "load_config", "apply_overrides",
    "atomic_dir", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "sha256_file",
]
