"""Loads libscattermoe_trt.so into TensorRT-RTX's plugin registry (its own C++ loader:
IPluginRegistry::loadLibrary, which calls setLoggerFinder and getCreators), finds each creator by
name, version and namespace, and creates each plugin from the fields given in a JSON file (the
fields TensorRT's ONNX parser passes for the nodes `scattermoe rewrite --target tensorrt` writes;
plugins/tensorrt/tests/registry.rs makes the file).

Usage: python registry.py LIBRARY PLUGINS.json
Needs tensorrt_rtx_bindings (scripts/setup-tensorrt.sh) with its libs folder and CUDA 13's runtime
on LD_LIBRARY_PATH. Ends with "N passed, M failed".
"""

import json
import sys

import numpy as np
import tensorrt_rtx_bindings as trt

NAMESPACE = "ai.scattermoe"
VERSION = "1"
OPS = ["ScatterMoE", "ParallelLinear", "CapacityMask"]

TYPES = {
    1: (trt.PluginFieldType.FLOAT32, np.float32),
    5: (trt.PluginFieldType.INT32, np.int32),
    6: (trt.PluginFieldType.CHAR, np.int8),
}


def field(f):
    kind, dtype = TYPES[f["type"]]
    data = np.frombuffer(bytes(f["data"]), dtype=dtype).copy()
    return trt.PluginField(f["name"], data, kind)


def main():
    lib, spec = sys.argv[1], sys.argv[2]
    plugins = json.load(open(spec))
    logger = trt.Logger(trt.Logger.WARNING)  # noqa: F841 (keeps TensorRT's default logger alive)
    print(f"TensorRT-RTX {trt.__version__}")
    registry = trt.get_plugin_registry()
    passed = failed = 0

    def check(ok, what):
        nonlocal passed, failed
        print(("ok    " if ok else "FAIL  ") + what)
        if ok:
            passed += 1
        else:
            failed += 1
        return ok

    handle = registry.load_library(lib)
    if not check(handle is not None, f"load_library({lib})"):
        print(f"{passed} passed, {failed} failed")
        return 1
    ours = [c for c in registry.all_creators if c.plugin_namespace == NAMESPACE]
    check(sorted(c.name for c in ours) == sorted(OPS),
          "registry lists " + ", ".join(f"{c.name}/{c.plugin_version}/{c.plugin_namespace}" for c in ours))
    for op in OPS:
        c = registry.get_creator(op, VERSION, NAMESPACE)
        ok = c is not None and c.name == op and c.plugin_version == VERSION and c.plugin_namespace == NAMESPACE
        names = [f.name for f in c.field_names] if c is not None else []
        check(ok, f"get_creator({op!r}, {VERSION!r}, {NAMESPACE!r}): fields {names}")
    check(registry.get_creator("ScatterMoE", "2", NAMESPACE) is None, "get_creator with version '2' finds nothing")
    check(registry.get_creator("ScatterMoE", VERSION, "") is None, "get_creator in the default namespace finds nothing")

    for p in plugins:
        c = registry.get_creator(p["op"], p["version"], p["namespace"])
        if not check(c is not None, f"{p['source']}: creator {p['op']}/{p['version']}/{p['namespace']}"):
            continue
        fc = trt.PluginFieldCollection([field(f) for f in p["fields"]])
        plugin = c.create_plugin(p["node"], fc, trt.TensorRTPhase.BUILD)
        shown = ", ".join(f"{f['name']}={describe(f)}" for f in p["fields"])
        ok = plugin is not None
        if ok:
            core = plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
            ok = (core.plugin_name, core.plugin_version, core.plugin_namespace) == (p["op"], VERSION, NAMESPACE)
        if p.get("expect_error"):
            check(plugin is None, f"{p['source']}: create_plugin refuses {{{shown}}}")
        else:
            check(ok, f"{p['source']}: create_plugin({p['node']!r}, {{{shown}}}) -> {p['op']} plugin")
    check(registry.deregister_library(handle) is None, "deregister_library")
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


def describe(f):
    b = bytes(f["data"])
    if f["type"] == 6:
        return b.rstrip(b"\0").decode()
    if f["type"] == 5:
        return str(int(np.frombuffer(b, dtype=np.int32)[0]))
    return f"{float(np.frombuffer(b, dtype=np.float32)[0]):g}"


if __name__ == "__main__":
    sys.exit(main())
