// Corpora and batch sampler of the LoRA example (examples/lora_finetune/data.h): split and cache of the
// synthetic corpus, sampler determinism and rank-disjointness, and the Debian corpora when their packages are
// installed (scripts/deps.sh installs them).
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <set>

#include "examples/lora_finetune/data.h"

namespace lora {
namespace {

std::string TempDir(const std::string& name) {
  const char* dir = std::getenv("TMPDIR");
  std::string path = std::string(dir ? dir : "/tmp") + "/lora_data_test_" + std::to_string(::getpid()) + "_" + name;
  std::filesystem::remove_all(path);
  return path;
}

int64_t MtimeNs(const std::string& path) {
  struct stat st;
  EXPECT_EQ(::stat(path.c_str(), &st), 0) << path;
  return static_cast<int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec;
}

TEST(LoraData, SyntheticCorpusIsDeterministicAndSplitsEveryTwentiethDocument) {
  CorpusOptions options;
  std::vector<std::string> a, b;
  ASSERT_TRUE(LoadDocuments(Corpus::kSynthetic, options, &a).ok());
  ASSERT_TRUE(LoadDocuments(Corpus::kSynthetic, options, &b).ok());
  ASSERT_EQ(a.size(), 400u);
  EXPECT_EQ(a, b);
  options.synthetic_seed = 2;
  ASSERT_TRUE(LoadDocuments(Corpus::kSynthetic, options, &b).ok());
  EXPECT_NE(a, b);

  Split split = SplitDocuments(a, 20);
  EXPECT_EQ(split.train_documents, 380);
  EXPECT_EQ(split.validation_documents, 20);
  size_t bytes = 0;
  for (const std::string& d : a) bytes += d.size() + 2;
  EXPECT_EQ(split.train.size() + split.validation.size(), bytes);
  // Validation starts with document 19, each document followed by a blank line.
  std::string first_val(split.validation.begin(), split.validation.begin() + a[19].size() + 2);
  EXPECT_EQ(first_val, a[19] + "\n\n");
  std::string first_train(split.train.begin(), split.train.begin() + a[0].size() + 2);
  EXPECT_EQ(first_train, a[0] + "\n\n");
}

TEST(LoraData, PrepareWritesOnceAndReusesByContentHash) {
  const std::string dir = TempDir("prepare");
  CorpusOptions options;
  PreparedCorpus first, second, third;
  ASSERT_TRUE(PrepareCorpus(Corpus::kSynthetic, dir, options, &first).ok());
  EXPECT_FALSE(first.reused);
  EXPECT_EQ(first.train_documents, 380);
  EXPECT_EQ(first.validation_documents, 20);
  std::vector<uint8_t> train, val;
  ASSERT_TRUE(ReadTokens(first.train_path, &train).ok());
  ASSERT_TRUE(ReadTokens(first.validation_path, &val).ok());
  std::vector<std::string> docs;
  ASSERT_TRUE(LoadDocuments(Corpus::kSynthetic, options, &docs).ok());
  Split split = SplitDocuments(docs, 20);
  EXPECT_EQ(train, split.train);
  EXPECT_EQ(val, split.validation);
  EXPECT_EQ(first.train_tokens, static_cast<int64_t>(train.size()));

  const int64_t mtime = MtimeNs(first.train_path);
  ASSERT_TRUE(PrepareCorpus(Corpus::kSynthetic, dir, options, &second).ok());
  EXPECT_TRUE(second.reused);
  EXPECT_EQ(second.content_hash, first.content_hash);
  EXPECT_EQ(second.train_tokens, first.train_tokens);
  EXPECT_EQ(second.validation_documents, first.validation_documents);
  EXPECT_EQ(MtimeNs(first.train_path), mtime);

  options.validation_every = 10;  // other inputs: rebuilt
  ASSERT_TRUE(PrepareCorpus(Corpus::kSynthetic, dir, options, &third).ok());
  EXPECT_FALSE(third.reused);
  EXPECT_NE(third.content_hash, first.content_hash);
  EXPECT_EQ(third.validation_documents, 40);

  options.validation_every = 1;
  EXPECT_EQ(PrepareCorpus(Corpus::kSynthetic, dir, options, &third).code(), zero::StatusCode::kInvalidArgument);
  std::filesystem::remove_all(dir);
}

std::vector<uint8_t> SyntheticTokens() {
  std::vector<std::string> docs;
  EXPECT_TRUE(LoadDocuments(Corpus::kSynthetic, CorpusOptions(), &docs).ok());
  return SplitDocuments(docs, 20).train;
}

TEST(LoraData, SamplerIsDeterministicAndTargetsAreShiftedByOne) {
  std::vector<uint8_t> tokens = SyntheticTokens();
  SamplerOptions options{.batch = 3, .seq_len = 32, .seed = 7, .rank = 0, .world = 1};
  BatchSampler a, b;
  ASSERT_TRUE(BatchSampler::Create(tokens, options, &a).ok());
  ASSERT_TRUE(BatchSampler::Create(tokens, options, &b).ok());
  std::vector<int32_t> in_a(3 * 32), tg_a(3 * 32), in_b(3 * 32), tg_b(3 * 32);
  for (int64_t step : {0, 1, 5, 1000}) {
    a.Sample(step, in_a.data(), tg_a.data());
    b.Sample(step, in_b.data(), tg_b.data());
    EXPECT_EQ(in_a, in_b);
    EXPECT_EQ(tg_a, tg_b);
    for (int64_t i = 0; i < 3; ++i) {
      int64_t start = a.WindowStart(step, i);
      for (int64_t j = 0; j < 32; ++j) {
        EXPECT_EQ(in_a[i * 32 + j], tokens[start + j]);
        EXPECT_EQ(tg_a[i * 32 + j], tokens[start + j + 1]);
        EXPECT_GE(in_a[i * 32 + j], 0);
        EXPECT_LT(in_a[i * 32 + j], kVocabSize);
      }
    }
  }
  a.Sample(0, in_a.data(), tg_a.data());
  a.Sample(1, in_b.data(), tg_b.data());
  EXPECT_NE(in_a, in_b);
  options.seed = 8;
  ASSERT_TRUE(BatchSampler::Create(tokens, options, &b).ok());
  b.Sample(0, in_b.data(), tg_b.data());
  EXPECT_NE(in_a, in_b);
}

// Ranks of a world of 3 with batch 2 take disjoint slices that together are the world-1 batch of 6.
// Token ids (a BPE vocabulary, beyond 255) sample the same windows as bytes of the same length: the stream's
// values are copied through unchanged.
TEST(LoraData, SamplerOverTokenIds) {
  const std::vector<uint8_t> bytes = SyntheticTokens();
  std::vector<int32_t> ids(bytes.size());
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>(bytes[i]) * 193 + 40000;  // up to ~89k
  const SamplerOptions options{.batch = 2, .seq_len = 16, .seed = 3, .rank = 1, .world = 2};
  BatchSampler from_bytes, from_ids;
  ASSERT_TRUE(BatchSampler::Create(bytes, options, &from_bytes).ok());
  ASSERT_TRUE(BatchSampler::Create(std::span<const int32_t>(ids), options, &from_ids).ok());
  std::vector<int32_t> in_b(32), tg_b(32), in_i(32), tg_i(32);
  for (int64_t step : {0, 3, 77}) {
    from_bytes.Sample(step, in_b.data(), tg_b.data());
    from_ids.Sample(step, in_i.data(), tg_i.data());
    for (size_t j = 0; j < 32; ++j) {
      EXPECT_EQ(in_i[j], in_b[j] * 193 + 40000);
      EXPECT_EQ(tg_i[j], tg_b[j] * 193 + 40000);
    }
  }
  // Too few ids for the global batch: the same error as for bytes.
  const std::vector<int32_t> few(20, 1);
  BatchSampler bad;
  EXPECT_FALSE(BatchSampler::Create(std::span<const int32_t>(few), options, &bad).ok());
}

TEST(LoraData, RanksTakeDisjointSlicesOfOneGlobalBatch) {
  std::vector<uint8_t> tokens = SyntheticTokens();
  SamplerOptions global_options{.batch = 6, .seq_len = 16, .seed = 3, .rank = 0, .world = 1};
  BatchSampler global;
  ASSERT_TRUE(BatchSampler::Create(tokens, global_options, &global).ok());
  for (int64_t step = 0; step < 50; ++step) {
    std::vector<int32_t> g_in(6 * 16), g_tg(6 * 16);
    global.Sample(step, g_in.data(), g_tg.data());
    std::set<int64_t> starts;
    for (int rank = 0; rank < 3; ++rank) {
      SamplerOptions options = global_options;
      options.batch = 2;
      options.rank = rank;
      options.world = 3;
      BatchSampler local;
      ASSERT_TRUE(BatchSampler::Create(tokens, options, &local).ok());
      std::vector<int32_t> in(2 * 16), tg(2 * 16);
      local.Sample(step, in.data(), tg.data());
      EXPECT_TRUE(std::equal(in.begin(), in.end(), g_in.begin() + rank * 2 * 16)) << "step " << step;
      EXPECT_TRUE(std::equal(tg.begin(), tg.end(), g_tg.begin() + rank * 2 * 16)) << "step " << step;
      for (int64_t i = 0; i < 2; ++i) starts.insert(local.WindowStart(step, rank * 2 + i));
    }
    EXPECT_EQ(starts.size(), 6u) << "windows repeat within step " << step;
  }
}

// One epoch visits every window exactly once; windows never overlap.
TEST(LoraData, AnEpochIsAPermutationOfNonOverlappingWindows) {
  std::vector<uint8_t> tokens = SyntheticTokens();
  BatchSampler sampler;
  ASSERT_TRUE(BatchSampler::Create(tokens, {.batch = 1, .seq_len = 50, .seed = 11}, &sampler).ok());
  const int64_t windows = sampler.windows();
  ASSERT_GT(windows, 100);
  for (int64_t epoch = 0; epoch < 2; ++epoch) {
    std::set<int64_t> starts;
    for (int64_t w = 0; w < windows; ++w) {
      int64_t start = sampler.WindowStart(epoch * windows + w, 0);
      EXPECT_LE(start + 51, static_cast<int64_t>(tokens.size()));
      starts.insert(start);
    }
    ASSERT_EQ(static_cast<int64_t>(starts.size()), windows);
    EXPECT_LT(*starts.begin(), 50);
    for (int64_t s : starts) EXPECT_EQ((s - *starts.begin()) % 50, 0);
  }
}

TEST(LoraData, SamplerRejectsBadOptions) {
  std::vector<uint8_t> tokens(100, 'a');
  BatchSampler sampler;
  zero::Status s = BatchSampler::Create(tokens, {.batch = 4, .seq_len = 30, .world = 1}, &sampler);
  EXPECT_NE(s.message().find("fewer than the global batch of 4"), std::string::npos) << s.ToString();
  s = BatchSampler::Create(tokens, {.batch = 1, .seq_len = 8, .rank = 2, .world = 2}, &sampler);
  EXPECT_EQ(s.code(), zero::StatusCode::kInvalidArgument);
}

TEST(LoraData, MissingPackagesNameTheInstallCommand) {
  CorpusOptions options;
  options.fortunes_dir = "/nonexistent/fortunes";
  options.bible_program = "/nonexistent/bible";
  std::vector<std::string> docs;
  zero::Status s = LoadDocuments(Corpus::kFortunes, options, &docs);
  EXPECT_NE(s.message().find("apt-get install -y fortunes"), std::string::npos) << s.ToString();
  s = LoadDocuments(Corpus::kBible, options, &docs);
  EXPECT_NE(s.message().find("apt-get install -y bible-kjv"), std::string::npos) << s.ToString();
}

// The Debian corpora: scripts/deps.sh installs them before any test runs, so their absence is a failure.
TEST(LoraDataDebian, FortunesCorpus) {
  CorpusOptions options;
  ASSERT_TRUE(std::filesystem::exists(options.fortunes_dir + "/fortunes"))
      << "fortunes not installed: apt-get install -y fortunes (scripts/deps.sh)";
  std::vector<std::string> docs;
  zero::Status s = LoadDocuments(Corpus::kFortunes, options, &docs);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_GT(docs.size(), 1000u);
  for (const std::string& d : docs) {
    ASSERT_FALSE(d.empty());
    ASSERT_EQ(d.find("\n%\n"), std::string::npos);
    ASSERT_NE(d.front(), '\n');
    ASSERT_NE(d.back(), '\n');
  }
  const std::string dir = TempDir("fortunes");
  PreparedCorpus p;
  ASSERT_TRUE(PrepareCorpus(Corpus::kFortunes, dir, options, &p).ok());
  EXPECT_EQ(p.validation_documents, static_cast<int64_t>(docs.size() / 20));
  EXPECT_EQ(p.train_documents + p.validation_documents, static_cast<int64_t>(docs.size()));
  EXPECT_GT(p.validation_tokens, p.train_tokens / 40);  // ~5% of the bytes
  EXPECT_LT(p.validation_tokens, p.train_tokens / 10);
  std::printf("fortunes: %zu documents, train %lld bytes (%lld docs), validation %lld bytes (%lld docs)\n", docs.size(),
              static_cast<long long>(p.train_tokens), static_cast<long long>(p.train_documents),
              static_cast<long long>(p.validation_tokens), static_cast<long long>(p.validation_documents));
  std::filesystem::remove_all(dir);
}

TEST(LoraDataDebian, BibleCorpus) {
  ASSERT_TRUE(std::filesystem::exists("/usr/lib/bible.data"))
      << "bible-kjv not installed: apt-get install -y bible-kjv (scripts/deps.sh)";
  std::vector<std::string> docs;
  zero::Status s = LoadDocuments(Corpus::kBible, CorpusOptions(), &docs);
  ASSERT_TRUE(s.ok()) << s.ToString();
  ASSERT_EQ(docs.size(), 1189u);  // chapters
  EXPECT_TRUE(docs.front().starts_with("Genesis 1\n\n  1 In the beginning God created the heaven"))
      << docs.front().substr(0, 60);
  EXPECT_TRUE(docs.back().starts_with("Revelation 22\n\n  1 ")) << docs.back().substr(0, 60);
  EXPECT_TRUE(docs.back().ends_with("The grace of our Lord Jesus Christ be with you all. Amen."));
  const std::string dir = TempDir("bible");
  PreparedCorpus p;
  ASSERT_TRUE(PrepareCorpus(Corpus::kBible, dir, CorpusOptions(), &p).ok());
  EXPECT_EQ(p.validation_documents, 59);  // chapters 20, 40, ..., 1180
  EXPECT_EQ(p.train_documents, 1130);
  EXPECT_GT(p.train_tokens + p.validation_tokens, 4'000'000);
  std::printf("bible: train %lld bytes, validation %lld bytes\n", static_cast<long long>(p.train_tokens),
              static_cast<long long>(p.validation_tokens));
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace lora
