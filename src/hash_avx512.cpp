#define ATTNSTORE_HASH_NS avx512
#include "hash_kernel.inl"
