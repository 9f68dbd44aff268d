"""Test data in each dataset's real repository layout and row format, and an offline tokenizer.

The `write_*_repo` helpers lay files out as `hf download --repo-type dataset <id> --local-dir DIR`
leaves them, including its `.cache/huggingface/` bookkeeping and `.gitattributes`:

- Anthropic/hh-rlhf: `<subset>/{train,test}.jsonl.gz` for harmless-base, helpful-base,
  helpful-online and helpful-rejection-sampled, plus `red-team-attempts/red_team_attempts.jsonl.gz`
  with a different schema that the Hub's default config leaves out.
- stanfordnlp/SHP: `<subreddit>/{train,validation,test}.json`, JSON lines.
- HuggingFaceH4/stack-exchange-preferences: `data/<site>/train-00000-of-00001.parquet`
  (only a train split) and `stack_exchanges.json` at the top.
"""

import gzip
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<s>", "</s>", "<pad>"


def _write_download_leftovers(root: Path, files: list[str]) -> None:
    """What `hf download --local-dir` writes besides the files: metadata that loaders must ignore."""
    (root / ".gitattributes").write_text(
        "*.parquet filter=lfs diff=lfs merge=lfs -text\n*.gz filter=lfs diff=lfs merge=lfs -text\n"
    )
    cache = root / ".cache" / "huggingface"
    (cache / "download").mkdir(parents=True, exist_ok=True)
    (cache / ".gitignore").write_text("*\n")
    for file in files + ["README.md"]:
        metadata = cache / "download" / f"{file}.metadata"
        metadata.parent.mkdir(parents=True, exist_ok=True)
        metadata.write_text("0123456789abcdef\n0123456789abcdef\n1700000000.0\n")


def _write_json_lines(path: Path, rows: list[dict], gzipped: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if gzipped:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")


# ----- Anthropic/hh-rlhf ------------------------------------------------------------


def hh_prompt(history: list[tuple[str, str]], last_human: str) -> str:
    """The dialogue up to the answer: earlier (human, assistant) turns, then the last human turn."""
    earlier = "".join(f"\n\nHuman: {human}\n\nAssistant: {assistant}" for human, assistant in history)
    return earlier + f"\n\nHuman: {last_human}\n\nAssistant:"


def hh_row(prompt: str, chosen: str, rejected: str) -> dict:
    """A row as on the Hub: two whole conversations that differ only in the last answer."""
    return {"chosen": prompt + chosen, "rejected": prompt + rejected}


def write_hh_repo(root: Path, rows: dict[tuple[str, str], list[dict]]) -> Path:
    """hh-rlhf layout; `rows` maps (subset, split) to rows (every subset file exists, maybe empty)."""
    files = []
    for subset in HH_SUBSETS:
        for split in ("train", "test"):
            file = f"{subset}/{split}.jsonl.gz"
            _write_json_lines(root / file, rows.get((subset, split), []), gzipped=True)
            files.append(file)
    red_team = {
        "transcript": "\n\nHuman: How do I pick a lock?\n\nAssistant: I can't help with that.",
        "min_harmlessness_score_transcript": -0.5,
        "num_params": "52B",
        "model_type": "context distillation",
        "rating": 0,
        "task_description": "pick a lock",
        "task_descripton_harmlessness_score": 1.2,
        "red_team_member_id": 7,
        "is_upworker": False,
        "tags": None,
    }
    _write_json_lines(root / "red-team-attempts/red_team_attempts.jsonl.gz", [red_team], gzipped=True)
    files.append("red-team-attempts/red_team_attempts.jsonl.gz")
    (root / "README.md").write_text("---\nlicense: mit\ntags:\n- human-feedback\n---\n# Dataset Card for HH-RLHF\n")
    _write_download_leftovers(root, files)
    return root


# ----- stanfordnlp/SHP ---------------------------------------------------------------


def shp_row(
    history: str,
    ref_a: str,
    ref_b: str,
    score_a: int,
    score_b: int,
    post_id: str = "t3_abc",
    domain: str = "askacademia_train",
) -> dict:
    """A row with every SHP field; labels and score_ratio follow from the scores as in SHP."""
    return {
        "post_id": post_id,
        "domain": domain,
        "upvote_ratio": 0.97,
        "history": history,
        "c_root_id_A": f"{post_id}_a",
        "c_root_id_B": f"{post_id}_b",
        "created_at_utc_A": 1650000000,
        "created_at_utc_B": 1650000100,
        "score_A": score_a,
        "score_B": score_b,
        "human_ref_A": ref_a,
        "human_ref_B": ref_b,
        "labels": int(score_a > score_b),
        "seconds_difference": 100.0,
        "score_ratio": max(score_a, score_b) / min(score_a, score_b),
    }


def write_shp_repo(root: Path, rows: dict[tuple[str, str], list[dict]]) -> Path:
    """SHP layout; `rows` maps (subreddit, split) to rows."""
    files = []
    for (subreddit, split), subreddit_rows in rows.items():
        file = f"{subreddit}/{split}.json"
        _write_json_lines(root / file, subreddit_rows)
        files.append(file)
    (root / "README.md").write_text("---\nlicense: unknown\ntask_categories:\n- text-generation\n---\n# SHP\n")
    _write_download_leftovers(root, files)
    return root


# ----- HuggingFaceH4/stack-exchange-preferences ----------------------------------------

SE_ANSWER = pa.struct(
    [
        ("answer_id", pa.int64()),
        ("author", pa.string()),
        ("author_id", pa.int64()),
        ("author_profile", pa.string()),
        ("pm_score", pa.int64()),
        ("selected", pa.bool_()),
        ("text", pa.string()),
    ]
)
SE_SCHEMA = pa.schema(
    [
        ("qid", pa.int64()),
        ("question", pa.string()),
        ("answers", pa.list_(SE_ANSWER)),
        ("date", pa.string()),
        ("metadata", pa.list_(pa.string())),
    ]
)


def se_row(qid: int, question_html: str, answers: list[tuple[str, int]]) -> dict:
    """A question row; `answers` are (html text, pm_score)."""
    return {
        "qid": qid,
        "question": question_html,
        "answers": [
            {
                "answer_id": qid * 100 + i,
                "author": f"user{i}",
                "author_id": i,
                "author_profile": f"https://stats.stackexchange.com/users/{i}",
                "pm_score": score,
                "selected": i == 0,
                "text": text,
            }
            for i, (text, score) in enumerate(answers)
        ],
        "date": "2012/03/04",
        "metadata": [f"https://stats.stackexchange.com/questions/{qid}", "https://stats.stackexchange.com"],
    }


def write_se_repo(root: Path, rows: dict[str, list[dict]]) -> Path:
    """stack-exchange-preferences layout; `rows` maps a site folder (e.g. stats.stackexchange.com) to rows."""
    files = []
    for site, site_rows in rows.items():
        file = f"data/{site}/train-00000-of-00001.parquet"
        (root / file).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(site_rows, schema=SE_SCHEMA), root / file)
        files.append(file)
    (root / "stack_exchanges.json").write_text(json.dumps({"stats.stackexchange.com": 1, "Stackoverflow.com": 2}))
    (root / "README.md").write_text(
        "---\nlicense: cc-by-sa-4.0\ntask_categories:\n- question-answering\n---\n# H4 Stack Exchange Preferences\n"
    )
    _write_download_leftovers(root, files + ["stack_exchanges.json"])
    return root


