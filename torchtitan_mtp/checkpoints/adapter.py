"""HF <-> TorchTitan name mapping of the MTP transformer, MTP modules in two HF layouts.

Trunk names are the usual HF Llama/Qwen2/Qwen3 ones. Our blocks use the rotate-half RoPE
convention of HF checkpoints, so q/k weights are copied as they are (no permutation, unlike
TorchTitan's llama3 adapter). MTP module k (``mtp.{k}``, 0-based) is written as

* ``"mimo"`` (XiaomiMiMo, servable by vLLM 0.33 as ``MiMoForCausalLM`` + ``MiMoMTP``):
  ``model.mtp_layers.{k}.{token_layernorm, hidden_layernorm, input_proj, final_layernorm,
  self_attn.*, mlp.*, input_layernorm, post_attention_layernorm}``. MiMo concatenates
  ``[hidden; emb]`` where we (DeepSeek) concatenate ``[emb; hidden]``, so the two column
  halves of ``input_proj`` are swapped relative to our ``eh_proj``. vLLM's MiMo is a Qwen2
  model whose attention always has a q/k/v bias: bias-free families get zero biases.
* ``"deepseek"`` (DeepSeek-V3): layer ``L = num_hidden_layers + k``:
  ``model.layers.L.{enorm, hnorm, eh_proj, shared_head.norm, shared_head.head, self_attn.*,
  mlp.*, input_layernorm, post_attention_layernorm}``; ``shared_head.head`` is a copy of
  the output head (written on export, checked against it on import).

Import (``from_hf``) detects the layout. A checkpoint may hold fewer MTP modules than the
model: the missing ones are simply absent from the result (see ``missing_mtp_modules``), and
the caller keeps their initialisation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from torch.distributed.tensor import DTensor
from torchtitan.protocols.state_dict_adapter import StateDictAdapter
from torchtitan.tools.logging import logger

from ..models.args import MTPModelArgs

__all__ = [
    "MTP_LAYOUTS",
    "MTPLayout",
    "MTPStateDictAdapter",
    "checkpoint_keys",
    "detect_mtp_layout",
]

MTPLayout = Literal["mimo", "deepseek"]
MTP_LAYOUTS: tuple[str, ...] = ("mimo", "deepseek")

# Block-relative names: ours -> HF (identical for trunk layers and MTP blocks).
_BLOCK_TO_HF = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.wq.bias": "self_attn.q_proj.bias",
    "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.bias": "self_attn.v_proj.bias",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_BLOCK_FROM_HF = {v: k for k, v in _BLOCK_TO_HF.items()}
_BIASES = ("attention.wq.bias", "attention.wk.bias", "attention.wv.bias")
_QK_NORMS = ("attention.q_norm.weight", "attention.k_norm.weight")
_QKV_WEIGHTS = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight")

# MTP-module-level names (outside the block): ours -> HF, per layout.
_MTP_TO_HF = {
    "mimo": {
        "enorm.weight": "token_layernorm.weight",
        "hnorm.weight": "hidden_layernorm.weight",
        "eh_proj.weight": "input_proj.weight",
        "norm.weight": "final_layernorm.weight",
    },
    "deepseek": {
        "enorm.weight": "enorm.weight",
        "hnorm.weight": "hnorm.weight",
        "eh_proj.weight": "eh_proj.weight",
        "norm.weight": "shared_head.norm.weight",
    },
}
_MTP_FROM_HF = {layout: {v: k for k, v in m.items()} for layout, m in _MTP_TO_HF.items()}

_TOP_TO_HF = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_MIMO_MTP = re.compile(r"^model\.mtp_layers\.(\d+)\.(.+)$")
_OURS_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_OURS_MTP = re.compile(r"^mtp\.(\d+)\.(.+)$")

# Non-weights some HF checkpoints carry (vLLM's AutoWeightsLoader drops the same ones).
_IGNORABLE_SUFFIXES = (
    "rotary_emb.inv_freq",
    "rotary_pos_emb.inv_freq",
    "rotary_emb.cos_cached",
    "rotary_emb.sin_cached",
)
# DeepSeek-layout duplicates of shared weights inside an MTP layer.
_DEEPSEEK_HEAD = "shared_head.head.weight"
_DEEPSEEK_EMBED = "embed_tokens.weight"


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """[d, 2d] with columns [a | b] -> [b | a] (its own inverse)."""
    half = weight.shape[1] // 2
    return torch.cat([weight[:, half:], weight[:, :half]], dim=1)


def _mtp_index(key: str, num_layers: int) -> tuple[MTPLayout, int] | None:
    """(layout, 0-based module index) when ``key`` is an HF MTP weight, else None."""
    if m := _HF_MIMO_MTP.match(key):
        return "mimo", int(m[1])
    if (m := _HF_LAYER.match(key)) and int(m[1]) >= num_layers:
        return "deepseek", int(m[1]) - num_layers
    return None


def detect_mtp_layout(hf_keys: Iterable[str], num_layers: int) -> MTPLayout | None:
    """The MTP layout of a set of HF keys (None: no MTP weights); both at once -> error."""
    layouts = {found[0] for key in hf_keys if (found := _mtp_index(key, num_layers))}
    if len(layouts) > 1:
        raise ValueError(
            "HF checkpoint mixes MiMo-style (model.mtp_layers.*) and DeepSeek-style "
            f"(model.layers.{{>= {num_layers}}}.*) MTP weights; keep one layout"
        )
    return layouts.pop() if layouts else None


def checkpoint_keys(path: str | Path) -> set[str] | None:
    """Tensor names of an HF checkpoint directory (index or single file header), or None."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    single = path / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return set(f.keys())
    return None


