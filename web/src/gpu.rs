//! The WebGPU device, opened once per page (or worker), and frames uploaded to it
//! straight from the browser's decoder: `copyExternalImageToTexture` from a `<video>`,
//! an `ImageBitmap`, a `VideoFrame` or a canvas, then a texture-to-buffer copy into a
//! tensor the model graph reads. No pixel passes through wasm memory on this path.

use std::cell::RefCell;

use burn::backend::Wgpu;
use burn::tensor::wgpu::{WgpuSetup, wgpu};
use burn::tensor::{DType, Device, Int, Tensor, TensorCreationOptions};
use cubecl_wgpu::{AutoCompiler, WgpuServer};
use vidllm_shaders::device::{BindingCap, MatmulKernels, Placement};
#[cfg(target_arch = "wasm32")]
use wasm_bindgen::JsCast;
use wasm_bindgen::JsValue;

use crate::js_err;
use wasm_bindgen::JsError;

/// WebGPU's default `maxStorageBufferBindingSize`: a device is never asked for less.
const WEBGPU_DEFAULT_BINDING: u64 = 128 << 20;

#[derive(Clone)]
pub struct Opened {
    pub device: Device,
    /// The wgpu handles under the device (WebGPU only), for external-image copies.
    pub wgpu: Option<(wgpu::Device, wgpu::Queue)>,
    /// The device's storage-binding limit, lowered to the cap this load asked for.
    pub cap: BindingCap,
}

impl Opened {
    /// Where this load's model goes: the device under this load's cap.
    pub fn placement(&self) -> Placement {
        Placement { device: self.device.clone(), cap: self.cap, matmul: MatmulKernels::Auto, activations: Default::default() }
    }
}

thread_local! {
    // burn registers a wgpu runtime once per thread; every model in the page shares it.
    static GPU: RefCell<Option<Opened>> = const { RefCell::new(None) };
}

/// WebGPU (initialised asynchronously, as browsers require) or, in a build with it, the CPU
/// backend.
/// `cap`: treat storage bindings above this many bytes as unavailable (tests, small GPUs).
/// Each load carries its own cap: the device's limit, lowered to what that load asked
/// for, so one model's cap never reaches another's.
pub async fn open_device(gpu: bool, cap: Option<u64>) -> Result<Opened, JsError> {
    let lowered = |o: Opened| Opened { cap: cap.map_or(o.cap, |c| o.cap.lower(c)), ..o };
    if !gpu {
        #[cfg(feature = "cpu")]
        return Ok(lowered(Opened { device: Device::flex(), wgpu: None, cap: BindingCap::NONE }));
        // js/vidllm.js loads CPU models into pkg-cpu/ or pkg-threads/, never here.
        #[cfg(not(feature = "cpu"))]
        return Err(js_err(
            "this is the WebGPU package (pkg/), built without the CPU backend: device \"cpu\" runs from pkg-cpu/ or pkg-threads/",
        ));
    }
    if let Some(o) = GPU.with(|g| g.borrow().clone()) {
        return Ok(lowered(o));
    }
    let (device, setup) = match cap {
        None => Device::wgpu_options().init_with_setup_async().await.map_err(|e| js_err(format!("WebGPU: {e}")))?,
        Some(c) => {
            let setup = capped_setup(c.max(WEBGPU_DEFAULT_BINDING)).await?;
            (Device::wgpu_options().setup(setup.clone()).init().map_err(|e| js_err(format!("WebGPU: {e}")))?, setup)
        }
    };
    setup.device.set_device_lost_callback(|reason, message| {
        if reason != wgpu::DeviceLostReason::Destroyed {
            crate::record_failure(format!("the WebGPU device was lost ({reason:?}): {message}"));
        }
    });
    let limits = setup.device.limits();
    let cap_of_device = BindingCap::bytes(limits.max_storage_buffer_binding_size.min(limits.max_buffer_size));
    let opened = Opened { device, wgpu: Some((setup.device.clone(), setup.queue.clone())), cap: cap_of_device };
    GPU.with(|g| *g.borrow_mut() = Some(opened.clone()));
    Ok(lowered(opened))
}

