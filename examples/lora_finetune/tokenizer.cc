// Byte-level BPE (tokenizer.h): GPT-2's byte-to-unicode alphabet, rank-ordered merges, SmolLM2's pre-tokenizer.
#include "examples/lora_finetune/tokenizer.h"

#include <algorithm>
#include <climits>
#include <unordered_set>

#include "examples/lora_finetune/gguf.h"
#include "examples/lora_finetune/utf8.h"

namespace lora {
namespace {

// The code point starting at s[i] and its length in bytes; a malformed sequence is one byte standing for itself
// (as a code point >= 0x110000 so that it classifies as a letter and never as whitespace).
uint32_t NextCodePoint(std::string_view s, size_t i, size_t* len) {
  const auto b = [&](size_t k) { return static_cast<uint8_t>(s[k]); };
  const uint8_t c = b(i);
  auto cont = [&](size_t k) { return k < s.size() && (b(k) & 0xC0) == 0x80; };
  if (c < 0x80) {
    *len = 1;
    return c;
  }
  if ((c & 0xE0) == 0xC0 && c >= 0xC2 && cont(i + 1)) {
    *len = 2;
    return ((c & 0x1Fu) << 6) | (b(i + 1) & 0x3Fu);
  }
  if ((c & 0xF0) == 0xE0 && cont(i + 1) && cont(i + 2)) {
    const uint32_t cp = ((c & 0x0Fu) << 12) | ((b(i + 1) & 0x3Fu) << 6) | (b(i + 2) & 0x3Fu);
    if (cp >= 0x800 && (cp < 0xD800 || cp > 0xDFFF)) {
      *len = 3;
      return cp;
    }
  }
  if ((c & 0xF8) == 0xF0 && cont(i + 1) && cont(i + 2) && cont(i + 3)) {
    const uint32_t cp =
        ((c & 0x07u) << 18) | ((b(i + 1) & 0x3Fu) << 12) | ((b(i + 2) & 0x3Fu) << 6) | (b(i + 3) & 0x3Fu);
    if (cp >= 0x10000 && cp <= 0x10FFFF) {
      *len = 4;
      return cp;
    }
  }
  *len = 1;
  return 0x110000u + c;
}

enum class Cls { kSpace, kLetter, kNumber, kOther };

bool IsSpace(uint32_t c) {
  return c == ' ' || (c >= '\t' && c <= '\r') || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// See the limits in tokenizer.h.
Cls Classify(uint32_t c) {
  if (IsSpace(c)) return Cls::kSpace;
  if (c < 0x80) {
    if ((c | 0x20) >= 'a' && (c | 0x20) <= 'z') return Cls::kLetter;
    if (c >= '0' && c <= '9') return Cls::kNumber;
    return Cls::kOther;
  }
  if (c < 0xA0) return Cls::kOther;  // C1 controls
  // Numbers outside ASCII: superscript digits and vulgar fractions of Latin-1, Arabic-Indic and Devanagari digits,
  // super/subscript digits, number forms (fractions, Roman numerals), circled numbers, fullwidth digits.
  if (c == 0xB2 || c == 0xB3 || c == 0xB9 || (c >= 0xBC && c <= 0xBE) || (c >= 0x660 && c <= 0x669) ||
      (c >= 0x6F0 && c <= 0x6F9) || (c >= 0x966 && c <= 0x96F) || c == 0x2070 || (c >= 0x2074 && c <= 0x2079) ||
      (c >= 0x2080 && c <= 0x2089) || (c >= 0x2150 && c <= 0x2189) || (c >= 0x2460 && c <= 0x249B) ||
      (c >= 0x24EA && c <= 0x24FF) || (c >= 0x2776 && c <= 0x2793) || (c >= 0xFF10 && c <= 0xFF19)) {
    return Cls::kNumber;
  }
  if (c <= 0xBF && c != 0xAA && c != 0xB5 && c != 0xBA) return Cls::kOther;  // Latin-1 symbols (ª µ º are letters)
  if (c == 0xD7 || c == 0xF7) return Cls::kOther;                            // × ÷
  if (c >= 0x2000 && c <= 0x2BFF) return Cls::kOther;  // punctuation, super/subscripts, currency, arrows, math, ...
  if (c >= 0x3000 && c <= 0x303F) return Cls::kOther;  // CJK punctuation
  return Cls::kLetter;
}

struct Cp {
  uint32_t c;
  size_t at;  // byte offset
};

// GPT-2's pattern over one digit-free segment (see tokenizer.h); appends byte ranges.
void SplitGpt2(std::string_view text, const std::vector<Cp>& cps, size_t begin, size_t end,
               std::vector<std::string_view>* out) {
  const auto byte_at = [&](size_t k) { return k < cps.size() ? cps[k].at : text.size(); };
  const auto emit = [&](size_t a, size_t b) { out->push_back(text.substr(byte_at(a), byte_at(b) - byte_at(a))); };
  size_t i = begin;
  while (i < end) {
    const uint32_t c = cps[i].c;
    if (c == '\'' && i + 1 < end) {  // 's 't 're 've 'm 'll 'd (case-sensitive, as GPT-2's pattern)
      const uint32_t n = cps[i + 1].c;
      if (n == 's' || n == 't' || n == 'm' || n == 'd') {
        emit(i, i + 2);
        i += 2;
        continue;
      }
      if (i + 2 < end) {
        const uint32_t n2 = cps[i + 2].c;
        if ((n == 'r' && n2 == 'e') || (n == 'v' && n2 == 'e') || (n == 'l' && n2 == 'l')) {
          emit(i, i + 3);
          i += 3;
          continue;
        }
      }
    }
    size_t start = i;
    if (c == ' ' && i + 1 < end && Classify(cps[i + 1].c) != Cls::kSpace) ++i;  // " ?" before a run
    const Cls cls = Classify(cps[i].c);
    if (cls != Cls::kSpace) {
      size_t j = i + 1;
      while (j < end && Classify(cps[j].c) == cls) ++j;
      emit(start, j);
      i = j;
      continue;
    }
    // Whitespace: \s+(?!\S) leaves the last one for the next piece when a non-space follows; a lone one is \s+.
    size_t j = i + 1;
    while (j < end && Classify(cps[j].c) == Cls::kSpace) ++j;
    if (j < end && j - i > 1) --j;
    emit(i, j);
    i = j;
  }
}

// GPT-2's byte-to-unicode table: printable Latin-1 bytes stand for themselves, the rest for 256, 257, ...
void ByteSymbols(std::string (&symbols)[256]) {
  int next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    symbols[b].clear();
    AppendUtf8(printable ? static_cast<uint32_t>(b) : static_cast<uint32_t>(next++), &symbols[b]);
  }
}

// Inverse: code point -> byte, -1 where none (code points of the table are all below 324).
int SymbolByte(uint32_t cp) {
  static const std::vector<int> table = [] {
    std::vector<int> t(512, -1);
    int next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      t[static_cast<size_t>(printable ? b : next++)] = b;
    }
    return t;
  }();
  return cp < table.size() ? table[cp] : -1;
}

}  // namespace

