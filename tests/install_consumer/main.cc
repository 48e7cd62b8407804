// Smoke test for an installed zero: the public headers compile on their own and libzero links and loads.
#include <zero/zero.h>

#include <cstdio>
#include <memory>

int main() {
  std::unique_ptr<zero::Comm> comm = zero::Comm::Single();
  std::printf("zero install check: world size %d\n", comm->world_size());
  return comm->world_size() == 1 ? 0 : 1;
}
