/* Choosing the CPU path once: the best one this CPU supports, unless the
 * environment variable FASTOPT_ISA asks for a lower one (for benchmarks and
 * tests). Never -march=native: one binary runs on any x86-64. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static const fo_kernels *fo_choose(void)
{
    const char *want = getenv("FASTOPT_ISA");
    if (want && (!strcmp(want, "baseline") || !strcmp(want, "scalar")))
        return &fo_kernels_baseline;
#ifdef FASTOPT_X86_DISPATCH
    /* libgcc's cpu model also checks that the OS saves the wider registers (XCR0). */
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    int avx512 = avx2 && __builtin_cpu_supports("avx512f");
    if (avx512 && !(want && !strcmp(want, "avx2")))
        return &fo_kernels_avx512;
    if (avx2)
        return &fo_kernels_avx2;
#endif
    return &fo_kernels_baseline;
}

const fo_kernels *fo_kernels_selected(void)
{
    /* Racing first calls compute the same pointer; the atomics only make the
     * publication well defined. */
#if defined(__GNUC__)
    static const fo_kernels *chosen;
    const fo_kernels *k = __atomic_load_n(&chosen, __ATOMIC_ACQUIRE);
    if (!k) {
        k = fo_choose();
        __atomic_store_n(&chosen, k, __ATOMIC_RELEASE);
    }
    return k;
#else
    static const fo_kernels *volatile chosen;
    if (!chosen)
        chosen = fo_choose();
    return chosen;
#endif
}

const char *fastopt_isa(void) { return fo_kernels_selected()->name; }
