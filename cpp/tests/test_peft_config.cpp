// model::peft_config_json, the one adapter_config.json builder (C API qlora_adapter_save and
// Python's save_adapter): full PEFT field set, sorted keys, Python json.dumps spelling.
#include <string>

#include "check.hpp"
#include "common/error.hpp"
#include "model/peft_config.hpp"

using namespace qlora;

int main() {
  CHECK(model::float_as_written(0.05f) == 0.05, "0.05f reads back as 0.05");
  CHECK(model::float_as_written(32.0f) == 32.0, "32.0f");

  model::PeftConfigFields f;
  f.r = 4;
  f.lora_alpha = model::float_as_written(32.0f);
  f.lora_dropout = model::float_as_written(0.05f);
  f.target_modules = json::Value(json::Array{"v_proj", "q_proj"});
  f.base_model_name_or_path = "m\xc3\xb6\x7f\xf0\x9f\x98\x80";  // U+00F6, DEL, U+1F600
  const std::string s = model::peft_config_json(f);
  CHECK(s.rfind("{\n  \"alpha_pattern\": {},\n  \"auto_mapping\": null,\n", 0) == 0, "sorted, indent 2: %s", s.c_str());
  CHECK(contains(s.c_str(), "\"lora_alpha\": 32.0,\n  \"lora_bias\": false,\n  \"lora_dropout\": 0.05,\n"), "%s", s.c_str());
  CHECK(contains(s.c_str(), "\"target_modules\": [\n    \"q_proj\",\n    \"v_proj\"\n  ],"), "sorted targets: %s", s.c_str());
  CHECK(contains(s.c_str(), "\"m\\u00f6\\u007f\\ud83d\\ude00\""), "ensure_ascii: %s", s.c_str());
  CHECK(s.back() == '\n' && contains(s.c_str(), "\"use_rslora\": false\n}"), "%s", s.c_str());

  bool threw = false;
  try {
    model::peft_config_fields(json::parse(R"({"r": 4, "bogus": 1})"));
  } catch (const ValueError& e) {
    threw = contains(e.what(), "bogus");
  }
  CHECK(threw, "unknown field rejected by name");
  return g_failures ? 1 : 0;
}
