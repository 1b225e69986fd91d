// One training method of an ExecuTorch program, stepped with plain SGD by an app: what docs/edge.md
// describes, written against the runtime core that the executorch pip package ships (headers under
// executorch/include, libexecutorch.so and the kernels in libexecutorch_kernels_optimized.so). The
// package has no headers for the training extension (TrainingModule, optimizer::SGD), so the loop
// does by hand what they do: run the method, read the gradient and parameter outputs whose
// positions the joint export's getter methods give, and update the parameters in place (they live in
// the method's planned arena and persist between calls).
//
//   train_method PROGRAM.pte METHOD STEPS LR INPUTS.bin OUT.bin
//
// INPUTS.bin: the float32 input then the int64 labels, raw, in the sizes the method plans (read from
// the program). Prints each step's loss; writes every parameter after the last step (float32, in
// output order) to OUT.bin.
#include <executorch/extension/data_loader/buffer_data_loader.h>
#include <executorch/runtime/core/hierarchical_allocator.h>
#include <executorch/runtime/core/memory_allocator.h>
#include <executorch/runtime/executor/method.h>
#include <executorch/runtime/executor/memory_manager.h>
#include <executorch/runtime/executor/program.h>
#include <executorch/runtime/platform/runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

using executorch::extension::BufferDataLoader;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::HierarchicalAllocator;
using executorch::runtime::MemoryAllocator;
using executorch::runtime::MemoryManager;
using executorch::runtime::Method;
using executorch::runtime::Program;
using executorch::runtime::Span;

static std::vector<char> read_file(const char* path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<char>(std::istreambuf_iterator<char>(in), {});
}

static void fail(const char* what, Error error) {
  std::fprintf(stderr, "%s failed (error %d)\n", what, static_cast<int>(error));
  std::exit(1);
}

// Everything a loaded method needs: its planned arenas and the allocator for its own tables.
struct Loaded {
  std::vector<std::vector<uint8_t>> arenas;
  std::vector<Span<uint8_t>> spans;
  std::vector<uint8_t> pool = std::vector<uint8_t>(1 << 20);
  std::unique_ptr<MemoryAllocator> allocator;
  std::unique_ptr<HierarchicalAllocator> planned;
  std::unique_ptr<MemoryManager> memory;
  std::unique_ptr<Method> method;
};

static std::unique_ptr<Loaded> load(Program& program, const char* name) {
  auto loaded = std::make_unique<Loaded>();
  auto meta = program.method_meta(name);
  if (!meta.ok()) fail("method_meta", meta.error());
  for (size_t i = 0; i < meta->num_memory_planned_buffers(); ++i) {
    loaded->arenas.emplace_back(meta->memory_planned_buffer_size(i).get());
  }
  for (auto& arena : loaded->arenas) loaded->spans.emplace_back(arena.data(), arena.size());
  loaded->allocator = std::make_unique<MemoryAllocator>(loaded->pool.size(), loaded->pool.data());
  loaded->planned = std::make_unique<HierarchicalAllocator>(
      Span<Span<uint8_t>>(loaded->spans.data(), loaded->spans.size()));
  loaded->memory = std::make_unique<MemoryManager>(loaded->allocator.get(), loaded->planned.get());
  auto method = program.load_method(name, loaded->memory.get());
  if (!method.ok()) fail("load_method", method.error());
  loaded->method = std::make_unique<Method>(std::move(*method));
  return loaded;
}

static int64_t getter(Program& program, const std::string& name) {
  auto loaded = load(program, name.c_str());
  Error error = loaded->method->execute();
  if (error != Error::Ok) fail(name.c_str(), error);
  return loaded->method->get_output(0).toInt();
}

int main(int argc, char** argv) {
  if (argc != 7) {
    std::fprintf(stderr, "usage: %s PROGRAM.pte METHOD STEPS LR INPUTS.bin OUT.bin\n", argv[0]);
    return 2;
  }
  executorch::runtime::runtime_init();
  const std::string name = argv[2];
  const int steps = std::atoi(argv[3]);
  const float lr = std::strtof(argv[4], nullptr);
  std::vector<char> bytes = read_file(argv[1]);
  std::vector<char> inputs = read_file(argv[5]);
  BufferDataLoader loader(bytes.data(), bytes.size());
  auto program = Program::load(&loader);
  if (!program.ok()) fail("Program::load", program.error());
  // where the joint export put the gradients and the parameters among the method's outputs
  const int64_t first_gradient = getter(*program, "__et_training_gradients_index_" + name);
  const int64_t first_parameter = getter(*program, "__et_training_parameters_index_" + name);
  auto step = load(*program, name.c_str());
  Method& method = *step->method;
  for (int s = 0; s < steps; ++s) {
    size_t offset = 0;  // the planned input tensors take the batch (x, then y)
    for (size_t i = 0; i < method.inputs_size(); ++i) {
      auto tensor = method.mutable_input(i).toTensor();
      std::memcpy(tensor.mutable_data_ptr(), inputs.data() + offset, tensor.nbytes());
      offset += tensor.nbytes();
    }
    Error error = method.execute();
    if (error != Error::Ok) fail("execute", error);
    std::printf("step %d loss %.9g\n", s, method.get_output(0).toTensor().const_data_ptr<float>()[0]);
    for (int64_t p = first_parameter; p < static_cast<int64_t>(method.outputs_size()); ++p) {
      auto parameter = method.get_output(p).toTensor();
      auto gradient = method.get_output(first_gradient + (p - first_parameter)).toTensor();
      float* w = parameter.mutable_data_ptr<float>();
      const float* g = gradient.const_data_ptr<float>();
      for (ssize_t k = 0; k < parameter.numel(); ++k) w[k] -= lr * g[k];  // SGD, in place
    }
  }
  std::ofstream out(argv[6], std::ios::binary);
  for (int64_t p = first_parameter; p < static_cast<int64_t>(method.outputs_size()); ++p) {
    auto parameter = method.get_output(p).toTensor();
    out.write(static_cast<const char*>(parameter.const_data_ptr()), parameter.nbytes());
  }
  return 0;
}
