"""HF checkpoints: name adapter (MiMo / DeepSeek MTP layouts), loading, export, export CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import HuggingFaceStorageReader

from torchtitan_mtp.checkpoints import (
    MTPStateDictAdapter,
    export_hf,
    hf_config,
    load_hf_checkpoint,
    read_hf_state_dict,
)
from torchtitan_mtp.checkpoints.export import build_model, load_dcp_model_state
from torchtitan_mtp.checkpoints.hf import bucket_nbytes, size_buckets
from torchtitan_mtp.config import parse_job_config
from torchtitan_mtp.data.tokenizer import ARITHMETIC_TOKENIZER
from torchtitan_mtp.models import MTPTransformer, mtp_flavors

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64
LAYOUTS = ("mimo", "deepseek")

# family -> overrides of the debug flavor (debug: dim 64, 2 layers, 4 heads, 2 kv heads).
FAMILIES = {
    "llama3": dict(family="llama3", qk_norm=False),
    "qwen2": dict(family="qwen2", qkv_bias=True, qk_norm=False),
    "mimo": dict(family="mimo", qkv_bias=True, qk_norm=False),
    "qwen3": dict(family="qwen3", qk_norm=True),
    "smollm2": dict(family="smollm2", qk_norm=False, enable_weight_tying=True),
}


def tiny_args(family: str = "qwen3", num_mtp: int = 2, **overrides):
    args = dataclasses.replace(
        mtp_flavors["debug"], vocab_size=VOCAB, max_seq_len=32, num_mtp_modules=num_mtp
    )
    return dataclasses.replace(args, **{**FAMILIES[family], **overrides})


def random_model(args, seed: int = 0) -> MTPTransformer:
    """Every parameter random (norms and biases too), so misplaced weights show."""
    torch.manual_seed(seed)
    model = MTPTransformer(args)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.ndim == 1 else 0.0))
    return model


def hidden_states(model, seed: int = 123) -> list[torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(tokens)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------ adapter
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("num_mtp", [0, 1, 2])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_adapter_round_trip(family, num_mtp, layout):
    args = tiny_args(family, num_mtp)
    state = random_model(args).state_dict()
    adapter = MTPStateDictAdapter(args, mtp_layout=layout)
    hf = adapter.to_hf(state)
    assert all(k.startswith(("model.", "lm_head.")) for k in hf)
    assert_same_state(adapter.from_hf(hf), state)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_import_reproduces_every_head(family, layout):
    """Export to HF names, import into a differently initialised model: same K+1 heads."""
    args = tiny_args(family, num_mtp=2)
    source, fresh = random_model(args, seed=0), random_model(args, seed=1)
    hf = MTPStateDictAdapter(args, mtp_layout=layout).to_hf(source.state_dict())
    fresh.load_state_dict(MTPStateDictAdapter(args).from_hf(hf), strict=True)
    expected, got = hidden_states(source), hidden_states(fresh)
    assert len(got) == 3
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g)


def test_mimo_input_proj_is_eh_proj_with_halves_swapped():
    args = tiny_args("mimo", num_mtp=1)
    d = args.dim
    model = random_model(args)
    eh = torch.arange(d * 2 * d, dtype=torch.float32).reshape(d, 2 * d)
    with torch.no_grad():
        model.mtp["0"].eh_proj.weight.copy_(eh)
    hf = MTPStateDictAdapter(args, mtp_layout="mimo").to_hf(model.state_dict())
    input_proj = hf["model.mtp_layers.0.input_proj.weight"]
    assert torch.equal(input_proj[:, :d], eh[:, d:])  # MiMo's first half reads the hidden
    assert torch.equal(input_proj[:, d:], eh[:, :d])  # its second half the embedding
    # Same function: MiMo's input_proj([h; e]) == our eh_proj([e; h]).
    emb, hid = torch.randn(3, d, dtype=torch.float64), torch.randn(3, d, dtype=torch.float64)
    torch.testing.assert_close(
        torch.cat([hid, emb], -1) @ input_proj.double().T,
        torch.cat([emb, hid], -1) @ eh.double().T,
    )
    # DeepSeek keeps our order.
    hf = MTPStateDictAdapter(args, mtp_layout="deepseek").to_hf(model.state_dict())
    assert torch.equal(hf[f"model.layers.{args.n_layers}.eh_proj.weight"], eh)


# ------------------------------------------------------- names vLLM 0.33 expects
def vllm_trunk_names(n_layers: int, qk_norm: bool, lm_head: bool) -> set[str]:
    """Target model (vllm/model_executor/models/qwen2.py: Qwen2Model / Qwen2ForCausalLM,
    loaded through AutoWeightsLoader with Qwen2Model.hf_to_vllm_mapper): Qwen2Attention's
    qkv_proj always has bias=True, o_proj none; q_norm/k_norm only with config.qk_norm."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if lm_head:
        names.add("lm_head.weight")
    for i in range(n_layers):
        names |= {f"model.layers.{i}.{n}" for n in vllm_block_names(qk_norm, bias=True)}
    return names


