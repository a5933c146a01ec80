#define ATTNSTORE_HASH_NS avx2
#include "hash_kernel.inl"
