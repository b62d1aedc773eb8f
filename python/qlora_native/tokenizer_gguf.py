"""Build a `tokenizers.Tokenizer` from the vocabulary embedded in a GGUF file.

A GGUF carries no tokenizer.json, only llama.cpp's metadata keys. Two kinds are rebuilt here so
that they tokenize the way llama.cpp does:

- `llama` (sentencepiece-style, "SPM"): tokens + scores + token types. llama.cpp merges adjacent
  symbols greedily, always the pair whose concatenation is the best-scoring token (leftmost on
  ties), and falls back to <0xXX> byte tokens. That is a BPE whose merge ranks are the merged
  token's score, so we derive the merges from the vocabulary and hand them to a `tokenizers` BPE.
- `gpt2` (byte-level BPE): tokens + merges, with the pre-tokenizer regexes llama.cpp uses for the
  file's `tokenizer.ggml.pre` value.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer

from ._core import FormatError

# llama.cpp token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes, copied from llama.cpp (llm_tokenizer_bpe); each one further splits the
# pieces left by the previous one, keeping matches and the text between them ("isolated").
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]


@dataclass(frozen=True)
class _PreSpec:
    regexes: tuple
    ignore_merges: bool = False  # a piece that is itself a token is emitted whole (Llama 3)
    add_bos: bool = False  # llama.cpp's default when the file has no add_bos_token key


_PRE = {}
for _names, _spec in [
    (("default",), _PreSpec(tuple(_DEFAULT))),
    (("gpt-2", "phi-2", "jina-es", "jina-de", "jina-v1-en", "jina-v2-es", "jina-v2-de", "jina-v2-code",
      "roberta-bpe", "mpt", "olmo", "jais", "trillion"), _PreSpec((_GPT2,))),
    (("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"),
     _PreSpec((r"\p{N}", _GPT2))),
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"),
     _PreSpec((_LLAMA3,), ignore_merges=True, add_bos=True)),
    (("qwen2", "stablelm2", "deepseek-r1-qwen", "megrez"), _PreSpec((_QWEN2,))),
]:
    for _n in _names:
        _PRE[_n] = _spec


@dataclass
class GGUFVocab:
    """The tokenizer metadata of one GGUF file, with llama.cpp's key names resolved."""

    model: str  # tokenizer.ggml.model: "llama" or "gpt2"
    pre: str | None
    tokens: list
    token_types: list
    scores: list | None
    merges: list | None
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    unk_token_id: int | None
    extra_eos_ids: set = field(default_factory=set)  # eot / eom: more ids that end a turn
    add_bos: bool | None = None
    add_eos: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | dict | None = None
    source: str = "GGUF"  # the file, for error messages


def _field_value(field_):
    import gguf

    try:
        if hasattr(field_, "contents"):
            return field_.contents()
        # older gguf releases: decode the raw parts ourselves
        def one(part, vtype):
            return bytes(part).decode("utf-8") if vtype == gguf.GGUFValueType.STRING else part[0].item()

        if field_.types[0] == gguf.GGUFValueType.ARRAY:
            return [one(field_.parts[i], field_.types[-1]) for i in field_.data]
        return one(field_.parts[field_.data[0]], field_.types[0])
    except Exception as exc:  # malformed parts, invalid UTF-8
        raise FormatError(f"GGUF metadata field {field_.name!r} is unreadable: {exc}") from exc


