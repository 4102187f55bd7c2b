// Compile-time switches for the CUDA kernels: turn a runtime value into a constexpr inside a lambda body.
//   BOOL_SWITCH(cond, NAME, [&] { kernel<NAME>(...); });
//   HEADDIM_SWITCH(d, NAME, [&] { ... });   d in {32, 64, 128}; any other value runs nothing and the switch
//                                           evaluates to false (the launcher reports the error)
// Each switch is an expression returning true when a branch ran.
#pragma once

#define BOOL_SWITCH(COND, CONST_NAME, ...)          \
  [&]() -> bool {                                   \
    if (COND) {                                     \
      constexpr static bool CONST_NAME = true;      \
      __VA_ARGS__();                                \
    } else {                                        \
      constexpr static bool CONST_NAME = false;     \
      __VA_ARGS__();                                \
    }                                               \
    return true;                                    \
  }()

#define HEADDIM_SWITCH(HEADDIM, CONST_NAME, ...)    \
  [&]() -> bool {                                   \
    if ((HEADDIM) == 32) {                          \
      constexpr static int CONST_NAME = 32;         \
      __VA_ARGS__();                                \
      return true;                                  \
    } else if ((HEADDIM) == 64) {                   \
      constexpr static int CONST_NAME = 64;         \
      __VA_ARGS__();                                \
      return true;                                  \
    } else if ((HEADDIM) == 128) {                  \
      constexpr static int CONST_NAME = 128;        \
      __VA_ARGS__();                                \
      return true;                                  \
    }                                               \
    return false;                                   \
  }()
