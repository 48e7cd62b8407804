// Corpus loading (fortunes files, the bible-kjv program, synthetic), split, cached token files, batch sampler.
#include "examples/lora_finetune/data.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

namespace lora {
namespace {

using zero::Status;

// Bump when the document or file format changes, so cached files are rebuilt.
constexpr const char* kFormatVersion = "lora-data-1";

uint64_t SplitMix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

class Fnv1a {
 public:
  void Add(std::string_view s) {
    for (unsigned char c : s) {
      h_ ^= c;
      h_ *= 0x100000001B3ull;
    }
  }
  void AddSized(std::string_view s) {  // length-prefixed, so document boundaries count
    Add(std::to_string(s.size()));
    Add(":");
    Add(s);
  }
  uint64_t value() const { return h_; }

 private:
  uint64_t h_ = 0xCBF29CE484222325ull;
};

std::string_view TrimNewlines(std::string_view s) {
  while (!s.empty() && (s.front() == '\n' || s.front() == '\r')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ' || s.back() == '\t')) {
    s.remove_suffix(1);
  }
  return s;
}

Status ReadFile(const std::string& path, std::string* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::IoError(path + ": cannot open: " + std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return Status::IoError(path + ": read failed");
  *out = ss.str();
  return Status::Ok();
}

Status WriteFileAtomic(const std::string& path, std::string_view data) {
  std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return Status::IoError(tmp + ": cannot create: " + std::strerror(errno));
    out.write(data.data(), static_cast<std::streamsize>(data.size()));
    out.flush();
    if (!out) return Status::IoError(tmp + ": write failed");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    return Status::IoError(tmp + ": cannot rename to " + path + ": " + std::strerror(errno));
  }
  return Status::Ok();
}

// ---- fortunes ----

Status LoadFortunes(const CorpusOptions& options, std::vector<std::string>* documents) {
  const std::string install = "install the Debian package: apt-get install -y fortunes";
  namespace fs = std::filesystem;
  std::error_code ec;
  std::vector<std::string> files;
  for (const auto& entry : fs::directory_iterator(options.fortunes_dir, ec)) {
    std::string name = entry.path().filename().string();
    // Skip the strfile indexes (.dat), the UTF-8 aliases (.u8) and subdirectories (off/).
    if (name.ends_with(".dat") || name.ends_with(".u8") || name.find('.') != std::string::npos) continue;
    if (!entry.is_regular_file(ec) || entry.is_symlink(ec)) continue;
    files.push_back(entry.path().string());
  }
  if (ec || files.empty()) {
    return Status::Unavailable("fortunes corpus: no fortune files in " + options.fortunes_dir +
                               (ec ? " (" + ec.message() + ")" : std::string()) + "; " + install);
  }
  std::sort(files.begin(), files.end());
  documents->clear();
  for (const std::string& path : files) {
    std::string text;
    ZERO_RETURN_IF_ERROR(ReadFile(path, &text));
    // Fortunes are separated by lines holding only '%'.
    std::string current;
    size_t pos = 0;
    while (pos < text.size()) {
      size_t eol = text.find('\n', pos);
      if (eol == std::string::npos) eol = text.size();
      std::string_view line(text.data() + pos, eol - pos);
      if (line == "%") {
        if (!TrimNewlines(current).empty()) documents->emplace_back(TrimNewlines(current));
        current.clear();
      } else {
        current.append(line);
        current.push_back('\n');
      }
      pos = eol + 1;
    }
    if (!TrimNewlines(current).empty()) documents->emplace_back(TrimNewlines(current));
  }
  return Status::Ok();
}

// ---- bible-kjv ----

// Runs argv (no shell) and captures its standard output. *exit_code is 127 when the program cannot be executed.
Status RunAndCapture(const std::vector<std::string>& argv, std::string* out, int* exit_code) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) return Status::IoError(std::string("pipe failed: ") + std::strerror(errno));
  pid_t pid = ::fork();
  if (pid < 0) {
    ::close(fds[0]);
    ::close(fds[1]);
    return Status::IoError(std::string("fork failed: ") + std::strerror(errno));
  }
  if (pid == 0) {
    ::dup2(fds[1], STDOUT_FILENO);
    int devnull = ::open("/dev/null", O_RDWR);
    if (devnull >= 0) {
      ::dup2(devnull, STDIN_FILENO);
      ::dup2(devnull, STDERR_FILENO);
    }
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execvp(args[0], args.data());
    ::_exit(127);
  }
  ::close(fds[1]);
  out->clear();
  char buf[1 << 16];
  while (true) {
    ssize_t n = ::read(fds[0], buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    out->append(buf, static_cast<size_t>(n));
  }
  ::close(fds[0]);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  *exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return Status::Ok();
}

// `bible` prints "\nGenesis 1\n\n  1 In the beginning ...\n  2 ...\n\nGenesis 2\n\n...": a chapter heading is a
// non-indented line with a blank line before and after it (wrapped verse text is not indented but is never
// surrounded by blank lines). One document per chapter, heading included.
Status LoadBible(const CorpusOptions& options, std::vector<std::string>* documents) {
  const std::string install = "install the Debian package: apt-get install -y bible-kjv";
  std::vector<std::string> argv = {options.bible_program, "-p", options.bible_data_dir, "gen1:1-rev22:21"};
  std::string cmd = options.bible_program + " -p " + options.bible_data_dir + " gen1:1-rev22:21";
  std::string text;
  int code = 0;
  ZERO_RETURN_IF_ERROR(RunAndCapture(argv, &text, &code));
  if (code == 127) {
    return Status::Unavailable("bible corpus: cannot run '" + options.bible_program + "'; " + install);
  }
  if (code != 0) {
    return Status::Unavailable("bible corpus: '" + cmd + "' exited with " + std::to_string(code) + " (is the text in " +
                               options.bible_data_dir + "/bible.data?); " + install);
  }
  std::vector<std::string_view> lines;
  for (size_t pos = 0; pos < text.size();) {
    size_t eol = text.find('\n', pos);
    if (eol == std::string::npos) eol = text.size();
    lines.emplace_back(text.data() + pos, eol - pos);
    pos = eol + 1;
  }
  documents->clear();
  std::string current;
  for (size_t i = 0; i < lines.size(); ++i) {
    bool heading = !lines[i].empty() && lines[i][0] != ' ' && (i == 0 || lines[i - 1].empty()) &&
                   i + 1 < lines.size() && lines[i + 1].empty();
    if (heading && !TrimNewlines(current).empty()) {
      documents->emplace_back(TrimNewlines(current));
      current.clear();
    }
    current.append(lines[i]);
    current.push_back('\n');
  }
  if (!TrimNewlines(current).empty()) documents->emplace_back(TrimNewlines(current));
  constexpr size_t kChapters = 1189;
  if (documents->size() != kChapters) {
    std::string first(text.substr(0, std::min<size_t>(text.size(), 80)));
    return Status::Unavailable("bible corpus: '" + cmd + "' gave " + std::to_string(documents->size()) +
                               " chapters, expected " + std::to_string(kChapters) + " (output starts: \"" + first +
                               "\"); " + install);
  }
  return Status::Ok();
}

// ---- synthetic ----

void LoadSynthetic(const CorpusOptions& options, std::vector<std::string>* documents) {
  static const char* kSubjects[] = {"the cat", "a dog", "the old man", "my friend", "the river", "a small bird"};
  static const char* kVerbs[] = {"sees", "likes", "follows", "finds", "carries", "remembers"};
  static const char* kObjects[] = {"the moon", "a red ball", "the long road", "bread", "the quiet house", "water"};
  documents->clear();
  uint64_t state = options.synthetic_seed;
  auto next = [&](uint64_t n) {
    state = SplitMix64(state);
    return state % n;
  };
  for (int d = 0; d < options.synthetic_documents; ++d) {
    std::string doc;
    int sentences = 1 + static_cast<int>(next(3));
    for (int s = 0; s < sentences; ++s) {
      std::string sentence = std::string(kSubjects[next(6)]) + " " + kVerbs[next(6)] + " " + kObjects[next(6)] + ".";
      sentence[0] = static_cast<char>(sentence[0] - 'a' + 'A');
      doc += (s ? " " : "") + sentence;
    }
    documents->push_back(std::move(doc));
  }
}

uint64_t ContentHash(Corpus corpus, const std::vector<std::string>& documents, int validation_every) {
  Fnv1a h;
  h.AddSized(kFormatVersion);
  h.AddSized(CorpusName(corpus));
  h.AddSized(std::to_string(validation_every));
  for (const std::string& d : documents) h.AddSized(d);
  return h.value();
}

std::map<std::string, std::string> ParseMeta(const std::string& text) {
  std::map<std::string, std::string> kv;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    size_t eq = line.find('=');
    if (eq != std::string::npos) kv[line.substr(0, eq)] = line.substr(eq + 1);
  }
  return kv;
}

