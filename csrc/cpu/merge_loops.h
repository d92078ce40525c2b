// Family 3, CPU: the hot loops of merge.cpp. No include guard on purpose: merge.cpp includes this file
// twice, inside namespaces compiled for the baseline ISA and for AVX2, and picks one at run time.
// The element loops are branch-free (bit-mask selects, keep_if/select, not ifs or float ?:; the DARE hash in
// 32-bit integer lanes) so the compiler vectorises them; the arithmetic is the reference's, term by term, so
// results stay bit-identical.
// Needs, from the including file: float_bits, bits_float, keep_if, select, to_f32, from_f32 and merge_hash.h.

// ---- threshold: one pass counting |x - b| above a bracket and collecting the values inside it -------------

constexpr int kScanBlock = 512;

// Magnitudes of one block as fp32 bit patterns (they order like the values; bit 31 is 0, so int32 compares).
template <typename scalar_t, bool HAS_BASE>
void magnitude_bits(const scalar_t* __restrict__ x, const scalar_t* __restrict__ b, int len, int32_t* __restrict__ u) {
  for (int j = 0; j < len; ++j) {
    const float v = HAS_BASE ? to_f32(x[j]) - to_f32(b[j]) : to_f32(x[j]);
    u[j] = static_cast<int32_t>(float_bits(std::fabs(v)));
  }
}

// Over [begin, end): returns how many magnitudes exceed `hi` and appends those in [lo, hi] to `cand`.
// Per block: a vectorised pass that converts and counts, then (if any is inside) a branch-free compaction.
template <typename scalar_t, bool HAS_BASE>
int64_t scan_bracket(const scalar_t* __restrict__ x, const scalar_t* __restrict__ b, int64_t begin, int64_t end,
                     int32_t lo, int32_t hi, std::vector<int32_t>& cand) {
  alignas(64) int32_t u[kScanBlock], in[kScanBlock];
  int64_t above = 0;
  for (int64_t i = begin; i < end; i += kScanBlock) {
    const int len = static_cast<int>(std::min<int64_t>(kScanBlock, end - i));
    magnitude_bits<scalar_t, HAS_BASE>(x + i, HAS_BASE ? b + i : nullptr, len, u);
    int32_t n_above = 0, n_in = 0;
    for (int j = 0; j < len; ++j) {
      n_above += u[j] > hi;
      n_in += (u[j] >= lo) & (u[j] <= hi);
    }
    above += n_above;
    if (n_in) {
      int m = 0;
      for (int j = 0; j < len; ++j) {  // store every value, advance past the ones inside: no branch
        in[m] = u[j];
        m += (u[j] >= lo) & (u[j] <= hi);
      }
      cand.insert(cand.end(), in, in + m);
    }
  }
  return above;
}

// Radix-select histogram of one chunk: counts digit `shift` of the magnitudes whose higher bits equal
// `prefix` (the fallback when a sampled bracket misses, e.g. on heavily tied data). Four interleaved
// sub-histograms: tied data hits a few bins, and one histogram would serialise on their store-to-load chains.
template <typename scalar_t, bool HAS_BASE>
void radix_histogram(const scalar_t* __restrict__ x, const scalar_t* __restrict__ b, int64_t begin, int64_t end,
                     uint32_t* h, int shift, uint32_t dmask, int fixed_shift, uint32_t prefix) {
  alignas(64) int32_t u[kScanBlock];
  std::vector<uint32_t> sub(4 * static_cast<size_t>(dmask + 1), 0u);
  uint32_t* h4[4] = {sub.data(), sub.data() + (dmask + 1), sub.data() + 2 * (dmask + 1), sub.data() + 3 * (dmask + 1)};
  for (int64_t i = begin; i < end; i += kScanBlock) {
    const int len = static_cast<int>(std::min<int64_t>(kScanBlock, end - i));
    magnitude_bits<scalar_t, HAS_BASE>(x + i, HAS_BASE ? b + i : nullptr, len, u);
    for (int j = 0; j < len; ++j) {
      const auto w = static_cast<uint32_t>(u[j]);
      if (fixed_shift == 32 || (w >> fixed_shift) == (prefix >> fixed_shift)) ++h4[j & 3][(w >> shift) & dmask];
    }
  }
  for (uint32_t d = 0; d <= dmask; ++d) h[d] += h4[0][d] + h4[1][d] + h4[2][d] + h4[3][d];
}

