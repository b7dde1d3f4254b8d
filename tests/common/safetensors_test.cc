#include "common/safetensors.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/common/test_util.h"

namespace epx {
namespace {

using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

// The 8-byte little-endian header length, then `header` and `data` verbatim. `header_len` may
// disagree with header.size() on purpose.
void WriteRaw(const std::string& path, uint64_t header_len, const std::string& header,
              const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  ASSERT_TRUE(out) << path;
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>((header_len >> (8 * i)) & 0xff));
  out << header << data;
  ASSERT_TRUE(out.good()) << path;
}

// A file whose header length is right and whose data section is `data_bytes` zeros.
void WriteWithHeader(const std::string& path, const std::string& header, size_t data_bytes) {
  WriteRaw(path, header.size(), header, std::string(data_bytes, '\0'));
}

// Opening a malformed file is a format error (InvalidArgument or DataLoss) whose message names
// the file and, where one is involved, the tensor.
void ExpectFormatError(const absl::Status& status, const std::string& path,
                       const std::vector<std::string>& mentions) {
  ASSERT_FALSE(status.ok()) << "opening " << path << " should have failed";
  EXPECT_TRUE(status.code() == absl::StatusCode::kInvalidArgument ||
              status.code() == absl::StatusCode::kDataLoss)
      << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr(path));
  for (const std::string& m : mentions) EXPECT_THAT(std::string(status.message()), HasSubstr(m));
}

absl::Status OpenStatus(const std::string& path) { return SafetensorsFile::Open(path).status(); }

SafetensorsWriteEntry BytesEntry(const std::string& name, DType dtype, Shape shape,
                                 std::vector<uint8_t> bytes) {
  return {name, dtype, std::move(shape), [bytes](uint8_t* dst, size_t n) {
            EXPECT_EQ(n, bytes.size());
            if (!bytes.empty()) std::memcpy(dst, bytes.data(), std::min(n, bytes.size()));
            return absl::OkStatus();
          }};
}

template <typename T>
std::vector<uint8_t> AsBytes(const std::vector<T>& v) {
  std::vector<uint8_t> b(v.size() * sizeof(T));
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

template <typename T>
std::vector<T> Values(const TensorView& view) {
  return std::vector<T>(view.data<const T>(), view.data<const T>() + view.numel());
}

using SafetensorsTest = test::ScratchDirTest;

TEST_F(SafetensorsTest, WriteReadRoundTripKeepsTensorsAndMetadata) {
  const std::string path = Path("round_trip.safetensors");
  const std::vector<float> f32 = {1.5f, -2.f, 3.25f, 0.f, 1e-30f, -7.f};
  const std::vector<uint16_t> bf16 = {0x3f80, 0xc000, 0x7f80};  // 1, -2, inf
  const std::vector<int32_t> i32 = {-1, 2, 2147483647, -2147483647 - 1};
  const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"note", "a \"b\" c"}};
  ASSERT_TRUE(WriteSafetensors(path,
                               {BytesEntry("a.f32", DType::kF32, {2, 3}, AsBytes(f32)),
                                BytesEntry("b.bf16", DType::kBF16, {3}, AsBytes(bf16)),
                                BytesEntry("c.empty", DType::kF32, {0, 5}, {}),
                                BytesEntry("d.i32", DType::kI32, {2, 1, 2}, AsBytes(i32))},
                               metadata)
                  .ok());
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));

  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->path(), path);
  EXPECT_EQ((*file)->metadata(), metadata);
  std::vector<std::string> names;
  for (const SafetensorsEntry& e : (*file)->entries()) names.push_back(e.name);
  // Data order is write order; the zero-size tensor shares the offset of the one after it.
  EXPECT_THAT(names, ElementsAre("a.f32", "b.bf16", "c.empty", "d.i32"));

  const SafetensorsEntry* a = (*file)->Find("a.f32");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->dtype, DType::kF32);
  EXPECT_EQ(a->shape, Shape({2, 3}));
  EXPECT_EQ(a->begin, 0u);
  EXPECT_EQ(a->end, 24u);
  EXPECT_EQ((*file)->Find("nope"), nullptr);

  auto va = (*file)->Get("a.f32");
  ASSERT_TRUE(va.ok()) << va.status();
  EXPECT_EQ(Values<float>(*va), f32);
  // The writer pads the header so the data section is 8-byte aligned in the page-aligned map.
  EXPECT_EQ(reinterpret_cast<uintptr_t>(va->raw()) % 8, 0u);

  auto vb = (*file)->Get("b.bf16");
  ASSERT_TRUE(vb.ok()) << vb.status();
  EXPECT_EQ(vb->dtype(), DType::kBF16);
  EXPECT_EQ(Values<uint16_t>(*vb), bf16);

  auto vc = (*file)->Get("c.empty");
  ASSERT_TRUE(vc.ok()) << vc.status();
  EXPECT_EQ(vc->shape(), Shape({0, 5}));
  EXPECT_EQ(vc->numel(), 0);

  auto vd = (*file)->Get("d.i32");
  ASSERT_TRUE(vd.ok()) << vd.status();
  EXPECT_EQ(vd->shape(), Shape({2, 1, 2}));
  EXPECT_EQ(Values<int32_t>(*vd), i32);
}

