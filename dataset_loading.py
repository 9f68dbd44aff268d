"""Choosing a dataset by name or file path, loading one split of it, and checking the dataset settings of a config.

The names are the rows of the dataset registry (dataset_registry.py), declared beside their loaders
in preference_datasets.py; a name that is a .jsonl/.json/.parquet path is read by dataset_files.py.
Whatever a loader returns is checked against the contract (preference_entry.checked_entries).
"""

from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

import preference_datasets  # noqa: F401  (its loaders register the built-in datasets)
from dataset_files import DATA_FILE_SUFFIXES, is_data_file, load_preference_file
from dataset_registry import DATASETS, DatasetRow
from errors import DatasetError
from preference_entry import PreferenceEntry, Prompt, checked_entries

CONFIG_SCHEMA_NAME = "dataset_settings_schema"  # named first in config/config.yaml's defaults list


def available_datasets() -> list[str]:
    """Names usable in `datasets=[...]`: every registered dataset."""
    return sorted(DATASETS)


def dataset_row(name: str) -> DatasetRow:
    """The registry's row of a named dataset, or DatasetError listing the known names."""
    row = DATASETS.get(name)
    if row is None:
        raise DatasetError(
            f"Unknown dataset {name!r}. Known: {', '.join(available_datasets())}; or give a path to a "
            f".jsonl/.json/.parquet file of prompt/chosen/rejected rows (see dataset_files.load_preference_file); "
            f"or register a loader in preference_datasets.py: @register_dataset({name!r}) above "
            f"def get_{name}(split: str) -> dict."
        )
    return row


def dataset_source(row: DatasetRow, dataset_paths: Mapping[str, str | None] | None) -> str | None:
    """dataset_paths.<name>, the local copy to read instead of the row's default source; None when absent or null."""
    path = (dataset_paths or {}).get(row.name)
    if path is None:
        return None
    if row.source is None:
        raise DatasetError(
            f"dataset_paths.{row.name} is set, but {row.loader.__name__} takes no source; remove that entry."
        )
    return str(path)


def get_dataset(
    name: str,
    split: str,
    *,
    cache_dir: str | None = None,
    dataset_paths: Mapping[str, str | None] | None = None,
    sft_mode: bool = False,
    dataset_options: Mapping[str, Mapping] | None = None,
) -> dict[Prompt, PreferenceEntry]:
    """One split of a dataset by name (a registered loader) or file path, checked against the contract.

    The loader gets what its row declares: its source (dataset_paths[name], else its Hub id) and
    cache_dir (where `datasets` keeps downloads), sft_mode, and its options from dataset_options[name].
    """
    if is_data_file(name):
        return checked_entries(name, load_preference_file(name, split))
    row = dataset_row(name)
    options = (dataset_options or {}).get(name) or {}
    problems = row.option_problems(options)
    if problems:
        raise DatasetError(" ".join(problems))
    source = dataset_source(row, dataset_paths)
    data = row.load(split, source=source, cache_dir=cache_dir, sft_mode=sft_mode, options=options)
    return checked_entries(name, data)


def truncation_mode_for(name: str) -> str:
    """Which end of an over-long prompt to keep, as the dataset's row declares (keep_prompt_end); a file its start."""
    return "keep_start" if is_data_file(name) else dataset_row(name).truncation_mode


def dataset_config_problems(config: DictConfig) -> list[str]:
    """Problems with datasets, dataset_paths and dataset_options, checked against the registry before any work."""
    names = config.datasets
    if isinstance(names, str):
        return [f"datasets={names}: must be a list; write datasets=[{names}]."]
    problems = [] if names else ["datasets=[]: name at least one dataset, e.g. datasets=[hh]."]
    for name in map(str, names):
        if name.endswith(DATA_FILE_SUFFIXES):
            if not Path(name).is_file():
                problems.append(f"datasets entry {name}: no such file.")
        elif name not in DATASETS:
            problems.append(
                f"datasets entry {name}: unknown dataset. Known: {_known()}; or give a path to "
                "a .jsonl/.json/.parquet file with prompt/chosen/rejected fields."
            )
    for name, path in config.dataset_paths.items():
        row = DATASETS.get(name)
        if row is None:
            problems.append(f"dataset_paths.{name}: no dataset is registered as {name!r}; known: {_known()}.")
        elif path is not None and row.source is None:
            problems.append(f"dataset_paths.{name}={path}: {row.loader.__name__} takes no source; remove it.")
        elif path is not None and not isinstance(path, str):
            problems.append(f"dataset_paths.{name}={path!r}: must be a folder or a Hub id, as a string.")
    for name, options in config.dataset_options.items():
        row = DATASETS.get(name)
        if row is None:
            problems.append(f"dataset_options.{name}: no dataset is registered as {name!r}; known: {_known()}.")
        else:
            plain = OmegaConf.to_container(options) if OmegaConf.is_config(options) else options
            problems += row.option_problems(plain)
    return problems


def _known() -> str:
    return ", ".join(available_datasets())


def register_config_schema() -> None:
    """Let dataset_paths and dataset_options take any dataset's name on the command line, without `+`.

    Hydra's struct mode refuses keys a config file does not declare; these two nodes are left open
    (config.yaml names this schema first in its defaults list), so a loader registered in
    preference_datasets.py needs no edit of config.yaml. dataset_config_problems then refuses the
    names and options no row declares, before any weights load.
    """
    from hydra.core.config_store import ConfigStore  # imported here: only composing a config needs it

    open_nodes = {key: OmegaConf.create({}, flags={"struct": False}) for key in ("dataset_paths", "dataset_options")}
    ConfigStore.instance().store(name=CONFIG_SCHEMA_NAME, node=OmegaConf.create(open_nodes))