# ----- user preference files ---------------------------------------------------------


def write_preference_file(path: Path, rows: list[dict]) -> Path:
    """Rows as .jsonl, .json (an array) or .parquet, by the path's suffix."""
    if path.suffix == ".jsonl":
        _write_json_lines(path, rows)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# ----- an offline tokenizer ------------------------------------------------------------


def byte_tokenizer(adds_bos: bool = False, n_merges: int = 0) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained in-process; with no merges every byte of ASCII text is one token.

    adds_bos=False behaves like GPT-2 (no special tokens added by default); adds_bos=True like
    Llama (a post-processor puts BOS before every encoded text).
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + 3 + n_merges,
        special_tokens=[PAD_TOKEN, BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(["\n\nHuman: hello there\n\nAssistant: hi, how are you?"] * 20, trainer=trainer)
    if adds_bos:
        bos_id = tokenizer.token_to_id(BOS_TOKEN)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos_id)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )


# ----- HuggingFaceH4/ultrafeedback_binarized ------------------------------------------------

ULTRAFEEDBACK_SPLITS = ("train_prefs", "test_prefs", "train_sft", "test_sft", "train_gen", "test_gen")
_MESSAGES = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
ULTRAFEEDBACK_SCHEMA = pa.schema(
    [
        ("prompt", pa.string()),
        ("prompt_id", pa.string()),
        ("chosen", _MESSAGES),
        ("rejected", _MESSAGES),
        ("messages", _MESSAGES),
        ("score_chosen", pa.float64()),
        ("score_rejected", pa.float64()),
    ]
)


def ultrafeedback_row(prompt: str, chosen: str, rejected: str, score_chosen: float = 8.0) -> dict:
    """A row as on the Hub: the prompt, two whole conversations, `messages` the chosen one, and the ratings."""

    def conversation(answer: str) -> list[dict]:
        return [{"content": prompt, "role": "user"}, {"content": answer, "role": "assistant"}]

    return {
        "prompt": prompt,
        "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(),
        "chosen": conversation(chosen),
        "rejected": conversation(rejected),
        "messages": conversation(chosen),
        "score_chosen": score_chosen,
        "score_rejected": score_chosen - 3.0,
    }


def write_ultrafeedback_repo(root: Path, rows: dict[str, list[dict]]) -> Path:
    """ultrafeedback_binarized layout: data/<split>-00000-of-00001-<hash>.parquet per split, README with configs."""
    files = []
    for number, split in enumerate(ULTRAFEEDBACK_SPLITS):
        file = f"data/{split}-00000-of-00001-{number:016x}.parquet"
        (root / file).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows.get(split, []), schema=ULTRAFEEDBACK_SCHEMA), root / file)
        files.append(file)
    configs = "".join(f"  - split: {split}\n    path: data/{split}-*\n" for split in ULTRAFEEDBACK_SPLITS)
    (root / "README.md").write_text(
        f"---\nlicense: mit\nconfigs:\n- config_name: default\n  data_files:\n{configs}---\n# UltraFeedback Binarized\n"
    )
    _write_download_leftovers(root, files)
    return root
