// The small-batch products of one Llama-3-8B layer (2-16 token rows: decode
// and speculative verification), timed through the real launchers
// (pagoda_linear, pagoda_fp8_linear) in a binary of a few megabytes, so that
// one GPU call can carry several builds of the GEMV kernels' compile-time
// knobs (PAGODA_MMA_GEMV_*, PAGODA_GEMV_*, PAGODA_FP8_GEMV_*) and compare them
// (the kernel bench is ~35 MB a build). Built and run by gemv-sweep.sh.
//
// Output: one line per (weights, kernel, token rows): the four products'
// times and weight bandwidth, the layer's total and its fraction of the
// measured copy bandwidth; then the layer at 5 rows against 1 row (a
// verification step of k = 4 drafts against a plain decode, issue 18).
// Times: the mean of launches cycling over enough weight copies (>= 256 MB a
// product) that L2 holds none of them between reads, after a warm-up.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "pagoda_kernels.h"

#define CHECK_CUDA(call)                                                                         \
    do {                                                                                         \
        const cudaError_t e_ = (call);                                                           \
        if (e_ != cudaSuccess) {                                                                 \
            std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(e_));      \
            std::exit(1);                                                                        \
        }                                                                                        \
    } while (0)
#define CHECK_RC(call)                                                                           \
    do {                                                                                         \
        const int rc_ = (call);                                                                  \
        if (rc_ != 0) {                                                                          \
            std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, pagoda_error_string(rc_));    \
            std::exit(1);                                                                        \
        }                                                                                        \
    } while (0)

namespace {

struct Product {
    const char *name;
    int n, k;  // weight [n, k]
    bool norm, silu, accumulate;
};

// One layer of Llama-3-8B: hidden 4096, 32/8 heads of 128, FFN 14336.
const Product kLayer[] = {
    {"qkv", 6144, 4096, true, false, false},
    {"o", 4096, 4096, false, false, true},
    {"gate_up", 28672, 4096, true, true, false},
    {"down", 4096, 14336, false, false, true},
};

// Deterministic bytes: bf16 values in [-1/64, 1/64) or E4M3 codes of small magnitude.
void fill_random(std::vector<uint8_t> &host, bool fp8, uint32_t seed) {
    uint32_t s = seed * 2654435761u + 1;
    for (size_t i = 0; i < host.size(); i += fp8 ? 1 : 2) {
        s = s * 1664525u + 1013904223u;
        if (fp8) {
            host[i] = (uint8_t)((s >> 24) & 0xb7);  // exponent below 7: |v| < 1, never NaN
        } else {
            const float v = ((float)(s >> 8) / 16777216.f - 0.5f) / 32.f;
            uint32_t bits;
            std::memcpy(&bits, &v, 4);
            const uint16_t b = (uint16_t)(bits >> 16);
            std::memcpy(&host[i], &b, 2);
        }
    }
}

void *device_random(size_t bytes, bool fp8, uint32_t seed) {
    std::vector<uint8_t> host(bytes);
    fill_random(host, fp8, seed);
    void *d = nullptr;
    CHECK_CUDA(cudaMalloc(&d, bytes));
    CHECK_CUDA(cudaMemcpy(d, host.data(), bytes, cudaMemcpyHostToDevice));
    return d;
}

// Bytes read + written per second of a device-to-device copy of 1 GiB (PERF.md's ceiling).
double copy_gbs(cudaStream_t stream) {
    const size_t bytes = (size_t)1 << 30;
    void *a = nullptr, *b = nullptr;
    CHECK_CUDA(cudaMalloc(&a, bytes));
    CHECK_CUDA(cudaMalloc(&b, bytes));
    CHECK_CUDA(cudaMemsetAsync(a, 1, bytes, stream));
    cudaEvent_t e0, e1;
    CHECK_CUDA(cudaEventCreate(&e0));
    CHECK_CUDA(cudaEventCreate(&e1));
    for (int i = 0; i < 3; ++i) CHECK_CUDA(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, stream));
    const int reps = 10;
    CHECK_CUDA(cudaEventRecord(e0, stream));
    for (int i = 0; i < reps; ++i) CHECK_CUDA(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, stream));
    CHECK_CUDA(cudaEventRecord(e1, stream));
    CHECK_CUDA(cudaEventSynchronize(e1));
    float ms = 0.f;
    CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
    CHECK_CUDA(cudaFree(a));
    CHECK_CUDA(cudaFree(b));
    return 2.0 * bytes * reps / (ms * 1e-3) / 1e9;
}

