"""Tensor parallelism, activation checkpointing, compile and FSDP2 for the MTP transformer.

Applied from outside the model, TorchTitan-style. The trunk blocks and the MTP blocks get
the same TP plan as TorchTitan's Qwen3 blocks (sequence parallel between blocks). The
embedding and the output head are replicated over the TP mesh: the output head computes
exact full-vocabulary log-probs per sequence chunk (no loss-parallel), and a tied
embedding/output pair stays one parameter.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torchtitan.config import TORCH_DTYPE_MAP, JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.models.llama3.infra.parallelize import (
    apply_compile,
    disable_fsdp_gradient_division,
)
from torchtitan.tools.logging import logger

from ..platform import enable_gloo_sum_reduction
from .model import MTPTransformer, TokenStats

__all__ = [
    "SAC_SAVE_OPS",
    "apply_fsdp",
    "apply_tp",
    "dp_reduce",
    "dp_sum",
    "parallelize_mtp",
    "reduce_partial_grads",
]

# Selective (op) activation checkpointing saves these ops' outputs and recomputes the
# rest. TorchTitan 0.2.2 has no public list: each model keeps its own private
# ``_op_sac_save_list`` (models/*/infra/parallelize.py), and ``apply_ac`` without one saves
# nothing. This is Qwen3's, less the flex/varlen attention ops this model never runs.
SAC_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_attention_math.default,
    torch.ops.aten._scaled_dot_product_fused_attention_overrideable.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    torch.ops.aten.max.default,  # low precision: the absolute max sets the scale
    torch._higher_order_ops.inductor_compiled_code,  # with compile: a compiled region
}


def parallelize_mtp(
    model: MTPTransformer, parallel_dims: ParallelDims, job_config: JobConfig
) -> MTPTransformer:
    """The TrainSpec ``parallelize_fn``: TP, then AC, then compile, then FSDP2."""
    if parallel_dims.pp_enabled or parallel_dims.cp_enabled or parallel_dims.ep_enabled:
        raise ValueError(
            "torchtitan-mtp supports data parallel (FSDP/HSDP) and tensor parallel only; "
            "set parallelism.pipeline/context/expert_parallel_degree = 1"
        )
    seq_len = job_config.training.seq_len
    if seq_len % parallel_dims.seq_len_divisor:
        raise ValueError(
            f"training.seq_len = {seq_len} must be divisible by the TP degree {parallel_dims.tp}"
        )
    if parallel_dims.tp_enabled:
        apply_tp(model, parallel_dims.get_mesh("tp"))
        if not parallel_dims.fsdp_enabled:  # FSDP2 reduces them itself
            reduce_partial_grads(model)

    compile_enabled = job_config.compile.enable and "model" in job_config.compile.components
    # TorchTitan's apply_ac/apply_compile wrap the blocks of ``x.layers`` in place; the
    # MTP blocks get the same through a view, then go back into their modules.
    mtp_blocks = _BlockView(nn.ModuleDict({k: m.block for k, m in model.mtp.items()}))
    for blocks in [model, mtp_blocks] if len(model.mtp) else [model]:
        if job_config.activation_checkpoint.mode != "none":
            apply_ac(
                blocks,
                job_config.activation_checkpoint,
                model_compile_enabled=compile_enabled,
                op_sac_save_list=SAC_SAVE_OPS,
                base_folder=job_config.job.dump_folder,
            )
        if compile_enabled:
            apply_compile(blocks, job_config.compile)
    for k, module in model.mtp.items():
        module.block = mtp_blocks.layers[k]

    if parallel_dims.fsdp_enabled:
        names = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
        training = job_config.training
        apply_fsdp(
            model,
            parallel_dims.get_mesh(names),
            param_dtype=TORCH_DTYPE_MAP[training.mixed_precision_param],
            reduce_dtype=TORCH_DTYPE_MAP[training.mixed_precision_reduce],
            cpu_offload=training.enable_cpu_offload,
            reshard_after_forward_policy=job_config.parallelism.fsdp_reshard_after_forward,
        )
        logger.info("Applied FSDP2 to the trunk and the MTP modules")
    elif parallel_dims.dp_replicate_enabled:
        raise ValueError("pure DDP is not supported; use data_parallel_shard_degree (FSDP)")
    return model


class _BlockView(nn.Module):
    """A ``layers`` container that TorchTitan's apply_ac/apply_compile can walk."""

    def __init__(self, layers: nn.ModuleDict):
        super().__init__()
        self.layers = layers


