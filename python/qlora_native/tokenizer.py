"""Tokenizers for Llama-family models: sentencepiece `tokenizer.model`, HF `tokenizer.json`, or the
vocabulary embedded in a `.gguf` file, behind one small API (`Tokenizer.from_pretrained`)."""
from __future__ import annotations

import json
import operator
import os
import re
from pathlib import Path

from .chat_template import ChatTemplateError, render_chat_template, select_chat_template

__all__ = ["Tokenizer", "ChatTemplateError", "TOKENIZER_FILES"]

# Every file name a tokenizer directory may hold that save_pretrained writes or supersedes (a
# directory saver can pass these as obsolete: a stale one would shadow the new tokenizer).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "added_tokens.json")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        # Python's json, not the engine's parser: tokenizer_config.json's model_max_length is often
        # 1e30 written as an integer, which must round-trip through save_pretrained unchanged.
        from ._core import FormatError

        raise FormatError(f"{path}: invalid JSON ({type(exc).__name__}: {exc})") from None
    return data if isinstance(data, dict) else {}


def _token_str(v):
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _ids(v) -> list[int]:
    """config.json ids: an int, a list of ints, or null."""
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return [int(x) for x in v]
    return [int(v)]


def _check_text(text, what: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{what} expects a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates ("\ud800"): not text any tokenizer can encode
        raise ValueError(f"{what}: the text has a lone surrogate {text[exc.start]!r} at index {exc.start} "
                         "(not valid Unicode)") from None


def _clean_up_tokenization(s: str) -> str:
    # transformers' clean_up_tokenization, applied when tokenizer_config asks for it
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        s = s.replace(a, b)
    return s


def _rust_call(fn):
    """A `tokenizers` call. A component that loads but cannot run (an empty Prepend or Replace
    pattern, an unk_token missing from the vocabulary) fails inside Rust: a bare Exception, or a
    pyo3 PanicException, which derives from BaseException and passes `except Exception` handlers.
    Both become a ValueError naming the problem."""
    try:
        return fn()
    except BaseException as exc:
        if type(exc) is Exception or type(exc).__name__ == "PanicException":
            raise ValueError(f"the tokenizer failed ({type(exc).__name__}: {exc}); its tokenizer.json "
                             "holds a component tokenizers cannot run") from exc
        raise


class _HFBackend:
    """A `tokenizers.Tokenizer` (from tokenizer.json or rebuilt from a GGUF vocabulary)."""

    def __init__(self, tk, size=None):
        self.tk = tk
        # a GGUF may repeat a token string; its ids still count (size = number of tokens)
        self.size = max(size or 0, tk.get_vocab_size(with_added_tokens=True))
        self.special_ids = {i for i, a in tk.get_added_tokens_decoder().items() if a.special}

    def encode(self, text, add_special):
        return _rust_call(lambda: self.tk.encode(text, add_special_tokens=add_special).ids)

    def encode_batch(self, texts, add_special):
        return _rust_call(lambda: [e.ids for e in self.tk.encode_batch(list(texts), add_special_tokens=add_special)])

    def decode(self, ids, skip_special):
        return _rust_call(lambda: self.tk.decode(ids, skip_special_tokens=skip_special))

    def id_to_token(self, i):
        return self.tk.id_to_token(i)

    def token_to_id(self, s):
        return self.tk.token_to_id(s)


class _SentencePieceBackend:
    """The `sentencepiece` library on a tokenizer.model. Special-token strings in the text (control
    pieces and tokenizer_config added tokens) are matched whole first, as transformers and
    llama.cpp do; sentencepiece encodes the text between them."""

    def __init__(self, path: Path, add_bos: bool, add_eos: bool, added: dict[int, str]):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            # the bytes, not the name: sentencepiece takes only UTF-8 names (qlora_native.fspath)
            self.sp.LoadFromSerializedProto(Path(path).read_bytes())
        except (OSError, RuntimeError) as exc:
            from ._core import FormatError

            raise FormatError(f"{path}: not a readable sentencepiece model ({exc})") from exc
        n = self.sp.get_piece_size()
        self.add_bos, self.add_eos = add_bos, add_eos
        self.bos, self.eos = self.sp.bos_id(), self.sp.eos_id()
        self.extra = {i: s for i, s in added.items() if i >= n}  # ids past the sentencepiece vocab
        self.size = max([n - 1, *self.extra]) + 1
        # control pieces (and added tokens) are special; <unk> is matched whole in text too but
        # decodes as sentencepiece renders it (" ⁇ "), since it stands for real text
        self.special_ids = {i for i in range(n) if self.sp.is_control(i)} | set(self.extra)
        special = {self.sp.id_to_piece(i): i for i in range(n) if self.sp.is_control(i) or self.sp.is_unknown(i)}
        special.update({s: i for i, s in added.items()})
        self.special = special
        self.pattern = (re.compile("|".join(re.escape(s) for s in sorted(special, key=len, reverse=True)))
                        if special else None)

    def _encode_text(self, text):
        ids, pos = [], 0
        for m in self.pattern.finditer(text) if self.pattern else ():
            if m.start() > pos:
                ids += self.sp.encode(text[pos:m.start()])
            ids.append(self.special[m.group()])
            pos = m.end()
        if pos < len(text):
            ids += self.sp.encode(text[pos:])
        return ids

    def encode(self, text, add_special):
        ids = self._encode_text(text)
        if add_special:
            ids = ([self.bos] if self.add_bos else []) + ids + ([self.eos] if self.add_eos else [])
        return ids

    def encode_batch(self, texts, add_special):
        return [self.encode(t, add_special) for t in texts]

    def decode(self, ids, skip_special):
        # sentencepiece drops control pieces when decoding; keep them as text unless skipped
        out, run = [], []
        for i in ids:
            if i in self.special_ids:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if not skip_special:
                    out.append(self.id_to_token(i))
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def id_to_token(self, i):
        return self.extra[i] if i in self.extra else self.sp.id_to_piece(i)

    def token_to_id(self, s):
        if s in self.special:
            return self.special[s]
        i = self.sp.piece_to_id(s)
        return None if i == self.sp.unk_id() and s != self.sp.id_to_piece(i) else i


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template.

    Build with `Tokenizer.from_pretrained(path)`: a directory holding `tokenizer.json` (preferred,
    as transformers does) or a sentencepiece `tokenizer.model`, or a `.gguf` file.
    """

    def __init__(self, backend, *, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                 unk_token_id=None, eos_token_ids=(), chat_template=None, clean_up_spaces=False,
                 source="", config=None, add_bos_eos=None):
        self._b = backend
        # for save_pretrained: the source's tokenizer_config.json (keys we do not interpret are
        # written back), and the add_bos/add_eos decision where we made it (GGUF, sentencepiece)
        self._config = dict(config or {})
        self._add_bos_eos = add_bos_eos
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.unk_token_id = unk_token_id
        ids = set(eos_token_ids) | ({eos_token_id} if eos_token_id is not None else set())
        self.eos_token_ids = frozenset(ids)
        self.chat_template = chat_template
        self._clean_up = clean_up_spaces
        self.source = source

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Tokenizer":
        p = Path(os.fsdecode(os.fspath(path)))  # a bytes path too
        if p.suffix == ".gguf" and p.exists() and not p.is_dir():  # gguf_check names a device/empty file
            return cls._from_gguf(p)
        if p.is_dir():
            if (p / "tokenizer.json").is_file():
                return cls._from_hf_dir(p)
            if (p / "tokenizer.model").is_file():
                return cls._from_sentencepiece_dir(p)
            raise FileNotFoundError(f"{p}: no tokenizer.json or tokenizer.model in this directory")
        if p.is_file():
            raise ValueError(f"{p}: expected a directory (tokenizer.json / tokenizer.model) or a .gguf file")
        raise FileNotFoundError(f"{p}: no such file or directory")

    @staticmethod
    def _dir_templates(p: Path, cfg: dict):
        if (p / "chat_template.jinja").is_file():
            return (p / "chat_template.jinja").read_text(encoding="utf-8")
        if "chat_template" in cfg:
            return cfg["chat_template"]
        return _read_json(p / "chat_template.json").get("chat_template")

    @staticmethod
    def _dir_special_ids(p: Path, cfg: dict, lookup):
        """bos/eos/pad/unk ids from tokenizer_config.json, special_tokens_map.json, config.json,
        in that order of preference; extra stop ids from config.json / generation_config.json."""
        stm = _read_json(p / "special_tokens_map.json")
        mcfg = _read_json(p / "config.json")
        gcfg = _read_json(p / "generation_config.json")
        ids = {}
        for name in ("bos", "eos", "pad", "unk"):
            s = _token_str(cfg.get(f"{name}_token")) or _token_str(stm.get(f"{name}_token"))
            tid = lookup(s) if s is not None else None
            if tid is None:
                from_cfg = _ids(mcfg.get(f"{name}_token_id"))
                tid = from_cfg[0] if from_cfg else None
            ids[name] = tid
        eos_all = set(_ids(mcfg.get("eos_token_id"))) | set(_ids(gcfg.get("eos_token_id")))
        return ids, eos_all

    @classmethod
    def _from_hf_dir(cls, p: Path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        from .tokenizer_gguf import template_processing

        try:
            # the bytes, not the name: tokenizers takes only UTF-8 names (qlora_native.fspath)
            tk = HFTokenizer.from_buffer((p / "tokenizer.json").read_bytes())
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            from ._core import FormatError

            raise FormatError(f"{p / 'tokenizer.json'}: cannot load ({exc})") from exc
        cfg = _read_json(p / "tokenizer_config.json")
        ids, eos_all = cls._dir_special_ids(p, cfg, tk.token_to_id)
        # transformers replaces the post-processor when tokenizer_config sets add_bos/add_eos
        # explicitly (or there is none); otherwise tokenizer.json's post-processor decides.
        if "add_bos_token" in cfg or "add_eos_token" in cfg or tk.post_processor is None:
            bos = ids["bos"] if cfg.get("add_bos_token", False) else None
            eos = ids["eos"] if cfg.get("add_eos_token", False) else None
            tk.post_processor = template_processing(
                tk.id_to_token(bos) if bos is not None else None, bos,
                tk.id_to_token(eos) if eos is not None else None, eos,
            )
        return cls(
            _HFBackend(tk), bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
            unk_token_id=ids["unk"], eos_token_ids=eos_all, chat_template=cls._dir_templates(p, cfg),
            clean_up_spaces=bool(cfg.get("clean_up_tokenization_spaces", False)), source=str(p), config=cfg,
        )

    @classmethod
    def _from_sentencepiece_dir(cls, p: Path) -> "Tokenizer":
        cfg = _read_json(p / "tokenizer_config.json")
        added = {}
        for k, v in (cfg.get("added_tokens_decoder") or {}).items():
            s = _token_str(v)
            if s is not None:
                added[int(k)] = s
        # LlamaTokenizer's defaults: BOS yes, EOS no, unless tokenizer_config says otherwise
        b = _SentencePieceBackend(p / "tokenizer.model", bool(cfg.get("add_bos_token", True)),
                                  bool(cfg.get("add_eos_token", False)), added)
        sp = b.sp

        def own(i):
            return i if i >= 0 else None

        lookup = b.token_to_id
        ids, eos_all = cls._dir_special_ids(p, cfg, lookup)
        for name, own_id in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("pad", sp.pad_id()), ("unk", sp.unk_id())):
            if ids[name] is None:
                ids[name] = own(own_id)
        b.bos, b.eos = ids["bos"], ids["eos"]
        b.add_bos = b.add_bos and b.bos is not None
        b.add_eos = b.add_eos and b.eos is not None
        return cls(
            b, bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
            unk_token_id=ids["unk"], eos_token_ids=eos_all, chat_template=cls._dir_templates(p, cfg),
            clean_up_spaces=bool(cfg.get("clean_up_tokenization_spaces", False)), source=str(p), config=cfg,
            add_bos_eos=(b.add_bos, b.add_eos),
        )

    @classmethod
    def _from_gguf(cls, p: Path) -> "Tokenizer":
        from .tokenizer_gguf import build_gguf_tokenizer, read_gguf_vocab

        v = read_gguf_vocab(p)
        tk, add_bos, add_eos = build_gguf_tokenizer(v)
        return cls(
            _HFBackend(tk, len(v.tokens)), bos_token_id=v.bos_token_id, eos_token_id=v.eos_token_id,
            pad_token_id=v.pad_token_id, unk_token_id=v.unk_token_id, eos_token_ids=v.extra_eos_ids,
            chat_template=v.chat_template, source=str(p), add_bos_eos=(add_bos, add_eos),
        )

    # ---- saving -------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike) -> list[str]:
        """Write the tokenizer into `save_directory` (created if needed) as transformers does, so
        that both `Tokenizer.from_pretrained` and transformers' `AutoTokenizer.from_pretrained` load it:
        tokenizer.json (tokenizers-library tokenizers, GGUF vocabularies included) or tokenizer.model
        (sentencepiece), plus tokenizer_config.json with the special tokens, add_bos_token /
        add_eos_token and the chat template. Each file is written to a temporary name and renamed;
        tokenizer files left by an earlier save that would shadow these are removed. Returns the
        paths written."""
        from . import atomic_io

        d = Path(save_directory)
        if d.exists() and not d.is_dir():
            raise NotADirectoryError(f"{d}: exists and is not a directory")
        if isinstance(self._b, _HFBackend) and self._b.size > self._b.tk.get_vocab_size(with_added_tokens=True):
            # tokenizer.json maps each string to one id: repeated GGUF token strings cannot be kept
            raise ValueError(f"{self.source}: the vocabulary repeats token strings ({self._b.size} ids, "
                             f"{self._b.tk.get_vocab_size(with_added_tokens=True)} distinct tokens); "
                             "it cannot be saved as tokenizer.json")
        d.mkdir(parents=True, exist_ok=True)
        files = {"tokenizer_config.json": json.dumps(self._save_config(), indent=2, ensure_ascii=False) + "\n"}
        special_map = {f"{n}_token": getattr(self, f"{n}_token") for n in ("bos", "eos", "pad", "unk")}
        files["special_tokens_map.json"] = json.dumps({k: v for k, v in special_map.items() if v is not None},
                                                      indent=2, ensure_ascii=False) + "\n"
        if isinstance(self._b, _HFBackend):
            files["tokenizer.json"] = self._b.tk.to_str(pretty=True)
            stale = ["chat_template.jinja", "chat_template.json", "added_tokens.json"]
        else:  # sentencepiece: the model file itself, as transformers' sentencepiece tokenizers save it
            files["tokenizer.model"] = self._b.sp.serialized_model_proto()
            stale = ["chat_template.jinja", "chat_template.json", "added_tokens.json", "tokenizer.json"]
        written = []
        for name, data in files.items():
            atomic_io.write_bytes(d / name, data.encode("utf-8") if isinstance(data, str) else data)
            written.append(str(d / name))
        for name in stale:  # both loaders would prefer these over what was just written
            try:
                (d / name).unlink()
            except FileNotFoundError:
                pass
        return written

    def _save_config(self) -> dict:
        """tokenizer_config.json: the source's keys, with what this tokenizer decides overwritten."""
        # dropped: what we write below, paths of the source, and auto_map (code files not copied)
        drop = {"chat_template", "bos_token", "eos_token", "pad_token", "unk_token", "auto_map", "name_or_path",
                "tokenizer_file", "vocab_file", "merges_file", "special_tokens_map_file", "is_local",
                "local_files_only"}
        cfg = {k: v for k, v in self._config.items() if k not in drop}
        sp = not isinstance(self._b, _HFBackend)
        # PreTrainedTokenizerFast: tokenizer.json as it is (transformers 4 and 5); LlamaTokenizer:
        # a tokenizer.model with Llama's BOS/EOS semantics, which our sentencepiece backend follows
        cfg.setdefault("tokenizer_class", "LlamaTokenizer" if sp else "PreTrainedTokenizerFast")
        for n in ("bos", "eos", "pad", "unk"):
            cfg[f"{n}_token"] = getattr(self, f"{n}_token")
        if self._add_bos_eos is not None:
            # explicit, so that transformers rebuilds the same BOS/EOS post-processor we use
            cfg["add_bos_token"], cfg["add_eos_token"] = (bool(x) for x in self._add_bos_eos)
        cfg["clean_up_tokenization_spaces"] = bool(self._clean_up)
        t = self.chat_template
        if isinstance(t, dict):  # named templates: the list form transformers writes
            cfg["chat_template"] = [{"name": k, "template": v} for k, v in t.items()]
        elif t is not None:
            cfg["chat_template"] = t
        return cfg

    # ---- encoding -----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (ids are 0..vocab_size-1)."""
        return self._b.size

    def __len__(self) -> int:
        return self._b.size

    def _token(self, i):
        return None if i is None else self._b.id_to_token(i)

    @property
    def bos_token(self):
        return self._token(self.bos_token_id)

    @property
    def eos_token(self):
        return self._token(self.eos_token_id)

    @property
    def pad_token(self):
        return self._token(self.pad_token_id)

    @property
    def unk_token(self):
        return self._token(self.unk_token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        _check_text(text, "encode")
        return self._b.encode(text, bool(add_special_tokens))

    def encode_batch(self, texts, add_special_tokens: bool = True) -> list[list[int]]:
        if isinstance(texts, str):
            raise TypeError("encode_batch expects a list of strings, got a single str (use encode)")
        texts = list(texts)
        for k, t in enumerate(texts):
            _check_text(t, f"encode_batch: texts[{k}]")
        return self._b.encode_batch(texts, bool(add_special_tokens))

    def _check_ids(self, ids) -> list[int]:
        """Ids as plain ints: Python/numpy integers only (no bools, floats or strings, which int()
        would silently convert or truncate), each within the vocabulary."""
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise ValueError(f"token ids must be a sequence of integers, got {type(ids).__name__}")
        out = []
        for k, i in enumerate(ids):
            if isinstance(i, bool) or type(i).__name__ == "bool_":
                raise ValueError(f"token ids must be integers: ids[{k}] = {i!r} is a bool")
            try:
                out.append(operator.index(i))
            except TypeError:
                raise ValueError(f"token ids must be integers: ids[{k}] = {i!r} ({type(i).__name__})") from None
        bad = [i for i in out if not 0 <= i < self._b.size]
        if bad:
            raise ValueError(f"token id(s) {bad[:5]} out of range [0, {self._b.size})")
        return out

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "__index__") and not hasattr(ids, "__len__"):  # one id, as transformers allows
            ids = [ids]
        text = self._b.decode(self._check_ids(ids), bool(skip_special_tokens))
        return _clean_up_tokenization(text) if self._clean_up else text

    def convert_ids_to_tokens(self, ids):
        """Token strings for an id or a list of ids."""
        if isinstance(ids, int) or (hasattr(ids, "__index__") and not hasattr(ids, "__len__")):
            return self._b.id_to_token(self._check_ids([ids])[0])
        return [self._b.id_to_token(i) for i in self._check_ids(ids)]

    def convert_tokens_to_ids(self, tokens):
        """Id of a token string (None when not in the vocabulary), or a list of them."""
        if isinstance(tokens, str):
            return self._b.token_to_id(tokens)
        tokens = list(tokens)
        for k, t in enumerate(tokens):
            if not isinstance(t, str):
                raise TypeError(f"convert_tokens_to_ids expects strings, got tokens[{k}] = {t!r}")
        return [self._b.token_to_id(t) for t in tokens]

    @property
    def all_special_ids(self) -> set[int]:
        return set(self._b.special_ids)

    # ---- chat ---------------------------------------------------------------------------------
    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False,
                            *, chat_template: str | None = None, tools=None, documents=None, **kwargs):
        """Render a conversation with the model's chat template (jinja2, as transformers does).
        With tokenize=True, returns ids (the template writes any BOS itself, so none is added)."""
        named = self.chat_template if isinstance(self.chat_template, (dict, list)) else {}
        names = {t["name"] for t in named} if isinstance(named, list) else set(named)
        if chat_template is None or chat_template in names:
            template = select_chat_template(self.chat_template, chat_template, tools)
        else:  # a template's source given directly
            template = chat_template
        # like transformers: only the special tokens this tokenizer has become template variables
        special = {f"{n}_token": getattr(self, f"{n}_token") for n in ("bos", "eos", "pad", "unk")}
        special = {k: v for k, v in special.items() if v is not None}
        text = render_chat_template(template, messages, add_generation_prompt=add_generation_prompt,
                                    special_tokens=special, tools=tools, documents=documents, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def __repr__(self):
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, bos={self.bos_token_id}, eos={sorted(self.eos_token_ids)})"
