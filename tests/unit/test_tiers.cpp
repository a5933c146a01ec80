#include <catch2/catch.hpp>

#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <set>
#include <thread>
#include <vector>

#include "attnstore/tier/host_arena.hpp"
#include "attnstore/tier/ssd_space.hpp"
#include "support/temp_dir.hpp"

using namespace attnstore;

TEST_CASE("host_arena hands out distinct aligned slots, O(1), until full") {
  host_arena a(host_arena_options{100000, 64 * 102400, 4096});
  CHECK(a.slot_bytes() == 102400);
  CHECK(a.capacity() == 64);
  std::set<std::uint32_t> got;
  for (int i = 0; i < 64; ++i) {
    std::uint32_t s = a.allocate();
    REQUIRE(s != tier_allocator::no_slot);
    CHECK(reinterpret_cast<std::uintptr_t>(a.data(s)) % 4096 == 0);
    got.insert(s);
  }
  CHECK(got.size() == 64);
  CHECK(a.allocate() == tier_allocator::no_slot);
  CHECK(a.used() == 64);
  CHECK(a.release(5));
  CHECK_FALSE(a.release(5));  // double free is refused, not silently accepted
  CHECK(a.allocate() == 5);
  // Slots do not overlap: write each slot's index everywhere, read back.
  for (auto s : got) std::memset(a.data(s), int(s), a.slot_bytes());
  for (auto s : got) CHECK(a.data(s)[a.slot_bytes() - 1] == std::byte(s));
  INFO("pinning: " << a.pinning() << " " << a.pinning_note());
  CHECK((a.kind() == memory_kind::host || a.kind() == memory_kind::host_pinned));
}

TEST_CASE("host_arena splits into regions of at most max_region_bytes") {
  host_arena_options o{65536, 40 * 65536, 4096};
  o.max_region_bytes = 10 * 65536;
  host_arena a(o);
  CHECK(a.regions().size() == 4);
  for (auto& r : a.regions()) CHECK(r.iov_len <= o.max_region_bytes);
  CHECK(a.region_of(0) == 0);
  CHECK(a.region_of(39) == 3);
  CHECK(a.data(10) == static_cast<std::byte*>(a.regions()[1].iov_base));
}

TEST_CASE("host_arena without locking says why it is not pinned") {
  host_arena_options o{65536, 4 * 65536, 4096};
  o.lock_memory = false;
  o.use_cuda_pinned = false;
  o.log = logger{&logger::quiet, nullptr};
  host_arena a(o);
  CHECK(a.pinning() == "unlocked");
  CHECK_THAT(a.pinning_note(), Catch::Contains("disabled"));
}

TEST_CASE("host_arena is thread-safe") {
  host_arena a(host_arena_options{4096, 256 * 4096, 4096});
  std::vector<std::thread> ts;
  std::atomic<int> dup{0};
  std::vector<std::atomic<int>> owner(256);
  for (int t = 0; t < 4; ++t)
    ts.emplace_back([&] {
      for (int i = 0; i < 20000; ++i) {
        std::uint32_t s = a.allocate();
        if (s == tier_allocator::no_slot) continue;
        if (owner[s].fetch_add(1) != 0) dup++;
        owner[s].fetch_sub(1);
        a.release(s);
      }
    });
  for (auto& t : ts) t.join();
  CHECK(dup == 0);
  CHECK(a.used() == 0);
}

TEST_CASE("bad arena options name the field") {
  CHECK_THROWS_WITH(host_arena(host_arena_options{0, 1 << 20}), Catch::Contains("slot_bytes is 0"));
  CHECK_THROWS_WITH(host_arena(host_arena_options{1 << 20, 1000}), Catch::Contains("capacity_bytes is 1000"));
  CHECK_THROWS_WITH(host_arena(host_arena_options{4096, 1 << 20, 3000}), Catch::Contains("alignment is 3000"));
}

TEST_CASE("ssd_space creates 0600 files, splits them, maps slots to offsets") {
  attnstore::testing::temp_dir d("ssd");
  ssd_space_options o{d.str() + "/tier", 65536, 10 * 65536};
  o.max_file_bytes = 4 * 65536;
  ssd_space s(o);
  CHECK(s.capacity() == 10);
  CHECK(s.fds().size() == 3);
  CHECK(s.file_of(5) == 1);
  CHECK(s.offset_of(5) == 65536);
  CHECK(s.file_sizes()[2] == 2 * 65536);
  struct stat st {};
  REQUIRE(::stat((d.str() + "/tier/blocks-0000.dat").c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
  CHECK(std::uint64_t(st.st_size) == 4 * 65536);
  // A second store on the same directory is refused while the first holds it.
  CHECK_THROWS_WITH(ssd_space(o), Catch::Contains("in use by another store"));
}

TEST_CASE("ssd_space errors name the problem") {
  attnstore::testing::temp_dir d("ssd");
  CHECK_THROWS_WITH(ssd_space(ssd_space_options{"", 65536, 65536}), Catch::Contains("directory is empty"));
  CHECK_THROWS_WITH(ssd_space(ssd_space_options{d.str(), 1000, 65536}), Catch::Contains("slot_bytes is 1000"));
  CHECK_THROWS_WITH(ssd_space(ssd_space_options{d.str(), 65536, 100}),
                    Catch::Contains("capacity_bytes is 100, must hold at least one block slot"));
  CHECK_THROWS_WITH(ssd_space(ssd_space_options{"/proc/attnstore-no", 65536, 65536}),
                    Catch::Contains("cannot create directory"));
  if (::geteuid() != 0) {
    // root ignores directory permissions, so this check only means something for others
    std::filesystem::create_directories(d.path() / "ro");
    ::chmod((d.str() + "/ro").c_str(), 0500);
    CHECK_THROWS_WITH(ssd_space(ssd_space_options{d.str() + "/ro", 65536, 65536}), Catch::Contains("not writable"));
  }
  // More space than the file system has: refused at open, with the free space named.
  ssd_space_options huge{d.str() + "/huge", 1 << 20, std::uint64_t(1) << 50};
  huge.max_file_bytes = std::uint64_t(1) << 50;
  CHECK_THROWS_WITH(ssd_space(huge), Catch::Contains("cannot reserve"));
}

TEST_CASE("ssd_space rebuild marks exactly the recovered slots used") {
  attnstore::testing::temp_dir d("ssd");
  ssd_space s(ssd_space_options{d.str(), 65536, 8 * 65536});
  std::vector<std::uint8_t> used{0, 1, 0, 1, 1, 0, 0, 0};
  s.rebuild(used);
  CHECK(s.used() == 3);
  std::set<std::uint32_t> got;
  for (std::uint32_t x; (x = s.allocate()) != tier_allocator::no_slot;) got.insert(x);
  CHECK(got == std::set<std::uint32_t>{0, 2, 5, 6, 7});
}
