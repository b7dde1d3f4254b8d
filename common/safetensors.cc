#include "common/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "common/json.h"

namespace epx {
namespace {

using nlohmann::json;

absl::Status FileError(const std::string& path, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": ", what));
}

// Parses one header entry; errors name the tensor.
absl::StatusOr<SafetensorsEntry> ParseEntry(const std::string& path, const std::string& name,
                                            const json& j, uint64_t data_size) {
  auto bad = [&](const std::string& what) {
    return FileError(path, absl::StrCat("tensor '", name, "': ", what));
  };
  if (!j.is_object()) return bad("header entry is not an object");
  if (!j.contains("dtype") || !j["dtype"].is_string()) return bad("missing string 'dtype'");
  if (!j.contains("shape") || !j["shape"].is_array()) return bad("missing array 'shape'");
  if (!j.contains("data_offsets") || !j["data_offsets"].is_array() || j["data_offsets"].size() != 2)
    return bad("missing 'data_offsets' [begin, end]");
  SafetensorsEntry e;
  e.name = name;
  auto dtype = ParseDType(j["dtype"].get<std::string>());
  if (!dtype.ok()) return bad(std::string(dtype.status().message()));
  e.dtype = *dtype;
  uint64_t numel = 1;
  for (const json& d : j["shape"]) {
    if (!d.is_number_integer() || d.get<int64_t>() < 0)
      return bad(absl::StrCat("shape ", j["shape"].dump(), " has a negative or non-integer dim"));
    const uint64_t dim = d.get<uint64_t>();
    if (dim != 0 && numel > (uint64_t{1} << 62) / dim) return bad("shape overflows");
    numel *= dim;
    e.shape.push_back(static_cast<int64_t>(dim));
  }
  // The byte count must not wrap either: 2^62 F32 elements are 2^64 bytes, i.e. 0.
  if (numel > (uint64_t{1} << 62) / DTypeSize(e.dtype)) return bad("shape overflows");
  for (const json& o : j["data_offsets"]) {
    if (!o.is_number_unsigned() && !(o.is_number_integer() && o.get<int64_t>() >= 0))
      return bad(absl::StrCat("data_offsets ", j["data_offsets"].dump(), " are not unsigned"));
  }
  e.begin = j["data_offsets"][0].get<uint64_t>();
  e.end = j["data_offsets"][1].get<uint64_t>();
  if (e.begin > e.end)
    return bad(absl::StrCat("data_offsets [", e.begin, ", ", e.end, "] are reversed"));
  const uint64_t nbytes = numel * DTypeSize(e.dtype);
  if (e.end - e.begin != nbytes)
    return bad(absl::StrCat("data_offsets [", e.begin, ", ", e.end, "] hold ", e.end - e.begin,
                            " bytes but ", DTypeName(e.dtype), " ", ShapeString(e.shape), " needs ",
                            nbytes));
  if (e.end > data_size)
    return bad(absl::StrCat("data_offsets [", e.begin, ", ", e.end,
                            "] run past the end of the data section (", data_size,
                            " bytes): the file is truncated or the offsets are out of range"));
  return e;
}

}  // namespace

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) munmap(map_, map_size_);
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::NotFoundError(absl::StrCat(path, ": cannot open: ", strerror(errno)));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    ::close(fd);
    return absl::InternalError(absl::StrCat(path, ": fstat: ", strerror(errno)));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    return FileError(
        path, absl::StrCat("file is ", size, " bytes, too short for the 8-byte header length"));
  }
  auto file = std::unique_ptr<SafetensorsFile>(new SafetensorsFile());
  file->path_ = path;
  file->map_ = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (file->map_ == MAP_FAILED) {
    file->map_ = nullptr;
    return absl::InternalError(absl::StrCat(path, ": mmap: ", strerror(errno)));
  }
  file->map_size_ = size;
  const uint8_t* base = static_cast<const uint8_t*>(file->map_);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | base[i];
  if (header_len > kMaxSafetensorsHeaderBytes)
    return FileError(path, absl::StrCat("header length ", header_len, " exceeds the limit of ",
                                        kMaxSafetensorsHeaderBytes, " bytes"));
  if (header_len > size - 8)
    return FileError(path, absl::StrCat("header length ", header_len, " runs past the end of the ",
                                        size, "-byte file (truncated?)"));
  EPX_ASSIGN_OR_RETURN(json header, ParseJson(reinterpret_cast<const char*>(base + 8),
                                              reinterpret_cast<const char*>(base + 8 + header_len),
                                              path + " header"));
  if (!header.is_object()) return FileError(path, "header is not a JSON object");
  const uint64_t data_size = size - 8 - header_len;
  file->data_ = base + 8 + header_len;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it.value().is_object()) return FileError(path, "__metadata__ is not an object");
      for (auto m = it.value().begin(); m != it.value().end(); ++m) {
        if (!m.value().is_string())
          return FileError(path,
                           absl::StrCat("__metadata__ value '", m.key(), "' is not a string"));
        file->metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    EPX_ASSIGN_OR_RETURN(SafetensorsEntry e, ParseEntry(path, it.key(), it.value(), data_size));
    file->entries_.push_back(std::move(e));
  }
  std::sort(file->entries_.begin(), file->entries_.end(), [](const auto& a, const auto& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  // Zero-size tensors occupy no bytes and may share an offset, so each non-empty tensor is
  // compared with the previous non-empty one, not merely its neighbour in the sorted order.
  const SafetensorsEntry* prev = nullptr;
  for (const SafetensorsEntry& cur : file->entries_) {
    if (cur.end == cur.begin) continue;
    if (prev != nullptr && cur.begin < prev->end)
      return FileError(
          path, absl::StrCat("tensors '", prev->name, "' [", prev->begin, ", ", prev->end,
                             ") and '", cur.name, "' [", cur.begin, ", ", cur.end, ") overlap"));
    prev = &cur;
  }
  for (size_t i = 0; i < file->entries_.size(); ++i) file->index_[file->entries_[i].name] = i;
  return file;
}

const SafetensorsEntry* SafetensorsFile::Find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &entries_[it->second];
}

