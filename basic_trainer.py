"""BasicTrainer: the training loop of SFT and preference optimization, on one device.

It holds the whole loop, in the order data flows through it: construction, the loop (train,
train_step, evaluate, sample), forward passes, checkpoints, then the hooks that the distributed
trainers in trainers.py override (placing the models, which ranks see which data, gradient
synchronisation, gathering, saving). Nothing here knows how models are sharded or split.
"""

import itertools
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import tqdm
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel

import checkpoints
import console
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
from errors import CheckpointWriteError, ModelLoadError
from forward_plan import ForwardPlan, choose_plan
from logprobs import labelled_tokens, sequence_logps, sequence_logps_from_hidden
from loss_registry import LossSpec
from losses import kto_kl_estimate
from models import block_class_name
from optimization import make_optimizer, make_scheduler
from reference import Reference
from reward_scores import (
    packed_score_index,
    padded_score_index,
    sequence_scores,
    shared_prompt_scores,
)
from run_log import MetricSums, RunLog
from shared_prompt import flex_block_mask, shared_prompt_batch, shared_prompt_logps
from utils import DTYPES

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


@dataclass(frozen=True)
class UnpairedInputs:
    """What KTO's loss on one micro-batch needs besides its examples, from the pass before the step."""

    kl_estimate: torch.Tensor  # z0 of the whole global batch: a scalar, without gradient
    reference_logps: torch.Tensor  # (micro_batch,) the reference's summed log-probs of each example's completion


