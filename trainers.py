"""Trainers for SFT and preference optimization.

BasicTrainer trains on one device and holds the whole training loop. FSDPTrainer and
TensorParallelTrainer override only what differs: wrapping the models, which ranks see
which data, gradient synchronisation, generation and saving.
"""

import hashlib
import itertools
import json
import os
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
import tqdm
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
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from losses import IGNORE_INDEX, labelled_tokens, preference_loss, sequence_logps, sequence_logps_from_hidden
from models import TRAINER_STATE_FILE, ModelLoadError, block_class_name, weights_fingerprint, write_checkpoint
from preference_datasets import collate_prompts, iterate_batches, packed_batch, padded_batch
from utils import DTYPES, MetricSums, uses_reference_model

__all__ = ["BasicTrainer", "FSDPTrainer", "TensorParallelTrainer", "preference_loss"]

Batch = dict[str, torch.Tensor]


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "RMSprop":
        return torch.optim.RMSprop(params, lr=lr)
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=lr)
    if name == "Adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"optimizer={name}: expected RMSprop, AdamW or Adam.")


def split_evenly(items: list, parts: int) -> list[list]:
    """Split a list into `parts` contiguous chunks whose sizes differ by at most one."""
    size, extra = divmod(len(items), parts)
    chunks, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        chunks.append(items[start:end])
        start = end
    return chunks


def training_order(config: DictConfig, n_train: int) -> Iterator[list[int]]:
    """Positions of the training examples in each global batch, in training order (fixed by seed)."""
    return iterate_batches(
        list(range(n_train)),
        batch_size=config.batch_size,
        shuffle=True,
        seed=config.seed,
        n_epochs=config.n_epochs,
        n_examples=config.n_examples,
        drop_last=True,
    )


def reference_logps_examples(config: DictConfig, examples: Sequence[dict], split: str) -> tuple[list[int], Sequence[dict]]:
    """The positions, and the examples, whose reference log-probs a run needs.

    All of the eval set; of the train set only what the run trains on, so that a short run
    (n_examples) over a large dataset does not score all of it first.
    """
    if split == "eval":
        positions = list(range(len(examples)))
    else:
        positions = sorted({i for batch in training_order(config, len(examples)) for i in batch})
    return positions, examples.select(positions)


