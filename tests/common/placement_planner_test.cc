#include "common/placement_planner.h"

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace epx {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

int64_t Copies(const Placement& p) {
  int64_t n = 0;
  for (int e = 0; e < p.num_experts(); ++e) n += static_cast<int64_t>(p.replicas(e).size());
  return n;
}

TEST(PlacementPlannerTest, DrainMovesOnlyTheExpertsWithoutAnotherCopy) {
  auto base = Placement::RoundRobin(8, 3, 2);
  ASSERT_TRUE(base.ok());
  auto drained = DrainPlacement(*base, 2, {1, 2, 3});
  ASSERT_TRUE(drained.ok()) << drained.status();
  EXPECT_TRUE(drained->experts_of(2).empty());
  // Every expert keeps its other copy; nothing new is loaded.
  for (int e = 0; e < 8; ++e) {
    EXPECT_EQ(drained->replicas(e).size(), base->LocalIndex(2, e) >= 0 ? 1u : 2u) << e;
  }
  auto single = Placement::RoundRobin(8, 3);
  ASSERT_TRUE(single.ok());
  auto moved = DrainPlacement(*single, 3, {1, 2, 3});
  ASSERT_TRUE(moved.ok());
  // Worker 3's experts 2 and 5 go to the workers holding the fewest (1 and 2 hold three each).
  EXPECT_THAT(moved->replicas(2), ElementsAre(1));
  EXPECT_THAT(moved->replicas(5), ElementsAre(2));
  EXPECT_TRUE(moved->experts_of(3).empty());
  EXPECT_THAT(std::string(DrainPlacement(*single, 1, {1}).status().message()),
              HasSubstr("last worker"));
}

TEST(PlacementPlannerTest, GrowGivesTheNewWorkerTheLeastReplicatedExperts) {
  auto base = Placement::FromJson(R"({"experts": {"0": [1, 2], "1": [1], "2": [2], "3": [1, 2]}})",
                                  4, 2, "p.json");
  ASSERT_TRUE(base.ok());
  auto grown = GrowPlacement(*base, 3, 3, {1, 2, 3});
  ASSERT_TRUE(grown.ok()) << grown.status();
  EXPECT_EQ(grown->num_workers(), 3);
  // Six copies over three workers: two each, the single-copy experts first.
  EXPECT_THAT(grown->experts_of(3), ElementsAre(1, 2));
  EXPECT_EQ(grown->experts_of(1), base->experts_of(1));
}

TEST(PlacementPlannerTest, RebalanceGivesHotExpertsReplicasAndMovesLittle) {
  auto base = Placement::RoundRobin(8, 3);
  ASSERT_TRUE(base.ok());
  // Expert 5 gets half the tokens.
  const std::vector<int64_t> load = {10, 10, 10, 10, 10, 70, 10, 10};
  auto rebalanced = RebalancePlacement(*base, load, {1, 2, 3});
  ASSERT_TRUE(rebalanced.ok()) << rebalanced.status();
  EXPECT_EQ(Copies(*rebalanced), 8 + 3);  // a spare copy per worker
  EXPECT_EQ(rebalanced->replicas(5).size(), 3u);
  EXPECT_LT(BusiestWorkerLoad(*rebalanced, load), BusiestWorkerLoad(*base, load));
  // Every expert keeps a copy where it was.
  for (int e = 0; e < 8; ++e)
    EXPECT_GE(rebalanced->LocalIndex(base->replicas(e)[0], e), 0) << "expert " << e;
  // The same inputs, the same placement.
  auto again = RebalancePlacement(*base, load, {1, 2, 3});
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->ToString(), rebalanced->ToString());
}

TEST(PlacementPlannerTest, BusiestWorkerLoadSplitsAnExpertOverItsReplicas) {
  auto p = Placement::FromJson(R"({"experts": {"0": [1, 2], "1": [2]}})", 2, 2, "p.json");
  ASSERT_TRUE(p.ok());
  EXPECT_DOUBLE_EQ(BusiestWorkerLoad(*p, {10, 4}), 9.0);  // worker 2: 5 + 4
}

}  // namespace
}  // namespace epx