int64_t FileSize(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 ? static_cast<int64_t>(st.st_size) : -1;
}

// A bijection on [0, n) keyed by `key`: a 4-round Feistel network on the smallest even number of bits covering n,
// cycle-walking values that land outside [0, n) (at most 4x the domain, so ~2 steps expected).
int64_t Permute(int64_t index, int64_t n, uint64_t key) {
  int bits = 2;
  while ((int64_t{1} << bits) < n) bits += 2;
  const int half = bits / 2;
  const uint64_t mask = (uint64_t{1} << half) - 1;
  uint64_t x = static_cast<uint64_t>(index);
  do {
    uint64_t left = x >> half, right = x & mask;
    for (uint64_t round = 0; round < 4; ++round) {
      uint64_t f = SplitMix64(key ^ SplitMix64(round * 0x1000193ull + right)) & mask;
      uint64_t next_right = left ^ f;
      left = right;
      right = next_right;
    }
    x = (left << half) | right;
  } while (x >= static_cast<uint64_t>(n));
  return static_cast<int64_t>(x);
}

}  // namespace

const char* CorpusName(Corpus corpus) {
  switch (corpus) {
    case Corpus::kSynthetic:
      return "synthetic";
    case Corpus::kFortunes:
      return "fortunes";
    case Corpus::kBible:
      return "bible";
  }
  return "?";
}

