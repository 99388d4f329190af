"""Models and tokenizers: any local transformers causal-LM directory, or the embedded tiny default.

The default model is built from a `Qwen2Config` with a character-level tokenizer constructed in
code (digits, ASCII, and the four R1 tags as single tokens), then written with `save_pretrained`
and loaded back with `from_pretrained`, so the default run exercises exactly the code path a user's
own model directory takes. Nothing is downloaded; weights are read from safetensors only.
"""
from __future__ import annotations

import os
import string

import torch

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<think>", "</think>", "<answer>", "</answer>"]
CHARS = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]


def build_char_tokenizer():
    """A character-level `PreTrainedTokenizerFast`: one token per character, R1 tags atomic."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def build_tiny_model(out_dir: str, *, hidden_size: int, num_layers: int, num_heads: int,
                     intermediate_size: int, max_positions: int, seed: int) -> str:
    """Write a randomly initialised tiny Qwen2 and its tokenizer to `out_dir`; return the path."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_char_tokenizer()
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=max(1, num_heads // 2),
        intermediate_size=intermediate_size, max_position_embeddings=max_positions,
        tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, rope_theta=10000.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


def load_model(path: str, *, device: torch.device, dtype: str = "float32",
               attn_implementation: str | None = None, moe_kernels: bool = True):
    """Load a local causal LM + tokenizer from `path` (safetensors only). MoE models of the
    families r1kernels supports (Qwen3-MoE, DeepSeek-V3) get the r1kernels router and dispatch.

    `use_kernels=False`: transformers 5 swaps layers for kernels fetched from the Hugging Face
    Hub by default (`kernels`); the trainer runs r1kernels' ops and loads no code from the Hub
    (on CPU those mappings replace nothing, but re-run at every `train()` / `eval()`: 0.7 ms
    each, two per rollout)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(path):
        raise ValueError(f"model: expected a local directory with config.json and *.safetensors, "
                         f"got {path!r}")
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    kwargs = {"dtype": getattr(torch, dtype), "use_safetensors": True, "use_kernels": False}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device)
    if moe_kernels:
        use_r1kernels_moe(model)
    return model, tok


def use_r1kernels_moe(model) -> int:
    """Route MoE layers through r1kernels (moe_route, moe_permute/unpermute) for the model
    families r1kernels.integrations.hf_moe supports; returns how many modules were patched
    (0 for a model no family covers)."""
    from r1kernels.integrations import hf_moe

    if not hf_moe.families_of(model.config):
        return 0
    return hf_moe.apply_r1kernels_moe(model)


def decoder_of(model):
    """The transformer body whose output is the last hidden state (before the lm_head)."""
    return model.base_model


def lm_head_of(model):
    head = model.get_output_embeddings()
    return head.weight, head.bias