def read_gguf_vocab(path: str | os.PathLike) -> GGUFVocab:
    """Read the `tokenizer.*` metadata of a GGUF file (raises FormatError when it is corrupt)."""
    from .gguf_check import open_gguf_reader  # validates every count and offset before `gguf` parses

    reader = open_gguf_reader(path)

    def get(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else _field_value(f)

    model = get("tokenizer.ggml.model")
    if model is None:
        raise FormatError(f"{path}: GGUF file has no embedded tokenizer (no tokenizer.ggml.model key)")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        v = get(key)
        if v is not None and not isinstance(v, list):  # a string would read as a list of characters
            raise FormatError(f"{path}: {key} is {type(v).__name__}, not an array")
    tokens = get("tokenizer.ggml.tokens")
    if not tokens:
        raise FormatError(f"{path}: GGUF tokenizer has no tokenizer.ggml.tokens")
    n = len(tokens)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        arr = get(key) or ()
        bad = next((k for k, t in enumerate(arr) if not isinstance(t, str)), None)
        if bad is not None:
            raise FormatError(f"{path}: {key}[{bad}] is {type(arr[bad]).__name__}, not a string")
    types = get("tokenizer.ggml.token_type") or [NORMAL] * n
    scores = get("tokenizer.ggml.scores")
    merges = get("tokenizer.ggml.merges")
    if len(types) != n or (scores is not None and len(scores) != n):
        raise FormatError(f"{path}: token_type/scores length differs from the {n} tokens")
    # the C++ reader's rules (tokenizer_gguf.cpp / Tokenizer): both faces load the same files alike
    bad = next((k for k, t in enumerate(types) if not isinstance(t, int) or isinstance(t, bool)), None)
    if bad is not None:
        raise FormatError(f"{path}: tokenizer.ggml.token_type[{bad}] = {types[bad]!r} is not an integer")
    if scores is not None:
        bad = next((k for k, x in enumerate(scores) if not isinstance(x, (int, float)) or x != x), None)
        if bad is not None:
            raise FormatError(f"{path}: tokenizer.ggml.scores[{bad}] = {scores[bad]!r} is not a number")

    def flag(key):
        v = get(key)
        if v is not None and not isinstance(v, (bool, int, float)):
            raise FormatError(f"{path}: {key} = {v!r} is not a bool")
        return v

    def token_id(key):
        v = get(key)
        if v is None:
            return None
        if not isinstance(v, int) or isinstance(v, bool):  # a float id would be silently truncated
            raise FormatError(f"{path}: {key} = {v!r} is not an integer")
        if not 0 <= v < n:
            # llama.cpp treats some out-of-range ids as "none" (-1 stored as uint32)
            if v in (-1, 0xFFFFFFFF):
                return None
            raise FormatError(f"{path}: {key} = {v} is outside the vocabulary of {n} tokens")
        return v

    templates = get("tokenizer.chat_template")
    if templates is not None and not isinstance(templates, str):
        raise FormatError(f"{path}: tokenizer.chat_template is {type(templates).__name__}, not a string")
    names = get("tokenizer.chat_templates")
    if names:  # named templates: tokenizer.chat_template.<name>
        named = {name: get(f"tokenizer.chat_template.{name}") for name in names}
        named = {k: v for k, v in named.items() if v is not None}
        if templates is not None:
            named["default"] = templates
        templates = named or templates

    extra = {token_id(k) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")}
    return GGUFVocab(
        model=str(model),
        pre=get("tokenizer.ggml.pre"),
        tokens=list(tokens),
        token_types=[int(t) for t in types],
        scores=None if scores is None else [float(s) for s in scores],
        merges=None if merges is None else list(merges),
        bos_token_id=token_id("tokenizer.ggml.bos_token_id"),
        eos_token_id=token_id("tokenizer.ggml.eos_token_id"),
        pad_token_id=token_id("tokenizer.ggml.padding_token_id"),
        unk_token_id=token_id("tokenizer.ggml.unknown_token_id"),
        extra_eos_ids={i for i in extra if i is not None},
        add_bos=flag("tokenizer.ggml.add_bos_token"),
        add_eos=flag("tokenizer.ggml.add_eos_token"),
        add_space_prefix=flag("tokenizer.ggml.add_space_prefix"),
        chat_template=templates,
        source=os.fspath(path),
    )


def _spm_merges(tokens, scores, types):
    """Merges implied by a scored vocabulary: every split of a token into two tokens, ranked by
    the merged token's score (best first). Ties keep vocabulary order, then split position."""
    vocab = {t: i for i, t in enumerate(tokens)}
    # only split lengths some token has: slicing and hashing every split is len^2 per token (one
    # long token in a GGUF would run for hours)
    vocab_lens = {len(t) for t in tokens}
    lens = sorted(vocab_lens)
    ranked = []
    for i, tok in enumerate(tokens):
        if types[i] not in (NORMAL, USER_DEFINED, UNUSED) or len(tok) < 2:
            continue
        for k in lens:
            if k < 1:
                continue
            if k >= len(tok):
                break
            if len(tok) - k not in vocab_lens:
                continue
            a, b = tok[:k], tok[k:]
            if a in vocab and b in vocab:
                ranked.append((-scores[i], i, k, a, b))
    ranked.sort(key=lambda r: r[:3])
    return [(a, b) for *_, a, b in ranked]


def _added_tokens(v: GGUFVocab):
    """Control/unknown tokens become special added tokens, user-defined ones plain added tokens:
    llama.cpp matches both whole in the text before tokenizing the rest."""
    out = []
    for tok, t in zip(v.tokens, v.token_types):
        if t in (CONTROL, UNKNOWN):
            out.append(AddedToken(tok, special=True, normalized=False))
        elif t == USER_DEFINED:
            out.append(AddedToken(tok, special=False, normalized=False))
    return out


def _llama_tokenizer(v: GGUFVocab) -> _HFTokenizer:
    if v.scores is None:
        raise FormatError(f"{v.source}: GGUF `llama` tokenizer has no tokenizer.ggml.scores")
    vocab = {t: i for i, t in enumerate(v.tokens)}
    has_bytes = any(t == BYTE for t in v.token_types)
    unk = v.tokens[v.unk_token_id] if v.unk_token_id is not None else None
    tk = _HFTokenizer(
        models.BPE(
            vocab=vocab, merges=_spm_merges(v.tokens, v.scores, v.token_types),
            unk_token=unk, fuse_unk=True, byte_fallback=has_bytes,
        )
    )
    # llama.cpp: ' ' -> U+2581 on every piece of raw text, and a leading one when
    # add_space_prefix (after each special token too, like a fresh start).
    space_prefix = True if v.add_space_prefix is None else bool(v.add_space_prefix)
    norm = [normalizers.Replace(" ", "\u2581")]
    if space_prefix:
        norm.insert(0, normalizers.Prepend("\u2581"))
    tk.normalizer = normalizers.Sequence(norm)
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tk.decoder = decoders.Sequence(dec)
    return tk


def _gpt2_tokenizer(v: GGUFVocab) -> _HFTokenizer:
    pre = v.pre if v.pre else "default"  # llama.cpp falls back to its default regexes
    spec = _PRE.get(pre)
    if spec is None:
        raise ValueError(
            f"{v.source}: unsupported GGUF pre-tokenizer tokenizer.ggml.pre = {pre!r}; supported: {sorted(_PRE)}"
        )
    if v.merges is None:
        raise FormatError(f"{v.source}: GGUF `gpt2` tokenizer has no tokenizer.ggml.merges")
    vocab = {t: i for i, t in enumerate(v.tokens)}
    merges = []
    for k, m in enumerate(v.merges):
        parts = m.split(" ") if isinstance(m, str) else []
        if len(parts) != 2:
            raise FormatError(f"{v.source}: tokenizer.ggml.merges[{k}] = {m!r} is not two space-separated tokens")
        # `tokenizers` raises a bare Exception (or panics) on a merge outside the vocabulary
        for t in (parts[0], parts[1], parts[0] + parts[1]):
            if t not in vocab:
                raise FormatError(f"{v.source}: tokenizer.ggml.merges[{k}] = {m!r}: token {t!r} is not in "
                                  "tokenizer.ggml.tokens")
        merges.append((parts[0], parts[1]))
    tk = _HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=spec.ignore_merges))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in spec.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tk.decoder = decoders.ByteLevel()
    return tk