Status LoadDocuments(Corpus corpus, const CorpusOptions& options, std::vector<std::string>* documents) {
  switch (corpus) {
    case Corpus::kFortunes:
      return LoadFortunes(options, documents);
    case Corpus::kBible:
      return LoadBible(options, documents);
    case Corpus::kSynthetic:
      LoadSynthetic(options, documents);
      return Status::Ok();
  }
  return Status::InvalidArgument("unknown corpus");
}

Split SplitDocuments(const std::vector<std::string>& documents, int validation_every) {
  Split split;
  for (size_t i = 0; i < documents.size(); ++i) {
    bool validation = static_cast<int64_t>(i % validation_every) == validation_every - 1;
    std::vector<uint8_t>& out = validation ? split.validation : split.train;
    out.insert(out.end(), documents[i].begin(), documents[i].end());
    out.push_back('\n');
    out.push_back('\n');
    ++(validation ? split.validation_documents : split.train_documents);
  }
  return split;
}

Status PrepareCorpus(Corpus corpus, const std::string& data_dir, const CorpusOptions& options,
                     PreparedCorpus* prepared) {
  if (options.validation_every < 2) {
    return Status::InvalidArgument("PrepareCorpus: validation_every must be >= 2, got " +
                                   std::to_string(options.validation_every));
  }
  std::vector<std::string> documents;
  ZERO_RETURN_IF_ERROR(LoadDocuments(corpus, options, &documents));
  const std::string base = data_dir + "/" + CorpusName(corpus);
  PreparedCorpus out;
  out.train_path = base + ".train.u8";
  out.validation_path = base + ".val.u8";
  out.content_hash = ContentHash(corpus, documents, options.validation_every);
  const std::string meta_path = base + ".meta";
  char hash_hex[17];
  std::snprintf(hash_hex, sizeof(hash_hex), "%016llx", static_cast<unsigned long long>(out.content_hash));

  std::string meta_text;
  if (ReadFile(meta_path, &meta_text).ok()) {
    auto kv = ParseMeta(meta_text);
    if (kv["hash"] == hash_hex) {
      out.train_tokens = std::atoll(kv["train_tokens"].c_str());
      out.validation_tokens = std::atoll(kv["validation_tokens"].c_str());
      out.train_documents = std::atoll(kv["train_documents"].c_str());
      out.validation_documents = std::atoll(kv["validation_documents"].c_str());
      if (FileSize(out.train_path) == out.train_tokens && FileSize(out.validation_path) == out.validation_tokens) {
        out.reused = true;
        *prepared = out;
        return Status::Ok();
      }
    }
  }

  std::error_code ec;
  std::filesystem::create_directories(data_dir, ec);
  if (ec) return Status::IoError(data_dir + ": cannot create directory: " + ec.message());
  Split split = SplitDocuments(documents, options.validation_every);
  out.train_tokens = static_cast<int64_t>(split.train.size());
  out.validation_tokens = static_cast<int64_t>(split.validation.size());
  out.train_documents = split.train_documents;
  out.validation_documents = split.validation_documents;
  auto view = [](const std::vector<uint8_t>& v) {
    return std::string_view(reinterpret_cast<const char*>(v.data()), v.size());
  };
  // Token files first, the meta (the cache key) last: an interrupted run is redone.
  ZERO_RETURN_IF_ERROR(WriteFileAtomic(out.train_path, view(split.train)));
  ZERO_RETURN_IF_ERROR(WriteFileAtomic(out.validation_path, view(split.validation)));
  std::string meta = std::string("format=") + kFormatVersion + "\ncorpus=" + CorpusName(corpus) + "\nhash=" + hash_hex +
                     "\nvalidation_every=" + std::to_string(options.validation_every) +
                     "\ntrain_tokens=" + std::to_string(out.train_tokens) +
                     "\nvalidation_tokens=" + std::to_string(out.validation_tokens) +
                     "\ntrain_documents=" + std::to_string(out.train_documents) +
                     "\nvalidation_documents=" + std::to_string(out.validation_documents) + "\n";
  ZERO_RETURN_IF_ERROR(WriteFileAtomic(meta_path, meta));
  *prepared = out;
  return Status::Ok();
}

