// llama_chat: multi-turn conversations on llama.cpp from a generated Llama GGUF, served
// five ways, with TTFT per turn and a check that greedy replies are identical:
//   recompute        every turn prefills the whole history
//   llama-slot-file  llama.cpp's own llama_state_seq_save_file / load_file per session
//                    (the file is dropped from the page cache after the save, so a load
//                    reads the disk, as store-ssd does)
//   llama-ram        llama.cpp's llama_state_seq_get_data / set_data kept in a map: the
//                    engine's own floor
//   store-dram       attnstore (attnstore::llama_cpp), history served from DRAM
//   store-ssd        attnstore, each session demoted to SSD after its turn (O_DIRECT reads)
// Every mode decodes each turn's new tokens with the same batching, so KV restored and
// KV recomputed are bitwise the same and so are the replies.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "attnstore/llama_cpp.hpp"
#include "chat_engine.hpp"

namespace {

using clock_type = std::chrono::steady_clock;
double ms_since(clock_type::time_point t0) {
  return std::chrono::duration<double, std::milli>(clock_type::now() - t0).count();
}

struct options {
  llama_chat::model_spec spec;
  std::string model;  // empty: generated into the cache
  std::uint32_t conversations = 4, turns = 6, history = 2048, user_tokens = 64, reply_tokens = 16;
  std::uint32_t threads = 0, tokens_per_block = 0;
  bool flash_attn = true, json = false;
  ggml_type kv_type = GGML_TYPE_F16;
  std::vector<std::string> modes{"recompute", "llama-slot-file", "llama-ram", "store-dram", "store-ssd"};
  std::string dir;  // SSD tier and slot files
};

void usage() {
  std::puts(
      "llama_chat [options]\n"
      "  --conversations N (4)  --turns N (6)  --history N (2048: first prompt tokens)\n"
      "  --user-tokens N (64)  --reply-tokens N (16)  --threads N (all cores)\n"
      "  --modes a,b,...  (recompute,llama-slot-file,llama-ram,store-dram,store-ssd)\n"
      "  --flash-attn on|off (on)  --kv f16|q8_0 (f16)  --tokens-per-block N (0: store default)\n"
      "  --model PATH (generated there when missing; default under $ATTNSTORE_CACHE/models)\n"
      "  --embd N --layers N --heads N --kv-heads N --ff N --seed N  (generated model's shape: 1024 16 16 4 2816 1)\n"
      "  --dir DIR (SSD tier and slot files; default a fresh directory under /var/tmp)\n"
      "  --json  (last line: one JSON object)");
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::size_t at = 0;
  while (at <= s.size()) {
    const std::size_t comma = s.find(',', at);
    out.push_back(s.substr(at, comma == std::string::npos ? std::string::npos : comma - at));
    if (comma == std::string::npos) break;
    at = comma + 1;
  }
  return out;
}

std::optional<options> parse(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
      return argv[++i];
    };
    auto num = [&]() { return std::uint32_t(std::stoul(next())); };
    if (a == "--help" || a == "-h") return std::nullopt;
    if (a == "--conversations")
      o.conversations = num();
    else if (a == "--turns")
      o.turns = num();
    else if (a == "--history")
      o.history = num();
    else if (a == "--user-tokens")
      o.user_tokens = num();
    else if (a == "--reply-tokens")
      o.reply_tokens = std::max<std::uint32_t>(1, num());
    else if (a == "--threads")
      o.threads = num();
    else if (a == "--tokens-per-block")
      o.tokens_per_block = num();
    else if (a == "--modes")
      o.modes = split(next());
    else if (a == "--flash-attn")
      o.flash_attn = next() != "off";
    else if (a == "--kv")
      o.kv_type = next() == "q8_0" ? GGML_TYPE_Q8_0 : GGML_TYPE_F16;
    else if (a == "--model")
      o.model = next();
    else if (a == "--embd")
      o.spec.embd = num();
    else if (a == "--layers")
      o.spec.layers = num();
    else if (a == "--heads")
      o.spec.heads = num();
    else if (a == "--kv-heads")
      o.spec.kv_heads = num();
    else if (a == "--ff")
      o.spec.ff = num();
    else if (a == "--seed")
      o.spec.seed = num();
    else if (a == "--dir")
      o.dir = next();
    else if (a == "--json")
      o.json = true;
    else
      throw std::invalid_argument("unknown option " + a);
  }
  for (const auto& m : o.modes)
    if (m != "recompute" && m != "llama-slot-file" && m != "llama-ram" && m != "store-dram" && m != "store-ssd")
      throw std::invalid_argument("unknown mode " + m);
  if (o.conversations == 0 || o.turns == 0 || o.history < 2) throw std::invalid_argument("nothing to run");
  return o;
}

