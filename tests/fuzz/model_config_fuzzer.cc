// libFuzzer target: any text as config.json. Parsing returns a config that passes Validate() or
// a Status; never a crash. A parsed config survives a ToJson() round trip.
#include <cstddef>
#include <cstdint>
#include <string>

#include "common/model_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  auto config = epx::ModelConfig::FromJson(text, "fuzz");
  if (!config.ok()) return 0;
  if (!config->Validate().ok()) __builtin_trap();
  auto again = epx::ModelConfig::FromJson(config->ToJson(), "fuzz-roundtrip");
  if (!again.ok() || again->Hash() != config->Hash()) __builtin_trap();
  return 0;
}