// ---- merge: per block of kBlock elements, the K tasks in order, accumulating in fp32 ---------------------

constexpr int kBlock = 256;

template <typename scalar_t>
void load_block(const scalar_t* __restrict__ x, int len, float* __restrict__ out) {
  for (int i = 0; i < len; ++i) out[i] = to_f32(x[i]);
}

template <typename scalar_t>
void store_block(const float* __restrict__ in, int len, scalar_t* __restrict__ out) {
  for (int i = 0; i < len; ++i) out[i] = from_f32<scalar_t>(in[i]);
}

// One task's pass over a block. FIRST assigns instead of adding (the reference starts from its first term,
// which keeps -0.0 and makes linear of one model bit-exact).
template <typename scalar_t, int METHOD, bool FIRST, bool HAS_BASE, bool COUNT>
void accumulate(const scalar_t* __restrict__ x, int len, uint32_t start, const float* __restrict__ bval,
                float* __restrict__ tot, float* __restrict__ vote, float* __restrict__ pos, float* __restrict__ neg,
                float* __restrict__ cpos, float* __restrict__ cneg, float w, float th, float sc, uint32_t key,
                int32_t keep24) {
  constexpr bool kTiesLike = METHOD == merge::kTies || METHOD == merge::kDareTies;
  constexpr bool kDare = METHOD == merge::kDareLinear || METHOD == merge::kDareTies;
  for (int i = 0; i < len; ++i) {
    float t = to_f32(x[i]);
    if constexpr (METHOD != merge::kLinear && HAS_BASE) t -= bval[i];
    if constexpr (METHOD == merge::kTies) t = keep_if(std::fabs(t) >= th, t);
    if constexpr (kDare) {
      // merge::dare_keep, spelled out so it stays in vector lanes: (h >> 8) < 2^24 fits int32.
      uint32_t h = merge::fmix32((start + static_cast<uint32_t>(i)) ^ key);
      h = merge::fmix32(h + key);
      t = keep_if(static_cast<int32_t>(h >> 8) < keep24, t * sc);
    }
    if constexpr (!kTiesLike) {
      const float term = w * t;
      tot[i] = FIRST ? term : tot[i] + term;
    } else {
      const bool gp = t > 0.0f, gn = t < 0.0f;
      const float cp = keep_if(gp, 1.0f), cq = keep_if(gn, 1.0f);
      const float v = COUNT ? cp - cq : t;
      const float wt = w * t;
      const float p = keep_if(gp, wt), q = keep_if(gn, wt);
      vote[i] = FIRST ? v : vote[i] + v;
      pos[i] = FIRST ? p : pos[i] + p;
      neg[i] = FIRST ? q : neg[i] + q;
      cpos[i] = FIRST ? cp : cpos[i] + cp;
      cneg[i] = FIRST ? cq : cneg[i] + cq;
    }
  }
}