TEST_F(SafetensorsTest, ViewOverloadRoundTripsWithoutMetadata) {
  const std::string path = Path("views.safetensors");
  const std::vector<double> f64 = {1.0, -0.5, 1e300};
  const std::vector<uint8_t> u8 = {0, 1, 255, 7};
  ASSERT_TRUE(WriteSafetensors(path, {{"x", TensorView(f64.data(), DType::kF64, {3})},
                                      {"y", TensorView(u8.data(), DType::kU8, {2, 2})}})
                  .ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_THAT((*file)->metadata(), IsEmpty());
  auto x = (*file)->Get("x");
  auto y = (*file)->Get("y");
  ASSERT_TRUE(x.ok() && y.ok());
  EXPECT_EQ(Values<double>(*x), f64);
  EXPECT_EQ(Values<uint8_t>(*y), u8);
}

TEST_F(SafetensorsTest, GetOfUnknownTensorIsNotFoundNamingFileAndTensor) {
  const std::string path = Path("one.safetensors");
  const float v = 1.f;
  ASSERT_TRUE(WriteSafetensors(path, {{"x", TensorView(&v, DType::kF32, {1})}}).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  auto missing = (*file)->Get("model.norm.weight");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()),
              AllOf(HasSubstr(path), HasSubstr("model.norm.weight")));
}

TEST_F(SafetensorsTest, FailingFillLeavesNoFile) {
  const std::string path = Path("failed.safetensors");
  const absl::Status s = WriteSafetensors(path, {{"x", DType::kF32, {4}, [](uint8_t*, size_t) {
                                                    return absl::InternalError("source went away");
                                                  }}});
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_FALSE(std::filesystem::exists(path));
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
}

TEST_F(SafetensorsTest, MissingFileIsNotFound) {
  const std::string path = Path("absent.safetensors");
  const absl::Status s = OpenStatus(path);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(s.message()), HasSubstr(path));
}

// --- Malformed files: each is built by hand, byte by byte. ---

TEST_F(SafetensorsTest, FileShorterThanEightBytes) {
  const std::string path = Path("short.safetensors");
  {
    std::ofstream out(path, std::ios::binary);
    out.write("\x05\x00\x00\x00\x00", 5);  // 5 of the 8 length bytes
  }
  ASSERT_LT(std::filesystem::file_size(path), 8u);
  ExpectFormatError(OpenStatus(path), path, {"too short"});
}

TEST_F(SafetensorsTest, EmptyFile) {
  const std::string path = Path("empty.safetensors");
  { std::ofstream out(path, std::ios::binary); }
  ExpectFormatError(OpenStatus(path), path, {"0 bytes"});
}

