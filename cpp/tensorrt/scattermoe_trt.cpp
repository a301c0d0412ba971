// TensorRT IPluginV3 plugins for the ai.scattermoe ops (ScatterMoE, ParallelLinear, CapacityMask).
//
// Thin on purpose: every method converts TensorRT's structures into the bridge's
// (plugins/tensorrt/src/bridge.rs) and calls the Rust function that decides. Names, fields, type
// and format rules, shape rules, validation, workspace sizes and the launch all live there; this
// file knows no attribute name.
// Errors thrown by the bridge (rust::Error) are caught here, logged through the logger TensorRT
// gave setLoggerFinder, and turned into TensorRT's failure values.

#include "NvInferRuntime.h"
#include "scattermoe_trt_bridge.h"

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace scattermoe_trt {

using namespace nvinfer1;
namespace bridge = ::scattermoe::trt;

namespace {

std::atomic<ILoggerFinder*> gLoggerFinder{nullptr};

void log(ILogger::Severity severity, std::string const& msg) noexcept {
  ILoggerFinder* finder = gLoggerFinder.load();
  ILogger* logger = nullptr;
  if (finder != nullptr) {
    try {
      logger = finder->findLogger();
    } catch (...) {
      logger = nullptr;
    }
  }
  if (logger != nullptr) {
    logger->log(severity, msg.c_str());
  } else if (severity <= ILogger::Severity::kWARNING) {
    std::fprintf(stderr, "scattermoe-trt: %s\n", msg.c_str());
  }
}

void logError(char const* what, std::exception const& e) noexcept {
  log(ILogger::Severity::kERROR, std::string(what) + ": " + e.what());
}

rust::Vec<int64_t> dimsVec(Dims const& d) {
  rust::Vec<int64_t> v;
  for (int32_t i = 0; i < d.nbDims; ++i) v.push_back(d.d[i]);
  return v;
}

bridge::TensorDesc toDesc(PluginTensorDesc const& t) {
  return bridge::TensorDesc{static_cast<int32_t>(t.type), t.format == TensorFormat::kLINEAR, dimsVec(t.dims)};
}

std::vector<bridge::TensorDesc> toDescs(PluginTensorDesc const* t, int32_t n) {
  std::vector<bridge::TensorDesc> v;
  for (int32_t i = 0; i < n; ++i) v.push_back(toDesc(t[i]));
  return v;
}

std::vector<bridge::TensorDesc> toDescs(DynamicPluginTensorDesc const* t, int32_t n) {
  std::vector<bridge::TensorDesc> v;
  for (int32_t i = 0; i < n; ++i) v.push_back(toDesc(t[i].desc));
  return v;
}

std::vector<bridge::Range> toRanges(DynamicPluginTensorDesc const* t, int32_t n) {
  std::vector<bridge::Range> v;
  for (int32_t i = 0; i < n; ++i) v.push_back(bridge::Range{toDesc(t[i].desc), dimsVec(t[i].min), dimsVec(t[i].max)});
  return v;
}

template <typename T>
rust::Slice<T const> slice(std::vector<T> const& v) {
  return rust::Slice<T const>(v.data(), v.size());
}

std::vector<bridge::Field> toFields(PluginFieldCollection const* fc) {
  std::vector<bridge::Field> v;
  if (fc == nullptr) return v;
  for (int32_t i = 0; i < fc->nbFields; ++i) {
    PluginField const& f = fc->fields[i];
    bridge::Field out;
    out.name = rust::String(f.name != nullptr ? f.name : "");
    out.field_type = static_cast<int32_t>(f.type);
    out.length = f.length;
    size_t bytes = bridge::field_type_size(out.field_type) * static_cast<size_t>(f.length > 0 ? f.length : 0);
    auto const* data = static_cast<uint8_t const*>(f.data);
    if (data != nullptr) {
      for (size_t b = 0; b < bytes; ++b) out.data.push_back(data[b]);
    }
    v.push_back(std::move(out));
  }
  return v;
}

// Fields owned by a plugin or creator, with the PluginFieldCollection TensorRT reads them from.
class FieldStore {
 public:
  PluginFieldCollection const* set(rust::Vec<bridge::Field> const& fields) {
    mNames.clear();
    mData.clear();
    mFields.clear();
    for (auto const& f : fields) {
      mNames.emplace_back(f.name.data(), f.name.size());
      mData.emplace_back(f.data.begin(), f.data.end());
    }
    size_t i = 0;
    for (auto const& f : fields) {
      void const* data = mData[i].empty() ? nullptr : mData[i].data();
      mFields.emplace_back(mNames[i].c_str(), data, static_cast<PluginFieldType>(f.field_type), f.length);
      ++i;
    }
    mCollection.nbFields = static_cast<int32_t>(mFields.size());
    mCollection.fields = mFields.data();
    return &mCollection;
  }

  PluginFieldCollection const* collection() const { return &mCollection; }

 private:
  std::vector<std::string> mNames;
  std::vector<std::vector<uint8_t>> mData;
  std::vector<PluginField> mFields;
  PluginFieldCollection mCollection{};
};

std::string toString(rust::String const& s) { return std::string(s.data(), s.size()); }

class Plugin final : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime {
 public:
  explicit Plugin(rust::Box<bridge::Plugin> core)
      : mCore(std::move(core)),
        mName(toString(bridge::plugin_name(mCore->op()))),
        mVersion(toString(bridge::plugin_version())),
        mNamespace(toString(bridge::plugin_namespace())) {}

  // IPluginV3
  IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override {
    switch (type) {
      case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
      case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
      case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
  }

  IPluginV3* clone() noexcept override {
    try {
      auto* p = new Plugin(mCore->clone_plugin());
      p->mNbInputs = mNbInputs;
      return p;
    } catch (std::exception const& e) {
      logError(mName.c_str(), e);
      return nullptr;
    }
  }

  // IPluginV3OneCore
  AsciiChar const* getPluginName() const noexcept override { return mName.c_str(); }
  AsciiChar const* getPluginVersion() const noexcept override { return mVersion.c_str(); }
  AsciiChar const* getPluginNamespace() const noexcept override { return mNamespace.c_str(); }

  // IPluginV3OneBuild
  int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out,
                          int32_t nbOutputs) noexcept override {
    try {
      mCore->configure(slice(toRanges(in, nbInputs)), slice(toRanges(out, nbOutputs)));
      mNbInputs = nbInputs;
      return 0;
    } catch (std::exception const& e) {
      logError("configurePlugin", e);
      return -1;
    }
  }

  int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                             int32_t nbInputs) const noexcept override {
    try {
      std::vector<int32_t> in;
      for (int32_t i = 0; i < nbInputs; ++i) in.push_back(static_cast<int32_t>(inputTypes[i]));
      rust::Vec<int32_t> out = mCore->output_types(slice(in));
      if (static_cast<int32_t>(out.size()) != nbOutputs) return -1;
      for (int32_t i = 0; i < nbOutputs; ++i) outputTypes[i] = static_cast<DataType>(out[i]);
      return 0;
    } catch (std::exception const& e) {
      logError("getOutputDataTypes", e);
      return -1;
    }
  }

  int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
                          int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
                          IExprBuilder& exprBuilder) noexcept override {
    try {
      // The dimensions known now (constants) go to the contract's check; the others are -1.
      std::vector<bridge::TensorDesc> known;
      for (int32_t i = 0; i < nbInputs; ++i) {
        bridge::TensorDesc d{-1, true, {}};
        for (int32_t a = 0; a < inputs[i].nbDims; ++a) {
          IDimensionExpr const* e = inputs[i].d[a];
          d.dims.push_back(e != nullptr && e->isConstant() ? e->getConstantValue() : -1);
        }
        known.push_back(std::move(d));
      }
      rust::Vec<bridge::OutputShape> shapes = mCore->output_shapes(slice(known));
      if (static_cast<int32_t>(shapes.size()) != nbOutputs) return -1;
      for (int32_t o = 0; o < nbOutputs; ++o) {
        auto const& dims = shapes[o].dims;
        if (dims.size() > static_cast<size_t>(Dims::MAX_DIMS)) return -1;
        outputs[o].nbDims = static_cast<int32_t>(dims.size());
        for (size_t a = 0; a < dims.size(); ++a) {
          DimsExprs const& src = inputs[dims[a].input];
          if (dims[a].axis >= 0) {
            outputs[o].d[a] = src.d[dims[a].axis];
          } else {
            IDimensionExpr const* p = exprBuilder.constant(1);
            for (int32_t j = 0; j < src.nbDims; ++j) p = exprBuilder.operation(DimensionOperation::kPROD, *p, *src.d[j]);
            outputs[o].d[a] = p;
          }
        }
      }
      return 0;
    } catch (std::exception const& e) {
      logError("getOutputShapes", e);
      return -1;
    }
  }

  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override {
    try {
      return mCore->supports_format(pos, slice(toDescs(inOut, nbInputs + nbOutputs)), nbInputs);
    } catch (std::exception const& e) {
      logError("supportsFormatCombination", e);
      return false;
    }
  }

  int32_t getNbOutputs() const noexcept override { return mCore->nb_outputs(); }

  size_t getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs, DynamicPluginTensorDesc const* outputs,
                          int32_t nbOutputs) const noexcept override {
    try {
      return mCore->workspace_size(slice(toRanges(inputs, nbInputs)), slice(toRanges(outputs, nbOutputs)));
    } catch (std::exception const& e) {
      logError("getWorkspaceSize", e);
      return 0;
    }
  }

  // IPluginV3OneRuntime
  int32_t onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out,
                        int32_t nbOutputs) noexcept override {
    try {
      mCore->on_shape_change(slice(toDescs(in, nbInputs)), slice(toDescs(out, nbOutputs)));
      mNbInputs = nbInputs;
      return 0;
    } catch (std::exception const& e) {
      logError("onShapeChange", e);
      return -1;
    }
  }

  int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc, void const* const* inputs,
                  void* const* outputs, void* workspace, cudaStream_t stream) noexcept override {
    try {
      int32_t const nbOutputs = mCore->nb_outputs();
      if (mNbInputs <= 0) throw std::runtime_error(mName + ": enqueue before configurePlugin/onShapeChange");
      std::vector<uint64_t> in, out;
      for (int32_t i = 0; i < mNbInputs; ++i) in.push_back(reinterpret_cast<uint64_t>(inputs[i]));
      for (int32_t i = 0; i < nbOutputs; ++i) out.push_back(reinterpret_cast<uint64_t>(outputs[i]));
      mCore->enqueue(slice(toDescs(inputDesc, mNbInputs)), slice(toDescs(outputDesc, nbOutputs)), slice(in), slice(out),
                     reinterpret_cast<uint64_t>(workspace), reinterpret_cast<uint64_t>(stream));
      return 0;
    } catch (std::exception const& e) {
      logError("enqueue", e);
      return -1;
    }
  }

  IPluginV3* attachToContext(IPluginResourceContext* /*context*/) noexcept override { return clone(); }

  PluginFieldCollection const* getFieldsToSerialize() noexcept override {
    try {
      return mSerialized.set(mCore->fields_to_serialize());
    } catch (std::exception const& e) {
      logError("getFieldsToSerialize", e);
      return nullptr;
    }
  }

 private:
  rust::Box<bridge::Plugin> mCore;
  std::string mName, mVersion, mNamespace;
  int32_t mNbInputs{0};
  FieldStore mSerialized;
};

