"""Optimizers by name and the learning-rate schedules, against values computed by hand."""

import math

import pytest
import torch
from conftest import compose_config, equivalence_overrides, run_in_processes, train_records

from optimization import (
    OPTIMIZERS,
    SCHEDULES,
    lr_multiplier,
    make_optimizer,
    make_scheduler,
    optimization_problems,
)


def parameters() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.ones(3))]


def test_optimizers_by_name():
    for name, optimizer_class in OPTIMIZERS.items():
        optimizer = make_optimizer(name, parameters(), lr=1e-3)
        assert type(optimizer) is optimizer_class and optimizer.param_groups[0]["lr"] == 1e-3
    assert set(OPTIMIZERS) == {"RMSprop", "AdamW", "Adam"}


def test_adamw_takes_the_configured_weight_decay_not_torchs_default():
    assert make_optimizer("AdamW", parameters(), 1e-3).param_groups[0]["weight_decay"] == 0.0
    assert make_optimizer("AdamW", parameters(), 1e-3, weight_decay=0.01).param_groups[0]["weight_decay"] == 0.01


def test_weight_decay_is_refused_where_it_would_be_l2_regularisation():
    with pytest.raises(ValueError, match="weight_decay=0.1 with optimizer=RMSprop: only AdamW .* set optimizer=AdamW"):
        make_optimizer("RMSprop", parameters(), 1e-3, weight_decay=0.1)
    with pytest.raises(ValueError, match="optimizer=Adagrad: must be one of RMSprop, AdamW, Adam"):
        make_optimizer("Adagrad", parameters(), 1e-3)


def test_optimization_problems_are_all_reported():
    assert optimization_problems("RMSprop", 0.0, "constant") == []
    problems = optimization_problems("Adam", 0.1, "step")
    assert len(problems) == 2
    assert problems[0].startswith("weight_decay=0.1 with optimizer=Adam") and problems[1].startswith(
        "lr_scheduler=step"
    )
    assert optimization_problems("AdamW", -0.1, "cosine") == ["weight_decay=-0.1: must be 0 or more."]


def test_constant_schedule_is_exactly_the_original_warmup():
    for warmup_steps in (0, 1, 10, 150):
        for step in range(200):
            expected = min(1.0, (step + 1) / (warmup_steps + 1))
            assert lr_multiplier(step, warmup_steps, 0, "constant") == expected


def test_linear_schedule_values():
    # warmup 4: steps 0..3 at 1/5 .. 4/5, step 4 at 1; then (14 - step) / 10, 0 from step 14 on
    values = [lr_multiplier(step, 4, 14, "linear") for step in (0, 3, 4, 9, 13, 14, 20)]
    assert values == pytest.approx([0.2, 0.8, 1.0, 0.5, 0.1, 0.0, 0.0])


def test_cosine_schedule_values():
    # warmup 4, total 12: progress (step - 4) / 8; step 6 is a quarter: (1 + cos(pi / 4)) / 2 = 0.8535534
    values = [lr_multiplier(step, 4, 12, "cosine") for step in (1, 4, 6, 8, 10, 12, 30)]
    assert values == pytest.approx([0.4, 1.0, 0.8535534, 0.5, 0.1464466, 0.0, 0.0])


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_schedule_warms_up_alike_and_never_increases_after(schedule):
    multipliers = [lr_multiplier(step, 5, 40, schedule) for step in range(45)]
    assert multipliers[:6] == [lr_multiplier(step, 5, 40, "constant") for step in range(6)]
    assert all(later <= earlier for earlier, later in zip(multipliers[5:], multipliers[6:]))
    assert all(0 <= m <= 1 for m in multipliers)


def test_decaying_schedule_needs_steps_after_warmup():
    with pytest.raises(ValueError, match="warmup_steps=10, but the run has only 10 optimizer steps"):
        lr_multiplier(10, 10, 10, "cosine")
    assert lr_multiplier(10, 10, 10, "constant") == 1.0
    with pytest.raises(ValueError, match="lr_scheduler=step: must be one of constant, linear, cosine"):
        lr_multiplier(0, 0, 10, "step")


def test_scheduler_scales_the_optimizers_learning_rate():
    optimizer = make_optimizer("AdamW", parameters(), lr=0.5)
    scheduler = make_scheduler(optimizer, "cosine", warmup_steps=4, total_steps=12)
    rates = []
    for _ in range(12):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.5 * lr_multiplier(step, 4, 12, "cosine") for step in range(12)])
    assert rates[6] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)) / 2)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_scheduler_rebuilt_from_config_and_its_state_continues_identically(schedule):
    def build() -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        optimizer = make_optimizer("AdamW", parameters(), lr=0.5)
        return optimizer, make_scheduler(optimizer, schedule, warmup_steps=3, total_steps=10)

    def run(optimizer, scheduler, steps: int) -> list[float]:
        rates = []
        for _ in range(steps):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return rates

    uninterrupted = run(*build(), 10)
    optimizer, scheduler = build()
    first = run(optimizer, scheduler, 6)
    optimizer_state, scheduler_state = optimizer.state_dict(), scheduler.state_dict()
    resumed_optimizer, resumed_scheduler = build()
    resumed_optimizer.load_state_dict(optimizer_state)
    resumed_scheduler.load_state_dict(scheduler_state)
    assert first + run(resumed_optimizer, resumed_scheduler, 4) == uninterrupted


@pytest.mark.parametrize(
    ("schedule", "multipliers"),
    [
        # 4 steps, warmup_steps=1: step 0 warms up to 1/2; then decay over the 3 steps after warmup
        ("linear", [1 / 2, 1.0, 2 / 3, 1 / 3]),
        ("cosine", [1 / 2, 1.0, 0.75, 0.25]),
    ],
)
def test_decaying_schedules_train_through_train_py_with_the_rates_they_promise(schedule, multipliers, tmp_path):
    overrides = equivalence_overrides("sft") + [
        "n_examples=32",
        "lr=1e-3",
        "warmup_steps=1",
        f"lr_scheduler={schedule}",
    ]
    run_in_processes(compose_config(overrides), tmp_path / "run", 1)
    logged = [record["lr"] for record in train_records(tmp_path / "run")]
    assert logged == pytest.approx([1e-3 * m for m in multipliers], rel=1e-9)
