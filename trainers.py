"""Trainers for SFT and preference optimization: the training loop, and how it runs on one device or many.

BasicTrainer trains on one device and holds the whole loop, in the order data flows through
it: construction, the loop (train, train_step, evaluate, sample), forward passes, reference
precompute, checkpoints, then the hooks that FSDPTrainer and TensorParallelTrainer override
(wrapping the models, which ranks see which data, gradient synchronisation, saving).
"""

import itertools
import math
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
import tqdm
from omegaconf import DictConfig, OmegaConf
from peft import PeftModel
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
import lora
import stopping
from batching import (
    collate_prompts,
    iterate_batches,
    packed_batch,
    padded_batch,
    rank_batches,
    split_evenly,
    training_order,
)
from chat_templates import stop_token_ids, with_answer
from errors import ModelLoadError
from losses import LossSpec, labelled_tokens, preference_loss, sequence_logps, sequence_logps_from_hidden
from models import block_class_name
from optimization import make_optimizer, make_scheduler
from reference_logps import ReferencePlan
from run_log import MetricSums, RunLog
from shared_prompt import attention_accepts_shared_prompt_mask, shared_prompt_batch, shared_prompt_logps
from utils import DTYPES

__all__ = ["BasicTrainer", "FSDPTrainer", "TensorParallelTrainer", "preference_loss"]

Batch = dict[str, torch.Tensor]


@dataclass
class _LogWindow:
    """Training metrics since the last log line: exact sums, examples and wall time."""

    metrics: MetricSums = field(default_factory=MetricSums)
    n_examples: int = 0
    start: float = field(default_factory=time.time)

    def add(self, step_metrics: MetricSums, n_examples: int) -> None:
        self.metrics.merge(step_metrics)
        self.n_examples += n_examples

    def seconds(self) -> float:
        return time.time() - self.start


