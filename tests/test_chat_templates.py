"""Conversational data and chat templates: file forms, UltraFeedback, hh as messages, rendered tokens, generation.

A ChatML-like Jinja template on the offline byte tokenizer stands in for a chat model's: every
ASCII byte is one token, so expected token ids are written out from the rendered text.
"""

import os

# before anything imports huggingface_hub, which reads these once
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
import time

import pytest
import torch
from conftest import SMALL_MODEL, compose_config, run_in_processes
from dataset_fixtures import (
    byte_tokenizer,
    hh_prompt,
    hh_row,
    ultrafeedback_row,
    write_hh_repo,
    write_preference_file,
    write_ultrafeedback_repo,
)
from transformers import GPT2Config, GPT2LMHeadModel

import chat_templates
from conversations import Message
from dataset_files import load_preference_file
from dataset_loading import get_dataset
from errors import DatasetError
from logprobs import IGNORE_INDEX
from tokenization import TokenizeSettings, tokenize_datasets

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# rewrites earlier turns: a user message's trailing spaces are kept only while it is the one being answered
REWRITING = CHATML.replace("m['content']", "(m['content'] if add_generation_prompt else m['content'] | trim)")


def chat_tokenizer(template: str = CHATML, adds_bos: bool = False):
    tokenizer = byte_tokenizer(adds_bos=adds_bos)
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tokenizer.chat_template = template
    return tokenizer


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def labelled(example: dict, side: str = "chosen") -> list[int]:
    return [label for label in example[f"{side}_labels"] if label != IGNORE_INDEX]


def tokenize_file(path, tokenizer, sft_mode=False, every_assistant_turn=False, max_length=256, max_prompt_length=128):
    """The examples of both splits of a file (a file of two prompts holds one out), and the number dropped."""
    examples, n_dropped = [], 0
    for split in ("train", "test"):
        settings = TokenizeSettings(max_length, max_prompt_length, sft_mode, every_assistant_turn)
        split_examples, split_dropped = tokenize_datasets([str(path)], split, tokenizer, settings)
        examples += [{key: value for key, value in e.items() if key != "index"} for e in split_examples]
        n_dropped += split_dropped
    return examples, n_dropped


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "Be brief."}


# ----- conversational files ------------------------------------------------------------


EXPECTED = {
    (Message("system", "Be brief."), Message("user", "Capital of France?")): {
        "responses": ["Paris.", "Lyon."],
        "pairs": [(0, 1)],
        "sft_target": "Paris.",
    }
}