template <typename scalar_t, int METHOD, bool HAS_BASE, bool COUNT>
void merge_blocks(const MergeArgs& a, const scalar_t* const* xs, const scalar_t* base, scalar_t* out,
                  const float* thr, float lam) {
  constexpr bool kTiesLike = METHOD == merge::kTies || METHOD == merge::kDareTies;
  constexpr bool kDare = METHOD == merge::kDareLinear || METHOD == merge::kDareTies;
  at::parallel_for(0, (a.n + kBlock - 1) / kBlock, 32, [&](int64_t b0, int64_t b1) {
    alignas(64) float bval[kBlock], tot[kBlock], vote[kBlock], pos[kBlock], neg[kBlock], cpos[kBlock],
        cneg[kBlock], res[kBlock];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t start = blk * kBlock;
      const int len = static_cast<int>(std::min<int64_t>(kBlock, a.n - start));
      if constexpr (HAS_BASE && METHOD != merge::kLinear) load_block(base + start, len, bval);
      for (int64_t k = 0; k < a.K; ++k) {
        const float th = METHOD == merge::kTies ? thr[k] : 0.0f;
        const float sc = kDare ? a.scale[k] : 1.0f;
        const uint32_t key = kDare ? a.keys[k] : 0u;
        const int32_t keep24 = kDare ? static_cast<int32_t>(a.keep24[k]) : 0;
        const auto s32 = static_cast<uint32_t>(start);
        if (k == 0) {
          accumulate<scalar_t, METHOD, true, HAS_BASE, COUNT>(xs[k] + start, len, s32, bval, tot, vote, pos, neg,
                                                              cpos, cneg, a.weights[k], th, sc, key, keep24);
        } else {
          accumulate<scalar_t, METHOD, false, HAS_BASE, COUNT>(xs[k] + start, len, s32, bval, tot, vote, pos, neg,
                                                               cpos, cneg, a.weights[k], th, sc, key, keep24);
        }
      }
      for (int i = 0; i < len; ++i) {
        float r;
        if constexpr (METHOD == merge::kLinear) {
          r = tot[i];
        } else {
          float m;
          if constexpr (kTiesLike) {
            // std::max(c, 1.0f) is c < 1 ? 1 : c
            const float mp = pos[i] / select(cpos[i] < 1.0f, 1.0f, cpos[i]);
            const float mn = neg[i] / select(cneg[i] < 1.0f, 1.0f, cneg[i]);
            m = select(vote[i] >= 0.0f, mp, mn);
          } else {
            m = tot[i];
          }
          r = HAS_BASE ? bval[i] + lam * m : lam * m;
        }
        res[i] = r;
      }
      store_block(res, len, out + start);
    }
  });
}

template <typename scalar_t, int METHOD>
void merge_flags(const MergeArgs& a, const scalar_t* const* xs, const scalar_t* base, scalar_t* out, const float* thr,
                 float lam, bool count) {
  if (a.has_base) {
    count ? merge_blocks<scalar_t, METHOD, true, true>(a, xs, base, out, thr, lam)
          : merge_blocks<scalar_t, METHOD, true, false>(a, xs, base, out, thr, lam);
  } else {
    count ? merge_blocks<scalar_t, METHOD, false, true>(a, xs, base, out, thr, lam)
          : merge_blocks<scalar_t, METHOD, false, false>(a, xs, base, out, thr, lam);
  }
}

template <typename scalar_t>
void merge_all(const MergeArgs& a, const scalar_t* const* xs, const scalar_t* base, scalar_t* out, const float* thr,
               float lam, bool count) {
  switch (a.method) {
    case merge::kLinear: return merge_flags<scalar_t, merge::kLinear>(a, xs, base, out, thr, lam, count);
    case merge::kTaskArithmetic: return merge_flags<scalar_t, merge::kTaskArithmetic>(a, xs, base, out, thr, lam, count);
    case merge::kTies: return merge_flags<scalar_t, merge::kTies>(a, xs, base, out, thr, lam, count);
    case merge::kDareLinear: return merge_flags<scalar_t, merge::kDareLinear>(a, xs, base, out, thr, lam, count);
    case merge::kDareTies: return merge_flags<scalar_t, merge::kDareTies>(a, xs, base, out, thr, lam, count);
  }
}

// ---- threshold driver --------------------------------------------------------------------------------------

// Tied data (bf16 task vectors put ~1/8 of all elements inside a sampled bracket): instead of collecting them,
// one pass counts the magnitudes above the bracket and histograms those inside it, 2^s bit patterns a bin and
// at most kBracketBins bins. With s = 0 that pass is exact; otherwise the next pass histograms the chosen bin
// (bf16 ranges fit two passes). Counts are integers, summed per thread: the result is the same for any thread
// count. Returns false when the k-th value lies outside [lo, hi] (the caller falls back to radix select).
constexpr int kBracketBinsLog2 = 18;

