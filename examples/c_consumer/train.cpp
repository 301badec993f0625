// Fits p to a target with AdamW through fastopt's C API: the loop a C++
// trainer writes (prepare the step's scalars, run the fused update).
#include <cmath>
#include <cstdio>
#include <vector>

#include "fastopt.h"

int main()
{
    const int64_t n = 1 << 16;
    std::vector<float> p(n, 0.0f), grad(n), exp_avg(n, 0.0f), exp_avg_sq(n, 0.0f), target(n);
    for (int64_t i = 0; i < n; i++) target[i] = std::sin(0.001f * static_cast<float>(i));

    auto loss = [&] {
        double s = 0;
        for (int64_t i = 0; i < n; i++) s += 0.5 * (p[i] - target[i]) * (p[i] - target[i]);
        return s / n;
    };
    const double first = loss();
    fastopt_adam_scalars s;
    for (int64_t step = 1; step <= 300; step++) {
        for (int64_t i = 0; i < n; i++) grad[i] = p[i] - target[i];  // d loss / d p
        int rc = fastopt_adamw_prepare(&s, 1e-2, 0.9, 0.999, 1e-8, 0.0, 0, 0, step);
        if (rc == FASTOPT_OK)
            rc = fastopt_adamw_f32(p.data(), grad.data(), exp_avg.data(), exp_avg_sq.data(), nullptr, n, &s);
        if (rc != FASTOPT_OK) {
            std::printf("fastopt error: %s\n", fastopt_strerror(rc));
            return 1;
        }
    }
    const double last = loss();
    std::printf("fastopt %s (%s, %d threads): loss %.3g -> %.3g\n", fastopt_version(), fastopt_isa(),
                fastopt_get_num_threads(), first, last);
    return last < 1e-3 * first ? 0 : 1;
}
