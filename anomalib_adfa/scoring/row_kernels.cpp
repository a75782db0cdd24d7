/*
 * Three passes of ADFA's soft top-k over a chunk of the patch-by-centre distance block, written out for the
 * CPU: the row sums with or without the gradient (adfa_weight_sums) and the row extremes (adfa_row_extremes),
 * registered as the PyTorch operators torch.ops.anomalib_adfa.weight_sums and torch.ops.anomalib_adfa.row_extremes.
 * anomalib_adfa/scoring/native.py builds and loads this file with torch.utils.cpp_extension;
 * anomalib_adfa/scoring/kernels.py holds the same passes in PyTorch, and the tests check that both agree.
 *
 * Why not Inductor's code for the row sums: for sums_and_gradient it fuses the row sums and the gradient into one
 * loop per row but evaluates the weights twice (an exponential and a division per element each time, since it
 * keeps no row-sized intermediate), and its vectorised exp2 is a general-purpose one. Here the weights of a
 * row are evaluated once, kept in the row of the gradient and in a per-thread row of slopes (both stay in L1),
 * and the exponential is the short polynomial below. benchmarks/train_speed.py measures the training step with
 * these kernels and with the compiled PyTorch ones side by side (the ratio is in anomalib_adfa/README.md).
 *
 * Formulas: the one weight formula, anomalib_adfa.scoring.soft_topk.logistic_weights, and the one gradient
 * formula, soft_topk.topk_weight_grad, composed as in kernels.score_gradient. This file is the one place they
 * are written again (C cannot call Python); tests/test_scoring_native.py holds it to them. For a row with
 * threshold beta, slope b and shift c, and clamped distances d_j = max(raw_j, 0),
 *     a_j = max(beta - b (d_j - c), ARGUMENT_FLOOR),  e_j = exp(-a_j),  z_j = 1 / (1 + e_j),  s_j = e_j z_j^2,
 * sums [sum z, sum s, sum z d, sum s d], and with a gradient buffer
 *     g_j = z_j - b s_j (d_j - mean),  mean = sum s d / sum s,
 * times 1 / (2 raw_j) when zero > 0 ("euclidean" distances), and 0 where raw_j <= zero.
 */

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LOG2_E 1.4426950408889634f
#define FLOAT_TINY 1.17549435e-38f
/* log(sqrt(FLOAT_TINY)): the lower bound of the sigmoid's argument (soft_topk.argument_floor, float32). */
#define ARGUMENT_FLOOR -43.66827237527655f

/*
 * 2^x for x <= 64 (the clamp of the argument at log(sqrt(tiny)) keeps x = -a log2(e) below 63.1).
 *
 * x is clamped at -126 (2^-126 is the smallest normal float; a weight 1 / (1 + e) is exactly 1 long before)
 * and split as x = n + f with n = round(x) and |f| <= 1/2: adding 1.5 * 2^23 rounds x to an integer in the
 * last bits of the sum, which also gives n as an integer. 2^f = exp(f ln 2) is its Taylor polynomial of
 * degree 7, c_k = (ln 2)^k / k!, with truncation error at most (ln(2) / 2)^8 / 8! = 5.2e-9 relative (below
 * float32's half ulp, 6e-8); Horner's rule adds about one rounding per step. 2^n is built in the exponent
 * field: (n + 127) << 23, a normal float for -126 <= n <= 64.
 */
static inline float exp2_short(float x) {
    const float round_shift = 12582912.0f; /* 1.5 * 2^23 */
    x = x < -126.0f ? -126.0f : x;
    float shifted = x + round_shift;
    int32_t bits;
    memcpy(&bits, &shifted, sizeof bits);
    float f = x - (shifted - round_shift);
    float p = 1.5252733804059840e-5f;
    p = p * f + 1.5403530393381608e-4f;
    p = p * f + 1.3333558146428443e-3f;
    p = p * f + 9.6181291076284772e-3f;
    p = p * f + 5.5504108664821580e-2f;
    p = p * f + 2.4022650695910071e-1f;
    p = p * f + 6.9314718055994531e-1f;
    p = p * f + 1.0f;
    int32_t exponent = (bits - 0x4B400000 + 127) << 23; /* 0x4B400000: the bits of 1.5 * 2^23 */
    float scale;
    memcpy(&scale, &exponent, sizeof scale);
    return p * scale;
}

/* Elements summed per block: each SIMD lane adds BLOCK / 16 terms, then the blocks are added, so that the
 * rounding of a row sum grows with about BLOCK / 16 + n / BLOCK terms instead of n / 16. */
#define BLOCK 256

/*
 * Weights z and slopes s of one row of n raw distances, written to weights and slopes, and the row sums
 * [sum z, sum s, sum z d, sum s d] into sums.
 */
static void row_weights(const float *raw, int64_t n, float threshold, float b, float c, float *weights, float *slopes,
                        float *sums) {
    float sum_z = 0.0f, sum_s = 0.0f, sum_zd = 0.0f, sum_sd = 0.0f;
    for (int64_t start = 0; start < n; start += BLOCK) {
        const int64_t end = start + BLOCK < n ? start + BLOCK : n;
        float block_z = 0.0f, block_s = 0.0f, block_zd = 0.0f, block_sd = 0.0f;
#pragma omp simd reduction(+ : block_z, block_s, block_zd, block_sd)
        for (int64_t j = start; j < end; ++j) {
            const float d = raw[j] < 0.0f ? 0.0f : raw[j];
            float a = threshold - b * (d - c);
            a = a < ARGUMENT_FLOOR ? ARGUMENT_FLOOR : a;
            const float e = exp2_short(-a * LOG2_E);
            const float z = 1.0f / (1.0f + e);
            const float s = e * z * z;
            weights[j] = z;
            slopes[j] = s;
            block_z += z;
            block_s += s;
            block_zd += z * d;
            block_sd += s * d;
        }
        sum_z += block_z;
        sum_s += block_s;
        sum_zd += block_zd;
        sum_sd += block_sd;
    }
    sums[0] = sum_z;
    sums[1] = sum_s;
    sums[2] = sum_zd;
    sums[3] = sum_sd;
}

