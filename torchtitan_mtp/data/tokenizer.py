"""The shipped character-level tokenizer of the arithmetic task, built with ``tokenizers``.

The files in ``torchtitan_mtp/assets/arithmetic_tokenizer`` are the output of
``python -m torchtitan_mtp.data.tokenizer`` (a test checks they are up to date), and are
loaded through TorchTitan's own ``HuggingFaceTokenizer``.
"""

from __future__ import annotations

import functools
import json
import string
import tempfile
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from torchtitan.components.tokenizer import HuggingFaceTokenizer
from torchtitan.config import JobConfig

__all__ = [
    "ARITHMETIC_TOKENIZER",
    "BUILTIN_ARITHMETIC",
    "build_arithmetic_tokenizer",
    "build_tokenizer",
    "tokenizer_dir",
    "write_arithmetic_tokenizer",
]

ARITHMETIC_TOKENIZER = Path(__file__).resolve().parent.parent / "assets" / "arithmetic_tokenizer"
BUILTIN_ARITHMETIC = "builtin:arithmetic"
"""``[model] hf_assets_path`` value that selects the shipped arithmetic tokenizer."""

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARACTERS = string.digits + "+-*=()., ?:\n" + string.ascii_letters


def build_arithmetic_tokenizer() -> Tokenizer:
    """One token per character of ``CHARACTERS`` plus four special tokens (ids 0-3)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(CHARACTERS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def write_arithmetic_tokenizer(directory: Path = ARITHMETIC_TOKENIZER) -> None:
    """Write tokenizer.json and tokenizer_config.json (HF layout) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    build_arithmetic_tokenizer().save(str(directory / "tokenizer.json"), pretty=True)
    config = {
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


FROM_GGUF = "from_gguf"
"""``[model] hf_assets_path`` value that rebuilds the tokenizer of ``model.gguf_file``."""


@functools.cache
def _gguf_tokenizer_dir(gguf_file: str) -> str:
    from ..checkpoints.gguf_loader import resolve_gguf, write_gguf_tokenizer

    return str(write_gguf_tokenizer(resolve_gguf(gguf_file), tempfile.mkdtemp("_tokenizer")))


def tokenizer_dir(job_config: JobConfig) -> str:
    """The directory holding tokenizer.json for this job (resolving the special values)."""
    path = job_config.model.hf_assets_path
    if path == BUILTIN_ARITHMETIC:
        return str(ARITHMETIC_TOKENIZER)
    if path == FROM_GGUF:
        gguf_file = getattr(job_config.model, "gguf_file", "")
        if not gguf_file:
            raise ValueError('model.hf_assets_path = "from_gguf" needs model.gguf_file')
        return _gguf_tokenizer_dir(gguf_file)
    if not Path(path, "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"model.hf_assets_path = {path!r}: no tokenizer.json there; use "
            f"{BUILTIN_ARITHMETIC!r} for the shipped arithmetic tokenizer or {FROM_GGUF!r} "
            "for the tokenizer inside model.gguf_file"
        )
    return path


def pad_id(tokenizer: HuggingFaceTokenizer) -> int:
    """The id that pads batches: ``<pad>`` when the vocabulary has it, else 0 (padded
    positions are masked out of every loss and never attended to by real tokens)."""
    found = tokenizer.tokenizer.token_to_id("<pad>")
    return 0 if found is None else found


def build_tokenizer(job_config: JobConfig) -> HuggingFaceTokenizer:
    """The TrainSpec tokenizer builder: TorchTitan's HF tokenizer from ``hf_assets_path``.

    ``"builtin:arithmetic"`` selects the shipped arithmetic tokenizer; ``"from_gguf"`` the
    tokenizer inside ``model.gguf_file``.
    """
    return HuggingFaceTokenizer(tokenizer_dir(job_config))


if __name__ == "__main__":
    write_arithmetic_tokenizer()
    print(f"wrote {ARITHMETIC_TOKENIZER}")
