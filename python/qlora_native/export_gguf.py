"""llama.cpp GGUF export: the model (`export_gguf`) and a LoRA adapter (`export_gguf_lora`), and
loading a GGUF LoRA adapter back (`load_gguf_lora`).

    model.export_gguf("out/model-f16.gguf", dtype="f16")        # llama.cpp: llama-cli -m out/model-f16.gguf
    model.export_gguf_lora("out/adapter.gguf")                  # llama-cli -m BASE.gguf --lora out/adapter.gguf
    model.load_adapter("out/adapter.gguf", "from_gguf")         # read back

Written through the `gguf` package's GGUFWriter (maintained with llama.cpp), one tensor at a time
(the model is never held twice), into a temporary name beside the target that is renamed into
place once complete. Layouts follow llama.cpp's convert_hf_to_gguf.py / convert_lora_to_gguf.py:
tensor names `token_embd`, `blk.N.attn_q`, ...; for the llama architecture the rows of attn_q /
attn_k (and of their LoRA B factors) are permuted from HF's rotate-half RoPE layout to GGML's
interleaved one; 1-D tensors (norms, biases) stay F32.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from . import atomic_io
from ._core import FormatError
from .fspath import text_of_path
from .gguf_source import _GLOBAL_NAMES, _LAYER_NAMES, _unpermute_rows
from .lora_config import PROJECTIONS, LoraConfig, module_path, peft_tensor_name

__all__ = ["export_gguf", "export_gguf_lora", "load_gguf_lora", "gguf_vocab_of"]

# export dtype -> (GGML type name of 2-D tensors, llama.cpp general.file_type)
_MODEL_DTYPES = {"f32": ("F32", 0), "f16": ("F16", 1), "q8_0": ("Q8_0", 7), "bf16": ("BF16", 32)}
_LORA_DTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
_HF_TO_GGUF = {hf: g for g, hf in _GLOBAL_NAMES.items()}
_LAYER_TO_GGUF = {hf: g for g, hf in _LAYER_NAMES.items()}
_PROJ_GGUF = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
_GGUF_PROJ = {g: p for p, g in _PROJ_GGUF.items()}
# Text the exported tokenizer must encode exactly as the model's own tokenizer does.
_PROBE = ["Hello, World! It's 3:45pm -- don't stop.", "  leading and  double  spaces\tand tabs\n\nnew lines",
          "naïve café Straße über 日本語 中文 한국어 русский ελληνικά 🙂🚀👍🏽", "x = {'k': [1, 22, 333, 4444]}",
          "def f(x):\n    return x ** 2  # 12345678", "The quick brown fox jumps over the lazy dog.", "a", "",
          "IT'S WE'LL they'VE 1234567 3.14159 .Hello _abc -x +y", "a\r\nb \n\n  c   \t d\n ", "x1y22z333"]


def _gguf_arch(model) -> str:
    return "qwen2" if model.config.arch == "qwen2" else "llama"


def _check_target(path) -> Path:
    path = Path(os.fspath(path))
    if path.name in ("", ".", ".."):
        raise ValueError(f"{path}: not a file name")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory (give the .gguf file to write)")
    parent = path.parent
    if not parent.exists():
        raise FileNotFoundError(f"{path}: the directory {parent} does not exist")
    if not parent.is_dir():
        raise NotADirectoryError(f"{path}: {parent} is not a directory")
    return path


def _permute_rows(w: np.ndarray, n_head: int, name: str) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp's interleaved rows (convert_hf_to_gguf's permute); the
    inverse of gguf_source._unpermute_rows."""
    out = w.shape[0]
    if out % (2 * n_head):
        raise ValueError(f"tensor {name}: {out} rows do not split into {n_head} heads of even size")
    rest = w.shape[1:]
    return np.ascontiguousarray(w.reshape(n_head, 2, out // n_head // 2, *rest).swapaxes(1, 2).reshape(out, *rest))


def _encode(data: np.ndarray, kind: str):
    """(array to write, GGMLQuantizationType or None) for a float32 tensor stored as `kind`."""
    import gguf

    if kind == "F32":
        return np.ascontiguousarray(data, np.float32), None
    if kind == "F16":
        return np.ascontiguousarray(data.astype(np.float16)), None
    q = gguf.GGMLQuantizationType[kind]
    return gguf.quants.quantize(np.ascontiguousarray(data, np.float32), q), q


class _StreamWriter:
    """A GGUFWriter whose tensors are declared first (name, shape, type) and then produced and
    written one at a time, so only one tensor is in memory."""

    def __init__(self, arch: str):
        import gguf

        self.gguf = gguf
        self.w = gguf.GGUFWriter(None, arch=arch)
        self.plan: list[tuple[str, tuple, str, object]] = []  # (name, shape, kind, producer)

    def tensor(self, name: str, shape: tuple, kind: str, producer) -> None:
        self.plan.append((name, tuple(int(s) for s in shape), kind, producer))

    def write(self, tmp: Path) -> None:
        gguf = self.gguf
        w = self.w
        for name, shape, kind, _ in self.plan:
            if kind in ("F32", "F16"):
                dt = np.float32 if kind == "F32" else np.float16
                w.add_tensor_info(name, shape, np.dtype(dt), int(np.prod(shape)) * np.dtype(dt).itemsize)
            else:
                q = gguf.GGMLQuantizationType[kind]
                bshape = gguf.quants.quant_shape_to_byte_shape(shape, q)
                w.add_tensor_info(name, bshape, np.dtype(np.uint8), int(np.prod(bshape)), raw_dtype=q)
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        try:
            for name, shape, kind, producer in self.plan:
                data, _ = _encode(np.asarray(producer(), np.float32).reshape(shape), kind)
                w.write_tensor_data(data)
            w.flush()
        finally:
            w.close()


# ---------------------------------------------------------------- model export
def _dense_weight(core, name: str, shape: tuple) -> np.ndarray:
    """float32 tensor by HF name: NF4 projections dequantized with the engine's codec."""
    if name.endswith("_proj.weight"):
        w = core.linear_nf4(name[: -len(".weight")])
        if w is not None:
            from .nf4 import NF4Tensor

            return NF4Tensor.from_engine(w).dequantize(np.float32).reshape(shape)
    return core.get_tensor(name).reshape(shape)


def _gguf_name(hf: str) -> str:
    if hf in _HF_TO_GGUF:
        return _HF_TO_GGUF[hf]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf)
    if m and m.group(2) in _LAYER_TO_GGUF:
        return f"blk.{m.group(1)}.{_LAYER_TO_GGUF[m.group(2)]}"
    raise ValueError(f"export_gguf: no GGUF name for tensor {hf!r}")


def export_gguf(model, path, dtype: str = "f16") -> None:
    """Writes `model` (base weights as held; NF4 projections dequantized to float32 first) as a
    llama.cpp GGUF file. dtype: "f32", "f16", "bf16" or "q8_0" for the 2-D tensors (norms and
    biases stay F32; a Q8_0 tensor whose row length is not a multiple of 32 falls back to F16,
    as llama.cpp's converter does). An active LoRA adapter is not included (merge it first)."""
    if not isinstance(dtype, str) or dtype.lower() not in _MODEL_DTYPES:
        raise ValueError(f"export_gguf: dtype must be one of {', '.join(_MODEL_DTYPES)}, got {dtype!r}")
    dtype = dtype.lower()
    path = _check_target(path)
    c = model.config
    if c.rope_scaling is not None and c.rope_scaling.get("rope_type") != "linear":
        raise ValueError(f"export_gguf: rope scaling {c.rope_scaling.get('rope_type')!r} cannot be exported yet "
                         "(only linear scaling)")
    if c.sliding_window:
        warnings.warn(f"export_gguf: the model's sliding-window attention ({c.sliding_window} tokens) is not "
                      "recorded: llama.cpp attends to the full context", UserWarning, stacklevel=3)
    active = getattr(model, "active_adapter", None)
    if active is not None:
        warnings.warn(f"export_gguf writes the base model only: the active LoRA adapter {active!r} is not "
                      f"included (export it with model.export_gguf_lora, or merge it first)", UserWarning,
                      stacklevel=3)
    kind2d, file_type = _MODEL_DTYPES[dtype]
    arch = _gguf_arch(model)
    sw = _StreamWriter(arch)
    w = sw.w
    # ---- metadata: the keys llama.cpp's loader reads for llama / qwen2
    # general.name is a GGUF string (UTF-8): a loaded path's bytes that are not UTF-8 written \xNN
    name = text_of_path(os.path.basename(os.fspath(getattr(model, "name_or_path", None) or ""))) or "model"
    w.add_type("model")
    w.add_name(re.sub(r"\.gguf$", "", name))
    w.add_vocab_size(c.vocab_size)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    if c.head_dim * c.num_attention_heads != c.hidden_size:
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_rope_freq_base(float(c.rope_theta))
    if c.rope_scaling is not None:
        import gguf

        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(c.rope_scaling["factor"]))
    w.add_file_type(file_type)
    if dtype == "q8_0":
        import gguf

        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(w, model)
    # ---- tensors, in HF order (llama.cpp looks them up by name)
    core = model._core
    for hf, shape in core.expected_tensors():
        shape = tuple(int(s) for s in shape)
        gname = _gguf_name(hf)
        kind = kind2d if len(shape) == 2 else "F32"
        if kind == "Q8_0" and shape[-1] % 32:
            kind = "F16"
        n_head = None
        if arch == "llama" and gname.endswith(("attn_q.weight", "attn_q.bias")):
            n_head = c.num_attention_heads
        elif arch == "llama" and gname.endswith(("attn_k.weight", "attn_k.bias")):
            n_head = c.num_key_value_heads

        def produce(hf=hf, shape=shape, n_head=n_head, gname=gname):
            t = _dense_weight(core, hf, shape)
            return t if n_head is None else _permute_rows(t, n_head, gname)

        sw.tensor(gname, shape, kind, produce)
    atomic_io.write_file(path, sw.write)