def vllm_block_names(qk_norm: bool, bias: bool) -> list[str]:
    names = [
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
    ]
    if bias:
        names += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
    if qk_norm:
        names += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    return names


def vllm_mimo_mtp_names(num_mtp: int, qk_norm: bool) -> set[str]:
    """Draft model (vllm/model_executor/models/mimo_mtp.py: MiMoMTP.load_weights keeps
    names containing "mtp_layers", "embed_tokens" or "lm_head"; its hf_to_vllm_mapper maps
    model.mtp_layers.{i}.{self_attn,mlp,input_layernorm,post_attention_layernorm}.* into
    mtp_block; MiMoMultiTokenPredictorLayer owns token_layernorm, hidden_layernorm,
    input_proj (no bias), final_layernorm). MiMoMTP.lm_head is its own ParallelLMHead,
    never tied, and default_loader's track_weights_loading requires every parameter:
    lm_head.weight must be in the checkpoint even with tie_word_embeddings."""
    names = {"model.embed_tokens.weight", "lm_head.weight"}
    for i in range(num_mtp):
        names |= {
            f"model.mtp_layers.{i}.{n}"
            for n in [
                "token_layernorm.weight",
                "hidden_layernorm.weight",
                "input_proj.weight",
                "final_layernorm.weight",
                *vllm_block_names(qk_norm, bias=True),
            ]
        }
    return names


def deepseek_mtp_names(n_layers: int, num_mtp: int, qk_norm: bool, bias: bool) -> set[str]:
    """vllm/model_executor/models/deepseek_mtp.py: DeepSeekMTP.load_weights /
    _rewrite_spec_layer_name: layer L = num_hidden_layers + i holds enorm, hnorm, eh_proj
    and shared_head.{norm,head} (SharedHead); everything else of layer L is mtp_block."""
    names = set()
    for i in range(num_mtp):
        names |= {
            f"model.layers.{n_layers + i}.{n}"
            for n in [
                "enorm.weight",
                "hnorm.weight",
                "eh_proj.weight",
                "shared_head.norm.weight",
                "shared_head.head.weight",
                *vllm_block_names(qk_norm, bias),
            ]
        }
    return names


@pytest.mark.parametrize("num_mtp", [1, 2])
@pytest.mark.parametrize("family", ["mimo", "qwen3", "smollm2", "llama3"])
def test_mimo_export_names_are_vllm_names(family, num_mtp):
    args = tiny_args(family, num_mtp)
    hf = MTPStateDictAdapter(args, mtp_layout="mimo").to_hf(random_model(args).state_dict())
    expected = vllm_trunk_names(args.n_layers, args.qk_norm, lm_head=True)
    expected |= vllm_mimo_mtp_names(num_mtp, args.qk_norm)
    assert sorted(hf) == sorted(expected)
    if not args.qkv_bias:  # bias-free families get zero biases
        assert all(not hf[k].any() for k in hf if k.endswith(".bias"))


