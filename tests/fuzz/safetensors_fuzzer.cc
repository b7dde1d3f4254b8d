// libFuzzer target: any byte string as a safetensors file. Opening must return a Status or a
// file whose every tensor view lies inside the mapping; never crash or read out of bounds.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "common/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const int fd = memfd_create("safetensors_fuzz", 0);
  if (fd < 0) return 0;
  if (ftruncate(fd, 0) != 0) return 0;
  if (pwrite(fd, data, size, 0) != static_cast<ssize_t>(size)) return 0;
  const std::string path = "/proc/self/fd/" + std::to_string(fd);
  auto file = epx::SafetensorsFile::Open(path);
  if (!file.ok()) return 0;
  volatile uint8_t sink = 0;
  for (const auto& e : (*file)->entries()) {
    auto view = (*file)->Get(e.name);
    if (!view.ok()) __builtin_trap();
    const size_t n = view->nbytes();
    // Touch the first and last byte: ASan and the mapping bounds catch a bad offset.
    if (n > 0) sink = sink + view->data<const uint8_t>()[0] + view->data<const uint8_t>()[n - 1];
  }
  return 0;
}
