"""evaluate.py's configuration checked before any model loads: every problem at once, and the decisions it implies."""

import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from chat_templates import chat_template_problem
from errors import ConfigError
from evaluation.judges import JUDGES, JudgeRow
from evaluation.loading import run_config
from evaluation.openai_api import api_key_problem, reachability_problem
from utils import DTYPES

BASELINE_CHOICES = ("chosen", "none")  # or a model folder
GENERATION_BACKENDS = ("transformers", "openai")
ENDPOINTS = ("completions", "chat")
DEVICES = ("auto", "cuda", "cpu")
ADAPTER_DIR = "adapter"  # a LoRA checkpoint's adapter folder (checkpoints.py's layout)
DEFAULT_OUT_ROOT = Path(".cache/dpo/evaluations")
CONFIG_FILE = Path(__file__).resolve().parent.parent / "config" / "evaluate.yaml"
# settings that decide what generations.jsonl holds: a rerun into the same out_dir must keep them
GENERATION_KEYS = (
    "policy", "baseline", "datasets", "dataset_paths", "dataset_options", "split", "n_prompts", "seed",
    "chat_template", "max_prompt_length", "dtype", "generation.backend", "generation.max_new_tokens",
    "generation.top_p", "generation.model", "generation.endpoint",
)  # fmt: skip


@dataclass(frozen=True)
class EvaluationPlan:
    """What the checked configuration decides, once: the judge's row, the data, where results go."""

    judge: JudgeRow
    baseline_model: Path | None  # a baseline model folder, else None (chosen or none)
    datasets: list[str]
    dataset_paths: dict | None
    dataset_options: dict | None
    out_dir: Path


def model_folder_problem(key: str, value) -> str | None:
    """Why `value` is not a model folder we can load (config.json, or a LoRA checkpoint's adapter), or None."""
    folder = Path(str(value))
    if (folder / "config.json").is_file() or (folder / ADAPTER_DIR).is_dir():
        return None
    return (
        f"{key}={value}: not a model folder (no config.json{' there' if folder.is_dir() else ', no such folder'}); "
        "give a run's checkpoint (<run>/LATEST, <run>/step-N) or a Hugging Face model folder."
    )


def _number_problems(config: DictConfig) -> list[str]:
    problems = []
    checks = {
        "n_prompts": config.n_prompts, "max_prompt_length": config.max_prompt_length,
        "generation.max_new_tokens": config.generation.max_new_tokens,
        "generation.batch_size": config.generation.batch_size,
        "metrics.bootstrap_resamples": config.metrics.bootstrap_resamples,
    }  # fmt: skip
    for key, value in checks.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{key}={value}: must be a whole number, 1 or more.")
    if not 0 < config.generation.top_p <= 1:
        problems.append(f"generation.top_p={config.generation.top_p}: must lie in (0, 1].")
    if not 0 < config.metrics.confidence < 1:
        problems.append(f"metrics.confidence={config.metrics.confidence}: must lie in (0, 1), e.g. 0.95.")
    temperatures = config.temperatures
    if not isinstance(temperatures, ListConfig) or not temperatures:
        return problems + [f"temperatures={temperatures}: must be a non-empty list, e.g. [0.0,0.7]."]
    bad = [t for t in temperatures if isinstance(t, bool) or not isinstance(t, int | float) or t < 0]
    if bad:
        problems.append(f"temperatures={list(temperatures)}: each must be a number, 0 or more (bad: {bad}).")
    elif len(set(temperatures)) != len(temperatures):
        problems.append(f"temperatures={list(temperatures)}: each temperature once.")
    return problems


def _choice_problems(config: DictConfig) -> list[str]:
    choices = {
        "generation.backend": (config.generation.backend, GENERATION_BACKENDS),
        "generation.endpoint": (config.generation.endpoint, ENDPOINTS),
        "dtype": (config.dtype, tuple(DTYPES)),
        "device": (config.device, DEVICES),
    }
    return [
        f"{key}={value}: must be one of {', '.join(allowed)}."
        for key, (value, allowed) in choices.items()
        if value not in allowed
    ]


def _model_problems(config: DictConfig) -> list[str]:
    problems = [model_folder_problem("policy", config.policy)]
    if config.baseline not in BASELINE_CHOICES:
        problem = model_folder_problem("baseline", config.baseline)
        problems.append(problem and f"{problem} Or baseline=chosen, baseline=none.")
    if config.reference is not None:
        problems.append(model_folder_problem("reference", config.reference))
    if config.chat_template is not None:
        problems.append(chat_template_problem(str(config.chat_template)))
    return [p for p in problems if p]


def _judge_problems(config: DictConfig) -> tuple[JudgeRow | None, list[str]]:
    row = JUDGES.get(config.judge.name)
    if row is None:
        return None, [
            f"judge.name={config.judge.name}: no judge of that name in evaluation/judges.py ({', '.join(JUDGES)})."
        ]
    problems = list(row.config_problems(config.judge))
    if row.pairwise and config.baseline == "none":
        problems.append(f"judge={row.name} compares two responses: set baseline=chosen or a model folder.")
    return row, problems


