//! Every GGML block type vidllm reads, decoded as llama.cpp's own Python package decodes it
//! (`tests/fixtures/gen_ggml_blocks.py`, gguf-py's `quants.py`): the same f32 values, bit
//! for bit, from random blocks. And the types vidllm writes (`--quant`, `--vision-quant`,
//! the KV cache), encoded as gguf-py encodes them: the same bytes.

use vidllm_core::ggml::{GgmlType, dequantize, quantize};
use vidllm_core::safetensors::Checkpoint;
use vidllm_tests::fixture;

#[test]
fn every_block_type_decodes_as_gguf_py_does() {
    let r = Checkpoint::open_files(&[fixture("ggml_blocks.safetensors")]).unwrap();
    let mut checked = Vec::new();
    for name in r.names().filter_map(|n| n.strip_suffix(".blocks")) {
        let ty = *GgmlType::ALL.iter().find(|t| t.name().eq_ignore_ascii_case(name)).unwrap_or_else(|| panic!("{name}: not a vidllm type"));
        let (blocks, _, _) = r.raw(&format!("{name}.blocks")).unwrap();
        let (want, _) = r.f32(&format!("{name}.values")).unwrap();
        assert_eq!(blocks.len() / ty.block_bytes() * ty.block_elems(), want.len(), "{name}: block size");
        let got = dequantize(ty, blocks, want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{name} element {i}: {g} vs gguf-py {w}");
        }
        checked.push(ty);
    }
    let quantised = GgmlType::ALL.iter().filter(|t| t.is_quantized()).count();
    assert_eq!(checked.len(), quantised + 1, "every block type and BF16 has a reference: {checked:?}");
    println!("{} types decode as gguf-py does: {checked:?}", checked.len());
}

#[test]
fn quantisation_writes_gguf_py_bytes() {
    let r = Checkpoint::open_files(&[fixture("ggml_blocks.safetensors")]).unwrap();
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
        let name = ty.name().to_uppercase();
        let (source, _) = r.f32(&format!("{name}.source")).unwrap();
        let (want, _, _) = r.raw(&format!("{name}.quantized")).unwrap();
        let got = quantize(ty, &source);
        assert_eq!(got.len(), want.len(), "{name}: size");
        for (b, (g, w)) in got.chunks(ty.block_bytes()).zip(want.chunks(ty.block_bytes())).enumerate() {
            assert_eq!(g, w, "{name} block {b}: vidllm against gguf-py");
        }
    }
}