def reference_logps_cache_file(config: DictConfig, examples: Sequence[dict]) -> Path | None:
    """Where precomputed reference log-probs of these examples are cached; None without cache_dir.

    The key covers everything the values depend on: the reference weights (see
    models.weights_fingerprint), their dtype and compute precision, the tokenized examples,
    and whether IPO's length averaging applies.
    """
    if config.cache_dir is None:
        return None
    key = {
        "format": 1,
        "weights": weights_fingerprint(config.model, config.seed),
        "reference_dtype": config.model.reference_dtype,
        "autocast_dtype": config.autocast_dtype,
        "fsdp_policy_mp": config.model.fsdp_policy_mp if config.trainer == "FSDPTrainer" else None,
        "average": config.loss.name == "ipo" and config.loss.average_log_prob,
        "examples": examples.fingerprint,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return Path(config.cache_dir) / "reference_logps" / f"{digest}.safetensors"


class BasicTrainer:
    """Trains the policy on one device (a GPU when there is one, else the CPU)."""

    def __init__(
        self,
        config: DictConfig,
        policy: PreTrainedModel,
        reference_model: PreTrainedModel | None,
        tokenizer,
        train_examples: Sequence[dict],
        eval_examples: Sequence[dict],
        run_dir: Path,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.config = config
        self.loss_config = config.loss
        self.tokenizer = tokenizer
        self.run_dir = run_dir
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.is_main = rank == 0
        self.uses_reference = uses_reference_model(config.loss)
        if reference_model is not None and not self.uses_reference:
            raise ValueError("A reference model was given, but the loss uses none (loss=sft or loss.reference_free=true).")

        self.train_examples = train_examples
        # every data-parallel rank gets the same share of every eval batch
        self.eval_examples = eval_examples[: len(eval_examples) - len(eval_examples) % self.data_world_size]
        self.policy = self.wrap_policy(policy)
        self.reference_model = self.wrap_reference(reference_model) if reference_model is not None else None
        self.chunked_logps = config.logps_chunk_tokens is not None and self.logits_are_projected_hidden_states()
        self.reference_logps: dict[str, torch.Tensor] | None = None
        if self.uses_reference and config.precompute_ref_logps:
            self.reference_logps = {
                "train": self.load_or_compute_reference_logps(self.train_examples, "train"),
                "eval": self.load_or_compute_reference_logps(self.eval_examples, "eval"),
            }
            self.reference_model = None  # its work is done: free its memory before training
        elif self.uses_reference and self.reference_model is None:
            raise ValueError(f"loss={config.loss.name} needs a reference model.")
        self.optimizer = make_optimizer(config.optimizer, [p for p in self.policy.parameters() if p.requires_grad], config.lr)
        warmup = config.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))

        self.examples_seen = 0
        self.optimizer_steps = 0
        self.wandb_run = None
        if config.resume_from is not None:
            self.resume(Path(config.resume_from))

    # ----- what distributed trainers override -----------------------------------------

    @property
    def data_rank(self) -> int:
        """Index of this process among those that see different data."""
        return 0

    @property
    def data_world_size(self) -> int:
        """Number of processes that see different data (data-parallel degree)."""
        return 1

    @property
    def distributed(self) -> bool:
        return False

    def distribute(self, model: PreTrainedModel) -> nn.Module:
        """Place a model on this trainer's device(s): moved here, sharded or split by subclasses."""
        return model.to(self.device)

    def wrap_policy(self, policy: PreTrainedModel) -> nn.Module:
        if self.config.activation_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            policy.config.use_cache = False
        policy = self.distribute(policy)
        self.compile_blocks(policy)
        return policy

    def wrap_reference(self, reference_model: PreTrainedModel) -> nn.Module:
        reference_model.requires_grad_(False)
        reference_model.eval()
        reference_model = self.distribute(reference_model)
        self.compile_blocks(reference_model)
        return reference_model

    def compile_blocks(self, model: nn.Module) -> None:
        """torch.compile each transformer block in place (state-dict names stay unchanged).

        Blocks rather than the whole model: each compiles once and is reused by every layer,
        graph breaks stay local, and it composes with FSDP2 and tensor-parallel wrapping.
        """
        backend = self.config.compile_backend
        if backend is None:
            return
        for block in self.transformer_blocks(model):
            block.compile(backend=backend, dynamic=True)

    def transformer_blocks(self, model: nn.Module) -> list[nn.Module]:
        block_name = block_class_name(model, self.config.model.block_name)
        blocks = [m for m in model.modules() if type(m).__name__ == block_name]
        if not blocks:
            raise ModelLoadError(f"model.block_name={block_name}: no module of that class in {type(model).__name__}.")
        return blocks

    def set_gradient_sync(self, enabled: bool) -> None:
        """Distributed trainers skip gradient communication on all but the last micro-batch."""

    def release_gathered_weights(self, model: nn.Module) -> None:
        """After a forward with no backward (eval, reference, generation): free gathered shards (FSDP)."""

    def clip_gradients(self) -> torch.Tensor:
        """Clip to max_grad_norm; return the total norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.config.max_grad_norm)

    def gather_objects(self, items: list) -> list:
        """All ranks' lists concatenated, in rank order (only meaningful on rank 0)."""
        return items

    def barrier(self) -> None:
        """Wait for all ranks."""

    def full_policy_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full, unsharded policy weights on the CPU of rank 0 (None elsewhere)."""
        return {k: v.detach().cpu() for k, v in self.policy.state_dict().items()}

    def save_optimizer_state(self, checkpoint_dir: Path) -> None:
        torch.save(self.optimizer.state_dict(), checkpoint_dir / "optimizer.pt")

    def load_optimizer_state(self, checkpoint_dir: Path) -> None:
        self.optimizer.load_state_dict(torch.load(checkpoint_dir / "optimizer.pt", map_location=self.device, weights_only=True))

    def generate(self, model: nn.Module, prompts: Batch) -> torch.Tensor:
        """Completions for left-padded prompts: (batch, prompt_len + new_tokens)."""
        sampling = self.config.sampling
        max_new_tokens = min(sampling.max_new_tokens, self.config.max_length - prompts["prompt_input_ids"].shape[1])
        sequences = model.generate(
            input_ids=prompts["prompt_input_ids"],
            attention_mask=prompts["prompt_attention_mask"],
            max_new_tokens=max(max_new_tokens, 1),
            do_sample=not sampling.greedy,
            top_p=sampling.top_p if not sampling.greedy else None,
            pad_token_id=self.tokenizer.pad_token_id,
            synced_gpus=self.distributed,  # keep every rank stepping until all are done
        )
        self.release_gathered_weights(model)
        return sequences

    # ----- the training loop -------------------------------------------------------

    def train(self) -> None:
        """Train for n_epochs / n_examples, evaluating every eval_every examples and at the end."""
        self.start_logging()
        if self.config.do_first_eval and self.examples_seen == 0:
            self.evaluate()
        last_eval_at = self.examples_seen
        window, window_examples, window_start = MetricSums(), 0, time.time()
        for batch in self.train_batches():
            window.merge(self.train_step(batch))
            window_examples += len(batch)
            if time.time() - window_start >= self.config.minimum_log_interval_secs:
                self.log_train_window(window, window_examples, time.time() - window_start)
                window, window_examples, window_start = MetricSums(), 0, time.time()
            if self.examples_seen // self.config.eval_every > last_eval_at // self.config.eval_every:
                self.evaluate()
                self.save_checkpoint(f"step-{self.examples_seen}")
                last_eval_at = self.examples_seen
        if window_examples:
            self.log_train_window(window, window_examples, time.time() - window_start)
        if last_eval_at != self.examples_seen or not self.config.do_first_eval and self.examples_seen == 0:
            self.evaluate()
        self.save_checkpoint("LATEST")
        self.finish_logging()

    def train_batches(self):
        """Global training batches (lists of batch_size examples), with a progress bar on rank 0."""
        total = len(self.train_examples) * self.config.n_epochs
        if self.config.n_examples is not None:
            total = min(total, self.config.n_examples)
        with tqdm.tqdm(total=total, desc="train", unit="ex", disable=not self.is_main, dynamic_ncols=True) as bar:
            bar.update(self.examples_seen)
            batches = training_order(self.config, len(self.train_examples))
            for indices in itertools.islice(batches, self.optimizer_steps, None):  # those not yet trained on
                yield [self.train_examples[i] for i in indices]
                bar.update(len(indices))

    def train_step(self, batch: list[dict]) -> MetricSums:
        """One optimizer step on a global batch; returns its metrics summed over ranks."""
        micro_batches = split_evenly(self.local_share(batch), self.config.gradient_accumulation_steps)
        # Each micro-batch's loss is its sum divided by the weight of the WHOLE global batch,
        # so accumulation and data parallelism give exactly the full-batch mean. Data-parallel
        # gradient reduction averages over ranks, hence the factor data_world_size.
        total_weight = self.global_loss_weight(micro_batches)
        metrics = MetricSums()
        for i, micro_batch in enumerate(micro_batches):
            self.set_gradient_sync(i == len(micro_batches) - 1)
            loss_sum = self.loss_and_metrics(self.policy, micro_batch, metrics, "train")
            (loss_sum * self.data_world_size / total_weight).backward()
        grad_norm = self.clip_gradients()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.examples_seen += len(batch)
        self.optimizer_steps += 1

        step_metrics = metrics.summed_over_ranks(self.device, self.data_world_size > 1)
        step_metrics.add("grad_norm", torch.as_tensor(float(grad_norm)))
        return step_metrics

    def local_share(self, batch: list[dict]) -> list[dict]:
        """This rank's contiguous share of a global batch."""
        return split_evenly(batch, self.data_world_size)[self.data_rank]

    def loss_weights(self, examples: list[dict]) -> torch.Tensor:
        """Per-example weight of each example's loss in the batch mean: (batch,).

        Token counts for per-token-mean SFT, so every target token counts the same;
        otherwise 1 per example (per sequence for SFT, per pair for DPO/IPO).
        """
        if self.loss_config.name == "sft" and self.loss_config.per_token_mean:
            return torch.tensor([labelled_tokens(e["chosen_labels"]) for e in examples], dtype=torch.float64)
        return torch.ones(len(examples), dtype=torch.float64)

    def global_loss_weight(self, micro_batches: list[list[dict]]) -> float:
        weights = MetricSums()
        for micro_batch in micro_batches:
            weights.add("weight", self.loss_weights(micro_batch))
        return weights.summed_over_ranks(self.device, self.data_world_size > 1).sums["weight"]

    def loss_and_metrics(self, model: nn.Module, examples: list[dict], metrics: MetricSums, split: str) -> torch.Tensor:
        """Forward pass(es) on a micro-batch of examples; adds its metrics and returns the summed loss."""
        if self.loss_config.name == "sft":
            logps, _ = self.sequence_logps(model, [e["chosen_input_ids"] for e in examples], [e["chosen_labels"] for e in examples])
            losses = -logps
            weights = self.loss_weights(examples).to(self.device)
            metrics.add(f"logps_{split}/chosen", logps)
            metrics.add(f"loss/{split}", losses, count=weights.sum())
            return losses.sum()

        average = self.loss_config.name == "ipo" and self.loss_config.average_log_prob
        policy_chosen, policy_rejected = self.pair_logps(model, examples, average)
        reference_chosen, reference_rejected = self.reference_pair_logps(examples, split, average)
        losses, chosen_rewards, rejected_rewards = preference_loss(
            policy_chosen,
            policy_rejected,
            reference_chosen,
            reference_rejected,
            beta=self.loss_config.beta,
            label_smoothing=self.loss_config.label_smoothing if self.loss_config.name == "dpo" else 0.0,
            ipo=self.loss_config.name == "ipo",
            reference_free=self.loss_config.reference_free,
        )
        metrics.add(f"rewards_{split}/chosen", chosen_rewards)
        metrics.add(f"rewards_{split}/rejected", rejected_rewards)
        metrics.add(f"rewards_{split}/accuracies", (chosen_rewards > rejected_rewards).double())
        metrics.add(f"rewards_{split}/margins", chosen_rewards - rejected_rewards)
        metrics.add(f"logps_{split}/chosen", policy_chosen)
        metrics.add(f"logps_{split}/rejected", policy_rejected)
        metrics.add(f"loss/{split}", losses)
        return losses.sum()

    def pair_logps(self, model: nn.Module, examples: list[dict], average: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen and rejected log-probs from ONE forward pass over both: ((batch,), (batch,))."""
        sides = ("chosen", "rejected")
        logps, _ = self.sequence_logps(
            model,
            [e[f"{side}_input_ids"] for side in sides for e in examples],
            [e[f"{side}_labels"] for side in sides for e in examples],
            average=average,
        )
        return logps[: len(examples)], logps[len(examples):]

    def reference_pair_logps(self, examples: list[dict], split: str, average: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference model's chosen and rejected log-probs: precomputed, computed now, or zero."""
        if self.reference_logps is not None:
            table = self.reference_logps[split][[e["index"] for e in examples]].to(self.device)
            return table[:, 0], table[:, 1]
        if self.reference_model is None:
            zeros = torch.zeros(len(examples), device=self.device)
            return zeros, zeros
        with torch.no_grad():
            return self.pair_logps(self.reference_model, examples, average)

    def sequence_logps(
        self, model: nn.Module, input_ids: list[list[int]], labels: list[list[int]], average: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities of the labelled tokens of each sequence: ((n,), (n,) token counts).

        The sequences go through the model padded, or packed when `packing` is on; the output
        projection runs in chunks over labelled positions only when `logps_chunk_tokens` is set.
        """
        if self.config.packing:
            batch = packed_batch(input_ids, labels, self.tokenizer.pad_token_id, self.config.max_length)
        else:
            batch = padded_batch(input_ids, labels, self.tokenizer.pad_token_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        labels_tensor, sequence_ids = batch.pop("labels"), batch.pop("sequence_ids", None)
        n_sequences = len(input_ids)
        with self.autocast():
            if self.chunked_logps:
                # the vocabulary projection is ours: the model computes its last hidden states
                # (and, with logits_to_keep=1, the logits of one position only)
                outputs = model(**batch, use_cache=False, output_hidden_states=True, logits_to_keep=1)
                head = model.get_output_embeddings()
                result = sequence_logps_from_hidden(
                    outputs.hidden_states[-1], head.weight, head.bias, labels_tensor, self.config.logps_chunk_tokens,
                    average, sequence_ids, n_sequences,
                )
            else:
                logits = model(**batch, use_cache=False).logits
                result = sequence_logps(logits, labels_tensor, average, sequence_ids, n_sequences)
        if not torch.is_grad_enabled():
            self.release_gathered_weights(model)
        return result

    @torch.no_grad()
    def logits_are_projected_hidden_states(self) -> bool:
        """Whether the policy's logits are exactly its output layer applied to its last hidden states.

        Chunked log-probs rely on it. A few models post-process logits (Gemma 2's soft-capping,
        Cohere's logit scale); for those the full logits are used instead.
        """
        input_ids = torch.full((1, 2), self.tokenizer.eos_token_id, device=self.device)
        with self.autocast():
            outputs = self.policy(input_ids=input_ids, use_cache=False, output_hidden_states=True)
            head = self.policy.get_output_embeddings()
            projected = F.linear(outputs.hidden_states[-1], head.weight, head.bias)
        self.release_gathered_weights(self.policy)
        matches = torch.allclose(projected.float(), outputs.logits.float(), rtol=1e-3, atol=1e-3)
        if not matches and self.is_main:
            print(f"note: {type(self.policy).__name__} post-processes its logits; logps_chunk_tokens is ignored", flush=True)
        return matches

    def autocast(self):
        """torch.autocast in autocast_dtype for forward passes; a no-op when it is null."""
        dtype = self.config.autocast_dtype
        return torch.autocast(self.device.type, dtype=DTYPES[dtype] if dtype else None, enabled=dtype is not None)

    # ----- precomputed reference log-probs -------------------------------------------

    def load_or_compute_reference_logps(self, examples: Sequence[dict], split: str) -> torch.Tensor:
        """The reference model's (chosen, rejected) log-probs of the examples: (len(examples), 2).

        Only the examples this run will use are scored (see reference_logps_examples); the
        others hold NaN. Read from the cache when an earlier run with the same reference
        weights, data and tokenization scored them; otherwise computed now (and cached by rank 0).
        """
        positions, used = reference_logps_examples(self.config, examples, split)
        table = torch.full((len(examples), 2), float("nan"))
        path = reference_logps_cache_file(self.config, used)
        if path is not None and path.is_file():
            if self.is_main:
                print(f"reference log-probs ({split}): loaded from {path}", flush=True)
            table[positions] = load_file(path)["logps"]
            return table
        if self.reference_model is None:
            raise ValueError(f"No cached reference log-probs for the {split} split and no reference model to compute them.")
        logps = self.compute_reference_logps(used, split)
        if path is not None and self.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + f".partial-{os.getpid()}")
            save_file({"logps": logps}, partial)
            os.replace(partial, path)  # never a half-written file under the final name
            print(f"reference log-probs ({split}): cached in {path}", flush=True)
        table[positions] = logps
        return table

    @torch.no_grad()
    def compute_reference_logps(self, examples: Sequence[dict], split: str) -> torch.Tensor:
        """One pass of the reference model over the examples, each data rank taking its share."""
        average = self.loss_config.name == "ipo" and self.loss_config.average_log_prob
        share = split_evenly(list(range(len(examples))), self.data_world_size)[self.data_rank]
        per_batch = max(self.config.eval_batch_size // self.data_world_size, 1)
        # every rank runs the same number of forward passes (sharded models need all ranks)
        n_batches = max(-(-len(examples) // (per_batch * self.data_world_size)), 1)
        computed = []
        chunks = split_evenly(share, n_batches)
        for chunk in tqdm.tqdm(chunks, desc=f"reference log-probs ({split})", disable=not self.is_main, dynamic_ncols=True):
            batch = [examples[i] for i in chunk or [0]]  # an empty share still takes part in the collectives
            chosen, rejected = self.pair_logps(self.reference_model, batch, average)
            if chunk:
                computed.append((chunk, torch.stack([chosen, rejected], dim=1).float().cpu()))
        table = torch.full((len(examples), 2), float("nan"))
        for indices, values in self.gather_objects(computed):
            table[indices] = values
        return table

    # ----- evaluation ----------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Loss and reward metrics on the eval set, plus samples when sample_during_eval."""
        self.policy.eval()
        metrics = MetricSums()
        eval_batches = iterate_batches(
            self.eval_examples, batch_size=self.config.eval_batch_size, shuffle=False, seed=0, n_epochs=1, drop_last=False
        )
        with torch.no_grad():
            for batch in tqdm.tqdm(eval_batches, desc="eval", disable=not self.is_main, leave=False, dynamic_ncols=True):
                self.loss_and_metrics(self.policy, self.local_share(batch), metrics, "eval")
        results = metrics.summed_over_ranks(self.device, self.data_world_size > 1).averages()
        if self.config.sample_during_eval and self.config.n_eval_model_samples > 0:
            self.write_samples(self.sample())
        self.policy.train()
        self.log(results)
        if self.is_main:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in results.items())
            print(f"eval after {self.examples_seen} examples: {shown}", flush=True)
        return results

    def sample(self) -> list[dict]:
        """Completions of the first n_eval_model_samples eval prompts, gathered on rank 0."""
        unique = list({e["prompt"]: e for e in self.eval_examples}.values())[: self.config.n_eval_model_samples]
        share = split_evenly(unique, self.data_world_size)
        # every rank must generate the same number of batches, even with an empty or short share
        n_batches = -(-max(len(s) for s in share) // max(self.config.eval_batch_size // self.data_world_size, 1))
        mine = share[self.data_rank]
        samples = []
        for chunk in split_evenly(mine or unique[:1], n_batches):
            chunk = chunk or (mine or unique)[:1]
            prompts = {k: v.to(self.device) for k, v in collate_prompts(chunk, self.tokenizer.pad_token_id).items()}
            completions = {"policy": self.decode_new_tokens(self.generate(self.policy, prompts), prompts)}
            if self.reference_model is not None:
                completions["reference"] = self.decode_new_tokens(self.generate(self.reference_model, prompts), prompts)
            if mine:
                for i, example in enumerate(chunk):
                    samples.append({"prompt": example["prompt"], **{k: v[i] for k, v in completions.items()}})
        return self.gather_objects(samples)

    def decode_new_tokens(self, sequences: torch.Tensor, prompts: Batch) -> list[str]:
        new_tokens = sequences[:, prompts["prompt_input_ids"].shape[1]:]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    def write_samples(self, samples: list[dict]) -> None:
        if not self.is_main:
            return
        samples_dir = self.run_dir / "samples"
        samples_dir.mkdir(exist_ok=True)
        with open(samples_dir / f"examples-{self.examples_seen}.jsonl", "w") as f:
            for sample in samples:
                f.write(json.dumps(sample) + "\n")
        if self.wandb_run is not None:
            import wandb

            columns = ["prompt"] + [k for k in samples[0] if k != "prompt"] if samples else ["prompt"]
            table = wandb.Table(columns=columns, data=[[s[c] for c in columns] for s in samples])
            self.wandb_run.log({"samples": table}, step=self.examples_seen)

    # ----- logging ------------------------------------------------------------------

    def start_logging(self) -> None:
        if not self.is_main:
            return
        self.metrics_path = self.run_dir / "metrics.jsonl"
        wandb_config = self.config.wandb
        if wandb_config.enabled and not self.config.debug:
            import wandb

            self.wandb_run = wandb.init(
                entity=wandb_config.entity,
                project=wandb_config.project,
                name=self.run_dir.name,
                dir=str(self.run_dir),
                mode=wandb_config.mode,
                config=OmegaConf.to_container(self.config, resolve=True),
            )

    def finish_logging(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()

    def log_train_window(self, window: MetricSums, n_examples: int, seconds: float) -> None:
        """Log exact averages over the optimizer steps since the last log line."""
        self.log({**window.averages(), "examples_per_second": n_examples / seconds})

    def log(self, metrics: dict[str, float]) -> None:
        """Append one line to metrics.jsonl (and wandb), against explicit counters."""
        if not self.is_main:
            return
        record = {"counters/examples": self.examples_seen, "counters/updates": self.optimizer_steps, **metrics}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(record, step=self.examples_seen)

    # ----- checkpoints --------------------------------------------------------------

    def resume(self, checkpoint_dir: Path) -> None:
        """Continue a run from its checkpoint: optimizer, scheduler, counters and RNG states.

        The policy's weights were loaded from the same folder (train.py); training then skips
        the batches already trained on, which the seed fixes, so the continued run takes the
        same steps as one that was never interrupted.
        """
        trainer_state = torch.load(checkpoint_dir / TRAINER_STATE_FILE, weights_only=True)
        self.load_optimizer_state(checkpoint_dir)
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        self.examples_seen = trainer_state["examples_seen"]
        self.optimizer_steps = trainer_state["optimizer_steps"]
        torch.set_rng_state(trainer_state["torch_rng"])
        random.setstate(trainer_state["python_rng"])
        if self.is_main:
            print(f"resumed from {checkpoint_dir} after {self.examples_seen} examples ({self.optimizer_steps} optimizer steps)", flush=True)

    def save_checkpoint(self, name: str) -> None:
        """Write <run_dir>/<name>/: a Hugging Face model folder plus the state a resume needs."""
        if self.config.debug:
            return
        tmp_dir = self.run_dir / f"{name}.partial"
        if self.is_main:
            tmp_dir.mkdir(exist_ok=True)
        self.barrier()
        self.save_optimizer_state(tmp_dir)
        state_dict = self.full_policy_state_dict()
        if self.is_main:
            trainer_state = {
                "examples_seen": self.examples_seen,
                "optimizer_steps": self.optimizer_steps,
                "scheduler": self.scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate(),
                "config": OmegaConf.to_container(self.config, resolve=True),
            }
            write_checkpoint(self.run_dir / name, tmp_dir, self.policy, state_dict, self.tokenizer, trainer_state)
            print(f"saved {self.run_dir / name}", flush=True)
        self.barrier()


class _DistributedTrainer(BasicTrainer):
    """What every torch.distributed trainer shares: collectives, gathered saving, synced generation."""

    @property
    def distributed(self) -> bool:
        return True

    def gather_objects(self, items: list) -> list:
        if self.data_world_size == 1:
            return items  # every rank holds the same items (tensor parallel)
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, items)
        return [item for rank_items in gathered for item in rank_items]

    def barrier(self) -> None:
        dist.barrier()

    def full_policy_state_dict(self) -> dict[str, torch.Tensor] | None:
        # gathered one tensor at a time into CPU memory of rank 0 only
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state_dict = get_model_state_dict(self.policy, options=options)
        return state_dict if self.is_main else None

    def save_optimizer_state(self, checkpoint_dir: Path) -> None:
        # each rank writes its own shard; no rank ever holds the whole optimizer state
        state = {"optimizer": get_optimizer_state_dict(self.policy, self.optimizer)}
        dcp.save(state, checkpoint_id=str(checkpoint_dir / "optimizer"))

    def load_optimizer_state(self, checkpoint_dir: Path) -> None:
        # each rank reads the shard it owns into the state dict's layout, then applies it
        state = {"optimizer": get_optimizer_state_dict(self.policy, self.optimizer)}
        dcp.load(state, checkpoint_id=str(checkpoint_dir / "optimizer"))
        set_optimizer_state_dict(self.policy, self.optimizer, state["optimizer"])

    def mesh(self) -> DeviceMesh:
        return init_device_mesh(self.device.type, (self.world_size,))


class FSDPTrainer(_DistributedTrainer):
    """Fully sharded data parallel (FSDP2): each rank holds a shard of every parameter.

    Every transformer block is its own FSDP unit, so only one block's full weights
    are gathered at a time. The reference model is sharded the same way.
    """

    @property
    def data_rank(self) -> int:
        return self.rank

    @property
    def data_world_size(self) -> int:
        return self.world_size

    def distribute(self, model: PreTrainedModel) -> nn.Module:
        mp_dtype = self.config.model.fsdp_policy_mp
        mixed_precision = MixedPrecisionPolicy(param_dtype=DTYPES[mp_dtype], reduce_dtype=torch.float32) if mp_dtype else MixedPrecisionPolicy()
        mesh = self.mesh()
        blocks = self.transformer_blocks(model)
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=mixed_precision, reshard_after_forward=self.config.fsdp.reshard_after_forward)
        fully_shard(model, mesh=mesh, mp_policy=mixed_precision)
        depth = self.config.fsdp.prefetch_blocks
        if depth > 0:
            # all-gather the next blocks' weights while this one computes (backward runs in reverse)
            for i, block in enumerate(blocks):
                block.set_modules_to_forward_prefetch(blocks[i + 1:i + 1 + depth])
                block.set_modules_to_backward_prefetch(blocks[max(i - depth, 0):i][::-1])
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

    STYLES = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}

    def parallel_plan(self, model: PreTrainedModel) -> dict:
        plan = getattr(model.config, "base_model_tp_plan", None) or {}
        if not plan:
            raise ModelLoadError(f"{type(model).__name__} has no tensor-parallel plan; use trainer=FSDPTrainer.")
        unsupported = {style for style in plan.values() if style not in self.STYLES}
        if unsupported:
            raise ModelLoadError(f"{type(model).__name__}'s tensor-parallel plan uses {sorted(unsupported)}; only colwise/rowwise are supported. Use trainer=FSDPTrainer.")
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
