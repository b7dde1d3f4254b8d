#include <dlfcn.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <mutex>

#include "common/sentencepiece_shim.h"

namespace epx::internal {
namespace {

using Factory = SentencePieceShim* (*)();
constexpr char kModule[] = "libepx_sentencepiece.so";

std::vector<std::string> Candidates() {
  std::vector<std::string> paths;
  if (const char* env = std::getenv("EPX_SENTENCEPIECE_MODULE"); env != nullptr && *env)
    paths.push_back(env);
  std::error_code ec;
  const std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    paths.push_back((exe.parent_path() / kModule).string());
    paths.push_back((exe.parent_path().parent_path() / "lib" / kModule).string());
  }
  paths.push_back(EPX_SENTENCEPIECE_MODULE_PATH);
  return paths;
}

}  // namespace

std::unique_ptr<SentencePieceShim> NewSentencePieceShim(std::string* error) {
  static Factory factory = nullptr;
  static std::string load_error;
  static std::once_flag once;
  std::call_once(once, [] {
    std::string tried;
    for (const std::string& path : Candidates()) {
      if (!std::filesystem::exists(path)) {
        tried += "\n  " + path + ": not found";
        continue;
      }
      void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
      if (handle == nullptr) {
        tried += "\n  " + path + ": " + dlerror();
        continue;
      }
      factory = reinterpret_cast<Factory>(dlsym(handle, "EpxNewSentencePieceShim"));
      if (factory != nullptr) return;
      tried += "\n  " + path + ": no EpxNewSentencePieceShim";
    }
    load_error = "cannot load the SentencePiece module " + std::string(kModule) +
                 " (set EPX_SENTENCEPIECE_MODULE to its path); tried:" + tried;
  });
  if (factory == nullptr) {
    *error = load_error;
    return nullptr;
  }
  return std::unique_ptr<SentencePieceShim>(factory());
}

}  // namespace epx::internal
