//! Links libscattermoe_ort.so with `-z nodelete`. ONNX Runtime unloads a custom-op library when the
//! last session options that registered it are released, but threads that ran our code (ORT's
//! pool, the caller's) still hold thread-local values whose destructors live in this library; a
//! thread exiting after the unload would jump into unmapped code (seen as a SIGSEGV in
//! __nptl_deallocate_tsd). A library that stays mapped until the process ends avoids that.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");
}
