// The installed zero-estimate CLI (src/tools/zero_estimate.cc) run as a user runs it: the ZeRO paper's worked
// example and DESIGN.md's table from its output, the same numbers as the library call, the Stage::kAuto choice
// for a device size, and its exit status on bad arguments.
#include <sys/wait.h>

#include <cctype>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "zero/estimate.h"

namespace zero {
namespace {

struct CliRun {
  std::string out;
  int exit_code = -1;
};

CliRun RunCli(const std::string& args) {
  CliRun r;
  const std::string cmd = std::string(ZERO_ESTIMATE_PATH) + " " + args + " 2>&1";
  FILE* f = popen(cmd.c_str(), "r");
  if (f == nullptr) return r;
  char buf[4096];
  size_t got = 0;
  while ((got = fread(buf, 1, sizeof(buf), f)) > 0) r.out.append(buf, got);
  const int status = pclose(f);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

// The columns of the table row that starts with `config` followed by spaces and a number.
std::vector<std::string> RowOf(const std::string& out, const std::string& config) {
  std::istringstream is(out);
  for (std::string line; std::getline(is, line);) {
    if (line.rfind(config, 0) != 0) continue;
    std::string rest = line.substr(config.size());
    if (rest.empty() || rest[0] != ' ' || rest.find_first_not_of(' ') == std::string::npos) continue;
    if (!std::isdigit(static_cast<unsigned char>(rest[rest.find_first_not_of(' ')]))) continue;
    std::istringstream cols(rest);
    std::vector<std::string> v;
    for (std::string c; cols >> c;) v.push_back(c);
    return v;
  }
  return {};
}

std::string Gb1(int64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f", static_cast<double>(bytes) / 1e9);
  return buf;
}

TEST(EstimateCliTest, PaperExampleFromTheCommandLine) {
  struct Case {
    const char* flags;
    DType grad;
    const char* gb[4];
  };
  for (const Case& c : {Case{"--grad-dtype fp16", DType::kF16, {"120.0", "31.4", "16.6", "1.9"}},
                        Case{"", DType::kF32, {"135.0", "46.4", "16.9", "2.1"}}}) {
    const CliRun r = RunCli(std::string("--params 7.5e9 --world 64 ") + c.flags);
    SCOPED_TRACE(r.out);
    ASSERT_EQ(r.exit_code, 0);
    EXPECT_NE(r.out.find("model states only"), std::string::npos);
    for (int st = 0; st <= 3; ++st) {
      const std::vector<std::string> row = RowOf(r.out, "stage " + std::to_string(st));
      ASSERT_EQ(row.size(), 6u) << "stage " << st;
      EXPECT_EQ(row[4], c.gb[st]) << "stage " << st;  // device GB per rank
      // The same number as the library call.
      Options o;
      o.stage = static_cast<Stage>(st);
      o.param_dtype = DType::kBF16;
      o.grad_dtype = c.grad;
      o.backend = Backend::kCuda;
      MemoryEstimate e;
      ASSERT_TRUE(Estimate(ModelDescription::FromParamCount(7'500'000'000), 64, o, &e).ok());
      EXPECT_EQ(row[4], Gb1(e.DeviceTotal()));
    }
    // Offload: the optimizer leaves the device for the host, 8 ranks per node.
    const std::vector<std::string> off = RowOf(r.out, "stage 3 + optimizer offload");
    ASSERT_EQ(off.size(), 6u);
    EXPECT_EQ(off[2], "0.00");
    EXPECT_EQ(off[5], "11.3");  // 12 bytes x 7.5e9 / 64 x 8 ranks
  }
}

TEST(EstimateCliTest, ShapeAndAutomaticChoiceForADeviceSize) {
  const CliRun r = RunCli("--layers 32 --hidden 4096 --ffn 11008 --vocab 32000 --device-memory 24GiB --world 8 "
                       "--reserved 6GiB");
  SCOPED_TRACE(r.out);
  ASSERT_EQ(r.exit_code, 0);
  EXPECT_NE(r.out.find("6.738e9 parameters"), std::string::npos);
  // LLaMA-7B on 8 ranks with 18 GiB for the engine: stages 0-2 do not fit, 2 + optimizer offload does.
  EXPECT_NE(r.out.find("stage 2: device"), std::string::npos);
  EXPECT_NE(r.out.find("does not fit"), std::string::npos);
  EXPECT_NE(r.out.find("choice: stage 2 + optimizer offload"), std::string::npos);
  // The same choice from the library.
  ModelDescription m;
  TransformerShape t{32, 4096, 0, 0, 11008, 32000, false, false};
  ASSERT_TRUE(TransformerSpecs(t, &m.specs).ok());
  Options o;
  o.param_dtype = DType::kBF16;
  o.backend = Backend::kCuda;
  o.reserved_bytes = int64_t{6} << 30;
  AutoChoice choice;
  ASSERT_TRUE(ChooseConfiguration(m, 8, o, int64_t{24} << 30, &choice).ok());
  ASSERT_EQ(choice.chosen, 3);
  EXPECT_EQ(choice.options.stage, Stage::kGradients);
  EXPECT_TRUE(choice.options.offload_optimizer);
}

TEST(EstimateCliTest, NothingFitsAndBadArguments) {
  CliRun r = RunCli("--params 7.5e9 --world 8 --device-memory 1GiB");
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("nothing fits"), std::string::npos) << r.out;
  r = RunCli("--params 7.5e9 --world 8 --device-memory 24 GiB");
  EXPECT_EQ(r.exit_code, 2) << r.out;
  EXPECT_NE(r.out.find("unexpected argument 'GiB'"), std::string::npos) << r.out;
  r = RunCli("--params 7.5e9 --grad-dtype fp8");
  EXPECT_EQ(r.exit_code, 2) << r.out;
  EXPECT_NE(r.out.find("--grad-dtype must be fp32, bf16 or fp16, not 'fp8'"), std::string::npos) << r.out;
  r = RunCli("--world 8");
  EXPECT_EQ(r.exit_code, 2) << r.out;
  EXPECT_NE(r.out.find("give the model"), std::string::npos) << r.out;
  r = RunCli("--layers 2 --hidden 100 --heads 3 --ffn 8 --vocab 10");
  EXPECT_EQ(r.exit_code, 2) << r.out;
  EXPECT_NE(r.out.find("heads (3) must divide hidden (100)"), std::string::npos) << r.out;
  r = RunCli("--help");
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_NE(r.out.find("usage: zero-estimate"), std::string::npos);
}

}  // namespace
}  // namespace zero
