"""Loading, parsing, tokenizing, batching and padding of preference data, offline.

The built-in datasets are read from fixtures in their real Hub repository layouts
(tests/dataset_fixtures.py), the way a user passes a downloaded copy with dataset_paths.
"""

import os

# before anything imports huggingface_hub, which reads these once
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
import random
import time

import numpy as np
import pytest
import torch
from dataset_fixtures import (
    byte_tokenizer,
    hh_prompt,
    hh_row,
    se_row,
    shp_row,
    write_hh_repo,
    write_preference_file,
    write_se_repo,
    write_shp_repo,
)

import dataset_loading
import dataset_registry
from batching import collate_prompts, iterate_batches, packed_batch, padded_batch
from data_sources import html_to_text
from dataset_files import load_preference_file
from dataset_loading import get_dataset, truncation_mode_for
from dataset_registry import register_dataset
from errors import DatasetError
from tokenization import TokenizeSettings, tokenize_datasets, tokenize_element
from tokenized_examples import TokenizedExamples


@pytest.fixture(scope="module")
def tokenizer():
    """GPT-2-like: adds no special tokens by default; one token per byte."""
    return byte_tokenizer()


@pytest.fixture(scope="module")
def bos_tokenizer():
    """Llama-like: puts BOS before every encoded text by default."""
    return byte_tokenizer(adds_bos=True)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


# ----- Anthropic HH ---------------------------------------------------------------------

SHARED = hh_prompt([("What is a good name for a cat?", " Whiskers is a classic.")], "Any others?")
ALONE = hh_prompt([], "How do I boil an egg?")
TEST_PROMPT = hh_prompt([], "Is the sky blue?")


def write_hh(root):
    return write_hh_repo(
        root,
        {
            ("harmless-base", "train"): [
                hh_row(SHARED, " Mittens.", " No."),
                hh_row(ALONE, " Put it in boiling water.", " Why?"),
            ],
            ("helpful-base", "train"): [hh_row(SHARED, " Felix or Tom.", " Cats are bad.")],
            ("helpful-online", "test"): [hh_row(TEST_PROMPT, " Yes, by day.", " No.")],
        },
    )


def test_hh_from_a_local_copy_splits_dialogues_at_the_last_assistant_turn(tmp_path):
    hh_dir = write_hh(tmp_path / "hh-rlhf")
    train = get_dataset("hh", "train", cache_dir=str(tmp_path / "cache"), dataset_paths={"hh": str(hh_dir)})
    # rows sharing a prompt (here across subsets) append their responses; the red-team file is not read
    assert train == {
        SHARED: {
            "responses": [" Mittens.", " No.", " Felix or Tom.", " Cats are bad."],
            "pairs": [(0, 1), (2, 3)],
            "sft_target": " Felix or Tom.",
        },
        ALONE: {
            "responses": [" Put it in boiling water.", " Why?"],
            "pairs": [(0, 1)],
            "sft_target": " Put it in boiling water.",
        },
    }
    assert SHARED.endswith("\n\nHuman: Any others?\n\nAssistant:") and SHARED.count("\n\nAssistant:") == 2
    test = get_dataset("hh", "test", cache_dir=str(tmp_path / "cache"), dataset_paths={"hh": str(hh_dir)})
    assert list(test) == [TEST_PROMPT]


def test_hh_skips_rows_whose_conversations_differ_before_the_last_turn(tmp_path, capsys):
    bad = {
        "chosen": hh_prompt([("Hi", " Hello.")], "Bye") + " Bye!",
        "rejected": hh_prompt([("Hi", " Go away.")], "Bye") + " Bye!",
    }
    hh_dir = write_hh_repo(tmp_path / "hh-rlhf", {("harmless-base", "train"): [hh_row(ALONE, " A.", " B."), bad]})
    data = get_dataset("hh", "train", cache_dir=str(tmp_path / "cache"), dataset_paths={"hh": str(hh_dir)})
    assert list(data) == [ALONE]
    assert (
        "skipped 1 row(s) because its rejected conversation differs before the last Assistant turn (row indices 1)"
        in capsys.readouterr().out
    )


# ----- SHP -----------------------------------------------------------------------------------


def test_shp_keeps_pairs_with_score_ratio_at_least_2_and_deduplicates_responses(tmp_path):
    history = "What should I read before my PhD?"
    shp_dir = write_shp_repo(
        tmp_path / "SHP",
        {
            ("askacademia", "train"): [
                shp_row(history, "Read papers.", "Read novels.", 30, 10),
                shp_row(history, "Read novels.", "Sleep instead.", 10, 40),  # B preferred; "Read novels." again
                shp_row(history, "Read papers.", "Nothing.", 30, 20),  # ratio 1.5: dropped
                shp_row(
                    history, "Read papers.", "Nothing.", 90, 30
                ),  # another comment with the same text, scored higher
                shp_row("Too close to call?", "Yes.", "No.", 5, 4),  # only pair dropped: prompt omitted
            ],
            ("askphysics", "train"): [shp_row("Why is the sky blue?", "Rayleigh scattering.", "Magic.", 8, 2)],
            ("askacademia", "validation"): [shp_row("Validation question?", "A.", "B.", 9, 3)],
            ("askacademia", "test"): [shp_row("Test question?", "A.", "B.", 9, 3)],
        },
    )
    paths = {"shp": str(shp_dir)}
    train = get_dataset("shp", "train", cache_dir=str(tmp_path / "cache"), dataset_paths=paths)
    prompt = "\n\nHuman: What should I read before my PhD?\n\nAssistant:"
    assert train == {
        prompt: {
            "responses": [" Read papers.", " Read novels.", " Sleep instead.", " Nothing."],
            "pairs": [(0, 1), (2, 1), (0, 3)],
            "sft_target": " Read papers.",  # its best score, 90, beats " Sleep instead." at 40
        },
        "\n\nHuman: Why is the sky blue?\n\nAssistant:": {
            "responses": [" Rayleigh scattering.", " Magic."],
            "pairs": [(0, 1)],
            "sft_target": " Rayleigh scattering.",
        },
    }
    for split, question in (("validation", "Validation question?"), ("test", "Test question?")):
        data = get_dataset("shp", split, cache_dir=str(tmp_path / "cache"), dataset_paths=paths)
        assert list(data) == [f"\n\nHuman: {question}\n\nAssistant:"]


