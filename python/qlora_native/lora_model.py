"""LoRA adapters and training on qlora_native.Model (mixed into Model; no PyTorch).

    model.add_adapter("default", LoraConfig(r=8, target_modules="all-linear"), seed=0)
    model.configure_optimizer(lr=2e-4)
    loss = model.forward_backward(input_ids, labels, attention_mask)   # mean loss; grads accumulate
    model.clip_grad_norm(1.0); model.optimizer_step(); model.zero_grad()
    model.save_adapter("out/")            # PEFT format: peft.PeftModel.from_pretrained(base, "out/")

The active adapter applies to model(...), generate(...) and the training passes: y = W x (+ b) +
scaling * B(A(dropout(x))); model(...) and generate(...) can pick their own with adapter_name=. Tensors are exchanged under PEFT names
(base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight).
"""
from __future__ import annotations

import contextlib
import math
import os

import numpy as np

from . import _core, adapter_io
from .lora_config import LoraConfig, peft_tensor_name, peft_tensors

__all__ = ["LoraModelMixin", "check_activation_memory_budget"]


def check_activation_memory_budget(budget) -> float:
    """budget as a float in [0, 1] (activation_memory_budget), else ValueError."""
    # The type here (pybind would take a bool or numpy scalar as a float); the range is the engine's rule.
    if isinstance(budget, (bool, np.bool_)) or not isinstance(budget, (int, float, np.integer, np.floating)):
        raise ValueError(f"activation_memory_budget must be a number in [0, 1] (0: recompute every checkpointed "
                         f"layer, 1: keep every layer's intermediates), got {budget!r}")
    _core.train.check_activation_memory_budget(float(budget))
    return float(budget)