absl::StatusOr<TensorView> SafetensorsFile::Get(const std::string& name) const {
  const SafetensorsEntry* e = Find(name);
  if (e == nullptr) return absl::NotFoundError(absl::StrCat(path_, ": no tensor '", name, "'"));
  return TensorView(data_ + e->begin, e->dtype, e->shape);
}

absl::StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::Open(const std::string& dir) {
  namespace fs = std::filesystem;
  auto ckpt = std::unique_ptr<Checkpoint>(new Checkpoint());
  ckpt->dir_ = dir;
  const fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
  const fs::path single_path = fs::path(dir) / "model.safetensors";
  std::error_code ec;
  if (fs::exists(index_path, ec)) {
    EPX_ASSIGN_OR_RETURN(json index, ParseJsonFile(index_path.string()));
    if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object())
      return absl::InvalidArgumentError(
          absl::StrCat(index_path.string(), ": not a JSON object with a \"weight_map\" object"));
    for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
      if (!it.value().is_string())
        return absl::InvalidArgumentError(
            absl::StrCat(index_path.string(), ": weight_map['", it.key(), "'] is not a file name"));
      const std::string file = it.value().get<std::string>();
      if (file.find('/') != std::string::npos || file == ".." || file == "." || file.empty())
        return absl::InvalidArgumentError(absl::StrCat(index_path.string(), ": weight_map['",
                                                       it.key(), "'] = '", file,
                                                       "' must name a file in the same directory"));
      ckpt->file_of_[it.key()] = file;
    }
  } else if (fs::exists(single_path, ec)) {
    EPX_ASSIGN_OR_RETURN(SafetensorsFile * file, ckpt->Shard("model.safetensors"));
    for (const auto& e : file->entries()) ckpt->file_of_[e.name] = "model.safetensors";
  } else {
    return absl::NotFoundError(absl::StrCat(
        dir, ": no model.safetensors or model.safetensors.index.json in this directory"));
  }
  return ckpt;
}

std::string Checkpoint::FileOf(const std::string& name) const {
  auto it = file_of_.find(name);
  return it == file_of_.end() ? "" : it->second;
}