TEST_F(SafetensorsTest, HeaderLengthAboveFormatLimit) {
  const std::string path = Path("huge_header.safetensors");
  // The file itself is small: the limit must be checked before the length is trusted.
  WriteRaw(path, kMaxSafetensorsHeaderBytes + 1, "{}", "");
  ExpectFormatError(
      OpenStatus(path), path,
      {absl::StrCat(kMaxSafetensorsHeaderBytes + 1), absl::StrCat(kMaxSafetensorsHeaderBytes)});
}

TEST_F(SafetensorsTest, HeaderLengthPastEndOfFile) {
  const std::string path = Path("header_past_end.safetensors");
  const std::string header = R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})";
  WriteRaw(path, header.size() + 100, header, "abcd");
  ExpectFormatError(OpenStatus(path), path, {absl::StrCat(header.size() + 100)});
}

TEST_F(SafetensorsTest, HeaderNotValidJson) {
  const std::string path = Path("not_json.safetensors");
  WriteWithHeader(path, R"({"x":{"dtype":"F32",)", 0);
  ExpectFormatError(OpenStatus(path), path, {"JSON"});
}

TEST_F(SafetensorsTest, HeaderJsonButNotAnObject) {
  const std::string path = Path("array.safetensors");
  WriteWithHeader(path, "[1, 2, 3]", 0);
  ExpectFormatError(OpenStatus(path), path, {"JSON"});
}

TEST_F(SafetensorsTest, UnknownDtypeFp8) {
  const std::string path = Path("fp8.safetensors");
  WriteWithHeader(
      path, R"({"model.layers.0.mlp.w1":{"dtype":"F8_E4M3","shape":[4],"data_offsets":[0,4]}})", 4);
  ExpectFormatError(OpenStatus(path), path, {"model.layers.0.mlp.w1", "F8_E4M3"});
}

TEST_F(SafetensorsTest, UnknownDtypeQ4) {
  const std::string path = Path("q4.safetensors");
  WriteWithHeader(path, R"({"w":{"dtype":"Q4","shape":[2],"data_offsets":[0,1]}})", 1);
  ExpectFormatError(OpenStatus(path), path, {"'w'", "Q4"});
}

TEST_F(SafetensorsTest, DataOffsetsDisagreeWithDtypeTimesShape) {
  const std::string path = Path("size_mismatch.safetensors");
  // F32 [2, 3] needs 24 bytes; the offsets give it 20.
  WriteWithHeader(path, R"({"attn.q":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}})", 24);
  ExpectFormatError(OpenStatus(path), path, {"attn.q", "20 bytes", "24"});
}

TEST_F(SafetensorsTest, TruncatedFileHasOffsetsPastEndOfData) {
  const std::string path = Path("truncated.safetensors");
  const std::vector<float> a(16, 1.f), b(16, 2.f);
  ASSERT_TRUE(WriteSafetensors(path, {{"first", TensorView(a.data(), DType::kF32, {16})},
                                      {"second", TensorView(b.data(), DType::kF32, {4, 4})}})
                  .ok());
  ASSERT_TRUE(SafetensorsFile::Open(path).ok());
  std::filesystem::resize_file(path, std::filesystem::file_size(path) - 5);
  ExpectFormatError(OpenStatus(path), path, {"second", "truncated"});
}

TEST_F(SafetensorsTest, OverlappingTensors) {
  const std::string path = Path("overlap.safetensors");
  WriteWithHeader(path,
                  R"({"left":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                  R"("right":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}})",
                  24);
  ExpectFormatError(OpenStatus(path), path, {"left", "right", "overlap"});
}

TEST_F(SafetensorsTest, OverlapIsFoundAcrossAZeroSizeTensor) {
  const std::string path = Path("overlap_zero.safetensors");
  // Sorted by offset: outer [0,16), empty [4,4), inner [8,16). The empty tensor sits between
  // the two that overlap, so comparing only neighbours misses it.
  WriteWithHeader(path,
                  R"({"outer":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                  R"("empty":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},)"
                  R"("inner":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
                  16);
  ExpectFormatError(OpenStatus(path), path, {"outer", "inner", "overlap"});
}

