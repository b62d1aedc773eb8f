// Minimal assertion macro for the ctest programs: counts failures and keeps going.
#pragma once
#include <cstdio>
#include <cstring>

inline int g_failures = 0;
#define CHECK(cond, ...)                                                    \
  do {                                                                      \
    if (!(cond)) {                                                          \
      ++g_failures;                                                         \
      std::fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                    \
      std::fprintf(stderr, "\n");                                           \
    }                                                                       \
  } while (0)

inline bool contains(const char* s, const char* sub) { return s && std::strstr(s, sub) != nullptr; }
