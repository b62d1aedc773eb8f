/* qlora_native C API: load a Hugging Face Llama-family checkpoint and run it from C or C++
 * without Python.
 *
 * Conventions
 *  - Handles are opaque. qlora_model_load() returns a model the caller owns and must release
 *    with qlora_model_free() (exactly once). Adapters (qlora_adapter_load) and contexts
 *    (qlora_context_new) have their own *_free calls and rules, written where they are declared.
 *    Nothing else returned by this API needs freeing unless its comment says so.
 *  - Buffers passed in (token ids, params, output arrays) stay owned by the caller; the library
 *    never keeps a pointer to them after the call returns.
 *  - Functions returning int return QLORA_OK (0) on success and a negative qlora_status on
 *    failure; functions returning a pointer return NULL on failure. Either way
 *    qlora_last_error() then describes the failure. No C++ exception crosses this boundary.
 *  - Threads: qlora_generate, qlora_model_forward and the qlora_context_* calls on one model may
 *    run from several threads at once (each call has its own KV cache; the weights are shared,
 *    not copied); qlora_adapter_add and the training calls wait for them and run alone. A token
 *    callback must not call qlora_adapter_add / qlora_train_* / qlora_adapter_save on the same
 *    model (that would wait for itself). qlora_last_error() is per thread.
 *  - Serving several adapters: see "Contexts and loaded adapters" below (qlora_context_generate
 *    and qlora_context_forward are the preferred calls; qlora_generate / qlora_model_forward run
 *    with the adapter made by qlora_adapter_add, or the base model, and stay for that use).
 *  - Token ids are int32 in [0, n_vocab); logits are float32, row-major.
 */
#ifndef QLORA_H
#define QLORA_H

#include <stdint.h>

#if defined(_WIN32)
#define QLORA_API __declspec(dllexport)
#else
#define QLORA_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef struct qlora_model qlora_model;     /* opaque */
typedef struct qlora_adapter qlora_adapter; /* opaque: a LoRA adapter loaded from a PEFT directory */
typedef struct qlora_context qlora_context; /* opaque: one request stream with its own adapter set */

typedef enum {
  QLORA_OK = 0,
  QLORA_ERR_INVALID_ARGUMENT = -1, /* bad argument, out-of-range token id, bad config value */
  QLORA_ERR_FORMAT = -2,           /* corrupt / malformed file (JSON, safetensors, quant state) */
  QLORA_ERR_IO = -3,               /* file missing or unreadable */
  QLORA_ERR_OUT_OF_MEMORY = -4,
  QLORA_ERR_RUNTIME = -5 /* anything else (backend / device errors) */
} qlora_status;

typedef enum { QLORA_QUANT_NONE = 0, QLORA_QUANT_NF4 = 1 } qlora_quant;

typedef struct {
  int32_t quantize;     /* qlora_quant: NF4 quantizes the projections while loading (default NF4) */
  int32_t blocksize;    /* NF4 block size, a power of two in 32..4096 (default 64) */
  int32_t double_quant; /* nonzero: quantize the NF4 block scales too (default 1) */
  const char* backend;  /* "cpu" (default; NULL = "cpu"), "cuda" or "cuda:N"; copied */
  int32_t n_threads;    /* > 0: CPU kernel threads, process-wide; 0: leave as is (default) */
} qlora_model_params;

typedef struct {
  float temperature;          /* 0: greedy (argmax) (default 0) */
  int32_t top_k;              /* 0: off (default) */
  float top_p;                /* 1: off (default) */
  float repetition_penalty;   /* 1: off (default); transformers' rule */
  uint64_t seed;              /* sampler seed (default 0); same seed -> same tokens */
  const int32_t* stop_ids;    /* [n_stop_ids] ids in [0, n_vocab) that end generation (kept in the output); may be NULL */
  int64_t n_stop_ids;
} qlora_sampling_params;

/* Called with every generated token as soon as it is chosen. Return 0 to continue, nonzero to
 * stop generation after this token (it is still counted in *n_out). */
typedef int (*qlora_token_callback)(int32_t token, void* user);

/* Message of the last failed call on this thread; "" after a successful call of a function that
 * returns a status or a pointer (the model-fact getters and *_free leave it unchanged). The string
 * belongs to the library and stays valid until the next qlora_* call on this thread. */