@pytest.mark.parametrize("family", ["qwen3", "smollm2", "mimo"])
def test_deepseek_export_names(family):
    args = tiny_args(family, num_mtp=2)
    model = random_model(args)
    hf = MTPStateDictAdapter(args, mtp_layout="deepseek").to_hf(model.state_dict())
    bias = args.qkv_bias or family in ("qwen2", "mimo")  # Qwen2ForCausalLM always has one
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    if not args.enable_weight_tying:
        expected.add("lm_head.weight")
    for i in range(args.n_layers):
        expected |= {f"model.layers.{i}.{n}" for n in vllm_block_names(args.qk_norm, bias)}
    expected |= deepseek_mtp_names(args.n_layers, 2, args.qk_norm, bias)
    assert sorted(hf) == sorted(expected)
    for k in range(2):
        head = hf[f"model.layers.{args.n_layers + k}.shared_head.head.weight"]
        assert torch.equal(head, model.output.weight)


# ----------------------------------------------------------- export / load files
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", ["qwen3", "smollm2", "mimo"])
def test_export_load_round_trip_sharded(tmp_path, family, layout):
    args = tiny_args(family, num_mtp=2)
    model = random_model(args)
    out = export_hf(
        model,
        args,
        tmp_path / "hf",
        mtp_layout=layout,
        tokenizer_dir=ARITHMETIC_TOKENIZER,
        max_shard_bytes=64 * 1024,
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all((out / s).is_file() for s in shards)
    hf_keys = set(MTPStateDictAdapter(args, mtp_layout=layout).to_hf(model.state_dict()))
    assert set(index["weight_map"]) == hf_keys
    on_disk = {k: v for s in shards for k, v in load_file(out / s).items()}
    assert on_disk.keys() == hf_keys
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in on_disk.values()
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (ARITHMETIC_TOKENIZER / name).read_bytes()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dir left

    fresh = random_model(args, seed=7)
    info = load_hf_checkpoint(fresh, out)
    assert (info.mtp_layout, info.found_mtp_modules, info.missing_mtp_modules) == (
        layout,
        [0, 1],
        [],
    )
    assert_same_state(fresh.state_dict(), model.state_dict())
    for e, g in zip(hidden_states(model), hidden_states(fresh), strict=True):
        assert torch.equal(e, g)


def test_size_buckets_pack_greedily_never_split_a_group_and_count_a_tied_tensor_once():
    t = [torch.zeros(n) for n in (10, 10, 30, 5, 5)]  # float32: 40, 40, 120, 20, 20 bytes
    tied = torch.zeros(20)  # 80 bytes under two names
    groups = [[("a", t[0])], [("e", tied), ("h", tied)], [("b", t[1])], [("c", t[2])]]
    groups += [[("d", t[3]), ("d.bias", t[4])]]
    buckets = [[n for n, _ in b] for b in size_buckets(groups, 120)]
    assert buckets == [["a", "e", "h"], ["b"], ["c"], ["d", "d.bias"]]
    assert bucket_nbytes([("e", tied), ("h", tied)]) == 80
    with pytest.raises(ValueError, match="positive"):
        next(size_buckets(groups, 0))


def test_vllm_unservable_flavors_are_those_whose_heads_do_not_tile_dim():
    reasons = {name: args.vllm_unservable_reason() for name, args in mtp_flavors.items()}
    for name, args in mtp_flavors.items():
        assert (reasons[name] is None) == (args.head_dim * args.n_heads == args.dim), name
    assert "head_dim = dim // n_heads = 64" in reasons["qwen3_0_6b"]
    assert reasons["qwen3_1_7b"] is None and reasons["mimo_7b"] is None


def test_config_json_fields(tmp_path):
    args = tiny_args("qwen3", num_mtp=2)
    out = export_hf(random_model(args), args, tmp_path / "m", dtype=torch.bfloat16)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["MiMoForCausalLM"] and cfg["model_type"] == "mimo"
    assert cfg["num_nextn_predict_layers"] == 2 and cfg["qk_norm"] is True
    expected = {
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 32,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
    }
    assert {k: cfg[k] for k in expected} == expected
    assert cfg["auto_map"]["AutoConfig"] == "configuration_mimo.MiMoConfig"
    assert "class MiMoConfig(Qwen2Config)" in (out / "configuration_mimo.py").read_text()
    assert (out / "model.safetensors").is_file()  # one shard: no index
    assert not (out / "model.safetensors.index.json").exists()
    assert all(t.dtype == torch.bfloat16 for t in load_file(out / "model.safetensors").values())

    deepseek = hf_config(tiny_args("qwen3", num_mtp=1), "deepseek")
    assert deepseek["architectures"] == ["Qwen3ForCausalLM"]
    assert deepseek["model_type"] == "qwen3" and deepseek["num_nextn_predict_layers"] == 1
    llama = hf_config(tiny_args("smollm2", num_mtp=1), "deepseek")
    assert llama["architectures"] == ["LlamaForCausalLM"] and llama["tie_word_embeddings"]
    scaled = hf_config(dataclasses.replace(mtp_flavors["llama3_8b"], num_mtp_modules=1))
    assert scaled["rope_scaling"]["rope_type"] == "llama3"
    assert scaled["rope_scaling"]["factor"] == 8.0


def test_export_refuses_non_empty_dir_unless_overwrite(tmp_path):
    args = tiny_args("qwen3", num_mtp=1)
    model = random_model(args)
    out = export_hf(model, args, tmp_path / "m")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_hf(model, args, out)
    export_hf(model, args, out, mtp_layout="deepseek", overwrite=True)
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3"


def test_torchtitan_hf_load_path(tmp_path):
    """TorchTitan's CheckpointManager.dcp_load(from_hf=True): to_hf names the tensors to
    read with HuggingFaceStorageReader, from_hf maps them back."""
    for layout in LAYOUTS:
        args = tiny_args("smollm2", num_mtp=2)
        model = random_model(args)
        out = export_hf(model, args, tmp_path / layout, mtp_layout=layout)
        fresh = random_model(args, seed=3)
        adapter = MTPStateDictAdapter(args, str(out))  # layout read from the checkpoint
        assert adapter.mtp_layout == layout
        hf = adapter.to_hf(fresh.state_dict())
        dcp.load(hf, storage_reader=HuggingFaceStorageReader(str(out)))
        fresh.load_state_dict(adapter.from_hf(hf))
        assert_same_state(fresh.state_dict(), model.state_dict())


# ------------------------------------------------------------------ import errors
def write_hf(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, path / "model.safetensors")
    return path


def test_missing_checkpoint_names_the_path(tmp_path):
    model = random_model(tiny_args())
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        load_hf_checkpoint(model, tmp_path / "nope")
    args = tiny_args()
    out = export_hf(model, args, tmp_path / "m", max_shard_bytes=64 * 1024)
    next(out.glob("model-00001-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="model-00001"):
        load_hf_checkpoint(model, out)


def test_unexpected_key(tmp_path):
    args = tiny_args("qwen3", num_mtp=1)
    model = random_model(args)
    hf = MTPStateDictAdapter(args).to_hf(model.state_dict())
    hf["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # ignorable
    load_hf_checkpoint(model, write_hf(tmp_path / "ok", hf))
    hf["model.layers.0.mlp.experts.0.gate_proj.weight"] = torch.ones(2, 2)
    with pytest.raises(ValueError, match=r"unexpected key.*mlp\.experts\.0\.gate_proj"):
        load_hf_checkpoint(model, write_hf(tmp_path / "bad", hf))
    # q/k norms for a model without them are unexpected too
    no_qk = tiny_args("llama3", num_mtp=0)
    hf = MTPStateDictAdapter(args).to_hf(random_model(tiny_args("qwen3", num_mtp=0)).state_dict())
    with pytest.raises(ValueError, match=r"self_attn\.q_norm"):
        MTPStateDictAdapter(no_qk).from_hf(hf)


def test_missing_trunk_weight(tmp_path):
    args = tiny_args("qwen3", num_mtp=1)
    model = random_model(args)
    hf = MTPStateDictAdapter(args).to_hf(model.state_dict())
    del hf["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        load_hf_checkpoint(model, write_hf(tmp_path / "m", hf))


def test_shape_mismatch(tmp_path):
    args = tiny_args("qwen3", num_mtp=1)
    model = random_model(args)
    hf = MTPStateDictAdapter(args).to_hf(model.state_dict())
    hf["model.layers.0.mlp.up_proj.weight"] = torch.zeros(100, 64)
    with pytest.raises(ValueError, match=r"up_proj\.weight.*\(100, 64\).*\(192, 64\)"):
        load_hf_checkpoint(model, write_hf(tmp_path / "m", hf))


def test_bias_for_bias_free_family(tmp_path):
    args = tiny_args("llama3", num_mtp=1)
    model = random_model(args)
    hf = MTPStateDictAdapter(args, mtp_layout="mimo").to_hf(model.state_dict())
    assert "model.layers.0.self_attn.q_proj.bias" in hf  # zero, dropped on import
    load_hf_checkpoint(model, write_hf(tmp_path / "zero", hf))
    hf["model.mtp_layers.0.self_attn.k_proj.bias"] = torch.full((32,), 0.1)
    with pytest.raises(ValueError, match=r"mtp_layers\.0\.self_attn\.k_proj\.bias is non-zero"):
        load_hf_checkpoint(model, write_hf(tmp_path / "nonzero", hf))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fewer_mtp_modules_than_model(tmp_path, layout):
    small_args = tiny_args("qwen3", num_mtp=1)
    small = random_model(small_args, seed=0)
    out = export_hf(small, small_args, tmp_path / "m", mtp_layout=layout)
    args = tiny_args("qwen3", num_mtp=3)
    model = random_model(args, seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = MTPStateDictAdapter(args)
    assert adapter.missing_mtp_modules(read_hf_state_dict(out)) == [1, 2]
    info = load_hf_checkpoint(model, out)
    assert info.found_mtp_modules == [0] and info.missing_mtp_modules == [1, 2]
    after = model.state_dict()
    for key, value in small.state_dict().items():
        assert torch.equal(after[key], value), key
    for key in after:
        if key.startswith(("mtp.1.", "mtp.2.")):
            assert torch.equal(after[key], before[key]), key  # kept its init
    # A trunk-only checkpoint (K = 0) loads too: all MTP modules fresh.
    trunk_args = tiny_args("qwen3", num_mtp=0)
    out0 = export_hf(random_model(trunk_args), trunk_args, tmp_path / "trunk")
    assert load_hf_checkpoint(model, out0).missing_mtp_modules == [0, 1, 2]


def test_more_mtp_modules_than_model_and_mixed_layouts(tmp_path):
    big_args = tiny_args("qwen3", num_mtp=2)
    big = random_model(big_args)
    out = export_hf(big, big_args, tmp_path / "m")
    model = random_model(tiny_args("qwen3", num_mtp=1))
    with pytest.raises(ValueError, match=r"MTP modules \[1\] beyond.*num_mtp_modules = 1"):
        load_hf_checkpoint(model, out)
    with pytest.raises(ValueError, match="'mimo' layout, not 'deepseek'"):
        load_hf_checkpoint(random_model(big_args), out, mtp_layout="deepseek")
    hf = MTPStateDictAdapter(big_args, mtp_layout="mimo").to_hf(big.state_dict())
    hf.update(MTPStateDictAdapter(big_args, mtp_layout="deepseek").to_hf(big.state_dict()))
    with pytest.raises(ValueError, match="mixes"):
        MTPStateDictAdapter(big_args).from_hf(hf)


def test_deepseek_shared_head_must_match_output_head():
    args = tiny_args("qwen3", num_mtp=1)
    hf = MTPStateDictAdapter(args, mtp_layout="deepseek").to_hf(random_model(args).state_dict())
    # DeepSeek-V3 checkpoints also repeat the embedding in each MTP layer: accepted if equal.
    embed = f"model.layers.{args.n_layers}.embed_tokens.weight"
    hf[embed] = hf["model.embed_tokens.weight"].clone()
    MTPStateDictAdapter(args).from_hf(hf)
    hf[embed] = torch.zeros(VOCAB, 64)
    with pytest.raises(ValueError, match="embed_tokens.weight differs"):
        MTPStateDictAdapter(args).from_hf(hf)
    del hf[embed]
    hf[f"model.layers.{args.n_layers}.shared_head.head.weight"] = torch.zeros(VOCAB, 64)
    with pytest.raises(ValueError, match="shared_head.head.weight differs from lm_head"):
        MTPStateDictAdapter(args).from_hf(hf)


# --------------------------------------------------------------- export CLI on DCP
CONFIG = ROOT / "train_configs" / "debug_occ.toml"


@pytest.fixture(scope="module")
def dcp_checkpoint(tmp_path_factory) -> Path:
    dump = tmp_path_factory.mktemp("train")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
        "-m", "torchtitan_mtp.train", "--job.config_file", str(CONFIG),
        "--job.dump_folder", str(dump), "--training.steps", "2", "--rl.steps", "0",
        "--checkpoint.interval", "1000",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    step = dump / "checkpoint" / "sft" / "step-2"
    assert (step / ".metadata").is_file()
    return step


def test_export_cli_on_dcp_checkpoint(dcp_checkpoint, tmp_path):
    out = tmp_path / "hf"
    cmd = [
        sys.executable, "-m", "torchtitan_mtp.checkpoints.export",
        "--checkpoint", str(dcp_checkpoint), "--job.config_file", str(CONFIG),
        "--out", str(out), "--mtp-layout", "mimo",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    config = parse_job_config(["--job.config_file", str(CONFIG)])
    trained, args = build_model(config)
    load_dcp_model_state(trained, dcp_checkpoint)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == config.mtp.num_modules == 2
    assert cfg["max_position_embeddings"] == mtp_flavors["debug"].max_seq_len
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()

    fresh, _ = build_model(config)
    fresh.init_weights()
    info = load_hf_checkpoint(fresh, out, mtp_layout="mimo")
    assert info.found_mtp_modules == [0, 1] and not info.missing_mtp_modules
    assert_same_state(fresh.state_dict(), trained.state_dict())


def test_load_dcp_reports_missing_weights(dcp_checkpoint):
    config = parse_job_config(["--job.config_file", str(CONFIG), "--mtp.num_modules", "3"])
    model, _ = build_model(config)
    with pytest.raises(ValueError, match=r"not in the DCP checkpoint.*mtp\.2\."):
        load_dcp_model_state(model, dcp_checkpoint)


def test_load_dcp_nested_model_key_and_tied_weights(tmp_path):
    """State dicts saved as {"model": {...}} are read too; a tied head is fine."""
    args = tiny_args("smollm2", num_mtp=1)
    model = random_model(args)
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp_path / "ckpt"))
    fresh = random_model(args, seed=9)
    load_dcp_model_state(fresh, tmp_path / "ckpt")
    assert_same_state(fresh.state_dict(), model.state_dict())
    assert fresh.output.weight is fresh.tok_embeddings.weight
    with pytest.raises(FileNotFoundError, match="no DCP checkpoint"):
        load_dcp_model_state(fresh, tmp_path / "nope")
