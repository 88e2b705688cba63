"""The draft we train is the draft vLLM serves.

vLLM 0.33's MiMo MTP draft step is re-implemented below in plain torch, from the MiMo-layout
export of our weights (the names and tensors vLLM loads), and compared with our
training-time MTP logits and with the native engine's drafts, at position 0 (where vLLM
zeroes the draft's token embedding) and at later positions (which attend to position 0).

The reference follows vLLM 0.33's source (read, not run; vLLM needs a GPU):

- vllm/model_executor/models/mimo.py, ``MiMoModel.forward``: the target returns the last
  layer's output before the final norm (``hidden_states + residual``);
  ``MiMoForCausalLM.compute_logits`` applies ``model.norm`` and then ``lm_head``.
- vllm/v1/spec_decode/llm_base_proposer.py, ``SpecDecodeBaseProposer.set_inputs_first_pass``:
  the draft gets the target's input ids shifted left by one (the sampled next token in the
  last slot), the target's positions unchanged, and the target's hidden states.
- vllm/model_executor/models/mimo_mtp.py, ``MiMoMultiTokenPredictorLayer.forward``: the
  token embedding is zeroed where ``positions == 0``; then ``token_layernorm`` and
  ``hidden_layernorm``, ``input_proj`` over ``[hidden, emb]``, a ``Qwen2DecoderLayer`` and
  ``final_layernorm``; ``MiMoMTP.compute_logits`` applies ``lm_head``.
- vllm/model_executor/models/qwen2.py, ``Qwen2Attention`` / ``Qwen2DecoderLayer``: pre-norm
  attention with q/k/v biases, per-head q/k RMSNorm when the config sets ``qk_norm``,
  neox-style (rotate-half) RoPE, ``head_dim = hidden_size // num_attention_heads``, and a
  SiLU-gated MLP.
"""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from torchtitan_mtp.checkpoints.adapter import MTPStateDictAdapter
from torchtitan_mtp.checkpoints.hf import hf_config
from torchtitan_mtp.config import parse_job_config
from torchtitan_mtp.models import MTPTransformer, mtp_flavors
from torchtitan_mtp.rollout import NativeRolloutEngine, SamplingParams

