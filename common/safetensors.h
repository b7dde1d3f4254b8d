// Reader and writer of the safetensors format (https://huggingface.co/docs/safetensors): an
// 8-byte little-endian header length, a JSON header mapping tensor names to dtype, shape and
// data_offsets, then the raw data.
//
// `SafetensorsFile` maps one file read-only; the operating system pages in only the tensors that
// are read. Opening validates the whole header: truncated files, headers larger than the limit,
// unknown dtypes, sizes that disagree with shapes, offsets out of range and overlapping tensors
// are InvalidArgument/DataLoss errors naming the file and the tensor. A file, once open, is
// immutable and safe to read from many threads.
//
// `Checkpoint` is a Hugging Face model directory: `model.safetensors`, or shards listed by
// `model.safetensors.index.json`. Shards are opened on first use. Thread-compatible: Get() may
// open a shard, so callers serialise it (loading happens on one thread).
#ifndef EPX_COMMON_SAFETENSORS_H_
#define EPX_COMMON_SAFETENSORS_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/tensor.h"

namespace epx {

// The format's own limit on the JSON header.
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100'000'000;

struct SafetensorsEntry {
  std::string name;
  DType dtype;
  Shape shape;
  uint64_t begin = 0;  // offsets into the data section
  uint64_t end = 0;
};

class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  // Entries in data order.
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const SafetensorsEntry* Find(const std::string& name) const;
  // A view into the mapping, valid while this file lives. NotFound names the file.
  absl::StatusOr<TensorView> Get(const std::string& name) const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  const uint8_t* data_ = nullptr;  // start of the data section
  std::vector<SafetensorsEntry> entries_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

class Checkpoint {
 public:
  // REQUIRES: `dir` holds model.safetensors.index.json or model.safetensors.
  static absl::StatusOr<std::unique_ptr<Checkpoint>> Open(const std::string& dir);

  const std::string& dir() const { return dir_; }
  bool Contains(const std::string& name) const { return file_of_.count(name) > 0; }
  // The file holding `name` (relative to dir), or "" if none.
  std::string FileOf(const std::string& name) const;
  // Opens the shard holding `name` if needed. Counts the bytes handed out in bytes_mapped().
  absl::StatusOr<TensorView> Get(const std::string& name);
  const SafetensorsEntry* Find(const std::string& name);
  // Sum of the sizes of all tensors handed out by Get(): what this process reads of the model.
  uint64_t bytes_mapped() const { return bytes_mapped_; }
  std::vector<std::string> TensorNames() const;

 private:
  absl::StatusOr<SafetensorsFile*> Shard(const std::string& file);
  std::string dir_;
  std::map<std::string, std::string> file_of_;  // tensor -> shard file name
  std::map<std::string, std::unique_ptr<SafetensorsFile>> shards_;
  uint64_t bytes_mapped_ = 0;
};

// One tensor to write: its bytes come from `fill`, called once with a buffer of exactly the
// tensor's size, so large checkpoints stream to disk one tensor at a time.
struct SafetensorsWriteEntry {
  std::string name;
  DType dtype;
  Shape shape;
  std::function<absl::Status(uint8_t* dst, size_t nbytes)> fill;
};

absl::Status WriteSafetensors(const std::string& path,
                              const std::vector<SafetensorsWriteEntry>& entries,
                              const std::map<std::string, std::string>& metadata = {});

// Convenience for small outputs: copies each view.
absl::Status WriteSafetensors(const std::string& path,
                              const std::vector<std::pair<std::string, TensorView>>& tensors);

}  // namespace epx

#endif  // EPX_COMMON_SAFETENSORS_H_