QLORA_API const char* qlora_last_error(void);
/* The qlora_status of that failure (QLORA_OK when none); e.g. why qlora_model_load gave NULL. */
QLORA_API int qlora_last_status(void);

QLORA_API qlora_model_params qlora_model_default_params(void);
QLORA_API qlora_sampling_params qlora_sampling_default_params(void);

/* Loads an HF checkpoint directory: config.json plus model.safetensors or the shards listed in
 * model.safetensors.index.json (F32/F16/BF16, or a pre-quantized bitsandbytes NF4 checkpoint,
 * which needs quantize = NF4); or a llama.cpp GGUF file (llama / qwen2 architecture; F32, F16,
 * BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K tensors). params may be NULL (defaults).
 * Returns a new model owned by the caller (free with qlora_model_free), or NULL on failure (see
 * qlora_last_error; a corrupt file is QLORA_ERR_FORMAT naming the file and field). */
QLORA_API qlora_model* qlora_model_load(const char* path, const qlora_model_params* params);

/* Releases a model and everything it holds. NULL is ignored; a handle already freed is refused
 * (qlora_last_error), and later calls on it fail with QLORA_ERR_INVALID_ARGUMENT. */
QLORA_API void qlora_model_free(qlora_model* model);

/* Model facts; -1 when model is NULL. */
QLORA_API int32_t qlora_model_n_vocab(const qlora_model* model);
QLORA_API int32_t qlora_model_n_embd(const qlora_model* model);       /* hidden size */
QLORA_API int32_t qlora_model_n_layer(const qlora_model* model);
QLORA_API int32_t qlora_model_n_ctx_train(const qlora_model* model);  /* max_position_embeddings */
QLORA_API int32_t qlora_model_bos_token(const qlora_model* model);    /* -1: none in config.json */
/* Stop ids from config.json's eos_token_id: writes up to `cap` of them to ids (may be NULL when
 * cap is 0) and returns how many there are. */
QLORA_API int32_t qlora_model_eos_tokens(const qlora_model* model, int32_t* ids, int32_t cap);

/* The dtype LoRA factors are read in by inference calls (qlora_generate, qlora_model_forward and
 * every context's calls; training never), as Python's Model.adapter_dtype:
 *   "auto" (default): bf16 copies when the call computes in bf16, else the fp32 factors (the fp32
 *                     parity mode, unchanged bit for bit);
 *   "float32":        always the fp32 factors;
 *   "bfloat16":       bf16 inference copies (x, A, t and B rounded to bf16, fp32 accumulation) under
 *                     either compute dtype: about half the adapter bytes per decode step.
 * The fp32 factors stay the masters (training, saving and merging use them); a copy is made per
 * adapter when first needed and held beside them (half the fp32 bytes). bf16 copies are used only
 * where the backend has bf16 LoRA kernels (CPU: AVX-512 with AVX512-BF16); elsewhere "bfloat16"
 * runs the fp32 factors. A call already running keeps the dtype it started with. Returns QLORA_OK,
 * or QLORA_ERR_INVALID_ARGUMENT (NULL model, or a dtype other than the three names, which are
 * case-sensitive; the setting is then unchanged). */
QLORA_API int qlora_model_set_adapter_dtype(qlora_model* model, const char* dtype);
/* The current setting ("auto", "float32" or "bfloat16"; static strings), NULL when model is NULL. */
QLORA_API const char* qlora_model_adapter_dtype(const qlora_model* model);

/* Logits of every position of one sequence: ids[n_tokens] -> logits_out[n_tokens * n_vocab]
 * (caller-allocated, row t = logits after ids[0..t]). Independent of any generation.
 * n_tokens above the model's max_position_embeddings (qlora_model_n_ctx_train) is refused with
 * QLORA_ERR_INVALID_ARGUMENT, as Python refuses it by default (RoPE past the trained range degrades
 * the output); a context with a larger n_ctx (qlora_context_params) runs past it. */
QLORA_API int qlora_model_forward(qlora_model* model, const int32_t* ids, int64_t n_tokens, float* logits_out);