VOCAB = 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny matmuls: one intra-op thread (see conftest)."""


def build(mask: bool, **overrides) -> MTPTransformer:
    """A tiny random float64 model with one MTP module (vLLM's MiMo drafts with one),
    perturbed away from TorchTitan's near-uniform init; ``mask``: the module reads a zero
    embedding at position 0, as vLLM's does."""
    args = dataclasses.replace(
        mtp_flavors["debug"],
        vocab_size=VOCAB,
        max_seq_len=64,
        num_mtp_modules=1,
        mtp_mask_first_embedding=mask,
        **overrides,
    )
    torch.manual_seed(0)
    model = MTPTransformer(args)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.double()


def exported(model: MTPTransformer) -> tuple[dict[str, torch.Tensor], dict]:
    """What vLLM loads: the MiMo-layout tensors and config.json of our export."""
    adapter = MTPStateDictAdapter(model.model_args, mtp_layout="mimo")
    return adapter.to_hf(model.state_dict()), hf_config(model.model_args, "mimo")


# ------------------------------------------------------------- vLLM 0.33, re-implemented
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def neox_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x [S, heads, head_dim] rotated by the angles of ``positions`` [S] (rotate-half); the
    cos/sin cache in float32, as vLLM's ``RotaryEmbedding`` computes it."""
    head_dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)
    angles = positions.float()[:, None, None] * inv_freq  # [S, 1, head_dim / 2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def qwen2_decoder_layer(
    w: dict, prefix: str, x: torch.Tensor, positions: torch.Tensor, cfg: dict
) -> torch.Tensor:
    """vLLM's Qwen2DecoderLayer on one causal sequence: x [S, D] -> [S, D] (residual added)."""
    seq, eps = x.shape[0], cfg["rms_norm_eps"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg["hidden_size"] // heads
    h = rms_norm(x, w[prefix + "input_layernorm.weight"], eps)

    def proj(name: str, n: int) -> torch.Tensor:
        weight, bias = (
            w[f"{prefix}self_attn.{name}_proj.weight"],
            w[f"{prefix}self_attn.{name}_proj.bias"],
        )
        return F.linear(h, weight, bias).view(seq, n, head_dim)

    q, k, v = proj("q", heads), proj("k", kv_heads), proj("v", kv_heads)
    if cfg["qk_norm"]:
        q = rms_norm(q, w[prefix + "self_attn.q_norm.weight"], eps)
        k = rms_norm(k, w[prefix + "self_attn.k_norm.weight"], eps)
    q, k = neox_rope(q, positions, cfg["rope_theta"]), neox_rope(k, positions, cfg["rope_theta"])
    k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * head_dim**-0.5
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    attn = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    out = torch.einsum("hqk,khd->qhd", attn, v).reshape(seq, heads * head_dim)
    x = x + F.linear(out, w[prefix + "self_attn.o_proj.weight"])
    h = rms_norm(x, w[prefix + "post_attention_layernorm.weight"], eps)
    gate, up = (
        F.linear(h, w[prefix + "mlp.gate_proj.weight"]),
        F.linear(h, w[prefix + "mlp.up_proj.weight"]),
    )
    return x + F.linear(F.silu(gate) * up, w[prefix + "mlp.down_proj.weight"])


def vllm_mimo_draft_logits(w: dict, cfg: dict, ids: torch.Tensor, next_id: int) -> torch.Tensor:
    """Draft logits [S, V] of vLLM's first MiMo MTP layer over a prompt ids [S] whose sampled
    next token is ``next_id``: entry p predicts token p + 2 from h_p and token p + 1."""
    eps = cfg["rms_norm_eps"]
    positions = torch.arange(ids.shape[0])
    embed = w["model.embed_tokens.weight"]
    # MiMoModel.forward: the target's pre-norm last hidden states.
    hidden = embed[ids]
    for layer in range(cfg["num_hidden_layers"]):
        hidden = qwen2_decoder_layer(w, f"model.layers.{layer}.", hidden, positions, cfg)
    # set_inputs_first_pass: input ids shifted by one, positions and hidden states as they are.
    draft_ids = torch.cat([ids[1:], torch.tensor([next_id])])
    # MiMoMultiTokenPredictorLayer.forward
    p = "model.mtp_layers.0."
    emb = torch.where(positions.unsqueeze(-1) == 0, 0, embed[draft_ids])
    x = F.linear(
        torch.cat(
            [
                rms_norm(hidden, w[p + "hidden_layernorm.weight"], eps),
                rms_norm(emb, w[p + "token_layernorm.weight"], eps),
            ],
            dim=-1,
        ),
        w[p + "input_proj.weight"],
    )
    x = qwen2_decoder_layer(w, p, x, positions, cfg)
    # MiMoMTP.compute_logits
    return F.linear(rms_norm(x, w[p + "final_layernorm.weight"], eps), w["lm_head.weight"])


# ------------------------------------------------------------------------------- tests
def training_mtp_logits(model: MTPTransformer, seq: torch.Tensor, **kwargs) -> torch.Tensor:
    """Our training forward's module-1 logits [S, V] of one sequence [S]."""
    with torch.no_grad():
        hidden = model(seq[None], **kwargs)
        return model.output(hidden[1][None])[0, 0]


@pytest.mark.parametrize(
    "overrides",
    [{}, {"enable_weight_tying": True}, {"qk_norm": False, "qkv_bias": True}],
    ids=["qwen3", "tied", "qwen2_bias"],
)
def test_vllm_mimo_draft_equals_training_mtp_logits_at_every_position(overrides):
    model = build(mask=True, **overrides)
    w, cfg = exported(model)
    seq = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(1))
    reference = vllm_mimo_draft_logits(w, cfg, seq[:-1], int(seq[-1]))  # [11, V]
    ours = training_mtp_logits(model, seq)[:-1]  # the last index reads padding
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-9)
    # The same with explicit positions (where packed documents would restart them).
    torch.testing.assert_close(
        training_mtp_logits(model, seq, positions=torch.arange(12)[None])[:-1], reference
    )


