//! `gpu.rs` for the CPU package (built without the `webgpu` feature): the same names, no
//! WebGPU. `open_device` opens the CPU backend and refuses WebGPU; a GPU handle cannot
//! exist ([`NoGpu`] has no values), so the frame-texture path is unreachable and the
//! frames of a video arrive as RGBA bytes, as on the default package's CPU backend.

use burn::tensor::{Device, Int, Tensor};
use vidllm_shaders::device::{BindingCap, MatmulKernels, Placement};
use wasm_bindgen::{JsError, JsValue};

use crate::js_err;

/// A WebGPU device or queue, of which this build has none.
#[derive(Clone, Copy)]
pub enum NoGpu {}

#[derive(Clone)]
pub struct Opened {
    pub device: Device,
    /// Always `None`: the handles of `gpu.rs`, which this build cannot hold.
    pub wgpu: Option<(NoGpu, NoGpu)>,
    pub cap: BindingCap,
}

impl Opened {
    /// Where this load's model goes: the CPU, under this load's cap.
    pub fn placement(&self) -> Placement {
        Placement { device: self.device.clone(), cap: self.cap, matmul: MatmulKernels::Auto, activations: Default::default() }
    }
}

/// The CPU backend; WebGPU is refused with what to load instead.
pub async fn open_device(gpu: bool, cap: Option<u64>) -> Result<Opened, JsError> {
    if gpu {
        return Err(js_err("this is vidllm's CPU package (wasm threads): WebGPU runs from the default package"));
    }
    let none = BindingCap::NONE;
    Ok(Opened { device: Device::flex(), wgpu: None, cap: cap.map_or(none, |c| none.lower(c)) })
}

/// Frames gathered on the GPU: never made here ([`FrameTexture::new`] takes a [`NoGpu`]).
pub struct FrameTexture {
    never: NoGpu,
    pub width: u32,
}

impl FrameTexture {
    pub fn new(device: &NoGpu, _frames: u32, _width: u32, _height: u32) -> Result<Self, JsError> {
        match *device {}
    }

    pub fn push(&mut self, _queue: &NoGpu, _source: JsValue) -> Result<(), JsError> {
        match self.never {}
    }

    pub fn into_words(self, _device: &NoGpu, _queue: &NoGpu, _burn: &Device) -> Result<Tensor<3, Int>, JsError> {
        match self.never {}
    }
}