class BasicTrainer:
    """Trains the policy on one device (a GPU when there is one, else the CPU).

    The class attributes are what the rest of the project needs to know about a trainer before
    one exists (launch, config checks, LoRA, the reference cache key); trainers.TRAINERS lists
    the trainers by name.
    """

    data_parallel = False  # whether ranks see different data (the data-parallel degree is then the world size)
    multi_process = False  # one process per device under torch.distributed, rather than a single process
    supports_lora = True  # LoRA adapters on the policy
    supports_4bit = True  # a 4-bit (QLoRA) base
    param_dtype_key: str | None = None  # the config key of a dtype parameters compute in besides the model's own

    def __init__(
        self,
        config: DictConfig,
        loss: LossSpec,
        policy: PreTrainedModel,
        reference: Reference,
        tokenizer,
        train_examples: Sequence[dict],
        eval_examples: Sequence[dict],
        run_dir: Path,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ):
        """Wrap the models and build the optimizer; the heavier work before training is `prepare`.

        `reference` is the one reference train.py chose (reference.py): the trainer asks it for
        the reference's log-probs and never asks which kind it is.
        """
        self.config = config
        self.loss = loss
        self.tokenizer = tokenizer
        self.run_dir = run_dir
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.is_main = rank == 0
        if len(eval_examples) % self.data_world_size:
            raise ValueError(f"{len(eval_examples)} eval examples do not split over {self.data_world_size} data ranks.")

        self.train_examples = train_examples
        self.eval_examples = eval_examples
        self.policy = self.wrap_policy(policy)
        self.reference = reference
        self.reference.attach(self)
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(config.optimizer, trainable, config.lr, config.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, config.lr_scheduler, config.warmup_steps, self.total_steps())
        self.run_log = RunLog(config, run_dir, self.is_main)
        self.plan = ForwardPlan(False, False, None, config.max_length)  # chosen in prepare(), on the loaded policy
        self._shared_rows: tuple[list[dict], Batch] | None = None  # shared_prompt_rows' last batch
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

    @classmethod
    def data_parallel_size(cls, world_size: int) -> int:
        """Processes that see different data, of `world_size` in all."""
        return world_size if cls.data_parallel else 1

    @classmethod
    def processes_wanted(cls) -> int:
        """Processes a run of this trainer has: torchrun's WORLD_SIZE, else one per local GPU (at least 1)."""
        if "WORLD_SIZE" in os.environ:
            return int(os.environ["WORLD_SIZE"])
        return max(torch.cuda.device_count(), 1) if cls.multi_process else 1

    def prepare(self) -> None:
        """The work before the first step: choose the log-prob path, ready the reference (precompute), resume."""
        if self.loss.is_reward_model:
            console.say(
                "note: loss=reward trains a reward model, which computes no log-probs and generates nothing: "
                "logps_chunk_tokens and sample_during_eval do not apply"
            )
        self.plan = choose_plan(
            self.config,
            self.loss,
            self.policy,
            self.tokenizer.eos_token_id,
            self.pad_token_id,
            self.autocast,
            self.release_gathered_weights,
        )
        console.say(f"forward passes: {self.plan.describe()}")
        if self.loss.is_unpaired:
            self.warn_about_class_balance()
        self.reference = self.reference.ready(self)
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
        unpaired = self.unpaired_inputs(micro_batches, metrics, "train") if self.loss.is_unpaired else None
        for i, micro_batch in enumerate(micro_batches):
            self.set_gradient_sync(i == len(micro_batches) - 1)
            loss_sum = self.loss_and_metrics(
                self.policy, micro_batch, metrics, "train", unpaired[i] if unpaired else None
            )
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
        margins: list[torch.Tensor] = []
        with torch.no_grad():
            for batch in tqdm.tqdm(
                eval_batches, desc="eval", disable=not self.is_main, leave=False, dynamic_ncols=True
            ):
                local_batch = self.local_share(batch)
                unpaired = self.unpaired_inputs([local_batch], metrics, "eval") if self.loss.is_unpaired else None
                unpaired_batch = unpaired[0] if unpaired else None
                self.loss_and_metrics(self.policy, local_batch, metrics, "eval", unpaired_batch, margins)
        results = metrics.summed_over_ranks(self.device, self.data_world_size > 1).averages()
        if self.loss.is_preference and not self.loss.is_unpaired:  # the same on every rank: all gather
            self.run_log.write_margins(self.gather_objects(torch.cat(margins).tolist()), self.examples_seen)
        if self.config.sample_during_eval and self.config.n_eval_model_samples > 0 and not self.loss.is_reward_model:
            self.run_log.write_samples(self.sample(), self.examples_seen)
        self.policy.train()
        self.run_log.log(results, self.examples_seen, self.optimizer_steps)
        self.run_log.write_report()
        shown = ", ".join(f"{k}={v:.4g}" for k, v in results.items())
        console.say(f"eval after {self.examples_seen} examples: {shown}")
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
            if self.reference.has_model:
                with self.reference.model() as reference:
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

    def loss_and_metrics(
        self,
        model: nn.Module,
        examples: list[dict],
        metrics: MetricSums,
        split: str,
        unpaired: UnpairedInputs | None = None,
        margins: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Forward pass(es) on a micro-batch of examples; adds its metrics and returns the summed loss.

        unpaired: for KTO, the micro-batch's z0 and reference log-probs (unpaired_inputs); None otherwise.
        margins: a list that receives the pairs' reward margins (evaluate's histogram); None: not kept.
        """
        if self.loss.is_unpaired:
            return self.unpaired_loss_and_metrics(model, examples, metrics, split, unpaired)
        if not self.loss.is_preference:
            input_ids, labels = [e["chosen_input_ids"] for e in examples], [e["chosen_labels"] for e in examples]
            logps, _ = self.sequence_logps(model, input_ids, labels)
            losses = -logps
            weights = self.loss_weights(examples).to(self.device)
            metrics.add(f"logps_{split}/chosen", logps)
            metrics.add(f"loss/{split}", losses, count=weights.sum())
            return losses.sum()

        if self.loss.is_reward_model:  # a reward model: its scores are the rewards, and no log-probs exist
            chosen, rejected, chosen_tokens, rejected_tokens = self.pair_scores(model, examples)
        else:
            chosen, rejected, chosen_tokens, rejected_tokens = self.pair_logps(model, examples)
            metrics.add(f"logps_{split}/chosen", self.loss.scored_logps(chosen, chosen_tokens))
            metrics.add(f"logps_{split}/rejected", self.loss.scored_logps(rejected, rejected_tokens))
        reference_chosen, reference_rejected = self.reference.pair_logps(examples, split)
        losses, chosen_rewards, rejected_rewards = self.loss.pair_losses(
            chosen, rejected, reference_chosen, reference_rejected, chosen_tokens, rejected_tokens
        )
        metrics.add(f"rewards_{split}/chosen", chosen_rewards)
        metrics.add(f"rewards_{split}/rejected", rejected_rewards)
        metrics.add(f"rewards_{split}/accuracies", (chosen_rewards > rejected_rewards).double())
        metrics.add(f"rewards_{split}/margins", chosen_rewards - rejected_rewards)
        metrics.add(f"loss/{split}", losses)
        self.add_pair_diagnostics(metrics, split, chosen, reference_chosen, chosen_rewards - rejected_rewards,
                                  chosen_tokens - rejected_tokens)  # fmt: skip
        if margins is not None:
            margins.append((chosen_rewards - rejected_rewards).float().cpu())
        return losses.sum()

    def add_pair_diagnostics(self, metrics: MetricSums, split: str, chosen, reference_chosen, margins, length_gaps):
        """Two signals that reward accuracy hides, each (batch,) in, exact like the other metrics.

        likelihood displacement: the share of pairs whose chosen response the policy now finds less
        likely than the reference does (DPO can raise the margin while pushing both responses down;
        Razin et al., 2024, arXiv:2410.08847); only where the loss compares with a reference.
        margin_length_correlation: Pearson's r between each pair's reward margin and its length gap
        (chosen minus rejected tokens): near 1, the model may be learning length rather than quality.
        """
        if self.loss.uses_reference:
            metrics.add(f"displacement_{split}/chosen_below_reference", (chosen < reference_chosen).double())
        metrics.add_correlation(f"rewards_{split}/margin_length_correlation", margins, length_gaps.double())

    def unpaired_loss_and_metrics(
        self, model: nn.Module, examples: list[dict], metrics: MetricSums, split: str, unpaired: UnpairedInputs
    ) -> torch.Tensor:
        """KTO on a micro-batch: each example's completion (the chosen side) scored with gradient against z0.

        Metrics: the loss, and the rewards beta * r and policy log-probs of each class (desirable,
        undesirable), each summed and counted so that its average is exact over micro-batches and ranks.
        """
        logps, _ = self.sequence_logps(
            model, [e["chosen_input_ids"] for e in examples], [e["chosen_labels"] for e in examples]
        )
        desirable = torch.tensor([e["desirable"] for e in examples], device=logps.device)
        losses, rewards = self.loss.unpaired_losses(logps, unpaired.reference_logps, unpaired.kl_estimate, desirable)
        for label, selected in (("desirable", desirable), ("undesirable", ~desirable)):
            metrics.add(f"rewards_{split}/{label}", rewards[selected])
            metrics.add(f"logps_{split}/{label}", logps[selected])
        metrics.add(f"loss/{split}", losses)
        return losses.sum()

    @torch.no_grad()
    def unpaired_inputs(self, micro_batches: list[list[dict]], metrics: MetricSums, split: str) -> list[UnpairedInputs]:
        """KTO, before a step: z0 of the global batch (its micro-batches on all data ranks), logged as kl/<split>.

        z0 = max(0, mean over the batch of log pi(y'|x) - log pi_ref(y'|x)), y' each example's mismatched
        completion (its rejected side: preference_entry.with_mismatched_completions), without gradient.
        Summed and counted over ranks, so one device and several give the same z0. The reference scores
        both sides of each micro-batch here, once; its completions' log-probs are kept for the loss.
        """
        log_ratios, reference_logps = MetricSums(), []
        for micro_batch in micro_batches:
            policy_mismatched, _ = self.sequence_logps(
                self.policy, [e["rejected_input_ids"] for e in micro_batch], [e["rejected_labels"] for e in micro_batch]
            )
            reference_completion, reference_mismatched = self.reference.pair_logps(micro_batch, split)
            log_ratios.add("mismatched", policy_mismatched - reference_mismatched)
            reference_logps.append(reference_completion)
        total = log_ratios.summed_over_ranks(self.device, self.data_world_size > 1)
        kl_estimate = kto_kl_estimate(torch.tensor(total.sums["mismatched"]), total.counts["mismatched"])
        # one value per rank, counted once on each, so that the sum over ranks averages back to z0
        metrics.add(f"kl/{split}", kl_estimate.reshape(1))
        kl_estimate = kl_estimate.to(self.device, torch.float32)
        return [UnpairedInputs(kl_estimate, logps) for logps in reference_logps]

    def warn_about_class_balance(self) -> None:
        """KTO: say when lambda_D n_D / (lambda_U n_U) over the training examples leaves the paper's advised range."""
        desirable = self.train_examples.desirable
        warning = self.loss.class_balance_warning(int(desirable.sum()), int((~desirable).sum()))
        if warning:
            console.say(f"warning: {warning}")

    def pair_logps(
        self, model: nn.Module, examples: list[dict]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Summed chosen and rejected log-probs and token counts from ONE forward pass over both, each (batch,).

        With share_prompt each pair is one row (prompt, chosen, rejected) and its prompt runs once;
        otherwise its two sequences run side by side, padded or packed.
        """
        if self.plan.share_prompt:
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

    def sequence_logps(
        self, model: nn.Module, input_ids: list[list[int]], labels: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probabilities of the labelled tokens of each sequence: ((n,), (n,) token counts).

        The sequences go through the model padded, or packed as the plan says; the output
        projection runs in chunks over labelled positions only when the plan chunks.
        """
        if self.plan.packing:
            batch = packed_batch(input_ids, labels, self.pad_token_id, self.plan.row_tokens)
        else:
            batch = padded_batch(input_ids, labels, self.pad_token_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        labels_tensor, sequence_ids = batch.pop("labels"), batch.pop("sequence_ids", None)
        n_sequences = len(input_ids)
        with self.autocast():
            if self.plan.chunk_tokens is not None:
                # the vocabulary projection is ours: the model computes its last hidden states
                # (and, with logits_to_keep=1, the logits of one position only)
                outputs = model(**batch, use_cache=False, output_hidden_states=True, logits_to_keep=1)
                head = model.get_output_embeddings()
                result = sequence_logps_from_hidden(
                    outputs.hidden_states[-1],
                    head.weight,
                    head.bias,
                    labels_tensor,
                    self.plan.chunk_tokens,
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
        with self.autocast():
            result = shared_prompt_logps(model, self.shared_prompt_rows(examples), self.plan.chunk_tokens)
        if not torch.is_grad_enabled():
            self.release_gathered_weights(model)
        return result

    def shared_prompt_rows(self, examples: list[dict]) -> Batch:
        """The prefix-shared rows of these pairs on the device, built once for the policy and the reference.

        The last batch built is kept with its examples list, so that the reference's pass over the
        same list reuses it (and, with flex_attention, its BlockMask) rather than building it again.
        """
        if self._shared_rows is not None and self._shared_rows[0] is examples:
            return self._shared_rows[1]
        pairs = shared_prompt_batch(examples, self.pad_token_id, self.plan.pair_row_tokens)
        batch = {k: v.to(self.device) for k, v in pairs.items()}
        if self.plan.block_masks:
            batch["block_mask"] = flex_block_mask(batch["pair_ids"], batch["parts"])
        self._shared_rows = (examples, batch)  # holding the list keeps its identity from being reused
        return batch

    def pair_scores(
        self, model: nn.Module, examples: list[dict]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A reward model's chosen and rejected scores and token counts from ONE forward pass, each (batch,).

        The layouts are pair_logps's (padded, packed, prefix-shared); see reward_scores.py for where
        each score is read.
        """
        n, pad = len(examples), self.pad_token_id
        if self.plan.share_prompt:
            batch = self.shared_prompt_rows(examples)
            with self.autocast():
                scores = shared_prompt_scores(model, batch)
            n_tokens = batch["n_tokens"]
        else:
            input_ids = [e[f"{side}_input_ids"] for side in ("chosen", "rejected") for e in examples]
            labels = [e[f"{side}_labels"] for side in ("chosen", "rejected") for e in examples]
            if self.plan.packing:
                batch = packed_batch(input_ids, labels, pad, self.plan.row_tokens)
                score_index = packed_score_index(input_ids, batch.pop("sequence_ids"), pad)
            else:
                batch = padded_batch(input_ids, labels, pad)
                score_index = padded_score_index(input_ids, batch["input_ids"].shape[1], pad)
            n_tokens = torch.tensor([labelled_tokens(label) for label in labels], device=self.device)
            inputs = {k: v.to(self.device) for k, v in batch.items() if k != "labels"}
            with self.autocast():
                scores = sequence_scores(model, inputs, score_index.to(self.device))
        if not torch.is_grad_enabled():
            self.release_gathered_weights(model)
        return scores[:n], scores[n:], n_tokens[:n], n_tokens[n:]

    def autocast(self):
        """torch.autocast in autocast_dtype for forward passes; a no-op when it is null."""
        dtype = self.config.autocast_dtype
        return torch.autocast(self.device.type, dtype=DTYPES[dtype] if dtype else None, enabled=dtype is not None)

    @torch.no_grad()
    def score_pairs(self, examples: Sequence[dict], split: str, reference: Reference) -> torch.Tensor:
        """(len(examples), 2) summed (chosen, rejected) log-probs under `reference`, each data rank scoring its share.

        For precomputing reference log-probs once before training (reference.PrecomputeReference).
        """
        per_rank = self.config.eval_batch_size // self.data_world_size
        positions = list(range(len(examples)))
        computed = []
        chunks = rank_batches(positions, self.data_world_size, self.data_rank, per_rank)
        for chunk in tqdm.tqdm(
            chunks, desc=f"reference log-probs ({split})", disable=not self.is_main, dynamic_ncols=True
        ):
            batch = [examples[i] for i in chunk or [0]]  # an empty share still takes part in the collectives
            chosen, rejected = reference.pair_logps(batch, split)
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
        # every rank learns whether any write failed, so that none waits for a rank that stopped
        self.stop_unless_saved(name, self.attempt(checkpoints.start_partial, tmp_dir) if self.is_main else None)
        self.stop_unless_saved(name, self.attempt(self.save_optimizer_state, tmp_dir))
        state_dict = self.full_policy_state_dict()
        failure = self.attempt(self.write_policy, name, tmp_dir, state_dict) if self.is_main else None
        self.stop_unless_saved(name, failure)
        self.last_checkpoint = self.run_dir / name

    def write_policy(self, name: str, tmp_dir: Path, state_dict: dict[str, torch.Tensor]) -> None:
        """On rank 0: the model folder, tokenizer and trainer state into tmp_dir, then renamed to <run_dir>/<name>."""
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

    @staticmethod
    def attempt(write, *args) -> OSError | None:
        """Run a write; the OSError it raised (full disk, unwritable folder), or None."""
        try:
            write(*args)
        except OSError as error:
            return error
        return None

    def stop_unless_saved(self, name: str, failure: OSError | None) -> None:
        """Raise CheckpointWriteError on every rank if a write failed on any (one all-reduce; a barrier too)."""
        if not stopping.any_rank_requests(failure is not None, self.device, self.distributed):
            return
        kept = f"{self.last_checkpoint} is intact" if self.last_checkpoint else "no earlier checkpoint exists"
        cause = failure if failure is not None else "a write failed on another rank"
        raise CheckpointWriteError(
            f"could not write the checkpoint {self.run_dir / name} ({cause}); {kept}. Free disk space or make the "
            "run folder writable, then resubmit with resume_from=auto."
        ) from failure

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
        console.say(
            f"resumed from {checkpoint_dir} after {self.examples_seen} examples "
            f"({self.optimizer_steps} optimizer steps)"
        )

    # ----- what distributed trainers override -----------------------------------------

    @property
    def data_rank(self) -> int:
        """Index of this process among those that see different data."""
        return self.rank if self.data_parallel else 0

    @property
    def data_world_size(self) -> int:
        """Number of processes that see different data (data-parallel degree)."""
        return self.data_parallel_size(self.world_size)

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
        graph breaks stay local, and it composes with the distributed trainers' sharding and splitting.
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
        """After a forward with no backward (eval, reference, generation): free weights gathered from shards."""

    def clip_gradients(self) -> torch.Tensor:
        """Clip to max_grad_norm; return the total norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.config.max_grad_norm)

    def gather_objects(self, items: list) -> list:
        """All ranks' lists concatenated, in rank order (only meaningful on rank 0)."""
        return items

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