std::vector<std::string_view> BpeTokenizer::PreTokenize(std::string_view text) {
  std::vector<Cp> cps;
  for (size_t i = 0; i < text.size();) {
    size_t len = 1;
    const uint32_t c = NextCodePoint(text, i, &len);
    cps.push_back({c, i});
    i += len;
  }
  std::vector<std::string_view> out;
  size_t seg = 0;
  for (size_t k = 0; k <= cps.size(); ++k) {
    if (k < cps.size() && Classify(cps[k].c) != Cls::kNumber) continue;
    SplitGpt2(text, cps, seg, k, &out);
    if (k < cps.size())
      out.push_back(text.substr(cps[k].at, (k + 1 < cps.size() ? cps[k + 1].at : text.size()) - cps[k].at));
    seg = k + 1;
  }
  return out;
}

zero::Status BpeTokenizer::Create(std::vector<std::string> tokens, const std::vector<std::string>& merges,
                                  std::vector<int32_t> types, int32_t bos, int32_t eos, BpeTokenizer* out) {
  BpeTokenizer t;
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n == 0 || n > INT32_MAX) return zero::Status::InvalidArgument("tokenizer: vocabulary size " + std::to_string(n));
  if (!types.empty() && static_cast<int64_t>(types.size()) != n) {
    return zero::Status::InvalidArgument("tokenizer: " + std::to_string(types.size()) + " token types for " +
                                         std::to_string(n) + " tokens");
  }
  if (types.empty()) types.assign(tokens.size(), kNormal);
  for (int32_t id : {bos, eos}) {
    if (id < -1 || id >= n)
      return zero::Status::InvalidArgument("tokenizer: bos/eos id " + std::to_string(id) + " out of range");
  }
  for (int32_t i = 0; i < n; ++i) {
    if (!t.ids_.emplace(tokens[static_cast<size_t>(i)], i).second) {
      return zero::Status::InvalidArgument("tokenizer: token '" + tokens[static_cast<size_t>(i)] + "' appears twice");
    }
    const int32_t type = types[static_cast<size_t>(i)];
    if ((type == kControl || type == kUserDefined) && !tokens[static_cast<size_t>(i)].empty()) {
      t.specials_.push_back(tokens[static_cast<size_t>(i)]);
    }
  }
  std::sort(t.specials_.begin(), t.specials_.end(),
            [](const std::string& a, const std::string& b) { return a.size() > b.size(); });
  ByteSymbols(t.byte_symbol_);
  int covered = 0;
  for (int b = 0; b < 256; ++b) {
    t.byte_id_[b] = -1;
    auto it = t.ids_.find(t.byte_symbol_[b]);
    if (it != t.ids_.end()) t.byte_id_[b] = it->second, ++covered;
  }
  // SmolLM2 lacks 21 (6 rare control characters and bytes that never occur in UTF-8); a vocabulary without most of
  // them is not byte-level.
  if (covered < 128) {
    return zero::Status::InvalidArgument(
        "tokenizer: only " + std::to_string(covered) +
        " of the 256 byte symbols are in the vocabulary (not a byte-level BPE vocabulary?)");
  }
  for (size_t r = 0; r < merges.size(); ++r) {
    const std::string& m = merges[r];
    const size_t sp = m.find(' ');
    if (sp == std::string::npos || sp == 0 || sp + 1 == m.size() || m.find(' ', sp + 1) != std::string::npos) {
      return zero::Status::InvalidArgument("tokenizer: merge " + std::to_string(r) + " '" + m +
                                           "' is not two symbols separated by one space");
    }
    if (!t.ids_.contains(m.substr(0, sp) + m.substr(sp + 1))) {
      return zero::Status::InvalidArgument("tokenizer: merge " + std::to_string(r) + " '" + m +
                                           "' makes a token that is not in the vocabulary");
    }
    t.ranks_.emplace(m, static_cast<int32_t>(r));  // a repeated merge keeps its first (lowest) rank
  }
  t.tokens_ = std::move(tokens);
  t.types_ = std::move(types);
  t.bos_ = bos;
  t.eos_ = eos;
  *out = std::move(t);
  return zero::Status::Ok();
}