def test_shp_computes_the_score_ratio_when_the_field_is_absent(tmp_path):
    rows = [shp_row("Q1?", "Good.", "Bad.", 20, 10), shp_row("Q2?", "Good.", "Bad.", 19, 10)]
    for row in rows:
        del row["score_ratio"]
    shp_dir = write_shp_repo(tmp_path / "SHP", {("askculinary", "train"): rows})
    data = get_dataset("shp", "train", cache_dir=str(tmp_path / "cache"), dataset_paths={"shp": str(shp_dir)})
    assert list(data) == ["\n\nHuman: Q1?\n\nAssistant:"]


# ----- Stack Exchange ------------------------------------------------------------------------


def test_html_to_text_keeps_text_and_turns_blocks_into_line_breaks():
    html = (
        "<p>I fit a <strong>model</strong> with <code>lm()</code> &amp; got:</p>\n\n"
        "<pre><code>fit &lt;- lm(y ~ x)\n  summary(fit)\n</code></pre>\n\n"
        "<ul>\n<li>first</li>\n<li>second<br>line</li>\n<li><p>third</p></li>\n</ul>\n<p>Thanks!</p>"
    )
    assert html_to_text(html) == (
        "I fit a model with lm() & got:\n\nfit <- lm(y ~ x)\n  summary(fit)\n\n"
        "- first\n- second\nline\n- third\n\nThanks!"
    )


