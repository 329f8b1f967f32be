"""Export the global adapter in PEFT format, and optionally a merged full model.

``OUT/adapter/`` loads with ``PeftModel.from_pretrained(base, OUT/adapter)`` where
``base`` is the model named in ``adapter_config.json`` (for classification with a
head of ``len(labels)`` outputs); ``fedelta.json`` beside it records the task,
the labels and the base model's name.
Strategies that fold updates into the base weights (FedEx-LoRA, FLoRA) also write
``base_corrections.safetensors``: :func:`load_exported` and the merged export
apply it; a bare ``PeftModel.from_pretrained`` would miss it, and says nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from fedelta.assets import INFO_FILE
from fedelta.build import model_spec
from fedelta.config import RUN_CONFIG_FILE, load_config
from fedelta.data import load_corpus
from fedelta.lora import FOLD_PREFIX, apply_fold
from fedelta.merging.rounds import merged_export
from fedelta.models import (
    build_model,
    load_base_model,
    load_tokenizer,
)
from fedelta.server.checkpoint import load_checkpoint
from fedelta.server.evaluation import load_global_state
from fedelta.tasks import TASKS
from fedelta.tasks.pooling import pooling_of

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
CORRECTIONS_FILE = "base_corrections.safetensors"


def export_adapter(
    model: torch.nn.Module,
    global_state: Mapping[str, torch.Tensor],
    label_names: Sequence[str],
    model_name: str,
    out_dir: Path,
    task: str = "classification",
) -> Path:
    """Write the adapter (LoRA factors and head) with its labels and base model name,
    and the base-weight corrections of folding strategies. A fully fine-tuned model
    (no adapter) is written whole, as a Transformers model folder."""
    load_global_state(model, global_state)
    model.save_pretrained(str(out_dir))
    info = {"base-model": model_name, "task": task, "labels": list(label_names)}
    if TASKS[task].pools:
        info["pooling"] = pooling_of(model)
    if not isinstance(model, PeftModel):
        info["finetuning"] = "full"
    folds = {
        k.removeprefix(FOLD_PREFIX): v.contiguous()
        for k, v in global_state.items()
        if k.startswith(FOLD_PREFIX)
    }
    if folds:
        save_file(folds, str(out_dir / CORRECTIONS_FILE))
        info["base-corrections"] = CORRECTIONS_FILE
    (out_dir / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out_dir


def export_checkpoint(run_dir: Path) -> Path:
    """Write ``RUN/adapter`` from the run's last checkpoint, also for an unfinished run
    (merged across the rounds so far when ``export.merge`` asks for it)."""
    config = load_config(run_dir / RUN_CONFIG_FILE, follow_renames=True)
    checkpoint = load_checkpoint(run_dir)
    corpus = load_corpus(config.data, config.seed)
    model = build_model(model_spec(config, corpus.num_labels))
    state = checkpoint.global_state
    if config.export.merge != "none":
        state = merged_export(config.export, run_dir, checkpoint.server_round, model, config.seed)
    return export_adapter(
        model,
        state,
        corpus.label_names,
        config.model.name,
        run_dir / ADAPTER_DIR,
        task=config.model.task,
    )


def load_exported(adapter_dir: Path) -> torch.nn.Module:
    """The base model with the exported adapter applied (or the fully fine-tuned
    model), ready for inference."""
    info_path = adapter_dir / INFO_FILE
    if not info_path.is_file():
        raise FileNotFoundError(f"'{adapter_dir}' has no {INFO_FILE}; is it a fedelta adapter?")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    task, labels = info.get("task", "classification"), info["labels"]
    pooling = info.get("pooling", "cls")
    if info.get("finetuning") == "full":
        return load_base_model(str(adapter_dir), len(labels), task, pooling)
    base = load_base_model(info["base-model"], len(labels), task, pooling)
    if labels:
        base.config.id2label = dict(enumerate(labels))
        base.config.label2id = {name: i for i, name in enumerate(labels)}
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    if "base-corrections" in info:
        apply_fold(model, load_file(str(adapter_dir / info["base-corrections"])))
    return model


def export_merged(adapter_dir: Path, out_dir: Path) -> Path:
    """Fold the adapter into the base weights and save a Transformers model folder.

    A ``[CLS]``-pooled classifier is a plain Transformers model. A mean-pooled one
    (``model.pooling``) has no pooler weights: its ``fedelta.json`` records the
    pooling, and :func:`load_exported` (or ``apply_pooling`` after a plain load)
    restores it; a bare ``from_pretrained`` would read a fresh ``[CLS]`` pooler."""
    model = load_exported(adapter_dir)
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    model.save_pretrained(str(out_dir))
    info = json.loads((adapter_dir / INFO_FILE).read_text(encoding="utf-8"))
    load_tokenizer(info["base-model"], info.get("task", "classification")).save_pretrained(
        str(out_dir)
    )
    merged = {**info, "finetuning": "full"}
    (out_dir / INFO_FILE).write_text(json.dumps(merged, indent=2) + "\n", encoding="utf-8")
    return out_dir