struct conversation {
  std::vector<llama_token> tokens;
  std::vector<std::size_t> cuts;  // where each turn's new tokens start
};

struct mode_result {
  std::vector<double> ttft_ms, warm_ttft_ms, warm_restore_ms, save_ms;
  std::vector<std::size_t> warm_history;
  std::vector<std::vector<llama_token>> replies;  // [turn * conversations + c]
  std::uint64_t restored_tokens = 0;
};

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

void drop_from_page_cache(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return;
  ::fdatasync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

/// One mode's engine: its own context, conversations and saved state. Every mode runs
/// turn t of conversation c before any mode runs the next one, so machine noise (this
/// VM's speed drifts by 10-20 % over minutes) falls on all modes alike.
class mode_engine {
 public:
  mode_engine(std::string mode, const options& o, llama_model* model, const std::string& gguf, const std::string& dir)
      : mode_(std::move(mode)), o_(o), dir_(dir), ctx_(nullptr, &llama_free) {
    llama_chat::context_options co;
    co.n_ctx = (o.history + o.turns * (o.user_tokens + o.reply_tokens) + 64 + 255) / 256 * 256;
    co.threads = o.threads;
    co.flash_attn = o.flash_attn;
    co.kv_type = o.kv_type;
    co.seqs = 2;  // sequence 1 is the adapter's scratch
    const llama_context_params params = llama_chat::context_params(co);
    ctx_.reset(llama_init_from_model(model, params));
    if (!ctx_) throw std::runtime_error("llama_init_from_model failed");
    on_store_ = mode_.rfind("store-", 0) == 0;
    ssd_ = mode_ == "store-ssd";
    if (on_store_) {
      const auto binding = attnstore::llama_cpp::bind(model, params, gguf, o.tokens_per_block);
      attnstore::store_config c;
      binding.configure(c);
      // A session's blocks at full context, plus the partial block a save re-writes.
      const attnstore::kv_geometry g = binding.geometry.validated();
      const std::uint64_t per_session = std::uint64_t(g.blocks_for(co.n_ctx) + 2) * (g.block_bytes() + 8192);
      c.dram_bytes = ssd_ ? std::max<std::uint64_t>(2 * per_session, 64ull << 20) : per_session * (o.conversations + 1);
      if (ssd_) {
        c.ssd_directory = dir + "/store";
        c.ssd_bytes = per_session * (o.conversations + 2);
        c.require_direct_io = false;  // O_DIRECT where the file system has it (logged otherwise)
        c.prefetch = false;           // every turn reads the SSD: the figure measured here
      }
      std::filesystem::remove_all(dir + "/store");
      kv_ = std::make_unique<attnstore::store>(c);
      cache_ = std::make_unique<attnstore::llama_cpp::session_cache>(*kv_, ctx_.get(), binding, 1);
    }
    convs_.resize(o.conversations);
    for (std::uint32_t c = 0; c < o.conversations; ++c) {
      convs_[c].tokens = llama_chat::random_tokens(1000 + c, o.history, o.spec.vocab);
      convs_[c].cuts = {0};
    }
    saved_.assign(o.conversations, 0);
    file_tokens_.resize(co.n_ctx);
    out_.replies.resize(std::size_t(o.turns) * o.conversations);
  }

  void turn(std::uint32_t t, std::uint32_t c) {
    conversation& cv = convs_[c];
    auto& reply = out_.replies[std::size_t(t) * o_.conversations + c];
    if (t > 0) {
      const auto& last = out_.replies[std::size_t(t - 1) * o_.conversations + c];
      cv.cuts.push_back(cv.tokens.size());
      cv.tokens.insert(cv.tokens.end(), last.begin(), last.end());
      const auto user = llama_chat::random_tokens(7000 + 31 * c + t, o_.user_tokens, o_.spec.vocab);
      cv.tokens.insert(cv.tokens.end(), user.begin(), user.end());
    }
    const std::string session = "conversation-" + std::to_string(c);
    const attnstore::session_key key{"llama_chat", session};
    const std::string slot_file = dir_ + "/slot-" + std::to_string(c) + ".bin";
    llama_context* ctx = ctx_.get();
    llama_memory_t mem = llama_get_memory(ctx);
    llama_memory_clear(mem, true);  // one conversation in the context at a time

    const auto t0 = clock_type::now();
    std::size_t prefix = 0;
    if (mode_ == "llama-ram" && ram_.count(c)) {
      const auto& blob = ram_[c];
      if (llama_state_seq_set_data(ctx, blob.data(), blob.size(), 0) == blob.size()) prefix = saved_[c];
    } else if (mode_ == "llama-slot-file" && saved_[c]) {
      std::size_t n = 0;
      if (llama_state_seq_load_file(ctx, slot_file.c_str(), 0, file_tokens_.data(), file_tokens_.size(), &n) &&
          n < cv.tokens.size() && std::equal(file_tokens_.begin(), file_tokens_.begin() + long(n), cv.tokens.begin()))
        prefix = n;
      else
        llama_memory_seq_rm(mem, 0, -1, -1);
    } else if (on_store_) {
      prefix = cache_->restore(key, cv.tokens, 0).tokens;
    }
    const double restore_ms = ms_since(t0);
    if (!llama_chat::decode_span(ctx, 0, cv.tokens, prefix, cv.tokens.size(), cv.cuts))
      throw std::runtime_error("llama_decode failed");
    llama_token next = llama_chat::greedy(ctx);
    const double ttft = ms_since(t0);
    out_.restored_tokens += prefix;
    out_.ttft_ms.push_back(ttft);
    if (t > 0) {
      out_.warm_ttft_ms.push_back(ttft);
      out_.warm_restore_ms.push_back(restore_ms);
      out_.warm_history.push_back(cv.cuts.back());
    }
    for (std::uint32_t i = 0; i < o_.reply_tokens; ++i) {
      reply.push_back(next);
      if (i + 1 == o_.reply_tokens) break;
      if (!llama_chat::decode_one(ctx, 0, next, llama_pos(cv.tokens.size() + i)))
        throw std::runtime_error("llama_decode failed");
      next = llama_chat::greedy(ctx);
    }
    llama_memory_seq_rm(mem, 0, llama_pos(cv.tokens.size()), -1);  // the reply is prefilled with the next turn

    const auto s0 = clock_type::now();
    if (mode_ == "llama-ram") {
      auto& blob = ram_[c];
      blob.resize(llama_state_seq_get_size(ctx, 0));
      blob.resize(llama_state_seq_get_data(ctx, blob.data(), blob.size(), 0));
    } else if (mode_ == "llama-slot-file") {
      if (!llama_state_seq_save_file(ctx, slot_file.c_str(), 0, cv.tokens.data(), cv.tokens.size()))
        throw std::runtime_error("llama_state_seq_save_file failed");
      drop_from_page_cache(slot_file);  // the next load reads the disk
    } else if (on_store_) {
      const attnstore::errc e = cache_->save(key, cv.tokens, 0);
      if (e != attnstore::errc::ok) std::fprintf(stderr, "save: %s\n", std::string(attnstore::to_string(e)).c_str());
      if (ssd_) kv_->demote(key);
    }
    saved_[c] = cv.tokens.size();
    out_.save_ms.push_back(ms_since(s0));
    if (!o_.json)
      std::printf("  %-16s turn %u conversation %u: history %6zu restored %6zu in %7.1f ms  TTFT %8.1f ms\n",
                  mode_.c_str(), t, c, cv.cuts.back(), prefix, restore_ms, ttft);
  }

  const mode_result& result() const { return out_; }

 private:
  std::string mode_;
  const options& o_;
  std::string dir_;
  std::unique_ptr<llama_context, decltype(&llama_free)> ctx_;
  bool on_store_ = false, ssd_ = false;
  std::unique_ptr<attnstore::store> kv_;
  std::unique_ptr<attnstore::llama_cpp::session_cache> cache_;
  std::vector<conversation> convs_;
  std::map<std::uint32_t, std::vector<std::uint8_t>> ram_;  // llama-ram: state per conversation
  std::vector<std::size_t> saved_;
  std::vector<llama_token> file_tokens_;
  mode_result out_;
};

}  // namespace