class BasicTrainer:
    """Trains the policy on one device (a GPU when there is one, else the CPU)."""

    def __init__(
        self,
        config: DictConfig,
        loss: LossSpec,
        policy: PreTrainedModel,
        reference_model: PreTrainedModel | None,
        reference_plan: ReferencePlan | None,
        tokenizer,
        train_examples: Sequence[dict],
        eval_examples: Sequence[dict],
        run_dir: Path,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        reference_is_adapter_off: bool = False,
    ):
        """Wrap the models and build the optimizer; the heavier work before training is `prepare`.

        train.py decides about the reference once: `reference_plan` (precompute_ref_logps) holds
        the reference log-probs read from the cache, or says which to compute with
        `reference_model`; without a plan `reference_model` scores every batch live.
        `reference_is_adapter_off` (LoRA): the reference is the policy with its adapter switched
        off, in place of a reference model.
        """
        self.config = config
        self.loss = loss
        self.tokenizer = tokenizer
        self.run_dir = run_dir
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.is_main = rank == 0
        reference_tables_ready = reference_plan is not None and reference_plan.tables is not None
        reference_without_model = reference_tables_ready or reference_is_adapter_off
        if reference_model is not None and (not loss.uses_reference or reference_without_model):
            raise ValueError("A reference model was given, but the run needs none.")
        if loss.uses_reference and reference_model is None and not reference_without_model:
            raise ValueError(f"loss={loss.name} needs a reference model or precomputed reference log-probs.")
        if reference_is_adapter_off and not (loss.uses_reference and isinstance(policy, PeftModel)):
            raise ValueError("reference_is_adapter_off needs a LoRA policy (a PeftModel) and a loss with a reference.")
        if len(eval_examples) % self.data_world_size:
            raise ValueError(f"{len(eval_examples)} eval examples do not split over {self.data_world_size} data ranks.")

        self.train_examples = train_examples
        self.eval_examples = eval_examples
        self.reference_plan = reference_plan
        self.reference_is_adapter_off = reference_is_adapter_off
        self.policy = self.wrap_policy(policy)
        self.reference_model = self.wrap_reference(reference_model) if reference_model is not None else None
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(config.optimizer, trainable, config.lr, config.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, config.lr_scheduler, config.warmup_steps, self.total_steps())
        self.run_log = RunLog(config, run_dir, self.is_main)
        self.chunked_logps = False  # decided in prepare(), once the policy can be probed
        self.prompts_shared = False  # likewise
        self.examples_seen = 0
        self.optimizer_steps = 0
        self.last_checkpoint: Path | None = None  # the newest complete checkpoint of this run (or resumed from)
        self.signals = stopping.PreemptionSignals()  # installed for the training loop

    def total_steps(self) -> int:
        """Optimizer steps of the whole run (the length of decaying learning-rate schedules)."""
        return self.planned_examples() // self.config.batch_size

    def planned_examples(self) -> int:
        """Training examples of the whole run: n_epochs' full batches, capped at n_examples (n_epochs=null: no cap)."""
        config = self.config
        if config.n_epochs is None:
            return config.n_examples  # as many passes as it takes (validated: n_examples is then set)
        epochs = len(self.train_examples) // config.batch_size * config.batch_size * config.n_epochs
        return epochs if config.n_examples is None else min(epochs, config.n_examples)

    def prepare(self) -> None:
        """The work before the first step: choose the log-prob path, precompute reference log-probs, resume."""
        self.chunked_logps = self.config.logps_chunk_tokens is not None and self.logits_are_projected_hidden_states()
        self.prompts_shared = self.config.share_prompt and self.attention_takes_shared_prompts()
        if self.reference_plan is not None and self.reference_plan.tables is None:
            self.precompute_reference_logps()
        if self.config.resume_from is not None:
            self.resume(Path(self.config.resume_from))
        # from_pretrained returns models in eval mode, and transformers recomputes checkpointed
        # blocks only in training mode: without this, activation_checkpointing would do nothing
        # until the first evaluation switched the policy to training mode
        self.policy.train()
        self.run_log.start()

    # ----- the training loop -------------------------------------------------------

    def train(self) -> None:
        """Train for n_epochs / n_examples, evaluating (and saving) every eval_every examples and at the end."""
        self.prepare()
        self.signals.install()  # from here a preemption signal stops the run after the step in progress
        if self.config.do_first_eval and self.examples_seen == 0:
            self.evaluate()
        last_eval_at = self.examples_seen
        window = _LogWindow()
        for batch in self.train_batches():
            window.add(self.train_step(batch), len(batch))
            preempted = stopping.any_rank_requests(self.signals.received is not None, self.device, self.distributed)
            if preempted or window.seconds() >= self.config.minimum_log_interval_secs:
                self.log_train_window(window)
                window = _LogWindow()
            if self.evaluation_due(last_eval_at):
                self.evaluate()
                self.save_checkpoint(checkpoints.step_name(self.examples_seen))
                last_eval_at = self.examples_seen
            if preempted:
                self.stop_for_preemption()
        if window.n_examples:
            self.log_train_window(window)
        if self.final_evaluation_due(last_eval_at):
            self.evaluate()
        self.save_checkpoint(checkpoints.FINAL)
        self.signals.restore()
        self.run_log.finish()

    def stop_for_preemption(self) -> None:
        """After a preemption signal on any rank: a resumable checkpoint of this step (unless just saved), then stop."""
        name = checkpoints.step_name(self.examples_seen)
        if self.last_checkpoint != self.run_dir / name:
            self.save_checkpoint(name)
        self.signals.restore()
        self.run_log.finish()
        raise stopping.Preempted(self.signals.received or "a preemption signal on another rank", self.last_checkpoint)

    def evaluation_due(self, last_eval_at: int) -> bool:
        """Whether the last step crossed a multiple of eval_every examples since the last evaluation."""
        return self.examples_seen // self.config.eval_every > last_eval_at // self.config.eval_every

    def final_evaluation_due(self, last_eval_at: int) -> bool:
        """Whether the final weights still lack an evaluation (none yet at all, when nothing was trained)."""
        return last_eval_at != self.examples_seen or (not self.config.do_first_eval and self.examples_seen == 0)

    def train_batches(self):
        """Global training batches (lists of batch_size examples), with a progress bar on rank 0."""
        config, total = self.config, self.planned_examples()
        with tqdm.tqdm(total=total, desc="train", unit="ex", disable=not self.is_main, dynamic_ncols=True) as bar:
            bar.update(self.examples_seen)
            batches = training_order(
                len(self.train_examples), config.batch_size, config.seed, config.n_epochs, config.n_examples
            )
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
        step_metrics = metrics.summed_over_ranks(self.device, self.data_world_size > 1)
        loss = step_metrics.averages()["loss/train"]
        if not (math.isfinite(loss) and math.isfinite(float(grad_norm))):  # the same on every rank: both are global
            self.signals.restore()
            raise stopping.NonFiniteStepError(self.optimizer_steps + 1, loss, float(grad_norm), self.last_checkpoint)
        learning_rate = self.optimizer.param_groups[0]["lr"]  # the rate this step applies
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.examples_seen += len(batch)
        self.optimizer_steps += 1

        step_metrics.add("grad_norm", torch.as_tensor(float(grad_norm)))
        step_metrics.add("lr", torch.as_tensor(learning_rate, dtype=torch.float64))
        return step_metrics

    def log_train_window(self, window: _LogWindow) -> None:
        """Log exact averages over the optimizer steps since the last log line."""
        throughput = {"examples_per_second": window.n_examples / window.seconds()}
        self.run_log.log({**window.metrics.averages(), **throughput}, self.examples_seen, self.optimizer_steps)

    def evaluate(self) -> dict[str, float]:
        """Loss and reward metrics on the eval set, plus samples when sample_during_eval."""
        self.policy.eval()
        metrics = MetricSums()
        eval_batches = iterate_batches(
            self.eval_examples,
            batch_size=self.config.eval_batch_size,
            shuffle=False,
            seed=0,
            n_epochs=1,
            drop_last=False,
        )
        with torch.no_grad():
            for batch in tqdm.tqdm(
                eval_batches, desc="eval", disable=not self.is_main, leave=False, dynamic_ncols=True
            ):
                self.loss_and_metrics(self.policy, self.local_share(batch), metrics, "eval")
        results = metrics.summed_over_ranks(self.device, self.data_world_size > 1).averages()
        if self.config.sample_during_eval and self.config.n_eval_model_samples > 0:
            self.run_log.write_samples(self.sample(), self.examples_seen)
        self.policy.train()
        self.run_log.log(results, self.examples_seen, self.optimizer_steps)
        self.run_log.write_report()
        if self.is_main:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in results.items())
            print(f"eval after {self.examples_seen} examples: {shown}", flush=True)
        return results

    def sample(self) -> list[dict]:
        """Completions of the first n_eval_model_samples eval prompts, gathered on rank 0."""
        unique = list({e["prompt"]: e for e in self.eval_examples}.values())[: self.config.n_eval_model_samples]
        per_rank = self.config.eval_batch_size // self.data_world_size
        samples = []
        for chunk in rank_batches(unique, self.data_world_size, self.data_rank, per_rank):
            # an empty chunk still generates (on filler) so that every rank takes part in each step
            prompts = {k: v.to(self.device) for k, v in collate_prompts(chunk or unique[:1], self.pad_token_id).items()}
            completions = {"policy": self.decode_new_tokens(self.generate(self.policy, prompts), prompts)}
            if self.has_reference_forward:
                with self.reference_forward() as reference:
                    completions["reference"] = self.decode_new_tokens(self.generate(reference, prompts), prompts)
            for i, example in enumerate(chunk):
                sample = {"prompt": example["prompt"], **{k: v[i] for k, v in completions.items()}}
                if "prompt_messages" in example:  # conversational: also each completion as the conversation's answer
                    sample["messages"] = {
                        k: with_answer(example["prompt_messages"], v[i]) for k, v in completions.items()
                    }
                samples.append(sample)
        return self.gather_objects(samples)

    def decode_new_tokens(self, sequences: torch.Tensor, prompts: Batch) -> list[str]:
        new_tokens = sequences[:, prompts["prompt_input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    # ----- forward passes ------------------------------------------------------------

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def local_share(self, batch: list[dict]) -> list[dict]:
        """This rank's contiguous share of a global batch."""
        return split_evenly(batch, self.data_world_size)[self.data_rank]

    def loss_weights(self, examples: list[dict]) -> torch.Tensor:
        """Per-example weight of each example's loss in the batch mean: (batch,).

        Token counts for per-token-mean SFT, so every target token counts the same;
        otherwise 1 per example (per sequence for SFT, per pair for preference losses).
        """
        if not self.loss.is_preference and self.loss.per_token_mean:
            return torch.tensor([labelled_tokens(e["chosen_labels"]) for e in examples], dtype=torch.float64)
        return torch.ones(len(examples), dtype=torch.float64)

    def global_loss_weight(self, micro_batches: list[list[dict]]) -> float:
        weights = MetricSums()
        for micro_batch in micro_batches:
            weights.add("weight", self.loss_weights(micro_batch))
        return weights.summed_over_ranks(self.device, self.data_world_size > 1).sums["weight"]

    def loss_and_metrics(self, model: nn.Module, examples: list[dict], metrics: MetricSums, split: str) -> torch.Tensor:
        """Forward pass(es) on a micro-batch of examples; adds its metrics and returns the summed loss."""
        if not self.loss.is_preference:
            input_ids, labels = [e["chosen_input_ids"] for e in examples], [e["chosen_labels"] for e in examples]
            logps, _ = self.sequence_logps(model, input_ids, labels)
            losses = -logps
            weights = self.loss_weights(examples).to(self.device)
            metrics.add(f"logps_{split}/chosen", logps)
            metrics.add(f"loss/{split}", losses, count=weights.sum())
            return losses.sum()

        policy_chosen, policy_rejected, chosen_tokens, rejected_tokens = self.pair_logps(model, examples)
        reference_chosen, reference_rejected = self.reference_pair_logps(examples, split)
        losses, chosen_rewards, rejected_rewards = self.loss.pair_losses(
            policy_chosen, policy_rejected, reference_chosen, reference_rejected, chosen_tokens, rejected_tokens
        )
        metrics.add(f"rewards_{split}/chosen", chosen_rewards)
        metrics.add(f"rewards_{split}/rejected", rejected_rewards)
        metrics.add(f"rewards_{split}/accuracies", (chosen_rewards > rejected_rewards).double())
        metrics.add(f"rewards_{split}/margins", chosen_rewards - rejected_rewards)
        metrics.add(f"logps_{split}/chosen", self.loss.scored_logps(policy_chosen, chosen_tokens))
        metrics.add(f"logps_{split}/rejected", self.loss.scored_logps(policy_rejected, rejected_tokens))
        metrics.add(f"loss/{split}", losses)
        return losses.sum()

    def pair_logps(
        self, model: nn.Module, examples: list[dict]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Summed chosen and rejected log-probs and token counts from ONE forward pass over both, each (batch,).

        With share_prompt each pair is one row (prompt, chosen, rejected) and its prompt runs once;
        otherwise its two sequences run side by side, padded or packed.
        """
        if self.prompts_shared:
            logps, n_tokens = self.shared_prompt_logps(model, examples)
        else:
            sides = ("chosen", "rejected")
            logps, n_tokens = self.sequence_logps(
                model,
                [e[f"{side}_input_ids"] for side in sides for e in examples],
                [e[f"{side}_labels"] for side in sides for e in examples],
            )
        n = len(examples)
        return logps[:n], logps[n:], n_tokens[:n], n_tokens[n:]

    def reference_pair_logps(self, examples: list[dict], split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference model's summed chosen and rejected log-probs: precomputed, computed now, or zero."""
        if self.reference_plan is not None and self.reference_plan.tables is not None:
            table = self.reference_plan.tables[split][[e["index"] for e in examples]].to(self.device)
            return table[:, 0], table[:, 1]
        if not self.has_reference_forward:
            zeros = torch.zeros(len(examples), device=self.device)
            return zeros, zeros
        with self.reference_forward() as reference:
            chosen, rejected, _, _ = self.pair_logps(reference, examples)
            return chosen, rejected

    @property
    def has_reference_forward(self) -> bool:
        """Whether reference forward passes can run: a reference model, or the LoRA policy with its adapter off."""
        return self.reference_model is not None or self.reference_is_adapter_off

    @contextmanager
    def reference_forward(self) -> Iterator[nn.Module]:
        """No-grad context giving the model that computes as the reference.

        With LoRA that is the policy itself with its adapter switched off (the base model), so the
        memory of a second model is never spent; otherwise the reference model.
        """
        with torch.no_grad():
            if self.reference_is_adapter_off:
                with lora.adapter_disabled(self.policy) as base:
                    yield base
            else:
                yield self.reference_model

    def sequence_logps(
        self, model: nn.Module, input_ids: list[list[int]], labels: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probabilities of the labelled tokens of each sequence: ((n,), (n,) token counts).

        The sequences go through the model padded, or packed when `packing` is on; the output
        projection runs in chunks over labelled positions only when `logps_chunk_tokens` is set.
        """
        if self.config.packing:
            batch = packed_batch(input_ids, labels, self.pad_token_id, self.config.max_length)
        else:
            batch = padded_batch(input_ids, labels, self.pad_token_id)
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
                    outputs.hidden_states[-1],
                    head.weight,
                    head.bias,
                    labels_tensor,
                    self.config.logps_chunk_tokens,
                    sequence_ids=sequence_ids,
                    n_sequences=n_sequences,
                )
            else:
                logits = model(**batch, use_cache=False).logits
                result = sequence_logps(logits, labels_tensor, sequence_ids=sequence_ids, n_sequences=n_sequences)
        if not torch.is_grad_enabled():
            self.release_gathered_weights(model)
        return result

    def shared_prompt_logps(self, model: nn.Module, examples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probs and token counts of the chosen then the rejected responses, each prompt run once.

        See shared_prompt.py for the layout; with packing several pairs share a row of max_length tokens.
        """
        row_tokens = self.config.max_length if self.config.packing else None
        batch = {k: v.to(self.device) for k, v in shared_prompt_batch(examples, self.pad_token_id, row_tokens).items()}
        chunk_tokens = self.config.logps_chunk_tokens if self.chunked_logps else None
        with self.autocast():
            result = shared_prompt_logps(model, batch, chunk_tokens)
        if not torch.is_grad_enabled():
            self.release_gathered_weights(model)
        return result

    def attention_takes_shared_prompts(self) -> bool:
        """Whether the policy's attention computes exactly on prefix-shared rows (see shared_prompt.py)."""
        accepted = attention_accepts_shared_prompt_mask(self.policy, self.config.max_length)
        self.release_gathered_weights(self.policy)
        if not accepted and self.is_main:
            print(
                f"note: {type(self.policy).__name__} ({self.policy.config._attn_implementation} attention) cannot take "
                "the prefix-shared attention mask; share_prompt is ignored and pairs run as two sequences",
                flush=True,
            )
        return accepted

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
            print(
                f"note: {type(self.policy).__name__} post-processes its logits; logps_chunk_tokens is ignored",
                flush=True,
            )
        return matches

    def autocast(self):
        """torch.autocast in autocast_dtype for forward passes; a no-op when it is null."""
        dtype = self.config.autocast_dtype
        return torch.autocast(self.device.type, dtype=DTYPES[dtype] if dtype else None, enabled=dtype is not None)

    # ----- precomputed reference log-probs -------------------------------------------

    def precompute_reference_logps(self) -> None:
        """Score the examples the plan names with the reference model, store them in the plan, free the model."""
        for split in ("train", "eval"):
            logps = self.compute_reference_logps(self.reference_plan.used_examples(split), split)
            self.reference_plan.store(split, logps, write_cache=self.is_main)
        self.reference_model = None  # its work is done: free its memory before training

    @torch.no_grad()
    def compute_reference_logps(self, examples: Sequence[dict], split: str) -> torch.Tensor:
        """(len(examples), 2) summed (chosen, rejected) reference log-probs, each data rank scoring its share."""
        per_rank = self.config.eval_batch_size // self.data_world_size
        positions = list(range(len(examples)))
        computed = []
        chunks = rank_batches(positions, self.data_world_size, self.data_rank, per_rank)
        for chunk in tqdm.tqdm(
            chunks, desc=f"reference log-probs ({split})", disable=not self.is_main, dynamic_ncols=True
        ):
            batch = [examples[i] for i in chunk or [0]]  # an empty share still takes part in the collectives
            with self.reference_forward() as reference:
                chosen, rejected, _, _ = self.pair_logps(reference, batch)
            if chunk:
                computed.append((chunk, torch.stack([chosen, rejected], dim=1).float().cpu()))
        table = torch.full((len(examples), 2), float("nan"))
        for indices, values in self.gather_objects(computed):
            table[indices] = values
        return table

    # ----- checkpoints --------------------------------------------------------------

    def trainer_state(self) -> dict:
        """What a resume restores besides weights and optimizer: counters, scheduler, RNG states, the config."""
        return {
            "examples_seen": self.examples_seen,
            "optimizer_steps": self.optimizer_steps,
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            **({"cuda_rng": torch.cuda.get_rng_state(self.device)} if self.device.type == "cuda" else {}),
            "world_size": self.world_size,  # a resume with another world size is refused (checkpoints.py)
            "config": OmegaConf.to_container(self.config, resolve=True),
        }

    def save_checkpoint(self, name: str) -> None:
        """Write <run_dir>/<name>/: a Hugging Face model folder plus the state a resume needs.

        A LoRA run writes its adapter, and the merged model only where checkpoints.keeps_merged_model.
        """
        if self.config.debug:
            return
        tmp_dir = checkpoints.partial_dir(self.run_dir, name)
        if self.is_main:
            checkpoints.start_partial(tmp_dir)
        self.barrier()
        self.save_optimizer_state(tmp_dir)
        state_dict = self.full_policy_state_dict()
        if self.is_main:
            model = self.policy
            if self.config.lora.enabled:
                lora.save_adapter(checkpoints.adapter_dir(tmp_dir), self.policy, state_dict)
                model = lora.base_model(self.policy)
                merged = checkpoints.keeps_merged_model(name, self.config.lora.load_in_4bit)
                state_dict = lora.merged_state_dict(self.policy, state_dict) if merged else None
            checkpoints.write_checkpoint(
                self.run_dir / name, tmp_dir, model, state_dict, self.tokenizer, self.trainer_state()
            )
            print(f"saved {self.run_dir / name}", flush=True)
        self.barrier()
        self.last_checkpoint = self.run_dir / name

    def resume(self, checkpoint_dir: Path) -> None:
        """Continue a run from its checkpoint: optimizer, scheduler, counters and RNG states.

        The policy's weights were loaded from the same folder (train.py); training then skips
        the batches already trained on, which the seed fixes, so the continued run takes the
        same steps as one that was never interrupted.
        """
        trainer_state = checkpoints.read_trainer_state(checkpoint_dir)
        self.load_optimizer_state(checkpoint_dir)
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        self.examples_seen = trainer_state["examples_seen"]
        self.optimizer_steps = trainer_state["optimizer_steps"]
        torch.set_rng_state(trainer_state["torch_rng"])
        random.setstate(trainer_state["python_rng"])
        if "cuda_rng" in trainer_state and self.device.type == "cuda":
            torch.cuda.set_rng_state(trainer_state["cuda_rng"], self.device)
        self.last_checkpoint = checkpoint_dir
        if self.is_main:
            print(
                f"resumed from {checkpoint_dir} after {self.examples_seen} examples "
                f"({self.optimizer_steps} optimizer steps)",
                flush=True,
            )

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
        torch.save(self.optimizer.state_dict(), checkpoint_dir / checkpoints.OPTIMIZER_FILE)

    def load_optimizer_state(self, checkpoint_dir: Path) -> None:
        path = checkpoint_dir / checkpoints.OPTIMIZER_FILE
        self.optimizer.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))

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
            pad_token_id=self.pad_token_id,
            eos_token_id=stop_token_ids(self.tokenizer),  # EOS, and the chat template's end-of-turn token
            synced_gpus=self.distributed,  # keep every rank stepping until all are done
        )
        self.release_gathered_weights(model)
        return sequences


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
        dcp.save(state, checkpoint_id=str(checkpoint_dir / checkpoints.OPTIMIZER_SHARDS))

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

    @property
    def data_rank(self) -> int:
        return self.rank

    @property
    def data_world_size(self) -> int:
        return self.world_size

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
