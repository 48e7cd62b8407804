// The installed zero-estimate CLI (src/tools/zero_estimate.cc) run as a user runs it: the ZeRO paper's worked
// example and DESIGN.md's table from its output, the same numbers as the library call, the Stage::kAuto choice
// for a device size (with the activation estimate as its reserve), the whole answer for a global batch and its
// table over common device sizes (each row the library's PlanTraining), and its exit status on bad arguments.
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
  // LLaMA-7B on 8 ranks with 18 GiB for the engine: stages 0-2 do not fit; stage 3, on the device, does (it comes
  // before any offloaded configuration).
  EXPECT_NE(r.out.find("stage 2: device"), std::string::npos);
  EXPECT_NE(r.out.find("does not fit"), std::string::npos);
  EXPECT_NE(r.out.find("choice: stage 3\n"), std::string::npos);
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
  EXPECT_EQ(choice.options.stage, Stage::kParameters);
  EXPECT_FALSE(choice.options.offload_optimizer);
}

// --nvme: the tier's configurations after all others, with host and NVMe bytes per rank and per node and the bounce
// buffers, each the library's Estimate; --host-memory (per node) is Stage::kAuto's host budget, which only the
// tier fits here.
TEST(EstimateCliTest, TheNvmeTierAndAHostBudget) {
  const CliRun r = RunCli("--preset llama2-70b --world 8 --nvme --device-memory 80GiB --host-memory 512GiB "
                          "--reserved 20GiB --unit GiB");
  SCOPED_TRACE(r.out);
  ASSERT_EQ(r.exit_code, 0);
  ModelDescription m;
  ASSERT_TRUE(TransformerSpecs(TransformerShape{80, 8192, 64, 8, 28672, 32000, false, false}, &m.specs).ok());
  Options o;
  o.param_dtype = DType::kBF16;
  o.backend = Backend::kCuda;
  o.stage = Stage::kParameters;
  o.offload_optimizer = true;
  o.nvme_path = "nvme";
  MemoryEstimate e;
  ASSERT_TRUE(Estimate(m, 8, o, &e).ok());
  const std::vector<std::string> row = RowOf(r.out, "stage 3 + optimizer offload to NVMe");
  ASSERT_GE(row.size(), 11u);  // 4 categories, device, host/rank, host/node, bounce, NVMe/rank, NVMe/node, fits
  auto gib = [](int64_t b, int decimals) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%.*f", decimals, static_cast<double>(b) / 1073741824.0);
    return std::string(buf);
  };
  EXPECT_EQ(row[4], gib(e.DeviceTotal(), 1));
  EXPECT_EQ(row[5], gib(e.HostTotal(), 2));
  EXPECT_EQ(row[6], gib(e.HostTotal() * 8, 1));
  EXPECT_EQ(row[7], gib(e.NvmeBounceBytes(), 2));
  EXPECT_EQ(row[8], gib(e.NvmeTotal(), 2));
  EXPECT_EQ(row[9], gib(e.NvmeTotal() * 8, 1));
  EXPECT_GT(e.NvmeBounceBytes(), 0);
  EXPECT_EQ(e.Host(MemoryCategory::kOptimizer), 0);
  // 80 GiB GPUs, 512 GiB of host memory per node: host-memory offload needs more (773.8 GiB per node).
  const size_t at = r.out.find("  stage 3 + optimizer offload: device ");
  ASSERT_NE(at, std::string::npos);
  const std::string line = r.out.substr(at, r.out.find('\n', at) - at);
  EXPECT_NE(line.find("host 96.73 GiB per rank: does not fit (host"), std::string::npos) << line;
  EXPECT_NE(r.out.find("choice: stage 3 + optimizer offload to NVMe\n"), std::string::npos);
  // Without --nvme the table is as before: no tier rows, no NVMe columns.
  const CliRun plain = RunCli("--preset llama2-70b --world 8 --unit GiB");
  EXPECT_EQ(plain.out.find("NVMe"), std::string::npos) << plain.out;
}

