#include "model/checkpoint_source.hpp"

#include <filesystem>
#include <set>
#include <utility>

#include "common/error.hpp"
#include "io/mapped_file.hpp"
#include "json/json.hpp"

namespace qlora::model {

namespace fs = std::filesystem;

CheckpointSource open_checkpoint(const std::string& dir) {
  const std::string index = (fs::path(dir) / "model.safetensors.index.json").string();
  const std::string single = (fs::path(dir) / "model.safetensors").string();
  std::vector<std::pair<std::string, std::string>> weight_map;
  std::vector<std::string> shards;
  std::error_code ec;  // an error (a name too long) is "not there": the FileError below names the directory
  const bool sharded = fs::is_regular_file(index, ec);
  if (sharded) {
    json::Value v;
    try {
      v = json::parse_file(index);
    } catch (const FormatError& e) {  // as io.read_json says it: "<index>: not valid JSON (<why>)"
      std::string why = e.what();
      if (why.rfind(index + ": ", 0) == 0) why.erase(0, index.size() + 2);
      throw FormatError(index + ": not valid JSON (" + why + ")");
    }
    const json::Value* wm = v.is_object() ? v.find("weight_map") : nullptr;
    if (!wm || !wm->is_object())
      throw FormatError(index + ": no valid weight_map (expected an object of tensor name -> shard file)");
    std::set<std::string> uniq;
    for (const auto& [n, s] : wm->as_object()) {
      if (!s.is_string()) throw FormatError(index + ": weight_map entry '" + n + "' is not a file name");
      const std::string& f = s.as_string();
      // A plain file name inside the directory (a NUL would also cut the path the OS sees).
      if (f.empty() || f.find('/') != std::string::npos || f.find('\\') != std::string::npos || f == "." ||
          f == ".." || f.find('\0') != std::string::npos)
        throw FormatError(index + ": weight_map names an invalid shard '" + f + "' for tensor '" + n +
                          "' (shards must be plain file names inside the checkpoint directory)");
      weight_map.emplace_back(n, f);
      uniq.insert(f);
    }
    shards.assign(uniq.begin(), uniq.end());
  } else if (fs::is_regular_file(single, ec)) {
    shards = {"model.safetensors"};
  } else {
    throw io::FileError(ENOENT, dir, "no model.safetensors or model.safetensors.index.json in");
  }
  CheckpointSource src;
  for (const auto& s : shards) {
    src.files.push_back(io::SafetensorsFile::open((fs::path(dir) / s).string()));
    src.shard_names.push_back(s);
    for (const auto& t : src.files.back()->tensors()) {
      if (src.where.count(t.name))
        throw FormatError(dir + ": tensor '" + t.name + "' appears in both " + src.file_of[t.name] + " and " + s);
      src.where[t.name] = &t;
      src.file_of[t.name] = s;
    }
  }
  for (const auto& [n, s] : weight_map) {
    auto it = src.file_of.find(n);
    if (it == src.file_of.end() || it->second != s)
      throw FormatError(index + ": tensor '" + n + "' is listed in " + s + " but not stored there");
  }
  return src;
}

}  // namespace qlora::model