def write_se(root, n_questions: int):
    rows = [
        se_row(
            i,
            f"<p>Question {i}?</p>",
            [(f"<p>Answer {i}a</p>", 3), (f"<p>Answer {i}b</p>", 1), (f"<p>Answer {i}c</p>", 1)],
        )
        for i in range(n_questions)
    ]
    return write_se_repo(
        root, {"stats.stackexchange.com": rows[: n_questions // 2], "Stackoverflow.com": rows[n_questions // 2 :]}
    )


def test_se_pairs_answers_with_different_scores_from_plain_text(tmp_path):
    rows = [
        se_row(
            1,
            "<p>How do I <em>center</em> a div?</p>",
            [("<p>Use flexbox.</p>", 2), ("<p>Use a table.</p>", 0), ("<p>Margins.</p>", 2)],
        ),
        se_row(2, "<p>Is this a tie?</p>", [("<p>Yes.</p>", 1), ("<p>No.</p>", 1)]),
    ]
    se_dir = write_se_repo(tmp_path / "se", {"webmasters.stackexchange.com": rows})
    # with 2 questions the 1% test share is empty, so train holds everything
    data = get_dataset("se", "train", cache_dir=str(tmp_path / "cache"), dataset_paths={"se": str(se_dir)})
    assert data == {
        "\n\nHuman: How do I center a div?\n\nAssistant:": {
            "responses": [" Use flexbox.", " Use a table.", " Margins."],
            "pairs": [(0, 1), (2, 1)],  # the tie between 0 and 2 makes no pair
            "sft_target": " Use flexbox.",
        }
    }


def test_se_holds_out_the_first_percent_of_the_seed_42_shuffle(tmp_path):
    n_questions = 300
    se_dir = write_se(tmp_path / "se", n_questions)
    paths, cache = {"se": str(se_dir)}, str(tmp_path / "cache")
    test = get_dataset("se", "test", cache_dir=cache, dataset_paths=paths)
    train = get_dataset("se", "train", cache_dir=cache, dataset_paths=paths)
    assert len(test) == 3 and len(train) == n_questions - 3
    assert not set(test) & set(train)
    # the reference scripts' split: datasets' shuffle(seed=42) is numpy's default_rng(42) permutation
    # of the rows, which come file by file in sorted path order (data/Stackoverflow.com first)
    qids_in_row_order = list(range(150, 300)) + list(range(150))
    held_out_qids = [qids_in_row_order[i] for i in np.random.default_rng(42).permutation(n_questions)[:3]]
    assert list(test) == [f"\n\nHuman: Question {qid}?\n\nAssistant:" for qid in held_out_qids]
    assert get_dataset("se", "test", cache_dir=cache, dataset_paths=paths) == test


# ----- Hub errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "source", "hub_id"),
    [
        ("hh", "example-org/hh-mirror", "Anthropic/hh-rlhf"),
        ("se", "example-org/se-mirror", "HuggingFaceH4/stack-exchange-preferences"),
    ],
)
def test_unreachable_hub_fails_fast_with_the_way_out(tmp_path, name, source, hub_id):
    # sources no Hub cache holds, so the test means the same on every machine
    start = time.monotonic()
    with pytest.raises(DatasetError) as error:
        get_dataset(name, "train", cache_dir=str(tmp_path / "cache"), dataset_paths={name: source})
    assert time.monotonic() - start < 5
    message = str(error.value)
    assert f"Could not load dataset '{name}' from '{source}'" in message
    assert "cannot reach the Hugging Face Hub" in message
    assert (
        f"hf download --repo-type dataset {hub_id} --local-dir DIR" in message
        and f"dataset_paths.{name}=DIR" in message
    )


def test_missing_local_copy_names_the_setting(tmp_path):
    with pytest.raises(DatasetError, match=r"dataset_paths.shp=.*nowhere: no such directory"):
        get_dataset("shp", "train", dataset_paths={"shp": str(tmp_path / "nowhere")})


def test_local_copy_of_another_dataset_is_reported(tmp_path):
    shp_dir = write_shp_repo(tmp_path / "SHP", {("askacademia", "train"): [shp_row("Q?", "A.", "B.", 9, 3)]})
    with pytest.raises(
        DatasetError, match=r"Dataset 'hh' from .*lacks \['chosen', 'rejected'\]. Is this a copy of Anthropic/hh-rlhf"
    ):
        get_dataset("hh", "train", cache_dir=str(tmp_path / "cache"), dataset_paths={"hh": str(shp_dir)})


def test_unknown_split_is_reported_before_loading():
    with pytest.raises(DatasetError, match="Dataset 'se' has splits 'train' and 'test', not 'validation'"):
        get_dataset("se", "validation")


# ----- user files --------------------------------------------------------------------------


def preference_rows(n_prompts: int) -> list[dict]:
    return [{"prompt": f"Q{i}?", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(n_prompts)]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_user_file_holds_out_a_deterministic_disjoint_slice(tmp_path, suffix):
    rows = preference_rows(40) + [
        {"prompt": "Q0?", "chosen": " good 0", "rejected": " worse 0"},
        {"prompt": "Q1?", "chosen": " good 1", "rejected": " good 1"},  # a tie teaches nothing: no pair
    ]
    path = str(write_preference_file(tmp_path / f"prefs{suffix}", rows))
    train, test = get_dataset(path, "train"), get_dataset(path, "test")
    assert len(test) == 2 and len(train) == 38  # 5% of 40 prompts
    assert not set(train) & set(test) and set(train) | set(test) == {row["prompt"] for row in rows}
    both = {**train, **test}
    assert both["Q0?"] == {
        "responses": [" good 0", " bad 0", " worse 0"],
        "pairs": [(0, 1), (0, 2)],
        "sft_target": " good 0",
    }
    assert both["Q1?"] == {"responses": [" good 1", " bad 1"], "pairs": [(0, 1)], "sft_target": " good 1"}
    assert list(train) == [p for p in (row["prompt"] for row in rows[:40]) if p in train]  # file order
    # the held-out prompts do not depend on the order of the rows
    shuffled = tmp_path / f"shuffled{suffix}"
    write_preference_file(shuffled, random.Random(0).sample(rows, len(rows)))
    assert set(load_preference_file(str(shuffled), "test")) == set(test)


def test_json_file_may_hold_json_lines(tmp_path):
    path = tmp_path / "prefs.json"
    path.write_text("".join(json.dumps(row) + "\n" for row in preference_rows(3)))
    assert len(load_preference_file(str(path), "train")) + len(load_preference_file(str(path), "test")) == 3


@pytest.mark.parametrize(("n_prompts", "n_test"), [(1, 0), (2, 1), (30, 2)])
def test_held_out_slice_has_at_least_one_prompt_when_possible(tmp_path, n_prompts, n_test):
    path = str(write_preference_file(tmp_path / "prefs.jsonl", preference_rows(n_prompts)))
    assert len(load_preference_file(path, "test")) == n_test
    assert len(load_preference_file(path, "train")) == n_prompts - n_test


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"\n',
            r"bad.jsonl, line 2: not valid JSON",
        ),
        (
            '{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"prompt": "a", "chosen": "b"}\n',
            r"bad.jsonl, line 3: field 'rejected' is missing",
        ),
        (
            '{"prompt": "a", "chosen": "", "rejected": "c"}\n',
            r"bad.jsonl, line 1: field 'chosen' must be a non-empty string, not ''",
        ),
        (
            '{"prompt": 3, "chosen": "b", "rejected": "c"}\n',
            r"bad.jsonl, line 1: field 'prompt' must be a non-empty string, not 3",
        ),
        ('["a", "b"]\n', r"bad.jsonl, line 1: expected a JSON object"),
    ],
)
def test_malformed_rows_are_reported_with_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        get_dataset(str(path), "train")


def test_malformed_parquet_and_json_array_rows_are_reported_by_row_number(tmp_path):
    rows = preference_rows(2) + [{"prompt": "Q?", "chosen": "x", "rejected": None}]
    for suffix in (".parquet", ".json"):
        path = write_preference_file(tmp_path / f"bad{suffix}", rows)
        with pytest.raises(DatasetError, match=rf"bad\{suffix}, row 3: field 'rejected' is missing"):
            load_preference_file(str(path), "train")


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(DatasetError, match=r"missing.jsonl: no such file"):
        get_dataset(str(tmp_path / "missing.jsonl"), "train")


# ----- names and the contract ------------------------------------------------------------------


def test_unknown_dataset_lists_the_known_ones_and_file_paths():
    with pytest.raises(DatasetError) as error:
        get_dataset("hhh", "train")
    message = str(error.value)
    assert "Unknown dataset 'hhh'. Known: hh, numbers, se, shp, ultrafeedback;" in message
    assert ".jsonl/.json/.parquet" in message and "get_hhh(split" in message


