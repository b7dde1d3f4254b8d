// epx: the command-line entry point. Parses flags and calls one Run...() of cli/commands.h.
#include <iostream>

#include "CLI/CLI.hpp"
#include "cli/commands.h"

namespace {

int Finish(const absl::Status& status) {
  if (status.ok()) return 0;
  std::cerr << "epx: error: " << status.message() << "\n";
  return 1;
}

}  // namespace

int Run(int argc, char** argv);

int main(int argc, char** argv) {
  // Library code returns Status; what can still escape is the standard library's: out of memory.
  try {
    return Run(argc, argv);
  } catch (const std::bad_alloc&) {
    std::cerr << "epx: error: out of memory\n";
  } catch (const std::exception& e) {
    std::cerr << "epx: error: " << e.what() << "\n";
  }
  return 1;
}

int Run(int argc, char** argv) {
  CLI::App app{"epx: expert-parallel inference for Mixtral-family MoE models"};
  app.require_subcommand(1);
  app.set_version_flag("--version", epx::BuildId());

  // Options of every command that runs the model, alone or as one rank of an mpirun job.
  auto add_runtime_options = [](CLI::App* cmd, epx::RuntimeOptions* rt, double* timeout_s,
                                bool* stats) {
    cmd->add_option("--model", rt->model_dir, "HF model directory")->required();
    cmd->add_option("--placement", rt->placement,
                    "expert placement under mpirun: round-robin or a JSON file "
                    "{\"experts\": {\"0\": [1, 2], ...}}")
        ->capture_default_str();
    cmd->add_option("--role", rt->role, "coordinator or worker (MPMD launches; default: by rank)")
        ->check(CLI::IsMember({"coordinator", "worker"}));
    cmd->add_option("--comm-timeout", *timeout_s,
                    "seconds a rank waits for a peer before reporting it")
        ->capture_default_str()
        ->check(CLI::PositiveNumber);
    cmd->add_flag("--stats", *stats,
                  "print per-layer attention/dispatch/expert/combine time and expert load");
  };

  epx::EvalOptions eval;
  double eval_timeout_s = 30;
  CLI::App* eval_cmd = app.add_subcommand(
      "eval", "Prefill and greedy-decode the prompts of a golden file; write logits and tokens");
  add_runtime_options(eval_cmd, &eval.runtime, &eval_timeout_s, &eval.stats);
  eval_cmd->add_option("--input", eval.input, "safetensors with prompt_{i}.tokens/.greedy")
      ->required();
  eval_cmd->add_option("--output", eval.output, "safetensors to write")->required();
  eval_cmd->add_flag("--sequential", eval.sequential, "one prompt at a time, not one batch");
  eval_cmd->add_flag("--check", eval.check,
                     "compare with the input's reference logits and greedy tokens; fail if they "
                     "differ");
  eval_cmd
      ->add_option("--tolerance", eval.tolerance,
                   "--check: largest error relative to the largest reference logit")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);

  epx::GenerateOptions gen;
  double gen_timeout_s = 30;
  CLI::App* gen_cmd = app.add_subcommand("generate", "Generate text from a prompt on the CPU");
  add_runtime_options(gen_cmd, &gen.runtime, &gen_timeout_s, &gen.stats);
  gen_cmd->add_option("--prompt", gen.prompt, "prompt text")->required();
  gen_cmd->add_option("--max-tokens", gen.max_tokens, "tokens to generate at most")
      ->capture_default_str();
  gen_cmd->add_option("--temperature", gen.temperature, "0 = greedy")->capture_default_str();
  gen_cmd->add_option("--top-k", gen.top_k, "keep the k most likely tokens (0 = all)")
      ->capture_default_str();
  gen_cmd->add_option("--top-p", gen.top_p, "nucleus probability mass in (0, 1]")
      ->capture_default_str();
  gen_cmd->add_option("--seed", gen.seed, "sampling seed")->capture_default_str();

  epx::MakeModelOptions mm;
  std::string dtype = "bf16";
  CLI::App* mm_cmd =
      app.add_subcommand("make-model", "Write a random checkpoint in the Hugging Face layout");
  mm_cmd->add_option("--preset", mm.preset, "tiny, small, mixtral-8x7b, mixtral-8x22b")
      ->capture_default_str();
  mm_cmd->add_option("--out", mm.out_dir, "output directory")->required();
  mm_cmd->add_option("--seed", mm.seed, "weight seed")->capture_default_str();
  mm_cmd->add_option("--dtype", dtype, "bf16, fp16 or fp32")->capture_default_str();
  mm_cmd
      ->add_option(
          "--shards", mm.shards,
          "split the weights into up to N files of about equal size (0: files of at most 5 GB)")
      ->capture_default_str();
  mm_cmd->add_option("--num-layers", mm.num_layers, "override num_hidden_layers");
  mm_cmd->add_option("--hidden-size", mm.hidden_size, "override hidden_size");
  mm_cmd->add_option("--intermediate-size", mm.intermediate_size, "override intermediate_size");
  mm_cmd->add_option("--vocab-size", mm.vocab_size, "override vocab_size (>= 512)");
  mm_cmd->add_option("--num-heads", mm.num_heads, "override num_attention_heads");
  mm_cmd->add_option("--num-kv-heads", mm.num_kv_heads, "override num_key_value_heads");
  mm_cmd->add_option("--head-dim", mm.head_dim, "override head_dim");
  mm_cmd->add_option("--num-experts", mm.num_experts, "override num_local_experts");
  mm_cmd->add_option("--experts-per-tok", mm.num_experts_per_tok,
                     "override num_experts_per_tok (top-k of the router)");
  mm_cmd->add_option("--sliding-window", mm.sliding_window, "override sliding_window (0 = none)");
  mm_cmd->add_option("--max-position-embeddings", mm.max_position_embeddings,
                     "override max_position_embeddings");

  CLI11_PARSE(app, argc, argv);

  eval.runtime.comm_timeout = absl::Seconds(eval_timeout_s);
  gen.runtime.comm_timeout = absl::Seconds(gen_timeout_s);
  if (eval_cmd->parsed()) return Finish(epx::RunEval(eval, std::cerr));
  if (gen_cmd->parsed()) return Finish(epx::RunGenerate(gen, std::cout, std::cerr));
  if (mm_cmd->parsed()) {
    absl::StatusOr<epx::DType> parsed = epx::ParseWeightDType(dtype);
    if (!parsed.ok()) return Finish(parsed.status());
    mm.dtype = *parsed;
    return Finish(epx::RunMakeModel(mm, std::cerr));
  }
  return 2;
}