/* Generates up to max_new_tokens after prompt[n_prompt] (n_prompt >= 1) with a KV cache.
 * params may be NULL (greedy). out_tokens[max_new_tokens] (caller-allocated; may be NULL when
 * max_new_tokens is 0) receives the new tokens and *n_out their count (n_out may be NULL).
 * Stops early at a stop id (kept) or when cb (may be NULL) returns nonzero. On failure *n_out
 * holds the tokens produced before the error. n_prompt + max_new_tokens above max_position_embeddings
 * is refused before any compute (QLORA_ERR_INVALID_ARGUMENT, as qlora_model_forward). */
QLORA_API int qlora_generate(qlora_model* model, const int32_t* prompt, int64_t n_prompt,
                             const qlora_sampling_params* params, int32_t* out_tokens, int64_t max_new_tokens,
                             int64_t* n_out, qlora_token_callback cb, void* user);


/* ---- LoRA training (the base model stays frozen) --------------------------------------------
 * Training runs on the backend the model was loaded on (qlora_model_params.backend: "cpu" or
 * "cuda"; the AdamW state then lives in that backend's memory).
 * Adapters belong to the model and are freed with it. These calls on one model are serialized.
 * They act on the model's own (named, active) adapter, which qlora_generate / qlora_model_forward
 * use; contexts use only what qlora_context_set_adapters gives them. */

/* Bits of qlora_lora_params.target_mask, one per projection of every layer. */
enum {
  QLORA_LORA_Q = 1 << 0, QLORA_LORA_K = 1 << 1, QLORA_LORA_V = 1 << 2, QLORA_LORA_O = 1 << 3,
  QLORA_LORA_GATE = 1 << 4, QLORA_LORA_UP = 1 << 5, QLORA_LORA_DOWN = 1 << 6,
  QLORA_LORA_ALL = 0x7F
};

typedef struct {
  int32_t r;            /* rank (default 16) */
  float alpha;          /* lora_alpha (default 32); scaling alpha / r */
  float dropout;        /* lora_dropout in [0, 1) (default 0) */
  int32_t use_rslora;   /* nonzero: scaling alpha / sqrt(r) (default 0) */
  uint32_t target_mask; /* QLORA_LORA_* bits (default QLORA_LORA_ALL); other bits are an error */
  uint64_t seed;        /* A init (PEFT: U(+-1/sqrt(in)), B = 0) and dropout masks (default 0) */
} qlora_lora_params;

QLORA_API qlora_lora_params qlora_lora_default_params(void);

/* Adds an adapter `name` (copied; must be new) on the targeted projections and makes it the
 * active one (used by forward, generate and training). params may be NULL (defaults). */
QLORA_API int qlora_adapter_add(qlora_model* model, const char* name, const qlora_lora_params* params);

/* (Re)creates the active adapter's AdamW (betas 0.9/0.999, eps 1e-8 as torch) with weight_decay;
 * lr is the default learning rate of qlora_train_step. */
QLORA_API int qlora_train_configure(qlora_model* model, float lr, float weight_decay);

/* One step on the active adapter: zero grads, mean causal-LM loss over ids[batch * seq] with
 * labels[batch * seq] (transformers convention: unshifted, -100 = ignored), backward, clip the
 * global grad norm to max_grad_norm (<= 0: no clipping), AdamW step with lr (< 0: the lr of
 * qlora_train_configure). *loss_out (may be NULL) receives the loss before the step. Errors:
 * INVALID_ARGUMENT when no adapter / not configured / an id or label is out of range / seq is above
 * max_position_embeddings (as qlora_model_forward). */
QLORA_API int qlora_train_step(qlora_model* model, const int32_t* ids, const int32_t* labels, int64_t batch,
                               int64_t seq, float lr, float max_grad_norm, float* loss_out);

/* Saves the active adapter to directory `dir` (created if needed) in PEFT's format:
 * adapter_model.safetensors (F32 lora_A [r, in] / lora_B [out, r] under PEFT names) and
 * adapter_config.json (PEFT's full LoRA field set, the text Python's save_adapter writes for the same
 * settings); qlora_native.Model.load_adapter and peft read it. The directory is saved
 * as a unit, with the protocol of qlora_native's Python saves: both files are written and fsync'ed
 * in `.NAME.qlora-tmp.HOST-PID-RANDOM` beside `dir`, then swapped in (renameat2 RENAME_EXCHANGE,
 * or two renames) when `dir` holds only a previous save, or committed through
 * `dir/.NAME.qlora-commit.TAG` and renamed file by file when `dir` holds other files too (they
 * are kept). A kill at any point leaves the complete old or the complete new adapter once the
 * next save or a qlora_native loader has finished / rolled back the interrupted one. Files are
 * created 0666 and directories 0777 (the umask decides); a replaced `dir` keeps its mode.
 * Errors: IO when `dir` is a file or cannot be written. */