def build_gguf_tokenizer(v: GGUFVocab) -> tuple[_HFTokenizer, bool, bool]:
    """(tokenizer, add_bos, add_eos) reproducing llama.cpp's tokenization of this vocabulary."""
    if v.model == "llama":
        tk = _llama_tokenizer(v)
        add_bos = True if v.add_bos is None else bool(v.add_bos)
    elif v.model == "gpt2":
        tk = _gpt2_tokenizer(v)
        add_bos = _PRE[v.pre or "default"].add_bos if v.add_bos is None else bool(v.add_bos)
    else:
        raise ValueError(f"{v.source}: unsupported GGUF tokenizer model tokenizer.ggml.model = {v.model!r} "
                         "(supported: 'llama', 'gpt2')")
    add_eos = bool(v.add_eos)
    tk.add_tokens([a for a in _added_tokens(v) if not a.special])
    tk.add_special_tokens([a for a in _added_tokens(v) if a.special])
    if add_bos and v.bos_token_id is None:
        add_bos = False
    if add_eos and v.eos_token_id is None:
        add_eos = False
    tk.post_processor = template_processing(
        v.tokens[v.bos_token_id] if add_bos else None, v.bos_token_id,
        v.tokens[v.eos_token_id] if add_eos else None, v.eos_token_id,
    )
    return tk, add_bos, add_eos


def template_processing(bos, bos_id, eos, eos_id):
    """A post-processor adding `bos`/`eos` (either may be None) around one or two sequences."""
    single = " ".join(([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else []))
    pair = single + " " + " ".join(([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else []))
    special = ([(bos, bos_id)] if bos else []) + ([(eos, eos_id)] if eos and eos != bos else [])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
