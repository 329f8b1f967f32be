"""The causal-LM path: chat data, response-only loss, packing, perplexity, federations."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoTokenizer

from fedelta.assets import CHAT_CORPORA
from fedelta.chat_data import ChatDataError, normalise_chats, read_chatterbot
from fedelta.compatibility import check_config
from fedelta.config import ConfigError, GenerationConfig
from fedelta.data import DataError, load_client_data, load_corpus, load_site_data
from fedelta.models import load_tokenizer
from fedelta.tasks import build_task
from fedelta.tasks.chat_tokenization import IGNORE, pack, tokenize_chat
from fedelta.tensors import SparseTensor
from fedelta.training import train

CHAT = [
    {"role": "user", "content": "What is AI?"},
    {"role": "assistant", "content": "A field of science."},
    {"role": "user", "content": "Who founded it?"},
    {"role": "assistant", "content": "Many people."},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return load_tokenizer(tiny_llama, "causal-lm")


def _response_text(tokenizer, chat) -> str:
    return tokenizer.decode([t for t in chat.labels if t != IGNORE])


# -- response-only labels --------------------------------------------------------------
def test_loss_mask_covers_exactly_the_assistant_turns(tokenizer):
    chat = tokenize_chat(CHAT, tokenizer, max_length=512)
    assert _response_text(tokenizer, chat) == (
        "A field of science.<|im_end|>\nMany people.<|im_end|>\n"
    )
    # Everything labelled is a token of the input at the same position.
    assert all(lab in (IGNORE, tok) for tok, lab in zip(chat.input_ids, chat.labels, strict=True))
    # The prompt, the user turns and the role headers are not trained on.
    first = chat.labels.index(next(t for t in chat.labels if t != IGNORE))
    prompt = tokenizer.decode(chat.input_ids[:first])
    assert prompt.endswith("<|im_start|>assistant\n") and "What is AI?" in prompt


def test_loss_mask_follows_a_system_turn(tokenizer):
    chat = tokenize_chat(
        [{"role": "system", "content": "Be brief."}, *CHAT[:2]], tokenizer, max_length=512
    )
    assert _response_text(tokenizer, chat) == "A field of science.<|im_end|>\n"


def test_truncation_keeps_the_mask_and_drops_chats_with_no_response_in_reach(tokenizer):
    full = tokenize_chat(CHAT, tokenizer, max_length=512)
    start = full.labels.index(next(t for t in full.labels if t != IGNORE))
    cut = tokenize_chat(CHAT, tokenizer, max_length=start + 2)
    assert len(cut.input_ids) == start + 2
    assert [t != IGNORE for t in cut.labels] == [False] * start + [True, True]
    assert tokenize_chat(CHAT, tokenizer, max_length=start) is None


def test_packing_cuts_the_token_stream_into_blocks_that_teach_something(tokenizer):
    chats = [tokenize_chat(CHAT[: 2 * (i % 2 + 1)], tokenizer, 512) for i in range(7)]
    blocks = pack(chats, block=16)
    ids = [t for c in chats for t in c.input_ids]
    labels = [t for c in chats for t in c.labels]
    expected = [
        (ids[i : i + 16], labels[i : i + 16])
        for i in range(0, len(ids), 16)
        if any(t != IGNORE for t in labels[i : i + 16])
    ]
    assert [(b.input_ids, b.labels) for b in blocks] == expected
    assert len(expected) < -(-len(ids) // 16)  # prompt-only blocks are left out


# -- chat data ---------------------------------------------------------------------------
def test_chatterbot_corpus_becomes_alternating_chats_by_topic():
    chats = read_chatterbot(CHAT_CORPORA["chatterbot-english"].path())
    assert len(chats) > 800 and len(set(chats["topic"])) == 21
    assert len({json.dumps(m) for m in chats["messages"]}) == len(chats)  # repeats dropped
    for messages in chats["messages"]:
        roles = [m["role"] for m in messages]
        assert roles[-1] == "assistant" and len(roles) % 2 == 0
        assert roles == ["user", "assistant"] * (len(roles) // 2)


def test_instruction_response_files_and_bad_chats(tmp_path):
    import datasets

    pairs = datasets.Dataset.from_dict({"instruction": ["Hi"], "response": ["Hello!"]})
    chats = normalise_chats(pairs, "pairs.jsonl")
    assert chats[0]["messages"][1] == {"role": "assistant", "content": "Hello!"}
    bad = datasets.Dataset.from_dict(
        {"messages": [[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]]}
    )
    with pytest.raises(ChatDataError, match="bad.jsonl', row 0: .*end with an assistant"):
        normalise_chats(bad, "bad.jsonl")
    swapped = datasets.Dataset.from_dict(
        {
            "messages": [
                [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]
            ]
        }
    )
    with pytest.raises(ChatDataError, match="turn 0 has role 'assistant', expected 'user'"):
        normalise_chats(swapped, "swapped.jsonl")


def test_a_site_trains_on_its_own_chat_file(tmp_path, chat_config):
    path = tmp_path / "site.jsonl"
    rows = [{"instruction": f"question {i}", "response": f"answer {i}"} for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data = load_site_data(path, chat_config.data, seed=1)
    assert len(data.train) + len(data.validation) == 20
    assert data.train[0]["messages"][0]["role"] == "user"


def test_topic_split_gives_each_site_whole_topics(chat_config):
    sites = [
        set(load_client_data(chat_config.data, chat_config.seed, 4, i).train["topic"])
        | set(load_client_data(chat_config.data, chat_config.seed, 4, i).validation["topic"])
        for i in range(4)
    ]
    assert all(sites)
    assert all(not (a & b) for i, a in enumerate(sites) for b in sites[i + 1 :])
    pool_topics = set(load_corpus(chat_config.data, chat_config.seed).pool["topic"])
    assert set().union(*sites) == pool_topics
    with pytest.raises(DataError, match="cannot be split evenly into 8 sites; choose"):
        load_client_data(chat_config.data, chat_config.seed, 8, 0)


def test_site_files_of_a_chat_federation_round_trip(tmp_path, chat_config):
    from fedelta.data import write_site_files

    paths = write_site_files(chat_config.data, chat_config.seed, 3, tmp_path)
    for i, path in enumerate(paths):
        assert path.name == "train.jsonl"
        part = load_client_data(chat_config.data, chat_config.seed, 3, i)
        site = load_site_data(path, chat_config.data, seed=0)
        chats = list(site.train["messages"]) + list(site.validation["messages"])
        expected = list(part.train["messages"]) + list(part.validation["messages"])
        assert sorted(map(json.dumps, chats)) == sorted(map(json.dumps, expected))


def test_report_prompts_are_distinct_held_out_questions_across_topics(chat_config):
    from fedelta.server.generations import sample_prompts

    test = load_corpus(chat_config.data, chat_config.seed).test
    pairs = sample_prompts(GenerationConfig(num_prompts=5), test)
    questions: dict[str, tuple[str, str]] = {}
    for messages, topic in zip(test["messages"], test["topic"], strict=True):
        questions.setdefault(messages[0]["content"], (messages[1]["content"], topic))
    assert len({p for p, _ in pairs}) == 5
    assert all(questions[p][0] == ref for p, ref in pairs)
    assert len({questions[p][1] for p, _ in pairs}) == 5  # five topics
    given = GenerationConfig(prompts="Hi there | What is AI?")
    assert sample_prompts(given, test) == [("Hi there", ""), ("What is AI?", "")]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"data.partitioner": "dirichlet"}, "skews labels, which chat data has none"),
        ({"model.task": "classification"}, '"topic" splits chat data by topic'),
        ({"gradient-accumulation-steps": 0}, "gradient-accumulation-steps' must be >= 1"),
        ({"model.task": "generation"}, "model.task' must be one of classification, causal-lm"),
    ],
)
def test_bad_task_settings_stop_before_training(chat_config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_config(chat_config.replace(**overrides))


def test_a_task_refuses_the_other_tasks_data(chat_config):
    from fedelta.client.trainer import ClientTrainer
    from fedelta.protocol import Site

    classify = chat_config.replace(
        **{
            "model.task": "classification",
            "data.partitioner": "iid",
            "model.name": "all-MiniLM-L6-v2",
        }
    )
    with pytest.raises(DataError, match="trains on labelled text, but the data of site 'a'"):
        ClientTrainer(classify, Site(0, 3, "a"))


# -- training and evaluation -------------------------------------------------------------
@pytest.mark.training
def test_perplexity_is_the_token_weighted_loss_of_the_model(chat_config, tokenizer):
    from fedelta.models import load_base_model

    model = load_base_model(chat_config.model.name, 0, "causal-lm")
    task = build_task(chat_config)
    test = load_corpus(chat_config.data, chat_config.seed).test.select(range(6))
    result = task.evaluate(model, task.make_loader(test, tokenizer, 4, train=False))
    # Hugging Face's own loss, one chat at a time, weighted by its response tokens.
    total = tokens = 0.0
    for batch in task.make_loader(test, tokenizer, 1, train=False):
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
        total += model(**batch).loss.item() * n
        tokens += n
    assert result.loss == pytest.approx(total / tokens, rel=1e-5)
    assert task.metrics(result, "test")["test-perplexity"] == pytest.approx(math.exp(result.loss))


def test_gradient_accumulation_equals_one_step_on_the_joined_batch():
    class Regression(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.linear = torch.nn.Linear(3, 1)

        def forward(self, x, y):
            return type("Out", (), {"loss": (self.linear(x) - y).pow(2).mean()})

    x, y = torch.randn(8, 3), torch.randn(8, 1)
    joined, split = Regression(), Regression()
    train(joined, [{"x": x, "y": y}], lr=0.1)
    halves = [{"x": x[:4], "y": y[:4]}, {"x": x[4:], "y": y[4:]}]
    result = train(split, halves, lr=0.1, accumulation=2)
    assert result.steps == 1
    for a, b in zip(joined.parameters(), split.parameters(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.training
def test_local_training_lowers_the_held_out_loss_of_a_site(chat_config):
    from fedelta.client.trainer import ClientTrainer
    from fedelta.protocol import Site

    config = chat_config.replace(**{"local-steps": 15, "gradient-accumulation-steps": 2})
    trainer = ClientTrainer(config, Site(0, 3, "site-0"))
    start = trainer.receive(trainer.initial_state, {}, {})
    before = trainer.evaluate()
    out = trainer.fit(start, server_round=1)
    after = trainer.evaluate()
    assert out.result.steps == 15
    assert after.loss < before.loss - 0.3


@pytest.mark.training
@pytest.mark.parametrize(
    "overrides",
    [
        {"compression.sparsity": "top-k", "compression.quantization": "int8"},
        {"compression.sparsity": "random-mask", "compression.quantization": "int8-block"},
        {"compression.sparsity": "spiel", "compression.regrow-interval": 2},
        {"compression.sparsity": "lift", "compression.lift-rank": 4},
        {"compression.half-finetuning": True, "compression.quantization": "fp16"},
        {"model.finetuning": "full", "compression.sparsity": "spiel", "lr": 1e-3},
    ],
    ids=["top-k-int8", "random-mask", "spiel", "lift", "half-finetuning", "full-spiel"],
)
def test_every_uplink_method_runs_on_the_chat_path(chat_config, overrides):
    from fedelta.client.trainer import ClientTrainer
    from fedelta.compression import UplinkCompression
    from fedelta.models import adapter_state
    from fedelta.protocol import Site

    config = chat_config.replace(**overrides)
    trainer = ClientTrainer(config, Site(0, 3, "site-0"))
    start = trainer.receive(trainer.initial_state, {}, {})
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    out = trainer.fit(start, server_round=1)
    after = adapter_state(trainer.model)
    changed = {k for k in start if not torch.equal(after[k], start[k])}
    # Decoded as the server does, with its own compression settings.
    server = UplinkCompression(config.compression, config.seed)
    delta = server.decode(out.upload, trainer.uplink_layout, 1)
    assert set(delta) == changed  # what trained is what is sent
    if config.compression.half_finetuning:  # half the LoRA modules, each with A and B
        modules = {n.split(".lora_")[0] for n in trainable}
        sent = {n.split(".lora_")[0] for n in delta}
        assert len(sent) == (len(modules) + 1) // 2
        assert set(delta) == {n for n in trainable if n.split(".lora_")[0] in sent}
    else:
        assert set(delta) == trainable
    dense = [d.dense() if isinstance(d, SparseTensor) else d for d in delta.values()]
    assert sum(float(d.abs().sum()) for d in dense) > 0


@pytest.mark.training
def test_one_process_federation_keeps_every_rounds_global_state(chat_config):
    from fedelta.simulations import federate

    run = federate(chat_config.replace(**{"local-steps": 3}))
    assert [r["round"] for r in run.rows] == [0, 1, 2] and len(run.states) == 3
    assert run.rows[2]["test-loss"] < run.rows[1]["test-loss"] < run.rows[0]["test-loss"]
    b = next(k for k in run.states[0] if k.endswith("lora_B.default.weight"))
    assert not run.states[0][b].any() and run.states[2][b].any()


# -- federations -------------------------------------------------------------------------
@pytest.mark.slow
def test_chat_federation_lowers_held_out_loss_and_reports_answers(chat_config):
    from fedelta.server.export import load_exported
    from fedelta.simulations import simulate

    config = chat_config.replace(
        **{
            "local-steps": 8,
            "compression.sparsity": "top-k",
            "compression.density": 0.2,
            "compression.quantization": "int8",
            "data.packing": True,
        }
    )
    result = simulate(config, progress=False)
    rows = result.rows
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[-1]["test-loss"] < rows[0]["test-loss"] - 0.2
    assert rows[-1]["test-perplexity"] == pytest.approx(math.exp(rows[-1]["test-loss"]))
    assert result.summary["final-test-perplexity"] < result.summary["initial-test-perplexity"]
    assert result.summary["uplink-reduction"] > 3  # tiny model: headers weigh in
    answers = result.summary["generations"]
    assert len(answers) == 2 and all(a["reference"] for a in answers)
    report = (result.run_dir / "generations.md").read_text(encoding="utf-8")
    assert answers[0]["prompt"] in report and "**fine-tuned**" in report
    info = json.loads((result.adapter_dir / "fedelta.json").read_text(encoding="utf-8"))
    assert info["task"] == "causal-lm" and info["labels"] == []
    model = load_exported(result.adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(config.model.name)
    ids = tokenizer("hello", return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["ffa", "fedsa", "fedex"])  # fixed A, local B, folds
def test_every_lora_rule_runs_on_the_chat_path(chat_config, rule):
    from fedelta.simulations import simulate

    config = chat_config.replace(
        **{"num-server-rounds": 1, "local-steps": 2, "strategy.lora": rule, "lora.r": 4}
    )
    result = simulate(config, progress=False)
    assert result.rows[-1]["clients-replied"] == 3
    assert math.isfinite(result.rows[-1]["test-perplexity"])


# -- the real SmolLM2 --------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_cached_copy_matches_the_gguf_model_and_trains(chat_config):
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from fedelta.assets import GGUF_MODELS
    from fedelta.client.trainer import ClientTrainer
    from fedelta.models import adapter_state, load_base_model, resolve_model_path
    from fedelta.protocol import Site

    folder = Path(resolve_model_path("SmolLM2-135M-Instruct"))
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    gguf = GGUF_MODELS["SmolLM2-135M-Instruct"].path()
    original = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    copy = load_base_model("SmolLM2-135M-Instruct", 0, "causal-lm")
    tokenizer = load_tokenizer("SmolLM2-135M-Instruct", "causal-lm")
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(copy(ids).logits, original(ids).logits, rtol=0, atol=1e-5)
    del original, copy
    # The real chat template: labels cover the answer and its end-of-turn token only.
    chat = tokenize_chat(CHAT[:2], tokenizer, max_length=256)
    assert _response_text(tokenizer, chat) == "A field of science.<|im_end|>\n"
    # Two LoRA steps on a site's chats move every B factor away from zero.
    config = chat_config.replace(
        **{"model.name": "SmolLM2-135M-Instruct", "local-steps": 2, "batch-size": 4}
    )
    trainer = ClientTrainer(config, Site(0, 3, "site-0"))
    start = trainer.receive(trainer.initial_state, {}, {})
    out = trainer.fit(start, server_round=1)
    assert math.isfinite(out.result.loss)
    after = adapter_state(trainer.model)
    moved = [k for k in start if k.endswith("lora_B.default.weight")]
    assert moved and all(after[k].abs().sum() > 0 for k in moved)
