"""The trainers by name: BasicTrainer (one device) and the distributed ones, FSDPTrainer and TensorParallelTrainer.

BasicTrainer (basic_trainer.py) holds the whole training loop. The distributed trainers override
only its hooks: how models are placed on the ranks (sharded by FSDP2, or split by tensor
parallelism), which ranks see which data, gradient synchronisation and clipping, gathering and
saving. `trainer=<name>` picks one from TRAINERS; their class attributes (data_parallel,
multi_process, supports_lora, ...) are what launch, config checks and LoRA read.
"""

from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from transformers import PreTrainedModel

import checkpoints
from basic_trainer import BasicTrainer
from errors import ModelLoadError
from losses import preference_loss
from utils import DTYPES

# preference_loss: the reference scripts' trainers.py defines it, and scripts written against them import it here
__all__ = ["TRAINERS", "BasicTrainer", "FSDPTrainer", "TensorParallelTrainer", "preference_loss"]


class _DistributedTrainer(BasicTrainer):
    """What every torch.distributed trainer shares: collectives, gathered saving, synced generation."""

    multi_process = True

    @property
    def distributed(self) -> bool:
        return True

    def gather_objects(self, items: list) -> list:
        if self.data_world_size == 1:
            return items  # every rank holds the same items (tensor parallel)
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, items)
        return [item for rank_items in gathered for item in rank_items]

    def full_policy_state_dict(self) -> dict[str, torch.Tensor] | None:
        # gathered one tensor at a time into CPU memory of rank 0 only
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state_dict = get_model_state_dict(self.policy, options=options)
        return state_dict if self.is_main else None

    def save_optimizer_state(self, checkpoint_dir: Path) -> None:
        # each rank writes its own shard; no rank ever holds the whole optimizer state
        state = {"optimizer": get_optimizer_state_dict(self.policy, self.optimizer)}
        try:
            dcp.save(state, checkpoint_id=str(checkpoint_dir / checkpoints.OPTIMIZER_SHARDS))
        except CheckpointException as error:  # a failed write on any rank, reported on every rank
            raise OSError(f"the optimizer shards could not be written: {error}") from error

    def load_optimizer_state(self, checkpoint_dir: Path) -> None:
        # each rank reads the shard it owns into the state dict's layout, then applies it
        state = {"optimizer": get_optimizer_state_dict(self.policy, self.optimizer)}
        dcp.load(state, checkpoint_id=str(checkpoint_dir / checkpoints.OPTIMIZER_SHARDS))
        set_optimizer_state_dict(self.policy, self.optimizer, state["optimizer"])

    def mesh(self) -> DeviceMesh:
        return init_device_mesh(self.device.type, (self.world_size,))


class FSDPTrainer(_DistributedTrainer):
    """Fully sharded data parallel (FSDP2): each rank holds a shard of every parameter.

    Every transformer block is its own FSDP unit, so only one block's full weights
    are gathered at a time. The reference model is sharded the same way.
    """

    data_parallel = True
    supports_4bit = False
    param_dtype_key = "model.fsdp_policy_mp"  # FSDP's mixed precision: parameters compute in this dtype

    def distribute(self, model: PreTrainedModel) -> nn.Module:
        mp_dtype = self.config.model.fsdp_policy_mp
        mixed_precision = (
            MixedPrecisionPolicy(param_dtype=DTYPES[mp_dtype], reduce_dtype=torch.float32)
            if mp_dtype
            else MixedPrecisionPolicy()
        )
        mesh = self.mesh()
        blocks = self.transformer_blocks(model)
        for block in blocks:
            fully_shard(
                block,
                mesh=mesh,
                mp_policy=mixed_precision,
                reshard_after_forward=self.config.fsdp.reshard_after_forward,
            )
        fully_shard(model, mesh=mesh, mp_policy=mixed_precision)
        depth = self.config.fsdp.prefetch_blocks
        if depth > 0:
            # all-gather the next blocks' weights while this one computes (backward runs in reverse)
            for i, block in enumerate(blocks):
                block.set_modules_to_forward_prefetch(blocks[i + 1 : i + 1 + depth])
                block.set_modules_to_backward_prefetch(blocks[max(i - depth, 0) : i][::-1])
        return model

    def set_gradient_sync(self, enabled: bool) -> None:
        self.policy.set_requires_gradient_sync(enabled)

    def release_gathered_weights(self, model: nn.Module) -> None:
        # Without a backward, FSDP2 leaves the root's parameters gathered, and every block's too
        # when fsdp.reshard_after_forward is false; reshard() covers one module's own parameters.
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


class TensorParallelTrainer(_DistributedTrainer):
    """Tensor parallel: every rank holds a slice of each attention and MLP weight matrix.

    All ranks see the same data. Uses the model's own tensor-parallel plan
    (transformers' `base_model_tp_plan`: column-wise then row-wise linear layers),
    applied with PyTorch's native DTensor `parallelize_module`.
    """

    supports_lora = False  # the tensor-parallel plan splits the very linear layers LoRA wraps
    supports_4bit = False
    STYLES = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}

    def parallel_plan(self, model: PreTrainedModel) -> dict:
        plan = getattr(model.config, "base_model_tp_plan", None) or {}
        if not plan:
            raise ModelLoadError(f"{type(model).__name__} has no tensor-parallel plan; use trainer=FSDPTrainer.")
        unsupported = {style for style in plan.values() if style not in self.STYLES}
        if unsupported:
            raise ModelLoadError(
                f"{type(model).__name__}'s tensor-parallel plan uses {sorted(unsupported)}; "
                "only colwise/rowwise are supported. Use trainer=FSDPTrainer."
            )
        prefix = model.base_model_prefix
        return {f"{prefix}.{pattern}": self.STYLES[style]() for pattern, style in plan.items()}

    def distribute(self, model: PreTrainedModel) -> nn.Module:
        config = model.config
        for key in ("num_attention_heads", "num_key_value_heads"):
            heads = getattr(config, key, None)
            if heads is not None and heads % self.world_size:
                raise ModelLoadError(f"{key}={heads} is not divisible by the {self.world_size} tensor-parallel ranks.")
        model.to(self.device)
        return parallelize_module(model, self.mesh(), self.parallel_plan(model))

    def clip_gradients(self) -> torch.Tensor:
        # torch's clip_grad_norm_ cannot mix sharded DTensor gradients with the plain
        # gradients of replicated parameters (embeddings, norms), so add up squares here:
        # shards once per rank (then summed over ranks), replicated tensors once in total.
        grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
        sharded_sq = torch.zeros((), dtype=torch.float32, device=self.device)
        replicated_sq = torch.zeros((), dtype=torch.float32, device=self.device)
        for grad in grads:
            if isinstance(grad, DTensor) and any(p.is_shard() for p in grad.placements):
                sharded_sq += grad.to_local().float().pow(2).sum()
            else:
                replicated_sq += (grad.to_local() if isinstance(grad, DTensor) else grad).float().pow(2).sum()
        dist.all_reduce(sharded_sq)
        total_norm = (sharded_sq + replicated_sq).sqrt()
        scale = (self.config.max_grad_norm / (total_norm + 1e-6)).clamp(max=1.0)
        for grad in grads:
            (grad.to_local() if isinstance(grad, DTensor) else grad).mul_(scale)
        return total_norm


# trainer=<name> picks one of these
TRAINERS: dict[str, type[BasicTrainer]] = {
    trainer.__name__: trainer for trainer in (BasicTrainer, FSDPTrainer, TensorParallelTrainer)
}
