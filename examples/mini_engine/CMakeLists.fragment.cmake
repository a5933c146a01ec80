# mini_llama: the model part of the example mini inference engine (fp32 Llama forward
# pass over a paged KV cache, safetensors I/O). include() this file from a CMakeLists.txt;
# it refers to its sources relative to its own directory.
#
# -ffp-contract=off keeps a*b+c as two roundings everywhere, which the bitwise
# determinism across SIMD paths relies on (GCC contracts by default in GNU mode when an
# -march with FMA is in effect). No -march: the AVX2/AVX-512 kernels are picked at run
# time.
include_guard(GLOBAL)
if(NOT TARGET Threads::Threads)
  find_package(Threads REQUIRED)
endif()
set(_mini_engine_dir ${CMAKE_CURRENT_LIST_DIR})
add_library(mini_llama STATIC
  ${_mini_engine_dir}/llama.cpp
  ${_mini_engine_dir}/safetensors.cpp)
target_include_directories(mini_llama PUBLIC ${_mini_engine_dir})
target_compile_features(mini_llama PUBLIC cxx_std_20)
target_compile_options(mini_llama PRIVATE -O3 -ffp-contract=off -Wall -Wextra
  $<$<CXX_COMPILER_ID:GNU>:-Wno-psabi>)  # 32-byte vectors in the SSE2 build: an ABI note only
target_link_libraries(mini_llama PUBLIC Threads::Threads)
set_target_properties(mini_llama PROPERTIES POSITION_INDEPENDENT_CODE ON)
unset(_mini_engine_dir)