@pytest.fixture
def registry():
    """The dataset registry, for a test to register loaders in; its rows are restored afterwards."""
    saved = dict(dataset_registry.DATASETS)
    yield dataset_registry.DATASETS
    dataset_registry.DATASETS.clear()
    dataset_registry.DATASETS.update(saved)


def test_a_loader_registered_in_the_module_is_a_dataset(registry):
    @register_dataset("mydata")
    def get_mydata(split):
        return {"P": {"responses": ["a", "b"], "pairs": [(1, 0)], "sft_target": "b"}}

    assert "mydata" in dataset_loading.available_datasets()
    assert get_dataset("mydata", "train")["P"]["pairs"] == [(1, 0)]
    with pytest.raises(DatasetError, match="dataset_paths.mydata is set, but get_mydata takes no source"):
        get_dataset("mydata", "train", dataset_paths={"mydata": "/some/dir"})


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        (
            {"responses": ["a", "b"], "pairs": [(0, 2)], "sft_target": "a"},
            r"pair \(0, 2\) is not two different indices into its 2 responses",
        ),
        ({"responses": ["a", "b"], "pairs": [(1, 1)], "sft_target": "a"}, r"pair \(1, 1\) is not two different"),
        ({"responses": ["a", 7], "pairs": [], "sft_target": "a"}, "responses must be a list of strings"),
        ({"responses": ["a"], "pairs": []}, r"the entry lacks \['sft_target'\]"),
        ({"responses": ["a"], "pairs": [], "sft_target": None}, "sft_target must be a string, not NoneType"),
    ],
)
def test_contract_violations_name_dataset_prompt_and_problem(registry, entry, problem):
    @register_dataset("broken")
    def get_broken(split):
        return {"x" * 200: entry}

    with pytest.raises(DatasetError, match=rf"Dataset 'broken', prompt 'x{{79}}\.\.\.: {problem}"):
        get_dataset("broken", "train")


def test_embedded_numbers_dataset_meets_the_contract():
    assert len(get_dataset("numbers", "test")) > 0


def test_truncation_mode_keeps_the_end_of_hh_dialogues_only():
    assert truncation_mode_for("hh") == "keep_end"
    assert {truncation_mode_for(name) for name in ("shp", "se", "numbers", "prefs.jsonl")} == {"keep_start"}


# ----- tokenization -----------------------------------------------------------------------------


def test_tokenize_element_appends_eos_and_masks_the_prompt(tokenizer):
    element = tokenize_element("\n\nHuman: hi\n\nAssistant:", " hello", " go away", "keep_start", tokenizer, 512, 256)
    prompt, chosen, rejected = (
        ids(tokenizer, "\n\nHuman: hi\n\nAssistant:"),
        ids(tokenizer, " hello"),
        ids(tokenizer, " go away"),
    )
    eos = tokenizer.eos_token_id
    assert element["prompt_input_ids"] == prompt
    assert element["chosen_input_ids"] == prompt + chosen + [eos]
    assert element["chosen_labels"] == [-100] * len(prompt) + chosen + [eos]
    assert element["rejected_input_ids"] == prompt + rejected + [eos]
    assert element["rejected_labels"] == [-100] * len(prompt) + rejected + [eos]
    assert element["prompt"] == "\n\nHuman: hi\n\nAssistant:"
    assert set(element) == {
        "prompt",
        "prompt_input_ids",
        "chosen_input_ids",
        "chosen_labels",
        "rejected_input_ids",
        "rejected_labels",
    }
    sft = tokenize_element("Q", " A", None, "keep_start", tokenizer, 512, 256)
    assert "rejected_input_ids" not in sft and sft["chosen_input_ids"] == ids(tokenizer, "Q") + ids(tokenizer, " A") + [
        eos
    ]


def test_bos_is_prepended_to_prompts_only_when_the_tokenizer_adds_it(tokenizer, bos_tokenizer):
    plain = tokenize_element("Q", " A", " B", "keep_start", tokenizer, 512, 256)
    with_bos = tokenize_element("Q", " A", " B", "keep_start", bos_tokenizer, 512, 256)
    bos, eos = bos_tokenizer.bos_token_id, bos_tokenizer.eos_token_id
    assert bos not in plain["chosen_input_ids"]
    assert with_bos["prompt_input_ids"] == [bos] + ids(bos_tokenizer, "Q")
    assert with_bos["chosen_input_ids"] == [bos] + ids(bos_tokenizer, "Q") + ids(bos_tokenizer, " A") + [eos]
    assert with_bos["chosen_labels"] == [-100, -100] + ids(bos_tokenizer, " A") + [eos]


# one token per character: the prompt has 10 tokens, chosen 5 + EOS, rejected 2 + EOS
PROMPT, CHOSEN, REJECTED = "abcdefghij", "12345", "xy"