TEST_F(SafetensorsTest, ZeroSizeTensorsMayShareAnOffset) {
  const std::string path = Path("zero_shared.safetensors");
  WriteWithHeader(path,
                  R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},)"
                  R"("b":{"dtype":"BF16","shape":[3,0],"data_offsets":[4,4]},)"
                  R"("c":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                  8);
  EXPECT_TRUE(OpenStatus(path).ok()) << OpenStatus(path);
}

TEST_F(SafetensorsTest, ReversedDataOffsets) {
  const std::string path = Path("reversed.safetensors");
  WriteWithHeader(path, R"({"norm":{"dtype":"F32","shape":[4],"data_offsets":[16,0]}})", 16);
  ExpectFormatError(OpenStatus(path), path, {"norm", "reversed"});
}

TEST_F(SafetensorsTest, NegativeShapeDim) {
  const std::string path = Path("negative_dim.safetensors");
  WriteWithHeader(path, R"({"embed":{"dtype":"BF16","shape":[-1,4],"data_offsets":[0,8]}})", 8);
  ExpectFormatError(OpenStatus(path), path, {"embed", "negative"});
}

TEST_F(SafetensorsTest, NegativeDataOffset) {
  const std::string path = Path("negative_offset.safetensors");
  WriteWithHeader(path, R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})", 4);
  ExpectFormatError(OpenStatus(path), path, {"'x'", "data_offsets"});
}

TEST_F(SafetensorsTest, ByteSizeOverflowIsRejected) {
  const std::string path = Path("overflow.safetensors");
  // 2^62 F32 elements are 2^64 bytes, which wraps to 0 in 64 bits and would match [0, 0].
  WriteWithHeader(
      path, R"({"big":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,0]}})", 0);
  ExpectFormatError(OpenStatus(path), path, {"big"});
}

TEST_F(SafetensorsTest, EntryMissingDataOffsets) {
  const std::string path = Path("no_offsets.safetensors");
  WriteWithHeader(path, R"({"x":{"dtype":"F32","shape":[1]}})", 4);
  ExpectFormatError(OpenStatus(path), path, {"'x'", "data_offsets"});
}

TEST_F(SafetensorsTest, NonStringMetadataValue) {
  const std::string path = Path("bad_metadata.safetensors");
  WriteWithHeader(path, R"({"__metadata__":{"format":1}})", 0);
  ExpectFormatError(OpenStatus(path), path, {"__metadata__", "format"});
}

// --- Checkpoint directories. ---

using CheckpointTest = test::ScratchDirTest;

void WriteFile(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::trunc);
  out << text;
  ASSERT_TRUE(out.good()) << path;
}

TEST_F(CheckpointTest, ShardedDirectoryReadsFromEveryShard) {
  const std::vector<float> a = {1, 2, 3, 4}, b = {5, 6};
  const std::vector<uint16_t> c = {0x3f80, 0x4000, 0x4040};  // bf16 1, 2, 3
  ASSERT_TRUE(WriteSafetensors(Path("model-00001-of-00002.safetensors"),
                               {{"model.a", TensorView(a.data(), DType::kF32, {2, 2})},
                                {"model.b", TensorView(b.data(), DType::kF32, {2})}})
                  .ok());
  ASSERT_TRUE(WriteSafetensors(Path("model-00002-of-00002.safetensors"),
                               {{"model.c", TensorView(c.data(), DType::kBF16, {3})}})
                  .ok());
  WriteFile(Path("model.safetensors.index.json"), R"({
    "metadata": {"total_size": 30},
    "weight_map": {
      "model.a": "model-00001-of-00002.safetensors",
      "model.b": "model-00001-of-00002.safetensors",
      "model.c": "model-00002-of-00002.safetensors"
    }})");

  auto ckpt = Checkpoint::Open(dir());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_THAT((*ckpt)->TensorNames(), ElementsAre("model.a", "model.b", "model.c"));
  EXPECT_TRUE((*ckpt)->Contains("model.c"));
  EXPECT_FALSE((*ckpt)->Contains("model.d"));
  EXPECT_EQ((*ckpt)->FileOf("model.b"), "model-00001-of-00002.safetensors");
  EXPECT_EQ((*ckpt)->FileOf("model.c"), "model-00002-of-00002.safetensors");
  EXPECT_EQ((*ckpt)->FileOf("model.d"), "");
  EXPECT_EQ((*ckpt)->bytes_mapped(), 0u);

  auto vc = (*ckpt)->Get("model.c");
  ASSERT_TRUE(vc.ok()) << vc.status();
  EXPECT_EQ(vc->dtype(), DType::kBF16);
  EXPECT_EQ(Values<uint16_t>(*vc), c);
  EXPECT_EQ((*ckpt)->bytes_mapped(), 6u);

  auto va = (*ckpt)->Get("model.a");
  ASSERT_TRUE(va.ok()) << va.status();
  EXPECT_EQ(va->shape(), Shape({2, 2}));
  EXPECT_EQ(Values<float>(*va), a);
  auto vb = (*ckpt)->Get("model.b");
  ASSERT_TRUE(vb.ok()) << vb.status();
  EXPECT_EQ(Values<float>(*vb), b);
  EXPECT_EQ((*ckpt)->bytes_mapped(), 6u + 16u + 8u);

  const SafetensorsEntry* e = (*ckpt)->Find("model.a");
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->shape, Shape({2, 2}));
  EXPECT_EQ((*ckpt)->Find("model.d"), nullptr);

  auto missing = (*ckpt)->Get("model.d");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("model.d"));
}