QLORA_API int qlora_adapter_save(qlora_model* model, const char* dir);

/* ---- Contexts and loaded adapters (serving many adapters over one base) ------------------------
 *
 *   qlora_adapter* a = qlora_adapter_load(model, "adapters/sql");        // PEFT directory
 *   qlora_context* c = qlora_context_new(model, qlora_context_default_params());
 *   float s = 1.0f;
 *   qlora_context_set_adapters(c, &a, &s, 1);                            // n = 0: the base model
 *   qlora_context_generate(c, prompt, n_prompt, NULL, out, 64, &n_out, NULL, NULL);
 *   qlora_context_free(c); qlora_adapter_free(a); qlora_model_free(model);
 *
 * Ownership (as llama.h):
 *  - qlora_adapter_load returns an adapter owned by the caller and tied to its model. Free it with
 *    qlora_adapter_free, or leave it: adapters not freed are freed by qlora_model_free (an
 *    adapter pointer must not be used after its model is freed; qlora_adapter_free on it is then
 *    a no-op that records an error). Loading never changes the model or other adapters.
 *  - qlora_context_new returns a context owned by the caller; free it with qlora_context_free
 *    before its model. A context holds no reference to the adapter handles passed to it: its
 *    adapter set is a snapshot of their weights, so freeing an adapter that a live context uses
 *    is safe, and the context keeps generating with it; the adapter's memory goes when the last
 *    context using it has dropped it (set_adapters with another set, or qlora_context_free).
 *  - A context must not outlive its model. If qlora_model_free is called while contexts are
 *    open, the model's memory is kept until the last of them is freed and every call on those
 *    contexts fails with QLORA_ERR_INVALID_ARGUMENT ("its model was freed").
 *  - Freed adapter / context pointers are detected (a registry of live handles): calls on them
 *    fail with QLORA_ERR_INVALID_ARGUMENT; qlora_adapter_free / qlora_context_free ignore them
 *    and record that error (best effort: a pointer whose memory was reused by a new handle of the
 *    same kind cannot be told apart from it).
 * Threads: each context serves one call at a time (a second call on the same context while one
 * runs, e.g. from another thread or from its token callback, fails with INVALID_ARGUMENT); use one
 * context per thread: contexts of one model generate at the same time, sharing the weights and
 * adapters. qlora_context_set_adapters may be called at any time, from any thread (a token
 * callback included): it changes only the calls that start after it, never one already running.
 */

typedef struct {
  int64_t n_ctx; /* most tokens (prompt + generated, or forward length) of one call; 0 (default):
                    the model's max_position_embeddings. A larger value runs past it (quality
                    degrades, as Python's allow_long_context) */
} qlora_context_params;

QLORA_API qlora_context_params qlora_context_default_params(void);

/* Loads the LoRA adapter in PEFT directory `dir` (adapter_config.json + adapter_model.safetensors,
 * F32/F16/BF16) for `model`, with the rules of qlora_native.Model.load_adapter: only the seven
 * projections, PEFT's scaling (lora_alpha / r, rsLoRA alpha / sqrt(r), rank_pattern /
 * alpha_pattern). Refused, naming the file and tensor: an adapter made for another base (the
 * module and both shapes are named), NaN or Inf in a tensor, factors too large for float32 (for an
 * input bounded by 1, ||A||, scaling*||B|| or their product above 2^32, || || the largest absolute
 * row sum), DoRA and other unsupported features, tensors missing for targeted modules or present
 * for others. target_modules / exclude_modules /
 * layers_pattern / rank_pattern / alpha_pattern given as regular expressions are read when they
 * are plain names (letters, digits, '_', '-', '.' and '\.'); any other regex is refused with
 * QLORA_ERR_INVALID_ARGUMENT (Python's loader reads them). A killed save of `dir` is finished or
 * rolled back first. Errors: IO (missing directory / file), FORMAT (corrupt file),
 * INVALID_ARGUMENT. Returns NULL on failure. */
QLORA_API qlora_adapter* qlora_adapter_load(qlora_model* model, const char* dir);