@pytest.mark.parametrize(
    ("mode", "max_length", "max_prompt_length", "prompt", "chosen", "rejected_eos"),
    [
        ("keep_start", 16, 4, "abcdefghij", "12345", True),  # fits: nothing truncated, even beyond max_prompt_length
        ("keep_start", 12, 4, "abcd", "12345", True),  # prompt truncated to its first 4 tokens
        ("keep_end", 12, 4, "ghij", "12345", True),  # ... or its last 4
        ("keep_start", 8, 4, "abcd", "1234", True),  # then responses cut to 8 - 4 tokens (chosen loses EOS)
        ("keep_end", 6, 4, "ghij", "12", False),  # responses cut to 2 tokens
    ],
)
def test_truncation_shortens_the_prompt_first_then_the_responses(
    tokenizer, mode, max_length, max_prompt_length, prompt, chosen, rejected_eos
):
    element = tokenize_element(PROMPT, CHOSEN, REJECTED, mode, tokenizer, max_length, max_prompt_length)
    eos = tokenizer.eos_token_id
    chosen_ids = ids(tokenizer, chosen) + ([eos] if chosen == CHOSEN else [])
    rejected_ids = ids(tokenizer, REJECTED) + [eos] if rejected_eos else ids(tokenizer, REJECTED)
    assert len(ids(tokenizer, PROMPT)) == 10 and len(ids(tokenizer, CHOSEN)) == 5
    assert element["prompt_input_ids"] == ids(tokenizer, prompt)
    assert element["chosen_input_ids"] == ids(tokenizer, prompt) + chosen_ids
    assert element["rejected_input_ids"] == ids(tokenizer, prompt) + rejected_ids
    assert element["chosen_labels"] == [-100] * len(prompt) + chosen_ids
    assert max(len(element["chosen_input_ids"]), len(element["rejected_input_ids"])) <= max_length


def test_responses_get_all_the_room_a_short_prompt_leaves(tokenizer):
    # the prompt (3 tokens) is already within max_prompt_length, so responses get 6 - 3 tokens
    element = tokenize_element("abc", CHOSEN, REJECTED, "keep_start", tokenizer, 6, 4)
    assert element["chosen_input_ids"] == ids(tokenizer, "abc123")
    assert element["rejected_input_ids"] == ids(tokenizer, "abcxy") + [tokenizer.eos_token_id]


def test_keep_end_truncation_keeps_bos_in_front(bos_tokenizer):
    element = tokenize_element(PROMPT, CHOSEN, REJECTED, "keep_end", bos_tokenizer, 12, 4)
    assert element["prompt_input_ids"] == [bos_tokenizer.bos_token_id] + ids(bos_tokenizer, "hij")
    start = tokenize_element(PROMPT, CHOSEN, REJECTED, "keep_start", bos_tokenizer, 12, 4)
    assert start["prompt_input_ids"] == [bos_tokenizer.bos_token_id] + ids(bos_tokenizer, "abc")


def test_tokenizer_without_eos_is_rejected():
    tokenizer = byte_tokenizer()
    tokenizer.eos_token = None
    with pytest.raises(DatasetError, match="has no EOS token"):
        tokenize_element("Q", " A", " B", "keep_start", tokenizer, 64, 32)


def test_tokenize_datasets_makes_one_example_per_pair_or_per_prompt(tmp_path, tokenizer):
    rows = [
        {"prompt": "Q1?", "chosen": " yes", "rejected": " no"},
        {"prompt": "Q1?", "chosen": " yes", "rejected": " maybe"},
        {"prompt": "Q2?", "chosen": " same start, then A", "rejected": " same start, then B"},
        {"prompt": "Q3?", "chosen": " sure", "rejected": " nope"},
    ]
    path = str(write_preference_file(tmp_path / "prefs.jsonl", rows))
    split = "train" if "Q2?" in load_preference_file(path, "train") else "test"
    data = load_preference_file(path, split)
    settings = TokenizeSettings(max_length=12, max_prompt_length=4, sft_mode=False)
    pairs, n_dropped = tokenize_datasets([path], split, tokenizer, settings)
    # Q2's responses only differ after the 8 tokens that fit: nothing to train on, dropped
    assert n_dropped == 1
    expected = [(r["prompt"], r["chosen"], r["rejected"]) for r in rows if r["prompt"] in data and r["prompt"] != "Q2?"]
    # batched tokenization of the whole file gives exactly what the per-element rules give
    assert list(pairs) == [
        {**tokenize_element(*triple, "keep_start", tokenizer, 12, 4), "index": i} for i, triple in enumerate(expected)
    ]

    settings = TokenizeSettings(max_length=12, max_prompt_length=4, sft_mode=True)
    sft, n_dropped = tokenize_datasets([path], split, tokenizer, settings)
    assert n_dropped == 0
    assert list(sft) == [
        {**tokenize_element(prompt, entry["sft_target"], None, "keep_start", tokenizer, 12, 4), "index": i}
        for i, (prompt, entry) in enumerate(data.items())
    ]
    assert all("rejected_input_ids" not in e for e in sft)


def test_tokenize_datasets_keeps_the_end_of_long_hh_prompts(tmp_path, tokenizer):
    hh_dir = write_hh(tmp_path / "hh-rlhf")
    settings = TokenizeSettings(
        max_length=24,
        max_prompt_length=16,
        sft_mode=False,
        datasets_cache_dir=str(tmp_path / "cache"),
        dataset_paths={"hh": str(hh_dir)},
    )
    examples, _ = tokenize_datasets(["hh"], "train", tokenizer, settings)
    assert len(examples) == 3
    assert examples[0]["prompt"] == SHARED
    assert examples[0]["prompt_input_ids"] == ids(tokenizer, SHARED)[-16:]


# ----- TokenizedExamples --------------------------------------------------------------------


def tokenized_file(tmp_path, tokenizer, rows: list[dict], sft_mode: bool = False) -> TokenizedExamples:
    """The train split (95% of the prompts) of a user file of these rows."""
    path = tmp_path / "prefs.jsonl"
    if not path.exists():
        write_preference_file(path, rows)
    examples, _ = tokenize_datasets([str(path)], "train", tokenizer, TokenizeSettings(32, 8, sft_mode=sft_mode))
    return examples


