# Included after every project() call of the llama-cpp-python build (CMAKE_PROJECT_INCLUDE, set by the
# Makefile). llama-cpp-python forces LLAMA_BUILD_COMMON=ON, which compiles llama.cpp's `common` library and
# cpp-httplib (about a third of the build); its Python package loads only libllama and libggml*, so we turn
# common off again right after llama.cpp's own project() call, before llama.cpp reads the option.
# Tests, tools (incl. the C++ server), examples and the app are already off for a non-standalone build;
# we say so explicitly in case a future llama.cpp changes those defaults.
if(PROJECT_NAME STREQUAL "llama.cpp")
  set(LLAMA_BUILD_COMMON OFF CACHE BOOL "llama: build common utils library" FORCE)
  foreach(opt LLAMA_BUILD_TESTS LLAMA_BUILD_TOOLS LLAMA_BUILD_EXAMPLES LLAMA_BUILD_SERVER LLAMA_BUILD_APP)
    set(${opt} OFF CACHE BOOL "" FORCE)
  endforeach()
endif()
