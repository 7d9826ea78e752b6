//! `vidllm-wasm-bindgen`: writes the JS glue (`--target web`) for the vidllm-web wasm module.
//!
//! The browser package needs wasm-bindgen's CLI at exactly the version of the
//! `wasm-bindgen` crate it links. `cargo install wasm-bindgen-cli --locked` resolves the
//! tool's own lockfile, whose pins a registry mirror may not serve; built here, as a
//! workspace member over `wasm-bindgen-cli-support`, its dependencies are pinned by the
//! project's `Cargo.lock` and it compiles once, with the rest of the workspace.
//!
//! The output is what `wasm-bindgen --target web --out-dir DIR INPUT` of the same version
//! writes: TypeScript declarations included, and the default module path kept so that
//! `init()` finds the `.wasm` next to the glue. The function names (the `name` custom
//! section, a fifth of the module) and the `producers` section are dropped, as
//! `wasm-bindgen --remove-name-section --remove-producers-section` does: pass
//! `--keep-names` for a build whose profiles name functions.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;

#[derive(Parser)]
#[command(name = "vidllm-wasm-bindgen", about = "wasm-bindgen --target web, at the workspace's wasm-bindgen version")]
struct Args {
    /// The `.wasm` file cargo built for wasm32-unknown-unknown.
    input: PathBuf,
    /// Where the glue (`NAME.js`, `NAME.d.ts`, `NAME_bg.wasm`) goes.
    #[arg(long)]
    out_dir: PathBuf,
    /// Keep the function names (for profiling in the browser's devtools).
    #[arg(long)]
    keep_names: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    wasm_bindgen_cli_support::Bindgen::new()
        .input_path(&args.input)
        .web(true)?
        .typescript(true)
        .omit_default_module_path(false)
        .remove_name_section(!args.keep_names)
        .remove_producers_section(!args.keep_names)
        .generate(&args.out_dir)
        .with_context(|| format!("generating the JS glue for {} into {}", args.input.display(), args.out_dir.display()))
}
