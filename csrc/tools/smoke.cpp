// Calls vitq ops through the dispatcher from C++ and checks an exact integer result.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <iostream>

int main() {
  torch::manual_seed(0);
  auto x = torch::randn({4, 64});
  auto quant = c10::Dispatcher::singleton()
                   .findSchemaOrThrow("vitq::per_token_quantize", "")
                   .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                     at::Tensor>(const at::Tensor&, int64_t, const std::optional<at::Tensor>&,
                                                 const std::optional<at::Tensor>&, std::optional<double>,
                                                 int64_t)>();
  auto [codes, scale, zero, rowsum, oi, ov, oc] = quant.call(x, 8, std::nullopt, std::nullopt, std::nullopt, 0);
  auto expect = codes.to(torch::kInt32).sum(1).to(torch::kInt32);
  if (!torch::equal(expect, rowsum)) {
    std::cerr << "rowsum mismatch\n";
    return 1;
  }
  auto back = scale.unsqueeze(1) * (codes.to(torch::kFloat) - zero.to(torch::kFloat).unsqueeze(1));
  double err = (back - x).abs().max().item<double>();
  double bound = scale.max().item<double>() * 0.5 + 1e-6;
  std::cout << "vitq_smoke: per_token_quantize max error " << err << " (bound " << bound << ")\n";
  return err <= bound ? 0 : 1;
}