class LoraModelMixin:
    """Adapter management, forward_backward / eval_loss and the AdamW step (self._core, self.config)."""

    gradient_checkpointing: bool = True  # keep only each layer's input; recompute it in the backward
    training: bool = True                # LoRA dropout active in forward_backward
    last_train_peak_bytes: int = 0       # peak activation/scratch bytes of the last forward_backward

    @property
    def offload_checkpoints(self) -> bool:
        """With gradient_checkpointing: keep each layer's checkpointed input in host memory (pinned on
        CUDA, copied out in the forward and back before the layer's recompute) instead of on the device,
        saving one [tokens, hidden] fp32 buffer per layer of device memory. Results are bit-identical.
        Off by default; no effect without gradient_checkpointing."""
        return bool(self._core.offload_checkpoints)

    @offload_checkpoints.setter
    def offload_checkpoints(self, on) -> None:
        if not isinstance(on, (bool, np.bool_)):
            raise ValueError(f"offload_checkpoints must be a bool, got {on!r}")
        self._core.offload_checkpoints = bool(on)

    @property
    def activation_memory_budget(self) -> float:
        """With gradient_checkpointing: how much of the memory between recomputing every layer (0, the
        default) and keeping every layer's intermediates (1, the memory and speed of
        gradient_checkpointing=False) the training passes may spend, on PyTorch's scale
        (torch._functorch.config.activation_memory_budget). The engine spends it where it skips the
        most recompute per byte: first the attention halves of the checkpointed layers (their recompute
        runs only the MLP half), then the whole intermediates of the last layers; results are the
        same bits at every budget. memory_model.activation_bytes(..., activation_memory_budget=) gives
        the bytes."""
        return float(self.__dict__.get("_activation_memory_budget", 0.0))

    @activation_memory_budget.setter
    def activation_memory_budget(self, budget) -> None:
        self.__dict__["_activation_memory_budget"] = check_activation_memory_budget(budget)

    # ------------------------------------------------------------ adapters
    def _lora_state(self) -> dict:
        if "_lora_configs" not in self.__dict__:
            self._lora_configs: dict[str, LoraConfig] = {}
            self._lora_lr: dict[str, float] = {}
        return self._lora_configs

    @property
    def adapters(self) -> list[str]:
        return list(self._lora_state())

    @property
    def active_adapter(self) -> str | None:
        return self._core.lora_active or None

    def _module_shapes(self) -> dict[str, tuple[int, int]]:
        c = self.config
        D, I = c.hidden_size, c.intermediate_size
        Q, K = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        return {"q_proj": (Q, D), "k_proj": (K, D), "v_proj": (K, D), "o_proj": (D, Q),
                "gate_proj": (I, D), "up_proj": (I, D), "down_proj": (D, I)}

    def _new_adapter_name(self, name) -> str:
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty str, got {name!r}")
        if name in self._lora_state():
            raise ValueError(f"an adapter named {name!r} already exists (delete_adapter first)")
        return name

    def _add(self, name: str, config: LoraConfig, tensors: dict | None, rng) -> None:
        """rng: the adapter seed (int), or a numpy Generator to draw one from. As the C API's
        qlora_adapter_add: A/B initialized from the seed's init stream (tensors None) and dropout
        masks keyed by the seed."""
        seed = rng if isinstance(rng, int) else int(rng.integers(0, 2**63))
        shapes = self._module_shapes()
        resolved = config.resolve(self.config.num_hidden_layers)
        if tensors is None:
            factors = config.init_factors(seed, [(r, shapes[proj][1], shapes[proj][0])
                                                 for _, proj, r, _, _ in resolved])
        else:
            factors = [(tensors[peft_tensor_name(layer, proj, "A")], tensors[peft_tensor_name(layer, proj, "B")])
                       for layer, proj, _, _, _ in resolved]
        mods = [(layer, proj, float(scaling), np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32))
                for (layer, proj, _, _, scaling), (a, b) in zip(resolved, factors)]
        self._core.lora_add(name, mods, float(config.lora_dropout), seed)
        self._lora_state()[name] = config
        if self.active_adapter is None:
            self._core.lora_set_active(name)

    def add_adapter(self, name: str, config: LoraConfig, seed: int | None = None) -> None:
        """New adapter with A/B initialized per config.init_lora_weights (PEFT: B = 0 by default) by the
        engine from `seed` (None: a random one): the same seed gives the same factors and dropout
        masks as the C API's qlora_adapter_add. It becomes active when no adapter is active."""
        if not isinstance(config, LoraConfig):
            raise ValueError(f"config must be a LoraConfig, got {type(config).__name__}")
        from .model import _int_arg

        seed = int(np.random.default_rng().integers(0, 2**63)) if seed is None else _int_arg("seed", seed, 0, 2**64 - 1)
        self._add(self._new_adapter_name(name), config, None, seed)

    def set_active_adapter(self, name: str | None) -> None:
        """Make `name` the adapter used by forward, generate and training (None: the base model).
        Only requests started afterwards use it: one already running (in another thread, or a
        generate whose stream callback calls this) keeps the adapter it started with."""
        if name is not None and name not in self._lora_state():
            raise ValueError(f"no adapter named {name!r}; have {self.adapters}")
        if name is not None and name == self.merged_adapter:
            raise ValueError(f"adapter {name!r} is merged into the weights (applying it again would double it); "
                             f"unmerge_adapter() first")
        self._core.lora_set_active(name or "")

    def set_adapter(self, name: str | None) -> None:
        """PEFT's name for set_active_adapter: `name` becomes the adapter of later requests (None: the base
        model). One call can also pick its own adapter: generate(..., adapter_name=...)."""
        self.set_active_adapter(name)

    def set_adapter_scale(self, name: str, scale: float) -> None:
        """Runtime scale of adapter `name` (llama.cpp's --lora-scaled, PEFT's set_scale): its LoRA term is
        multiplied by `scale` (default 1; 0: the adapter contributes nothing, the base output exactly;
        negative subtracts it). Requests started afterwards use it, training passes included (as in PEFT);
        a request already running keeps the scale it started with. Not saved by save_adapter and not
        applied by merge_adapter / merge_and_unload (a runtime setting, like llama.cpp's).
        ValueError for a scale that is not a finite float32 number, or one that takes the adapter's
        update past the bound that loading applies to its factors (2^32, see load_adapter)."""
        self._check_adapter(name)
        try:
            s = float(scale)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"adapter {name!r}: scale must be a finite number, got {scale!r}") from None
        self._core.lora_set_scale(name, s)  # the engine checks it (finite, the factor bound: lora_check.hpp)

    def get_adapter_scale(self, name: str) -> float:
        """The runtime scale of adapter `name` (1.0 unless set_adapter_scale changed it)."""
        return float(self._core.lora_get_scale(self._check_adapter(name)))

    @contextlib.contextmanager
    def disable_adapter(self):
        """Context manager (PEFT's): inside it the base model runs (no active adapter); on exit, also on an
        exception, the adapter active before is restored (unless it was deleted inside)."""
        prev = self.active_adapter
        self.set_active_adapter(None)
        try:
            yield self
        finally:
            if prev is not None and prev in self._lora_state() and prev != self.merged_adapter:
                self.set_active_adapter(prev)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name` (the base model becomes active if it was active). Requests running
        with it finish with it; its memory is freed when the last of them ends."""
        self._check_adapter(name)
        self._core.lora_delete(name)
        del self._lora_state()[name]
        self._lora_lr.pop(name, None)
        if name == self.merged_adapter:  # the weights stay merged; there is nothing left to unmerge
            del self.__dict__["_merged"]

    def adapter_config(self, name: str | None = None) -> LoraConfig:
        return self._lora_state()[self._check_adapter(name)]

    def _check_adapter(self, name: str | None) -> str:
        if name is None:
            name = self.active_adapter
            if name is None:
                raise ValueError("no active adapter (add_adapter / load_adapter / set_active_adapter first)")
        if name not in self._lora_state():
            raise ValueError(f"no adapter named {name!r}; have {self.adapters}")
        return name

    def get_adapter_state_dict(self, name: str | None = None) -> dict[str, np.ndarray]:
        """{PEFT tensor name: float32 copy} of the adapter's A [r, in] and B [out, r]."""
        return peft_tensors(self._core.lora_get(self._check_adapter(name)))

    def get_adapter_gradients(self, name: str | None = None) -> dict[str, np.ndarray]:
        """{PEFT tensor name: float32 copy} of the accumulated gradients dA, dB."""
        return peft_tensors(self._core.lora_grads(self._check_adapter(name)))

    def set_adapter_state_dict(self, name: str | None, tensors: dict) -> None:
        """Overwrite A/B from {PEFT tensor name: array}; exactly the adapter's tensors are required."""
        name = self._check_adapter(name)
        want = {peft_tensor_name(l, p, w) for l, p, _, _, _ in
                self._lora_state()[name].resolve(self.config.num_hidden_layers) for w in "AB"}
        have = set(tensors)
        if have != want:
            extra, missing = sorted(have - want), sorted(want - have)
            raise ValueError(f"set_adapter_state_dict: unexpected {extra[:3]} / missing {missing[:3]} tensor names")
        for k in sorted(want):  # numpy would cast integer / bool arrays to float32 silently
            dt = np.asarray(tensors[k]).dtype
            if dt.kind in "biuOSUcmM":
                raise ValueError(f"set_adapter_state_dict: tensor {k!r} is {dt}, not a float type")
        # All or nothing: the engine checks each module as it is set (shape, NaN / Inf, the float32
        # bound), so a refused tensor in a later layer puts back the modules already set.
        modules = self._lora_state()[name].resolve(self.config.num_hidden_layers)
        before = self.get_adapter_state_dict(name)

        def put(src):
            for layer, proj, _, _, _ in modules:
                self._core.lora_set(name, layer, proj,
                                    np.asarray(src[peft_tensor_name(layer, proj, "A")], dtype=np.float32),
                                    np.asarray(src[peft_tensor_name(layer, proj, "B")], dtype=np.float32))

        try:
            put(tensors)
        except BaseException:
            put(before)
            raise

    def save_adapter(self, directory, name: str | None = None, base_model_name_or_path=None) -> None:
        """Write the adapter in PEFT's format (adapter_config.json + adapter_model.safetensors), saved
        as a unit. base_model_name_or_path defaults to the path the model was loaded from."""
        name = self._check_adapter(name)
        if base_model_name_or_path is None:
            base_model_name_or_path = getattr(self, "name_or_path", None)
        adapter_io.save_adapter(directory, self._lora_state()[name], self.get_adapter_state_dict(name),
                                base_model_name_or_path, num_layers=self.config.num_hidden_layers,
                                module_shapes=self._module_shapes())

    def export_gguf_lora(self, path, adapter: str | None = None, dtype: str = "f32") -> None:
        """Writes adapter `adapter` (default: the active one) as a llama.cpp GGUF LoRA file
        (llama-cli --lora PATH); per-module scaling is folded into B (see export_gguf.py)."""
        from .export_gguf import export_gguf_lora

        export_gguf_lora(self, path, adapter, dtype)

    def load_adapter(self, directory, name: str = "default") -> None:
        """Load a PEFT adapter directory (or a llama.cpp GGUF LoRA file, *.gguf) as adapter `name`
        (unsupported features raise ValueError)."""
        name = self._new_adapter_name(name)
        if str(directory).endswith(".gguf") and not os.path.isdir(directory):
            from .export_gguf import load_gguf_lora

            config, tensors = load_gguf_lora(self, directory)
            self._add(name, config, tensors, np.random.default_rng())
            return
        config, tensors = adapter_io.load_adapter(directory, num_layers=self.config.num_hidden_layers,
                                                  module_shapes=self._module_shapes())
        self._add(name, config, tensors, np.random.default_rng())

    def add_weighted_adapter(self, adapters, weights, adapter_name, combination_type="svd", svd_rank=None,
                             svd_clamp=None, svd_full_matrices=True, svd_driver=None, density=None,
                             majority_sign_method="total", *, seed=None) -> None:
        """New adapter `adapter_name` combining `adapters` with `weights`, as PEFT's
        LoraModel.add_weighted_adapter (same arguments, order, config and math; see
        qlora_native.adapter_combine for the few deliberate differences). combination_type: svd, linear,
        cat, ties, ties_svd, dare_linear, dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune,
        magnitude_prune_svd. seed: numpy seed of the dare_* masks (PEFT uses torch's RNG).
        svd_full_matrices / svd_driver do not change the result (accepted for PEFT compatibility)."""
        from . import adapter_combine

        adapter_combine.add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank,
                                             svd_clamp, svd_full_matrices, svd_driver, density,
                                             majority_sign_method, seed)

    # ------------------------------------------------------------ merging (merge.py, C++ merge.cpp)
    @property
    def merged_adapter(self) -> str | None:
        """The adapter merged by merge_adapter (None: none)."""
        m = self.__dict__.get("_merged")
        return m["name"] if m else None

    def merge_adapter(self, name: str | None = None, *, quantize: str | None = None, dtype: str = "float32",
                      progress=None) -> None:
        """Merge adapter `name` (default: the active one) into the weights, PEFT's merge_adapter: every
        projection becomes deq(W) + scaling * B @ A over the NF4 (or fp32) base the adapter was trained
        on; the adapter is kept but inactive (it cannot be activated while merged). quantize=None keeps
        the merged weights unquantized (dtype float32, or bfloat16 / float16: rounded to that dtype),
        which also dequantizes the projections the adapter does not touch; quantize="nf4" re-quantizes
        with the base's blocksize / double quant (no unmerge possible then). All or nothing; refused while
        a forward, training pass or generation runs. progress(layers_done) is called after each layer."""
        from . import merge

        merge.merge_adapter(self, name, quantize=quantize, dtype=dtype, progress=progress)

    def unmerge_adapter(self) -> None:
        """Undo merge_adapter by subtracting scaling * B @ A (fp32: equal to the unmerged model to float32
        rounding; the projections stay fp32). Refused after an NF4 re-quantized merge."""
        from . import merge

        merge.unmerge_adapter(self)

    def merge_and_unload(self, quantize: str | None = None, dtype: str = "float32", eval_text: str | None = None,
                         eval_ids=None, progress=None) -> dict:
        """Merge the active adapter (as merge_adapter), remove every adapter and return the measured drift
        of "base + adapter" vs "merged" on eval_text (tokenized), eval_ids or a built-in sample: max / mean
        absolute logit difference, top-1 agreement, loss and perplexity of both and of the base alone, and
        the share of the adapter's logit change the merged model keeps (merge.format_drift prints it). The model is then a plain model: save_pretrained writes an HF checkpoint (unquantized: no
        quantization_config, weights in `dtype`; nf4: the bitsandbytes format)."""
        from . import merge

        return merge.merge_and_unload(self, quantize=quantize, dtype=dtype, eval_text=eval_text, eval_ids=eval_ids,
                                      progress=progress)

    # ------------------------------------------------------------ training passes
    def train(self, mode: bool = True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def _train_inputs(self, input_ids, labels, attention_mask):
        ids = self._check_ids(input_ids)
        lab = np.asarray(labels)
        if lab.ndim == 1:
            lab = lab[None, :]
        if lab.shape != ids.shape or not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"labels must be integers shaped like input_ids {ids.shape}, got {lab.dtype} {lab.shape}")
        V = self.config.vocab_size
        bad = (lab != -100) & ((lab < 0) | (lab >= V))
        if bad.any():
            i = tuple(int(x) for x in np.argwhere(bad)[0])
            raise ValueError(f"label {int(lab[i])} at {i} is out of range [0, {V}) and not -100")
        # transformers' causal-LM convention: position t predicts labels[t + 1].
        shifted = np.full(ids.shape, -100, np.int32)
        shifted[:, :-1] = lab[:, 1:]
        from .model import _as_mask, _longest_row

        mask = None if attention_mask is None else _as_mask(attention_mask, ids.shape)
        self._check_context(_longest_row(ids, mask), "input_ids")  # max_position_embeddings unless allowed
        return ids, shifted, mask, int((shifted != -100).sum())

    def forward_backward(self, input_ids, labels, attention_mask=None, *, loss_scale: float = 1.0,
                         grad_scale: float | None = None, training: bool | None = None, adapter_names=None) -> float:
        """Mean causal-LM loss over tokens with label != -100; accumulates into the active adapter's
        gradients d(loss_scale * mean loss) (grad_scale: an alias of loss_scale). No counted token:
        returns nan and leaves the gradients unchanged. training: dropout on (default: self.training).
        Training runs on the active adapter only: adapter_names (mixed batches) is refused."""
        if adapter_names is not None:
            raise ValueError("forward_backward does not take adapter_names: training runs on the active adapter "
                             "(set_adapter(name)); mixed-adapter batches are for model(...) and generate")
        self._check_adapter(None)
        scale = float(loss_scale if grad_scale is None else grad_scale)
        if not math.isfinite(scale):
            raise ValueError(f"loss_scale must be finite, got {scale}")
        ids, shifted, mask, count = self._train_inputs(input_ids, labels, attention_mask)
        if count == 0:
            return float("nan")
        train = self.training if training is None else bool(training)
        loss_sum, n, peak = self._core.forward_backward(ids, mask, shifted, scale / count, train,
                                                        bool(self.gradient_checkpointing),
                                                        self.activation_memory_budget)
        assert n == count, (n, count)
        self.last_train_peak_bytes = int(peak)
        return loss_sum / count

    def train_step(self, micro_batches, lr: float | None = None, max_grad_norm: float | None = None, *,
                   training: bool | None = None, comm=None, row_offsets=None) -> dict:
        """One optimizer step of the active adapter over micro-batches [(input_ids, labels, attention_mask)]
        (gradient accumulation), by the engine's step rule (lora_setup.cpp lora_train_step, which the C
        API's qlora_train_step runs too): zero the gradients, each micro-batch's loss weighted by its
        share of the step's counted tokens (the gradient of the mean loss over all of them), clip to
        max_grad_norm (None / 0: no clipping), AdamW with lr (default: configure_optimizer's). A
        non-finite micro-batch loss or gradient norm stops before the optimizer step. Returns
        {"loss", "grad_norm" (before clipping), "count", "stepped", "bad_micro" (-1 or the micro-batch
        with a non-finite loss), "bad_loss", "peak_train_bytes"}.

        Data parallel (qlora_native.distributed): comm is the reducer (sum_scalars / sum_grads, in-place
        sums over every rank) and each micro-batch is this rank's shard of a global one (None: no row
        of it here); row_offsets[i] is the global index of the shard's first row (dropout masks follow
        the row, not the rank). Counts, losses and the one contiguous gradient buffer are summed, so
        every rank takes the step of the whole global batch; loss / count / grad_norm are global."""
        name = self._check_adapter(None)
        if name not in self._lora_lr:
            raise ValueError(f"adapter {name!r}: call configure_optimizer first")
        lr = self._lora_lr[name] if lr is None else lr
        self._check_lr(lr)
        if comm is not None and not (callable(getattr(comm, "sum_scalars", None))
                                     and callable(getattr(comm, "sum_grads", None))):
            raise ValueError(f"comm must have sum_scalars and sum_grads methods (qlora_native.distributed), "
                             f"got {type(comm).__name__}")
        if comm is not None and callable(getattr(comm, "reducer_for", None)):
            comm = comm.reducer_for(self)  # a cuda model: the NCCL reducer over the same ranks
        micro_batches = list(micro_batches)
        if row_offsets is not None:
            row_offsets = list(row_offsets)
            if len(row_offsets) != len(micro_batches) or any(
                    isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 0 for r in row_offsets):
                raise ValueError(f"row_offsets must hold one int >= 0 per micro-batch ({len(micro_batches)}), "
                                 f"got {row_offsets!r}")
        micro = []
        for i, mb in enumerate(micro_batches):
            if mb is None:
                if comm is None:
                    raise ValueError(f"micro-batch {i} is None: only a data-parallel step (comm=) takes a "
                                     f"micro-batch this rank holds no row of")
                micro.append(None)
                continue
            ids, labels, mask = mb
            ids, shifted, mask, count = self._train_inputs(ids, labels, mask)
            micro.append((ids, mask, shifted, count, 0 if row_offsets is None else int(row_offsets[i])))
        train = self.training if training is None else bool(training)
        clip = float(max_grad_norm) if max_grad_norm else math.inf
        r = dict(self._core.lora_train_step(micro, float(lr), clip, train, bool(self.gradient_checkpointing),
                                            comm, self.activation_memory_budget))
        self.last_train_peak_bytes = int(r["peak_train_bytes"])
        return r

    def eval_loss(self, input_ids, labels, attention_mask=None) -> tuple[float, int]:
        """(loss_sum, count) over tokens with label != -100, with the active adapter, no dropout, no grads."""
        ids, shifted, mask, _ = self._train_inputs(input_ids, labels, attention_mask)
        loss_sum, count = self._core.eval_loss(ids, mask, shifted)
        return float(loss_sum), int(count)

    def zero_grad(self) -> None:
        self._core.lora_zero_grad(self._check_adapter(None))

    def get_rng_state(self) -> dict:
        """Position of the active adapter's dropout-mask stream (Philox keyed by seed, step, layer, module)."""
        seed, step = self._core.lora_dropout_state(self._check_adapter(None))
        return {"dropout_seed": int(seed), "dropout_step": int(step)}

    def set_rng_state(self, state: dict) -> None:
        from .model import _int_arg

        if not isinstance(state, dict) or not {"dropout_seed", "dropout_step"} <= set(state):
            raise ValueError("set_rng_state: expected a dict with 'dropout_seed' and 'dropout_step' (get_rng_state())")
        self._core.lora_set_dropout_state(self._check_adapter(None),
                                          _int_arg("dropout_seed", state["dropout_seed"], 0, 2**64 - 1),
                                          _int_arg("dropout_step", state["dropout_step"], 0, 2**63 - 1))

    # ------------------------------------------------------------ optimizer
    def configure_optimizer(self, lr: float = 1e-4, weight_decay: float = 0.0, betas=(0.9, 0.999),
                            eps: float = 1e-8) -> None:
        """torch.optim.AdamW (C++) over the active adapter's A and B; state starts at zero."""
        name = self._check_adapter(None)
        self._check_lr(lr)
        self._core.lora_configure_optimizer(name, (float(betas[0]), float(betas[1])), float(eps), float(weight_decay))
        self._lora_lr[name] = float(lr)

    @staticmethod
    def _check_lr(lr):
        if isinstance(lr, bool) or not isinstance(lr, (int, float, np.floating)) or not math.isfinite(lr) or lr < 0:
            raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")

    def optimizer_step(self, lr: float | None = None) -> None:
        """One AdamW step on the active adapter with lr (default: configure_optimizer's)."""
        name = self._check_adapter(None)
        if name not in self._lora_lr:
            raise ValueError(f"adapter {name!r}: call configure_optimizer first")
        lr = self._lora_lr[name] if lr is None else lr
        self._check_lr(lr)
        self._core.lora_optimizer_step(name, float(lr))

    def grad_norm(self) -> float:
        return float(self._core.lora_grad_norm(self._check_adapter(None)))

    def clip_grad_norm(self, max_norm: float) -> float:
        """torch.nn.utils.clip_grad_norm_ over the active adapter's gradients; returns the pre-clip norm."""
        return float(self._core.lora_clip_grad_norm(self._check_adapter(None), float(max_norm)))

    def get_optimizer_state(self) -> dict:
        """Copy of the AdamW state (step, exp_avg/exp_avg_sq per tensor in `names` order, hyper-parameters,
        lr) plus the dropout mask stream position (dropout_seed, dropout_step)."""
        name = self._check_adapter(None)
        st = dict(self._core.lora_optimizer_state(name))
        st["names"] = [peft_tensor_name(l, p, w) for l, p, _, _, _ in
                       self._lora_state()[name].resolve(self.config.num_hidden_layers) for w in "AB"]
        st["lr"] = self._lora_lr[name]
        st["dropout_seed"], st["dropout_step"] = (int(x) for x in self._core.lora_dropout_state(name))
        return st

    def set_optimizer_state(self, state: dict) -> None:
        """Restore get_optimizer_state()'s dict (configures the optimizer if needed): exact resume."""
        name = self._check_adapter(None)
        want = [peft_tensor_name(l, p, w) for l, p, _, _, _ in
                self._lora_state()[name].resolve(self.config.num_hidden_layers) for w in "AB"]
        _check_scalars(state)  # before anything changes
        if "names" in state and list(state["names"]) != want:
            raise ValueError("set_optimizer_state: the state's tensor names differ from the active adapter's")
        if name not in self._lora_lr:
            self.configure_optimizer(lr=state.get("lr", 1e-4), weight_decay=state.get("weight_decay", 0.0),
                                     betas=tuple(state.get("betas", (0.9, 0.999))), eps=state.get("eps", 1e-8))
        # a missing key or a wrong type: the engine's ValueError names it
        core_state = {k: state[k] for k in ("step", "exp_avg", "exp_avg_sq", "betas", "eps", "weight_decay")
                      if k in state}
        for k in ("exp_avg", "exp_avg_sq"):
            if isinstance(core_state.get(k), (list, tuple)):
                for i, a in enumerate(core_state[k]):  # numpy would cast integer / bool moments silently
                    dt = np.asarray(a).dtype
                    if dt.kind in "biuOSUcmM":
                        raise ValueError(f"set_optimizer_state: {k}[{i}] is {dt}, not a float type")
                core_state[k] = [np.ascontiguousarray(a, np.float32).ravel() for a in core_state[k]]
        self._core.lora_load_optimizer_state(name, core_state)
        if "lr" in state:
            self._lora_lr[name] = float(state["lr"])
        if "dropout_seed" in state:  # the dropout mask stream continues where it was
            self._core.lora_set_dropout_state(name, int(state["dropout_seed"]), int(state["dropout_step"]))


def _check_scalars(state) -> None:
    """set_optimizer_state's Python-side values (a checkpoint's optimizer.json): int() / float()
    would take 2.5, True, NaN or a string silently."""
    if not isinstance(state, dict):
        raise ValueError(f"set_optimizer_state: expected a dict, got {type(state).__name__}")
    if "lr" in state:
        lr = state["lr"]
        if isinstance(lr, bool) or not isinstance(lr, (int, float, np.floating)) or not (0 <= lr < math.inf):
            raise ValueError(f"set_optimizer_state: 'lr' must be a finite number >= 0, got {lr!r}")
    if "dropout_seed" in state:
        for k, hi in (("dropout_seed", 1 << 64), ("dropout_step", 1 << 63)):
            v = state.get(k)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < hi:
                raise ValueError(f"set_optimizer_state: {k!r} must be an int in [0, 2^{hi.bit_length() - 1}), got {v!r}")
