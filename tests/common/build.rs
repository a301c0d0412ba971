//! Building one-node ONNX models and opening them with the plugin, for the tests that run the ops
//! through ONNX Runtime.

use onnx_protobuf::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto, AttributeProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use ort::session::{builder::SessionBuilder, Session};

/// A tensor value info; `None` dims are the symbolic token count "T".
pub fn value_info(name: &str, elem: DataType, dims: &[Option<i64>]) -> ValueInfoProto {
    let mut shape = TensorShapeProto::new();
    for d in dims {
        let mut dim = tensor_shape_proto::Dimension::new();
        match d {
            Some(v) => dim.set_dim_value(*v),
            None => dim.set_dim_param("T".into()),
        }
        shape.dim.push(dim);
    }
    let mut tt = type_proto::Tensor::new();
    tt.elem_type = elem as i32;
    tt.shape = Some(shape).into();
    let mut ty = TypeProto::new();
    ty.set_tensor_type(tt);
    let mut vi = ValueInfoProto::new();
    vi.name = name.into();
    vi.type_ = Some(ty).into();
    vi
}

pub fn f32_initializer(name: &str, dims: &[i64], data: &[f32]) -> TensorProto {
    let mut t = TensorProto::new();
    t.name = name.into();
    t.dims = dims.to_vec();
    t.data_type = DataType::FLOAT as i32;
    t.float_data = data.to_vec();
    t
}

pub fn string_attr(name: &str, v: &str) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::STRING.into();
    a.s = v.as_bytes().to_vec();
    a
}

pub fn int_attr(name: &str, v: i64) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::INT.into();
    a.i = v;
    a
}

/// A session builder with the plugin registered. Hold the returned guard until the session is
/// committed: ORT races when two sessions registering a custom-op domain are created at once.
pub fn plugin_builder() -> (SessionBuilder, std::sync::MutexGuard<'static, ()>) {
    let env = scattermoe::ort_ops::runtime::environment().expect("ONNX Runtime");
    let plugin = scattermoe::ort_ops::runtime::plugin_path().expect("plugin");
    let guard = scattermoe::ort_ops::runtime::session_creation_lock();
    (Session::builder(env).unwrap().with_operator_library(&plugin).unwrap(), guard)
}

pub fn session_from_bytes(bytes: &[u8]) -> Session {
    let (mut b, _one_at_a_time) = plugin_builder();
    b.commit_from_memory(bytes).unwrap()
}

pub fn session_from_file(path: &std::path::Path) -> Session {
    let (mut b, _one_at_a_time) = plugin_builder();
    b.commit_from_file(path).unwrap()
}