class MTPStateDictAdapter(StateDictAdapter):
    """TorchTitan state-dict adapter of :class:`~torchtitan_mtp.models.MTPTransformer`.

    Args:
        model_args: the model's arguments (n_layers, qkv_bias, qk_norm, tying, K).
        hf_assets_path: optional HF checkpoint directory. When it holds safetensors, the
            adapter matches it for TorchTitan's ``checkpoint.initial_load_in_hf``: the MTP
            layout, the zero q/k/v biases and a tied ``lm_head`` copy are written by
            ``to_hf`` exactly when the checkpoint has them.
        mtp_layout: MTP names written by ``to_hf`` ("mimo" or "deepseek"); None: the
            layout of the checkpoint at ``hf_assets_path``, else "mimo".
    """

    def __init__(
        self,
        model_args: MTPModelArgs,
        hf_assets_path: str | None = None,
        *,
        mtp_layout: MTPLayout | None = None,
    ):
        super().__init__(model_args, hf_assets_path)
        self.model_args = model_args
        if mtp_layout is not None and mtp_layout not in MTP_LAYOUTS:
            raise ValueError(f"mtp_layout must be one of {MTP_LAYOUTS}, got {mtp_layout!r}")
        keys = checkpoint_keys(hf_assets_path) if hf_assets_path else None
        found = detect_mtp_layout(keys, model_args.n_layers) if keys else None
        self.mtp_layout: MTPLayout = mtp_layout or found or "mimo"
        # vLLM's Qwen2-based attention (MiMo, Qwen2) always has a q/k/v bias.
        qwen2_arch = self.mtp_layout == "mimo" or model_args.family in ("qwen2", "mimo")
        self.write_zero_bias = qwen2_arch and not model_args.qkv_bias
        # vLLM's MiMoMTP draft has its own (untied) lm_head and requires lm_head.weight.
        self.write_tied_lm_head = self.mtp_layout == "mimo"
        if keys is not None:
            self.write_zero_bias = not model_args.qkv_bias and any(
                k.endswith("self_attn.q_proj.bias") for k in keys
            )
            self.write_tied_lm_head = "lm_head.weight" in keys

    # ------------------------------------------------------------------ names
    def mtp_prefix(self, k: int, layout: MTPLayout | None = None) -> str:
        """HF name prefix of MTP module k (0-based), e.g. ``model.mtp_layers.0.``."""
        layout = layout or self.mtp_layout
        if layout == "mimo":
            return f"model.mtp_layers.{k}."
        return f"model.layers.{self.model_args.n_layers + k}."

    def found_mtp_modules(self, hf_keys: Iterable[str]) -> list[int]:
        """0-based indices of the MTP modules with at least one weight in ``hf_keys``."""
        n = self.model_args.n_layers
        return sorted({found[1] for key in hf_keys if (found := _mtp_index(key, n))})

    def missing_mtp_modules(self, hf_keys: Iterable[str]) -> list[int]:
        """0-based indices of the model's MTP modules with no weight at all in ``hf_keys``.

        ``from_hf`` leaves them out; the caller keeps their initialisation.
        """
        found = set(self.found_mtp_modules(hf_keys))
        return [k for k in range(self.model_args.num_mtp_modules) if k not in found]

    def hf_name(self, key: str, layout: MTPLayout | None = None) -> str:
        """HF name of one of our state-dict keys."""
        if key in _TOP_TO_HF:
            return _TOP_TO_HF[key]
        if (m := _OURS_LAYER.match(key)) and m[2] in _BLOCK_TO_HF:
            return f"model.layers.{m[1]}.{_BLOCK_TO_HF[m[2]]}"
        if m := _OURS_MTP.match(key):
            layout = layout or self.mtp_layout
            prefix = self.mtp_prefix(int(m[1]), layout)
            rest = m[2]
            if rest.startswith("block.") and rest[6:] in _BLOCK_TO_HF:
                return prefix + _BLOCK_TO_HF[rest[6:]]
            if rest in _MTP_TO_HF[layout]:
                return prefix + _MTP_TO_HF[layout][rest]
        raise KeyError(f"no HF name for state-dict key {key!r}")

    # ------------------------------------------------------------------ to HF
    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Our state dict -> HF names in ``self.mtp_layout`` (tensors shared, not copied,
        except the swapped MiMo ``input_proj`` and the zero biases)."""
        args = self.model_args
        layout = self.mtp_layout
        tied = args.enable_weight_tying
        hf: dict[str, Any] = {}
        mtp_modules: set[int] = set()
        for key, value in state_dict.items():
            if key == "output.weight" and tied and not self.write_tied_lm_head:
                continue
            name = self.hf_name(key, layout)
            if key.endswith(".eh_proj.weight") and layout == "mimo":
                value = _swap_halves(value)
            hf[name] = value
            if m := _OURS_MTP.match(key):
                mtp_modules.add(int(m[1]))
            if self.write_zero_bias and key.endswith(_QKV_WEIGHTS):
                hf[name[: -len("weight")] + "bias"] = torch.zeros(
                    value.shape[0], dtype=value.dtype, device=value.device
                )
        if layout == "deepseek":
            head = state_dict.get("output.weight", state_dict.get("tok_embeddings.weight"))
            if head is not None:
                for k in sorted(mtp_modules):
                    hf[self.mtp_prefix(k, layout) + _DEEPSEEK_HEAD] = head
        return hf

    # ---------------------------------------------------------------- from HF
    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        """HF names (either MTP layout) -> our state dict; unexpected keys raise."""
        return self.convert_from_hf(hf_state_dict)[0]

    def convert_from_hf(
        self, hf_state_dict: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """``from_hf`` plus, for each returned key, the HF name it came from."""
        args = self.model_args
        n = args.n_layers
        layout = detect_mtp_layout(hf_state_dict, n)
        out: dict[str, Any] = {}
        source: dict[str, str] = {}
        unexpected: list[str] = []
        duplicates: list[tuple[str, str]] = []  # (HF key, our key it must equal)

        def put(ours: str, key: str, value: Any) -> None:
            out[ours] = value
            source[ours] = key

        def block_key(rest: str, key: str, value: Any) -> str | None:
            """Block-relative HF name -> ours; None for a dropped zero bias."""
            ours = _BLOCK_FROM_HF.get(rest)
            if ours is None or (ours in _QK_NORMS and not args.qk_norm):
                unexpected.append(key)
                return None
            if ours in _BIASES and not args.qkv_bias:
                if bool(_full(value).any()):
                    raise ValueError(
                        f"HF checkpoint: {key} is non-zero but this model has no q/k/v "
                        f"bias (family {args.family!r}, qkv_bias=False); set qkv_bias=True"
                    )
                return None
            return ours

        for key, value in hf_state_dict.items():
            if key.endswith(_IGNORABLE_SUFFIXES):
                continue
            if key == "model.embed_tokens.weight":
                put("tok_embeddings.weight", key, value)
            elif key == "model.norm.weight":
                put("norm.weight", key, value)
            elif key == "lm_head.weight":
                if args.enable_weight_tying:
                    duplicates.append((key, "tok_embeddings.weight"))
                else:
                    put("output.weight", key, value)
            elif found := _mtp_index(key, n):
                k = found[1]
                rest = key[len(self.mtp_prefix(k, layout)) :]
                if k >= args.num_mtp_modules:
                    unexpected.append(key)
                elif rest in _MTP_FROM_HF[layout]:
                    ours = _MTP_FROM_HF[layout][rest]
                    if ours == "eh_proj.weight" and layout == "mimo":
                        value = _swap_halves(value)
                    put(f"mtp.{k}.{ours}", key, value)
                elif layout == "deepseek" and rest == _DEEPSEEK_HEAD:
                    duplicates.append((key, "output.weight"))
                elif layout == "deepseek" and rest == _DEEPSEEK_EMBED:
                    duplicates.append((key, "tok_embeddings.weight"))
                elif ours := block_key(rest, key, value):
                    put(f"mtp.{k}.block.{ours}", key, value)
            elif m := _HF_LAYER.match(key):
                if ours := block_key(m[2], key, value):
                    put(f"layers.{m[1]}.{ours}", key, value)
            else:
                unexpected.append(key)

        if unexpected:
            unexpected.sort()
            hint = ""
            extra = [k for k in self.found_mtp_modules(unexpected) if k >= args.num_mtp_modules]
            if extra:
                hint = (
                    f" (the checkpoint has MTP modules {extra} beyond the model's "
                    f"num_mtp_modules = {args.num_mtp_modules})"
                )
            raise ValueError(
                f"HF checkpoint has {len(unexpected)} unexpected key(s) for this "
                f"{args.family!r} model{hint}: {', '.join(unexpected[:8])}"
                + (", ..." if len(unexpected) > 8 else "")
            )
        if args.enable_weight_tying and "tok_embeddings.weight" in out:
            put("output.weight", source["tok_embeddings.weight"], out["tok_embeddings.weight"])
        for key, ours in duplicates:
            if ours in out and not torch.equal(_full(hf_state_dict[key]), _full(out[ours])):
                raise ValueError(
                    f"HF checkpoint: {key} differs from {source[ours]}; this model shares "
                    "one output head and one embedding between the trunk and MTP modules"
                )

        missing = self.missing_mtp_modules(hf_state_dict)
        if args.num_mtp_modules and missing:
            found = self.found_mtp_modules(hf_state_dict)
            logger.info(
                f"HF checkpoint has MTP modules {found} ({layout or 'no'} layout); the "
                f"model's MTP modules {missing} are not in it and keep their initialisation"
            )
        return out, source
