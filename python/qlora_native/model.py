"""Llama-family causal LM on the qlora_native engine (no PyTorch).

    model = qlora_native.Model.from_pretrained("path/to/hf_dir", quantize="nf4")
    logits = model(input_ids, attention_mask)          # np.float32 [B, T, V]
    out = model.generate([[1, 2, 3], [4, 5]], max_new_tokens=32)

Checkpoints (HF safetensors, single or sharded, full precision or pre-quantized bitsandbytes NF4;
a GGUF file) are loaded by the C++ engine (cpp/src/model/hf_loader.cpp, cpp/src/gguf/gguf_model.cpp:
the same code as the C API's qlora_model_load) one tensor at a time, converted or NF4-quantized
straight from the memory-mapped file, so the model is never held twice in full precision.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from . import _core
from .config import ModelConfig
from .gguf_check import check_gguf, name_memory_errors
from .lora_model import LoraModelMixin
from .memory_model import HEAD_FORMATS

# ---------------------------------------------------------------- tensor sources
class SafetensorsSource:
    """An HF checkpoint directory: model.safetensors, or shards listed in model.safetensors.index.json.
    A reader for tools and tests; Model.from_pretrained loads through the C++ loader."""

    def __init__(self, path: str | bytes | os.PathLike):
        # The C++ loader's rule (model/checkpoint_source.hpp: shard names, index vs shards), one copy.
        files, self._where = _core.io.open_checkpoint(path)
        self.files: dict[str, object] = dict(files)

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.files[self._where[name]].shape(name))

    def tensors(self, names: Iterable[str]) -> Iterator[tuple[str, object, str, tuple[int, ...]]]:
        """(name, zero-copy view of the bytes, dtype name, shape) for each name, as stored
        (bitsandbytes NF4 checkpoints are read by the engine: cpp/src/model/hf_loader.cpp)."""
        for n in names:
            f = self.files[self._where[n]]
            yield n, f.get(n), f.dtype_name(n), tuple(f.shape(n))


# ---------------------------------------------------------------- the model
class Model(LoraModelMixin):
    """A Llama / Mistral / Qwen2 / SmolLM causal LM with NF4 (or fp32) projections."""

    name_or_path: str | None = None  # what from_pretrained loaded (recorded in saved adapters, like PEFT)
    # False (default): inputs longer than config.max_position_embeddings raise ValueError (the
    # sequence length in model(...), forward_backward and eval_loss; prompt + max_new_tokens in
    # generate). True: accepted; positions past the trained range extrapolate RoPE, and the
    # output quality usually collapses.
    allow_long_context: bool = False

    def __init__(self, config: ModelConfig, core: "_core.model.LlamaModel", tokenizer=None):
        self.config = config
        self._core = core
        self.tokenizer = tokenizer

    # ------------------------------------------------------------ loading
    @classmethod
    @name_memory_errors
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        quantize: str | None = "nf4",
        double_quant: bool = True,
        blocksize: int = 64,
        backend: str = "cpu",
        tokenizer="auto",
        compute_dtype: str | None = None,
        head_format: str = "float32",
    ) -> "Model":
        """Loads an HF checkpoint directory (config.json + safetensors) or a .gguf file.

        quantize: "nf4" (bitsandbytes layout, blocksize, double_quant) or None (fp32).
        tokenizer: "auto" attaches qlora_native.Tokenizer when the checkpoint has one
        (tokenizer.json / tokenizer.model / GGUF vocabulary), else None; or pass one (or None).
        compute_dtype: "float32" or "bfloat16" for every pass (see Model.compute_dtype); None (default): the
        backend's default, "bfloat16" on a CUDA GPU with bf16 tensor cores (sm_80+), else "float32".
        head_format: how the embedding / lm_head are kept (see Model.head_format), applied before they
        load: they never exist in fp32 on the device, and a GGUF's or checkpoint's tables already in that
        16-bit dtype are kept as stored (no widening)."""
        if compute_dtype is not None:
            _check_compute_dtype(compute_dtype)
        path = os.fsdecode(os.fspath(path))  # a bytes path too: name_or_path and messages are str
        if not os.path.isfile(path):  # a directory, or one whose killed save left it renamed away
            from . import atomic_io

            atomic_io.recover(path)  # a save_pretrained that was killed: finish or roll it back
        if quantize not in ("nf4", None):
            raise ValueError(f"quantize must be 'nf4' or None, got {quantize!r}")
        _check_head_format(head_format)
        gguf_file = None
        if path.endswith(".gguf") and not os.path.isdir(path):
            # The C++ reader: every count and offset bounded before the tokenizer or `gguf` reads it.
            gguf_file = _core.gguf.GGUFFile(path)
        if isinstance(tokenizer, str):
            if tokenizer != "auto":
                raise ValueError(f"tokenizer must be 'auto', None or a tokenizer object, got {tokenizer!r}")
            # Before the weights: its GGUF metadata parse is freed before the weights arrive (peak RSS).
            tokenizer = _auto_tokenizer(path)
        if gguf_file is not None:
            # Config, weights and every check in C++ (cpp/src/gguf/gguf_model.cpp), as the C API loads it.
            try:
                core, hf_config = _core.gguf.load_model(gguf_file, backend, quantize == "nf4", blocksize,
                                                        double_quant, head_format)
                config = ModelConfig.from_dict(hf_config)
            except ValueError as e:  # FormatError included; the C++ loader names the file
                if path in str(e):
                    raise
                raise type(e)(f"{path}: {e}") from None
            del gguf_file  # the mapping goes with the last reference
        else:
            cfg_path = os.path.join(path, "config.json")
            if not os.path.isfile(cfg_path):
                raise FileNotFoundError(f"{path}: no config.json")
            config = ModelConfig.from_file(cfg_path)
            # A pre-quantized bitsandbytes NF4 checkpoint is read by the engine (hf_loader.cpp): its
            # stored NF4 weights are used as they are; quantize=None is refused there.
            if not any(os.path.isfile(os.path.join(path, f)) for f in ("model.safetensors.index.json",
                                                                      "model.safetensors")):
                raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
            try:
                # Shards, quant states and weights tensor by tensor in C++ (cpp/src/model/hf_loader.cpp),
                # as the C API loads them.
                core = _core.config.load_hf_model(path, backend, quantize == "nf4", blocksize, double_quant,
                                                  head_format)
            except ValueError as e:  # name the checkpoint in every loading error (FormatError included)
                if path in str(e):
                    raise
                raise type(e)(f"{path}: {e}") from None
        model = cls(config, core, tokenizer)
        model.name_or_path = path
        if compute_dtype is not None:
            model._set_compute_dtype(compute_dtype, stacklevel=4)
        return model

    # ------------------------------------------------------------ forward
    def __call__(self, input_ids, attention_mask=None, *, adapter_name: str | None = None,
                 adapter_names=None) -> np.ndarray:
        """Logits np.float32 [B, T, V] for input_ids [B, T] (or [T]); attention_mask 1 = token, 0 = pad.
        adapter_name: this call's adapter (None: the active one; "__base__": none). adapter_names: one
        adapter per row instead (PEFT's mixed batch; "__base__": none), served in one forward pass. Safe
        to call from several threads at once."""
        ids = self._check_ids(input_ids)
        mask = None if attention_mask is None else _as_mask(attention_mask, ids.shape)
        self._check_context(_longest_row(ids, mask), "input_ids")
        names = self._adapter_names_arg(adapter_names, ids.shape[0], adapter_name)
        return self._core.forward(ids, mask, self._adapter_arg(adapter_name), names)

    def _adapter_names_arg(self, names, batch: int, adapter_name):
        """adapter_names (one per row: a loaded adapter's name or "__base__") as a list of str, or None."""
        if names is None:
            return None
        if adapter_name is not None:
            raise ValueError("give adapter_name or adapter_names, not both")
        if isinstance(names, (str, bytes)) or not isinstance(names, (list, tuple)):
            raise ValueError(f"adapter_names must be a list of adapter names (one per row), got {_short(names)}")
        names = list(names)
        if len(names) != batch:
            raise ValueError(f"adapter_names has {len(names)} names for a batch of {batch} rows (one per row)")
        loaded = self.adapters
        for i, n in enumerate(names):
            if not isinstance(n, str):
                raise ValueError(f"adapter_names[{i}] must be an adapter's name or '__base__', got {_short(n)}")
            if n != "__base__" and n not in loaded:
                have = ", ".join(repr(a) for a in loaded) or "none"
                raise ValueError(f"adapter_names[{i}]: no adapter named {n!r} (loaded: {have}; '__base__' = no adapter)")
            if n == self.merged_adapter:
                raise ValueError(f"adapter_names[{i}]: adapter {n!r} is merged into the weights (applying it again "
                                 f"would double it); use '__base__' or unmerge_adapter() first")
        return names

    def _adapter_arg(self, name):
        """A per-call adapter_name: None (the active adapter), "__base__" (none) or a loaded adapter's name
        (the engine checks it is loaded and lists the loaded ones otherwise)."""
        if name is not None and not isinstance(name, str):
            raise ValueError(f"adapter_name must be an adapter's name, '__base__' or None, got {_short(name)}")
        if name is not None and name == self.merged_adapter:
            raise ValueError(f"adapter_name: adapter {name!r} is merged into the weights (applying it again would "
                             f"double it); use '__base__' or unmerge_adapter() first")
        return name

    def _check_context(self, length: int, what: str) -> None:
        """ValueError when `length` positions exceed max_position_embeddings (unless allow_long_context)."""
        limit = self.config.max_position_embeddings
        if length > limit and not self.allow_long_context:
            raise ValueError(f"{what} is {length} tokens long, more than the model's max_position_embeddings "
                             f"{limit}; set model.allow_long_context = True to run it anyway (quality degrades)")

    def _check_ids(self, input_ids) -> np.ndarray:
        a = np.asarray(input_ids)
        if a.ndim == 1:
            a = a[None, :]
        if a.ndim != 2 or a.size == 0:
            raise ValueError(f"input_ids must be a non-empty [batch, seq] array, got shape {a.shape}")
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"input_ids must be integers, got {a.dtype}")
        V = self.config.vocab_size
        bad = (a < 0) | (a >= V)
        if bad.any():
            i = tuple(int(x) for x in np.argwhere(bad)[0])
            raise ValueError(f"token id {int(a[i])} at {i} is out of range [0, {V})")
        return np.ascontiguousarray(a, dtype=np.int32)

    # ------------------------------------------------------------ generation
    def generate(
        self,
        input_ids,
        max_new_tokens: int = 32,
        *,
        attention_mask=None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        eos_token_id: int | Sequence[int] | None = "config",
        stop: str | Sequence[str] | None = None,
        stream: Callable[[int, int], None] | None = None,
        pad_token_id: int = 0,
        adapter_name: str | None = None,
        adapter_names=None,
    ) -> list[list[int]]:
        """Generates up to max_new_tokens per prompt; returns the new tokens of each row.

        input_ids: one prompt (list of ids / 1-D array), a list of prompts of any lengths, or a
        [B, T] array with attention_mask (padding removed); a str or list of str when a tokenizer
        is attached. Prompts are left-padded internally and prefilled in one batched pass.
        temperature 0 is greedy; top_k / top_p / repetition_penalty follow transformers.
        eos_token_id: "config" (the config's), None, an id or ids; the EOS token is kept in the
        output. stop: strings that end a row once its decoded output contains one (needs a
        tokenizer). stream(row, token) is called for every new token (it may call generate or
        model(...) itself). Prompt + max_new_tokens must fit max_position_embeddings unless
        model.allow_long_context is True. adapter_name: the adapter of this call (None: the active
        one; "__base__": none), kept to its last token whatever set_adapter / delete_adapter do
        meanwhile. Each call runs in its own context (its own KV cache, the weights shared): calls
        from several threads run at once. adapter_names: one adapter per prompt instead (PEFT's mixed
        batch; "__base__": none); the batch runs as one generation, each row with its own adapter."""
        adapter_name = self._adapter_arg(adapter_name)
        prompts = self._prompts(input_ids, attention_mask)
        adapter_names = self._adapter_names_arg(adapter_names, len(prompts), adapter_name)
        V = self.config.vocab_size
        max_new_tokens = _int_arg("max_new_tokens", max_new_tokens, 0)
        if isinstance(eos_token_id, str):
            if eos_token_id != "config":
                raise ValueError(f"eos_token_id must be 'config', None, an id or ids, got {eos_token_id!r}")
            eos_token_id = self.config.eos_token_id
        if eos_token_id is None:
            eos = set()
        elif isinstance(eos_token_id, (int, np.integer, bool)):
            eos = {_int_arg("eos_token_id", eos_token_id, 0, V - 1)}
        elif isinstance(eos_token_id, (list, tuple, set, frozenset, np.ndarray)):
            ids_ = eos_token_id.ravel().tolist() if isinstance(eos_token_id, np.ndarray) else list(eos_token_id)
            eos = {_int_arg("eos_token_id", e, 0, V - 1) for e in ids_}
        else:
            raise ValueError(f"eos_token_id must be 'config', None, an id or ids, got {eos_token_id!r}")
        stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, (list, tuple)) else (
            [] if stop is None else None)
        if stops is None or not all(isinstance(x, str) and x for x in stops):
            raise ValueError(f"stop must be a non-empty string or a list of non-empty strings, got {stop!r}")
        if stops and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: set model.tokenizer or pass token ids via eos_token_id")
        if stream is not None and not callable(stream):
            raise ValueError(f"stream must be a callable stream(row, token) or None, got {stream!r}")
        pad_token_id = _int_arg("pad_token_id", pad_token_id, 0, V - 1)
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        # Any int64 or uint64 value; a negative one keys the generator by its two's complement.
        sampler = _core.model.Sampler(_int_arg("seed", seed, -2**63, 2**64 - 1) & (2**64 - 1))
        sample_args = dict(temperature=_float_arg("temperature", temperature, 0.0),
                           top_k=_int_arg("top_k", top_k, 0, 2**63 - 1),
                           top_p=_float_arg("top_p", top_p, 0.0, 1.0, lo_open=True),
                           repetition_penalty=_float_arg("repetition_penalty", repetition_penalty, 0.0, lo_open=True))
        # Validates the sampling options before any compute.
        sampler.sample(np.zeros(1, np.float32), np.zeros(0, np.int32), **sample_args)

        B = len(prompts)
        P = max(len(p) for p in prompts)
        self._check_context(P + max_new_tokens, f"the longest prompt ({P} tokens) + max_new_tokens ({max_new_tokens})")
        out: list[list[int]] = [[] for _ in range(B)]
        if max_new_tokens == 0:
            return out
        self._check_kv_memory(B, P + max_new_tokens)
        ids = np.full((B, P), pad_token_id, np.int32)
        mask = np.zeros((B, P), np.int32)
        for b, p in enumerate(prompts):
            ids[b, P - len(p):] = p
            mask[b, P - len(p):] = 1
        history = [list(p) for p in prompts]
        # This request's context: its KV cache and the adapter it keeps to its last token.
        ctx = self._core.new_context(B, P + max_new_tokens, adapter_name, adapter_names)
        try:
            self._decode(ctx, ids, mask, max_new_tokens, sampler, sample_args, history, out, eos, stops, stream,
                         pad_token_id)
        finally:
            ctx.close()  # the cache is freed now, not when the garbage collector gets to it
        return out

    def _check_kv_memory(self, batch: int, capacity: int) -> None:
        """ValueError naming max_new_tokens when the KV cache of batch x capacity tokens cannot fit in
        memory (checked in exact integers before anything is allocated; the engine checks again)."""
        c = self.config
        need = 4 * 2 * c.num_hidden_layers * batch * c.num_key_value_heads * capacity * c.head_dim
        try:
            ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if self.backend == "cpu" else 0
        except (ValueError, OSError):
            ram = 0
        if ram > 0 and need > ram:
            raise ValueError(f"max_new_tokens: the KV cache for {batch} prompt(s) x {capacity} tokens needs "
                             f"{need / 2**30:.1f} GiB, more than this machine's memory ({ram / 2**30:.1f} GiB); "
                             f"lower max_new_tokens or the batch")
        if capacity >= 2**31:  # positions are int32 in the engine
            raise ValueError(f"max_new_tokens: {capacity} tokens per row exceed the engine's limit of 2^31 - 1")

    def _decode(self, ctx, ids, mask, max_new_tokens, sampler, sample_args, history, out, eos, stops, stream,
                pad_token_id):
        B = len(out)
        done = [False] * B
        no_hist = np.zeros(0, np.int32)
        penalty = sample_args["repetition_penalty"] != 1.0  # the only use of the history
        feed_ids, feed_mask = ids, mask  # the prompts first, then one token per live row
        for step in range(max_new_tokens):
            rows = [b for b in range(B) if not done[b]]
            hists = [np.asarray(history[b], np.int32) if penalty else no_hist for b in rows]
            # One engine call per step: the forward and each live row's token, chosen where the logits
            # are (a GPU returns token ids only); draws in row order, as Sampler.sample_rows.
            toks = ctx.feed_sample(feed_ids, feed_mask, sampler, np.asarray(rows, np.int32), hists,
                                   **sample_args).tolist()
            nxt = np.full((B, 1), pad_token_id, np.int32)
            live = np.zeros((B, 1), np.int32)
            for b, tok in zip(rows, toks):
                out[b].append(tok)
                history[b].append(tok)
                if stream is not None:
                    stream(b, tok)
                if tok in eos or (stops and self._hit_stop(out[b], stops)):
                    done[b] = True
                else:
                    nxt[b, 0], live[b, 0] = tok, 1
            if all(done) or step == max_new_tokens - 1:
                break
            feed_ids, feed_mask = nxt, live

    def _hit_stop(self, tokens: list[int], stops: list[str]) -> bool:
        # Decode a tail long enough to hold any stop string (a token is at least one char or byte).
        tail = max(len(s) for s in stops) + 8
        text = self.tokenizer.decode(tokens[-tail:])
        return any(s in text for s in stops)

    def _prompts(self, input_ids, attention_mask) -> list[list[int]]:
        if isinstance(input_ids, str) or (isinstance(input_ids, (list, tuple)) and input_ids and isinstance(input_ids[0], str)):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer: set model.tokenizer or pass token ids")
            texts = [input_ids] if isinstance(input_ids, str) else list(input_ids)
            input_ids = [list(self.tokenizer.encode(t)) for t in texts]
        if isinstance(input_ids, np.ndarray) and input_ids.ndim == 2:
            ids = self._check_ids(input_ids)
            m = np.ones_like(ids) if attention_mask is None else _as_mask(attention_mask, ids.shape)
            prompts = [ids[b][m[b] == 1].tolist() for b in range(ids.shape[0])]
        else:
            if attention_mask is not None:
                raise ValueError("attention_mask is only accepted with a 2-D input_ids array")
            seq = list(input_ids) if not isinstance(input_ids, np.ndarray) else [input_ids.tolist()]
            if seq and np.isscalar(seq[0]):
                seq = [seq]
            prompts = []
            for p in seq:
                a = np.asarray(p)
                if a.ndim != 1:
                    raise ValueError("each prompt must be a 1-D list of token ids")
                prompts.append(self._check_ids(a)[0].tolist() if a.size else [])
        if not prompts:
            raise ValueError("generate: no prompts")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"generate: prompt {i} is empty")
        return prompts

    # ------------------------------------------------------------ introspection
    def __repr__(self) -> str:
        c = self.config
        return (f"Model({c.arch}, layers={c.num_hidden_layers}, hidden={c.hidden_size}, vocab={c.vocab_size}, "
                f"backend={self.backend!r})")

    def memory_footprint(self) -> dict[str, int]:
        """Bytes held by category: nf4_weights, quant_constants, other_weights, kv_cache, lora_adapters
        (A, B; their gradients once the adapter has trained; AdamW moments), lora_adapters_bf16 (the
        bf16 inference copies held, see adapter_dtype), total."""
        d = {k: int(v) for k, v in self._core.memory_footprint().items()}
        d["total"] = sum(d.values())
        return d

    def save_pretrained(self, path: str | os.PathLike, dtype: str | None = None) -> None:
        """Saves config.json + model.safetensors: NF4 projections in the bitsandbytes 4-bit layout
        (transformers + bitsandbytes load it; reloading here uses the bytes as they are); the other
        tensors in `dtype` (float32, float16 or bfloat16; default: the dtype of an unquantized
        merge_adapter / merge_and_unload, else float32)."""
        from .export import save_pretrained

        if dtype is None:
            dtype = self.__dict__.get("_merged_dtype") or "float32"

        save_pretrained(self, path, dtype, _stacklevel=3)

    def export_gguf(self, path: str | os.PathLike, dtype: str = "f16") -> None:
        """Writes the model as a llama.cpp GGUF file (dtype "f16", "bf16", "q8_0" or "f32"; NF4
        projections are dequantized first) with its tokenizer and chat template; see export_gguf.py."""
        from .export_gguf import export_gguf

        export_gguf(self, path, dtype)

    def nf4_weight(self, name: str) -> dict | None:
        """NF4 storage of a projection (e.g. "model.layers.0.self_attn.q_proj"), None if fp32."""
        return self._core.linear_nf4(name)

    @property
    def backend(self) -> str:
        return self._core.backend

    @property
    def compute_dtype(self) -> str:
        """dtype every pass computes in (model(...) logits, generation, forward_backward, eval_loss):
        "float32" (the parity mode; the default on the CPU) or "bfloat16" (bitsandbytes'
        bnb_4bit_compute_dtype=torch.bfloat16; the default on CUDA sm_80+): NF4 weights decoded to bf16,
        activations and gradients rounded to bf16 as they enter the base projections and the lm_head,
        fp32 accumulation, and the KV cache of model(...) and generation stored in bf16 (half the bytes);
        LoRA factors and terms, their gradients, AdamW state, norms, softmax and the residual stream stay
        fp32. A generation already started keeps the dtype it started with.
        Needs bf16 units (AVX512-BF16: Zen 4+, Intel Cooper Lake / Sapphire Rapids+; CUDA sm_80+);
        elsewhere setting "bfloat16" warns and the model keeps computing in float32 (this property then
        reads "float32")."""
        return "bfloat16" if self._core.bf16_compute_active else "float32"

    @compute_dtype.setter
    def compute_dtype(self, value: str) -> None:
        self._set_compute_dtype(value, stacklevel=3)

    def _set_compute_dtype(self, value, stacklevel: int) -> None:
        _check_compute_dtype(value)
        self._core.compute_bf16 = value == "bfloat16"
        if value == "bfloat16" and not self._core.bf16_compute_active:
            warnings.warn(f"compute_dtype='bfloat16': backend {self.backend!r} has no bf16 compute here (on CPUs it "
                          "needs AVX512-BF16); computing in float32", RuntimeWarning, stacklevel=stacklevel)


    @property
    def adapter_dtype(self) -> str:
        """dtype the LoRA factors are read in by inference passes (model(...), generate; never training):
        "auto" (the default): bfloat16 when the pass computes in bfloat16 (compute_dtype), else float32,
        so the float32 parity mode is unchanged; "float32": always the fp32 factors; "bfloat16": always
        bf16 (also under compute_dtype="float32": fp32 base, bf16 adapters).
        bf16 = a bf16 copy of every A and B made when the adapter is added (or at its first bf16 pass)
        and rebuilt after it is trained or set (the fp32 factors stay the masters: training, merging,
        saving). The LoRA terms then round x and A, then x·Aᵀ and B, to bf16 and accumulate in fp32
        (vdpbf16ps, twice the products per instruction of fp32 FMAs) from copies of half the fp32 bytes
        (ranks padded to multiples of 16), held beside the fp32 factors
        (memory_footprint()["lora_adapters_bf16"]). Needs AVX512-BF16 (Zen 4+, Intel Cooper Lake /
        Sapphire Rapids+); elsewhere, and on CUDA for now, the fp32 factors are used. A generation
        already started keeps the dtype it started with."""
        return self._core.adapter_dtype

    @adapter_dtype.setter
    def adapter_dtype(self, value: str) -> None:
        if not isinstance(value, str):
            raise ValueError(f"adapter_dtype must be 'auto', 'float32' or 'bfloat16', got {value!r}")
        self._core.adapter_dtype = value

    @property
    def head_format(self) -> str:
        """How the embedding and the lm_head are kept on the device: "float32" (the default), "bf16" /
        "f16" (16-bit rows, half the bytes: Llama-3-8B's two [128256, 4096] tables take 2.0 GiB instead
        of 3.9 GiB; each weight rounded once to nearest even, relative error at most 2^-8 for bf16 and
        2^-11 for f16; products still accumulate in fp32) or "q8_0" (GGUF's 8-bit Q8_0 rows, 34 bytes per
        32 weights, 3.8x smaller: 1.0 GiB; the values change by at most half a quantization step per
        weight). Setting a format other than "float32" converts the tables once (irreversible; a
        checkpoint tensor already in that 16-bit dtype is kept bit for bit) and every pass then reads
        them so: the embedding gather, the lm_head logits and, in training, the loss gradient through
        the lm_head. Tied embeddings share one table. Changing it again is an error (reload the model);
        "f16" refuses a weight beyond fp16's range (65504). A GGUF's Q8_0 token embedding reads
        "float32" until "q8_0" is set; a tied one is read as stored anyway by CPU training and eval_loss
        (no fp32 copy, same values: fp16 scale x int8 is exact in fp32)."""
        half = self._core.head_half
        if half is not None:
            return half
        return "q8_0" if self._core.head_q8_0 else "float32"

    @head_format.setter
    def head_format(self, value: str) -> None:
        _check_head_format(value)
        current = self.head_format
        if value == current:
            return
        if current != "float32":
            how = "be turned back into" if value == "float32" else "change to"
            raise ValueError(f"head_format: the embedding / lm_head are {current!r} already and cannot {how} "
                             f"{value!r} (reload the model)")
        if value == "q8_0":
            self._core.set_head_q8_0()
        elif value in ("f16", "bf16"):
            self._core.set_head_half(value == "bf16")