def test_select_slices_and_index_address_examples_by_position(tmp_path, tokenizer):
    examples = tokenized_file(tmp_path, tokenizer, preference_rows(8))
    n = len(examples)
    assert [e["index"] for e in examples] == list(range(n)) and n >= 5
    chosen = examples.select([3, 0, 3])
    assert len(chosen) == 3 and [e["index"] for e in chosen] == [0, 1, 2]
    assert chosen[0] == {**examples[3], "index": 0} and chosen[1] == {**examples[0], "index": 1}
    assert chosen.select([1])[0] == {**examples[0], "index": 0}  # a selection of a selection
    assert examples[-1] == {**examples[n - 1], "index": n - 1}
    window = examples[1:4]
    assert isinstance(window, TokenizedExamples) and list(window) == list(examples.select([1, 2, 3]))
    as_list = list(window)
    assert torch.equal(
        padded_batch([e["chosen_input_ids"] for e in window], [e["chosen_labels"] for e in window], 0)["labels"],
        padded_batch([e["chosen_input_ids"] for e in as_list], [e["chosen_labels"] for e in as_list], 0)["labels"],
    )
    with pytest.raises(IndexError):
        examples[n]
    with pytest.raises(IndexError, match="select: positions must lie in"):
        examples.select([0, n])


def test_fingerprint_names_the_content_whichever_way_it_was_selected(tmp_path, tokenizer):
    examples = tokenized_file(tmp_path, tokenizer, preference_rows(8))
    n = len(examples)
    assert len(examples.fingerprint) == 64 and int(examples.fingerprint, 16) >= 0
    assert examples.select(range(n)).fingerprint == examples[:].fingerprint == examples.fingerprint
    reordered = examples.select([2, 0])
    assert reordered.fingerprint not in (examples.fingerprint, examples.select([0, 2]).fingerprint)
    assert reordered.fingerprint == examples.select([1, 2, 0]).select([1, 2]).fingerprint
    assert (
        tokenized_file(tmp_path, tokenizer, preference_rows(8)).fingerprint == examples.fingerprint
    )  # the same file again


def test_lengths_are_the_sequence_lengths_without_building_examples(tmp_path, tokenizer):
    rows = preference_rows(8) + [
        {"prompt": "Q1?", "chosen": " good 1 " + "x" * 40, "rejected": " bad"}
    ]  # truncated to 32
    examples = tokenized_file(tmp_path, tokenizer, rows)
    chosen_lengths, rejected_lengths = examples.lengths
    assert chosen_lengths.tolist() == [len(e["chosen_input_ids"]) for e in examples]
    assert rejected_lengths.tolist() == [len(e["rejected_input_ids"]) for e in examples]
    assert chosen_lengths.max() == 32
    selection = examples.select([2, 1])
    assert selection.lengths[0].tolist() == [len(examples[2]["chosen_input_ids"]), len(examples[1]["chosen_input_ids"])]
    sft = tokenized_file(tmp_path, tokenizer, rows, sft_mode=True)  # the same file
    assert not sft.has_rejected and sft.lengths[1].tolist() == [0] * len(sft)
    assert sft.lengths[0].tolist() == [len(e["chosen_input_ids"]) for e in sft]


# ----- the tokenized cache ----------------------------------------------------------------------


def cache_rows() -> list[dict]:
    # Q2's responses differ in their 12th token: a pair cut to 9 identical tokens at max_length=12, whole at 16
    return preference_rows(6) + [{"prompt": "Q2?", "chosen": " same stub A", "rejected": " same stub B"}]


def tokenize_with_cache(tmp_path, names, tokenizer, tokenized_cache_dir, max_length=12, sft_mode=False):
    settings = TokenizeSettings(
        max_length=max_length,
        max_prompt_length=4,
        sft_mode=sft_mode,
        datasets_cache_dir=str(tmp_path / "datasets-cache"),
        dataset_paths={"hh": str(tmp_path / "hh-rlhf")},
        tokenized_cache_dir=tokenized_cache_dir,
    )
    return tokenize_datasets(names, "train", tokenizer, settings)


@pytest.mark.parametrize("sft_mode", [False, True])
def test_cache_hit_gives_the_same_examples_without_loading_the_data(tmp_path, tokenizer, monkeypatch, capsys, sft_mode):
    write_hh(tmp_path / "hh-rlhf")
    names = ["hh", str(write_preference_file(tmp_path / "prefs.jsonl", cache_rows()))]
    cache = str(tmp_path / "tokenized")
    fresh, fresh_dropped = tokenize_with_cache(tmp_path, names, tokenizer, None, sft_mode=sft_mode)
    first, first_dropped = tokenize_with_cache(tmp_path, names, tokenizer, cache, sft_mode=sft_mode)
    entries = sorted((tmp_path / "tokenized").iterdir())
    mode = "sft" if sft_mode else "pairs"
    assert [path.name.split("-")[:3] for path in entries] == [["hh", "train", mode], ["prefs.jsonl", "train", mode]]

    def no_loading(*args, **kwargs):
        raise AssertionError("a cache hit must not load the raw data")

    monkeypatch.setattr(dataset_loading, "get_dataset", no_loading)
    capsys.readouterr()
    second, second_dropped = tokenize_with_cache(tmp_path, names, tokenizer, cache, sft_mode=sft_mode)
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"tokenized {name} train: loaded from cache {path}" for name, path in zip(names, entries)]
    # the datasets concatenated in the order given, every key of every example the same
    assert list(second) == list(first) == list(fresh)
    assert fresh[0]["prompt"] == SHARED and fresh[-1]["prompt"].startswith("Q")
    assert second_dropped == first_dropped == fresh_dropped == (0 if sft_mode else 1)
    assert second.fingerprint == first.fingerprint == fresh.fingerprint