# ---------------------------------------------------------------- tokenizer
def _add_tokenizer(w, model) -> None:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        warnings.warn("export_gguf: the model has no tokenizer, so the GGUF carries none (llama.cpp needs one to "
                      "run text)", UserWarning, stacklevel=4)
        return
    src = getattr(tok, "source", "")
    if isinstance(src, str) and src.endswith(".gguf") and os.path.isfile(src) and _copy_gguf_tokenizer(w, src, tok):
        return
    v = gguf_vocab_of(tok, model.config.vocab_size)
    _write_vocab(w, v)


def _copy_gguf_tokenizer(w, src: str, tok) -> bool:
    """Copies every tokenizer.* key of the GGUF the tokenizer came from, as stored (types and all),
    when that file still holds the same vocabulary."""
    from .gguf_check import open_gguf_reader
    from .tokenizer_gguf import _field_value

    reader = open_gguf_reader(src)
    fields = {k: f for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    toks = fields.get("tokenizer.ggml.tokens")
    if toks is None or len(toks.data) != tok.vocab_size:
        return False
    import gguf

    for k, f in fields.items():
        vtype = f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            if len(f.types) != 2:
                return False  # nested arrays: not a tokenizer key llama.cpp defines
            w.add_key_value(k, _field_value(f), vtype, f.types[1])
        else:
            w.add_key_value(k, _field_value(f), vtype)
    return True


def gguf_vocab_of(tok, n_vocab: int | None = None):
    """A tokenizer_gguf.GGUFVocab (llama.cpp's tokenizer.ggml.* keys) equivalent to `tok`: from a
    byte-level BPE tokenizer.json (`gpt2`, with the pre-tokenizer that reproduces it), a
    sentencepiece-style BPE tokenizer.json or a sentencepiece tokenizer.model (`llama`). The
    choice is checked: the GGUF tokenizer must encode a probe text exactly as `tok` does, else
    ValueError (the tokenizer cannot be expressed in GGUF). n_vocab: the model's vocabulary size
    (ids past the tokenizer's are padded with unused [PAD{i}] tokens, as llama.cpp's converter does)."""
    from .tokenizer import _HFBackend

    b = tok._b
    if isinstance(b, _HFBackend):
        candidates = _hf_candidates(tok, b.tk, n_vocab)
    elif hasattr(b, "sp"):
        candidates = _sp_candidates(tok, b, n_vocab)
    else:
        raise ValueError(f"export_gguf: cannot export a tokenizer of type {type(b).__name__} to GGUF")
    tried = []
    for v in candidates:
        if _same_tokenization(tok, v):
            return v
        tried.append(f"{v.model}/{v.pre}/space_prefix={v.add_space_prefix}")
    raise ValueError(f"export_gguf: the tokenizer {tok.source or ''} cannot be expressed as a llama.cpp GGUF "
                     f"vocabulary: no candidate ({', '.join(tried) or 'none'}) tokenizes the probe text identically")


def _special_flags(tok) -> tuple[bool, bool]:
    """(add_bos, add_eos) as the tokenizer decides them for plain text."""
    plain = tok.encode("hello world", add_special_tokens=False)
    full = tok.encode("hello world", add_special_tokens=True)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    add_bos = bos is not None and full[:1] == [bos] and full[1:len(plain) + 1] == plain
    rest = full[1:] if add_bos else full
    add_eos = eos is not None and rest == plain + [eos]
    if rest != plain + ([eos] if add_eos else []):
        raise ValueError(f"export_gguf: the tokenizer adds special tokens other than BOS/EOS ({full} for {plain}); "
                         "llama.cpp cannot reproduce that")
    return add_bos, add_eos


def _base_vocab(tok, tokens: list, types: list, scores, model: str, pre, merges, space_prefix, add_bos, add_eos):
    from .tokenizer_gguf import GGUFVocab

    return GGUFVocab(model=model, pre=pre, tokens=tokens, token_types=types, scores=scores, merges=merges,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     unk_token_id=tok.unk_token_id,
                     extra_eos_ids=set(tok.eos_token_ids) - ({tok.eos_token_id} if tok.eos_token_id is not None
                                                             else set()),
                     add_bos=add_bos, add_eos=add_eos, add_space_prefix=space_prefix,
                     chat_template=tok.chat_template, source=tok.source or "tokenizer")


def _hf_candidates(tok, tk, n_vocab):
    from .tokenizer_gguf import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED

    j = json.loads(tk.to_str())
    m = j.get("model") or {}
    if m.get("type") != "BPE":
        raise ValueError(f"export_gguf: tokenizer model {m.get('type')!r} has no llama.cpp GGUF equivalent "
                         "(supported: BPE, byte-level or sentencepiece-style)")
    size = max(tok.vocab_size, n_vocab or 0)
    tokens: list = [None] * size
    for t, i in tk.get_vocab(with_added_tokens=True).items():
        if 0 <= i < size:
            tokens[i] = t
    added = {a["id"]: a for a in j.get("added_tokens") or ()}
    types = []
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i] = f"[PAD{i}]"
            types.append(UNUSED)
        elif m.get("byte_fallback") and re.fullmatch(r"<0x[0-9A-F]{2}>", t):
            types.append(BYTE)  # even when listed as added tokens (trainers add them as specials)
        elif i == tok.unk_token_id:
            types.append(UNKNOWN)
        elif i in added:
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        else:
            types.append(NORMAL)
    merges = [" ".join(x) if isinstance(x, list) else x for x in m.get("merges") or ()]
    add_bos, add_eos = _special_flags(tok)
    byte_level = "ByteLevel" in json.dumps([j.get("pre_tokenizer"), j.get("decoder")])
    if byte_level:
        pres = ["gpt-2", "smollm", "llama-bpe", "qwen2", "default"]
        return [_base_vocab(tok, tokens, types, None, "gpt2", p, merges, None, add_bos, add_eos) for p in pres]
    # sentencepiece-style BPE (U+2581, byte fallback): llama.cpp merges by token score, so a
    # token's score is minus the rank of the merge that creates it.
    scores = [0.0] * size
    for rank, mg in enumerate(merges):
        i = tk.token_to_id(mg.replace(" ", "", 1))
        if i is not None and scores[i] == 0.0:
            scores[i] = -float(rank + 1)
    return [_base_vocab(tok, tokens, types, scores, "llama", "default", None, sp, add_bos, add_eos)
            for sp in (True, False)]


