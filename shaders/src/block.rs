//! Per-type constants shared by the CPU and GPU kernels.

use vidllm_core::ggml::GgmlType;

pub(crate) fn ty_from_id(id: u32) -> GgmlType {
    match GgmlType::from_id(id) {
        Some(t) if t.stays_packed() => t,
        _ => panic!("q_matmul: type id {id} is not a packed type (QuantMatrix checks this)"),
    }
}