// The rows of the table printed after "device " (the --table header), keyed by their first column.
std::vector<std::vector<std::string>> TableRows(const std::string& out) {
  std::vector<std::vector<std::string>> rows;
  const size_t at = out.find("\ndevice ");
  if (at == std::string::npos) return rows;
  std::istringstream is(out.substr(at + 1));
  std::string line;
  std::getline(is, line);  // the header
  while (std::getline(is, line) && !line.empty()) {
    std::istringstream cols(line);
    std::vector<std::string> v;
    for (std::string c; cols >> c;) v.push_back(c);
    rows.push_back(v);
  }
  return rows;
}

TEST(EstimateCliTest, ActivationsAndTheirReserve) {
  const CliRun r = RunCli("--preset smollm2-135m --seq 512 --micro-batch 4 --world 2 --device-memory 4GiB");
  SCOPED_TRACE(r.out);
  ASSERT_EQ(r.exit_code, 0);
  const TransformerShape t{30, 576, 9, 3, 1536, 49152, true, false};
  ActivationOptions a;
  a.micro_batch = 4;
  a.seq_len = 512;
  a.dtype = DType::kBF16;  // --compute-dtype follows --param-dtype
  ActivationEstimate e;
  ASSERT_TRUE(EstimateActivations(t, a, &e).ok());
  char peak[64];
  std::snprintf(peak, sizeof(peak), "%.2f MiB", static_cast<double>(e.peak) / (1 << 20));
  EXPECT_NE(r.out.find("activations of one micro-batch of 4 x 512 tokens, bf16, stored"), std::string::npos);
  EXPECT_NE(r.out.find(peak), std::string::npos) << peak;
  EXPECT_NE(r.out.find("with --recompute: peak"), std::string::npos);
  // Stage::kAuto keeps them free: the same choice, and explanation, as the library with Options::activation_model.
  EXPECT_NE(r.out.find("of which the activation estimate"), std::string::npos);
  ModelDescription m;
  ASSERT_TRUE(TransformerSpecs(t, &m.specs).ok());
  Options o;
  o.param_dtype = DType::kBF16;
  o.backend = Backend::kCuda;
  o.reserved_bytes = 0;
  o.activation_model = t;
  o.activation_options = a;
  AutoChoice choice;
  ASSERT_TRUE(ChooseConfiguration(m, 2, o, int64_t{4} << 30, &choice).ok());
  ASSERT_GE(choice.chosen, 0);
  EXPECT_EQ(choice.activation_bytes, e.peak);
  EXPECT_NE(r.out.find(choice.Explain()), std::string::npos) << choice.Explain();
  const AutoCandidate& c = choice.candidates[static_cast<size_t>(choice.chosen)];
  EXPECT_NE(r.out.find("choice: " + ConfigurationName(c.stage, c.offload_optimizer, c.offload_params) + "\n"),
            std::string::npos);
}

