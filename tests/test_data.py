"""The embedded arithmetic task, its shipped tokenizer and the SFT samples."""

import json

import pytest
from torchtitan.components.tokenizer import HuggingFaceTokenizer

from torchtitan_mtp.data.arithmetic import arithmetic_problems
from torchtitan_mtp.data.loader import SFTDataset
from torchtitan_mtp.data.tokenizer import ARITHMETIC_TOKENIZER, build_arithmetic_tokenizer
from torchtitan_mtp.models import mtp_flavors
from torchtitan_mtp.models.logprobs import IGNORE_INDEX


@pytest.fixture(scope="module")
def tokenizer():
    return HuggingFaceTokenizer(str(ARITHMETIC_TOKENIZER))


def test_shipped_tokenizer_is_what_the_builder_makes():
    shipped = json.loads((ARITHMETIC_TOKENIZER / "tokenizer.json").read_text())
    assert shipped == json.loads(build_arithmetic_tokenizer().to_str())


def test_tokenizer_round_trips_text_and_fits_the_debug_vocab(tokenizer):
    ids = tokenizer.encode("Q: 12+345=?\n357", add_bos=True, add_eos=True)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert tokenizer.decode(ids[1:-1]) == "Q: 12+345=?\n357"
    assert tokenizer.get_vocab_size() <= mtp_flavors["debug"].vocab_size


def test_splits_are_deterministic_and_heldout_is_unseen():
    train, heldout = arithmetic_problems(seed=7, max_digits=2, num_train=3000, num_heldout=100)
    assert (train, heldout) == arithmetic_problems(7, 2, 3000, 100)
    assert len(set(heldout)) == 100 and not set(heldout) & set(train)
    for p in train[:50]:
        a, b = p.prompt.rstrip("=").split("+")
        assert int(p.answer) == int(a) + int(b)


def test_sft_sample_supervises_only_answer_and_eos(tokenizer):
    train, _ = arithmetic_problems(seed=0, max_digits=2, num_train=10, num_heldout=1)
    dataset = SFTDataset(train, tokenizer, seq_len=16, seed=0)
    inputs, labels = dataset.encode(train[0])
    supervised = [int(t) for t in labels if t != IGNORE_INDEX]
    assert tokenizer.decode(supervised[:-1]) == train[0].answer
    assert supervised[-1] == tokenizer.eos_id
    prompt_len = len(train[0].prompt) + 1  # with <bos>
    assert inputs[prompt_len] == labels[prompt_len - 1]  # labels are the next tokens


def test_sft_sample_longer_than_seq_len_is_an_error_naming_it(tokenizer):
    train, _ = arithmetic_problems(seed=0, max_digits=2, num_train=10, num_heldout=1)
    with pytest.raises(ValueError, match="training.seq_len"):
        SFTDataset(train, tokenizer, seq_len=4, seed=0).encode(train[0])


def test_rank_shards_interleave_the_single_process_stream_and_resume(tokenizer):
    train, _ = arithmetic_problems(seed=0, max_digits=2, num_train=50, num_heldout=1)
    single = iter(SFTDataset(train, tokenizer, 16, seed=0))
    stream = [next(single)[0].tolist() for _ in range(6)]
    ranks = [iter(SFTDataset(train, tokenizer, 16, 0, dp_rank=r, dp_world_size=2)) for r in (0, 1)]
    interleaved = [next(ranks[i % 2])[0].tolist() for i in range(6)]
    assert interleaved == stream
    resumed = SFTDataset(train, tokenizer, 16, seed=0)
    resumed.load_state_dict({"index": 4})
    assert next(iter(resumed))[0].tolist() == stream[4]
