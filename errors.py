"""The errors a user can cause and fix: each message names the setting, file or row, and the way out.

train.py reports these as one line and exit code 2; anything else is a bug and keeps its traceback.
"""


class ConfigError(ValueError):
    """One or more problems with the configuration, all reported together."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        listed = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) with the configuration:\n{listed}")


class DatasetError(ValueError):
    """A problem with the data a user asked for: it names the dataset, file or row, and the fix."""


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says how to fix it."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, folder unwritable); every rank stops with it."""


USER_ERRORS = (ConfigError, DatasetError, ModelLoadError, CheckpointWriteError)