BpeTokenizer BpeTokenizer::ByteLevel() {
  std::string symbols[256];
  ByteSymbols(symbols);
  BpeTokenizer t;
  const zero::Status s = Create(std::vector<std::string>(symbols, symbols + 256), {}, {}, -1, -1, &t);
  (void)s;  // 256 distinct byte symbols and no merges: Create cannot fail
  return t;
}

std::string BpeTokenizer::ByteSymbol(uint8_t b) {
  struct Table {
    std::string symbols[256];
  };
  static const Table table = [] {
    Table t;
    ByteSymbols(t.symbols);
    return t;
  }();
  return table.symbols[b];
}

std::vector<std::string> BpeTokenizer::Merges() const {
  std::vector<std::pair<int32_t, std::string>> by_rank;
  by_rank.reserve(ranks_.size());
  for (const auto& [merge, rank] : ranks_) by_rank.emplace_back(rank, merge);
  std::sort(by_rank.begin(), by_rank.end());
  std::vector<std::string> out;
  out.reserve(by_rank.size());
  for (auto& [rank, merge] : by_rank) out.push_back(std::move(merge));
  return out;
}

zero::Status BpeTokenizer::FromGguf(const GgufFile& file, BpeTokenizer* out) {
  const std::string where = "tokenizer of " + file.path();
  std::string model;
  zero::Status s = file.GetString("tokenizer.ggml.model", &model);
  if (!s.ok()) return s.WithContext(where);
  if (model != "gpt2") {
    return zero::Status::InvalidArgument(where + ": tokenizer.ggml.model is '" + model +
                                         "'; only byte-level BPE ('gpt2') is implemented");
  }
  std::vector<std::string> tokens, merges;
  std::vector<int64_t> types64;
  if (!(s = file.GetStringArray("tokenizer.ggml.tokens", &tokens)).ok()) return s.WithContext(where);
  if (!(s = file.GetStringArray("tokenizer.ggml.merges", &merges)).ok()) return s.WithContext(where);
  if (file.FindValue("tokenizer.ggml.token_type") != nullptr) {
    if (!(s = file.GetIntArray("tokenizer.ggml.token_type", &types64)).ok()) return s.WithContext(where);
  }
  int64_t bos = -1, eos = -1;
  if (file.FindValue("tokenizer.ggml.bos_token_id") != nullptr &&
      !(s = file.GetInt("tokenizer.ggml.bos_token_id", &bos)).ok()) {
    return s.WithContext(where);
  }
  if (file.FindValue("tokenizer.ggml.eos_token_id") != nullptr &&
      !(s = file.GetInt("tokenizer.ggml.eos_token_id", &eos)).ok()) {
    return s.WithContext(where);
  }
  std::vector<int32_t> types(types64.begin(), types64.end());
  s = Create(std::move(tokens), merges, std::move(types), static_cast<int32_t>(bos), static_cast<int32_t>(eos), out);
  return s.ok() ? s : s.WithContext(where);
}

