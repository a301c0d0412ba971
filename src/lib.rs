pub mod cuda;
pub mod ort;
pub mod reference;
pub mod spec;