int main(int argc, char** argv) {
  std::optional<options> parsed;
  try {
    parsed = parse(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "llama_chat: %s\n", e.what());
    usage();
    return 2;
  }
  if (!parsed) {
    usage();
    return 0;
  }
  options o = *parsed;
  llama_chat::quiet_llama_logs();
  llama_backend_init();
  try {
    if (o.model.empty()) {
      const char* cache = std::getenv("ATTNSTORE_CACHE");
      const char* xdg = std::getenv("XDG_CACHE_HOME");
      const char* home = std::getenv("HOME");
      const std::string root = cache && *cache ? cache
                               : xdg && *xdg   ? std::string(xdg) + "/attnstore"
                                               : std::string(home ? home : "/tmp") + "/.cache/attnstore";
      o.model = root + "/models/" + o.spec.name() + ".gguf";
    }
    if (!std::filesystem::exists(o.model)) {  // generated from --embd etc. where it is missing
      std::fprintf(stderr, "llama_chat: generating %s\n", o.model.c_str());
      llama_chat::ensure_model(o.model, o.spec);
    }
    llama_model_params mp = llama_model_default_params();
    std::unique_ptr<llama_model, decltype(&llama_model_free)> model(llama_model_load_from_file(o.model.c_str(), mp),
                                                                    &llama_model_free);
    if (!model) throw std::runtime_error("cannot load " + o.model);
    o.spec.vocab = std::uint32_t(llama_vocab_n_tokens(llama_model_get_vocab(model.get())));
    const bool own_dir = o.dir.empty();
    if (own_dir) o.dir = "/var/tmp/llama_chat." + std::to_string(::getpid());
    std::filesystem::create_directories(o.dir);
    if (!o.json)
      std::printf(
          "llama_chat: %s (%.0fM parameters), %u conversations x %u turns, first prompt %u tokens, "
          "flash attention %s, KV %s, llama.cpp %s\n",
          o.model.c_str(), double(llama_model_n_params(model.get())) / 1e6, o.conversations, o.turns, o.history,
          o.flash_attn ? "on" : "off", ggml_type_name(o.kv_type),
          std::string(attnstore::llama_cpp::llama_cpp_version()).c_str());

    std::map<std::string, mode_result> results;
    {
      std::vector<std::unique_ptr<mode_engine>> engines;
      for (const auto& m : o.modes) {
        const std::string d = o.dir + "/" + m;
        std::filesystem::create_directories(d);
        engines.push_back(std::make_unique<mode_engine>(m, o, model.get(), o.model, d));
      }
      for (std::uint32_t t = 0; t < o.turns; ++t)
        for (std::uint32_t c = 0; c < o.conversations; ++c)
          for (auto& e : engines) e->turn(t, c);
      for (std::size_t i = 0; i < o.modes.size(); ++i) results[o.modes[i]] = engines[i]->result();
    }
    if (own_dir) std::filesystem::remove_all(o.dir);

    bool identical = true;
    const auto& first = results[o.modes.front()].replies;
    for (const auto& [m, r] : results) identical = identical && r.replies == first;
    std::vector<double> hist;
    for (std::size_t h : results[o.modes.front()].warm_history) hist.push_back(double(h));
    const double history = median(hist);

    auto ttft = [&](const char* m) { return results.count(m) ? median(results[m].warm_ttft_ms) : 0.0; };
    std::printf("\nTTFT median over turns 1..%u (history median %.0f tokens; turn 0 is cold in every mode):\n",
                o.turns - 1, history);
    for (const auto& m : o.modes) {
      const auto& r = results[m];
      std::printf("  %-16s %9.1f ms   (restore median %7.2f ms; turn 0: %9.1f ms; save median %7.2f ms)\n", m.c_str(),
                  median(r.warm_ttft_ms), median(r.warm_restore_ms),
                  median(std::vector<double>(r.ttft_ms.begin(), r.ttft_ms.begin() + o.conversations)),
                  median(r.save_ms));
    }
    auto restore = [&](const char* m) { return results.count(m) ? median(results[m].warm_restore_ms) : 0.0; };
    if (restore("store-dram") > 0 && restore("llama-ram") > 0)
      std::printf("  restore: store-dram / llama-ram %.2f, store-ssd / llama-slot-file %.2f\n",
                  restore("store-dram") / restore("llama-ram"),
                  restore("llama-slot-file") > 0 ? restore("store-ssd") / restore("llama-slot-file") : 0.0);
    if (ttft("store-dram") > 0 && ttft("llama-ram") > 0)
      std::printf("  store-dram / llama-ram        %.3f (target <= 1.10)\n", ttft("store-dram") / ttft("llama-ram"));
    if (ttft("store-dram") > 0 && ttft("llama-slot-file") > 0)
      std::printf("  store-dram / llama-slot-file  %.3f (target < 1)\n", ttft("store-dram") / ttft("llama-slot-file"));
    if (ttft("store-ssd") > 0 && ttft("llama-slot-file") > 0)
      std::printf("  store-ssd / llama-slot-file   %.3f (target <= 1.10)\n",
                  ttft("store-ssd") / ttft("llama-slot-file"));
    for (const char* m : {"store-dram", "store-ssd", "llama-ram", "llama-slot-file"})
      if (ttft(m) > 0 && ttft("recompute") > 0)
        std::printf("  TTFT reduction vs recompute, %-16s %.1f%%\n", m, 100.0 * (1 - ttft(m) / ttft("recompute")));
    std::printf("  replies identical across modes: %s\n", identical ? "yes" : "NO");

    if (o.json) {
      std::printf("{\"history_tokens\": %.0f, \"replies_identical\": %s, \"modes\": {", history,
                  identical ? "true" : "false");
      bool comma = false;
      for (const auto& m : o.modes) {
        const auto& r = results[m];
        std::printf(
            "%s\"%s\": {\"ttft_median_ms\": %.3f, \"restore_median_ms\": %.3f, "
            "\"ttft_turn0_median_ms\": %.3f, \"save_median_ms\": %.3f}",
            comma ? ", " : "", m.c_str(), median(r.warm_ttft_ms), median(r.warm_restore_ms),
            median(std::vector<double>(r.ttft_ms.begin(), r.ttft_ms.begin() + o.conversations)), median(r.save_ms));
        comma = true;
      }
      std::printf("}}\n");
    }
    return identical ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "llama_chat: %s\n", e.what());
    return 1;
  }
}
