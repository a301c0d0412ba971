// A case as plugins/tensorrt/tests/harness.rs writes it: the op, its fields, the input tensors
// (type, dims, which dims are symbolic at build time, bytes) and the CPU reference's output.

#pragma once

#include "NvInferRuntime.h"

#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

using namespace nvinfer1;

inline size_t dtypeSize(DataType t) {
  switch (t) {
    case DataType::kFLOAT: case DataType::kINT32: return 4;
    case DataType::kHALF: case DataType::kBF16: return 2;
    case DataType::kINT64: return 8;
    default: return 1;
  }
}

inline char const* dtypeName(DataType t) {
  switch (t) {
    case DataType::kFLOAT: return "f32";
    case DataType::kHALF: return "f16";
    case DataType::kBF16: return "bf16";
    case DataType::kINT32: return "i32";
    case DataType::kINT64: return "i64";
    case DataType::kBOOL: return "bool";
    default: return "?";
  }
}

struct Tensor {
  DataType type;
  std::vector<int64_t> dims;
  std::string dyn;  // '1' where the dimension is symbolic at build time
  std::vector<uint8_t> data;
  size_t count() const {
    size_t n = 1;
    for (auto d : dims) n *= static_cast<size_t>(d);
    return n;
  }
  size_t bytes() const { return count() * dtypeSize(type); }
  Dims trtDims(bool symbolic) const {
    Dims d;
    d.nbDims = static_cast<int32_t>(dims.size());
    for (size_t i = 0; i < dims.size(); ++i) d.d[i] = symbolic && dyn[i] == '1' ? -1 : dims[i];
    return d;
  }
};

struct FieldValue {
  std::string name;
  char kind;  // i f s
  int32_t i = 0;
  float f = 0;
  std::string s;
};

struct Case {
  std::string name, op, expect;
  bool syncChecks = false;
  double tol = 0;
  std::vector<FieldValue> fields;
  std::vector<Tensor> inputs;
  Tensor output;
  std::vector<float> reference;  // float outputs as f32; bool outputs as 0/1
};

inline Tensor parseTensor(std::istringstream& ls) {
  Tensor t;
  int type, rank;
  ls >> type >> rank;
  t.type = static_cast<DataType>(type);
  t.dims.resize(rank);
  for (auto& d : t.dims) ls >> d;
  std::string word;
  ls >> word >> t.dyn;
  if (t.dyn == "-") t.dyn.clear();
  return t;
}

inline bool readCase(std::string const& path, Case& c, std::string& err) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    err = "cannot open " + path;
    return false;
  }
  std::string line;
  std::getline(in, line);
  if (line != "scattermoe-trt-case 1") {
    err = path + ": not a case file";
    return false;
  }
  while (std::getline(in, line) && line != "end") {
    std::istringstream ls(line);
    std::string key;
    ls >> key;
    if (key == "name") ls >> c.name;
    else if (key == "op") ls >> c.op;
    else if (key == "expect") ls >> c.expect;
    else if (key == "sync_checks") { int v; ls >> v; c.syncChecks = v != 0; }
    else if (key == "tol") ls >> c.tol;
    else if (key == "field") {
      FieldValue f;
      ls >> f.name >> f.kind;
      if (f.kind == 'i') ls >> f.i;
      else if (f.kind == 'f') ls >> f.f;
      else ls >> f.s;
      c.fields.push_back(f);
    } else if (key == "input") c.inputs.push_back(parseTensor(ls));
    else if (key == "output") c.output = parseTensor(ls);
  }
  for (auto& t : c.inputs) {
    t.data.resize(t.bytes());
    in.read(reinterpret_cast<char*>(t.data.data()), static_cast<std::streamsize>(t.data.size()));
  }
  c.reference.resize(c.output.count());
  in.read(reinterpret_cast<char*>(c.reference.data()), static_cast<std::streamsize>(c.reference.size() * sizeof(float)));
  if (!in) {
    err = path + ": truncated";
    return false;
  }
  return true;
}

inline float halfToFloat(uint16_t h) {
  uint32_t sign = (h >> 15) & 1, exp = (h >> 10) & 0x1f, man = h & 0x3ff, f;
  if (exp == 0) {
    if (man == 0) f = sign << 31;
    else {
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; --exp; }
      man &= 0x3ff;
      f = (sign << 31) | (exp << 23) | (man << 13);
    }
  } else if (exp == 31) f = (sign << 31) | 0x7f800000 | (man << 13);
  else f = (sign << 31) | ((exp - 15 + 127) << 23) | (man << 13);
  float r;
  std::memcpy(&r, &f, 4);
  return r;
}

inline float toFloat(DataType t, uint8_t const* p) {
  switch (t) {
    case DataType::kFLOAT: { float v; std::memcpy(&v, p, 4); return v; }
    case DataType::kHALF: { uint16_t h; std::memcpy(&h, p, 2); return halfToFloat(h); }
    case DataType::kBF16: { uint16_t h; std::memcpy(&h, p, 2); uint32_t u = uint32_t(h) << 16; float v; std::memcpy(&v, &u, 4); return v; }
    default: return p[0] ? 1.0f : 0.0f;
  }
}
