#include "kernels/cuda/check_args.h"

#include <algorithm>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace epx::cuda {

std::string DTypeList(std::initializer_list<DType> dtypes) {
  std::string out;
  for (DType d : dtypes) absl::StrAppend(&out, out.empty() ? "" : " or ", DTypeName(d));
  return out;
}

namespace {

// "[3, *]": -1 in a wanted shape matches any extent.
std::string ShapePattern(std::initializer_list<int64_t> shape) {
  return absl::StrCat("[",
                      absl::StrJoin(shape, ", ",
                                    [](std::string* out, int64_t d) {
                                      absl::StrAppend(out,
                                                      d < 0 ? std::string("*") : absl::StrCat(d));
                                    }),
                      "]");
}

}  // namespace

absl::Status CheckTensor(const char* op, const char* name, const TensorView& t,
                         std::initializer_list<DType> dtypes,
                         std::initializer_list<int64_t> shape) {
  bool ok = std::find(dtypes.begin(), dtypes.end(), t.dtype()) != dtypes.end() &&
            t.rank() == static_cast<int>(shape.size());
  // Dimension i is compared with the i-th wanted extent: the index advances past a -1 as well.
  int i = 0;
  for (int64_t d : shape) {
    ok = ok && (d < 0 || t.dim(i) == d);
    ++i;
  }
  if (!ok)
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": ", name, " must be ", DTypeList(dtypes), " ", ShapePattern(shape),
                     ", got ", DTypeName(t.dtype()), " ", ShapeString(t.shape())));
  if (t.numel() > 0 && t.empty())
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": ", name, " ", ShapeString(t.shape()), " has no data"));
  return absl::OkStatus();
}

}  // namespace epx::cuda
