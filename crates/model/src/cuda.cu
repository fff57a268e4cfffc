// Sirocco's CUDA kernels: decode attention over the paged KV pool and the pool's
// row scatter. Compiled at run time by NVRTC (see cuda.rs, which includes this
// file): no CUDA headers, so 16-bit floats are converted by hand.

struct bf16_t { unsigned short x; };
struct f16_t { unsigned short x; };
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(bf16_t v) { return __uint_as_float(((unsigned int)v.x) << 16); }
__device__ __forceinline__ float to_f(f16_t v) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.x)); return f; }
__device__ __forceinline__ void from_f(float v, float* o) { *o = v; }
__device__ __forceinline__ void from_f(float v, bf16_t* o) {
  unsigned int u = __float_as_uint(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) { o->x = 0x7fc0; return; }
  u += 0x7fffu + ((u >> 16) & 1u);
  o->x = (unsigned short)(u >> 16);
}
__device__ __forceinline__ void from_f(float v, f16_t* o) { unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v)); o->x = h; }

#define NEG_INF (-__int_as_float(0x7f800000))
#define MAX_GROUP 8
#define MAX_PER_LANE 4
#define WARPS 8

// Grid: (seqs, kv_heads, ceil(group / MAX_GROUP)); block: WARPS warps. Each warp runs an
// online softmax over a strided share of the sequence's slots for up to MAX_GROUP query
// heads of one KV head (keys and values are read once for the whole group); the warps'
// partial results are merged at the end. Lane l holds head dims l, l+32, ...
template <typename T>
__device__ void decode_attention(const T* q, const T* kp, const T* vp, T* out, const unsigned int* meta,
                                 int nq, int nkv, int hd, int bs, float scale) {
  const int s = blockIdx.x, g = blockIdx.y;
  const int group = nq / nkv;
  const int h0 = blockIdx.z * MAX_GROUP;
  const int nh = min(MAX_GROUP, group - h0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const unsigned int off = meta[2 * s], held = meta[2 * s + 1];
  const unsigned int* table = meta + 2 * gridDim.x + off;
  const int row = nkv * hd;
  float qr[MAX_GROUP][MAX_PER_LANE], acc[MAX_GROUP][MAX_PER_LANE], m[MAX_GROUP], l[MAX_GROUP];
  for (int h = 0; h < MAX_GROUP; h++) {
    m[h] = NEG_INF; l[h] = 0.f;
    for (int i = 0; i < MAX_PER_LANE; i++) {
      int d = lane + 32 * i;
      int head = g * group + h0 + h;
      qr[h][i] = (h < nh && d < hd) ? to_f(q[((long)s * nq + head) * hd + d]) * scale : 0.f;
      acc[h][i] = 0.f;
    }
  }
  for (unsigned int j = warp; j < held; j += WARPS) {
    long r = (long)table[j / bs] * bs + j % bs;
    const T* kr = kp + r * row + g * hd;
    const T* vr = vp + r * row + g * hd;
    float kv[MAX_PER_LANE], vv[MAX_PER_LANE];
    for (int i = 0; i < MAX_PER_LANE; i++) {
      int d = lane + 32 * i;
      kv[i] = d < hd ? to_f(kr[d]) : 0.f;
      vv[i] = d < hd ? to_f(vr[d]) : 0.f;
    }
    for (int h = 0; h < MAX_GROUP; h++) {
      if (h >= nh) break;
      float dot = 0.f;
      for (int i = 0; i < MAX_PER_LANE; i++) dot += qr[h][i] * kv[i];
      for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
      float mn = fmaxf(m[h], dot);
      float c = __expf(m[h] - mn), p = __expf(dot - mn);
      l[h] = l[h] * c + p;
      for (int i = 0; i < MAX_PER_LANE; i++) acc[h][i] = acc[h][i] * c + p * vv[i];
      m[h] = mn;
    }
  }
  __shared__ float sm[WARPS][MAX_GROUP], sl[WARPS][MAX_GROUP];
  __shared__ float sacc[WARPS][MAX_GROUP][32 * MAX_PER_LANE];
  for (int h = 0; h < nh; h++) {
    if (lane == 0) { sm[warp][h] = m[h]; sl[warp][h] = l[h]; }
    for (int i = 0; i < MAX_PER_LANE; i++) sacc[warp][h][lane + 32 * i] = acc[h][i];
  }
  __syncthreads();
  // Thread t merges head dims t, t + blockDim.x, ... of every head.
  for (int h = 0; h < nh; h++) {
    float mx = NEG_INF;
    for (int w = 0; w < WARPS; w++) mx = fmaxf(mx, sm[w][h]);
    float sum = 0.f;
    for (int w = 0; w < WARPS; w++) sum += sm[w][h] == NEG_INF ? 0.f : sl[w][h] * __expf(sm[w][h] - mx);
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
      float a = 0.f;
      for (int w = 0; w < WARPS; w++)
        if (sm[w][h] != NEG_INF) a += sacc[w][h][d] * __expf(sm[w][h] - mx);
      int head = g * group + h0 + h;
      from_f(a / sum, &out[((long)s * nq + head) * hd + d]);
    }
  }
}

// Copies row i of src ([n, width]) to row rows[i] of pool.
template <typename T>
__device__ void scatter_rows(T* pool, const T* src, const unsigned int* rows, int n, int width) {
  for (int i = blockIdx.x; i < n; i += gridDim.x) {
    long to = (long)rows[i] * width, from = (long)i * width;
    for (int c = threadIdx.x; c < width; c += blockDim.x) pool[to + c] = src[from + c];
  }
}

#define INSTANCES(NAME, T) \
  extern "C" __global__ void decode_attention_##NAME(const T* q, const T* kp, const T* vp, T* out, \
      const unsigned int* meta, int nq, int nkv, int hd, int bs, float scale) { \
    decode_attention<T>(q, kp, vp, out, meta, nq, nkv, hd, bs, scale); } \
  extern "C" __global__ void scatter_rows_##NAME(T* pool, const T* src, const unsigned int* rows, int n, int width) { \
    scatter_rows<T>(pool, src, rows, n, width); }
INSTANCES(f32, float)
INSTANCES(bf16, bf16_t)
INSTANCES(f16, f16_t)
