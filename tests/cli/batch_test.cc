// `epx batch`: OpenAI batch lines answered in order, here (--model) and on a server (--server),
// with every bad line given its own error and none lost.
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/coordinator/test_util.h"
#include "tests/serve_util.h"

namespace epx {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using testing::EpxBinary;
using ::testing::HasSubstr;

std::string Temp(const std::string& name) {
  return (fs::path(::testing::TempDir()) / ("epx_batch_" + name)).string();
}

std::vector<json> ReadLines(const std::string& path) {
  std::ifstream in(path);
  std::vector<json> lines;
  std::string line;
  while (std::getline(in, line)) lines.push_back(json::parse(line));
  return lines;
}

// 100 requests (completions and chats, greedy and seeded sampling) with three bad lines among
// them: line 10 is not JSON, line 40 asks for a field the API does not have, line 77 has an URL
// that is not an endpoint. A blank line (55) is skipped. Returns the custom ids of the good ones.
std::vector<std::string> WriteInput(const std::string& path) {
  std::ofstream out(path);
  std::vector<std::string> good;
  for (int i = 1; i <= 100; ++i) {
    const std::string id = absl::StrCat("req-", i);
    if (i == 10) {
      out << "{\"custom_id\": \"req-10\", \"body\": \n";  // cut short
      continue;
    }
    if (i == 55) out << "\n";
    json body;
    std::string url = "/v1/completions";
    if (i % 3 == 0) {
      url = "/v1/chat/completions";
      body["messages"] = {{{"role", "user"}, {"content", absl::StrCat("question number ", i)}}};
    } else {
      body["prompt"] = absl::StrCat("The story of expert ", i, " is");
    }
    body["max_tokens"] = 4 + i % 5;
    if (i % 2 == 0) {
      body["temperature"] = 0.8;
      body["seed"] = 1000 + i;
    } else {
      body["temperature"] = 0;
    }
    if (i == 40) body["best_of"] = 2;
    if (i == 77) url = "/v1/embeddings";
    out << json{{"custom_id", id}, {"method", "POST"}, {"url", url}, {"body", body}}.dump() << "\n";
    if (i != 40 && i != 77) good.push_back(id);
  }
  return good;
}

void ExpectAnswered(const std::vector<json>& lines) {
  ASSERT_EQ(lines.size(), 100u);
  int results = 0;
  for (size_t k = 0; k < lines.size(); ++k) {
    const json& line = lines[k];
    const int i = static_cast<int>(k) + 1;
    SCOPED_TRACE(line.dump());
    if (i == 10) {
      EXPECT_TRUE(line["custom_id"].is_null());
      EXPECT_TRUE(line["response"].is_null());
      EXPECT_THAT(line["error"]["message"].get<std::string>(), HasSubstr("line 10: not JSON"));
      continue;
    }
    EXPECT_EQ(line["custom_id"], absl::StrCat("req-", i)) << "out of order";
    // Line numbers are the file's: the blank line 55 shifts the later ones by one.
    const int number = i < 55 ? i : i + 1;
    if (i == 40 || i == 77) {
      EXPECT_TRUE(line["response"].is_null());
      EXPECT_EQ(line["error"]["line"], number);
      EXPECT_THAT(line["error"]["message"].get<std::string>(),
                  HasSubstr(i == 40 ? "\"best_of\"" : "\"url\""));
      if (i == 40) {
        EXPECT_EQ(line["error"]["param"], "best_of");
      }
      continue;
    }
    ++results;
    EXPECT_TRUE(line["error"].is_null());
    EXPECT_EQ(line["response"]["status_code"], 200);
    const json& body = line["response"]["body"];
    EXPECT_EQ(body["object"], i % 3 == 0 ? "chat.completion" : "text_completion");
    EXPECT_EQ(body["usage"]["completion_tokens"], 4 + i % 5);
    EXPECT_EQ(body["choices"][0]["finish_reason"], "length");
  }
  EXPECT_EQ(results, 97);
}

// The generated text of every line that has one.
std::vector<std::string> Texts(const std::vector<json>& lines) {
  std::vector<std::string> texts;
  for (const json& line : lines) {
    if (line["response"].is_null()) {
      texts.push_back("<error>");
      continue;
    }
    const json& choice = line["response"]["body"]["choices"][0];
    texts.push_back(choice.contains("message") ? choice["message"]["content"].get<std::string>()
                                               : choice["text"].get<std::string>());
  }
  return texts;
}

TEST(BatchTest, HundredLinesWithThreeBadOnesGiveNinetySevenResultsAndThreeErrorsInOrder) {
  const std::string input = Temp("input.jsonl");
  WriteInput(input);
  const std::string local = Temp("local.jsonl");
  testing::CommandResult r = testing::RunCommand(
      absl::StrCat(EpxBinary(), " batch --model ", test::TinyModelDir(), " --input ", input,
                   " --output ", local, " --concurrency 16 --progress 2>&1"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("100/100 lines, 3 errors"));  // the progress bar's last state
  EXPECT_THAT(r.output, HasSubstr("100 lines: 97 answered, 3 errors"));
  const std::vector<json> here = ReadLines(local);
  ExpectAnswered(here);

  // The same file on a server, with another concurrency: the same answers, token for token.
  testing::ServerProcess server("epx_batch_server", "",
                                "--model " + test::TinyModelDir() + " --max-running 8");
  ASSERT_TRUE(server.ok()) << server.log();
  const std::string remote = Temp("remote.jsonl");
  r = testing::RunCommand(absl::StrCat(EpxBinary(), " batch --server ", server.address(),
                                       " --input ", input, " --output ", remote,
                                       " --concurrency 5 --no-progress 2>&1"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, ::testing::Not(HasSubstr("lines/s")));
  const std::vector<json> there = ReadLines(remote);
  ExpectAnswered(there);
  EXPECT_EQ(Texts(there), Texts(here));
}

TEST(BatchTest, BadOptionsAndFilesAreRefusedWithTheirNames) {
  const std::string missing = Temp("no_such_input.jsonl");
  testing::CommandResult r = testing::RunCommand(
      absl::StrCat(EpxBinary(), " batch --model ", test::TinyModelDir(), " --input ", missing,
                   " --output ", Temp("never.jsonl"), " 2>&1"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.output, HasSubstr(missing));
  r = testing::RunCommand(absl::StrCat(EpxBinary(), " batch --input ", missing, " --output ",
                                       Temp("never.jsonl"), " 2>&1"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.output, HasSubstr("batch needs --model or --server"));
  const std::string input = Temp("same.jsonl");
  std::ofstream(input) << "\n";
  r = testing::RunCommand(absl::StrCat(EpxBinary(), " batch --model ", test::TinyModelDir(),
                                       " --input ", input, " --output ", input, " 2>&1"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.output, HasSubstr("--output must not be the --input file"));
}

}  // namespace
}  // namespace epx