void BpeTokenizer::EncodeWord(std::string_view word, std::vector<int32_t>* out) const {
  std::vector<std::string> sym;
  sym.reserve(word.size());
  for (unsigned char b : word) sym.push_back(byte_symbol_[b]);
  std::string key;
  while (sym.size() > 1) {
    int32_t best = INT32_MAX;
    size_t at = 0;
    for (size_t k = 0; k + 1 < sym.size(); ++k) {
      key.assign(sym[k]).append(" ").append(sym[k + 1]);
      auto it = ranks_.find(key);
      if (it != ranks_.end() && it->second < best) best = it->second, at = k;
    }
    if (best == INT32_MAX) break;
    // The leftmost occurrence of the lowest rank; the next round finds further occurrences (a pair made by this
    // merge ranks after it, so the order equals merging every occurrence at once).
    sym[at] += sym[at + 1];
    sym.erase(sym.begin() + static_cast<std::ptrdiff_t>(at) + 1);
  }
  for (const std::string& s : sym) {
    auto it = ids_.find(s);
    if (it != ids_.end()) {
      out->push_back(it->second);
    } else {  // a byte outside the vocabulary (merge results are in it: Create checks): dropped, as llama.cpp does
      for (size_t k = 0; k < s.size();) {
        size_t len = 1;
        const int b = SymbolByte(NextCodePoint(s, k, &len));
        if (b >= 0 && byte_id_[b] >= 0) out->push_back(byte_id_[b]);
        k += len;
      }
    }
  }
}

void BpeTokenizer::EncodePlain(std::string_view text, std::unordered_map<std::string, std::vector<int32_t>>* cache,
                               std::vector<int32_t>* out) const {
  for (std::string_view piece : PreTokenize(text)) {
    auto [it, inserted] = cache->try_emplace(std::string(piece));
    if (inserted) EncodeWord(piece, &it->second);
    out->insert(out->end(), it->second.begin(), it->second.end());
  }
}

std::vector<int32_t> BpeTokenizer::Encode(std::string_view text, bool special) const {
  std::vector<int32_t> out;
  std::unordered_map<std::string, std::vector<int32_t>> cache;  // repeated words are merged once per call
  size_t plain = 0;
  if (special && !specials_.empty()) {
    for (size_t i = 0; i < text.size();) {
      const std::string* hit = nullptr;
      for (const std::string& sp : specials_) {
        if (text.compare(i, sp.size(), sp) == 0) {
          hit = &sp;
          break;
        }
      }
      if (hit == nullptr) {
        ++i;
        continue;
      }
      EncodePlain(text.substr(plain, i - plain), &cache, &out);
      out.push_back(ids_.at(*hit));
      i += hit->size();
      plain = i;
    }
  }
  EncodePlain(text.substr(plain), &cache, &out);
  return out;
}

std::string BpeTokenizer::Decode(std::span<const int32_t> ids) const {
  std::string out;
  for (int32_t id : ids) {
    const std::string& t = tokens_[static_cast<size_t>(id)];
    const int32_t type = types_[static_cast<size_t>(id)];
    if (type == kControl || type == kUserDefined) {
      out += t;
      continue;
    }
    for (size_t k = 0; k < t.size();) {
      size_t len = 1;
      const uint32_t cp = NextCodePoint(t, k, &len);
      const int b = SymbolByte(cp);
      if (b >= 0) {
        out.push_back(static_cast<char>(b));
      } else {
        out.append(t, k, len);  // not of the byte alphabet: its text as is
      }
      k += len;
    }
  }
  return out;
}

}  // namespace lora