def test_without_the_position_0_mask_training_differs_from_vllm():
    """The comparison has power: the unmasked draft (the default, as in Megatron-LM's and
    TorchTitan 0.3.0's MTP) differs from vLLM's at position 0 and, through attention, at
    later positions."""
    model = build(mask=False)
    w, cfg = exported(model)
    seq = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(1))
    diff = (
        training_mtp_logits(model, seq)[:-1]
        - vllm_mimo_draft_logits(w, cfg, seq[:-1], int(seq[-1]))
    ).abs()
    per_position = diff.amax(dim=-1)
    assert per_position[0] > 0.1 and per_position[1:].max() > 0.01, per_position


def record_drafts(engine: NativeRolloutEngine) -> list:
    """Spy on the engine's draft step: per round, the fed counts [B], the rows still
    running [B] and the draft distributions [B, K, V] (sampled decoding)."""
    rounds = []
    draft = engine._draft

    def spy(w, state, *args, **kwargs):
        fed, running = state.fed.clone(), ~state.stopped
        tokens, probs = draft(w, state, *args, **kwargs)
        rounds.append((fed, running, probs))
        return tokens, probs

    engine._draft = spy
    return rounds


@pytest.mark.parametrize("mask", [True, False])
def test_native_engine_drafts_are_the_training_drafts_with_and_without_the_mask(mask):
    """Every native draft distribution (sampled at temperature 1: softmax of the draft
    logits) equals softmax of the training forward's MTP logits at its position."""
    model = build(mask=mask)
    engine = NativeRolloutEngine(model, speculative_tokens=1)
    drafts = record_drafts(engine)
    prompts = [[20], [1, 2, 3]]
    completions = engine.generate(prompts, SamplingParams(max_new_tokens=10, seed=5))
    checked = 0
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        seq = torch.tensor(prompt + completion.token_ids)
        logits = training_mtp_logits(model, seq)
        for fed, running, probs in drafts:
            if running[row]:
                position = int(fed[row]) - 1
                torch.testing.assert_close(
                    probs[row, 0], logits[position].float().softmax(-1), rtol=1e-5, atol=1e-6
                )
                checked += 1
    assert checked >= 8


def test_native_engine_drafts_vllm_mimo_drafts_from_position_0_on():
    """A one-token prompt drafts its first round at position 0 (vLLM's zeroed embedding);
    later rounds draft at positions 1, 2, ... whose attention reads position 0."""
    model = build(mask=True)
    w, cfg = exported(model)
    engine = NativeRolloutEngine(model, speculative_tokens=1)
    drafts = record_drafts(engine)
    prompts = [[20], [1, 2, 3]]
    completions = engine.generate(prompts, SamplingParams(max_new_tokens=10, seed=5))
    positions = []
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        seq = torch.tensor(prompt + completion.token_ids)
        reference = vllm_mimo_draft_logits(w, cfg, seq[:-1], int(seq[-1]))
        for fed, running, probs in drafts:
            if running[row]:
                position = int(fed[row]) - 1
                torch.testing.assert_close(
                    probs[row, 0], reference[position].float().softmax(-1), rtol=1e-5, atol=1e-6
                )
                positions.append(position)
    assert 0 in positions and max(positions) >= 5


@pytest.mark.parametrize("engine, masked", [("native", False), ("vllm", True)])
def test_the_mask_follows_the_serving_engine_when_the_job_does_not_set_it(engine, masked):
    config = parse_job_config(
        ["--job.config_file", "train_configs/debug_occ.toml", "--rollout.engine", engine]
        + ["--rollout.speculative_tokens", "1"]
    )
    args = copy.deepcopy(mtp_flavors["debug"])
    args.update_from_config(config)
    assert args.mtp_mask_first_embedding is masked