@pytest.mark.parametrize(
    "row",
    [
        {"system": "Be brief.", "prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
        {"prompt": [SYSTEM, user("Capital of France?")], "chosen": [assistant("Paris.")], "rejected": "Lyon."},
        {
            "chosen": [SYSTEM, user("Capital of France?"), assistant("Paris.")],
            "rejected": [SYSTEM, user("Capital of France?"), assistant("Lyon.")],
        },
        {
            "system": "Be brief.",
            "chosen": [user("Capital of France?"), assistant("Paris.")],
            "rejected": [user("Capital of France?"), assistant("Lyon.")],
        },
    ],
    ids=["explicit-string-prompt", "explicit-messages", "implicit", "implicit-system-field"],
)
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_every_conversational_form_gives_the_same_conversation(tmp_path, row, suffix):
    path = write_preference_file(tmp_path / f"chat{suffix}", [row])
    assert get_dataset(str(path), "train") == EXPECTED


def test_messages_rows_are_sft_targets_and_share_prompts(tmp_path):
    rows = [
        {"messages": [user("Hi"), assistant("Hello."), user("Bye"), assistant("Bye!")]},
        {"messages": [user("Hi"), assistant("Hey.")]},
    ]
    data = load_preference_file(str(write_preference_file(tmp_path / "sft.jsonl", rows)), "train", eval_fraction=0)
    conversation = (Message("user", "Hi"), Message("assistant", "Hello."), Message("user", "Bye"))
    assert data[conversation] == {"responses": ["Bye!"], "pairs": [], "sft_target": "Bye!"}
    assert data[(Message("user", "Hi"),)]["sft_target"] == "Hey."


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": [{"role": "bot", "content": "Hi"}], "chosen": "a", "rejected": "b"}, r"message 0: expected"),
        ({"prompt": [user("Hi"), SYSTEM], "chosen": "a", "rejected": "b"}, "a system message may only come first"),
        ({"prompt": [user("Hi"), assistant("Yo")], "chosen": "a", "rejected": "b"}, "must be the user's"),
        ({"prompt": "Hi", "chosen": [assistant("a"), assistant("b")], "rejected": "b"}, "one assistant message"),
        ({"prompt": "Hi", "chosen": [user("a")], "rejected": "b"}, "one assistant message"),
        ({"messages": [user("Hi"), assistant("Yo"), user("Bye")]}, "last message must be the assistant's"),
        ({"messages": [assistant("Yo")]}, "must follow a user message"),
        (
            {"chosen": [user("Hi"), assistant("a")], "rejected": [user("Hello"), assistant("b")]},
            "chosen and rejected differ at message 0, before the last assistant turn",
        ),
        (
            {"chosen": [user("Hi"), assistant("a")], "rejected": [user("Hi"), assistant("b"), user("c")]},
            "field 'rejected': the last message must be the assistant's",
        ),
        ({"system": "S", "prompt": [SYSTEM, user("Hi")], "chosen": "a", "rejected": "b"}, "keep one"),
        ({"system": 3, "prompt": "Hi", "chosen": "a", "rejected": "b"}, "field 'system' must be a string"),
        ({"prompt": [user("Hi")], "chosen": "a"}, "field 'rejected' is missing"),
    ],
)
def test_malformed_conversational_rows_are_reported_with_file_and_line(tmp_path, row, message):
    path = write_preference_file(tmp_path / "bad.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(DatasetError, match=rf"bad.jsonl, line 2: .*{message}"):
        get_dataset(str(path), "train")


# ----- UltraFeedback and hh as messages ------------------------------------------------


def test_ultrafeedback_local_copy_reads_prefs_for_pairs_and_sft_for_sft(tmp_path):
    root = write_ultrafeedback_repo(
        tmp_path / "ultrafeedback_binarized",
        {
            "train_prefs": [ultrafeedback_row("Name a color.", "Blue.", "Dog."), ultrafeedback_row("2+2?", "4", "5")],
            "test_prefs": [ultrafeedback_row("Name a fruit.", "Apple.", "Car.")],
            "train_sft": [ultrafeedback_row("Say hi.", "Hi!", "unused")],
            # the other splits are not read, but a copy of the Hub repository has them
            **{split: [ultrafeedback_row("Unused.", "a", "b")] for split in ("test_sft", "train_gen", "test_gen")},
        },
    )
    paths = {"ultrafeedback": str(root)}
    cache = str(tmp_path / "cache")
    train = get_dataset("ultrafeedback", "train", cache_dir=cache, dataset_paths=paths)
    assert train == {
        (Message("user", "Name a color."),): {"responses": ["Blue.", "Dog."], "pairs": [(0, 1)], "sft_target": "Blue."},
        (Message("user", "2+2?"),): {"responses": ["4", "5"], "pairs": [(0, 1)], "sft_target": "4"},
    }
    test = get_dataset("ultrafeedback", "test", cache_dir=cache, dataset_paths=paths)
    assert list(test) == [(Message("user", "Name a fruit."),)]
    sft = get_dataset("ultrafeedback", "train", cache_dir=cache, dataset_paths=paths, sft_mode=True)
    assert sft == {(Message("user", "Say hi."),): {"responses": ["Hi!"], "pairs": [], "sft_target": "Hi!"}}


def test_ultrafeedback_without_the_hub_fails_fast_with_the_way_out(tmp_path):
    start = time.monotonic()
    with pytest.raises(DatasetError) as error:
        get_dataset("ultrafeedback", "train", cache_dir=str(tmp_path / "cache"))
    assert time.monotonic() - start < 5
    message = str(error.value)
    assert "cannot reach the Hugging Face Hub" in message and "dataset_paths.ultrafeedback=DIR" in message
    assert "hf download --repo-type dataset HuggingFaceH4/ultrafeedback_binarized --local-dir DIR" in message


def test_hh_as_messages_parses_dialogues_into_turns(tmp_path):
    prompt = hh_prompt([("Name a cat.", " Tom.")], "Another?")
    root = write_hh_repo(tmp_path / "hh-rlhf", {("harmless-base", "train"): [hh_row(prompt, " Felix.", " No.")]})
    paths, options = {"hh": str(root)}, {"hh": {"as_messages": True}}
    data = get_dataset("hh", "train", dataset_paths=paths, dataset_options=options)
    conversation = (Message("user", "Name a cat."), Message("assistant", "Tom."), Message("user", "Another?"))
    assert data == {conversation: {"responses": ["Felix.", "No."], "pairs": [(0, 1)], "sft_target": "Felix."}}
    with pytest.raises(DatasetError, match=r"dataset_options.hh sets \['as_message'\], which get_hh does not take"):
        get_dataset("hh", "train", dataset_paths=paths, dataset_options={"hh": {"as_message": True}})


# ----- rendered tokens ------------------------------------------------------------------


def test_prompt_and_response_tokens_are_the_template_and_what_the_answer_adds(tmp_path):
    tokenizer = chat_tokenizer()
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    path = write_preference_file(tmp_path / "chat.jsonl", [{"prompt": [user("Hi")], "chosen": "Yo", "rejected": "No"}])
    (example,), _ = tokenize_file(path, tokenizer)
    prompt = ids(tokenizer, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert example["prompt"] == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert example["prompt_input_ids"] == prompt and prompt[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    # the answer ends with the template's own end-of-turn token: not the "\n" after it, no EOS
    assert example["chosen_input_ids"] == prompt + ids(tokenizer, "Yo") + [end_of_turn]
    assert labelled(example) == ids(tokenizer, "Yo") + [end_of_turn]
    assert labelled(example, "rejected") == ids(tokenizer, "No") + [end_of_turn]
    assert example["prompt_messages"] == [user("Hi")]
    assert tokenizer.eos_token_id not in example["chosen_input_ids"]


def test_without_a_template_conversations_use_the_hh_text_format_and_eos(tmp_path):
    tokenizer = chat_tokenizer(template=None)
    path = write_preference_file(tmp_path / "chat.jsonl", [{"prompt": [user("Hi")], "chosen": "Yo", "rejected": "No"}])
    (example,), _ = tokenize_file(path, tokenizer)
    assert example["prompt_input_ids"] == ids(tokenizer, "\n\nHuman: Hi\n\nAssistant:")
    assert labelled(example) == ids(tokenizer, " Yo") + [tokenizer.eos_token_id]
    assert chat_templates.stop_token_ids(tokenizer) == [tokenizer.eos_token_id]


def test_a_template_that_writes_bos_gets_exactly_one(tmp_path):
    tokenizer = chat_tokenizer(template="{{ bos_token }}" + CHATML, adds_bos=True)
    path = write_preference_file(tmp_path / "chat.jsonl", [{"prompt": [user("Hi")], "chosen": "Yo", "rejected": "No"}])
    (example,), _ = tokenize_file(path, tokenizer)
    assert example["prompt_input_ids"][:2] == [tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("<|im_start|>")]
    assert example["chosen_input_ids"].count(tokenizer.bos_token_id) == 1


def test_rows_whose_template_rewrites_earlier_turns_are_reported_not_trained(tmp_path, capsys):
    tokenizer = chat_tokenizer(template=REWRITING)
    rows = [
        {"prompt": [user("Fine")], "chosen": "a", "rejected": "b"},
        {"prompt": [user("Spaced  ")], "chosen": "c", "rejected": "d"},  # its prompt re-renders without the spaces
    ]
    examples, _ = tokenize_file(write_preference_file(tmp_path / "chat.jsonl", rows), tokenizer)
    assert [example["prompt_messages"] for example in examples] == [[user("Fine")]]
    output = capsys.readouterr().out
    assert "left out 2 of 2 prompt-response combinations whose chat template does not extend" in output
    assert "[{'role': 'user', 'content': 'Spaced  '}] -> 'c'" in output


def test_sft_trains_the_last_assistant_turn_or_every_one(tmp_path):
    tokenizer = chat_tokenizer()
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows = [{"messages": [SYSTEM, user("Hi"), assistant("Hello."), user("Bye"), assistant("Bye!")]}]
    path = write_preference_file(tmp_path / "sft.jsonl", rows)
    (last_only,), _ = tokenize_file(path, tokenizer, sft_mode=True)
    assert labelled(last_only) == ids(tokenizer, "Bye!") + [end_of_turn]
    (every_turn,), _ = tokenize_file(path, tokenizer, sft_mode=True, every_assistant_turn=True)
    assert every_turn["chosen_input_ids"] == last_only["chosen_input_ids"]
    assert labelled(every_turn) == ids(tokenizer, "Hello.") + [end_of_turn] + ids(tokenizer, "Bye!") + [end_of_turn]
    # system and user turns, and the template's headers, stay masked
    first_turn = ids(tokenizer, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")
    assert every_turn["chosen_labels"][: len(first_turn)] == [IGNORE_INDEX] * len(first_turn)


def test_preference_pairs_score_only_the_final_assistant_turn(tmp_path):
    tokenizer = chat_tokenizer()
    row = {"prompt": [user("Hi"), assistant("Hello."), user("Bye")], "chosen": "Bye!", "rejected": "No."}
    (example,), _ = tokenize_file(write_preference_file(tmp_path / "chat.jsonl", [row]), tokenizer)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert labelled(example) == ids(tokenizer, "Bye!") + [end_of_turn]


def test_conversations_too_long_for_max_prompt_length_are_dropped_and_counted(tmp_path, capsys):
    tokenizer = chat_tokenizer()
    rows = [
        {"prompt": [user("Hi")], "chosen": "Yo", "rejected": "No"},
        {"prompt": [user("x" * 60)], "chosen": "Yo", "rejected": "No"},
    ]
    examples, n_dropped = tokenize_file(
        write_preference_file(tmp_path / "chat.jsonl", rows), tokenizer, max_length=48, max_prompt_length=40
    )
    assert [example["prompt_messages"] for example in examples] == [[user("Hi")]] and n_dropped == 1
    assert (
        "dropped 1 conversational examples whose prompt is longer than max_prompt_length=40" in capsys.readouterr().out
    )


def test_the_cache_key_covers_the_template_and_the_turn_switch(tmp_path):
    rows = [{"messages": [user("Hi"), assistant("Hello."), user("Bye"), assistant("Bye!")]}]
    path = str(write_preference_file(tmp_path / "sft.jsonl", rows))

    def labels(tokenizer, every_assistant_turn):
        settings = TokenizeSettings(
            256, 128, sft_mode=True, every_assistant_turn=every_assistant_turn,
            tokenized_cache_dir=str(tmp_path / "tokenized"),
        )  # fmt: skip
        examples, _ = tokenize_datasets([path], "train", tokenizer, settings)
        return examples[0]["chosen_input_ids"], labelled(examples[0])

    chatml = labels(chat_tokenizer(), False)
    assert labels(chat_tokenizer(template=CHATML.replace("\n'", " '")), False) != chatml
    assert labels(chat_tokenizer(), True) != chatml
    assert labels(chat_tokenizer(), False) == chatml


def test_chat_template_setting_auto_none_or_a_file(tmp_path):
    tokenizer = chat_tokenizer()
    chat_templates.set_chat_template(tokenizer, "auto")
    assert tokenizer.chat_template == CHATML
    template_file = tmp_path / "template.jinja"
    template_file.write_text(REWRITING)
    chat_templates.set_chat_template(tokenizer, str(template_file))
    assert tokenizer.chat_template == REWRITING
    chat_templates.set_chat_template(tokenizer, "none")
    assert tokenizer.chat_template is None
    assert "no such file" in chat_templates.chat_template_problem(str(tmp_path / "missing.jinja"))


# ----- generation ---------------------------------------------------------------------


def test_generation_stops_at_the_end_of_turn_token():
    tokenizer = chat_tokenizer()
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert chat_templates.stop_token_ids(tokenizer) == [tokenizer.eos_token_id, end_of_turn]
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=16, n_layer=1, n_head=2)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # a final layer norm that outputs one direction, which the end-of-turn embedding matches
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(torch.nn.functional.normalize(torch.randn(16), dim=0))
        model.transformer.wte.weight[end_of_turn] = 10 * model.transformer.ln_f.bias
    prompt = torch.tensor([ids(tokenizer, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")])
    settings = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    stopped = model.generate(prompt, eos_token_id=chat_templates.stop_token_ids(tokenizer), **settings)
    assert stopped[0, prompt.shape[1] :].tolist() == [end_of_turn]
    unstopped = model.generate(prompt, eos_token_id=tokenizer.eos_token_id, **settings)
    assert unstopped.shape[1] == prompt.shape[1] + 8


def test_samples_of_conversations_are_saved_as_messages_too():
    assert chat_templates.with_answer([user("Hi")], "Yo") == [user("Hi"), assistant("Yo")]
    assert json.dumps(chat_templates.with_answer([user("Hi")], "Yo"))


def test_ultrafeedback_local_copy_trains_sft_then_dpo_with_a_chat_template(tmp_path):
    """The whole path: a Hub-layout copy, the template from a Jinja file, SFT, then DPO from it, samples as messages."""
    prompts = [(f"Which is larger, {a} or {b}?", str(b), str(a)) for a in range(1, 7) for b in range(11, 15)]
    rows = {
        "train_prefs": [ultrafeedback_row(prompt, larger, smaller) for prompt, larger, smaller in prompts],
        "train_sft": [ultrafeedback_row(prompt, larger, "unused") for prompt, larger, _ in prompts],
        # the other splits are not read, but a copy of the Hub repository has them, none empty
        **{split: [ultrafeedback_row("Unused.", "a", "b")] for split in ("train_gen", "test_gen")},
    }
    for split, train_split in (("test_prefs", "train_prefs"), ("test_sft", "train_sft")):
        rows[split] = rows[train_split][:8]
    root = write_ultrafeedback_repo(tmp_path / "ultrafeedback_binarized", rows)
    template = tmp_path / "chat.jinja"  # closes each turn with the embedded tokenizer's EOS, its end-of-turn token
    template.write_text(
        "{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + '<|endoftext|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}"
    )
    common = SMALL_MODEL + [
        "datasets=[ultrafeedback]", f"dataset_paths.ultrafeedback={root}", f"chat_template={template}",
        "batch_size=8", "eval_batch_size=8", "n_examples=16", "n_eval_examples=8", "eval_every=1000000",
        "max_length=64", "max_prompt_length=40", "lr=1e-3", "warmup_steps=0", "plots.enabled=false",
        "sample_during_eval=true", "n_eval_model_samples=2", "minimum_log_interval_secs=0",
    ]  # fmt: skip
    run_in_processes(compose_config(common + ["loss=sft", "do_first_eval=false"]), tmp_path / "sft", 1)
    dpo_config = compose_config(common + ["loss=dpo", f"model.archive={tmp_path / 'sft' / 'LATEST'}"])
    run_in_processes(dpo_config, tmp_path / "dpo", 1)

    records = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "loss/eval" in r]
    assert evals[0]["rewards_eval/margins"] == 0.0 and evals[0]["loss/eval"] == pytest.approx(0.6931472, abs=1e-6)
    assert len([r for r in records if "loss/train" in r]) == 2
    samples = [
        json.loads(line) for line in (tmp_path / "dpo" / "samples" / "examples-16.jsonl").read_text().splitlines()
    ]
    assert len(samples) == 2
    for sample in samples:  # each model's completion saved as the answer of the prompt's conversation
        for model in ("policy", "reference"):
            assert [m["role"] for m in sample["messages"][model]] == ["user", "assistant"]
            assert sample["messages"][model][-1]["content"] == sample[model]
    assert all(s["prompt"].startswith("<user>Which is larger") and s["prompt"].endswith("<assistant>") for s in samples)
