// INJFLOW_MULTIVERSION: compile a hot loop twice, for AVX2+FMA and for the baseline ISA, and
// pick the variant at load time, so one wheel runs everywhere and still uses the vector units
// where they exist. Only plain (non-template) functions can carry it.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define INJFLOW_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define INJFLOW_MULTIVERSION
#endif