def _check_head_format(value) -> None:
    if not isinstance(value, str) or value not in HEAD_FORMATS:
        raise ValueError(f"head_format must be one of {', '.join(map(repr, HEAD_FORMATS))}, got {value!r}")


def _check_compute_dtype(value) -> None:
    if not isinstance(value, str) or value not in ("float32", "bfloat16"):
        raise ValueError(f"compute_dtype must be 'float32' or 'bfloat16', got {value!r}")


def _auto_tokenizer(path: str):
    if path.endswith(".gguf") and os.path.isfile(path) and "tokenizer.ggml.model" not in check_gguf(path).kv:
        return None  # a GGUF without a vocabulary (e.g. exported from a model that had no tokenizer)
    has = path.endswith(".gguf") or any(
        os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model"))
    if not has:
        return None
    from .tokenizer import Tokenizer

    return Tokenizer.from_pretrained(path)


def _int_arg(name: str, v, lo: int | None = None, hi: int | None = None) -> int:
    """An integer argument (Python or numpy int, not bool) checked against [lo, hi]; ValueError naming it."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {_short(v)}")
    v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {'in ' if hi is not None else ''}{rng}, got {_short(v)}")
    return v


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:40] + "..." + r[-10:]


def _float_arg(name: str, v, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> float:
    """A finite real argument (int or float, not bool) checked against its range; ValueError naming it."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {_short(v)}")
    try:
        f = float(v)
    except OverflowError:
        f = float("inf")
    if not np.isfinite(f) or (lo is not None and (f <= lo if lo_open else f < lo)) or (hi is not None and f > hi):
        want = f"{'(' if lo_open else '['}{lo}, {hi}]" if hi is not None else f"{'>' if lo_open else '>='} {lo}"
        raise ValueError(f"{name} must be a finite number {'in ' if hi is not None else ''}{want}, got {_short(v)}")
    return f


def _longest_row(ids: np.ndarray, mask: np.ndarray | None) -> int:
    """Positions a [B, T] batch uses: T, or its most real tokens in one row when masked."""
    return int(ids.shape[1] if mask is None else mask.sum(axis=1).max())


def _as_mask(attention_mask, shape) -> np.ndarray:
    m = np.asarray(attention_mask)
    if m.ndim == 1:
        m = m[None, :]
    if m.shape != tuple(shape):
        raise ValueError(f"attention_mask shape {m.shape} differs from input_ids shape {tuple(shape)}")
    if not (np.issubdtype(m.dtype, np.integer) or m.dtype == np.bool_) or ((m != 0) & (m != 1)).any():
        raise ValueError("attention_mask must hold only 0 and 1")
    return np.ascontiguousarray(m, dtype=np.int32)
