// An independent float64 Mixtral forward pass for tests: plain loops over the whole sequence, no
// KV cache, no batching, no shared code with kernels/. It is the oracle for checkpoints that
// differ from the golden one (head counts, GQA ratios, head_dim, sliding window, expert counts).
#ifndef EPX_TESTS_COORDINATOR_REFERENCE_MODEL_H_
#define EPX_TESTS_COORDINATOR_REFERENCE_MODEL_H_

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/model_config.h"
#include "common/safetensors.h"
#include "common/tensor.h"

namespace epx::testing {

class ReferenceModel {
 public:
  using Mat = std::vector<double>;  // row-major

  // Loads every tensor of `dir` as float64. Aborts the test on error (test helper).
  explicit ReferenceModel(const std::string& dir) {
    config_ = *ModelConfig::FromDir(dir);
    ckpt_ = *Checkpoint::Open(dir);
  }

  // Logits [tokens.size(), vocab] of one causal forward over `tokens`.
  std::vector<double> Forward(const std::vector<int32_t>& tokens) {
    const ModelConfig& c = config_;
    const int64_t T = tokens.size(), H = c.hidden_size, D = c.head_dim;
    const int64_t NH = c.num_attention_heads, NKV = c.num_key_value_heads;
    Mat embed = Load("model.embed_tokens.weight");
    Mat x(T * H);
    for (int64_t t = 0; t < T; ++t)
      std::copy_n(embed.begin() + tokens[t] * H, H, x.begin() + t * H);
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      const std::string p = absl::StrCat("model.layers.", l, ".");
      Mat xn = Norm(x, Load(p + "input_layernorm.weight"));
      Mat q = MatMul(xn, Load(p + "self_attn.q_proj.weight"), T, H, NH * D);
      Mat k = MatMul(xn, Load(p + "self_attn.k_proj.weight"), T, H, NKV * D);
      Mat v = MatMul(xn, Load(p + "self_attn.v_proj.weight"), T, H, NKV * D);
      Rope(q, T, NH);
      Rope(k, T, NKV);
      Mat attn(T * NH * D, 0.0);
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t h = 0; h < NH; ++h) {
          const int64_t kvh = h / (NH / NKV);
          std::vector<double> s;
          std::vector<int64_t> keys;
          for (int64_t j = 0; j <= t; ++j) {
            if (c.sliding_window && t - j >= *c.sliding_window) continue;
            double dot = 0;
            for (int64_t d = 0; d < D; ++d)
              dot += q[(t * NH + h) * D + d] * k[(j * NKV + kvh) * D + d];
            s.push_back(dot / std::sqrt(static_cast<double>(D)));
            keys.push_back(j);
          }
          const double m = *std::max_element(s.begin(), s.end());
          double sum = 0;
          for (double& e : s) sum += (e = std::exp(e - m));
          for (size_t i = 0; i < keys.size(); ++i)
            for (int64_t d = 0; d < D; ++d)
              attn[(t * NH + h) * D + d] += s[i] / sum * v[(keys[i] * NKV + kvh) * D + d];
        }
      }
      Mat o = MatMul(attn, Load(p + "self_attn.o_proj.weight"), T, NH * D, H);
      for (int64_t i = 0; i < T * H; ++i) x[i] += o[i];
      Mat y = Norm(x, Load(p + "post_attention_layernorm.weight"));
      const int64_t E = c.num_local_experts, K = c.num_experts_per_tok;
      Mat router = MatMul(y, Load(p + "block_sparse_moe.gate.weight"), T, H, E);
      for (int64_t t = 0; t < T; ++t) {
        std::vector<double> prob(router.begin() + t * E, router.begin() + (t + 1) * E);
        const double m = *std::max_element(prob.begin(), prob.end());
        double sum = 0;
        for (double& e : prob) sum += (e = std::exp(e - m));
        for (double& e : prob) e /= sum;
        std::vector<int64_t> order(E);
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(),
                         [&](int64_t a, int64_t b) { return prob[a] > prob[b]; });
        double top = 0;
        for (int64_t j = 0; j < K; ++j) top += prob[order[j]];
        Mat yt(y.begin() + t * H, y.begin() + (t + 1) * H);
        for (int64_t j = 0; j < K; ++j) {
          Mat out = Expert(l, order[j], yt);
          for (int64_t i = 0; i < H; ++i) x[t * H + i] += prob[order[j]] / top * out[i];
        }
      }
    }
    Mat xf = Norm(x, Load("model.norm.weight"));
    return MatMul(xf, Load("lm_head.weight"), T, H, c.vocab_size);
  }

 private:
  Mat Load(const std::string& name) {
    auto it = cache_.find(name);
    if (it != cache_.end()) return it->second;
    TensorView view = *ckpt_->Get(name);
    Tensor f = *ToF32(view);
    Mat m(f.data<float>(), f.data<float>() + f.numel());
    cache_[name] = m;
    return m;
  }

  // x [rows, in] @ w[out, in]^T
  static Mat MatMul(const Mat& x, const Mat& w, int64_t rows, int64_t in, int64_t out) {
    Mat y(rows * out);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t o = 0; o < out; ++o) {
        double s = 0;
        for (int64_t i = 0; i < in; ++i) s += x[r * in + i] * w[o * in + i];
        y[r * out + o] = s;
      }
    return y;
  }

  Mat Norm(const Mat& x, const Mat& w) const {
    const int64_t H = config_.hidden_size, T = x.size() / H;
    Mat y(x.size());
    for (int64_t t = 0; t < T; ++t) {
      double ss = 0;
      for (int64_t i = 0; i < H; ++i) ss += x[t * H + i] * x[t * H + i];
      const double inv = 1.0 / std::sqrt(ss / H + config_.rms_norm_eps);
      for (int64_t i = 0; i < H; ++i) y[t * H + i] = w[i] * x[t * H + i] * inv;
    }
    return y;
  }

  // rotate_half RoPE at positions 0..T-1.
  void Rope(Mat& x, int64_t T, int64_t heads) const {
    const int64_t D = config_.head_dim, half = D / 2;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < heads; ++h) {
        double* v = &x[(t * heads + h) * D];
        for (int64_t i = 0; i < half; ++i) {
          const double a = t * std::pow(config_.rope_theta, -2.0 * i / D);
          const double x1 = v[i], x2 = v[i + half];
          v[i] = x1 * std::cos(a) - x2 * std::sin(a);
          v[i + half] = x2 * std::cos(a) + x1 * std::sin(a);
        }
      }
  }

  Mat Expert(int64_t layer, int64_t e, const Mat& y) {
    const std::string p =
        absl::StrCat("model.layers.", layer, ".block_sparse_moe.experts.", e, ".");
    const int64_t H = config_.hidden_size, I = config_.intermediate_size;
    Mat g = MatMul(y, Load(p + "w1.weight"), 1, H, I);
    Mat u = MatMul(y, Load(p + "w3.weight"), 1, H, I);
    for (int64_t i = 0; i < I; ++i) g[i] = g[i] / (1 + std::exp(-g[i])) * u[i];
    return MatMul(g, Load(p + "w2.weight"), 1, I, H);
  }

  ModelConfig config_;
  std::unique_ptr<Checkpoint> ckpt_;
  std::map<std::string, Mat> cache_;
};

}  // namespace epx::testing

#endif  // EPX_TESTS_COORDINATOR_REFERENCE_MODEL_H_
