// The parts of TensorRT the harness plays itself: the logger and its finder (setLoggerFinder),
// an IExprBuilder whose expressions carry their values (getOutputShapes), and an empty
// IPluginResourceContext (attachToContext).

#pragma once

#include "NvInferRuntime.h"

#include <cstdint>
#include <cstdio>
#include <limits>
#include <memory>
#include <string>
#include <vector>

using namespace nvinfer1;

struct Logger final : ILogger {
  std::vector<std::string> errors;
  void log(Severity s, AsciiChar const* msg) noexcept override {
    if (s <= Severity::kERROR) errors.emplace_back(msg);
    if (s <= Severity::kWARNING) std::printf("    [plugin %s] %s\n", s <= Severity::kERROR ? "error" : "warning", msg);
  }
};

struct Finder final : ILoggerFinder {
  Logger* logger;
  explicit Finder(Logger* l) : logger(l) {}
  ILogger* findLogger() noexcept override { return logger; }
};

// ---------------------------------------------------------------------------------------------
// A small IExprBuilder: every expression carries its value; only constants say so.
// ---------------------------------------------------------------------------------------------

class Expr final : public IDimensionExpr {
 public:
  Expr(int64_t v, bool c) : mI(v, c) { mImpl = &mI; }
  int64_t value() const { return mI.v; }

 private:
  struct Impl final : apiv::VDimensionExpr {
    int64_t v;
    bool c;
    Impl(int64_t v_, bool c_) : v(v_), c(c_) {}
    bool isConstant() const override { return c; }
    int64_t getConstantValue() const override { return c ? v : std::numeric_limits<int64_t>::min(); }
    bool isSizeTensor() const override { return false; }
  } mI;
};

class Builder final : public IExprBuilder {
 public:
  Builder() : mI(this) { mImpl = &mI; }
  Expr const* make(int64_t v, bool c) {
    mExprs.emplace_back(new Expr(v, c));
    return mExprs.back().get();
  }
  size_t size() const { return mExprs.size(); }

 private:
  struct Impl final : apiv::VExprBuilder {
    Builder* b;
    explicit Impl(Builder* b_) : b(b_) {}
    IDimensionExpr const* constant(int64_t v) override { return b->make(v, true); }
    IDimensionExpr const* operation(DimensionOperation op, IDimensionExpr const& x, IDimensionExpr const& y) override {
      int64_t p = static_cast<Expr const&>(x).value(), q = static_cast<Expr const&>(y).value(), r = 0;
      switch (op) {
        case DimensionOperation::kSUM: r = p + q; break;
        case DimensionOperation::kPROD: r = p * q; break;
        case DimensionOperation::kMAX: r = p > q ? p : q; break;
        case DimensionOperation::kMIN: r = p < q ? p : q; break;
        case DimensionOperation::kSUB: r = p - q; break;
        case DimensionOperation::kEQUAL: r = p == q; break;
        case DimensionOperation::kLESS: r = p < q; break;
        case DimensionOperation::kFLOOR_DIV: r = q ? (p / q - ((p % q != 0) && ((p < 0) != (q < 0)))) : 0; break;
        case DimensionOperation::kCEIL_DIV: r = q ? (p + q - 1) / q : 0; break;
      }
      return b->make(r, x.isConstant() && y.isConstant());
    }
    IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override {
      return nullptr;
    }
  } mI;
  std::vector<std::unique_ptr<Expr>> mExprs;
};

struct ResourceContext final : IPluginResourceContext {
  IGpuAllocator* getGpuAllocator() const noexcept override { return nullptr; }
  IErrorRecorder* getErrorRecorder() const noexcept override { return nullptr; }
};
