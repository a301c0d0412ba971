// Drives the plugins of libscattermoe_trt.so through TensorRT's call sequence, without TensorRT:
//
//   dlopen + setLoggerFinder + getCreators -> creator by name/version/namespace -> getFieldNames
//   -> createPlugin(fields, kBUILD) -> clone -> getCapabilityInterface (core/build/runtime)
//   -> getNbOutputs, getOutputDataTypes, getOutputShapes (with the harness's own IExprBuilder,
//      the leading dimensions symbolic) -> supportsFormatCombination (every position, refusals)
//   -> configurePlugin -> getWorkspaceSize -> getFieldsToSerialize -> createPlugin(fields,
//      kRUNTIME) (the engine's re-creation; its fields must serialise to the same bytes)
//   -> attachToContext -> onShapeChange -> enqueue on a real CUDA stream -> the output against
//      the CPU reference (scattermoe::reference, written into the case file by
//      plugins/tensorrt/tests/harness.rs).
//
// Usage: scattermoe_trt_harness LIBRARY CASE...   Without a CUDA driver or device every step but
// enqueue runs (and says so). Ends with "N passed, M failed"; exit status 1 on any failure.
// It needs neither TensorRT's libraries nor the CUDA toolkit: the CUDA driver is loaded with dlopen.
//
// Files: tensorrt_side.h (the logger, expression builder and resource context TensorRT would
// pass), cuda_driver.h (the driver, loaded at run time), case_file.h (the case format).

#include "NvInferRuntime.h"
#include "case_file.h"
#include "cuda_driver.h"
#include "tensorrt_side.h"

#include <dlfcn.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

using namespace nvinfer1;

// ---------------------------------------------------------------------------------------------
// The sequence
// ---------------------------------------------------------------------------------------------

struct Failure {
  std::string what;
};

#define REQUIRE(cond, msg)                                   \
  do {                                                       \
    if (!(cond)) {                                           \
      std::ostringstream os_;                                \
      os_ << msg;                                            \
      throw Failure{os_.str()};                              \
    }                                                        \
  } while (0)

struct Fields {
  std::vector<std::vector<uint8_t>> data;
  std::vector<PluginField> fields;
  PluginFieldCollection fc{};
  explicit Fields(std::vector<FieldValue> const& vals) {
    data.reserve(vals.size());
    for (auto const& v : vals) {
      std::vector<uint8_t> b;
      if (v.kind == 'i') { b.resize(4); std::memcpy(b.data(), &v.i, 4); }
      else if (v.kind == 'f') { b.resize(4); std::memcpy(b.data(), &v.f, 4); }
      else { b.assign(v.s.begin(), v.s.end()); b.push_back(0); }  // as TensorRT's ONNX parser does
      data.push_back(std::move(b));
    }
    for (size_t i = 0; i < vals.size(); ++i) {
      auto const& v = vals[i];
      PluginFieldType t = v.kind == 'i' ? PluginFieldType::kINT32 : v.kind == 'f' ? PluginFieldType::kFLOAT32 : PluginFieldType::kCHAR;
      int32_t len = v.kind == 's' ? static_cast<int32_t>(data[i].size()) : 1;
      fields.emplace_back(vals[i].name.c_str(), data[i].data(), t, len);
    }
    fc.nbFields = static_cast<int32_t>(fields.size());
    fc.fields = fields.data();
  }
};

std::vector<uint8_t> fieldBytes(PluginField const& f) {
  size_t size = 1;
  switch (f.type) {
    case PluginFieldType::kINT32: case PluginFieldType::kFLOAT32: size = 4; break;
    case PluginFieldType::kINT64: case PluginFieldType::kFLOAT64: size = 8; break;
    case PluginFieldType::kFLOAT16: case PluginFieldType::kBF16: case PluginFieldType::kINT16: size = 2; break;
    default: size = 1;
  }
  auto const* p = static_cast<uint8_t const*>(f.data);
  return p ? std::vector<uint8_t>(p, p + size * f.length) : std::vector<uint8_t>{};
}