def data_settings(config: DictConfig) -> tuple[list[str] | None, dict | None, dict | None, list[str]]:
    """(datasets, dataset_paths, dataset_options): the config's, else the policy run's; and problems."""
    trained = run_config(Path(config.policy)) if Path(str(config.policy)).is_dir() else None

    def setting(key: str):
        value = (
            config[key]
            if config[key] is not None
            else (trained[key] if trained is not None and key in trained else None)
        )
        return OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value

    datasets = setting("datasets")
    if datasets is None:
        return (
            None,
            None,
            None,
            [
                f"datasets=null reads the policy run's datasets, but {config.policy} is not in a run folder "
                "(no config.yaml beside it): set datasets=[...]."
            ],
        )
    if not isinstance(datasets, list) or not datasets:
        return None, None, None, [f"datasets={datasets}: a non-empty list, e.g. datasets=[hh]."]
    return datasets, setting("dataset_paths"), setting("dataset_options"), []


def _label(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", value).strip("-")


def default_out_dir(config: DictConfig) -> Path:
    """<policy run>/evaluations/<checkpoint>_vs_<baseline>_<judge>, or under .cache/dpo/evaluations."""
    policy = Path(config.policy).resolve()
    baseline = config.baseline
    if baseline not in BASELINE_CHOICES:
        folder = Path(baseline).resolve()
        baseline = f"{folder.parent.name}-{folder.name}" if run_config(folder) is not None else folder.name
    judge = config.judge
    judge_label = {"openai": "model", "reward_model": "path", "rule": "scorer"}.get(judge.name)
    judge_detail = Path(str(judge[judge_label])).name if judge_label else ""
    name = _label(f"{policy.name}_vs_{baseline}_{judge.name}-{judge_detail}")
    if run_config(policy) is not None:
        return policy.parent / "evaluations" / name
    return DEFAULT_OUT_ROOT / _label(f"{policy.parent.name}-{name}")


def _resume_problems(config: DictConfig, out_dir: Path) -> list[str]:
    """Settings that differ from those the generations already in out_dir were made with."""
    saved_path = out_dir / "config.yaml"
    if not (out_dir / "generations.jsonl").is_file() or not saved_path.is_file():
        return []
    saved = OmegaConf.load(saved_path)
    differing = []
    for key in GENERATION_KEYS:
        ours, theirs = OmegaConf.select(config, key), OmegaConf.select(saved, key)
        if ours != theirs:
            differing.append(f"{key}: {theirs} there, {ours} now")
    if not differing:
        return []
    return [
        f"out_dir={out_dir} holds generations made with other settings ({'; '.join(differing)}). "
        "Choose another out_dir, or delete its generations.jsonl to generate again."
    ]


def server_problems(config: DictConfig, judge: JudgeRow | None) -> list[str]:
    """Ask each server once whether it answers: the judge's, and the generation backend's."""
    problems = list(judge.server_problems(config.judge)) if judge is not None else []
    generation = config.generation
    if generation.backend == "openai":
        key_problem = api_key_problem("generation.api_key_env", generation.api_key_env)
        problems.append(key_problem or reachability_problem(
            "generation.base_url", generation.base_url, generation.api_key_env, generation.timeout_s
        ))  # fmt: skip
    return [p for p in problems if p]


def declared_keys(config_file: Path) -> set[str]:
    """The top-level keys a config file declares: its own keys and the groups its defaults list names."""
    config = OmegaConf.load(config_file)
    groups = {next(iter(entry)) for entry in config.get("defaults", []) if isinstance(entry, DictConfig)}
    return set(config) - {"defaults"} | {group for group in groups if not group.startswith("override ")}


def _foreign_key_problems(config: DictConfig) -> list[str]:
    """Keys added with +key=value, and train.py's groups (+model=, +loss=), which evaluate.py would ignore."""
    declared = declared_keys(CONFIG_FILE)
    return [
        f"{key}=...: not a setting of evaluate.py (config/evaluate.yaml declares them all); remove it. "
        "train.py's model= and loss= do not apply: the models come from their folders (policy=, baseline=)."
        for key in sorted(set(config) - declared)
    ]


def check_config(config: DictConfig) -> EvaluationPlan:
    """Every problem with the configuration, raised at once as a ConfigError; else the plan it implies.

    The servers are asked only once everything else is right (so a missing key is reported as
    such, not as a refused request); nothing here loads a model or a dataset.
    """
    problems = _foreign_key_problems(config) + _number_problems(config) + _choice_problems(config)
    problems += _model_problems(config)
    judge, judge_problems = _judge_problems(config)
    datasets, dataset_paths, dataset_options, data_problems = data_settings(config)
    problems += judge_problems + data_problems
    out_dir = Path(config.out_dir) if config.out_dir is not None else None
    if not problems:
        out_dir = out_dir or default_out_dir(config)
        problems += _resume_problems(config, out_dir) + server_problems(config, judge)
    if problems:
        raise ConfigError(problems)
    baseline_model = Path(config.baseline) if config.baseline not in BASELINE_CHOICES else None
    return EvaluationPlan(judge, baseline_model, datasets, dataset_paths, dataset_options, out_dir)
