#include "common/placement.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace epx {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

TEST(PlacementTest, RoundRobinFewerWorkersThanExperts) {
  auto p = Placement::RoundRobin(8, 3);
  ASSERT_TRUE(p.ok());
  EXPECT_THAT(p->experts_of(1), ElementsAre(0, 3, 6));
  EXPECT_THAT(p->experts_of(2), ElementsAre(1, 4, 7));
  EXPECT_THAT(p->experts_of(3), ElementsAre(2, 5));
  EXPECT_THAT(p->replicas(4), ElementsAre(2));
  EXPECT_EQ(p->LocalIndex(2, 4), 1);
  EXPECT_EQ(p->LocalIndex(2, 0), -1);
}

TEST(PlacementTest, RoundRobinOneExpertPerWorker) {
  auto p = Placement::RoundRobin(8, 8);
  ASSERT_TRUE(p.ok());
  for (int w = 1; w <= 8; ++w) EXPECT_THAT(p->experts_of(w), ElementsAre(w - 1));
}

TEST(PlacementTest, RoundRobinMoreWorkersThanExpertsMakesReplicas) {
  auto p = Placement::RoundRobin(4, 10);
  ASSERT_TRUE(p.ok());
  EXPECT_THAT(p->replicas(0), ElementsAre(1, 5, 9));
  EXPECT_THAT(p->replicas(1), ElementsAre(2, 6, 10));
  EXPECT_THAT(p->replicas(3), ElementsAre(4, 8));
  for (int w = 1; w <= 10; ++w) EXPECT_EQ(p->experts_of(w).size(), 1u);
}

TEST(PlacementTest, RoundRobinReplicasSitOnDistinctWorkers) {
  auto p = Placement::RoundRobin(8, 3, 2);
  ASSERT_TRUE(p.ok());
  EXPECT_THAT(p->replicas(0), ElementsAre(1, 2));
  EXPECT_THAT(p->replicas(1), ElementsAre(1, 3));
  EXPECT_THAT(p->replicas(2), ElementsAre(2, 3));
  for (int e = 0; e < 8; ++e) EXPECT_EQ(p->replicas(e).size(), 2u) << "expert " << e;
  // 16 copies over 3 workers.
  EXPECT_EQ(p->experts_of(1).size() + p->experts_of(2).size() + p->experts_of(3).size(), 16u);
  for (int w = 1; w <= 3; ++w) EXPECT_GE(p->experts_of(w).size(), 5u);
  // Enough workers for every copy: one expert each.
  auto wide = Placement::RoundRobin(4, 8, 2);
  ASSERT_TRUE(wide.ok());
  for (int w = 1; w <= 8; ++w) EXPECT_EQ(wide->experts_of(w).size(), 1u);
  for (int e = 0; e < 4; ++e) EXPECT_EQ(wide->replicas(e).size(), 2u);
  EXPECT_THAT(std::string(Placement::RoundRobin(8, 3, 4).status().message()),
              HasSubstr("--replicas 4"));
  EXPECT_FALSE(Placement::RoundRobin(8, 3, 0).ok());
}

TEST(PlacementTest, AmongTheSurvivorsRenumbersAndKeepsLiveReplicas) {
  auto base = Placement::RoundRobin(8, 3, 2);
  ASSERT_TRUE(base.ok());
  // Worker 2 lost: workers 1 and 3 become ranks 1 and 2.
  auto survivors = Placement::Among(*base, {0, 1, 3});
  ASSERT_TRUE(survivors.ok()) << survivors.status();
  EXPECT_EQ(survivors->num_workers(), 2);
  EXPECT_THAT(survivors->replicas(0), ElementsAre(1));
  EXPECT_THAT(survivors->replicas(1), ElementsAre(1, 2));
  EXPECT_THAT(survivors->replicas(2), ElementsAre(2));
  EXPECT_EQ(survivors->experts_of(1), base->experts_of(1));
  EXPECT_EQ(survivors->experts_of(2), base->experts_of(3));
  // Without replicas a lost worker leaves its experts without one.
  auto single = Placement::RoundRobin(8, 3);
  ASSERT_TRUE(single.ok());
  auto broken = Placement::Among(*single, {0, 1, 3});
  EXPECT_EQ(broken.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(broken.status().message()),
              HasSubstr("expert 1 has no live worker (it was on worker 2)"));
  EXPECT_FALSE(Placement::Among(*single, {0, 3, 1}).ok());
}

TEST(PlacementTest, FileWithReplicas) {
  auto p =
      Placement::FromJson(R"({"experts": {"0": [1, 2], "1": [2], "2": [3, 1]}})", 3, 3, "p.json");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_THAT(p->replicas(2), ElementsAre(1, 3));
  EXPECT_THAT(p->experts_of(1), ElementsAre(0, 2));
  EXPECT_THAT(p->experts_of(2), ElementsAre(0, 1));
  EXPECT_THAT(p->ToString(), HasSubstr("expert 2 -> [1, 3]"));
}

void ExpectError(const std::string& text, int experts, int workers, const std::string& says) {
  auto p = Placement::FromJson(text, experts, workers, "place.json");
  ASSERT_FALSE(p.ok()) << text;
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(p.status().message()), HasSubstr("place.json")) << p.status();
  EXPECT_THAT(std::string(p.status().message()), HasSubstr(says)) << p.status();
}

TEST(PlacementTest, FileErrorsNameTheProblem) {
  ExpectError(R"({"experts": {"0": [1]}})", 2, 1, "expert 1 is not placed");
  ExpectError(R"({"experts": {"0": [1], "1": [1], "2": [1]}})", 2, 1, "expert 2 does not exist");
  ExpectError(R"({"experts": {"0": [1], "1": [5]}})", 2, 2, "rank 5");
  ExpectError(R"({"experts": {"0": [1], "1": [0]}})", 2, 1, "rank 0");
  ExpectError(R"({"experts": {"0": [1, 1], "1": [1]}})", 2, 1, "twice");
  ExpectError(R"({"experts": {"0": [1], "1": [1]}})", 2, 2, "worker rank 2 holds no expert");
  ExpectError(R"({"experts": {"0": [], "1": [1]}})", 2, 1, "non-empty list");
  ExpectError(R"({"experts": {"x": [1]}})", 1, 1, "not an expert index");
  ExpectError(R"({"experts": {"00": [1]}})", 1, 1, "not an expert index");
  ExpectError(R"({"experts": {"0": ["one"]}})", 1, 1, "not a rank");
  ExpectError(R"([1, 2])", 1, 1, "expected a JSON object");
  ExpectError("{not json", 1, 1, "invalid JSON");
}

TEST(PlacementTest, MissingFileIsNotFound) {
  auto p = Placement::FromFile("/no/such/placement.json", 8, 2);
  EXPECT_EQ(p.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(p.status().message()), HasSubstr("/no/such/placement.json"));
}

}  // namespace
}  // namespace epx
