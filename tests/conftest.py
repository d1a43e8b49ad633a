"""Shared fixtures: tiny randomly initialised models of every supported family, a tiny
byte-level BPE tokenizer, and small text corpora. Everything here builds in well under a second.

Tests never touch a hub: ``HF_HUB_OFFLINE`` is set, and the cache lives in a temporary folder
unless a test asks for the real embedded assets (marked ``slow``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ARCHS = ("gpt2", "llama", "qwen2", "mistral", "gpt_neox", "opt")
# Every family inheritune is tested on (inheritune.models.arch.SUPPORTED, the README's list): ARCHS plus
# families found by inheritune.models.arch.discover_layout. tiny_config builds each one.
FAMILIES = (
    *ARCHS,
    *("qwen3", "gemma2", "gemma3", "phi3", "falcon", "gptj", "bloom", "stablelm"),
)
VOCAB = 320  # 256 byte symbols + 3 specials + merges

# A two-round `inheritune run` small enough for seconds (recipe and torchrun tests).
TINY_RUN = {
    # the paper's recipe, so that the rounds' layers are simply the first l; run's default
    # (bi + a bridge at every seam) is tested where a test names it
    "select": "first",
    "bridge": "none",
    "init_depth": "2",
    "min_rounds": 2,
    "max_rounds": 2,
    "steps": 3,
    "batch_size": 4,
    "seq_len": 16,
    "eval_tokens": 64,
    "eval_every": 3,  # start and end of the 3 steps
    "save_every": 0,  # end only
    "log_every": 1,
    "lr": 1e-2,
    "warmup": 1,
    "analysis_num_seqs": 4,
    "analysis_seq_len": 16,
    "speed_batch_size": 2,
    "speed_warmup": 1,
    "speed_iters": 2,
}

CORPUS_TEXT = (
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\n"
    "Or to take arms against a sea of troubles\n"
    "And by opposing end them. To die: to sleep;\n"
) * 40


def tiny_config(arch: str, layers: int = 4, hidden: int = 32, heads: int = 4, vocab: int = VOCAB):
    """A tiny config of the given family (GQA where the family has it)."""
    from transformers import (
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        OPTConfig,
        Qwen2Config,
    )

    common = {"vocab_size": vocab, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if arch == "gpt2":
        return GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, n_positions=256, **common)
    if arch in ("llama", "qwen2", "mistral"):
        cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
        return cls(
            num_hidden_layers=layers,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=256,
            tie_word_embeddings=True,
            **common,
        )
    if arch == "gpt_neox":
        return GPTNeoXConfig(
            num_hidden_layers=layers,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_attention_heads=heads,
            max_position_embeddings=256,
            **common,
        )
    if arch == "opt":
        return OPTConfig(
            num_hidden_layers=layers,
            hidden_size=hidden,
            ffn_dim=2 * hidden,
            num_attention_heads=heads,
            max_position_embeddings=256,
            word_embed_proj_dim=hidden,
            **common,
        )
    return _tiny_config_more(arch, layers, hidden, heads, common)


def _tiny_config_more(arch: str, layers: int, hidden: int, heads: int, common: dict):
    """The families beyond ARCHS. Gemma uses a 4-token sliding window so that the per-layer
    sliding/full pattern shows in the logits; GPT-J and Phi-3 keep an untied head."""
    import transformers as tf

    llama_like = {
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "max_position_embeddings": 256,
        **common,
    }
    if arch == "qwen3":
        return tf.Qwen3Config(head_dim=hidden // heads, tie_word_embeddings=True, **llama_like)
    if arch in ("gemma2", "gemma3"):
        cls = tf.Gemma2Config if arch == "gemma2" else tf.Gemma3TextConfig
        types = ["sliding_attention", "full_attention"] * layers
        return cls(
            head_dim=hidden // heads, sliding_window=4, layer_types=types[:layers], **llama_like
        )
    if arch == "phi3":
        return tf.Phi3Config(tie_word_embeddings=False, **llama_like)
    if arch == "stablelm":
        return tf.StableLmConfig(tie_word_embeddings=True, **llama_like)
    if arch == "falcon":
        return tf.FalconConfig(
            num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, **common
        )
    if arch == "gptj":
        return tf.GPTJConfig(
            n_layer=layers, n_embd=hidden, n_head=heads, rotary_dim=4, n_positions=256, **common
        )
    if arch == "bloom":
        return tf.BloomConfig(n_layer=layers, hidden_size=hidden, n_head=heads, **common)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0, attn: str = "eager", **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch, **kw)
    cfg._attn_implementation = attn
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()


def tiny_train_config(out, seq_len: int = 16, **kw):
    """A TrainConfig for the tiny models: 4 steps of 4 x ``seq_len`` tokens, evaluation at the
    start and end only, no periodic checkpoint; ``kw`` overrides any field."""
    from inheritune.training.config import TrainConfig

    base = dict(
        model="unused", data="unused", out=str(out), steps=4, batch_size=4, seq_len=seq_len,
        warmup=1, eval_every=0, eval_tokens=4 * seq_len, save_every=0, log_every=1, lr=3e-3,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def make_tokenizer(vocab: int = VOCAB, text: str = CORPUS_TEXT):
    """A real byte-level BPE tokenizer trained on CORPUS_TEXT, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def save_tiny(arch: str, path: Path, tokenizer=None, **kw) -> Path:
    """Write a tiny model + tokenizer as a standard HF folder and return it."""
    model = tiny_model(arch, **kw)
    model.save_pretrained(path)
    (tokenizer or make_tokenizer()).save_pretrained(path)
    return path


@pytest.fixture
def tiny_folder(tmp_path, tokenizer):
    """Factory: tiny_folder("llama", layers=4) -> Path of a saved HF folder."""

    def make(arch: str = "llama", name: str | None = None, **kw) -> Path:
        return save_tiny(arch, tmp_path / (name or f"tiny-{arch}"), tokenizer, **kw)

    return make


@pytest.fixture
def corpus_file(tmp_path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(CORPUS_TEXT)
    return p


@pytest.fixture(autouse=True)
def _one_thread(request):
    """Tiny models gain nothing from a second intra-op thread, and on a shared 2-core machine its
    workers only spin (measured: a tiny recipe run 24 s with 2 threads, 10 s with 1). Tests on
    the real model (marked slow) keep every thread."""
    if "slow" in request.keywords:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch, request):
    """Each test gets its own cache, except slow tests that use the real embedded assets."""
    if "slow" not in request.keywords:
        monkeypatch.setenv("INHERITUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def tokens(tmp_path, tokenizer):
    """The tiny corpus (twice over) tokenised into a token folder in the test's cache."""
    from inheritune.data import prepare as data

    p = tmp_path / "corpus.txt"
    p.write_text(CORPUS_TEXT * 2)
    return data.load_tokens(str(p), tokenizer)


@pytest.fixture
def tiny_run(tmp_path, tiny_folder, corpus_file):
    """Factory: a RecipeConfig on a tiny 6-layer Llama; keyword overrides."""
    from inheritune.config import build
    from inheritune.recipe.config import RecipeConfig

    model = tiny_folder("llama", layers=6)

    def make(**kw) -> RecipeConfig:
        values = {"model": str(model), "data": str(corpus_file), "out": str(tmp_path / "run")}
        return build(RecipeConfig, **{**values, **TINY_RUN, **kw})

    return make