TEST_F(CheckpointTest, IndexNamingMissingShardFailsNamingTheFile) {
  const std::vector<float> a = {1, 2};
  ASSERT_TRUE(WriteSafetensors(Path("model-00001-of-00002.safetensors"),
                               {{"model.a", TensorView(a.data(), DType::kF32, {2})}})
                  .ok());
  WriteFile(Path("model.safetensors.index.json"), R"({"weight_map": {
      "model.a": "model-00001-of-00002.safetensors",
      "model.b": "model-00002-of-00002.safetensors"}})");
  auto ckpt = Checkpoint::Open(dir());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();  // shards open on first use
  EXPECT_TRUE((*ckpt)->Get("model.a").ok());
  auto b = (*ckpt)->Get("model.b");
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(b.status().message()),
              HasSubstr(Path("model-00002-of-00002.safetensors")));
}

TEST_F(CheckpointTest, IndexShardNameWithSlashIsRejected) {
  WriteFile(Path("model.safetensors.index.json"),
            R"({"weight_map": {"model.a": "../elsewhere/model.safetensors"}})");
  const absl::Status s = Checkpoint::Open(dir()).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              AllOf(HasSubstr(Path("model.safetensors.index.json")), HasSubstr("model.a"),
                    HasSubstr("../elsewhere/model.safetensors")));
}

TEST_F(CheckpointTest, IndexWithoutWeightMapIsRejected) {
  WriteFile(Path("model.safetensors.index.json"), R"({"metadata": {}})");
  const absl::Status s = Checkpoint::Open(dir()).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              AllOf(HasSubstr(Path("model.safetensors.index.json")), HasSubstr("weight_map")));
}

TEST_F(CheckpointTest, DirectoryWithoutCheckpointIsNotFound) {
  const absl::Status s = Checkpoint::Open(dir()).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(s.message()), HasSubstr(dir()));
}

TEST_F(CheckpointTest, SingleFileCheckpointListsEveryTensor) {
  auto ckpt = Checkpoint::Open(test::TinyModelDir());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  // 2 (embed, lm_head) + 1 (final norm) + 3 layers * (2 norms + 4 attn + 1 router + 8 * 3 experts)
  EXPECT_EQ((*ckpt)->TensorNames().size(), 3u + 3u * (2 + 4 + 1 + 8 * 3));
  EXPECT_EQ((*ckpt)->FileOf("model.norm.weight"), "model.safetensors");
}

TEST_F(CheckpointTest, CorruptSingleFileFailsAtOpen) {
  WriteRaw(Path("model.safetensors"), 1000, "{}", "");
  const absl::Status s = Checkpoint::Open(dir()).status();
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr(Path("model.safetensors")));
}

}  // namespace
}  // namespace epx