/* Frees an adapter handle (see Ownership above). NULL and handles already freed are ignored. */
QLORA_API void qlora_adapter_free(qlora_adapter* adapter);

/* A new context of `model` using the base model (no adapter). Returns NULL on failure. */
QLORA_API qlora_context* qlora_context_new(qlora_model* model, qlora_context_params params);

/* Frees a context (and its adapter snapshot). NULL and handles already freed are ignored. While a
 * call on this context is in progress nothing is freed (the error is recorded). */
QLORA_API void qlora_context_free(qlora_context* ctx);

/* Replaces the context's adapter set: the later calls apply sum_i scales[i] * delta_i, delta_i
 * being adapter i's LoRA term with its PEFT scaling (llama.cpp's llama_set_adapters_lora; scale 0:
 * the adapter contributes nothing, as --lora-scaled). n = 0 clears the set (the base model;
 * adapters may then be NULL). scales may be NULL (all 1). Every adapter must belong to the
 * context's model. One adapter runs exactly as Python's Model.generate(adapter_name=...) with
 * that scale (set_adapter_scale); several are combined once here into one adapter of rank
 * sum r_i (their concatenation, memory held by the context). All or nothing: on an error
 * (n < 0, a NULL or freed adapter, one from another model, a NaN / Inf scale, or a scale that takes
 * the adapter's update past the factor bound qlora_adapter_load applies: |scale| * scaling * ||B||
 * or that times ||A|| above 2^32) the set is kept. */
QLORA_API int qlora_context_set_adapters(qlora_context* ctx, qlora_adapter* const* adapters, const float* scales,
                                         int32_t n);

/* As qlora_generate, with the context's adapter set as it is when the call starts (kept to the
 * last token). n_prompt + max_new_tokens must not exceed the context's n_ctx. */
QLORA_API int qlora_context_generate(qlora_context* ctx, const int32_t* prompt, int64_t n_prompt,
                                     const qlora_sampling_params* params, int32_t* out_tokens,
                                     int64_t max_new_tokens, int64_t* n_out, qlora_token_callback cb, void* user);

/* As qlora_model_forward, with the context's adapter set (n_tokens must not exceed n_ctx). */
QLORA_API int qlora_context_forward(qlora_context* ctx, const int32_t* ids, int64_t n_tokens, float* logits_out);

/* ---- Tokenizers ---------------------------------------------------------------------------------
 *
 *   qlora_tokenizer* tok = qlora_tokenizer_load("SmolLM2-135M-Instruct.Q4_1.gguf");  // or an HF dir
 *   int32_t ids[256];
 *   int32_t n = qlora_tokenize(tok, "Hello", -1, ids, 256, 1, 1);   // < 0: -n ids needed
 *   char piece[64];
 *   int32_t len = qlora_token_to_piece(tok, ids[0], piece, sizeof piece);
 *   qlora_tokenizer_free(tok);
 *
 * The vocabularies of qlora_native's Python Tokenizer, with the same ids: a GGUF file's embedded
 * `llama` (SPM) or `gpt2` (byte-level BPE; tokenizer.ggml.pre default, gpt-2, smollm, llama-bpe /
 * llama3, qwen2 and their llama.cpp aliases) vocabulary, or an HF directory's tokenizer.json (BPE
 * model; NFC / Prepend / Replace normalizers; ByteLevel, Split, Digits, Metaspace pre-tokenizers:
 * the GPT-2, Llama 2/3, Mistral, SmolLM2 and Qwen2 shapes) with tokenizer_config.json,
 * special_tokens_map.json, config.json and generation_config.json for the special ids. Components
 * it does not implement fail the load with QLORA_ERR_INVALID_ARGUMENT (never a different split).
 * A directory with only a sentencepiece tokenizer.model is not supported here.
 *
 * Ownership: qlora_tokenizer_load returns a tokenizer owned by the caller (free it with
 * qlora_tokenizer_free), independent of any model. Text is bytes: invalid UTF-8 is not an error;
 * each maximal ill-formed subsequence is read as U+FFFD (Python's bytes.decode("utf-8",
 * "replace")). Threads: every call below except qlora_tokenizer_free may run on one tokenizer
 * from several threads at once. Output buffers are the caller's. */
typedef struct qlora_tokenizer qlora_tokenizer; /* opaque */

