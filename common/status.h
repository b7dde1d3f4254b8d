// Status helpers shared by every module: the macros that the packaged abseil (20220623) predates,
// and EPX_CHECK for programmer errors. Thread-safe (stateless).
#ifndef EPX_COMMON_STATUS_H_
#define EPX_COMMON_STATUS_H_

#include <cstdio>
#include <cstdlib>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

#define EPX_CONCAT_INNER_(a, b) a##b
#define EPX_CONCAT_(a, b) EPX_CONCAT_INNER_(a, b)

// Returns from the enclosing function if `expr` (an absl::Status) is not OK.
#define EPX_RETURN_IF_ERROR(expr)              \
  do {                                         \
    ::absl::Status epx_status_ = (expr);       \
    if (!epx_status_.ok()) return epx_status_; \
  } while (0)

// `EPX_ASSIGN_OR_RETURN(auto x, F());` assigns the value of an absl::StatusOr or returns its error.
#define EPX_ASSIGN_OR_RETURN(lhs, expr) \
  EPX_ASSIGN_OR_RETURN_IMPL_(EPX_CONCAT_(epx_statusor_, __LINE__), lhs, expr)
#define EPX_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr)    \
  auto statusor = (expr);                                  \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = std::move(statusor).value()

// Aborts with file:line on a broken invariant. Only for programmer errors, never for bad input.
#define EPX_CHECK(cond)                                                                 \
  do {                                                                                  \
    if (!(cond)) {                                                                      \
      std::fprintf(stderr, "%s:%d: EPX_CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                     \
    }                                                                                   \
  } while (0)

#endif  // EPX_COMMON_STATUS_H_