/// A WebGPU device whose storage bindings and buffers are limited to `cap` bytes, the
/// adapter's other limits and features as burn's own setup asks for them.
async fn capped_setup(cap: u64) -> Result<WgpuSetup, JsError> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: wgpu::Backends::BROWSER_WEBGPU,
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    let adapter = instance
        .request_adapter(&wgpu::RequestAdapterOptions { power_preference: wgpu::PowerPreference::HighPerformance, ..Default::default() })
        .await
        .map_err(|e| js_err(format!("WebGPU found no adapter: {e}")))?;
    let mut limits = adapter.limits();
    limits.max_storage_buffer_binding_size = limits.max_storage_buffer_binding_size.min(cap);
    limits.max_buffer_size = limits.max_buffer_size.min(cap);
    let (device, queue) = adapter
        .request_device(&wgpu::DeviceDescriptor {
            required_features: adapter.features().difference(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS),
            required_limits: limits,
            ..Default::default()
        })
        .await
        .map_err(|e| js_err(format!("WebGPU device: {e}")))?;
    Ok(WgpuSetup { instance, adapter, device, queue, backend: wgpu::Backend::BrowserWebGpu })
}

/// What a browser can hand over as a frame.
#[cfg(target_arch = "wasm32")]
fn external_source(v: JsValue) -> Result<wgpu::ExternalImageSource, JsError> {
    use wgpu::ExternalImageSource as S;
    let v = match v.dyn_into::<web_sys::ImageBitmap>() {
        Ok(b) => return Ok(S::ImageBitmap(b)),
        Err(v) => v,
    };
    let v = match v.dyn_into::<web_sys::VideoFrame>() {
        Ok(f) => return Ok(S::VideoFrame(f)),
        Err(v) => v,
    };
    let v = match v.dyn_into::<web_sys::OffscreenCanvas>() {
        Ok(c) => return Ok(S::OffscreenCanvas(c)),
        Err(v) => v,
    };
    let v = match v.dyn_into::<web_sys::ImageData>() {
        Ok(d) => return Ok(S::ImageData(d)),
        Err(v) => v,
    };
    // Element types do not exist inside a worker; test for them only where they do.
    if js_sys::Reflect::has(&js_sys::global(), &"HTMLVideoElement".into()).unwrap_or(false) {
        let v = match v.dyn_into::<web_sys::HtmlVideoElement>() {
            Ok(e) => return Ok(S::HTMLVideoElement(e)),
            Err(v) => v,
        };
        let v = match v.dyn_into::<web_sys::HtmlImageElement>() {
            Ok(e) => return Ok(S::HTMLImageElement(e)),
            Err(v) => v,
        };
        if let Ok(e) = v.dyn_into::<web_sys::HtmlCanvasElement>() {
            return Ok(S::HTMLCanvasElement(e));
        }
    }
    Err(js_err("a frame must be an ImageBitmap, VideoFrame, HTMLVideoElement, HTMLImageElement, canvas or ImageData"))
}

/// Frames of one size being gathered in a texture array, one layer per frame.
/// (Browser only: native builds of this crate, for checks, refuse to make one.)
pub struct FrameTexture {
    texture: wgpu::Texture,
    pub width: u32,
    pub height: u32,
    pub frames: u32,
    pub filled: u32,
}

impl FrameTexture {
    pub fn new(device: &wgpu::Device, frames: u32, width: u32, height: u32) -> Result<Self, JsError> {
        let lim = device.limits();
        if frames == 0 || width == 0 || height == 0 {
            return Err(js_err(format!("cannot take {frames} frames of {width}x{height}")));
        }
        if width > lim.max_texture_dimension_2d || height > lim.max_texture_dimension_2d || frames > lim.max_texture_array_layers {
            return Err(js_err(format!(
                "{frames} frames of {width}x{height} exceed this GPU's textures ({} px, {} layers)",
                lim.max_texture_dimension_2d, lim.max_texture_array_layers
            )));
        }
        let texture = device.create_texture(&wgpu::TextureDescriptor {
            label: Some("vidllm frames"),
            size: wgpu::Extent3d { width, height, depth_or_array_layers: frames },
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format: wgpu::TextureFormat::Rgba8Unorm,
            // copyExternalImageToTexture needs RENDER_ATTACHMENT on its destination.
            usage: wgpu::TextureUsages::COPY_DST | wgpu::TextureUsages::COPY_SRC | wgpu::TextureUsages::RENDER_ATTACHMENT,
            view_formats: &[],
        });
        Ok(Self { texture, width, height, frames, filled: 0 })
    }

