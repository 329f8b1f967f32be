"""Shared fixtures: offline Hugging Face, small real configs, built-in assets."""

from __future__ import annotations

import os

import pytest
from hypothesis import Phase, settings

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fedelta.config import RunConfig  # noqa: E402

# `make mutation` needs each failure, not its smallest example: no shrinking there.
settings.register_profile(
    "mutation", phases=[Phase.explicit, Phase.reuse, Phase.generate], database=None
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Model-training tests are slow too: `-m "not slow"` keeps the numeric tests alone."""
    for item in items:
        if item.get_closest_marker("training") and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def tiny_config(tmp_path) -> RunConfig:
    """The real MiniLM and Rotten Tomatoes, shrunk to seconds of work per round."""
    return RunConfig.from_flat(
        {
            "num-server-rounds": 1,
            "local-steps": 2,
            "batch-size": 8,
            "fraction-evaluate": 0.5,
            "output-dir": str(tmp_path / "run"),
            "model.max-length": 32,
            "data.test-size": 64,
            # Federated evaluation on ~2% of each site's examples: seconds, not tens.
            "data.validation-fraction": 0.02,
            "simulation.num-supernodes": 2,
            "simulation.client-cpus": 2.0,
        }
    )


def build_tiny_bert(folder) -> str:
    """A randomly initialised 2-layer BERT with MiniLM's tokenizer, saved in
    ``folder``: for tests about the round loop and its strategies, where the model only
    has to be real and fast."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from fedelta.models import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
    )
    return _saved(folder, BertForSequenceClassification(config), tokenizer)


def _saved(folder, model, tokenizer) -> str:
    """``folder`` as a local Hugging Face model folder, as a user points model.name at one."""
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def build_tiny_llama(folder) -> str:
    """A randomly initialised 2-layer Llama with a byte-level BPE tokenizer trained on
    the chatterbot corpus (no chat template: the ChatML fallback applies); saved as a
    local Hugging Face folder, the way a user points model.name at their own model."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from fedelta.assets import CHAT_CORPORA
    from fedelta.chat_data import read_chatterbot

    chats = read_chatterbot(CHAT_CORPORA["chatterbot-english"].path())
    texts = [m["content"] for messages in chats["messages"] for m in messages]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=512,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        # Embeddings large enough that adapters can move the logits within a few steps.
        initializer_range=0.3,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    return _saved(folder, LlamaForCausalLM(config), tokenizer)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """Path of a tiny random Llama folder (fast causal-LM tests)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def chat_config(tmp_path, tiny_llama) -> RunConfig:
    """Causal-LM instruction tuning on the chatterbot corpus with the tiny Llama."""
    return RunConfig.from_flat(
        {
            "num-server-rounds": 2,
            "local-steps": 4,
            "batch-size": 8,
            "lr": 1e-2,
            "fraction-evaluate": 0.0,
            "output-dir": str(tmp_path / "run"),
            "model.name": tiny_llama,
            "model.task": "causal-lm",
            "model.max-length": 64,
            "lora.target-modules": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
            "data.name": "chatterbot-english",
            "data.partitioner": "topic",
            "data.test-size": 64,
            "generation.num-prompts": 2,
            "generation.max-new-tokens": 8,
            "simulation.num-supernodes": 3,
            "simulation.client-cpus": 2.0,
        }
    )