/*
 * Row sums (rows x 4) of a contiguous chunk (rows x n) and, when gradient is not NULL, the gradient (rows x n).
 * beta, slope and shift hold one value per row; threads is the size of the OpenMP team.
 * NaN distances give NaN sums and gradients, as in PyTorch.
 */
static void adfa_weight_sums(const float *distances, int64_t rows, int64_t n, const float *beta, const float *slope,
                      const float *shift, float zero, float *sums, float *gradient, int threads) {
#pragma omp parallel num_threads(threads)
    {
        /* A row's weights (in its gradient row when there is one) and slopes, kept in L1 for the gradient. */
        float *scratch = (float *)malloc(sizeof(float) * (size_t)(gradient != NULL ? n : 2 * n));
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r) {
            const float *raw = distances + r * n;
            float *weights = gradient != NULL ? gradient + r * n : scratch + n;
            const float b = slope[r];
            row_weights(raw, n, beta[r], b, shift[r], weights, scratch, sums + 4 * r);
            if (gradient == NULL) {
                continue;
            }
            const float total = sums[4 * r + 1];
            const float mean = sums[4 * r + 3] / (total < FLOAT_TINY ? FLOAT_TINY : total);
            const float half = zero > 0.0f ? 0.5f : 1.0f;
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) {
                const float d = raw[j] < 0.0f ? 0.0f : raw[j];
                float value = half * (weights[j] - b * scratch[j] * (d - mean));
                /* "euclidean": d = sqrt(q + eps), so dd/dq = 1 / (2 d). */
                value = zero > 0.0f ? value / raw[j] : value;
                weights[j] = raw[j] > zero ? value : 0.0f;
            }
        }
        free(scratch);
    }
}

/*
 * Row extremes and moments (rows x 6) of a contiguous chunk (rows x n): min d, max d and sum (d - c)^k for
 * k = 1..4, with d the clamped distances and c the row's shift. NaN distances give NaN moments.
 */
static void adfa_row_extremes(const float *distances, int64_t rows, int64_t n, const float *shift, float *extremes,
                       int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const float *raw = distances + r * n;
        const float c = shift[r];
        float low = raw[0] < 0.0f ? 0.0f : raw[0], high = low;
        float m1 = 0.0f, m2 = 0.0f, m3 = 0.0f, m4 = 0.0f;
#pragma omp simd reduction(min : low) reduction(max : high) reduction(+ : m1, m2, m3, m4)
        for (int64_t j = 0; j < n; ++j) {
            float d = raw[j] < 0.0f ? 0.0f : raw[j];
            float e = d - c, square = e * e;
            low = d < low ? d : low;
            high = d > high ? d : high;
            m1 += e;
            m2 += square;
            m3 += square * e;
            m4 += square * square;
        }
        float *out = extremes + 6 * r;
        out[0] = low;
        out[1] = high;
        out[2] = m1;
        out[3] = m2;
        out[4] = m3;
        out[5] = m4;
    }
}

/* The operators: float32 CPU tensors, distances (rows x n) contiguous, per-row columns of `rows` values. */

static at::Tensor weight_sums(const at::Tensor &distances, const at::Tensor &beta, const at::Tensor &slope,
                              const at::Tensor &shift, double zero, const std::optional<at::Tensor> &gradient) {
    TORCH_CHECK(distances.dim() == 2 && distances.is_contiguous(), "weight_sums needs contiguous (R, N) distances");
    const int64_t rows = distances.size(0), n = distances.size(1);
    at::Tensor sums = at::empty({rows, 4}, distances.options());
    float *gradient_data = nullptr;
    if (gradient.has_value()) {
        TORCH_CHECK(gradient->is_contiguous() && gradient->sizes() == distances.sizes(), "gradient must be like distances");
        gradient_data = gradient->data_ptr<float>();
    }
    adfa_weight_sums(distances.data_ptr<float>(), rows, n, beta.data_ptr<float>(), slope.data_ptr<float>(),
                     shift.data_ptr<float>(), static_cast<float>(zero), sums.data_ptr<float>(), gradient_data,
                     at::get_num_threads());
    return sums;
}

static at::Tensor row_extremes(const at::Tensor &distances, const at::Tensor &shift) {
    TORCH_CHECK(distances.dim() == 2 && distances.is_contiguous() && distances.size(1) > 0,
                "row_extremes needs contiguous, non-empty (R, N) distances");
    const int64_t rows = distances.size(0);
    at::Tensor extremes = at::empty({rows, 6}, distances.options());
    adfa_row_extremes(distances.data_ptr<float>(), rows, distances.size(1), shift.data_ptr<float>(),
                      extremes.data_ptr<float>(), at::get_num_threads());
    return extremes;
}

TORCH_LIBRARY(anomalib_adfa, m) {
    m.def("weight_sums(Tensor distances, Tensor beta, Tensor slope, Tensor shift, float zero, Tensor(a!)? gradient) "
          "-> Tensor");
    m.def("row_extremes(Tensor distances, Tensor shift) -> Tensor");
}

TORCH_LIBRARY_IMPL(anomalib_adfa, CPU, m) {
    m.impl("weight_sums", &weight_sums);
    m.impl("row_extremes", &row_extremes);
}