    /// Copy the browser's current picture of `source` into the next layer.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn push(&mut self, _queue: &wgpu::Queue, _source: JsValue) -> Result<(), JsError> {
        Err(js_err("external images exist only in a browser"))
    }

    /// Copy the browser's current picture of `source` into the next layer.
    #[cfg(target_arch = "wasm32")]
    pub fn push(&mut self, queue: &wgpu::Queue, source: JsValue) -> Result<(), JsError> {
        if self.filled == self.frames {
            return Err(js_err(format!("all {} frames were already given", self.frames)));
        }
        let source = external_source(source)?;
        let (w, h) = (source.width(), source.height());
        if (w, h) != (self.width, self.height) {
            return Err(js_err(format!("frame {} is {w}x{h}, the others {}x{}", self.filled, self.width, self.height)));
        }
        queue.copy_external_image_to_texture(
            &wgpu::CopyExternalImageSourceInfo { source, origin: wgpu::Origin2d::ZERO, flip_y: false },
            wgpu::CopyExternalImageDestInfo {
                texture: &self.texture,
                mip_level: 0,
                origin: wgpu::Origin3d { x: 0, y: 0, z: self.filled },
                aspect: wgpu::TextureAspect::All,
                color_space: wgpu::PredefinedColorSpace::Srgb,
                premultiplied_alpha: false,
            },
            wgpu::Extent3d { width: w, height: h, depth_or_array_layers: 1 },
        );
        self.filled += 1;
        Ok(())
    }

    /// The frames as RGBA texels in a tensor on `burn`: `[frames, height, row_words]` u32,
    /// rows padded to the 256 bytes a texture-to-buffer copy requires.
    pub fn into_words(self, device: &wgpu::Device, queue: &wgpu::Queue, burn: &Device) -> Result<Tensor<3, Int>, JsError> {
        if self.filled != self.frames {
            return Err(js_err(format!("{} of {} frames were given", self.filled, self.frames)));
        }
        let row_words = (self.width as usize * 4).next_multiple_of(256) / 4;
        let shape = [self.frames as usize, self.height as usize, row_words];
        // Zero-filled, so the runtime counts the buffer as written before we copy into it.
        let words = Tensor::<3, Int>::zeros(shape, TensorCreationOptions::new(burn.clone()).with_dtype(DType::U32));
        let prim = words.clone().try_into_primitive::<Wgpu>().map_err(|e| js_err(format!("frames: {e:?}")))?;
        let res =
            prim.client.get_resource::<WgpuServer<AutoCompiler>>(prim.handle.clone()).map_err(|e| js_err(format!("frames: {e:?}")))?;
        let res = res.resource();
        let mut enc = device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("vidllm frames") });
        enc.copy_texture_to_buffer(
            wgpu::TexelCopyTextureInfo {
                texture: &self.texture,
                mip_level: 0,
                origin: wgpu::Origin3d::ZERO,
                aspect: wgpu::TextureAspect::All,
            },
            wgpu::TexelCopyBufferInfo {
                buffer: &res.buffer,
                layout: wgpu::TexelCopyBufferLayout {
                    offset: res.offset,
                    bytes_per_row: Some(row_words as u32 * 4),
                    rows_per_image: Some(self.height),
                },
            },
            wgpu::Extent3d { width: self.width, height: self.height, depth_or_array_layers: self.frames },
        );
        queue.submit([enc.finish()]);
        self.texture.destroy();
        Ok(words)
    }
}
