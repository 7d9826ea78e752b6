//! Progress on stderr for the stages that are slow and otherwise silent: reading a model's
//! weights (a byte bar; a 7B folder is quantised on load for minutes) and decoding and
//! encoding frames (a spinner with the elapsed time). Drawn by `indicatif`, which draws
//! nothing when stderr is not a terminal; `--json` hides it too.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use vidllm_core::progress::OnRead;

#[derive(Clone, Copy)]
pub struct Progress {
    hidden: bool,
}

impl Progress {
    pub fn new(hidden: bool) -> Self {
        Self { hidden }
    }

    fn bar(&self, len: Option<u64>) -> ProgressBar {
        if self.hidden { ProgressBar::hidden() } else { ProgressBar::with_draw_target(len, ProgressDrawTarget::stderr()) }
    }

    /// Run `load` with a byte bar for `what`, fed by the hook `load` gives the model file;
    /// the bar is cleared when `load` returns, whatever it returns.
    pub fn loading<R>(&self, what: &str, load: impl FnOnce(OnRead) -> R) -> R {
        let style = ProgressStyle::with_template("{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {elapsed}")
            .expect("a valid template")
            .progress_chars("=> ");
        let bar = self.bar(Some(0)).with_style(style).with_message(format!("loading {what}"));
        let hook = bar.clone();
        let out = load(Box::new(move |done, total| {
            hook.set_length(total);
            hook.set_position(done);
        }));
        bar.finish_and_clear();
        out
    }

    /// Run `stage` under a spinner naming it, ticking on its own while the stage blocks;
    /// cleared when `stage` returns.
    pub fn during<R>(&self, what: String, stage: impl FnOnce() -> R) -> R {
        let style = ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("a valid template");
        let bar = self.bar(None).with_style(style).with_message(what);
        bar.enable_steady_tick(Duration::from_millis(120));
        let out = stage();
        bar.finish_and_clear();
        out
    }
}
