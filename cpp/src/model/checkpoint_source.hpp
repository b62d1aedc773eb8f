// An HF checkpoint directory as the loader reads it: model.safetensors, or the shards listed in
// model.safetensors.index.json (each a plain file name inside the directory: the index comes with the
// checkpoint, and "../x" or "/abs/x" would open files elsewhere; symlinked shards stay allowed, as the
// Hugging Face cache links snapshot files to its blobs/). The one rule for the C++ loader
// (hf_loader.cpp) and Python's SafetensorsSource (model.py, through _core.io.open_checkpoint).
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "io/safetensors.hpp"

namespace qlora::model {

struct CheckpointSource {
  std::vector<std::shared_ptr<io::SafetensorsFile>> files;  // [shard], in shard-name order
  std::vector<std::string> shard_names;                     // [shard]
  std::map<std::string, const io::TensorInfo*> where;       // tensor name -> its entry
  std::map<std::string, std::string> file_of;               // tensor name -> shard name

  const io::TensorInfo& get(const std::string& n) const { return *where.at(n); }
  const io::TensorInfo* find(const std::string& n) const {
    auto it = where.find(n);
    return it == where.end() ? nullptr : it->second;
  }
};

// Opens every shard (memory-mapped). Throws io::FileError (ENOENT) without either file, FormatError
// for an index that is not JSON, has no weight_map object, names an invalid shard, or disagrees with
// the shards (a tensor listed in one shard but stored elsewhere or nowhere), or for a tensor stored
// in two shards.
CheckpointSource open_checkpoint(const std::string& dir);

}  // namespace qlora::model
