"""The dataset registry: one row per named dataset, declared by @register_dataset on its loader.

A row says all that the rest of the code needs to know about a dataset: its name in
`datasets=[...]`, where it is read from by default (its Hub id), its settings (keep_prompt_end)
and its options (`dataset_options.<name>.<key>`, with their defaults). The rows of the built-in
datasets are declared in preference_datasets.py; dataset_loading.py looks them up.
"""

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # usable as a config key: dataset_paths.<name>
_OPTION_TYPES = (bool, int, float, str)


@dataclass(frozen=True)
class DatasetRow:
    """A named dataset: its loader and what the loader declares about itself."""

    name: str
    loader: Callable[..., Mapping]
    source: str | None  # the Hub id (or a folder) read when dataset_paths.<name> is null; None: the loader takes none
    keep_prompt_end: bool  # an over-long prompt keeps its end (the last turns of a dialogue), not its start
    options: Mapping[str, object]  # dataset_options.<name>.<key> -> its default; each is a keyword of the loader
    reads_sft_splits: bool  # the loader takes sft_mode: SFT reads other splits than the preference losses

    @property
    def truncation_mode(self) -> str:
        return "keep_end" if self.keep_prompt_end else "keep_start"

    def option_problems(self, options: Mapping | None) -> list[str]:
        """What is wrong with dataset_options.<name>: keys the loader does not declare, values of the wrong type."""
        if options is None:
            return []
        if not isinstance(options, Mapping):
            return [f"dataset_options.{self.name}={options!r}: must be a mapping of option names to values."]
        problems = []
        unknown = [key for key in options if key not in self.options]
        if unknown:
            declared = ", ".join(self.options) or "none"
            problems.append(
                f"dataset_options.{self.name} sets {unknown}, which {self.loader.__name__} does not take "
                f"(its options: {declared}); remove them."
            )
        for key, value in options.items():
            default = self.options.get(key)
            if key in self.options and not _fits(value, default):
                problems.append(
                    f"dataset_options.{self.name}.{key}={value!r}: must be a {type(default).__name__}, "
                    f"like its default {default!r}."
                )
        return problems

    def load(self, split: str, *, source: str | None, cache_dir: str | None, sft_mode: bool, options: Mapping):
        """Call the loader with what it declares: source and cache_dir, sft_mode, each option (else its default)."""
        arguments = {**self.options, **options}
        if self.source is not None:
            arguments["source"] = self.source if source is None else source
            arguments["cache_dir"] = cache_dir
        if self.reads_sft_splits:
            arguments["sft_mode"] = sft_mode
        return self.loader(split, **arguments)


def _fits(value, default) -> bool:
    """Whether an option's value has its default's type (an int serves a float; None serves any, any serves None)."""
    if value is None or default is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return type(value) is type(default)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


DATASETS: dict[str, DatasetRow] = {}  # name -> row, in registration order


def register_dataset(
    name: str,
    *,
    source: str | None = None,
    keep_prompt_end: bool = False,
    options: Mapping[str, object] | None = None,
    reads_sft_splits: bool = False,
) -> Callable[[Callable], Callable]:
    """Declare a loader as the dataset `name` (usable as `datasets=[name]`); returns the loader unchanged.

    The loader is called as loader(split, **arguments), the arguments being:
    - source, cache_dir: when `source` (its Hub id, or a default folder) is given. `source` is
      dataset_paths.<name> when set, else this; cache_dir is where `datasets` keeps downloads.
    - sft_mode: when reads_sft_splits (SFT reads other splits than the preference losses).
    - each option: dataset_options.<name>.<option>, else its default here.
    keep_prompt_end: an over-long prompt keeps its end (the last turns of a dialogue), not its start.
    """
    options = dict(options or {})
    if not _NAME.fullmatch(name):
        raise ValueError(f"Dataset name {name!r}: use letters, digits and underscores (it is a config key).")
    for key, default in options.items():
        if not (_NAME.fullmatch(key) and (default is None or isinstance(default, _OPTION_TYPES))):
            raise ValueError(f"Dataset {name!r}, option {key!r}={default!r}: need a plain name and a scalar default.")
    reserved = {"source", "cache_dir", "sft_mode"} & set(options)
    if reserved:
        raise ValueError(f"Dataset {name!r}: options {sorted(reserved)} are set by the registry, not by options.")

    def register(loader: Callable) -> Callable:
        known = DATASETS.get(name)
        if known is not None and (known.loader.__module__, known.loader.__qualname__) != (
            loader.__module__,
            loader.__qualname__,
        ):
            raise ValueError(
                f"Dataset {name!r} is already registered by {known.loader.__module__}.{known.loader.__qualname__}."
            )
        DATASETS[name] = DatasetRow(name, loader, source, keep_prompt_end, options, reads_sft_splits)
        return loader

    return register
