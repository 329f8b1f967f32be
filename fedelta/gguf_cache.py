"""A plain safetensors copy of a GGUF model, written once and loaded afterwards.

transformers loads GGUF files by dequantising every tensor (~20 s for
SmolLM2-135M), and the loaded model keeps a GGUF ``quantization_config`` that
stops it from ``save_pretrained``. Every process of a federation would pay that
load, so the first one rebuilds the model from its config, copies the
dequantised fp32 weights into it, and saves it with its tokenizer as an
ordinary Hugging Face folder; everyone else loads that folder in about a second.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

CACHE_ENV = "FEDELTA_CACHE"
"""Environment variable naming fedelta's cache folder (default ``~/.cache/fedelta``)."""
SOURCE_FILE = "fedelta-source.json"
"""Written last into a finished copy: which GGUF file it came from."""


def cache_root() -> Path:
    """``$FEDELTA_CACHE``, else ``$XDG_CACHE_HOME/fedelta``, else ``~/.cache/fedelta``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedelta"


def cached_copy(gguf_path: Path, name: str) -> Path:
    """The folder holding the safetensors copy of ``gguf_path``, written on first use.

    Keyed by the GGUF file's name and size, so a new release of the package gets a
    new copy. Safe under concurrency: the first process converts under a file lock
    and renames a finished folder into place; the others wait, then load it.
    """
    stat = gguf_path.stat()
    folder = cache_root() / "models" / f"{name}-{stat.st_size}"
    if _complete(folder, gguf_path):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not _complete(folder, gguf_path):
            _convert(gguf_path, folder)
    return folder


def _complete(folder: Path, gguf_path: Path) -> bool:
    marker = folder / SOURCE_FILE
    if not marker.is_file():
        return False
    source = json.loads(marker.read_text(encoding="utf-8"))
    return (
        source.get("gguf-file") == gguf_path.name and source.get("size") == gguf_path.stat().st_size
    )


def _convert(gguf_path: Path, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    directory, filename = str(gguf_path.parent), gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    scratch = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        model.save_pretrained(str(scratch))
        tokenizer.save_pretrained(str(scratch))
        source = {"gguf-file": gguf_path.name, "size": gguf_path.stat().st_size}
        (scratch / SOURCE_FILE).write_text(json.dumps(source) + "\n", encoding="utf-8")
        if folder.exists():  # a damaged copy without its marker
            shutil.rmtree(folder)
        scratch.rename(folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