def _block_tp_plan() -> dict:
    """TorchTitan's Qwen3 per-block plan (dense FFN), with plain local tensors in attention.

    Unlike TorchTitan's Qwen3 plan, q/k/v leave their projections as local tensors (the
    CPU SDPA kernel has no DTensor sharding rule) and the RoPE cache stays local; QK-norm
    runs on the local heads with a replicated weight.
    """
    local_heads_norm = SequenceParallel(sequence_dim=2, use_local_output=True)
    return {
        "attention_norm": SequenceParallel(),
        "attention": PrepareModuleInput(
            input_layouts=(Shard(1), None, None, None),
            desired_input_layouts=(Replicate(), None, None, None),
        ),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.q_norm": local_heads_norm,
        "attention.k_norm": local_heads_norm,
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
        ),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        "feed_forward.w3": ColwiseParallel(),
    }


def _embedding_input(module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
    return tuple(DTensor.from_local(x, mesh, [Replicate()]) for x in inputs)


def _embedding_output(module: nn.Module, output: DTensor, mesh: DeviceMesh) -> torch.Tensor:
    return output.redistribute(mesh, [Shard(1)]).to_local()  # [B, S / tp, D]


def _head_input(module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
    hidden, labels, *rest = inputs  # hidden: local [H, B, S / tp, D]
    hidden = DTensor.from_local(hidden, mesh, [Shard(2)]).redistribute(mesh, [Replicate()])
    if labels is not None:
        labels = DTensor.from_local(labels, mesh, [Replicate()])
    return (hidden, labels, *rest)


def _head_output(module: nn.Module, output, mesh: DeviceMesh):
    if isinstance(output, TokenStats):
        return TokenStats(*(None if t is None else t.to_local() for t in output))
    return output.to_local()


def _sequence_first_input(module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
    (x,) = inputs  # local [B, S / tp, D_in]
    return (DTensor.from_local(x.transpose(0, 1), mesh, [Shard(0)]),)  # [S, B, D_in]


def _sequence_first_output(module: nn.Module, output: DTensor, mesh: DeviceMesh) -> torch.Tensor:
    return output.to_local().transpose(0, 1).contiguous()  # [B, S / tp, D_out]


def apply_tp(model: MTPTransformer, tp_mesh: DeviceMesh) -> None:
    """Megatron-style TP with sequence parallelism on trunk and MTP blocks."""
    distribute_module(
        model.tok_embeddings,
        tp_mesh,
        input_fn=_embedding_input,
        output_fn=_embedding_output,
    )
    distribute_module(model.output, tp_mesh, input_fn=_head_input, output_fn=_head_output)
    if model.model_args.enable_weight_tying:
        model.output.weight = model.tok_embeddings.weight
    parallelize_module(model, tp_mesh, {"norm": SequenceParallel(use_local_output=True)})
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, _block_tp_plan())
    for module in model.mtp.values():
        local_sp = SequenceParallel(use_local_output=True)
        parallelize_module(
            module, tp_mesh, {"enorm": local_sp, "hnorm": local_sp, "norm": local_sp}
        )
        # A replicated linear on sequence-sharded tokens, like SequenceParallel, but with the
        # sharded sequence dim first: F.linear flattens [B, S], and torch 2.11 cannot flatten
        # a DTensor sharded on its second dim ("Attempted to flatten multiple dimensions").
        distribute_module(
            module.eh_proj,
            tp_mesh,
            input_fn=_sequence_first_input,
            output_fn=_sequence_first_output,
        )
        parallelize_module(module.block, tp_mesh, _block_tp_plan())
    logger.info("Applied tensor + sequence parallelism to the trunk and the MTP modules")


def reduce_partial_grads(model: nn.Module) -> None:
    """Pure TP: all-reduce each replicated parameter's gradient as it accumulates.

    A replicated weight applied to sequence-sharded tokens (the norms, ``eh_proj``) gets a
    ``Partial`` gradient, which DTensor reduces only when an op needs its value; but torch
    2.11's in-place ``_foreach_mul_`` (gradient clipping) multiplies a ``Partial`` tensor
    by the TP degree. Replicated gradients are exact on every torch version, at the cost
    of one small all-reduce per micro-batch (norm weights and ``eh_proj``).

    The gradient hooks are registered at the first forward: ``to_empty`` swaps the
    parameters of a model built on the meta device, and a hook registered before that
    never fires.
    """

    def register(module: nn.Module, args: tuple) -> None:
        for param in module.parameters():
            if isinstance(param, DTensor) and all(p.is_replicate() for p in param.placements):
                param.register_post_accumulate_grad_hook(_replicate_grad)
        handle.remove()

    handle = model.register_forward_pre_hook(register)


def _replicate_grad(param: DTensor) -> None:
    if param.grad.placements != param.placements:
        param.grad = param.grad.redistribute(placements=param.placements)


def apply_fsdp(
    model: MTPTransformer,
    dp_mesh: DeviceMesh,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    cpu_offload: bool = False,
    reshard_after_forward_policy: str = "default",
) -> None:
    """FSDP2: one unit per trunk block, per MTP module, for the embedding and the head.

    A tied embedding/output pair is one unit. Gradients are summed over ranks (no
    division): losses are normalised by global token counts.
    """
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    config: dict = {"mesh": dp_mesh, "mp_policy": mp_policy}
    if cpu_offload:
        config["offload_policy"] = CPUOffloadPolicy()
    if reshard_after_forward_policy not in ("default", "always", "never"):
        raise ValueError(f"Invalid reshard_after_forward_policy: {reshard_after_forward_policy}")
    reshard = reshard_after_forward_policy != "never"
    if model.model_args.enable_weight_tying:
        fully_shard([model.tok_embeddings, model.output], **config, reshard_after_forward=reshard)
    else:
        fully_shard(model.tok_embeddings, **config, reshard_after_forward=reshard)
    for block in model.layers.values():
        fully_shard(block, **config, reshard_after_forward=reshard)
    for module in model.mtp.values():
        fully_shard(module, **config, reshard_after_forward=reshard)
    if not model.model_args.enable_weight_tying:
        # The head runs last in forward and first in backward: keep it gathered by default.
        fully_shard(
            model.output,
            **config,
            reshard_after_forward=reshard_after_forward_policy == "always",
        )
    fully_shard(model, **config)
    disable_fsdp_gradient_division(model)
    enable_gloo_sum_reduction(model)


def dp_sum(x: torch.Tensor, parallel_dims: ParallelDims) -> torch.Tensor:
    """Sum ``x`` over the data-parallel ranks, in place (identity without DP)."""
    if parallel_dims.dp_enabled:
        torch.distributed.all_reduce(x, group=parallel_dims.get_mesh("batch").get_group())
    return x


S = TypeVar("S")


def dp_reduce(sums: S, parallel_dims: ParallelDims, device: torch.device | str = "cpu") -> S:
    """The one reduction of logged statistics: a copy of the dataclass ``sums`` with every
    number, list of numbers and nested dataclass field summed over the data-parallel
    ranks, in one float64 all-reduce. ``None`` fields stay ``None``; ints stay ints. Every
    rank must pass the same layout (the same fields set, lists of the same length)."""
    values: list[float] = []

    def flatten(obj) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                flatten(value)
            elif isinstance(value, (list, tuple)):
                values.extend(float(x) for x in value)
            elif value is not None:
                values.append(float(value))

    flatten(sums)
    total = dp_sum(torch.tensor(values, dtype=torch.float64, device=device), parallel_dims)
    it = iter(total.cpu().tolist())

    def cast(like, x: float):
        return round(x) if isinstance(like, int) and not isinstance(like, bool) else x

    def rebuild(obj):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                out[f.name] = rebuild(value)
            elif isinstance(value, (list, tuple)):
                out[f.name] = type(value)(cast(x, next(it)) for x in value)
            elif value is not None:
                out[f.name] = cast(value, next(it))
        return dataclasses.replace(obj, **out)

    return rebuild(sums)
