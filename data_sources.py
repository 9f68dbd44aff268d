"""Reading a dataset from the Hugging Face Hub or a local copy of its repository, and HTML to plain text."""

import os
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import TYPE_CHECKING

import console
from errors import DatasetError

if TYPE_CHECKING:
    import datasets


def looks_like_path(source: str) -> bool:
    return os.path.isabs(source) or source.startswith((".", "~")) or os.path.exists(source)


def load_hub_rows(
    name: str,
    source: str,
    split: str,
    *,
    hub_id: str,
    splits: tuple[str, ...],
    fields: tuple[str, ...],
    cache_dir: str | None,
) -> "datasets.Dataset":
    """One split of a Hub dataset (a `datasets.Dataset`), from the Hub or a local copy of its repository.

    `datasets` infers the data files of a local copy exactly as it does for the Hub repository
    (split from file names, hidden folders such as .cache/ ignored), so one call serves both.
    """
    import datasets  # imported here: slow to import, and only the Hub datasets need it

    if split not in splits:
        raise DatasetError(f"Dataset {name!r} has splits {', '.join(map(repr, splits))}, not {split!r}.")
    download = (
        f"`hf download --repo-type dataset {hub_id} --local-dir DIR` "
        "(`huggingface-cli download` in older huggingface_hub)"
    )
    is_local = looks_like_path(source)
    if is_local and not os.path.isdir(os.path.expanduser(source)):
        raise DatasetError(
            f"dataset_paths.{name}={source}: no such directory. Download it with {download} and pass that DIR."
        )
    console.say(f"Loading dataset {name!r} ({split}) from {source}")
    quiet = not console.is_main_process()
    progress_bars_were_disabled = datasets.are_progress_bars_disabled()
    if quiet:
        datasets.disable_progress_bars()
    try:
        rows = datasets.load_dataset(
            os.path.expanduser(source) if is_local else source, split=split, cache_dir=cache_dir
        )
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as error:
        if is_local:
            raise DatasetError(
                f"Could not read dataset {name!r} from the directory {source} ({error}). It should hold a copy of "
                f"the Hub repository {hub_id} as {download} leaves it."
            ) from error
        raise DatasetError(
            f"Could not load dataset {name!r} from {source!r} ({type(error).__name__}: {error}). {_hub_problem(error)} "
            f"Either download it where the Hub is reachable with {download} and pass `dataset_paths.{name}=DIR`, "
            "or run once online so the datasets cache holds it."
        ) from error
    finally:
        if quiet and not progress_bars_were_disabled:
            datasets.enable_progress_bars()
    missing = [field for field in fields if field not in rows.column_names]
    if missing:
        raise DatasetError(
            f"Dataset {name!r} from {source}: the {split} split has columns {rows.column_names} but lacks {missing}. "
            f"Is this a copy of {hub_id}?"
        )
    return rows


def iterate_rows(rows: "datasets.Dataset", batch_size: int = 1000) -> Iterator[dict]:
    """The rows of a Dataset as dicts, read a batch of columns at a time: about 10x faster than `for row in rows`."""
    for batch in rows.iter(batch_size=batch_size):
        yield from (dict(zip(batch, values)) for values in zip(*batch.values()))


def _hub_problem(error: Exception) -> str:
    import huggingface_hub.constants

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return "This machine cannot reach the Hugging Face Hub: offline mode is set (HF_HUB_OFFLINE=1)."
    if isinstance(error, ConnectionError):
        return (
            "This machine cannot reach the Hugging Face Hub (set HF_HUB_OFFLINE=1 to fail at once instead of retrying)."
        )
    return "Check the dataset id; if the Hub is unreachable from here:"


_PARAGRAPH_TAGS = {"p", "div", "pre", "blockquote", "ul", "ol", "table", "hr", "h1", "h2", "h3", "h4", "h5", "h6"}


_LINE_TAGS = {"br", "li", "tr"}


class _TextExtractor(HTMLParser):
    """Text of an HTML fragment: block elements become blank lines, <br>/<li>/<tr> line breaks.

    Whitespace inside <pre> (code) is kept as written; elsewhere runs of it collapse to one
    space, as a browser shows them.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text = ""
        self.pending_newlines = 0
        self.pre_depth = 0
        self.after_bullet = False  # "<li><p>" should read "- text", not "- " then a blank line

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._break_before(tag)
        if tag == "li":
            self._write("- ", verbatim=True)
            self.after_bullet = True
        if tag == "pre":
            self.pre_depth += 1

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._break_before(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag == "pre":
            self.pre_depth = max(self.pre_depth - 1, 0)
        self._break_before(tag)

    def handle_data(self, data: str) -> None:
        if self.pre_depth:
            self._write(data, verbatim=True)
        else:
            self._write(re.sub(r"\s+", " ", data), verbatim=False)

    def _break_before(self, tag: str) -> None:
        if self.after_bullet:
            return
        if tag in _PARAGRAPH_TAGS:
            self.pending_newlines = 2
        elif tag in _LINE_TAGS:
            self.pending_newlines = max(self.pending_newlines, 1)

    def _write(self, data: str, verbatim: bool) -> None:
        at_line_start = self.pending_newlines > 0 or not self.text or self.text.endswith("\n")
        if at_line_start and not verbatim:
            data = data.lstrip(" ")
        if not data:
            return
        if self.pending_newlines and self.text:
            self.text = self.text.rstrip(" \n") + "\n" * self.pending_newlines
        self.pending_newlines = 0
        self.after_bullet = False
        self.text += data


def html_to_text(html: str) -> str:
    """Plain text of an HTML fragment, using only the standard library's html.parser."""
    extractor = _TextExtractor()
    extractor.feed(html)
    extractor.close()
    return extractor.text.strip()
