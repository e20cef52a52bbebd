"""Every module declares __all__, and the package re-exports the public API of DESIGN.md."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import ckpt_callbacks


def test_every_module_declares_all_and_documents_it() -> None:
    for module_info in pkgutil.walk_packages(ckpt_callbacks.__path__, "ckpt_callbacks."):
        if module_info.name.endswith("__main__"):
            continue
        module = importlib.import_module(module_info.name)
        assert module.__doc__, module_info.name
        assert hasattr(module, "__all__"), module_info.name
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                assert obj.__doc__, f"{module_info.name}.{name} has no docstring"


def test_package_exports_resolve() -> None:
    for name in ckpt_callbacks.__all__:
        assert getattr(ckpt_callbacks, name) is not None
    for name in ("CheckpointSaver", "Trainer", "load_checkpoint", "CheckpointManager", "Event", "Callback", "Time",
                 "Timestamp", "State", "KeepLast", "ConfigurationError", "CheckpointExistsError"):
        assert name in ckpt_callbacks.__all__


def test_saver_signature_matches_the_design() -> None:
    parameters = inspect.signature(ckpt_callbacks.CheckpointSaver).parameters
    positional = [p.name for p in parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == ["folder", "filename", "remote_file_name", "latest_filename", "latest_remote_file_name", "save_interval"]
    keyword_only = [p.name for p in parameters.values() if p.kind is p.KEYWORD_ONLY]
    assert keyword_only == [
        "overwrite", "num_checkpoints_to_keep", "weights_only", "ignore_keys", "num_concurrent_uploads",
        "upload_timeout_in_seconds", "remote", "storage_options", "save_mode", "compression_level", "ranks",
        "retention", "remote_retention", "on_upload_error", "best_filename", "shutdown_timeout",
        "save_on_signals", "on_save_error", "max_unuploaded_checkpoints",
    ]