def test_another_max_length_reuses_the_cached_tokens(tmp_path, tokenizer, monkeypatch):
    write_hh(tmp_path / "hh-rlhf")
    names = ["hh", str(write_preference_file(tmp_path / "prefs.jsonl", cache_rows()))]
    cache = str(tmp_path / "tokenized")
    short, n_dropped_short = tokenize_with_cache(tmp_path, names, tokenizer, cache, max_length=12)
    fresh, n_dropped_fresh = tokenize_with_cache(tmp_path, names, tokenizer, None, max_length=16)

    def no_loading(*args, **kwargs):
        raise AssertionError("the cached tokens serve every max_length")

    monkeypatch.setattr(dataset_loading, "get_dataset", no_loading)
    longer, n_dropped = tokenize_with_cache(tmp_path, names, tokenizer, cache, max_length=16)
    assert list(longer) == list(fresh) != list(short) and n_dropped == n_dropped_fresh == 0 != n_dropped_short
    assert longer.fingerprint == fresh.fingerprint != short.fingerprint
    assert len(list((tmp_path / "tokenized").iterdir())) == 2


def test_another_tokenizer_or_changed_data_give_a_new_key_and_fresh_examples(tmp_path, tokenizer):
    path = write_preference_file(tmp_path / "prefs.jsonl", cache_rows())
    write_hh(tmp_path / "hh-rlhf")
    names, cache = ["hh", str(path)], str(tmp_path / "tokenized")
    first, _ = tokenize_with_cache(tmp_path, names, tokenizer, cache)

    def changed(n_entries: int, with_tokenizer=tokenizer) -> TokenizedExamples:
        examples, _ = tokenize_with_cache(tmp_path, names, with_tokenizer, cache)
        fresh, _ = tokenize_with_cache(tmp_path, names, with_tokenizer, None)
        assert examples.fingerprint != first.fingerprint and list(examples) == list(fresh) != list(first)
        assert len(list((tmp_path / "tokenized").iterdir())) == n_entries  # a new entry per changed dataset
        return examples

    bos_tokenizer = byte_tokenizer(adds_bos=True)
    assert changed(4, with_tokenizer=bos_tokenizer)[0]["prompt_input_ids"][0] == bos_tokenizer.bos_token_id
    # an edit that keeps the file's size is caught by its modification time
    path.write_text(path.read_text().replace("good", "fine"))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    from_file = [e for e in changed(5) if not e["prompt"].startswith("\n\n")]
    assert from_file and all(" fine " in tokenizer.decode(e["chosen_input_ids"]) for e in from_file)
    # new contents of the local copy of the Hub repository
    write_hh_repo(tmp_path / "hh-rlhf", {("harmless-base", "train"): [hh_row(ALONE, " Boil it.", " Fry it.")]})
    assert [e["prompt"] for e in changed(6) if e["prompt"].startswith("\n\n")] == [ALONE]


def test_a_python_tokenizer_is_keyed_by_its_saved_files(tmp_path):
    from transformers import ByT5Tokenizer

    path = str(write_preference_file(tmp_path / "prefs.jsonl", cache_rows()))
    cache = str(tmp_path / "tokenized")
    first, _ = tokenize_with_cache(tmp_path, [path], ByT5Tokenizer(), cache)
    second, _ = tokenize_with_cache(tmp_path, [path], ByT5Tokenizer(), cache)
    other, _ = tokenize_with_cache(tmp_path, [path], ByT5Tokenizer(extra_ids=10), cache)
    assert first.fingerprint == second.fingerprint != other.fingerprint
    assert len(list((tmp_path / "tokenized").iterdir())) == 2


def corrupt_by_truncating(path):
    path.write_bytes(path.read_bytes()[:100])


def corrupt_spans(path):
    with np.load(path) as stored:
        arrays = dict(stored)
    np.savez(path, **{**arrays, "response_token_spans": arrays["response_token_spans"] + 1000})


def corrupt_key(path):  # e.g. an entry copied over another
    with np.load(path) as stored:
        arrays = dict(stored)
    np.savez(path, **{**arrays, "key": np.frombuffer(b"0" * 64, dtype=np.uint8)})


def corrupt_by_overwriting(path):
    path.write_bytes(b"not a zip")


@pytest.mark.parametrize("corrupt", [corrupt_by_truncating, corrupt_by_overwriting, corrupt_spans, corrupt_key])
def test_an_unreadable_cache_entry_is_rebuilt(tmp_path, tokenizer, capsys, corrupt):
    names = [str(write_preference_file(tmp_path / "prefs.jsonl", cache_rows()))]
    cache = str(tmp_path / "tokenized")
    first, _ = tokenize_with_cache(tmp_path, names, tokenizer, cache)
    [entry] = (tmp_path / "tokenized").iterdir()
    corrupt(entry)
    capsys.readouterr()
    rebuilt, n_dropped = tokenize_with_cache(tmp_path, names, tokenizer, cache)
    assert f"the cache entry {entry} is unreadable" in capsys.readouterr().out
    assert list(rebuilt) == list(first) and n_dropped == 1
    tokenize_with_cache(tmp_path, names, tokenizer, cache)
    assert capsys.readouterr().out.startswith(f"tokenized {names[0]} train: loaded from cache {entry}")