class Creator final : public IPluginCreatorV3One {
 public:
  explicit Creator(bridge::Op op)
      : mOp(op),
        mName(toString(bridge::plugin_name(op))),
        mVersion(toString(bridge::plugin_version())),
        mNamespace(toString(bridge::plugin_namespace())) {
    mFieldNames.set(bridge::field_names(op));
  }

  IPluginV3* createPlugin(AsciiChar const* name, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept override {
    try {
      std::vector<bridge::Field> fields = toFields(fc);
      return new Plugin(bridge::create_plugin(mOp, slice(fields)));
    } catch (std::exception const& e) {
      logError((std::string("createPlugin(") + (name != nullptr ? name : "") + ")").c_str(), e);
      return nullptr;
    }
  }

  PluginFieldCollection const* getFieldNames() noexcept override { return mFieldNames.collection(); }
  AsciiChar const* getPluginName() const noexcept override { return mName.c_str(); }
  AsciiChar const* getPluginVersion() const noexcept override { return mVersion.c_str(); }
  AsciiChar const* getPluginNamespace() const noexcept override { return mNamespace.c_str(); }

 private:
  bridge::Op mOp;
  std::string mName, mVersion, mNamespace;
  FieldStore mFieldNames;
};

}  // namespace

}  // namespace scattermoe_trt

// Called by the Rust exports getCreators / setLoggerFinder (plugins/tensorrt/src/lib.rs): the
// library's exported symbols are the cdylib's, so the entry points are Rust functions.
extern "C" nvinfer1::IPluginCreatorInterface* const* scattermoe_trt_get_creators(int32_t* nbCreators) noexcept {
  using scattermoe_trt::Creator;
  try {
    static Creator moe(scattermoe::trt::Op::ScatterMoE);
    static Creator linear(scattermoe::trt::Op::ParallelLinear);
    static Creator mask(scattermoe::trt::Op::CapacityMask);
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&moe, &linear, &mask};
    *nbCreators = 3;
    return creators;
  } catch (std::exception const& e) {
    scattermoe_trt::logError("getCreators", e);
    *nbCreators = 0;
    return nullptr;
  }
}

extern "C" void scattermoe_trt_set_logger_finder(nvinfer1::ILoggerFinder* finder) noexcept {
  scattermoe_trt::gLoggerFinder.store(finder);
}
