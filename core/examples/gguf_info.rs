//! Print a GGUF file's metadata (long arrays abridged) and tensor table.
//! `cargo run --release -p vidllm-core --example gguf_info -- FILE.gguf [TEXT]`

use vidllm_core::gguf::{Gguf, Value};
use vidllm_core::tokenizer::Tokenizer;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).ok_or("usage: gguf_info FILE.gguf [TEXT]")?;
    let g = Gguf::open(path)?;
    println!("GGUF v{} alignment {}", g.version, g.alignment);
    for (k, v) in &g.metadata {
        match v {
            Value::Array(a) => println!("{k} = [{} items] {:?}", a.len(), &a[..a.len().min(3)]),
            Value::String(s) if s.len() > 200 => println!("{k} = {:?}...", &s[..200]),
            _ => println!("{k} = {v:?}"),
        }
    }
    for t in &g.tensors {
        println!("{:<32} {:>5} {:?}", t.name, t.ty.name(), t.shape());
    }
    if let Some(text) = args.get(2) {
        let tok = Tokenizer::from_gguf(&g)?;
        let ids = tok.encode(text, tok.add_bos)?;
        println!("tokens {ids:?}\ndecoded {:?}", tok.decode(&ids));
    }
    Ok(())
}