std::vector<std::string> Checkpoint::TensorNames() const {
  std::vector<std::string> names;
  for (const auto& [name, file] : file_of_) names.push_back(name);
  return names;
}

absl::StatusOr<SafetensorsFile*> Checkpoint::Shard(const std::string& file) {
  auto it = shards_.find(file);
  if (it != shards_.end()) return it->second.get();
  EPX_ASSIGN_OR_RETURN(auto opened,
                       SafetensorsFile::Open((std::filesystem::path(dir_) / file).string()));
  SafetensorsFile* raw = opened.get();
  shards_[file] = std::move(opened);
  return raw;
}

const SafetensorsEntry* Checkpoint::Find(const std::string& name) {
  const std::string file = FileOf(name);
  if (file.empty()) return nullptr;
  auto shard = Shard(file);
  return shard.ok() ? (*shard)->Find(name) : nullptr;
}

absl::StatusOr<TensorView> Checkpoint::Get(const std::string& name) {
  const std::string file = FileOf(name);
  if (file.empty())
    return absl::NotFoundError(absl::StrCat(dir_, ": the checkpoint has no tensor '", name, "'"));
  EPX_ASSIGN_OR_RETURN(SafetensorsFile * shard, Shard(file));
  auto view = shard->Get(name);
  if (!view.ok())
    return absl::NotFoundError(absl::StrCat(shard->path(), ": no tensor '", name,
                                            "' although the index names this file for it"));
  bytes_mapped_ += view->nbytes();
  return view;
}

absl::Status WriteSafetensors(const std::string& path,
                              const std::vector<SafetensorsWriteEntry>& entries,
                              const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& e : entries) {
    const uint64_t nbytes = static_cast<uint64_t>(NumElements(e.shape)) * DTypeSize(e.dtype);
    header[e.name] = {{"dtype", std::string(DTypeName(e.dtype))},
                      {"shape", std::vector<int64_t>(e.shape.begin(), e.shape.end())},
                      {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
  }
  std::string text = header.dump();
  while (text.size() % 8 != 0) text.push_back(' ');  // keeps the data section 8-byte aligned
  const std::string tmp = path + ".tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr) {
    const int err = errno;
    const std::string message = absl::StrCat(tmp, ": cannot create: ", strerror(err));
    if (err == ENOENT || err == ENOTDIR) return absl::NotFoundError(message);
    if (err == EACCES || err == EPERM || err == EROFS) return absl::PermissionDeniedError(message);
    return absl::InternalError(message);
  }
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(text.size() >> (8 * i));
  bool ok =
      std::fwrite(len, 1, 8, f) == 8 && std::fwrite(text.data(), 1, text.size(), f) == text.size();
  std::vector<uint8_t> buffer;
  for (const auto& e : entries) {
    if (!ok) break;
    const size_t nbytes = static_cast<size_t>(NumElements(e.shape)) * DTypeSize(e.dtype);
    buffer.resize(nbytes);
    absl::Status s = e.fill(buffer.data(), nbytes);
    if (!s.ok()) {
      std::fclose(f);
      std::remove(tmp.c_str());
      return s;
    }
    ok = std::fwrite(buffer.data(), 1, nbytes, f) == nbytes;
  }
  ok = (std::fclose(f) == 0) && ok;
  if (!ok) {
    std::remove(tmp.c_str());
    return absl::DataLossError(absl::StrCat(path, ": write failed: ", strerror(errno)));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string message = absl::StrCat(path, ": rename failed: ", strerror(errno));
    std::remove(tmp.c_str());
    return absl::DataLossError(message);
  }
  return absl::OkStatus();
}

absl::Status WriteSafetensors(const std::string& path,
                              const std::vector<std::pair<std::string, TensorView>>& tensors) {
  std::vector<SafetensorsWriteEntry> entries;
  for (const auto& tensor : tensors) {
    const TensorView view = tensor.second;
    entries.push_back({tensor.first, view.dtype(), view.shape(), [view](uint8_t* dst, size_t n) {
                         if (n > 0) std::memcpy(dst, view.raw(), n);
                         return absl::OkStatus();
                       }});
  }
  return WriteSafetensors(path, entries);
}

}  // namespace epx
