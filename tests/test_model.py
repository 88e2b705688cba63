"""The MTP transformer: alignment, equality with TorchTitan's models, Detach, flavors."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torchtitan.models.llama3 import Transformer as Llama3Transformer
from torchtitan.models.llama3 import TransformerModelArgs as Llama3Args
from torchtitan.models.llama3.model.args import RoPEScalingArgs
from torchtitan.models.llama3.model.state_dict_adapter import Llama3StateDictAdapter
from torchtitan.models.qwen3 import Qwen3Model, Qwen3ModelArgs

from torchtitan_mtp.losses import MTPCrossEntropy
from torchtitan_mtp.models import MTPTransformer, mtp_flavors, token_logprobs
from torchtitan_mtp.models.logprobs import IGNORE_INDEX, target_mask

VOCAB = 64


def tiny_args(num_mtp: int = 0, **overrides):
    base = dataclasses.replace(
        mtp_flavors["debug"], vocab_size=VOCAB, max_seq_len=32, num_mtp_modules=num_mtp
    )
    return dataclasses.replace(base, **overrides)


def build(args, seed: int = 0) -> MTPTransformer:
    torch.manual_seed(seed)
    model = MTPTransformer(args)
    model.init_weights()
    return model


def direct_head_logprob(model, tokens, k: int, t: int) -> torch.Tensor:
    """log p^k(y_t) computed from scratch: head k predicts x[:, t + 1] from position t - k.

    Label index t (labels[:, t] = x[:, t + 1]); head k works at position i = t - k,
    reading the trunk state h^0_i, then embeddings of x[i + 1], ..., x[i + k]; with
    ``mtp_mask_first_embedding`` every MTP module reads a zero embedding at position 0.
    """
    i = t - k
    emb = model.tok_embeddings(tokens)
    h = emb
    for layer in model.layers.values():
        h = layer(h, model.rope_cache, None)
    if k == 0:
        hidden = model.norm(h)
    else:
        for j, module in enumerate(model.mtp.values(), start=1):
            shifted = torch.roll(emb, shifts=-j, dims=1)  # position p reads x[p + j]
            if model.model_args.mtp_mask_first_embedding:
                shifted[:, 0] = 0
            h, hidden = module(h, shifted, model.rope_cache)
            if j == k:
                break
    logits = F.linear(hidden[:, i], model.output.weight)
    return logits.log_softmax(-1).gather(-1, tokens[:, t + 1 : t + 2]).squeeze(-1)


@pytest.mark.parametrize("mask", [False, True], ids=["unmasked", "position0_masked"])
@pytest.mark.parametrize("num_mtp", [1, 3])
def test_aligned_logprob_equals_direct_prediction_from_position_t_minus_k(num_mtp, mask):
    model = build(tiny_args(num_mtp, mtp_mask_first_embedding=mask))
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = tokens[:, 1:].clone()
    labels[1, 7:] = IGNORE_INDEX  # a padded row
    with torch.no_grad():
        stats = token_logprobs(model, model(tokens[:, :-1]), labels)
        for k in range(num_mtp + 1):
            for t in range(labels.shape[1]):
                expect_valid = t >= k
                assert bool(stats.mask[k, 0, t]) == expect_valid
                assert bool(stats.mask[k, 1, t]) == (expect_valid and t < 7)
                if expect_valid:
                    direct = direct_head_logprob(model, tokens, k, t)
                    rows = stats.mask[k, :, t]
                    torch.testing.assert_close(
                        stats.logp[k, rows, t], direct[rows], rtol=1e-5, atol=1e-5
                    )


def test_mask_never_predicts_across_packed_documents():
    labels = torch.zeros(1, 6, dtype=torch.long)
    segments = torch.tensor([[0, 0, 0, 1, 1, 1]])
    mask = target_mask(labels, 3, segments)
    assert mask[0, 0].tolist() == [True] * 6
    assert mask[1, 0].tolist() == [False, True, True, False, True, True]
    assert mask[2, 0].tolist() == [False, False, True, False, False, True]


def test_chunked_logprobs_equal_unchunked_and_backprop_the_same():
    tokens = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(2))
    grads = []
    for chunk in (1024, 5):
        model = build(tiny_args(2, logprob_chunk_tokens=chunk))
        stats = token_logprobs(model, model(tokens[:, :-1]), tokens[:, 1:])
        (stats.logp * stats.mask).sum().backward()
        grads.append((stats.logp.detach(), model.output.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def _copy_state(src: torch.nn.Module, dst: MTPTransformer, transform=None) -> None:
    state = {k: (transform(k, v) if transform else v) for k, v in src.state_dict().items()}
    missing, unexpected = dst.load_state_dict(state, strict=False)
    assert not unexpected and not missing


def test_k0_logits_equal_torchtitan_qwen3():
    qargs = Qwen3ModelArgs(
        vocab_size=VOCAB,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        hidden_dim=160,
        qk_norm=True,
        max_seq_len=32,
        rope_theta=1e6,
    )
    torch.manual_seed(0)
    reference = Qwen3Model(qargs)
    with torch.no_grad():
        reference.init_weights()
    ours = MTPTransformer(tiny_args(0, hidden_dim=160, rope_theta=1e6))
    _copy_state(reference, ours)
    tokens = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        expected = reference(tokens)
        logits = ours.output(torch.stack(ours(tokens)))[0]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_k0_logits_equal_torchtitan_llama3_with_rope_scaling():
    largs = Llama3Args(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=VOCAB,
        multiple_of=32,
        rope_theta=500000,
        max_seq_len=32,
        rope_scaling_args=RoPEScalingArgs(original_max_position_embeddings=16),
    )
    torch.manual_seed(0)
    reference = Llama3Transformer(largs)
    with torch.no_grad():
        reference.init_weights()
    hidden_dim = reference.layers["0"].feed_forward.w1.out_features
    ours = MTPTransformer(
        tiny_args(
            0,
            family="llama3",
            qk_norm=False,
            hidden_dim=hidden_dim,
            rope_theta=500000,
            norm_eps=1e-5,
            rope_scaling=largs.rope_scaling_args,
        )
    )
    # TorchTitan's llama3 rotates interleaved pairs; our blocks rotate halves (HF layout).
    # TorchTitan's own HF adapter permutation maps one onto the other.
    adapter = Llama3StateDictAdapter(largs, None)

    def to_rotate_half(name, value):
        if name.endswith("attention.wq.weight"):
            return adapter._permute(value, largs.n_heads)
        if name.endswith("attention.wk.weight"):
            return adapter._permute(value, largs.n_kv_heads, value.shape[0], largs.dim)
        return value

    _copy_state(reference, ours, to_rotate_half)
    tokens = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        expected = reference(tokens)
        logits = ours.output(torch.stack(ours(tokens)))[0]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def _sft_loss(model, tokens, detach: bool) -> torch.Tensor:
    stats = token_logprobs(
        model,
        model(tokens[:, :-1], detach_mtp_inputs=detach),
        tokens[:, 1:],
        detach_mtp_head=detach,
    )
    counts = stats.mask.sum(dim=(1, 2))
    return MTPCrossEntropy(coefficient=1.0, num_mtp_modules=2)(stats, counts)[0], stats


def _mtp_only_loss(model, tokens, detach: bool) -> torch.Tensor:
    _, stats = _sft_loss(model, tokens, detach)
    return -(stats.logp[1:] * stats.mask[1:]).sum()


@pytest.mark.parametrize("tied", [False, True])
def test_detach_mtp_loss_puts_no_gradient_on_trunk_embedding_or_head(tied):
    model = build(tiny_args(2, enable_weight_tying=tied))
    tokens = torch.randint(0, VOCAB, (2, 12))
    _mtp_only_loss(model, tokens, detach=True).backward()
    for name, param in model.named_parameters():
        if name.startswith("mtp."):
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None or param.grad.abs().sum() == 0, name


def test_without_detach_mtp_loss_reaches_trunk_embedding_and_head():
    model = build(tiny_args(2))
    tokens = torch.randint(0, VOCAB, (2, 12))
    _mtp_only_loss(model, tokens, detach=False).backward()
    for name in ("tok_embeddings.weight", "layers.0.attention.wq.weight", "output.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_detach_leaves_main_loss_gradients_unchanged():
    tokens = torch.randint(0, VOCAB, (2, 12))
    with_mtp = build(tiny_args(2))
    without_mtp = MTPTransformer(tiny_args(0))
    trunk = {k: v for k, v in with_mtp.state_dict().items() if not k.startswith("mtp.")}
    without_mtp.load_state_dict(trunk)
    grads = []
    for model in (without_mtp, with_mtp):
        stats = token_logprobs(
            model,
            model(tokens[:, :-1], detach_mtp_inputs=True),
            tokens[:, 1:],
            detach_mtp_head=True,
        )
        (-(stats.logp * stats.mask).sum()).backward()  # main + MTP terms
        grads.append(model.layers["1"].feed_forward.w2.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_qkv_bias_exists_and_starts_at_zero():
    model = build(tiny_args(1, qkv_bias=True))
    for block in (model.layers["0"], model.mtp["0"].block):
        for name in ("wq", "wk", "wv"):
            assert torch.equal(
                getattr(block.attention, name).bias,
                torch.zeros_like(getattr(block.attention, name).bias),
            )
        assert block.attention.wo.bias is None


def test_last_block_init_copies_the_last_trunk_block_into_every_mtp_block():
    model = build(tiny_args(2, mtp_init="last_block"))
    last = model.layers["1"].state_dict()
    for module in model.mtp.values():
        for name, value in module.block.state_dict().items():
            assert torch.equal(value, last[name]), name
    random_init = build(tiny_args(2, mtp_init="random"))
    assert not torch.equal(
        random_init.mtp["0"].block.attention.wq.weight, random_init.layers["1"].attention.wq.weight
    )


PUBLISHED_PARAMS = {
    "qwen3_8b": 8.19e9,  # Qwen3-8B
    "llama3_8b": 8.03e9,  # Llama-3-8B
    "mimo_7b": 7.83e9,  # MiMo-7B, including its MTP layer
    "qwen3_0_6b": 0.596e9,
    "qwen3_1_7b": 1.72e9,
    "smollm2_135m": 134.5e6,
}


@pytest.mark.parametrize("flavor", sorted(PUBLISHED_PARAMS))
def test_full_size_flavor_builds_on_meta_with_published_parameter_count(flavor):
    args = mtp_flavors[flavor]
    with torch.device("meta"):
        model = MTPTransformer(args)
    count = sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert abs(count - PUBLISHED_PARAMS[flavor]) / PUBLISHED_PARAMS[flavor] < 0.01
    assert model.num_mtp_modules == (1 if flavor == "mimo_7b" else 0)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_wraps_trunk_and_mtp_blocks_without_changing_gradients(mode):
    from torchtitan.distributed import ParallelDims

    from torchtitan_mtp.config import MTPJobConfig
    from torchtitan_mtp.models.parallelize import parallelize_mtp

    config = MTPJobConfig()
    config.activation_checkpoint.mode = mode
    config.activation_checkpoint.selective_ac_option = "op"
    config.training.seq_len = 12
    dims = ParallelDims(dp_shard=1, dp_replicate=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
    tokens = torch.randint(0, VOCAB, (2, 12))
    plain, wrapped = build(tiny_args(2)), build(tiny_args(2))
    parallelize_mtp(wrapped, dims, config)
    assert "checkpoint" in type(wrapped.mtp["1"].block).__name__.lower()
    assert "checkpoint" in type(wrapped.layers["0"]).__name__.lower()
    for model in (plain, wrapped):
        _sft_loss(model, tokens, detach=False)[0].backward()
    torch.testing.assert_close(
        wrapped.mtp["1"].eh_proj.weight.grad, plain.mtp["1"].eh_proj.weight.grad
    )
    torch.testing.assert_close(wrapped.output.weight.grad, plain.output.weight.grad)
