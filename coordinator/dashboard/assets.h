// The dashboard's files (coordinator/dashboard/), compiled into the binary by
// cmake/EmbedFile.cmake so that the page needs no files, internet or CDN at run time.
#ifndef EPX_COORDINATOR_DASHBOARD_ASSETS_H_
#define EPX_COORDINATOR_DASHBOARD_ASSETS_H_

#include <cstddef>
#include <cstdint>

namespace epx {

extern const uint8_t kDashboardHtml[];
extern const size_t kDashboardHtmlSize;
extern const uint8_t kDashboardJs[];
extern const size_t kDashboardJsSize;
extern const uint8_t kDashboardCss[];
extern const size_t kDashboardCssSize;

}  // namespace epx

#endif  // EPX_COORDINATOR_DASHBOARD_ASSETS_H_