def _sp_candidates(tok, b, n_vocab):
    from .tokenizer_gguf import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED

    sp = b.sp
    n = sp.get_piece_size()
    size = max(n, n_vocab or 0, tok.vocab_size)
    tokens, scores, types = [], [], []
    for i in range(size):
        if i < n:
            tokens.append(sp.id_to_piece(i))
            scores.append(float(sp.get_score(i)))
            types.append(UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else BYTE if sp.is_byte(i)
                         else UNUSED if sp.is_unused(i) else NORMAL)
        else:  # added tokens past the sentencepiece model (tokenizer_config's added_tokens_decoder)
            t = tok.convert_ids_to_tokens(i) if i < tok.vocab_size else None
            tokens.append(t if t is not None else f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(CONTROL if t is not None else UNUSED)
    add_bos, add_eos = _special_flags(tok)
    return [_base_vocab(tok, tokens, types, scores, "llama", "default", None, s, add_bos, add_eos)
            for s in (True, False)]


def _same_tokenization(tok, v) -> bool:
    from .tokenizer_gguf import build_gguf_tokenizer

    try:
        tk, _, _ = build_gguf_tokenizer(v)
    except (ValueError, FormatError):
        return False
    texts = list(_PROBE)
    specials = [t for t, ty in zip(v.tokens, v.token_types) if ty == 3][:4]
    texts.append(" ".join(["Hi"] + specials + ["there"]))
    # Pre-tokenizer pieces too, where both have one: they do not depend on how rich the
    # vocabulary is, so they tell apart splitting rules that a small vocabulary would hide.
    own = getattr(getattr(tok, "_b", None), "tk", None)
    pre_a = getattr(own, "pre_tokenizer", None)
    pre_b = tk.pre_tokenizer
    for text in texts:
        if tk.encode(text).ids != tok.encode(text):
            return False
        if pre_a is not None and pre_b is not None:
            if [p for p, _ in pre_a.pre_tokenize_str(text)] != [p for p, _ in pre_b.pre_tokenize_str(text)]:
                return False
    return True


def _write_vocab(w, v) -> None:
    w.add_tokenizer_model(v.model)
    if v.pre:
        w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    if v.scores is not None:
        w.add_token_scores(v.scores)
    w.add_token_types(v.token_types)
    if v.merges is not None:
        w.add_token_merges(v.merges)
    for key, val in (("bos", v.bos_token_id), ("eos", v.eos_token_id), ("unk", v.unk_token_id),
                     ("pad", v.pad_token_id)):
        if val is not None:
            getattr(w, f"add_{key}_token_id")(int(val))
    extra = sorted(v.extra_eos_ids)
    if extra:
        w.add_eot_token_id(int(extra[0]))  # llama.cpp stops on eos and eot
    w.add_add_bos_token(bool(v.add_bos))
    w.add_add_eos_token(bool(v.add_eos))
    if v.add_space_prefix is not None:
        w.add_add_space_prefix(bool(v.add_space_prefix))
    t = v.chat_template
    if isinstance(t, dict):
        t = [{"name": k, "template": s} for k, s in t.items()]
    if t:
        w.add_chat_template(t)


# ---------------------------------------------------------------- LoRA export
def export_gguf_lora(model, path, adapter: str | None = None, dtype: str = "f32") -> None:
    """Writes adapter `adapter` (default: the active one) as a llama.cpp GGUF LoRA file
    (`llama-cli -m BASE.gguf --lora PATH`, `Llama(model_path=BASE, lora_path=PATH)`).

    llama.cpp scales every module by adapter.lora.alpha / r (r read from the tensors), so the
    adapter's own per-module scaling (rsLoRA, rank_pattern / alpha_pattern) is folded into B where
    it differs from that. dtype of the factors: "f32" (default), "f16" or "bf16"."""
    if not isinstance(dtype, str) or dtype.lower() not in _LORA_DTYPES:
        raise ValueError(f"export_gguf_lora: dtype must be one of {', '.join(_LORA_DTYPES)}, got {dtype!r}")
    kind = _LORA_DTYPES[dtype.lower()]
    name = model._check_adapter(adapter)
    path = _check_target(path)
    cfg = model._lora_state()[name]
    c = model.config
    arch = _gguf_arch(model)
    mods = cfg.resolve(c.num_hidden_layers)
    # One alpha for the file: the most common scaling * r (uniform configs, rsLoRA included, need no folding).
    alpha = Counter(round(s * r, 12) for _, _, r, _, s in mods).most_common(1)[0][0]
    tensors = model.get_adapter_state_dict(name)
    sw = _StreamWriter(arch)
    w = sw.w
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(alpha))
    w.add_name(f"{name} (qlora_native LoRA)")
    for layer, proj, r, _, scaling in mods:
        a = tensors[peft_tensor_name(layer, proj, "A")]
        b = tensors[peft_tensor_name(layer, proj, "B")]
        fold = scaling * r / alpha  # llama.cpp applies alpha / r; the adapter's scaling is `scaling`
        base = f"blk.{layer}.{_PROJ_GGUF[proj]}.weight"
        n_head = ({"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads}.get(proj)
                  if arch == "llama" else None)

        def prod_b(b=b, fold=fold, n_head=n_head, base=base):
            bb = b if fold == 1.0 else (b.astype(np.float64) * fold).astype(np.float32)
            return bb if n_head is None else _permute_rows(bb, n_head, base + ".lora_b")

        sw.tensor(base + ".lora_a", a.shape, kind, lambda a=a: a)
        sw.tensor(base + ".lora_b", b.shape, kind, prod_b)
    atomic_io.write_file(path, sw.write)


# ---------------------------------------------------------------- LoRA load
def load_gguf_lora(model, path) -> tuple[LoraConfig, dict]:
    """Reads a llama.cpp GGUF LoRA adapter for `model`: (LoraConfig, {PEFT tensor name: float32}).
    llama.cpp's semantics: every module is scaled by adapter.lora.alpha / r, r from its tensors;
    the q/k B rows are permuted back to HF's layout (llama architecture)."""
    from ._core import gguf as _gguf
    from .gguf_check import FLOAT_TYPES, INT_TYPES, STRING, check_gguf
    from .gguf_source import SUPPORTED_TYPES

    layout = check_gguf(path)
    p = layout.path
    if layout.byte_order != "<":
        raise ValueError(f"{p}: big-endian GGUF files are not supported")

    def kv(key, kinds, what):
        v = layout.kv.get(key)
        if v is None:
            raise FormatError(f"{p}: GGUF metadata {key} is missing (not a llama.cpp LoRA adapter)")
        if v.type not in kinds:
            raise FormatError(f"{p}: GGUF metadata {key} must be {what}, got {v.type_name} {v.value!r}")
        return v.value

    if kv("general.type", {STRING}, "a string") != "adapter":
        raise ValueError(f"{p}: general.type is {layout.kv['general.type'].value!r}, not 'adapter' (a model file?)")
    if kv("adapter.type", {STRING}, "a string") != "lora":
        raise ValueError(f"{p}: adapter.type is {layout.kv['adapter.type'].value!r}; only 'lora' is supported")
    arch = kv("general.architecture", {STRING}, "a string")
    if arch != _gguf_arch(model):
        raise ValueError(f"{p}: the adapter is for architecture {arch!r}, the model is {_gguf_arch(model)!r}")
    alpha = layout.kv.get("adapter.lora.alpha")
    alpha = 0.0 if alpha is None else float(kv("adapter.lora.alpha", FLOAT_TYPES | INT_TYPES, "a number"))
    if not np.isfinite(alpha) or alpha < 0:
        raise FormatError(f"{p}: adapter.lora.alpha = {alpha} must be a finite number >= 0")
    # llama.cpp: alpha 0 (or absent) means no alpha / r factor, i.e. a scaling of 1 per module
    c = model.config
    shapes = model._module_shapes()
    found: dict[tuple[int, str], dict] = {}
    mm = np.memmap(p, dtype=np.uint8, mode="r")
    if mm.size != layout.size:
        raise FormatError(f"{p}: the file changed while it was being loaded")
    for t in layout.tensors:
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight\.lora_(a|b)", t.name)
        if not m or m.group(2) not in _GGUF_PROJ:
            raise ValueError(f"{p}: unexpected tensor {t.name!r} (qlora_native adapts blk.N.{{"
                             f"{','.join(_GGUF_PROJ)}}}.weight.lora_a/lora_b)")
        layer, proj, which = int(m.group(1)), _GGUF_PROJ[m.group(2)], m.group(3)
        if layer >= c.num_hidden_layers:
            raise ValueError(f"{p}: tensor {t.name} is for layer {layer}, the model has {c.num_hidden_layers}")
        qt = _gguf.type_name(t.ggml_type)
        if qt not in SUPPORTED_TYPES:
            raise ValueError(f"{p}: tensor {t.name} has unsupported GGUF type {qt}")
        shape = tuple(reversed(t.dims))
        if len(shape) != 2:
            raise FormatError(f"{p}: tensor {t.name} has {len(shape)} dimensions, expected 2")
        # the engine's own decoder (as for the base weights)
        arr = _gguf.dequantize(t.ggml_type, mm[t.offset: t.offset + t.n_bytes], shape[0] * shape[1]).reshape(shape)
        if not np.isfinite(arr).all():
            raise FormatError(f"{p}: tensor {t.name} holds NaN or infinite values")
        found.setdefault((layer, proj), {})[which] = arr
    if not found:
        raise FormatError(f"{p}: the adapter holds no LoRA tensors")
    tensors, ranks = {}, {}
    for (layer, proj), ab in sorted(found.items(), key=lambda kv_: (kv_[0][0], PROJECTIONS.index(kv_[0][1]))):
        where = f"{p}: blk.{layer}.{_PROJ_GGUF[proj]}"
        if set(ab) != {"a", "b"}:
            raise FormatError(f"{where}: has lora_{'a' if 'a' in ab else 'b'} but not its pair")
        a, b = ab["a"], ab["b"]
        out_f, in_f = shapes[proj]
        r = a.shape[0]
        if a.shape != (r, in_f) or b.shape != (out_f, r):
            raise ValueError(f"{where}: lora_a {list(a.shape)} / lora_b {list(b.shape)} do not fit the model's "
                             f"[{out_f}, {in_f}] projection (expected [r, {in_f}] and [{out_f}, r])")
        if _gguf_arch(model) == "llama" and proj in ("q_proj", "k_proj"):
            b = _unpermute_rows(b, c.num_attention_heads if proj == "q_proj" else c.num_key_value_heads, where)
        tensors[peft_tensor_name(layer, proj, "A")] = np.ascontiguousarray(a, np.float32)
        tensors[peft_tensor_name(layer, proj, "B")] = np.ascontiguousarray(b, np.float32)
        ranks[(layer, proj)] = r
    # A LoraConfig that resolves to exactly these modules with scaling alpha / r each.
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    projs = sorted({pr for _, pr in ranks}, key=PROJECTIONS.index)
    layers = sorted({l for l, _ in ranks})
    if set(ranks) == {(l, pr) for l in layers for pr in projs}:
        targets = list(projs)
        ltt = None if len(layers) == c.num_hidden_layers else layers
    else:
        targets, ltt = [module_path(l, pr) for l, pr in ranks], None
    rank_pattern = {re.escape(module_path(l, pr)): r for (l, pr), r in ranks.items() if r != r0}
    alpha_pattern = {} if alpha else {k: float(r) for k, r in rank_pattern.items()}
    try:
        cfg = LoraConfig(r=r0, lora_alpha=float(alpha or r0), lora_dropout=0.0, target_modules=targets,
                         layers_to_transform=ltt, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    except ValueError as e:
        raise ValueError(f"{p}: cannot represent this adapter as a LoraConfig ({e})") from None
    got = {(l, pr) for l, pr, *_ in cfg.resolve(c.num_hidden_layers)}
    assert got == set(ranks), (got ^ set(ranks))
    return cfg, tensors
