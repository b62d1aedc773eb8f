/* qlora_native C API: load a Hugging Face Llama-family checkpoint and run it from C or C++
 * without Python.
 *
 * Conventions
 *  - Handles are opaque. qlora_model_load() returns a model the caller owns and must release
 *    with qlora_model_free() (exactly once). Nothing else returned by this API needs freeing.
 *  - Buffers passed in (token ids, params, output arrays) stay owned by the caller; the library
 *    never keeps a pointer to them after the call returns.
 *  - Functions returning int return QLORA_OK (0) on success and a negative qlora_status on
 *    failure; functions returning a pointer return NULL on failure. Either way
 *    qlora_last_error() then describes the failure. No C++ exception crosses this boundary.
 *  - Threads: qlora_generate and qlora_model_forward on one model may run from several threads
 *    at once (each call has its own KV cache; the weights are shared, not copied); the adapter
 *    and training calls wait for them and run alone. A token callback must not call qlora_*
 *    functions on the same model other than qlora_generate / qlora_model_forward.
 *    qlora_last_error() is per thread.
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

typedef struct qlora_model qlora_model; /* opaque */

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
  const int32_t* stop_ids;    /* [n_stop_ids] ids that end generation (kept in the output); may be NULL */
  int64_t n_stop_ids;
} qlora_sampling_params;

/* Called with every generated token as soon as it is chosen. Return 0 to continue, nonzero to
 * stop generation after this token (it is still counted in *n_out). */
typedef int (*qlora_token_callback)(int32_t token, void* user);

/* Message of the last failed call on this thread; "" after a successful qlora_model_load,
 * qlora_model_forward or qlora_generate (the other functions leave it unchanged). The string
 * belongs to the library and stays valid until the next qlora_* call on this thread. */
QLORA_API const char* qlora_last_error(void);
/* The qlora_status of that failure (QLORA_OK when none); e.g. why qlora_model_load gave NULL. */
QLORA_API int qlora_last_status(void);

QLORA_API qlora_model_params qlora_model_default_params(void);
QLORA_API qlora_sampling_params qlora_sampling_default_params(void);

/* Loads an HF checkpoint directory: config.json plus model.safetensors or the shards listed in
 * model.safetensors.index.json (F32/F16/BF16, or a pre-quantized bitsandbytes NF4 checkpoint,
 * which needs quantize = NF4). params may be NULL (defaults). Returns a new model owned by the
 * caller (free with qlora_model_free), or NULL on failure (see qlora_last_error). */
QLORA_API qlora_model* qlora_model_load(const char* path, const qlora_model_params* params);

/* Releases a model and everything it holds. NULL is ignored. */
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

/* Logits of every position of one sequence: ids[n_tokens] -> logits_out[n_tokens * n_vocab]
 * (caller-allocated, row t = logits after ids[0..t]). Independent of any generation. */
QLORA_API int qlora_model_forward(qlora_model* model, const int32_t* ids, int64_t n_tokens, float* logits_out);

/* Generates up to max_new_tokens after prompt[n_prompt] (n_prompt >= 1) with a KV cache.
 * params may be NULL (greedy). out_tokens[max_new_tokens] (caller-allocated; may be NULL when
 * max_new_tokens is 0) receives the new tokens and *n_out their count (n_out may be NULL).
 * Stops early at a stop id (kept) or when cb (may be NULL) returns nonzero. On failure *n_out
 * holds the tokens produced before the error. */
QLORA_API int qlora_generate(qlora_model* model, const int32_t* prompt, int64_t n_prompt,
                             const qlora_sampling_params* params, int32_t* out_tokens, int64_t max_new_tokens,
                             int64_t* n_out, qlora_token_callback cb, void* user);


/* ---- LoRA training (CPU backend; the base model stays frozen) -------------------------------
 * Adapters belong to the model and are freed with it. These calls on one model are serialized. */

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
 * INVALID_ARGUMENT when no adapter / not configured / an id or label is out of range. */
QLORA_API int qlora_train_step(qlora_model* model, const int32_t* ids, const int32_t* labels, int64_t batch,
                               int64_t seq, float lr, float max_grad_norm, float* loss_out);

/* Saves the active adapter to directory `dir` (created if needed) in PEFT's format:
 * adapter_model.safetensors (F32 lora_A [r, in] / lora_B [out, r] under PEFT names) and
 * adapter_config.json; qlora_native.Model.load_adapter and peft read it. The directory is saved
 * as a unit, with the protocol of qlora_native's Python saves: both files are written and fsync'ed
 * in `.NAME.qlora-tmp.HOST-PID-RANDOM` beside `dir`, then swapped in (renameat2 RENAME_EXCHANGE,
 * or two renames) when `dir` holds only a previous save, or committed through
 * `dir/.NAME.qlora-commit.TAG` and renamed file by file when `dir` holds other files too (they
 * are kept). A kill at any point leaves the complete old or the complete new adapter once the
 * next save or a qlora_native loader has finished / rolled back the interrupted one. Files are
 * created 0666 and directories 0777 (the umask decides); a replaced `dir` keeps its mode.
 * Errors: IO when `dir` is a file or cannot be written. */
QLORA_API int qlora_adapter_save(qlora_model* model, const char* dir);

#ifdef __cplusplus
}
#endif

#endif /* QLORA_H */