TEST(EstimateCliTest, TheWholeAnswerAndItsTable) {
  const std::string model = "--preset llama2-7b --lora-rank 16 --seq 2048 --global-batch 32";
  TransformerShape t{32, 4096, 32, 32, 11008, 32000, false, false};
  t.lora_rank = 16;
  TrainingRequest req;
  req.shape = t;
  req.activations.seq_len = 2048;
  req.global_batch = 32;
  req.options.param_dtype = DType::kBF16;
  req.options.backend = Backend::kCuda;
  req.options.reserved_bytes = 0;
  auto answer = [&](int64_t device) {
    req.device_bytes = device;
    TrainingPlan plan;
    EXPECT_TRUE(PlanTraining(req, &plan).ok());
    return plan;
  };
  // One device size: the plan, then one answer line.
  CliRun r = RunCli(model + " --device-memory 24GiB");
  SCOPED_TRACE(r.out);
  ASSERT_EQ(r.exit_code, 0);
  const TrainingPlan plan = answer(int64_t{24} << 30);
  ASSERT_GE(plan.chosen, 0);
  const TrainingCandidate& c = plan.candidates[static_cast<size_t>(plan.chosen)];
  const std::string line = "answer: " + ConfigurationName(c.stage, c.offload_optimizer, c.offload_params) +
                           ", micro-batch " + std::to_string(c.micro_batch) +
                           (c.recompute ? ", recompute, " : ", no recompute, ") + std::to_string(c.accumulation_steps);
  EXPECT_NE(r.out.find(line), std::string::npos) << line;
  EXPECT_NE(r.out.find(plan.Explain()), std::string::npos);
  // The table: one row per device size, each the library's plan for it.
  r = RunCli(model + " --table");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  const std::vector<std::vector<std::string>> rows = TableRows(r.out);
  ASSERT_EQ(rows.size(), 8u) << r.out;
  const int sizes[8] = {8, 12, 16, 24, 40, 48, 80, 141};
  for (size_t i = 0; i < rows.size(); ++i) {
    SCOPED_TRACE(std::to_string(sizes[i]) + " GiB");
    ASSERT_GE(rows[i].size(), 2u);
    EXPECT_EQ(rows[i][0], std::to_string(sizes[i]));
    const TrainingPlan p = answer(int64_t{sizes[i]} << 30);
    if (p.chosen < 0) {
      EXPECT_NE(r.out.find(std::to_string(sizes[i]) + " GiB  nothing fits"), std::string::npos);
      continue;
    }
    const TrainingCandidate& pc = p.candidates[static_cast<size_t>(p.chosen)];
    // "8 GiB stage 3 + parameter offload 2 yes 16 5.55 6.84": the last five columns.
    ASSERT_GE(rows[i].size(), 7u);
    const size_t n = rows[i].size();
    EXPECT_EQ(rows[i][n - 5], std::to_string(pc.micro_batch));
    EXPECT_EQ(rows[i][n - 4], pc.recompute ? "yes" : "no");
    EXPECT_EQ(rows[i][n - 3], std::to_string(pc.accumulation_steps));
    char act[32];
    std::snprintf(act, sizeof(act), "%.2f", static_cast<double>(pc.activation_bytes) / 1e9);
    EXPECT_EQ(rows[i][n - 2], act);
  }
  // More memory never needs more accumulation steps without recomputation, and the largest devices store
  // activations: the table reads like the guides'.
  EXPECT_EQ(rows.back()[rows.back().size() - 4], "no");
}

TEST(EstimateCliTest, WholeAnswerArguments) {
  CliRun r = RunCli("--preset llama2-7b --seq 2048 --global-batch 30 --world 8 --device-memory 80GiB");
  EXPECT_EQ(r.exit_code, 2) << r.out;
  EXPECT_NE(r.out.find("must be a positive multiple of world_size (8)"), std::string::npos) << r.out;
  r = RunCli("--preset llama2-7b --global-batch 32 --device-memory 80GiB");
  EXPECT_EQ(r.exit_code, 2) << r.out;
  EXPECT_NE(r.out.find("need --seq"), std::string::npos) << r.out;
  r = RunCli("--params 7B --seq 2048");
  EXPECT_EQ(r.exit_code, 2) << r.out;
  EXPECT_NE(r.out.find("need the model's shape"), std::string::npos) << r.out;
  r = RunCli("--preset llama-9000");
  EXPECT_EQ(r.exit_code, 2) << r.out;
  EXPECT_NE(r.out.find("unknown --preset 'llama-9000'"), std::string::npos) << r.out;
  r = RunCli("--preset llama2-7b --lora-rank 8 --lora-targets q,x");
  EXPECT_EQ(r.exit_code, 2) << r.out;
  EXPECT_NE(r.out.find("unknown projection 'x'"), std::string::npos) << r.out;
  // Nothing fits: exit status 1, and the answer says so.
  r = RunCli("--preset llama2-70b --seq 4096 --global-batch 8 --device-memory 8GiB");
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("answer: nothing fits"), std::string::npos) << r.out;
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