template <typename scalar_t, bool HAS_BASE>
bool bracket_histogram_select(const scalar_t* x, const scalar_t* b, int64_t n, int64_t k, int32_t lo, int32_t hi,
                              float* result) {
  constexpr int64_t kChunk = 1 << 16;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  while (true) {
    const auto range = static_cast<uint64_t>(static_cast<int64_t>(hi) - lo) + 1;  // bit patterns in [lo, hi]
    int s = 0;
    while (((range - 1) >> s) >= (uint64_t{1} << kBracketBinsLog2)) ++s;
    const auto bins = static_cast<size_t>(((range - 1) >> s) + 1);
    std::vector<int64_t> hist(bins, 0);
    std::atomic<int64_t> above{0};
    std::mutex merge_lock;
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      alignas(64) int32_t u[kScanBlock], in[kScanBlock];
      std::vector<uint32_t> local(bins, 0u);  // one thread's counts: at most 2^32 - 1 elements a flush
      int64_t local_above = 0, since_flush = 0;
      auto flush = [&] {
        std::lock_guard<std::mutex> guard(merge_lock);
        for (size_t d = 0; d < bins; ++d) hist[d] += local[d];
        std::fill(local.begin(), local.end(), 0u);
        since_flush = 0;
      };
      for (int64_t i = c0 * kChunk, end = std::min(n, c1 * kChunk); i < end; i += kScanBlock) {
        const int len = static_cast<int>(std::min<int64_t>(kScanBlock, end - i));
        magnitude_bits<scalar_t, HAS_BASE>(x + i, HAS_BASE ? b + i : nullptr, len, u);
        int32_t n_above = 0;
        int m = 0;
        for (int j = 0; j < len; ++j) {
          n_above += u[j] > hi;
          in[m] = u[j];
          m += (u[j] >= lo) & (u[j] <= hi);
        }
        local_above += n_above;
        for (int j = 0; j < m; ++j) ++local[static_cast<uint32_t>(in[j] - lo) >> s];
        if ((since_flush += len) >= (int64_t{1} << 31)) flush();
      }
      flush();
      above.fetch_add(local_above);
    });
    int64_t cum = above.load();
    if (cum >= k) return false;  // the k-th largest is above hi
    int64_t d = static_cast<int64_t>(bins) - 1;
    for (; d >= 0; --d) {
      if (cum + hist[d] >= k) break;
      cum += hist[d];
    }
    if (d < 0) return false;  // below lo
    const int64_t bin_lo = static_cast<int64_t>(lo) + (d << s);
    if (s == 0) {
      *result = bits_float(static_cast<uint32_t>(bin_lo));
      return true;
    }
    lo = static_cast<int32_t>(bin_lo);
    hi = static_cast<int32_t>(std::min<int64_t>(hi, bin_lo + (int64_t{1} << s) - 1));
  }
}