enum class Kernel { Simt, Mma };

// The fields PagodaLinearArgs and PagodaFp8LinearArgs share, for one product at t rows.
template <typename Args>
void set_product(Args &a, const Product &pr, const void *x, const void *gamma, void *out, int t) {
    a.x = x;
    a.norm_weight = pr.norm ? gamma : nullptr;
    a.eps = 1e-5f;
    a.out = out;
    a.t = t;
    a.n = pr.n;
    a.k = pr.k;
    a.silu_mul = pr.silu;
    a.accumulate = pr.accumulate;
}

struct Weights {
    std::vector<void *> copies;
    float *scales = nullptr;  // FP8: one per row (the same for every copy)
};

}  // namespace

int main(int argc, char **argv) {
    const char *variant = argc > 1 ? argv[1] : "default";
    CHECK_CUDA(cudaSetDevice(0));
    cudaDeviceProp prop;
    CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
    cudaStream_t stream;
    CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    void *blas = nullptr;
    CHECK_RC(pagoda_blas_create(&blas));
    const double copy = copy_gbs(stream);
    std::printf("variant %s device \"%s\" sms %d copy %.0f GB/s\n", variant, prop.name,
                prop.multiProcessorCount, copy);

    const int tokens[] = {1, 2, 3, 4, 5, 8, 16};
    const int kMaxT = 16;
    void *x = device_random((size_t)kMaxT * 14336 * 2, false, 7);
    void *gamma = device_random(4096 * 2, false, 8);
    void *out = device_random((size_t)kMaxT * 28672 * 2, false, 9);

    for (int fp8 = 0; fp8 < 2; ++fp8) {
        std::vector<Weights> weights;
        for (int p = 0; p < 4; ++p) {
            const Product &pr = kLayer[p];
            const size_t bytes = (size_t)pr.n * pr.k * (fp8 ? 1 : 2);
            Weights w;
            const size_t copies = (((size_t)256 << 20) + bytes - 1) / bytes;
            for (size_t c = 0; c < copies; ++c) w.copies.push_back(device_random(bytes, fp8 != 0, 100 * p + c));
            if (fp8) {
                std::vector<float> sc(pr.n, 1.f / 64.f);
                CHECK_CUDA(cudaMalloc(&w.scales, pr.n * sizeof(float)));
                CHECK_CUDA(cudaMemcpy(w.scales, sc.data(), pr.n * sizeof(float), cudaMemcpyHostToDevice));
            }
            weights.push_back(w);
        }
        double layer_ms_1[2] = {0, 0}, layer_ms_5[2] = {0, 0};
        for (int kern = 0; kern < 2; ++kern) {
            PagodaKernelPolicy policy = {};
            policy.num_sms = prop.multiProcessorCount;
            policy.use_pdl = prop.major >= 9 ? 1 : 0;
            policy.use_gemv = 1;
            policy.gemv_mma_min_tokens = kern == (int)Kernel::Mma ? 1 : 17;
            for (int t : tokens) {
                // The CUDA-core 16-bit GEMV takes at most 8 rows (more go to cuBLAS, not swept here).
                if (!fp8 && kern == (int)Kernel::Simt && t > 8) continue;
                double layer_ms = 0, layer_bytes = 0;
                char detail[512];
                int used = 0;
                for (int p = 0; p < 4; ++p) {
                    const Product &pr = kLayer[p];
                    const Weights &w = weights[p];
                    auto launch = [&](int copy_index) {
                        if (fp8) {
                            PagodaFp8LinearArgs a = {};
                            set_product(a, pr, x, gamma, out, t);
                            a.weight = static_cast<const uint8_t *>(w.copies[copy_index]);
                            a.weight_scale = w.scales;
                            a.dtype = PAGODA_DTYPE_BF16;
                            a.mode = PAGODA_FP8_WEIGHT_ONLY;
                            CHECK_RC(pagoda_fp8_linear(blas, &a, &policy, stream));
                        } else {
                            PagodaLinearArgs a = {};
                            set_product(a, pr, x, gamma, out, t);
                            a.weight = w.copies[copy_index];
                            a.in_dtype = PAGODA_DTYPE_BF16;
                            a.out_dtype = PAGODA_DTYPE_BF16;
                            CHECK_RC(pagoda_linear(blas, &a, &policy, stream));
                        }
                    };
                    const int ncopies = (int)w.copies.size();
                    for (int i = 0; i < 2 * ncopies; ++i) launch(i % ncopies);
                    cudaEvent_t e0, e1;
                    CHECK_CUDA(cudaEventCreate(&e0));
                    CHECK_CUDA(cudaEventCreate(&e1));
                    const int reps = 8 * ncopies;
                    CHECK_CUDA(cudaEventRecord(e0, stream));
                    for (int i = 0; i < reps; ++i) launch(i % ncopies);
                    CHECK_CUDA(cudaEventRecord(e1, stream));
                    CHECK_CUDA(cudaEventSynchronize(e1));
                    CHECK_CUDA(cudaGetLastError());
                    float ms = 0.f;
                    CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
                    CHECK_CUDA(cudaEventDestroy(e0));
                    CHECK_CUDA(cudaEventDestroy(e1));
                    const double per = ms / reps;
                    const double bytes = (double)pr.n * pr.k * (fp8 ? 1 : 2);
                    layer_ms += per;
                    layer_bytes += bytes;
                    used += std::snprintf(detail + used, sizeof(detail) - used, " %s %.1f us %.0f GB/s;", pr.name,
                                          per * 1e3, bytes / (per * 1e-3) / 1e9);
                }
                const double gbs = layer_bytes / (layer_ms * 1e-3) / 1e9;
                std::printf("%s %s t%-2d layer %.1f us %.0f GB/s (%.0f%% of copy):%s\n", fp8 ? "fp8 " : "bf16",
                            kern == (int)Kernel::Mma ? "mma " : "simt", t, layer_ms * 1e3, gbs, 100.0 * gbs / copy,
                            detail);
                if (t == 1) layer_ms_1[kern] = layer_ms;
                if (t == 5) layer_ms_5[kern] = layer_ms;
            }
        }
        // The best kernel at each row count, as a policy would pick it.
        const double one = layer_ms_1[0] < layer_ms_1[1] || layer_ms_1[1] == 0 ? layer_ms_1[0] : layer_ms_1[1];
        const double five = layer_ms_5[1] > 0 && (layer_ms_5[0] == 0 || layer_ms_5[1] < layer_ms_5[0])
                                ? layer_ms_5[1]
                                : layer_ms_5[0];
        std::printf("%s verification (5 rows) / decode (1 row), best kernel each: %.1f / %.1f us = %.3f\n",
                    fp8 ? "fp8 " : "bf16", five * 1e3, one * 1e3, five / one);
        for (Weights &w : weights) {
            for (void *c : w.copies) CHECK_CUDA(cudaFree(c));
            if (w.scales) CHECK_CUDA(cudaFree(w.scales));
        }
    }
    CHECK_RC(pagoda_blas_destroy(blas));
    return 0;
}