Status ReadTokens(const std::string& path, std::vector<uint8_t>* tokens) {
  std::string text;
  ZERO_RETURN_IF_ERROR(ReadFile(path, &text));
  tokens->assign(text.begin(), text.end());
  return Status::Ok();
}

Status BatchSampler::Create(std::span<const uint8_t> tokens, const SamplerOptions& options, BatchSampler* sampler) {
  ZERO_RETURN_IF_ERROR(CreateFor(static_cast<int64_t>(tokens.size()), options, sampler));
  sampler->tokens_ = tokens;
  sampler->tokens32_ = {};
  return Status::Ok();
}

Status BatchSampler::Create(std::span<const int32_t> tokens, const SamplerOptions& options, BatchSampler* sampler) {
  ZERO_RETURN_IF_ERROR(CreateFor(static_cast<int64_t>(tokens.size()), options, sampler));
  sampler->tokens_ = {};
  sampler->tokens32_ = tokens;
  return Status::Ok();
}

Status BatchSampler::CreateFor(int64_t n, const SamplerOptions& options, BatchSampler* sampler) {
  if (options.batch < 1 || options.seq_len < 1 || options.world < 1 || options.rank < 0 ||
      options.rank >= options.world) {
    return Status::InvalidArgument("BatchSampler: need batch >= 1, seq_len >= 1, 0 <= rank < world; got batch " +
                                   std::to_string(options.batch) + ", seq_len " + std::to_string(options.seq_len) +
                                   ", rank " + std::to_string(options.rank) + ", world " +
                                   std::to_string(options.world));
  }
  // Windows of seq_len + 1 tokens at offset + w * seq_len with offset < seq_len: (n - seq_len) / seq_len fit.
  const int64_t windows = n > options.seq_len ? (n - options.seq_len) / options.seq_len : 0;
  const int64_t global = options.batch * options.world;
  if (windows < global) {
    return Status::InvalidArgument("BatchSampler: " + std::to_string(n) + " tokens hold " + std::to_string(windows) +
                                   " windows of " + std::to_string(options.seq_len) +
                                   "+1 tokens, fewer than the global batch of " + std::to_string(global) + " (batch " +
                                   std::to_string(options.batch) + " x world " + std::to_string(options.world) +
                                   "); use a shorter seq_len or smaller batch");
  }
  sampler->options_ = options;
  sampler->windows_ = windows;
  return Status::Ok();
}

int64_t BatchSampler::WindowStart(int64_t step, int64_t global_row) const {
  const int64_t k = step * options_.batch * options_.world + global_row;
  const int64_t epoch = k / windows_;
  const uint64_t key = SplitMix64(options_.seed ^ SplitMix64(static_cast<uint64_t>(epoch)));
  const int64_t offset = static_cast<int64_t>(SplitMix64(key) % static_cast<uint64_t>(options_.seq_len));
  return offset + Permute(k % windows_, windows_, key) * options_.seq_len;
}

void BatchSampler::Sample(int64_t step, int32_t* inputs, int32_t* targets) const {
  const int64_t seq = options_.seq_len;
  for (int64_t i = 0; i < options_.batch; ++i) {
    const int64_t start = WindowStart(step, options_.rank * options_.batch + i);
    for (int64_t j = 0; j < seq; ++j) {
      inputs[i * seq + j] = tokens32_.empty() ? tokens_[start + j] : tokens32_[start + j];
      targets[i * seq + j] = tokens32_.empty() ? tokens_[start + j + 1] : tokens32_[start + j + 1];
    }
  }
}

}  // namespace lora
