#include "common/placement.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/json.h"
#include "common/status.h"
#include "nlohmann/json.hpp"

namespace epx {

absl::StatusOr<Placement> Placement::RoundRobin(int num_experts, int num_workers, int copies) {
  if (num_experts < 1 || num_workers < 1)
    return absl::InvalidArgumentError(
        absl::StrCat("round-robin placement needs experts >= 1 and "
                     "workers >= 1, got ",
                     num_experts, " and ", num_workers));
  if (copies < 1 || copies > num_workers)
    return absl::InvalidArgumentError(
        absl::StrCat("--replicas ", copies,
                     ": every expert's copies sit on distinct workers, so "
                     "it must be between 1 and the ",
                     num_workers, " worker(s)"));
  std::vector<std::vector<int>> replicas(num_experts);
  if (num_workers < num_experts * copies) {
    for (int e = 0; e < num_experts; ++e)
      for (int j = 0; j < copies; ++j) replicas[e].push_back(1 + (e * copies + j) % num_workers);
  } else {
    for (int w = 1; w <= num_workers; ++w) replicas[(w - 1) % num_experts].push_back(w);
  }
  return Build(std::move(replicas), num_workers, "round-robin placement");
}

absl::StatusOr<Placement> Placement::FromFile(const std::string& path, int num_experts,
                                              int num_workers) {
  EPX_ASSIGN_OR_RETURN(std::string text, ReadTextFile(path));
  return FromJson(text, num_experts, num_workers, path);
}

absl::StatusOr<Placement> Placement::FromReplicas(std::vector<std::vector<int>> replicas,
                                                  int num_workers, const std::string& source) {
  for (size_t e = 0; e < replicas.size(); ++e) {
    if (replicas[e].empty())
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": expert ", e, " is not placed on any worker"));
    for (int r : replicas[e])
      if (r < 1 || r > num_workers)
        return absl::InvalidArgumentError(
            absl::StrCat(source, ": expert ", e, " on rank ", r, ", outside 1..", num_workers));
  }
  return Build(std::move(replicas), num_workers, source, /*allow_idle=*/true);
}

absl::StatusOr<Placement> Placement::FromJson(const std::string& text, int num_experts,
                                              int num_workers, const std::string& source,
                                              bool allow_idle) {
  using nlohmann::json;
  auto bad = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", what));
  };
  EPX_ASSIGN_OR_RETURN(json j, ParseJson(text, source));
  if (!j.is_object() || !j.contains("experts") || !j["experts"].is_object())
    return bad("expected a JSON object {\"experts\": {\"0\": [1, 2], \"1\": [3], ...}}");
  std::vector<std::vector<int>> replicas(num_experts);
  std::vector<bool> seen(num_experts, false);
  for (auto it = j["experts"].begin(); it != j["experts"].end(); ++it) {
    int expert = -1;
    const std::string& key = it.key();
    if (key.empty() || key.size() > 9 || (key.size() > 1 && key[0] == '0') ||
        !std::all_of(key.begin(), key.end(), [](char c) { return c >= '0' && c <= '9'; }))
      return bad(absl::StrCat("\"", key, "\" is not an expert index"));
    expert = std::stoi(key);
    if (expert >= num_experts)
      return bad(absl::StrCat("expert ", expert, " does not exist (the model has ", num_experts,
                              " experts)"));
    if (!it.value().is_array() || it.value().empty())
      return bad(absl::StrCat("expert ", expert, " needs a non-empty list of worker ranks"));
    seen[expert] = true;
    for (const json& r : it.value()) {
      if (!r.is_number_integer())
        return bad(absl::StrCat("expert ", expert, ": ", r.dump(), " is not a rank"));
      const int64_t rank = r.get<int64_t>();
      if (rank < 1 || rank > num_workers)
        return bad(absl::StrCat("expert ", expert, " is placed on rank ", rank,
                                ", but the job's workers are ranks 1..", num_workers,
                                " (rank 0 is the coordinator)"));
      replicas[expert].push_back(static_cast<int>(rank));
    }
  }
  for (int e = 0; e < num_experts; ++e)
    if (!seen[e]) return bad(absl::StrCat("expert ", e, " is not placed on any worker"));
  return Build(std::move(replicas), num_workers, source, allow_idle);
}

absl::StatusOr<Placement> Placement::Build(std::vector<std::vector<int>> replicas, int num_workers,
                                           const std::string& source, bool allow_idle) {
  Placement p;
  p.num_workers_ = num_workers;
  p.experts_of_.resize(num_workers + 1);
  for (size_t e = 0; e < replicas.size(); ++e) {
    std::sort(replicas[e].begin(), replicas[e].end());
    for (size_t i = 1; i < replicas[e].size(); ++i)
      if (replicas[e][i] == replicas[e][i - 1])
        return absl::InvalidArgumentError(
            absl::StrCat(source, ": expert ", e, " lists rank ", replicas[e][i], " twice"));
    for (int rank : replicas[e]) p.experts_of_[rank].push_back(static_cast<int>(e));
  }
  for (int w = 1; w <= num_workers && !allow_idle; ++w)
    if (p.experts_of_[w].empty())
      return absl::InvalidArgumentError(absl::StrCat(
          source, ": worker rank ", w, " holds no expert (every worker must hold at least one)"));
  p.replicas_ = std::move(replicas);
  return p;
}

absl::StatusOr<Placement> Placement::Among(const Placement& base, const std::vector<int>& members) {
  // The new rank of each base rank (0: not a member).
  std::vector<int> renumbered(base.num_workers() + 1, 0);
  for (size_t i = 1; i < members.size(); ++i) {
    const int r = members[i];
    if (r < 1 || r > base.num_workers() || renumbered[r] != 0 || (i > 1 && r <= members[i - 1]))
      return absl::InternalError(absl::StrCat("members [", absl::StrJoin(members, ","),
                                              "] are not ascending worker ranks"));
    renumbered[r] = static_cast<int>(i);
  }
  std::vector<std::vector<int>> replicas(base.num_experts());
  for (int e = 0; e < base.num_experts(); ++e) {
    for (int r : base.replicas(e))
      if (renumbered[r] != 0) replicas[e].push_back(renumbered[r]);
    if (replicas[e].empty())
      return absl::FailedPreconditionError(absl::StrCat(
          "expert ", e, " has no live worker (it was on worker",
          base.replicas(e).size() > 1 ? "s " : " ", absl::StrJoin(base.replicas(e), ", "), ")"));
  }
  return Build(std::move(replicas), static_cast<int>(members.size()) - 1, "the placement");
}

int Placement::LocalIndex(int rank, int expert) const {
  const auto& local = experts_of_[rank];
  auto it = std::lower_bound(local.begin(), local.end(), expert);
  return it != local.end() && *it == expert ? static_cast<int>(it - local.begin()) : -1;
}

std::string Placement::ToString() const {
  std::vector<std::string> parts;
  for (size_t e = 0; e < replicas_.size(); ++e)
    parts.push_back(absl::StrCat("expert ", e, " -> [", absl::StrJoin(replicas_[e], ", "), "]"));
  return absl::StrJoin(parts, "; ");
}

std::string Placement::ToJson() const {
  std::vector<std::string> parts;
  for (size_t e = 0; e < replicas_.size(); ++e)
    parts.push_back(absl::StrCat("\"", e, "\": [", absl::StrJoin(replicas_[e], ", "), "]"));
  return absl::StrCat("{\"experts\": {", absl::StrJoin(parts, ", "), "}}");
}

}  // namespace epx
