"""The dataset registry and what a user meets adding data: a loader of their own, its local copy and options,
damaged files, and pairs that teach nothing.
"""

import json
import runpy
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, SMALL_MODEL, compose_config, train_records
from dataset_fixtures import byte_tokenizer, write_preference_file

import dataset_registry
import train
from config_checks import validate_config
from dataset_files import load_preference_file
from dataset_loading import get_dataset
from dataset_registry import register_dataset
from errors import ConfigError, DatasetError
from loss_registry import LossSpec
from preference_entry import PreferenceEntry, add_pair, checked_entries
from tokenization import TokenizeSettings, tokenize_datasets


@pytest.fixture
def registry():
    """The dataset registry, for a test to register loaders in; its rows are restored afterwards."""
    saved = dict(dataset_registry.DATASETS)
    yield dataset_registry.DATASETS
    dataset_registry.DATASETS.clear()
    dataset_registry.DATASETS.update(saved)


CAPITALS = {"France": ("Paris", "Lyon"), "Italy": ("Rome", "Milan"), "Spain": ("Madrid", "Seville")}


def write_capitals_copy(folder: Path, n_rows: int = 24) -> Path:
    """A local copy of a user's dataset: {train,test}.jsonl of question/good/bad rows."""
    folder.mkdir(parents=True)
    countries = list(CAPITALS.items())
    for split, count in (("train", n_rows), ("test", 8)):
        rows = []
        for number in range(count):
            country, (good, bad) = countries[number % len(countries)]
            rows.append({"question": f"Capital of {country}, #{number} {split}?", "good": good, "bad": bad})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def register_capitals() -> None:
    """The README's worked example: a loader with a source (a Hub id by default) and one option."""

    @register_dataset("capitals", source="example-org/capitals", options={"lowercase": False})
    def get_capitals(split: str, source: str, cache_dir: str | None, lowercase: bool = False) -> dict:
        data = {}
        for line in (Path(source) / f"{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            good, bad = (row[side].lower() if lowercase else row[side] for side in ("good", "bad"))
            add_pair(data, f"\n\nHuman: {row['question']}\n\nAssistant:", " " + good, " " + bad)
        return data


def test_a_users_loader_reads_its_local_copy_and_options(registry, tmp_path):
    register_capitals()
    paths = {"capitals": str(write_capitals_copy(tmp_path / "capitals"))}
    data = get_dataset("capitals", "train", dataset_paths=paths, dataset_options={"capitals": {"lowercase": True}})
    first = data["\n\nHuman: Capital of France, #0 train?\n\nAssistant:"]
    assert isinstance(first, PreferenceEntry) and first == {
        "responses": [" paris", " lyon"],
        "pairs": [(0, 1)],
        "sft_target": " paris",
    }
    with pytest.raises(DatasetError, match=r"dataset_options.capitals.lowercase='yes': must be a bool"):
        get_dataset("capitals", "train", dataset_paths=paths, dataset_options={"capitals": {"lowercase": "yes"}})


def test_dataset_paths_and_options_of_a_users_loader_need_no_plus_and_misspellings_are_refused(registry, tmp_path):
    register_capitals()
    copy = write_capitals_copy(tmp_path / "capitals")
    good = ["datasets=[capitals]", f"dataset_paths.capitals={copy}", "dataset_options.capitals.lowercase=true"]
    validate_config(compose_config(good), world_size=1)
    misspelt = [
        "datasets=[capitals]",
        f"dataset_paths.capitols={copy}",
        "dataset_options.capitals.lowercas=true",
        "dataset_options.capitals.lowercase=1",
    ]
    with pytest.raises(ConfigError) as error:
        validate_config(compose_config(misspelt), world_size=1)
    problems = error.value.problems
    assert any(p.startswith("dataset_paths.capitols: no dataset is registered as 'capitols'") for p in problems)
    assert any("dataset_options.capitals sets ['lowercas'], which get_capitals does not take" in p for p in problems)
    assert any(p.startswith("dataset_options.capitals.lowercase=1: must be a bool") for p in problems)
    with pytest.raises(ConfigError, match="dataset_paths.numbers=.*takes no source"):
        validate_config(compose_config(["datasets=[numbers]", f"dataset_paths.numbers={copy}"]), world_size=1)


def test_a_users_loader_trains_from_its_local_copy_through_train_py(registry, tmp_path, monkeypatch):
    """The issue's check: a loader with a `source`, registered here, trained from dataset_paths.<name>=DIR."""
    register_capitals()
    copy = write_capitals_copy(tmp_path / "capitals")
    arguments = SMALL_MODEL + [
        "loss=dpo",
        "datasets=[capitals]",
        f"dataset_paths.capitals={copy}",
        "dataset_options.capitals.lowercase=true",
        f"local_dirs=[{tmp_path / 'runs'}]",
        f"cache_dir={tmp_path / 'cache'}",
        "batch_size=4",
        "eval_batch_size=4",
        "n_examples=8",  # two optimizer steps
        "n_eval_examples=4",
        "eval_every=1000",
        "do_first_eval=false",
        "sample_during_eval=false",
        "minimum_log_interval_secs=0",
        "plots.enabled=false",
    ]
    (tmp_path / "runs").mkdir()
    monkeypatch.setattr(sys, "argv", ["train.py", *arguments])
    # `python train.py ...` in this process, where the loader is registered: Hydra parses the overrides
    runpy.run_path(str(REPO_ROOT / "train.py"), run_name="__main__")
    (run_dir,) = (tmp_path / "runs").iterdir()
    records = train_records(run_dir)
    assert [record["counters/examples"] for record in records] == [4, 8]
    assert all("rewards_train/margins" in record for record in records)
    assert (run_dir / "LATEST" / "model.safetensors").is_file()


def test_a_loader_returning_something_malformed_is_named(registry):
    @register_dataset("lists")
    def get_lists(split: str) -> list:
        return [("P", "a", "b")]

    with pytest.raises(DatasetError, match="Dataset 'lists': the loader returned list, not a dict of prompt -> entry"):
        get_dataset("lists", "train")
    with pytest.raises(DatasetError, match=r"prompt 'P': tied \[5\] must be indices into its 1 responses"):
        checked_entries("made", {"P": PreferenceEntry(["a"], [], "a", tied=[5])})


def test_registering_a_name_that_is_no_config_key_or_taken_is_refused(registry):
    with pytest.raises(ValueError, match="letters, digits and underscores"):
        register_dataset("my-data")
    with pytest.raises(ValueError, match="already registered by preference_datasets.get_hh"):
        register_dataset("hh")(lambda split: {})


# ----- damaged files (issue 18, item 5) --------------------------------------------------------------------


def test_non_utf8_bytes_in_a_jsonl_name_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    rows = [
        {"prompt": "Q1?", "chosen": " yes", "rejected": " no"},
        {"prompt": "Caf\u00e9?", "chosen": " a", "rejected": " b"},
    ]
    path.write_bytes("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("latin-1"))
    with pytest.raises(DatasetError, match=rf"{path}, line 2: not UTF-8 text \(byte 0xe9 at column 16\)"):
        load_preference_file(str(path), "train")


def test_a_text_file_named_parquet_names_the_file(tmp_path):
    path = tmp_path / "pairs.parquet"
    path.write_text('{"prompt": "Q?", "chosen": " a", "rejected": " b"}\n')
    with pytest.raises(DatasetError, match=rf"{path}: not a readable Parquet file"):
        load_preference_file(str(path), "train")


# ----- pairs that teach nothing (issue 18, item 10) --------------------------------------------------------


def tokenize_file(path: Path, sft_mode: bool = False) -> tuple[list, int]:
    """Both splits of a file, as train.py tokenizes them, and the number of pairs dropped."""
    settings = TokenizeSettings(max_length=64, max_prompt_length=32, sft_mode=sft_mode)
    examples, n_dropped = [], 0
    for split in ("train", "test"):
        split_examples, split_dropped = tokenize_datasets([str(path)], split, byte_tokenizer(), settings)
        examples += list(split_examples)
        n_dropped += split_dropped
    return examples, n_dropped


def test_pairs_whose_chosen_equals_rejected_are_counted_as_dropped(tmp_path, capsys):
    rows = [{"prompt": f"Q{i}?", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(4)]
    rows += [
        {"prompt": "Q1?", "chosen": " good 1", "rejected": " good 1"},
        {"prompt": "Q9?", "chosen": " x", "rejected": " x"},
    ]
    examples, n_dropped = tokenize_file(write_preference_file(tmp_path / "ties.jsonl", rows))
    assert len(examples) == 4 and n_dropped == 2
    assert "pairs have the same response as chosen and as rejected" in capsys.readouterr().out
    sft, n_dropped = tokenize_file(tmp_path / "ties.jsonl", sft_mode=True)  # a tie's prompt still has a target
    assert len(sft) == 5 and n_dropped == 0


def run_config(tmp_path: Path, data: Path, loss: str) -> list[str]:
    return SMALL_MODEL + [f"loss={loss}", f"datasets=[{data}]", f"cache_dir={tmp_path / 'cache'}"]


def test_when_every_pair_is_a_tie_the_error_says_why(tmp_path):
    rows = [{"prompt": f"Q{i}?", "chosen": " same", "rejected": " same"} for i in range(4)]
    config = compose_config(run_config(tmp_path, write_preference_file(tmp_path / "ties.jsonl", rows), "dpo"))
    with pytest.raises(DatasetError, match=r"holds no usable examples: all 3 were dropped \(their chosen and rejected"):
        train.load_examples(config, LossSpec.from_config(config.loss), byte_tokenizer())


def test_messages_rows_with_a_preference_loss_are_said_to_be_sft_only(tmp_path, capsys):
    rows = [
        {"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": "Hello."}]}
        for i in range(4)
    ]
    config = compose_config(run_config(tmp_path, write_preference_file(tmp_path / "sft.jsonl", rows), "dpo"))
    with pytest.raises(DatasetError, match="holds no usable examples"):
        train.load_examples(config, LossSpec.from_config(config.loss), byte_tokenizer())
    assert "3 of 3 prompts have no preference pair, only an SFT target (`messages` rows): those rows are SFT-only" in (
        capsys.readouterr().out
    )
    sft_config = compose_config(run_config(tmp_path, tmp_path / "sft.jsonl", "sft"))
    train_examples, _ = train.load_examples(sft_config, LossSpec.from_config(sft_config.loss), byte_tokenizer())
    assert len(train_examples) == 3
