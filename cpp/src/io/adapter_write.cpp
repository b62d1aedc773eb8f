#include "io/adapter_write.hpp"

#include "io/atomic_dir.hpp"

namespace qlora::io {

void write_peft_adapter(const std::string& dir, const std::vector<TensorToWrite>& tensors,
                        const std::string& config_json) {
  DirSaver saver(dir);
  test_fault("write-weights");
  write_safetensors(saver.file("adapter_model.safetensors"), tensors, {{"format", "pt"}});
  test_fault("write-config");
  write_file_atomic(saver.file("adapter_config.json"), config_json);
  saver.commit();
}

}  // namespace qlora::io
