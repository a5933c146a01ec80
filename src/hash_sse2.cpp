#define ATTNSTORE_HASH_NS sse2
#include "hash_kernel.inl"