def test_an_interrupted_write_leaves_no_entry_and_a_failed_one_only_a_note(tmp_path, tokenizer, monkeypatch, capsys):
    names = [str(write_preference_file(tmp_path / "prefs.jsonl", cache_rows()))]
    cache = tmp_path / "tokenized"

    def write_half_then(error):
        def savez(file, **arrays):
            file.write(b"PK\x03\x04 half an entry")
            raise error

        return savez

    monkeypatch.setattr(np, "savez", write_half_then(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        tokenize_with_cache(tmp_path, names, tokenizer, str(cache))
    assert list(cache.iterdir()) == []
    monkeypatch.setattr(np, "savez", write_half_then(OSError(28, "No space left on device")))
    examples, _ = tokenize_with_cache(tmp_path, names, tokenizer, str(cache))
    assert "could not cache the tokens at" in capsys.readouterr().out and list(cache.iterdir()) == []
    monkeypatch.undo()
    assert list(tokenize_with_cache(tmp_path, names, tokenizer, str(cache))[0]) == list(examples)
    assert len(list(cache.iterdir())) == 1


# ----- batching --------------------------------------------------------------------------------

EXAMPLES = [{"id": i} for i in range(10)]


def batch_ids(batches) -> list[list[int]]:
    return [[e["id"] for e in batch] for batch in batches]


def test_batches_without_shuffle_keep_order_and_drop_last_is_explicit():
    assert batch_ids(iterate_batches(EXAMPLES, 4, shuffle=False, seed=0, drop_last=True)) == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
    ]
    assert batch_ids(iterate_batches(EXAMPLES, 4, shuffle=False, seed=0, n_epochs=1, drop_last=False)) == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9],
    ]


def test_shuffle_order_is_fixed_by_the_seed_and_changes_every_epoch():
    def order(seed):
        return batch_ids(iterate_batches(EXAMPLES, 5, shuffle=True, seed=seed, n_epochs=2))

    assert order(3) == order(3)
    assert order(3) != order(4)
    epochs = [list(range(10)), list(range(10))]
    random.Random(3).shuffle(epochs[0])
    random.Random(4).shuffle(epochs[1])
    assert order(3) == [epochs[0][:5], epochs[0][5:], epochs[1][:5], epochs[1][5:]]


def test_n_examples_stops_training_across_epochs_with_full_batches():
    batches = batch_ids(iterate_batches(EXAMPLES, 4, shuffle=False, seed=0, n_examples=14))
    # each epoch drops its partial batch [8, 9]; the 2 examples beyond 12 do not fill a batch
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]
    assert batch_ids(iterate_batches(EXAMPLES, 4, shuffle=False, seed=0, n_examples=6, drop_last=False)) == [
        [0, 1, 2, 3],
        [4, 5],
    ]
    # whichever of n_epochs and n_examples comes first
    assert len(list(iterate_batches(EXAMPLES, 2, shuffle=True, seed=0, n_epochs=1, n_examples=100))) == 5
    assert len(list(iterate_batches(EXAMPLES, 2, shuffle=True, seed=0, n_epochs=3, n_examples=8))) == 4


def test_fewer_examples_than_one_batch_is_an_error():
    with pytest.raises(DatasetError, match="Only 3 examples, fewer than batch_size=4"):
        list(iterate_batches(EXAMPLES[:3], 4, shuffle=True, seed=0))
    assert batch_ids(iterate_batches(EXAMPLES[:3], 4, shuffle=False, seed=0, n_epochs=1, drop_last=False)) == [
        [0, 1, 2]
    ]


# ----- padding ----------------------------------------------------------------------------------


def pair(prompt, chosen, rejected):
    return {
        "prompt_input_ids": prompt,
        "chosen_input_ids": prompt + chosen,
        "chosen_labels": [-100] * len(prompt) + chosen,
        "rejected_input_ids": prompt + rejected,
        "rejected_labels": [-100] * len(prompt) + rejected,
    }


def test_padded_batch_right_pads_chosen_and_rejected_to_one_length():
    pairs = [pair([5, 6], [7], [8, 9, 10]), pair([11], [12, 13], [14])]
    sides = ("chosen", "rejected")
    batch = padded_batch(
        [e[f"{s}_input_ids"] for s in sides for e in pairs], [e[f"{s}_labels"] for s in sides for e in pairs], 0
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [11, 12, 13, 0, 0], [5, 6, 8, 9, 10], [11, 14, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["labels"].tolist() == [
        [-100, -100, 7, -100, -100],
        [-100, 12, 13, -100, -100],
        [-100, -100, 8, 9, 10],
        [-100, 14, -100, -100, -100],
    ]
    assert all(t.dtype == torch.long for t in batch.values())


def test_packed_batch_places_sequences_with_their_own_positions():
    sequences = [[5, 6, 7], [8, 9], [1, 2, 3, 4, 5, 6]]
    labels = [[-100, 6, 7], [-100, 9], [-100, -100, 3, 4, 5, 6]]
    batch = packed_batch(sequences, labels, pad_token_id=0, row_tokens=6)
    # longest first, first fit: row 0 holds sequence 2; row 1 holds sequences 0 and 1
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6], [5, 6, 7, 8, 9, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 0]]
    assert batch["sequence_ids"].tolist() == [[2, 2, 2, 2, 2, 2], [0, 0, 0, 1, 1, -1]]
    # a sequence's first token is never a label: it would be predicted from the sequence before it
    assert batch["labels"].tolist() == [[-100, -100, 3, 4, 5, 6], [-100, 6, 7, -100, 9, -100]]


def test_collate_prompts_left_pads_for_generation():
    batch = collate_prompts([pair([5, 6, 7], [1], [2]), pair([8], [1], [2])], pad_token_id=0)
    assert batch["prompt_input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["prompt_attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
