// 2-D convolution forward on the CPU with oneDNN, for NCHW float32 tensors, with what oneDNN
// builds for a convolution kept between calls.
//
// Jittor's own oneDNN convolution op builds the convolution's primitive descriptor and primitive
// on every call (tens of microseconds) and adds the bias in a separate single-threaded op. Here
// one plan per geometry (shapes, strides, padding, dilation, groups, bias or not) holds the
// primitive, the reorders between the user's NCHW / OIHW layouts and the layouts the primitive
// chose, and the memory objects; each call only points them at the call's buffers and runs them.
// The internal-layout buffers are shared by all plans (grown to the largest), so the cache holds
// no tensor-sized memory per geometry.
//
// 1x1 convolutions with stride 1 and no padding are one sgemm per image in NCHW itself
// (y_n [O, HW] = w [O, C] x_n [C, HW] + b), which needs no reorder at all.
//
// Needs dnnl.hpp (oneDNN 2.x, the version Jittor ships) included before this header; the library
// itself is already loaded by Jittor's oneDNN ops.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <unordered_map>
#include <omp.h>

namespace iidm {

// geometry: N, C, H, W, O, KH, KW, OH, OW, stride h, w, padding h, w, dilation h, w, groups, bias,
// and the activations' layout inside (see conv2d_forward)
struct ConvKey {
    int64_t v[18];
    bool operator==(const ConvKey& o) const { return std::memcmp(v, o.v, sizeof(v)) == 0; }
};

struct ConvKeyHash {
    size_t operator()(const ConvKey& k) const {
        uint64_t h = 1469598103934665603ull;  // FNV-1a over the fields
        for (int64_t x : k.v) { h ^= (uint64_t)x; h *= 1099511628211ull; }
        return (size_t)h;
    }
};

struct ConvPlan {
    dnnl::convolution_forward conv;
    dnnl::memory user_src, user_wei, user_dst, bias;   // the caller's buffers (handles set per call)
    dnnl::memory src, wei, dst;                        // the primitive's layouts (shared buffers)
    dnnl::reorder src_reorder, wei_reorder, dst_reorder;
    bool reorder_src = false, reorder_wei = false, reorder_dst = false, has_bias = false;
};

// A grow-only, 64-byte aligned buffer.
struct ConvScratch {
    void* data = nullptr;
    size_t bytes = 0;
    void* get(size_t need) {
        if (need > bytes) {
            std::free(data);
            data = nullptr;
            bytes = 0;
            if (posix_memalign(&data, 64, need) != 0) throw std::bad_alloc();
            bytes = need;
        }
        return data;
    }
};

struct ConvCache {
    std::mutex lock;
    dnnl::engine engine{dnnl::engine::kind::cpu, 0};
    dnnl::stream stream{engine};
    std::unordered_map<ConvKey, std::unique_ptr<ConvPlan>, ConvKeyHash> plans;
    ConvScratch scratch[3];  // src, weights, dst in the primitive's layouts
};

static ConvCache& conv_cache() {
    static ConvCache cache;
    return cache;
}

// A network has a few dozen geometries; past this many (e.g. many input sizes in one process)
// the cache starts again rather than growing without bound.
static const size_t CONV_MAX_PLANS = 512;

static ConvPlan* conv_plan(ConvCache& cache, const ConvKey& key) {
    auto found = cache.plans.find(key);
    if (found != cache.plans.end()) return found->second.get();
    if (cache.plans.size() >= CONV_MAX_PLANS) cache.plans.clear();
    using tag = dnnl::memory::format_tag;
    using dt = dnnl::memory::data_type;
    using dims = dnnl::memory::dims;
    const int64_t* v = key.v;
    const int64_t N = v[0], C = v[1], H = v[2], W = v[3], O = v[4], KH = v[5], KW = v[6],
                  OH = v[7], OW = v[8], G = v[15];
    const bool bias = v[16] != 0, blocked = v[17] == 1;
    dims src_dims{N, C, H, W}, dst_dims{N, O, OH, OW};
    dims wei_dims = G > 1 ? dims{G, O / G, C / G, KH, KW} : dims{O, C / G, KH, KW};
    const tag wei_tag = G > 1 ? tag::goihw : tag::oihw;
    dnnl::memory::desc user_src_md(src_dims, dt::f32, tag::nchw), user_dst_md(dst_dims, dt::f32, tag::nchw),
        user_wei_md(wei_dims, dt::f32, wei_tag), bias_md(dims{O}, dt::f32, tag::x);
    const tag chosen = blocked ? tag::aBcd16b : tag::any;
    dnnl::memory::desc src_md(src_dims, dt::f32, chosen), dst_md(dst_dims, dt::f32, chosen);
    dnnl::memory::desc wei_md(wei_dims, dt::f32, tag::any);
    // oneDNN counts dilation from 0 (no dilation), PyTorch and Jittor from 1.
    dims strides{v[9], v[10]}, padding{v[11], v[12]}, dilation{v[13] - 1, v[14] - 1};
    auto desc = bias
        ? dnnl::convolution_forward::desc(dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct,
                                          src_md, wei_md, bias_md, dst_md, strides, dilation, padding, padding)
        : dnnl::convolution_forward::desc(dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct,
                                          src_md, wei_md, dst_md, strides, dilation, padding, padding);
    dnnl::convolution_forward::primitive_desc pd(desc, cache.engine);

    auto plan = std::make_unique<ConvPlan>();
    plan->conv = dnnl::convolution_forward(pd);
    plan->has_bias = bias;
    plan->user_src = dnnl::memory(user_src_md, cache.engine, nullptr);
    plan->user_wei = dnnl::memory(user_wei_md, cache.engine, nullptr);
    plan->user_dst = dnnl::memory(user_dst_md, cache.engine, nullptr);
    if (bias) plan->bias = dnnl::memory(bias_md, cache.engine, nullptr);
    plan->reorder_src = pd.src_desc() != user_src_md;
    plan->reorder_wei = pd.weights_desc() != user_wei_md;
    plan->reorder_dst = pd.dst_desc() != user_dst_md;
    plan->src = plan->reorder_src ? dnnl::memory(pd.src_desc(), cache.engine, nullptr) : plan->user_src;
    plan->wei = plan->reorder_wei ? dnnl::memory(pd.weights_desc(), cache.engine, nullptr) : plan->user_wei;
    plan->dst = plan->reorder_dst ? dnnl::memory(pd.dst_desc(), cache.engine, nullptr) : plan->user_dst;
    if (plan->reorder_src) plan->src_reorder = dnnl::reorder(plan->user_src, plan->src);
    if (plan->reorder_wei) plan->wei_reorder = dnnl::reorder(plan->user_wei, plan->wei);
    if (plan->reorder_dst) plan->dst_reorder = dnnl::reorder(plan->dst, plan->user_dst);
    ConvPlan* made = plan.get();
    cache.plans.emplace(key, std::move(plan));
    return made;
}

// y [N, O, OH, OW] = conv(x [N, C, H, W], w [O, C / groups, KH, KW]) + b [O] (b may be null).
//
// Inside, activations are reordered to a layout oneDNN's fast kernels take. With channel counts
// that are multiples of 16 the op asks for nChw16c (oneDNN's direct AVX-512 convolution,
// "jit:avx512_common" in 2.2; PyTorch's oneDNN runs that kernel family on the same blocked
// layout); measured on 2 Zen 4 cores at U-Net shapes it took 0-40% less time
// than the NHWC brgconv kernel oneDNN 2.2 picks by itself (tag::any), which is kept for other
// channel counts (at 3 input channels nChw16c was 250x slower).
static void conv2d_forward(const float* x, const float* w, const float* b, float* y, int64_t N,
                           int64_t C, int64_t H, int64_t W, int64_t O, int64_t KH, int64_t KW,
                           int64_t OH, int64_t OW, int64_t stride_h, int64_t stride_w,
                           int64_t pad_h, int64_t pad_w, int64_t dilation_h, int64_t dilation_w,
                           int64_t groups) {
    const int64_t HW = H * W;
    if (KH == 1 && KW == 1 && stride_h == 1 && stride_w == 1 && pad_h == 0 && pad_w == 0 && groups == 1) {
        for (int64_t n = 0; n < N; n++) {
            float* yn = y + n * O * HW;
            if (b) {
                #pragma omp parallel for schedule(static) if (O * HW >= 65536)
                for (int64_t o = 0; o < O; o++) {
                    float* row = yn + o * HW;
                    const float value = b[o];
                    #pragma omp simd
                    for (int64_t i = 0; i < HW; i++) row[i] = value;
                }
            }
            dnnl_sgemm('N', 'N', O, HW, C, 1.0f, w, C, x + n * C * HW, HW, b ? 1.0f : 0.0f, yn, HW);
        }
        return;
    }
    ConvCache& cache = conv_cache();
    std::lock_guard<std::mutex> guard(cache.lock);
    ConvKey key{{N, C, H, W, O, KH, KW, OH, OW, stride_h, stride_w, pad_h, pad_w, dilation_h,
                 dilation_w, groups, b != nullptr, (C / groups) % 16 == 0 && (O / groups) % 16 == 0}};
    ConvPlan* plan = conv_plan(cache, key);
    plan->user_src.set_data_handle(const_cast<float*>(x));
    plan->user_wei.set_data_handle(const_cast<float*>(w));
    plan->user_dst.set_data_handle(y);
    if (plan->reorder_src)
        plan->src.set_data_handle(cache.scratch[0].get(plan->src.get_desc().get_size()));
    if (plan->reorder_wei)
        plan->wei.set_data_handle(cache.scratch[1].get(plan->wei.get_desc().get_size()));
    if (plan->reorder_dst)
        plan->dst.set_data_handle(cache.scratch[2].get(plan->dst.get_desc().get_size()));
    dnnl::stream& s = cache.stream;
    if (plan->reorder_src) plan->src_reorder.execute(s, plan->user_src, plan->src);
    if (plan->reorder_wei) plan->wei_reorder.execute(s, plan->user_wei, plan->wei);
    if (plan->has_bias) {
        plan->bias.set_data_handle(const_cast<float*>(b));
        plan->conv.execute(s, {{DNNL_ARG_SRC, plan->src}, {DNNL_ARG_WEIGHTS, plan->wei},
                               {DNNL_ARG_BIAS, plan->bias}, {DNNL_ARG_DST, plan->dst}});
    } else {
        plan->conv.execute(s, {{DNNL_ARG_SRC, plan->src}, {DNNL_ARG_WEIGHTS, plan->wei},
                               {DNNL_ARG_DST, plan->dst}});
    }
    if (plan->reorder_dst) plan->dst_reorder.execute(s, plan->dst, plan->user_dst);
    s.wait();
}

}  // namespace iidm