// k-th largest |x - b| (|x| when b is null) as fp32, exact; 1 <= k <= n. A strided sample brackets the
// answer, one pass counts the magnitudes above the bracket and collects those inside it, and nth_element
// finishes on the few collected. When the bracket misses (or holds too many, on heavily tied data), a radix
// select over the bit patterns (three histogram passes) finds it instead; heavily tied data, which would
// overflow the collection, goes to bracket_histogram_select (one or two passes). Either way the result is the
// exact k-th value, whatever the sample or the thread count.
template <typename scalar_t, bool HAS_BASE>
float kth_largest(const scalar_t* x, const scalar_t* b, int64_t n, int64_t k) {
  constexpr int64_t kChunk = 1 << 16;
  constexpr int64_t kSample = 1 << 14;
  auto mag = [&](int64_t i) {
    const float v = HAS_BASE ? to_f32(x[i]) - to_f32(b[i]) : to_f32(x[i]);
    return static_cast<int32_t>(float_bits(std::fabs(v)));
  };
  int32_t lo = 0, hi = std::numeric_limits<int32_t>::max();
  bool predict_overflow = false;
  if (n > 4 * kSample) {  // smaller tensors: every element is a candidate
    std::vector<int32_t> s(kSample);
    for (int64_t j = 0; j < kSample; ++j) s[j] = mag(j * n / kSample);
    std::sort(s.begin(), s.end(), std::greater<int32_t>());
    // The k-th largest sits near sample rank q*S; 4 binomial standard deviations (+16) either side.
    const double q = static_cast<double>(k) / static_cast<double>(n);
    const double c = q * kSample, m = 4.0 * std::sqrt(kSample * q * (1.0 - q)) + 16.0;
    const auto hi_pos = static_cast<int64_t>(std::floor(c - m)), lo_pos = static_cast<int64_t>(std::ceil(c + m));
    if (hi_pos >= 0) hi = s[hi_pos];
    if (lo_pos < kSample) lo = s[lo_pos];
    // Heavily tied data (bf16 task vectors take few distinct values) puts many elements inside the bracket:
    // when the sample says the collecting pass would overflow, skip it and go straight to radix select.
    const auto inside = std::count_if(s.begin(), s.end(), [&](int32_t v) { return v >= lo && v <= hi; });
    predict_overflow = inside * 16 > kSample;  // more than 1/16 inside; the pass gives up at 1/8
  }
  if (predict_overflow) {
    float r;
    if (bracket_histogram_select<scalar_t, HAS_BASE>(x, b, n, k, lo, hi, &r)) return r;
  }
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int64_t cap = n / 8 + kChunk;  // collected values kept at most (4 bytes each)
  std::vector<std::vector<int32_t>> cand(chunks);
  std::vector<int64_t> above(chunks, 0);
  std::atomic<int64_t> collected{0};
  std::atomic<bool> overflow{predict_overflow};
  if (!predict_overflow) at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      if (overflow.load(std::memory_order_relaxed)) return;
      above[c] = scan_bracket<scalar_t, HAS_BASE>(x, b, c * kChunk, std::min(n, (c + 1) * kChunk), lo, hi, cand[c]);
      if (collected.fetch_add(static_cast<int64_t>(cand[c].size())) + static_cast<int64_t>(cand[c].size()) > cap) {
        overflow = true;
      }
    }
  });
  if (!overflow) {
    int64_t n_above = 0, n_cand = 0;
    for (int64_t c = 0; c < chunks; ++c) n_above += above[c], n_cand += static_cast<int64_t>(cand[c].size());
    if (n_above < k && n_above + n_cand >= k) {
      std::vector<int32_t> all;
      all.reserve(n_cand);
      for (auto& v : cand) all.insert(all.end(), v.begin(), v.end());
      const int64_t r = k - n_above;  // rank among the collected, 1-based
      std::nth_element(all.begin(), all.begin() + (r - 1), all.end(), std::greater<int32_t>());
      return bits_float(static_cast<uint32_t>(all[r - 1]));
    }
  }
  cand.clear();
  // Radix select: digit by digit from the top, each pass a histogram of the elements matching the prefix.
  std::vector<uint32_t> hist(static_cast<size_t>(chunks) * merge::kSelectBins);
  uint32_t prefix = 0;  // bits fixed by earlier passes
  int64_t remaining = k;
  for (int pass = 0; pass < merge::kSelectPasses; ++pass) {
    const int shift = merge::select_shift(pass);
    const uint32_t dmask = merge::select_digit_mask(pass);
    const int fixed_shift = pass == 0 ? 32 : merge::select_shift(pass - 1);  // higher bits must equal prefix
    std::fill(hist.begin(), hist.end(), 0u);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        radix_histogram<scalar_t, HAS_BASE>(x, b, c * kChunk, std::min(n, (c + 1) * kChunk),
                                            hist.data() + c * merge::kSelectBins, shift, dmask, fixed_shift, prefix);
      }
    });
    int64_t cum = 0;  // walk the digit's bins from the top until `remaining` elements are covered
    for (int d = static_cast<int>(dmask); d >= 0; --d) {
      int64_t cnt = 0;
      for (int64_t c = 0; c < chunks; ++c) cnt += hist[c * merge::kSelectBins + d];
      if (cum + cnt >= remaining) {
        prefix |= static_cast<uint32_t>(d) << shift;
        remaining -= cum;
        break;
      }
      cum += cnt;
    }
  }
  return bits_float(prefix);
}

template <typename scalar_t>
float kth_largest_magnitude(const scalar_t* x, const scalar_t* b, int64_t n, int64_t k) {
  return b ? kth_largest<scalar_t, true>(x, b, n, k) : kth_largest<scalar_t, false>(x, nullptr, n, k);
}