/* Loads the tokenizer of a model source: a `.gguf` file or an HF directory holding tokenizer.json.
 * Returns NULL on failure (IO: missing file / no tokenizer.json; FORMAT: corrupt file or field;
 * INVALID_ARGUMENT: an unsupported vocabulary or component, named in qlora_last_error()). */
QLORA_API qlora_tokenizer* qlora_tokenizer_load(const char* path);
/* Releases a tokenizer. NULL is ignored; a handle already freed, or a model's own tokenizer, is
 * refused (qlora_last_error), and calls on a freed one fail (INT32_MIN / -1). */
QLORA_API void qlora_tokenizer_free(qlora_tokenizer* tok);
/* The tokenizer of a loaded model (as llama_model_get_vocab): loaded from the model's source
 * (the path given to qlora_model_load) on the first call, owned by the model and freed with it
 * (do not qlora_tokenizer_free it). NULL on failure (see qlora_last_error; a later call retries). */
QLORA_API const qlora_tokenizer* qlora_model_get_tokenizer(qlora_model* model);

/* Text -> ids, as llama_tokenize. text[text_len] (text_len < 0: NUL-terminated). add_special:
 * add the BOS / EOS the vocabulary asks for (GGUF add_bos_token / add_eos_token, tokenizer.json's
 * post-processor or tokenizer_config.json's add_bos_token / add_eos_token). parse_special: match
 * special (control) token strings such as "<|im_start|>" in the text as their ids; when 0 they
 * are tokenized as plain text (non-special added tokens are always matched, as in llama.cpp).
 * Returns the number of ids written to tokens[n_tokens_max]; when that is too small, writes
 * nothing and returns -(the number needed). On an error returns INT32_MIN (tok or text NULL,
 * n_tokens_max < 0, or more than INT32_MAX ids); see qlora_last_error(). tokens may be NULL when
 * n_tokens_max is 0. */
QLORA_API int32_t qlora_tokenize(const qlora_tokenizer* tok, const char* text, int32_t text_len, int32_t* tokens,
                                 int32_t n_tokens_max, int32_t add_special, int32_t parse_special);

/* Ids -> text, exactly as the Python Tokenizer.decode returns it (UTF-8; skip_special: leave out
 * special tokens; invalid byte sequences in the output come out as U+FFFD). Writes at most
 * text_len_max bytes (no NUL terminator) and returns the length; when text_len_max is too small
 * writes nothing and returns -(the length needed). INT32_MIN on an error (an id out of range,
 * NULL arguments). */
QLORA_API int32_t qlora_detokenize(const qlora_tokenizer* tok, const int32_t* tokens, int32_t n_tokens, char* text,
                                   int32_t text_len_max, int32_t skip_special);

/* The bytes one token stands for (for streaming output; as llama_token_to_piece with special =
 * true): byte-level BPE characters and <0xNN> tokens become their bytes, U+2581 a space, special
 * tokens their text. A piece may be part of a UTF-8 character: join pieces before decoding.
 * Returns the length written to buf[length] (no NUL), -(needed) when length is too small,
 * INT32_MIN on an error (id out of range, NULL tok). */
QLORA_API int32_t qlora_token_to_piece(const qlora_tokenizer* tok, int32_t token, char* buf, int32_t length);

/* Vocabulary facts; -1 when tok is NULL or the vocabulary has no such token. */
QLORA_API int32_t qlora_tokenizer_n_vocab(const qlora_tokenizer* tok);
QLORA_API int32_t qlora_token_bos(const qlora_tokenizer* tok);
QLORA_API int32_t qlora_token_eos(const qlora_tokenizer* tok);
QLORA_API int32_t qlora_token_pad(const qlora_tokenizer* tok);
QLORA_API int32_t qlora_token_unk(const qlora_tokenizer* tok);
/* Every id that ends a turn (eos, GGUF eot / eom, config.json / generation_config.json
 * eos_token_id): writes up to cap of them to ids (may be NULL when cap is 0), returns the count. */
QLORA_API int32_t qlora_tokenizer_eos_tokens(const qlora_tokenizer* tok, int32_t* ids, int32_t cap);
/* Nonzero when token is a special (control) token, e.g. to hide it when streaming. */
QLORA_API int32_t qlora_token_is_special(const qlora_tokenizer* tok, int32_t token);

#ifdef __cplusplus
}
#endif

#endif /* QLORA_H */