std::string describe(PluginFieldCollection const* fc) {
  std::ostringstream os;
  for (int32_t i = 0; i < fc->nbFields; ++i) {
    PluginField const& f = fc->fields[i];
    os << (i ? ", " : "") << f.name << "=";
    if (f.type == PluginFieldType::kCHAR) os << static_cast<char const*>(f.data);
    else if (f.type == PluginFieldType::kINT32) os << *static_cast<int32_t const*>(f.data);
    else if (f.type == PluginFieldType::kFLOAT32) os << *static_cast<float const*>(f.data);
    else os << "?";
  }
  return os.str();
}

struct Owned {
  IPluginV3* p = nullptr;
  explicit Owned(IPluginV3* q) : p(q) {}
  ~Owned() { delete p; }
  Owned(Owned const&) = delete;
  Owned& operator=(Owned const&) = delete;
};

IPluginCreatorV3One* findCreator(IPluginCreatorInterface* const* creators, int32_t n, std::string const& name) {
  for (int32_t i = 0; i < n; ++i) {
    if (std::strcmp(creators[i]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") != 0) continue;
    auto* c = static_cast<IPluginCreatorV3One*>(creators[i]);
    if (name == c->getPluginName() && std::string("1") == c->getPluginVersion() &&
        std::string("ai.scattermoe") == c->getPluginNamespace())
      return c;
  }
  return nullptr;
}

void runCase(Case const& c, IPluginCreatorInterface* const* creators, int32_t nbCreators, Cuda& cuda, Logger& logger) {
  if (c.syncChecks) setenv("SCATTERMOE_CUDA_SYNC_CHECKS", "1", 1);
  else unsetenv("SCATTERMOE_CUDA_SYNC_CHECKS");
  logger.errors.clear();
  std::printf("  creator: ");
  IPluginCreatorV3One* creator = findCreator(creators, nbCreators, c.op);
  REQUIRE(creator != nullptr, "no creator " << c.op << " version 1 namespace ai.scattermoe");
  PluginFieldCollection const* names = creator->getFieldNames();
  std::printf("%s v%s ns %s, %d fields listed\n", creator->getPluginName(), creator->getPluginVersion(),
              creator->getPluginNamespace(), names->nbFields);
  for (auto const& f : c.fields) {
    bool listed = false;
    for (int32_t i = 0; i < names->nbFields; ++i) listed |= f.name == names->fields[i].name;
    REQUIRE(listed || c.expect == "create_error", "field " << f.name << " is not listed by the creator");
  }

  Fields given(c.fields);
  Owned made(creator->createPlugin(c.name.c_str(), &given.fc, TensorRTPhase::kBUILD));
  if (c.expect == "create_error") {
    REQUIRE(made.p == nullptr, "createPlugin accepted fields it should refuse");
    REQUIRE(!logger.errors.empty(), "createPlugin refused without logging an error");
    std::printf("  createPlugin refused the fields, as expected\n");
    return;
  }
  REQUIRE(made.p != nullptr, "createPlugin failed");

  // TensorRT keeps clones of what it is given.
  Owned plugin(made.p->clone());
  REQUIRE(plugin.p != nullptr, "clone failed");
  auto* core = static_cast<IPluginV3OneCore*>(plugin.p->getCapabilityInterface(PluginCapabilityType::kCORE));
  auto* build = static_cast<IPluginV3OneBuild*>(plugin.p->getCapabilityInterface(PluginCapabilityType::kBUILD));
  auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin.p->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  REQUIRE(core && build && runtime, "a capability interface is missing");
  REQUIRE(std::string(core->getInterfaceInfo().kind) == "PLUGIN_V3ONE_CORE" &&
              std::string(build->getInterfaceInfo().kind) == "PLUGIN_V3ONE_BUILD" &&
              std::string(runtime->getInterfaceInfo().kind) == "PLUGIN_V3ONE_RUNTIME",
          "capability interfaces have the wrong kinds");
  REQUIRE(c.op == core->getPluginName() && std::string("1") == core->getPluginVersion() &&
              std::string("ai.scattermoe") == core->getPluginNamespace(),
          "core names differ from the creator's");
  std::printf("  createPlugin, clone, capabilities: ok\n");

  int32_t const nIn = static_cast<int32_t>(c.inputs.size());
  REQUIRE(build->getNbOutputs() == 1, "getNbOutputs = " << build->getNbOutputs());

  std::vector<DataType> inTypes;
  for (auto const& t : c.inputs) inTypes.push_back(t.type);
  DataType outType = DataType::kFLOAT;
  REQUIRE(build->getOutputDataTypes(&outType, 1, inTypes.data(), nIn) == 0, "getOutputDataTypes failed");
  REQUIRE(outType == c.output.type, "output type " << dtypeName(outType) << ", expected " << dtypeName(c.output.type));

  Builder eb;
  std::vector<DimsExprs> inExprs(nIn);
  for (int32_t i = 0; i < nIn; ++i) {
    inExprs[i].nbDims = static_cast<int32_t>(c.inputs[i].dims.size());
    for (size_t a = 0; a < c.inputs[i].dims.size(); ++a)
      inExprs[i].d[a] = eb.make(c.inputs[i].dims[a], c.inputs[i].dyn[a] != '1');
  }
  DimsExprs outExpr{};
  REQUIRE(build->getOutputShapes(inExprs.data(), nIn, nullptr, 0, &outExpr, 1, eb) == 0, "getOutputShapes failed");
  std::ostringstream shape;
  REQUIRE(outExpr.nbDims == static_cast<int32_t>(c.output.dims.size()), "output rank " << outExpr.nbDims);
  for (int32_t a = 0; a < outExpr.nbDims; ++a) {
    auto const* e = static_cast<Expr const*>(outExpr.d[a]);
    REQUIRE(e != nullptr, "output dimension " << a << " is null");
    shape << (a ? ", " : "") << e->value() << (e->isConstant() ? "" : "*");
    REQUIRE(e->value() == c.output.dims[a], "output dimension " << a << " = " << e->value() << ", expected " << c.output.dims[a]);
  }
  std::printf("  getOutputDataTypes %s, getOutputShapes [%s] (* symbolic, %zu expressions): ok\n", dtypeName(outType),
              shape.str().c_str(), eb.size());

  // Formats: the case's combination at every position, and refusals.
  auto linear = [&](Tensor const& t, bool symbolic) {
    DynamicPluginTensorDesc d{};
    d.desc.dims = t.trtDims(symbolic);
    d.desc.type = t.type;
    d.desc.format = TensorFormat::kLINEAR;
    d.desc.scale = 1.0f;
    d.min = t.trtDims(false);
    d.opt = t.trtDims(false);
    d.max = t.trtDims(false);
    for (size_t a = 0; a < t.dims.size(); ++a)
      if (symbolic && t.dyn[a] == '1') {
        d.min.d[a] = 1;
        d.max.d[a] = 2 * t.dims[a] + 7;
      }
    return d;
  };
  std::vector<DynamicPluginTensorDesc> io;
  for (auto const& t : c.inputs) io.push_back(linear(t, true));
  io.push_back(linear(c.output, true));
  int32_t const nIO = nIn + 1;
  for (int32_t pos = 0; pos < nIO; ++pos)
    REQUIRE(build->supportsFormatCombination(pos, io.data(), nIn, 1), "supportsFormatCombination refused position " << pos);
  int refusals = 0;
  {
    auto bad = io;
    bad[0].desc.format = TensorFormat::kHWC8;
    REQUIRE(!build->supportsFormatCombination(0, bad.data(), nIn, 1), "accepted a non-linear format");
    ++refusals;
    bad = io;
    bad[0].desc.type = DataType::kINT8;
    REQUIRE(!build->supportsFormatCombination(0, bad.data(), nIn, 1), "accepted int8 at position 0");
    ++refusals;
    bad = io;
    bad[nIn].desc.type = c.output.type == DataType::kFLOAT ? DataType::kHALF : DataType::kFLOAT;
    REQUIRE(!build->supportsFormatCombination(nIn, bad.data(), nIn, 1), "accepted an output type that differs from the contract's");
    ++refusals;
  }
  std::printf("  supportsFormatCombination: %d positions accepted, %d refusals: ok\n", nIO, refusals);

  std::vector<DynamicPluginTensorDesc> inDyn(io.begin(), io.begin() + nIn), outDyn(io.begin() + nIn, io.end());
  REQUIRE(build->configurePlugin(inDyn.data(), nIn, outDyn.data(), 1) == 0, "configurePlugin failed");
  size_t const ws = build->getWorkspaceSize(inDyn.data(), nIn, outDyn.data(), 1);
  REQUIRE(ws > 0, "getWorkspaceSize = 0");
  std::printf("  configurePlugin ok, getWorkspaceSize %zu bytes (largest shapes of the profile)\n", ws);

  // Serialisation: the engine stores these fields and re-creates the plugin from them.
  PluginFieldCollection const* ser = runtime->getFieldsToSerialize();
  // every field the creator lists, but those without a default that the plugin was not given
  // (block_size): at most the creator's fields, each one of them
  REQUIRE(ser != nullptr && ser->nbFields >= 1 && ser->nbFields <= names->nbFields, "getFieldsToSerialize gave " << (ser ? ser->nbFields : -1) << " fields");
  for (int32_t i = 0; i < ser->nbFields; ++i) {
    bool listed = false;
    for (int32_t j = 0; j < names->nbFields; ++j) listed = listed || std::string(ser->fields[i].name) == names->fields[j].name;
    REQUIRE(listed, "getFieldsToSerialize gave field " << ser->fields[i].name << ", which the creator does not list");
  }
  std::string serText = describe(ser);
  Owned again(creator->createPlugin(c.name.c_str(), ser, TensorRTPhase::kRUNTIME));
  REQUIRE(again.p != nullptr, "re-creation from the serialised fields failed");
  auto* againRt = static_cast<IPluginV3OneRuntime*>(again.p->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  PluginFieldCollection const* ser2 = againRt->getFieldsToSerialize();
  REQUIRE(ser2->nbFields == ser->nbFields, "re-created plugin serialises differently");
  for (int32_t i = 0; i < ser->nbFields; ++i) {
    REQUIRE(std::string(ser->fields[i].name) == ser2->fields[i].name && ser->fields[i].type == ser2->fields[i].type &&
                ser->fields[i].length == ser2->fields[i].length && fieldBytes(ser->fields[i]) == fieldBytes(ser2->fields[i]),
            "field " << ser->fields[i].name << " differs after re-creation");
  }
  std::printf("  getFieldsToSerialize {%s}; createPlugin(kRUNTIME) from them serialises identically: ok\n", serText.c_str());

  ResourceContext rc;
  Owned exec(againRt->attachToContext(&rc));
  REQUIRE(exec.p != nullptr, "attachToContext failed");
  auto* rt = static_cast<IPluginV3OneRuntime*>(exec.p->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  std::vector<PluginTensorDesc> inDesc, outDesc;
  for (auto const& t : c.inputs) inDesc.push_back(PluginTensorDesc{t.trtDims(false), t.type, TensorFormat::kLINEAR, 1.0f});
  outDesc.push_back(PluginTensorDesc{c.output.trtDims(false), c.output.type, TensorFormat::kLINEAR, 1.0f});
  REQUIRE(rt->onShapeChange(inDesc.data(), nIn, outDesc.data(), 1) == 0, "onShapeChange failed");
  std::printf("  attachToContext, onShapeChange: ok\n");

  if (!cuda.ok) {
    std::printf("  enqueue: skipped (%s)\n", cuda.why.c_str());
    return;
  }
  std::vector<std::unique_ptr<DeviceBuffer>> bufs;
  std::vector<void const*> inPtrs;
  for (auto const& t : c.inputs) {
    bufs.emplace_back(new DeviceBuffer(&cuda, t.bytes()));
    REQUIRE(bufs.back()->p != 0, "cuMemAlloc failed");
    if (t.bytes() > 0) REQUIRE(cuda.cuMemcpyHtoD(bufs.back()->p, t.data.data(), t.bytes()) == 0, "cuMemcpyHtoD failed");
    inPtrs.push_back(reinterpret_cast<void const*>(bufs.back()->p));
  }
  DeviceBuffer out(&cuda, c.output.bytes()), work(&cuda, ws);
  REQUIRE(out.p != 0 && work.p != 0, "cuMemAlloc failed");
  // Poison the output and workspace: whatever the plugin does not write shows up.
  cuda.cuMemsetD8(out.p, 0xff, c.output.bytes() > 0 ? c.output.bytes() : 1);
  cuda.cuMemsetD8(work.p, 0xa5, ws);
  void* outPtrs[1] = {reinterpret_cast<void*>(out.p)};
  int32_t rc2 = rt->enqueue(inDesc.data(), outDesc.data(), inPtrs.data(), outPtrs, reinterpret_cast<void*>(work.p),
                            reinterpret_cast<cudaStream_t>(cuda.stream));
  CUresult sync = cuda.cuStreamSynchronize(cuda.stream);
  REQUIRE(sync == 0, "cuStreamSynchronize after enqueue failed (" << sync << ")");
  if (c.expect == "enqueue_error") {
    REQUIRE(rc2 != 0, "enqueue succeeded on inputs it should refuse");
    REQUIRE(!logger.errors.empty(), "enqueue failed without logging why");
    std::printf("  enqueue refused the inputs, as expected: %s\n", logger.errors.back().c_str());
    return;
  }
  REQUIRE(rc2 == 0, "enqueue failed");
  std::vector<uint8_t> got(c.output.bytes());
  if (!got.empty()) REQUIRE(cuda.cuMemcpyDtoH(got.data(), out.p, got.size()) == 0, "cuMemcpyDtoH failed");
  double maxDiff = 0, maxRef = 0;
  size_t mismatches = 0;
  size_t const n = c.output.count(), es = dtypeSize(c.output.type);
  for (size_t i = 0; i < n; ++i) {
    double a = toFloat(c.output.type, got.data() + i * es), b = c.reference[i];
    if (c.output.type == DataType::kBOOL) {
      mismatches += (a != b);
      continue;
    }
    double d = std::fabs(a - b);
    if (!(d <= maxDiff)) maxDiff = std::isnan(d) ? INFINITY : d;
    maxRef = std::fmax(maxRef, std::fabs(b));
  }
  if (c.output.type == DataType::kBOOL) {
    REQUIRE(mismatches == 0, mismatches << " of " << n << " mask values differ from the CPU reference");
    std::printf("  enqueue on the stream: %zu mask values equal the CPU reference\n", n);
  } else {
    double rel = maxRef > 0 ? maxDiff / maxRef : maxDiff;
    REQUIRE(rel <= c.tol, "relative error " << rel << " exceeds " << c.tol);
    std::printf("  enqueue on the stream: %zu values, max relative error %.3e vs the CPU reference (tolerance %.0e)\n", n, rel, c.tol);
  }
}

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s LIBSCATTERMOE_TRT.so CASE...\n", argv[0]);
    return 2;
  }
  void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    std::fprintf(stderr, "cannot load %s: %s\n", argv[1], dlerror());
    return 2;
  }
  using GetCreators = IPluginCreatorInterface* const* (*)(int32_t&);
  using SetLoggerFinder = void (*)(ILoggerFinder*);
  auto getCreators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
  auto setLoggerFinder = reinterpret_cast<SetLoggerFinder>(dlsym(lib, "setLoggerFinder"));
  if (getCreators == nullptr || setLoggerFinder == nullptr) {
    std::fprintf(stderr, "%s does not export getCreators and setLoggerFinder (built without TensorRT headers?)\n", argv[1]);
    return 2;
  }
  Logger logger;
  Finder finder(&logger);
  setLoggerFinder(&finder);
  int32_t nbCreators = 0;
  IPluginCreatorInterface* const* creators = getCreators(nbCreators);
  std::printf("%s: %d creators:", argv[1], nbCreators);
  for (int32_t i = 0; i < nbCreators; ++i) {
    auto* c = static_cast<IPluginCreatorV3One*>(creators[i]);
    std::printf(" %s/%s/%s (%s)", c->getPluginName(), c->getPluginVersion(), c->getPluginNamespace(), c->getInterfaceInfo().kind);
  }
  std::printf("\n");

  Cuda cuda;
  cuda.init();
  if (!cuda.ok) std::printf("no GPU: %s; every step but enqueue runs\n", cuda.why.c_str());

  int passed = 0, failed = 0;
  for (int i = 2; i < argc; ++i) {
    Case c;
    std::string err;
    if (!readCase(argv[i], c, err)) {
      std::printf("FAIL %s: %s\n", argv[i], err.c_str());
      ++failed;
      continue;
    }
    std::printf("case %s (%s, %zu inputs, expect %s)\n", c.name.c_str(), c.op.c_str(), c.inputs.size(), c.expect.c_str());
    try {
      runCase(c, creators, nbCreators, cuda, logger);
      std::printf("PASS %s\n", c.name.c_str());
      ++passed;
    } catch (Failure const& f) {
      std::printf("FAIL %s: %s\n", c.name.c_str(), f.what.c_str());
      ++failed;
    }
    std::fflush(stdout);
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
