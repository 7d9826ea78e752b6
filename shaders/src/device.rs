//! Choosing the device: `gpu` is wgpu on whatever adapter exists (software ones such as
//! lavapipe included), `cpu` the Flex CPU backend, `auto` a hardware GPU if there is one,
//! else the CPU.

use std::sync::atomic::{AtomicUsize, Ordering};

use burn::tensor::{Device, DeviceKind};

static MAX_BINDING: AtomicUsize = AtomicUsize::new(usize::MAX);

/// The largest buffer one kernel may bind (WebGPU's `maxStorageBufferBindingSize`).
/// Weights above it are stored as row bands; attention and vision batches are sized
/// under it. Unlimited until a device that states a limit is opened.
pub fn max_binding_bytes() -> usize {
    MAX_BINDING.load(Ordering::Relaxed)
}

/// Set the binding limit outright (tests of the split paths).
/// Call before loading a model: weights are split as they are uploaded.
pub fn set_max_binding_bytes(bytes: usize) {
    MAX_BINDING.store(bytes.max(4096), Ordering::Relaxed);
}

/// Lower the binding limit to `bytes` if it is higher; never raises it. Devices opened
/// in one process (one page) share the limit, so it is the smallest of theirs: opening
/// a roomier device, or the CPU, must not lift the cap a GPU model still runs under.
pub fn lower_max_binding_bytes(bytes: usize) {
    MAX_BINDING.fetch_min(bytes.max(4096), Ordering::Relaxed);
}

/// How many items of `item_bytes` fit one binding beside `fixed_bytes` (at least one):
/// rows of a weight band, tokens of a prefill step, frames of a vision batch.
pub fn per_binding(item_bytes: usize, fixed_bytes: usize) -> usize {
    (max_binding_bytes().saturating_sub(fixed_bytes) / item_bytes.max(1)).max(1)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Gpu,
    Cpu,
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "gpu" => Ok(Self::Gpu),
            "cpu" => Ok(Self::Cpu),
            other => Err(format!("unknown device {other:?} (auto, gpu, cpu)")),
        }
    }
}

/// The picked device and a human-readable name for logs.
#[derive(Clone)]
pub struct Picked {
    pub device: Device,
    pub name: String,
    pub is_gpu: bool,
}

#[derive(Debug)]
pub struct NoAdapter;

impl std::fmt::Display for NoAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no GPU adapter found (wgpu sees none; install a Vulkan driver such as mesa-vulkan-drivers, or use --device cpu)")
    }
}

impl std::error::Error for NoAdapter {}

pub fn pick(choice: DeviceChoice) -> Result<Picked, NoAdapter> {
    let cpu = || Picked { device: Device::flex(), name: "cpu (flex)".into(), is_gpu: false };
    if choice == DeviceChoice::Cpu {
        return Ok(cpu());
    }
    let mut adapters = list_adapters();
    // The compute APIs before OpenGL: burn's wgpu runtime settles on them too.
    adapters.sort_by_key(|a| a.backend == wgpu::Backend::Gl);
    let hardware = adapters.iter().find(|a| is_hardware(a.device_type));
    let chosen = match (choice, hardware) {
        (_, Some(a)) => a,
        (DeviceChoice::Auto, None) => return Ok(cpu()),
        (_, None) => adapters.first().ok_or(NoAdapter)?,
    };
    let kind = match chosen.device_type {
        wgpu::DeviceType::DiscreteGpu => DeviceKind::DiscreteGpu(0),
        wgpu::DeviceType::IntegratedGpu => DeviceKind::IntegratedGpu(0),
        wgpu::DeviceType::VirtualGpu => DeviceKind::VirtualGpu(0),
        wgpu::DeviceType::Cpu => DeviceKind::Cpu,
        wgpu::DeviceType::Other => DeviceKind::DefaultDevice,
    };
    let name = format!("gpu (wgpu {:?}: {})", chosen.backend, chosen.name);
    Ok(Picked { device: Device::wgpu(kind), name, is_gpu: true })
}

fn is_hardware(t: wgpu::DeviceType) -> bool {
    matches!(t, wgpu::DeviceType::DiscreteGpu | wgpu::DeviceType::IntegratedGpu)
}

/// Adapters wgpu can open here (natively).
pub fn list_adapters() -> Vec<wgpu::AdapterInfo> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY)).iter().map(|a| a.get_info()).collect()
}
