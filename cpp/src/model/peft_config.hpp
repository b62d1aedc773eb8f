// PEFT's adapter_config.json text: the one builder behind the C API's qlora_adapter_save and
// Python's save_adapter / LoraConfig.to_peft_dict (binding _core.io.peft_config_json).
#pragma once
#include <cstdint>
#include <string>

#include "json/json.hpp"

namespace qlora::model {

// The settings an adapter config records. The C API fills r / alpha / dropout / rslora / targets;
// Python's LoraConfig also sets the pattern fields. json::Value fields keep the caller's JSON type
// (lora_alpha 32 stays an int, as PEFT writes it as given).
struct PeftConfigFields {
  int64_t r = 8;
  json::Value lora_alpha = int64_t{8};                   // int or double
  double lora_dropout = 0.0;
  json::Value target_modules = json::Value::array();     // [names] (written sorted) or a regex string
  json::Value exclude_modules;                           // null, [names] (written sorted) or a regex string
  bool use_rslora = false;
  json::Value init_lora_weights = true;                  // true, false or "gaussian"
  json::Value rank_pattern = json::Value::object();      // {pattern: int}
  json::Value alpha_pattern = json::Value::object();     // {pattern: number}
  json::Value layers_to_transform;                       // null, int or [int]
  json::Value layers_pattern;                            // null, str or [str]
  json::Value base_model_name_or_path;                   // null or str
};

// Reads the fields from a JSON object with exactly those keys (any may be absent: default);
// an unknown key or a wrong type throws ValueError naming the field.
PeftConfigFields peft_config_fields(const json::Value& obj);

// PEFT's full LoRA field set, keys sorted at every level, indent 2, ASCII only (non-ASCII as
// \uXXXX), trailing newline: byte for byte Python's json.dumps(d, indent=2, sort_keys=True) + "\n".
std::string peft_config_json(const PeftConfigFields& f);

// A float setting (the C API's float alpha / dropout) as the double its shortest spelling names,
// so 0.05f is written 0.05 as Python writes it, not 0.05000000074505806.
double float_as_written(float v);

}  // namespace qlora::model
